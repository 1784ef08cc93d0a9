"""benchmarks/send: ``storagectl volume send -o`` and ``volume receive -i`` against a running
daemon, beside qemu-img convert of the same data, in the same run, and the stream's size
against the data it carries.

The data (default 1 GiB) is half random bytes, half zeros, in 1 MiB pieces alternating,
written to a raw file. A real daemon runs as a subprocess (``storaged`` with its control
socket and an NBD listener, which ``storagectl volume import`` drives qemu-img against), with
two pools ``src`` and ``dst`` of one sparse file each (profile plain). The raw file is
imported as ``src/vm`` (``storagectl volume import --format raw``; compression lz4, the
default; qemu-img skips the zero pieces, so they are holes and the volume maps only the
random half, checked in ``storagectl volume list``) and snapshotted as ``src/vm@s1``. Rows:
- ``storagectl send -o``: ``storagectl volume send src/vm@s1 -o FILE``, what users run: the
  stream goes over the daemon's control socket to storagectl, which writes FILE and
  returns once it is durable (fdatasync);
- ``storagectl receive -i``: ``storagectl volume receive dst/vmN -i FILE`` of that file into
  a new volume each round (the receive commits before it returns), the last round's
  volume deleted before the timer starts;
- ``qemu-img convert raw->qcow2`` and ``qcow2->raw`` of the raw file (the same page cache
  conditions: the source was just written), each to a new file, with a sync (qemu-img's
  default cache mode writes back before it exits);
- ``copy of the stream (disk floor)``: the stream file (page-cached) copied into a new
  file in 8 MiB writes with the devices' write-behind (pool.iovec.WriteBehind; on this
  VM's disk it beats dd conv=fdatasync, measured: 1.27 s against 1.58 s for 512 MiB),
  inside this process, durable when it returns: about the least time this disk takes to
  make the stream's bytes durable (a diagnostic: the disk, not the CPU, bounds every row);
- diagnostics, not targets: ``in-process send/receive (no socket)``, the engine's own
  ``portable.send`` into a ``portable.FdSink`` and ``portable.Receiver`` from the file (what
  the daemon does with the file storagectl passes it), inside this process on pools of its
  own (a volume written with the same pieces, zeros as data), to tell the daemon and
  process costs from the engine's.
The storagectl and qemu-img rows each time one subprocess (time.perf_counter around it,
storagectl's own start-up included, as users pay it; its modules byte-compiled first, as
an installed copy has them). Every row that writes removes what
its previous round wrote before its timer starts: the send's FILE and qemu-img's target
are unlinked, the received volume is deleted (its extents are free in the pool again, and
the next receive writes into them). So none pays for freeing the previous round's data,
and all write into memory that held page cache a moment before. That matters on a VM: a
page of guest memory touched for the first time costs a fault in the hypervisor, and the
kernel's copy into new page cache then runs at a fifth of its speed (measured here: 430
MB/s into never-used memory, 2.2-2.8 GB/s into pages just freed); qemu-img always got
freed pages, and the receives, writing ever further into the device file, used to get
new ones. After the rounds, the last
received volume must map what the source maps and, exported back to a raw file (untimed),
equal the raw file (a few 1 MiB pieces byte for byte, then ``qemu-img compare``); a
mismatch raises AssertionError. Sizes: the stream against lz4 (block mode, 1 MiB chunks)
of the data the volume holds (the random pieces; holes are not sent). The targets apply to
the storagectl rows: stream <= that lz4 + 1%, and send and receive at least as fast as the
faster qemu-img convert.

Each round times the seven rows one after the other, each after a sync and a second of quiet;
round 0 runs them in the order above (the stream and the qcow2 file exist after it), later
rounds rotated (each row takes its turn first: a VM's disk keeps writing after a sync
returns, so no row should always come right after the same heavy one); rows report the
median. The daemon is stopped (SIGTERM) and the work directory removed at the end, also
on failure.

    .venv/bin/python -m benchmarks.send [--size MiB] [--runs N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import lz4.block
import trio

from benchmarks.common import free_port, wait_port
from benchmarks.engine import choose_dir, fs_type
from pool import FileDevice, Pool
from pool.iovec import WriteBehind
from storaged.tuning import tune_process
from volumes import VolumeManager, portable

MiB = 1 << 20
GiB = 1 << 30
SETTLE = 1.0        # seconds of quiet before each timed step
BIN = Path(sys.executable).parent
STORAGED = str(BIN / "storaged")
STORAGECTL = str(BIN / "storagectl")

ROWS = [("ctl send", "storagectl send -o"), ("ctl receive", "storagectl receive -i"),
        ("send", "in-process send (no socket)"),
        ("receive", "in-process receive (no socket)"),
        ("raw->qcow2", "qemu-img convert raw->qcow2"),
        ("qcow2->raw", "qemu-img convert qcow2->raw"),
        ("floor", "copy of the stream (disk floor)")]


def _data(size: int) -> list[bytes]:
    rnd = os.urandom(MiB)
    zero = bytes(MiB)
    # Each random MiB differs (a rotation), so nothing dedups by accident.
    return [rnd[i % MiB:] + rnd[:i % MiB] if (i // MiB) % 2 == 0 else zero
            for i in range(0, size, MiB)]


def _write_raw(path: str, pieces: list[bytes]) -> None:
    with open(path, "wb") as f:
        for p in pieces:
            f.write(p)
        os.fsync(f.fileno())


class Daemon:
    """A real ``storaged`` in its own process, driven with ``storagectl``."""

    def __init__(self, d: str) -> None:
        self.sock = os.path.join(d, "ctl.sock")
        self.log_path = os.path.join(d, "storaged.log")
        port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [STORAGED, "--state-dir", os.path.join(d, "state"), "--socket", self.sock,
                 "--nbd-listen", f"127.0.0.1:{port}", "--metrics-listen", "off",
                 "--iscsi-listen", "off", "--log-level", "warning"],
                stdout=log, stderr=log)
        try:
            wait_port(port, self.proc, "storaged")
            deadline = time.monotonic() + 30
            while not os.path.exists(self.sock):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"storaged made no control socket: {self.log()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def cmd(self, *args: str) -> list[str]:
        return [STORAGECTL, "--socket", self.sock, *args]

    def ctl(self, *args: str) -> str:
        """Run storagectl (untimed); its stdout, or RuntimeError with its stderr."""
        r = subprocess.run(self.cmd(*args), capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"storagectl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def volumes(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in json.loads(self.ctl("--json", "volume", "list"))}

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                print("benchmarks.send: storaged did not stop on SIGTERM; killed",
                      file=sys.stderr)
        if self.proc.returncode not in (0, -signal.SIGTERM):
            print(f"benchmarks.send: storaged exited with {self.proc.returncode}; its log "
                  f"ends:\n{self.log()}", file=sys.stderr)


def _compile_cli() -> None:
    """Byte-compile the packages storagectl loads, as installing a package does: with
    PYTHONDONTWRITEBYTECODE set (as on some CI machines) every storagectl run would
    otherwise compile them from source, some 40 ms that no installed copy pays."""
    root = Path(__file__).resolve().parents[1]
    for pkg in ("storaged", "volumes", "pool"):
        compileall.compile_dir(str(root / pkg), quiet=1)


def _setup_daemon(dm: Daemon, d: str, raw: str, size: int, runs: int,
                  mapped: int) -> None:
    """Pools src and dst, src/vm imported from ``raw`` and snapshotted as src/vm@s1."""
    dm.ctl("pool", "create", "src", os.path.join(d, "src0.img"), "--profile", "plain",
           "--file-size", str(2 * size + GiB))
    dm.ctl("pool", "create", "dst", os.path.join(d, "dst0.img"), "--profile", "plain",
           "--file-size", str((runs + 1) * size + GiB))
    dm.ctl("volume", "import", "src/vm", raw, "--format", "raw")
    vol = dm.volumes()["src/vm"]
    if vol["size_bytes"] != size or vol["compression"] != "lz4" or vol["mapped_bytes"] != mapped:
        raise AssertionError(f"imported src/vm is not as expected (size {size}, lz4, "
                             f"{mapped} bytes mapped): {vol}")
    dm.ctl("snapshot", "create", "src/vm@s1")


async def _run_timed(cmd: list[str]) -> float:
    """Seconds that ``cmd`` took; RuntimeError with its stderr if it failed."""
    t0 = time.perf_counter()
    r = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): "
                           f"{r.stderr.decode(errors='replace').strip()}")
    return secs


async def _rounds(d: str, size: int, pieces: list[bytes], runs: int,
                  dm: Daemon) -> dict[str, list[float]]:
    """``runs`` rounds, each timing every row once."""
    raw = os.path.join(d, "src.raw")
    src = await Pool.create("src", [FileDevice(os.path.join(d, "inproc-src0"),
                                               create_size=2 * size + GiB)],
                            extent_size=16 * MiB, force=True)
    dst = await Pool.create("dst", [FileDevice(os.path.join(d, "inproc-dst0"),
                                               create_size=(runs + 1) * size + GiB)],
                            extent_size=16 * MiB, force=True)
    out: dict[str, list[float]] = {key: [] for key, _ in ROWS}
    out["stream"], out["ctl stream"] = [], []
    try:
        vs, vd = VolumeManager(src), VolumeManager(dst)
        vol = await vs.create("vm", size, compression=True)
        for i, piece in enumerate(pieces):
            await vol.write(i * MiB, piece)
        await vol.flush()
        await vs.snapshot("vm", "s1")
        path = os.path.join(d, "vm.stream")
        ctl_path = os.path.join(d, "ctl.stream")

        async def ctl_send() -> None:
            await trio.Path(ctl_path).unlink(missing_ok=True)
            out["ctl send"].append(await _run_timed(
                dm.cmd("volume", "send", "src/vm@s1", "-o", ctl_path)))
            out["ctl stream"].append((await trio.Path(ctl_path).stat()).st_size)

        async def ctl_receive() -> None:
            n = len(out["ctl receive"])
            if n:       # the last round's volume goes, as qemu-img's last target file does
                await trio.to_thread.run_sync(dm.ctl, "volume", "delete", "--recursive",
                                           f"dst/vm{n - 1}")
                await _quiet()
            out["ctl receive"].append(await _run_timed(
                dm.cmd("volume", "receive", f"dst/vm{n}", "-i", ctl_path)))

        async def send() -> None:
            t0 = time.perf_counter()
            _h, chunks = await portable.send(vs, "vm", "s1")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                # As the daemon writes `storagectl volume send -o FILE`: durable at the end.
                sink = portable.FdSink(fd)
                await portable.write_out(chunks, sink)
                await trio.to_thread.run_sync(sink.sync)
            finally:
                os.close(fd)
            out["send"].append(time.perf_counter() - t0)
            out["stream"].append((await trio.Path(path).stat()).st_size)

        async def receive() -> None:
            n = len(out["receive"])
            name = f"vm{n}"
            if n:
                await vd.delete(f"vm{n - 1}", recursive=True)
                await _quiet()
            t0 = time.perf_counter()
            rx = portable.Receiver(vd, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                await rx.run(portable.read_in(fd))     # as the daemon reads `-i FILE`
            finally:
                os.close(fd)
            out["receive"].append(time.perf_counter() - t0)
            if rx.done is None:
                raise AssertionError("the in-process receive did not finish")
            for i in (0, 1, len(pieces) - 1):
                if await vd.get(name).read(i * MiB, MiB) != pieces[i]:
                    raise AssertionError(f"in-process received volume differs at MiB {i}")

        def convert(key: str, args: list[str], name: str) -> Callable[[], Awaitable[None]]:
            async def step() -> None:
                target = trio.Path(d, name)
                await target.unlink(missing_ok=True)
                t0 = time.perf_counter()
                await trio.run_process(["qemu-img", "convert", *args, str(target)])
                await trio.to_thread.run_sync(os.sync)
                out[key].append(time.perf_counter() - t0)
            return step

        async def floor() -> None:
            target = os.path.join(d, "floor.out")
            await trio.Path(target).unlink(missing_ok=True)
            t0 = time.perf_counter()
            await trio.to_thread.run_sync(_copy_durably, ctl_path, target)
            out["floor"].append(time.perf_counter() - t0)

        steps = [ctl_send, ctl_receive, send, receive,
                 convert("raw->qcow2", ["-f", "raw", "-O", "qcow2", raw], "out.qcow2"),
                 convert("qcow2->raw", ["-f", "qcow2", "-O", "raw",
                                        os.path.join(d, "out.qcow2")], "out.raw"),
                 floor]
        for run in range(runs):
            # Round 0 in dependency order (the streams, then the qcow2 file exist after);
            # later rounds rotated, so that each row takes its turn first.
            k = run % len(steps)
            for step in steps[k:] + steps[:k]:
                await _quiet()
                await step()
    finally:
        await src.close()
        await dst.close()
    return out


def _copy_durably(src: str, dst: str) -> None:
    """The disk floor: ``src`` (page-cached) copied into a new file ``dst`` in 8 MiB writes
    with the write-behind storaged's devices use (on this kind of disk it beats one
    fdatasync at the end, as dd conv=fdatasync does), durable when it returns."""
    with open(src, "rb", buffering=0) as f:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            behind, pos = WriteBehind(fd), 0
            while data := f.read(8 * MiB):
                os.pwrite(fd, data, pos)
                behind.wrote(pos, pos + len(data))
                pos += len(data)
            behind.sync()
            behind.join()
        finally:
            os.close(fd)


async def _quiet() -> None:
    """Each step starts from the same quiet storage: all written back, and a moment for
    the disk (a VM's disk keeps writing after a sync returns)."""
    await trio.to_thread.run_sync(os.sync)
    await trio.sleep(SETTLE)


def _verify(dm: Daemon, d: str, raw: str, pieces: list[bytes], runs: int) -> None:
    """The last received volume (the others were deleted round by round) maps what src/vm
    maps and reads back as the raw file."""
    vols = dm.volumes()
    want = vols["src/vm"]
    last = f"dst/vm{runs - 1}"
    got = vols.get(last)
    if got is None or (got["size_bytes"], got["mapped_bytes"]) != (
            want["size_bytes"], want["mapped_bytes"]):
        raise AssertionError(f"received {last} is not like src/vm: {got} vs {want}")
    if any(name.startswith("dst/") and name != last for name in vols):
        raise AssertionError(f"earlier received volumes were not deleted: {sorted(vols)}")
    out = os.path.join(d, "check.raw")
    dm.ctl("volume", "export", last, out, "--format", "raw")
    try:
        if os.path.getsize(out) != len(pieces) * MiB:
            raise AssertionError(f"exported {last} is {os.path.getsize(out)} bytes, "
                                 f"not {len(pieces) * MiB}")
        with open(out, "rb") as f:
            for i in sorted({0, 1, len(pieces) // 2, len(pieces) // 2 + 1, len(pieces) - 1}):
                f.seek(i * MiB)
                if f.read(MiB) != pieces[i]:
                    raise AssertionError(f"received {last} differs from the source at "
                                         f"MiB {i}")
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw, out],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise AssertionError(f"received {last} differs from the source: "
                                 f"qemu-img compare: {(r.stdout + r.stderr).strip()}")
    finally:
        os.unlink(out)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.send")
    ap.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    ap.add_argument("--dir", default=None, help="where to put the files (default /var/tmp)")
    ap.add_argument("--runs", type=int, default=6,
                    help="rounds of the seven rows; medians are reported (default 6)")
    args = ap.parse_args(argv)
    size = args.size * MiB
    d = tempfile.mkdtemp(prefix="storaged-bench-send-", dir=choose_dir(args.dir))
    print(f"benchmarks.send: {args.size} MiB volume, half random, half zeros; files in {d} "
          f"({fs_type(d)}); {os.cpu_count()} cores", flush=True)
    dm: Daemon | None = None
    try:
        pieces = _data(size)
        zero = bytes(MiB)
        held = [p for p in pieces if p != zero]     # the random pieces (zeros: holes)
        lz4_all = sum(len(lz4.block.compress(p, store_size=False)) for p in pieces)
        lz4_mapped = sum(len(lz4.block.compress(p, store_size=False)) for p in held)
        raw = os.path.join(d, "src.raw")
        _write_raw(raw, pieces)
        _compile_cli()
        dm = Daemon(d)
        _setup_daemon(dm, d, raw, size, args.runs, len(held) * MiB)
        tune_process()   # as the daemon runs
        res = trio.run(_rounds, d, size, pieces, args.runs, dm)
        _verify(dm, d, raw, pieces, args.runs)
    finally:
        if dm is not None:
            dm.stop()
        shutil.rmtree(d, ignore_errors=True)
    mb = size / 1e6
    best = min(statistics.median(res[k]) for k in ("raw->qcow2", "qcow2->raw"))
    print(f"{'':<32} {'seconds':>8} {'MB/s':>8} {'vs qemu-img':>12}   runs (s)")
    for key, name in ROWS:
        times = res[key]
        secs = statistics.median(times)
        ratio = best / secs
        spread = " ".join(f"{t:.2f}" for t in times)
        print(f"{name:<32} {secs:>8.2f} {mb / secs:>8.0f} {ratio:>11.2f}x   {spread}")
    floor = statistics.median(res["floor"])
    print("against the disk floor (its time over the row's; 1.00x: as fast as this disk "
          "takes the bytes): " + ", ".join(
              f"{name} {floor / statistics.median(res[key]):.2f}x" for key, name in
              (("ctl send", "storagectl send"), ("ctl receive", "storagectl receive"),
               ("raw->qcow2", "qemu-img raw->qcow2"), ("qcow2->raw", "qemu-img qcow2->raw"))))
    stream = int(res["ctl stream"][0])
    print(f"storagectl stream {stream / MiB:.1f} MiB; lz4 of the data src/vm holds (the "
          f"random half; zeros are holes) {lz4_mapped / MiB:.1f} MiB; stream / lz4 = "
          f"{stream / lz4_mapped:.4f} (target <= 1.01)")
    ip_stream = int(res["stream"][0])
    print(f"in-process stream {ip_stream / MiB:.1f} MiB (zeros written as data); lz4 of all "
          f"the written data {lz4_all / MiB:.1f} MiB; stream / lz4 = "
          f"{ip_stream / lz4_all:.4f} (diagnostic)")
    print(f"seconds are the median of {args.runs} runs; ratios are the faster qemu-img "
          f"convert's time over each row's (>= 1: as fast). The targets apply to the "
          f"storagectl rows (the daemon's control socket, as users run them); the "
          f"in-process rows are diagnostics. Received volumes verified against the source.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
