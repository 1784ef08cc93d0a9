"""benchmarks/send: send and receive rates of a volume beside qemu-img convert of the same
data, in the same run, and the stream's size against the data written.

The volume (default 1 GiB) is half random bytes, half zeros written as data (not holes),
in 1 MiB pieces alternating, snapshotted, then:
- ``send``: the snapshot's full stream written to a file as ``storagectl volume send -o``
  writes it (``FileSink``: fdatasync at the end, written behind meanwhile);
- ``receive``: that file received into a second pool (flushed: the receive commits);
- ``qemu-img convert raw->qcow2`` and ``qcow2->raw`` of a raw file with the same bytes
  (the same page cache conditions: the source was just written), each to a new file
  with fdatasync (qemu-img's default cache mode writes back before it exits).
Sizes: the stream, and lz4 (block mode, 1 MiB chunks) of the bytes written; the issue's
target is stream <= lz4 of the written data + 1%, and send and receive at least as fast as
qemu-img convert.

Each round times the four one after the other, each after a sync and a second of quiet;
round 0 runs them in that order, later rounds rotated (no row always follows the same
one: the disk of a VM keeps writing after a sync returns); rows report the median.

    .venv/bin/python -m benchmarks.send [--size MiB] [--runs N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import lz4.block
import trio

from benchmarks.engine import choose_dir, fs_type
from pool import FileDevice, Pool
from storaged.portable_cli import FileSink
from volumes import VolumeManager, portable

MiB = 1 << 20
GiB = 1 << 30
SETTLE = 1.0        # seconds of quiet before each timed step


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


async def _rounds(d: str, size: int, pieces: list[bytes],
                  runs: int) -> dict[str, list[float]]:
    """``runs`` rounds, each timing a send, a receive and both qemu-img converts."""
    raw = os.path.join(d, "src.raw")
    await trio.to_thread.run_sync(_write_raw, raw, pieces)
    src = await Pool.create("src", [FileDevice(os.path.join(d, "src0"),
                                               create_size=2 * size + GiB)],
                            extent_size=16 * MiB, force=True)
    dst = await Pool.create("dst", [FileDevice(os.path.join(d, "dst0"),
                                               create_size=(runs + 1) * size + GiB)],
                            extent_size=16 * MiB, force=True)
    out: dict[str, list[float]] = {"send": [], "receive": [], "stream": [],
                                   "raw->qcow2": [], "qcow2->raw": []}
    try:
        vs, vd = VolumeManager(src), VolumeManager(dst)
        vol = await vs.create("vm", size, compression=True)
        for i, piece in enumerate(pieces):
            await vol.write(i * MiB, piece)
        await vol.flush()
        await vs.snapshot("vm", "s1")
        path = os.path.join(d, "vm.stream")

        async def send() -> None:
            t0 = time.perf_counter()
            _h, chunks = await portable.send(vs, "vm", "s1")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                # As `storagectl volume send -o FILE` writes it: durable at the end.
                sink = FileSink(fd)
                async with chunks as it:
                    async for c in it:
                        await trio.to_thread.run_sync(sink.write, c)
                await trio.to_thread.run_sync(sink.sync)
            finally:
                os.close(fd)
            out["send"].append(time.perf_counter() - t0)
            out["stream"].append((await trio.Path(path).stat()).st_size)

        async def receive() -> None:
            name = f"vm{len(out['receive'])}"
            t0 = time.perf_counter()
            rx = portable.Receiver(vd, name)
            async with await trio.open_file(path, "rb") as f:
                async def source() -> AsyncIterator[bytes]:
                    while data := await f.read(4 * MiB):
                        yield data
                await rx.run(source())
            out["receive"].append(time.perf_counter() - t0)
            if rx.done is None:
                raise AssertionError("the receive did not finish")
            for i in (0, 1, len(pieces) - 1):
                if await vd.get(name).read(i * MiB, MiB) != pieces[i]:
                    raise AssertionError(f"received volume differs at MiB {i}")

        def convert(key: str, args: list[str], name: str) -> Callable[[], Awaitable[None]]:
            async def step() -> None:
                target = trio.Path(d, name)
                await target.unlink(missing_ok=True)
                t0 = time.perf_counter()
                await trio.run_process(["qemu-img", "convert", *args, str(target)])
                await trio.to_thread.run_sync(os.sync)
                out[key].append(time.perf_counter() - t0)
            return step

        steps = [send, receive,
                 convert("raw->qcow2", ["-f", "raw", "-O", "qcow2", raw], "out.qcow2"),
                 convert("qcow2->raw", ["-f", "qcow2", "-O", "raw",
                                        os.path.join(d, "out.qcow2")], "out.raw")]
        for run in range(runs):
            # Round 0 in dependency order (the stream, then the qcow2 file exist after);
            # later rounds rotated, so that no row always follows the same one.
            for step in steps[run % 4:] + steps[:run % 4]:
                # Each step starts from the same quiet storage: all written back, and a
                # moment for the disk (a VM's disk keeps writing after a sync returns).
                await trio.to_thread.run_sync(os.sync)
                await trio.sleep(SETTLE)
                await step()
    finally:
        await src.close()
        await dst.close()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.send")
    ap.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    ap.add_argument("--dir", default=None, help="where to put the files (default /var/tmp)")
    ap.add_argument("--runs", type=int, default=4,
                    help="rounds of the four rows; medians are reported (default 4)")
    args = ap.parse_args(argv)
    size = args.size * MiB
    d = tempfile.mkdtemp(prefix="storaged-bench-send-", dir=choose_dir(args.dir))
    print(f"benchmarks.send: {args.size} MiB volume, half random, half zeros; files in {d} "
          f"({fs_type(d)}); {os.cpu_count()} cores", flush=True)
    try:
        pieces = _data(size)
        lz4_size = sum(len(lz4.block.compress(p, store_size=False)) for p in pieces)
        eng = q = trio.run(_rounds, d, size, pieces, args.runs)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    mb = size / 1e6
    rows = {"storaged send": eng["send"], "storaged receive": eng["receive"],
            "qemu-img convert raw->qcow2": q["raw->qcow2"],
            "qemu-img convert qcow2->raw": q["qcow2->raw"]}
    best = min(statistics.median(v) for v in rows.values() if v is not eng["send"]
               and v is not eng["receive"])
    print(f"{'':<28} {'seconds':>8} {'MB/s':>8} {'vs qemu-img':>12}   runs (s)")
    for name, times in rows.items():
        secs = statistics.median(times)
        ratio = best / secs
        spread = " ".join(f"{t:.2f}" for t in times)
        print(f"{name:<28} {secs:>8.2f} {mb / secs:>8.0f} {ratio:>11.2f}x   {spread}")
    stream = int(eng["stream"][0])
    print(f"stream {stream / MiB:.1f} MiB; lz4 of the written data {lz4_size / MiB:.1f} MiB; "
          f"stream / lz4 = {stream / lz4_size:.4f} (target <= 1.01)")
    print(f"seconds are the median of {args.runs} runs; ratios are the faster qemu-img "
          f"convert's time over each row's (>= 1: as fast).")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
