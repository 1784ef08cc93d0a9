"""benchmarks/iscsi: storaged's iSCSI target against tgtd (the Linux SCSI target framework,
Debian package ``tgt``) serving a raw file, on the same machine in interleaved rounds
(benchmarks/common.py).

Each target serves a 512 MiB LU on loopback, first filled with random data (so no target
answers reads from holes). Rows, per storaged volume (a plain and an ec:4+2 volume,
compression off, in one pool of six sparse files): ``iscsi-perf`` (libiscsi; 4 KiB
sequential reads at its default queue depth of 32) and ``qemu-img bench`` through qemu's
libiscsi driver: 1 MiB at depth 4 and 4 KiB at depth 16, reads and writes. Each row runs
tgtd (the anchor), storaged and, for the qemu-img rows, the ceiling -- ``qemu-img bench`` on
a raw file of the same disk with no iSCSI between -- back to back in every round, the order
alternating; the table gives the median paired ratio and its spread. storaged runs as a
separate process (``--serve``). The issue's target is at least 1.0x on every row.
With every run of a row the server's CPU per command is logged (tgtd's or storaged's
process, all threads, from /proc/PID/stat around the measured run): the figure that the
machine's fast and slow phases move least.

Before the rounds every LU is overwritten as the largest write row does (1 MiB writes
wrapping it four times, ``precondition``): tgtd's once, storaged's pass after pass until a
pass no longer grows the pool's files (``settle``; two or three passes), so that both
sides are measured in their steady state. tgtd overwrites its file in place, in the
page cache the prefill filled; storaged writes copy-on-write, and until its pool has grown
to the room one write row needs (the live data plus what a row overwrites before the
commit at its end frees it), every write lands on never-written extents of the pool's
sparse files: new file blocks and new page-cache pages. On this VM the first touch of
such memory costs about 5 ms of kernel time per MiB (``dd`` to a new file: 5 s of system
time per GiB, 0.25 s once the pages are reused), twenty times the rest of the write path,
so without the preconditioning the first write rows measured how fast the VM hands out
memory: plain 1 MiB writes 0.45x of tgtd while ec:4+2, which ran later on extents the
plain rows had freed, was 1.44x.

    .venv/bin/python -m benchmarks.iscsi [--rounds N] [--smoke] [--dir PATH]
        [--runtime SECONDS] [--rows SUBSTRING] [--no-precondition]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio

from benchmarks.common import (
    Pair,
    Report,
    Sample,
    add_round_args,
    check_rounds,
    cpu_meter,
    extra_rounds,
    free_port,
    run_rounds,
    serve_until_signal,
    settle,
    stderr_log,
    wait_port,
)
from iscsi.server import ISCSIConfig, ISCSIServer, SharedExclusive
from iscsi.targets import TargetCatalog
from pool import FileDevice, Pool
from storaged.tuning import tune_process
from volumes import VolumeManager

MiB = 1 << 20
SIZE = 512 * MiB
BASE = "iqn.2026-11.org.storaged"
TGT_IQN = "iqn.2026-11.org.storaged.bench:tgtd"
# (test name, block size, depth, write)
QEMU_TESTS = [("qemu-img read 1M d4", MiB, 4, False), ("qemu-img write 1M d4", MiB, 4, True),
              ("qemu-img read 4K d16", 4096, 16, False),
              ("qemu-img write 4K d16", 4096, 16, True)]


def _run(args: list[str], timeout: float) -> str:
    r = subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {(r.stderr or r.stdout)[-500:]}")
    return r.stdout


def prefill(url: str, image: Path) -> None:
    _run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url], 600)


def precondition(url: str) -> None:
    """Overwrite the LU as the largest write row does: 1 MiB writes at depth 4, around it
    four times (see the module's docstring)."""
    _run(["qemu-img", "bench", "-f", "raw", "-w", "--pattern=90", "-d", "4", "-s", str(MiB),
          "-S", str(MiB), "-c", str(SIZE // MiB * 4), url], 900)


def allocated(directory: Path) -> int:
    """Bytes of file system blocks the files under ``directory`` hold."""
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def with_cpu(iops: float, what: str, server: tuple[str, int] | None,
             sample: Callable[[float, int], float], commands: int) -> float:
    """``iops`` with the server's CPU per command over the run (``sample``: the
    ``cpu_meter`` of ``server``, its name and pid; benchmarks/common.py invariant 9), also
    logged: the figure that does not move with the machine's phases as much as the rates
    do. Without a server, ``iops``."""
    got = sample(iops, commands)
    if server is not None and isinstance(got, Sample):
        stderr_log(f"  iscsi | {what} | {server[0]}: {got.cpu * 1e6:.1f} us of server CPU "
                   "per command")
    return got


def iscsi_perf(url: str, runtime: int, server: tuple[str, int] | None = None,
               what: str = "") -> float:
    """4 KiB sequential reads at depth 32; IOPS."""
    sample = cpu_meter(server[1] if server is not None else None)
    out = _run(["iscsi-perf", "-t", str(runtime), "-b", "8", url], runtime * 3 + 60)
    found = re.findall(r"iops average (\d+) \((\d+) MB/s\)", out.replace("\r", "\n"))
    if not found:
        raise RuntimeError(f"no iscsi-perf figures in: {out[-300:]}")
    iops = float(found[-1][0])
    return with_cpu(iops, what, server, sample, int(iops * runtime))


def qemu_bench(url: str, bs: int, depth: int, write: bool, runtime: int,
               server: tuple[str, int] | None = None, what: str = "") -> float:
    """``qemu-img bench`` for about ``runtime`` seconds (a calibrating run first); IOPS.
    With ``server`` (name, pid), its CPU per command in the measured run is logged."""
    def once(count: int) -> float:
        args = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth),
                "-s", str(bs), "-S", str(bs)]
        if write:
            args += ["-w", "--pattern=165"]
        out = _run([*args, url], runtime * 10 + 120)
        m = re.search(r"Run completed in ([\d.]+) seconds", out)
        if not m:
            raise RuntimeError(f"no qemu-img bench time in: {out[-300:]}")
        return float(m.group(1))
    probe = 256 if bs == MiB else 4096
    seconds = once(probe)
    count = max(probe, int(probe * runtime / max(seconds, 1e-3)))
    count = min(count, SIZE // bs * 4)                # wraps around the LU at most 4x
    sample = cpu_meter(server[1] if server is not None else None)
    seconds = once(count)
    return with_cpu(count / seconds, what, server, sample, count)


def serve(directory: str, port: int) -> None:
    """The storaged side: six sparse files, a plain and an ec:4+2 volume, iSCSI until
    SIGTERM."""

    async def main() -> None:
        devs = [FileDevice(os.path.join(directory, f"dev{i}"), create_size=2 << 30)
                for i in range(6)]
        pool = await Pool.create("bench", devs, profile="ec:4+2", extent_size=16 * MiB,
                                 force=True)
        vm = VolumeManager(pool)
        await vm.create("plain", SIZE, profile="plain", compression=False)
        await vm.create("ec", SIZE, profile="ec:4+2", compression=False)
        server = ISCSIServer(TargetCatalog({"bench": vm}, SharedExclusive, base_iqn=BASE),
                             ISCSIConfig(host="127.0.0.1", port=port))
        try:
            await serve_until_signal(server.serve)
        finally:
            await pool.close()
    tune_process()   # as the daemon runs
    trio.run(main)


def _tgtadm(control: int, *args: str) -> None:
    _run(["tgtadm", "-C", str(control), "--lld", "iscsi", *args], 30)


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.iscsi")
    add_round_args(ap)
    ap.add_argument("--runtime", type=int, default=None, help="seconds per run (5)")
    ap.add_argument("--dir", default="/var/tmp", help="where the files go (not tmpfs)")
    ap.add_argument("--rows", default="", help="only the rows whose name holds this "
                    "(e.g. 'plain qemu-img write')")
    ap.add_argument("--no-precondition", action="store_true",
                    help="measure the fresh pool (shows what preconditioning hides)")
    ap.add_argument("--serve", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    check_rounds(ap, args.rounds)
    for tool in ("iscsi-perf", "qemu-img", "tgtd", "tgtadm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks.iscsi: {tool} is missing (run `make bench-iscsi`, "
                             f"which installs it)")
    runtime = args.runtime or (1 if args.smoke else 5)
    tests = [QEMU_TESTS[2]] if args.smoke else QEMU_TESTS
    vols = [("plain", "plain")] if args.smoke else [("plain", "plain"), ("ec", "ec:4+2")]
    work = Path(tempfile.mkdtemp(prefix="storaged-iscsi-bench-", dir=args.dir))
    report = Report("iscsi")
    procs: list[subprocess.Popen[bytes]] = []
    control = 7000 + os.getpid() % 1000
    try:
        image = work / "random.img"
        with open(image, "wb") as f:
            for _ in range(SIZE // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        floor = work / "floor.raw"            # the ceiling: the same client, no iSCSI
        shutil.copyfile(image, floor)
        # tgtd serving a raw file (LUN 0 is its controller; the disk is LUN 1).
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(SIZE)
        port = free_port()
        tgtd = subprocess.Popen(["tgtd", "-f", "-C", str(control), "--iscsi",
                                 f"portal=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(tgtd)
        wait_port(port, tgtd, "tgtd")
        _tgtadm(control, "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN)
        _tgtadm(control, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                "-b", str(raw))
        _tgtadm(control, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        tgt_url = f"iscsi://127.0.0.1:{port}/{TGT_IQN}/1"
        prefill(tgt_url, image)
        # storaged, in its own process, beside tgtd for the whole run.
        sdir = work / "storaged"
        sdir.mkdir()
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.iscsi", "--serve",
                                 str(sdir), str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_port(port, proc, "storaged")
        urls = {vol: f"iscsi://127.0.0.1:{port}/{BASE}:bench:{vol}/0" for vol, _ in vols}
        for url in urls.values():
            prefill(url, image)
        if not args.no_precondition:
            precondition(tgt_url)
            def one_pass() -> None:
                for url in urls.values():
                    precondition(url)
            settle("iscsi", lambda: allocated(sdir), one_pass)
        os.sync()

        # Each server's CPU per command is logged with every run of a row.
        servers = {tgt_url: ("tgtd", tgtd.pid)} | {
            url: ("storaged", proc.pid) for url in urls.values()}

        def perf(url: str, what: str) -> Callable[[], float]:
            return lambda: iscsi_perf(url, runtime, servers.get(url), what)

        def bench(url: str, bs: int, depth: int, write: bool,
                  what: str) -> Callable[[], float]:
            return lambda: qemu_bench(url, bs, depth, write, runtime, servers.get(url),
                                      what)

        pairs: list[Pair] = []
        for vol, label in vols:
            row = f"{label} iscsi-perf read 4K d32"
            pairs.append(Pair(row, anchor=perf(tgt_url, row), storaged=perf(urls[vol], row),
                              unit="IOPS", anchor_name="tgtd"))
            pairs += [Pair(f"{label} {test}", anchor=bench(tgt_url, bs, d, w,
                                                           f"{label} {test}"),
                           storaged=bench(urls[vol], bs, d, w, f"{label} {test}"),
                           ceiling=bench(str(floor), bs, d, w, ""), unit="IOPS",
                           anchor_name="tgtd", ceiling_name="qemu-img on a raw file")
                      for test, bs, d, w in tests]
        pairs = [p for p in pairs if args.rows in p.row]
        if not pairs:
            raise SystemExit(f"benchmarks.iscsi: no row matches --rows {args.rows!r}")
        report.add(run_rounds("iscsi", pairs, args.rounds, stderr_log,
                              extra=extra_rounds(args.smoke)))
    finally:
        subprocess.run(["tgtadm", "-C", str(control), "--op", "delete", "--mode", "system"],
                       capture_output=True, check=False, timeout=30)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)     # (tgtd may not exit on SIGTERM at all)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    report.write(args.results, f"iSCSI on loopback, about {runtime} s per run; the anchor is "
                 "tgtd serving a raw file. Target: at least 1.0x on every row.")


if __name__ == "__main__":
    main()
