"""benchmarks/engine: the storage engine straight on its Volume API, beside the raw limits
of this machine measured in the same run.

Rows:
- raw file: os.pwrite/os.pread of the same bytes on the same filesystem (sequential 1 MiB
  with an fdatasync at the end of writes; random 4 KiB), one file and, for erasure coding,
  1.5x the bytes spread over 6 files (what ec:4+2 must physically write);
- zfec encode of 64 KiB blocks (4 data chunks -> 2 parity, one thread) and lz4 compress;
- storaged plain / ec:4+2 volumes (compression off, incompressible data) and a plain lz4
  volume with compressible data: sequential 1 MiB writes (4 in flight) + flush, sequential
  1 MiB reads (4 in flight), random 4 KiB writes (16 in flight) + flush, random 4 KiB reads.

Writes are timed up to the end of the flush that makes them durable. Reads of both the raw
files and the volumes come from the page cache (the data was just written): that is the
fair comparison of software overhead. Targets (issue): plain sequential read and write at
least 50% of the raw file rate; ec:4+2 sequential write at least 70% of zfec's encode rate.

    .venv/bin/python -m benchmarks.engine [--size MiB] [--ops N] [--dir PATH] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import lz4.block
import trio
import zfec

from pool import FileDevice, Pool
from volumes import Volume, VolumeManager

MiB = 1 << 20


@dataclass
class Row:
    name: str
    test: str
    seconds: float
    nbytes: int
    ops: int

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def iops(self) -> float:
        return self.ops / self.seconds


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def raw_rows(d: str, size: int, ops: int) -> list[Row]:
    rows = []
    buf = os.urandom(MiB)
    path = os.path.join(d, "raw")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        def seq_write() -> None:
            for i in range(size // MiB):
                os.pwrite(fd, buf, i * MiB)
            os.fdatasync(fd)
        rows.append(Row("raw file", "seq write 1M", _timed(seq_write), size, size // MiB))

        def seq_read() -> None:
            for i in range(size // MiB):
                os.pread(fd, MiB, i * MiB)
        rows.append(Row("raw file", "seq read 1M", _timed(seq_read), size, size // MiB))
        rng = random.Random(1)
        offs = [rng.randrange(size // 4096) * 4096 for _ in range(ops)]
        small = buf[:4096]

        def rand_write() -> None:
            for o in offs:
                os.pwrite(fd, small, o)
            os.fdatasync(fd)
        rows.append(Row("raw file", "rand write 4K", _timed(rand_write), ops * 4096, ops))

        def rand_read() -> None:
            for o in offs:
                os.pread(fd, 4096, o)
        rows.append(Row("raw file", "rand read 4K", _timed(rand_read), ops * 4096, ops))
    finally:
        os.close(fd)
        os.unlink(path)
    # What ec:4+2 has to write: 1.5x the bytes over 6 files.
    fds = [os.open(os.path.join(d, f"raw6-{i}"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
           for i in range(6)]
    try:
        quarter = buf[:MiB // 4]

        def six() -> None:
            for i in range(size // MiB):
                for f in fds:
                    os.pwrite(f, quarter, i * MiB // 4)
            for f in fds:
                os.fdatasync(f)
        rows.append(Row("raw 6 files x1.5", "seq write 1M", _timed(six), size, size // MiB))
    finally:
        for i, f in enumerate(fds):
            os.close(f)
            os.unlink(os.path.join(d, f"raw6-{i}"))
    enc = zfec.Encoder(4, 6)
    blocks = tuple(os.urandom(16384) for _ in range(4))
    n = size // 65536

    def encode() -> None:
        for _ in range(n):
            enc.encode(blocks, (4, 5))
    rows.append(Row("zfec 4+2 encode", "64K blocks", _timed(encode), n * 65536, n))
    block = os.urandom(65536)

    def compress() -> None:
        for _ in range(n):
            lz4.block.compress(block, store_size=False)
    rows.append(Row("lz4 compress", "64K random", _timed(compress), n * 65536, n))
    return rows


async def _parallel(jobs: list[Callable[[], Awaitable[None]]], depth: int) -> None:
    slots = trio.Semaphore(depth)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        finally:
            slots.release()
    async with trio.open_nursery() as nursery:
        for job in jobs:
            await slots.acquire()
            nursery.start_soon(run, job)


async def volume_rows(name: str, vol: Volume, size: int, ops: int,
                      data: bytes) -> list[Row]:
    rows = []

    def writer(i: int) -> Callable[[], Awaitable[None]]:
        return lambda: vol.write(i * MiB, data)

    def reader(i: int) -> Callable[[], Awaitable[None]]:
        async def r() -> None:
            await vol.read(i * MiB, MiB)
        return r
    t = time.perf_counter()
    await _parallel([writer(i) for i in range(size // MiB)], 4)
    await vol.flush()
    rows.append(Row(name, "seq write 1M", time.perf_counter() - t, size, size // MiB))
    t = time.perf_counter()
    await _parallel([reader(i) for i in range(size // MiB)], 4)
    rows.append(Row(name, "seq read 1M", time.perf_counter() - t, size, size // MiB))
    rng = random.Random(2)
    offs = [rng.randrange(size // 4096) * 4096 for _ in range(ops)]
    small = data[:4096]

    def w4(o: int) -> Callable[[], Awaitable[None]]:
        return lambda: vol.write(o, small)

    def r4(o: int) -> Callable[[], Awaitable[None]]:
        async def r() -> None:
            await vol.read(o, 4096)
        return r
    t = time.perf_counter()
    await _parallel([w4(o) for o in offs], 16)
    await vol.flush()
    rows.append(Row(name, "rand write 4K", time.perf_counter() - t, ops * 4096, ops))
    t = time.perf_counter()
    await _parallel([r4(o) for o in offs], 16)
    rows.append(Row(name, "rand read 4K", time.perf_counter() - t, ops * 4096, ops))
    return rows


async def engine_rows(d: str, size: int, ops: int) -> list[Row]:
    devs = [FileDevice(os.path.join(d, f"dev{i}"), create_size=4 * size + (256 * MiB))
            for i in range(6)]
    pool = await Pool.create("bench", devs, profile="ec:4+2", extent_size=16 * MiB,
                             force=True)
    vm = VolumeManager(pool)
    rows: list[Row] = []
    noise = os.urandom(MiB)
    text = (b"storaged benchmark: compressible text, like logs and zeros in images. "
            * (MiB // 60))[:MiB]
    try:
        for name, profile, comp, data in (("storaged plain", "plain", False, noise),
                                          ("storaged ec:4+2", "ec:4+2", False, noise),
                                          ("storaged plain lz4", "plain", True, text)):
            vol = await vm.create(name.split()[-1].replace(":", "").replace("+", ""),
                                  2 * size, profile=profile, compression=comp)
            # Start each volume with no dirty page cache left by the previous one (the
            # kernel flushing it would slow the next writes down).
            await trio.to_thread.run_sync(os.sync)
            rows += await volume_rows(name, vol, size, ops, data)
    finally:
        await pool.close()
    return rows


def report(rows: list[Row]) -> str:
    by = {(r.name, r.test): r for r in rows}

    def ratio(r: Row) -> tuple[str, str]:
        base: Row | None = None
        if r.name.startswith("storaged"):
            if r.name == "storaged ec:4+2" and r.test == "seq write 1M":
                base = by[("zfec 4+2 encode", "64K blocks")]
            else:
                base = by.get(("raw file", r.test))
        if base is None:
            return "", ""
        q = r.mbps / base.mbps
        mark = ""
        if r.name == "storaged plain" and r.test in ("seq write 1M", "seq read 1M"):
            mark = "PASS" if q >= 0.5 else "MISS"
        if r.name == "storaged ec:4+2" and r.test == "seq write 1M":
            mark = "PASS" if q >= 0.7 else "MISS"
        return f"{q:.2f}x {'zfec' if base.name.startswith('zfec') else 'raw'}", mark
    lines = [f"{'target':<20} {'test':<14} {'MB/s':>9} {'IOPS':>9}  {'ratio':<11} target"]
    for r in rows:
        q, mark = ratio(r)
        lines.append(f"{r.name:<20} {r.test:<14} {r.mbps:>9.0f} {r.iops:>9.0f}  {q:<11} {mark}")
    ec = by.get(("storaged ec:4+2", "seq write 1M"))
    six = by.get(("raw 6 files x1.5", "seq write 1M"))
    if ec and six:
        lines.append(f"(ec:4+2 seq write is {ec.mbps / six.mbps:.2f}x of the raw rate of "
                     f"writing the same 1.5x bytes over 6 files)")
    lines.append("Reads come from the page cache for raw files and volumes alike.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.engine")
    ap.add_argument("--size", type=int, default=256, help="MiB per sequential test")
    ap.add_argument("--ops", type=int, default=20000, help="random 4K operations")
    ap.add_argument("--dir", default=None, help="where to put device files (not tmpfs)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    size, ops = (64 * MiB, 4000) if args.quick else (args.size * MiB, args.ops)
    d = tempfile.mkdtemp(prefix="storaged-bench-", dir=args.dir or "/var/tmp")
    try:
        rows = raw_rows(d, size, ops)
        os.sync()
        rows += trio.run(engine_rows, d, size, ops)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(report(rows))


if __name__ == "__main__":
    main()
