"""benchmarks/radosread: in-process volume reads on a RADOS pool (record cache off, so
every read reaches the OSD), with pool/rados/prefetch.py's read-ahead off and on in
interleaved rounds of the same process, the same pool and the same OSD: 1 MiB sequential
reads at queue depth 4 and 4 KiB random reads at queue depth 16 (``Volume.read``, no
NBD). Per run: MB/s and the CPU time of this process per read (user + system, librados'
threads included), which load disturbs far less than MB/s; then per row the median of
each and the median paired ratio (on / off). Every read is compared with what was
written (outside nothing: the comparison is in the timed loop, alike for both sides).

    .venv/bin/python -m benchmarks.radosread [--rounds N] [--seconds S] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from pool import Pool
from pool import owner as owners
from pool.rados import prefetch
from pool.rados.store import RadosStore
from pool.rados.target import RadosTarget
from pool.tuning import PoolTuning
from storaged.tuning import tune_process
from tests.kit.cephkit import TEST_POOL, Cluster, why_not
from volumes import VolumeManager
from volumes.volume import Volume

MiB = 1 << 20
SIZE = 256 * MiB
ROWS = [("seq read 1M QD4", MiB, 4, True), ("rand read 4K QD16", 4096, 16, False)]


async def _run(vol: Volume, data: bytes, bs: int, depth: int, seq: bool,
               seconds: float) -> tuple[float, float]:
    """MB/s and CPU microseconds per read of one timed run."""
    done = 0
    pos = random.randrange(SIZE // MiB) * MiB
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, pos
        r = random.Random()
        while time.perf_counter() < end:
            if seq:
                off, pos = pos, (pos + bs) % SIZE
            else:
                off = r.randrange(SIZE // bs) * bs
            if await vol.read(off, bs) != data[off:off + bs]:
                raise AssertionError(f"read at {off} is wrong")
            done += 1
    t0, c0 = time.perf_counter(), os.times()
    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    took, c1 = time.perf_counter() - t0, os.times()
    cpu = c1.user - c0.user + c1.system - c0.system
    return done * bs / took / 1e6, cpu / max(1, done) * 1e6


async def main(c: Cluster, directory: Path, rounds: int, seconds: float) -> None:
    pool = await Pool.create_rados("bench", RadosTarget.parse(TEST_POOL, str(c.conf)),
                                   claim=owners.Claim(owners.me(str(directory))),
                                   extent_size=16 * MiB, tuning=PoolTuning(record_cache=0))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        vol = await VolumeManager(pool).create("v", SIZE, profile="plain",
                                               compression=False)
        data = os.urandom(SIZE)
        for off in range(0, SIZE, 4 * MiB):
            await vol.write(off, data[off:off + 4 * MiB])
        await vol.flush()
        store = pool.store
        assert isinstance(store, RadosStore)
        pf = store.conn.prefetch
        for r in range(rounds):
            for name, bs, depth, seq in ROWS:
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    pf.limit = prefetch.ENABLED if mode == "on" else 0
                    got = await _run(vol, data, bs, depth, seq, seconds)
                    results.setdefault((name, mode), []).append(got)
                    print(f"round {r + 1} {name} read-ahead {mode}: {got[0]:7.1f} MB/s "
                          f"{got[1]:6.0f} us CPU per read", flush=True)
        nursery.cancel_scope.cancel()
    await pool.close()
    print(f"\n{'row':20} {'off MB/s':>9} {'on MB/s':>8} {'ratio':>6}   "
          f"{'off CPU/read':>12} {'on CPU/read':>11} {'ratio':>6}")
    for row in ROWS:
        name = row[0]
        was, now = results[(name, "off")], results[(name, "on")]
        mb = statistics.median(b[0] / a[0] for a, b in zip(was, now, strict=True))
        cpu = statistics.median(b[1] / a[1] for a, b in zip(was, now, strict=True))
        print(f"{name:20} {statistics.median(x[0] for x in was):9.1f} "
              f"{statistics.median(x[0] for x in now):8.1f} {mb:5.2f}x   "
              f"{statistics.median(x[1] for x in was):9.0f} us "
              f"{statistics.median(x[1] for x in now):8.0f} us {cpu:5.2f}x")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="benchmarks.radosread",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--dir", default="/var/tmp", help="where the cluster goes (not tmpfs)")
    a = ap.parse_args()
    reason = why_not()
    if reason is not None:
        raise SystemExit(f"benchmarks.radosread: {reason}")
    tune_process()
    work = Path(tempfile.mkdtemp(prefix="storaged-radosread-", dir=a.dir))
    cluster = Cluster.start(work / "ceph", block_size=8 << 30)
    try:
        subprocess.run(["ceph", "-c", str(cluster.conf), "osd", "pool", "set-quota",
                        TEST_POOL, "max_bytes", str(8 << 30)], check=True,
                       capture_output=True, timeout=120)
        print(f"load average at the start: {os.getloadavg()}")
        trio.run(main, cluster, work, a.rounds, a.seconds)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
