"""benchmarks/rados: storaged's segment objects on RADOS (pool/rados/segments.py) beside raw
librados and ``rados bench``, on a throwaway one-node cluster (tests/kit/cephkit.py: one
bluestore OSD on a sparse file), in the same run:

- ``rados bench write -b 4M -t N`` (Ceph's own tool, C++): 4 MiB object writes, N in
  flight, for SECONDS seconds: MB/s and mean latency;
- ``RadosSegments.write_whole`` of 4 MiB columns, N in flight (trio tasks, each write in a
  worker thread): MB/s and mean latency;
- 4 KiB ranged reads at random 4K-aligned offsets of those objects, one at a time:
  raw ``Ioctx.read`` in one thread (no trio, no thread hop) against ``RadosSegments.read``
  (through ``Connection.run``): p50/p99 latency; and 16 in flight through
  ``RadosSegments.read``: IOPS;
- a 4 MiB segment filled by runs of 64 KiB and 256 KiB at QD1, through
  ``RadosSegments.write_at`` (what RadosStore does) against ``.append``, alternating, a
  few rounds each: median MB/s (the choice of pool/rados/store.py's ``write``).

Objects written are read back and compared (outside the timed regions).

    python -m benchmarks.rados [--seconds S] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from pool.rados.conn import Connection
from pool.rados.segments import RadosSegments
from tests.kit.cephkit import TEST_POOL, Cluster, why_not

OBJ = 4 << 20
READ = 4096
RING = 256          # segment objects the write rows cycle through (1 GiB): new ones at
                    # ~1 GB/s for 2 x 10 s would fill the OSD (and block every write)


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def rados_bench(c: Cluster, seconds: int, threads: int) -> tuple[float, float]:
    run = subprocess.run(["rados", "-c", str(c.conf), "-p", TEST_POOL, "bench",
                          str(seconds), "write", "-b", str(OBJ), "-t", str(threads),
                          "--run-name", f"bench{threads}"],
                         check=False, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"benchmarks.rados: rados bench failed ({run.returncode}): "
                         f"{(run.stderr or run.stdout).strip()[-500:]}")
    out = run.stdout
    mbps = float(re.search(r"Bandwidth \(MB/sec\):\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = float(re.search(r"Average Latency\(s\):\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return mbps * 1.048576, lat * 1000      # rados bench's MB is MiB: report MB (10^6)


async def seg_writes(segs: RadosSegments, seconds: float, threads: int, first: int,
                     data: bytes) -> tuple[float, float, int]:
    lats: list[float] = []
    n = first
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal n
        while time.perf_counter() < end:
            seg = n % RING      # write_full replaces the object: the space stays bounded
            n += 1
            t0 = time.perf_counter()
            await segs.write_whole(seg, 0, data)
            lats.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(threads):
            nursery.start_soon(worker)
    took = time.perf_counter() - t0
    return len(lats) * OBJ / took / 1e6, statistics.mean(lats) * 1000, min(n, RING)


async def run_writes(segs: RadosSegments, first: int, run: int, rounds: int = 4
                     ) -> tuple[float, float, int]:
    """Median MB/s of filling an object with ``run``-byte writes at QD1, by write_at and
    by append (alternating which goes first); each object is read back and deleted."""
    data = os.urandom(run)
    rates: dict[str, list[float]] = {"write_at": [], "append": []}
    seg = first
    for r in range(rounds):
        for how in ("write_at", "append") if r % 2 == 0 else ("append", "write_at"):
            t0 = time.perf_counter()
            for i in range(OBJ // run):
                if how == "append":
                    await segs.append(seg, 0, data)
                else:
                    await segs.write_at(seg, 0, i * run, data)
            rates[how].append(OBJ / (time.perf_counter() - t0) / 1e6)
            assert await segs.read(seg, 0, 0, OBJ) == data * (OBJ // run), how
            await segs.delete(seg)
            seg += 1
    return statistics.median(rates["write_at"]), statistics.median(rates["append"]), seg


async def main(seconds: int, directory: Path) -> None:
    reason = why_not()
    if reason is not None:
        raise SystemExit(reason)
    c = Cluster.start(directory / "ceph", block_size=16 << 30)   # rados bench writes ~8 GB
    try:
        conn = await Connection.open(TEST_POOL, conf=str(c.conf))
        segs = RadosSegments(conn, "bench")
        data = os.urandom(OBJ)
        rows: list[tuple[str, str, str]] = []
        nxt = 0
        for threads in (1, 8):
            mb, lat = await trio.to_thread.run_sync(rados_bench, c, seconds, threads)
            rows.append((f"rados bench write 4M -t {threads}", f"{mb:7.1f} MB/s",
                         f"mean {lat:6.1f} ms"))
            mb, lat, nxt = await seg_writes(segs, seconds, threads, nxt, data)
            rows.append((f"RadosSegments.write_whole 4M x{threads}", f"{mb:7.1f} MB/s",
                         f"mean {lat:6.1f} ms"))
        for seg in random.Random(1).sample(range(nxt), min(nxt, 3)):
            assert await segs.read(seg, 0, 0, OBJ) == data, f"segment {seg} reads back wrong"
        rnd = random.Random(7)
        targets = [(rnd.randrange(nxt), rnd.randrange(OBJ // READ) * READ)
                   for _ in range(2000)]

        def raw_reads() -> list[float]:
            lats = []
            for seg, off in targets[:1000]:
                t0 = time.perf_counter()
                got = conn.ioctx.read(segs.oid(seg, 0), READ, off)
                lats.append(time.perf_counter() - t0)
                assert len(got) == READ
            return lats
        raw = await trio.to_thread.run_sync(raw_reads)
        ours = []
        for seg, off in targets[1000:]:
            t0 = time.perf_counter()
            got = await segs.read(seg, 0, off, READ)
            ours.append(time.perf_counter() - t0)
            assert got == data[off:off + READ]
        for name, lats in (("raw Ioctx.read 4K QD1", raw), ("RadosSegments.read 4K QD1", ours)):
            rows.append((name, f"{len(lats) / sum(lats):7.0f} IOPS",
                         f"p50 {_pct(lats, 0.5) * 1e3:5.2f} ms  p99 "
                         f"{_pct(lats, 0.99) * 1e3:5.2f} ms"))
        done = 0
        t_end = time.perf_counter() + seconds

        async def reader() -> None:
            nonlocal done
            r = random.Random()
            while time.perf_counter() < t_end:
                seg, off = targets[r.randrange(len(targets))]
                await segs.read(seg, 0, off, READ)
                done += 1
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(reader)
        rows.append(("RadosSegments.read 4K QD16",
                     f"{done / (time.perf_counter() - t0):7.0f} IOPS", ""))
        for run in (64 << 10, 256 << 10):
            at, app, nxt = await run_writes(segs, nxt, run)
            rows.append((f"fill 4M by {run >> 10}K write_at QD1", f"{at:7.1f} MB/s", ""))
            rows.append((f"fill 4M by {run >> 10}K append QD1", f"{app:7.1f} MB/s", ""))
        await conn.close()
    finally:
        c.stop()
    print(f"{'what':36} {'rate':>14}  latency")
    for name, rate, latency in rows:
        print(f"{name:36} {rate:>14}  {latency}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        trio.run(main, a.seconds, Path(d))
