"""benchmarks/snapshots: 1,000 snapshots of one volume; creation time and memory must stay
flat (invariant 7: a snapshot costs metadata in proportion to what later changes).

Between snapshots a few blocks of the volume are rewritten (so each snapshot really
diverges). Printed per 100 snapshots: the mean creation time (including its commit), the
process's resident memory, the number of map nodes in the pool, and the time to list
them all.

    .venv/bin/python -m benchmarks.snapshots [--count N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import trio

from pool import FileDevice, Pool
from storaged.tuning import tune_process
from volumes import VolumeManager

MiB = 1 << 20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


async def run(directory: str, count: int) -> None:
    devs = [FileDevice(os.path.join(directory, f"d{i}"), create_size=2 << 30)
            for i in range(3)]
    pool = await Pool.create("snap", devs, profile="ec:2+1", extent_size=16 * MiB, force=True)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 64 << 30, block_size=65536)       # 1M-block map
    for i in range(0, 64 << 30, 1 << 30):                        # data spread out
        await vol.write(i, os.urandom(256 << 10))
    await vol.flush()
    print(f"{'snapshots':>9} {'create ms':>10} {'RSS MiB':>8} {'map nodes':>10} "
          f"{'list ms':>8}")
    batch_start = time.perf_counter()
    for n in range(1, count + 1):
        await vol.write((n * 7919 % 1024) * 65536, os.urandom(65536))
        t = time.perf_counter()
        await vm.snapshot("v", f"s{n}")
        if n == 1:
            batch_start = t
        if n % 100 == 0:
            per = (time.perf_counter() - batch_start) / 100 * 1000
            t0 = time.perf_counter()
            names = vm.snapshot_names("v")
            listed = (time.perf_counter() - t0) * 1000
            assert len(names) == n
            print(f"{n:>9} {per:>10.2f} {rss_mib():>8.1f} "
                  f"{len(pool.state.forest.nodes):>10} {listed:>8.2f}", flush=True)
            batch_start = time.perf_counter()
    await pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.snapshots")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="storaged-snap-bench-", dir=args.dir)
    try:
        tune_process()   # as the daemon runs
        trio.run(run, d, args.count)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
