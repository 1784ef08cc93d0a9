"""benchmarks/rebuild: how fast a replaced device of an ec:4+2 pool is rebuilt, against the
raw sequential read rate of the surviving device files measured in the same run, and what
a rebuild costs foreground I/O (fio random 4 KiB reads over NBD, with and without one).

Steps: a pool of 6 sparse files (ec:4+2, 16 MiB extents) gets a volume full of random data
(default 512 MiB, compression off), flushed. Then:
1. raw: the page cache is dropped (root only; else the rows say "cached") and the data
   areas of the 5 survivors are read sequentially, 4 MiB at a time, one file after another;
2. idle rebuild: member 0 is replaced by a new file and rebuilt (caches dropped first);
   the rate is the survivors' bytes read per second (k fragments per one rebuilt), and
   the rebuilt member's bytes per second beside it;
3. fio --ioengine=nbd random 4 KiB reads (iodepth 16) on the volume for --runtime seconds
   (after an untimed run that warms the caches, so that both runs find them alike)
   without a rebuild, then with member 1 replaced and rebuilding meanwhile.
Targets (issue 9): idle rebuild >= 0.5x the raw read rate; foreground IOPS during a
rebuild >= 0.7x the undisturbed figure.

    .venv/bin/python -m benchmarks.rebuild [--size MiB] [--runtime S] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import trio

from benchmarks.engine import choose_dir, drop_caches, fs_type
from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer
from pool import FileDevice, Pool, rebuild
from storaged.tuning import tune_process
from volumes import VolumeManager

MiB = 1 << 20
EXT = 16 * MiB
K = 4


def _raw_read(paths: list[str], start: int, nbytes: int) -> float:
    """Seconds to read ``nbytes`` from ``start`` of each file, one after another."""
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            pos, end = start, start + nbytes
            while pos < end:
                got = os.pread(fd, min(4 * MiB, end - pos), pos)
                if not got:
                    break
                pos += len(got)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


async def _fio(uri: str, runtime: int) -> float:
    proc = await trio.run_process(
        ["fio", "--name=rr", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
         "--iodepth=16", f"--runtime={runtime}", "--time_based", "--output-format=json"],
        capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {proc.stderr.decode()[-500:]}")
    text = proc.stdout.decode()
    return float(json.loads(text[text.index("{"):])["jobs"][0]["read"]["iops"])


async def bench(d: str, size: int, runtime: int) -> dict[str, float | bool]:
    per_dev = size * 3 // 2 // 6 + 8 * EXT
    paths = [os.path.join(d, f"dev{i}") for i in range(6)]
    pool = await Pool.create("bench", [FileDevice(p, create_size=per_dev + 64 * MiB)
                                       for p in paths], profile="ec:4+2", extent_size=EXT,
                             force=True)
    out: dict[str, float | bool] = {}
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("vm", size, compression=False)
        piece = os.urandom(MiB)
        for i in range(size // MiB):
            await vol.write(i * MiB, piece[i % 4096:] + piece[:i % 4096])
        await vol.flush()
        used = max(m.extents - m.free_extents for m in pool.statistics().members) * EXT

        out["cold"] = await trio.to_thread.run_sync(drop_caches)
        secs = await trio.to_thread.run_sync(_raw_read, paths[1:], pool.layout.data_offset,
                                             used)
        out["raw_read"] = 5 * used / secs

        await pool.replace_device(0, FileDevice(os.path.join(d, "new0"),
                                                create_size=per_dev + 64 * MiB))
        await trio.to_thread.run_sync(drop_caches)
        t0 = time.perf_counter()
        written = await rebuild.run(pool)
        secs = time.perf_counter() - t0
        out["rebuilt"] = written / secs
        out["rebuild_read"] = K * written / secs
        out["rebuilt_bytes"] = written

        server = NBDServer(VolumeCatalog({"bench": vm}), NBDConfig(host="127.0.0.1", port=0))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve)
            port = listeners[0].socket.getsockname()[1]
            uri = f"nbd://127.0.0.1:{port}/bench/vm"
            # A first, untimed run fills the pool's record cache (the whole volume fits):
            # without it the run "no rebuild" found it cold and the run "rebuilding" warm,
            # which flattered the rebuild (it showed more IOPS than without one).
            await _fio(uri, runtime)
            out["iops_idle"] = await _fio(uri, runtime)
            await pool.replace_device(1, FileDevice(os.path.join(d, "new1"),
                                                    create_size=per_dev + 64 * MiB))
            done = trio.Event()

            async def rebuild_meanwhile() -> None:
                try:
                    await rebuild.run(pool)
                finally:
                    done.set()
            nursery.start_soon(rebuild_meanwhile)
            t0 = time.perf_counter()
            out["iops_rebuild"] = await _fio(uri, runtime)
            out["rebuild_finished_during_fio"] = done.is_set()
            await done.wait()
            out["second_rebuild_s"] = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        data = await vol.read(0, MiB)
        if data != piece:
            raise AssertionError("the volume reads back wrong after the rebuilds")
    finally:
        await pool.close()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.rebuild")
    ap.add_argument("--size", type=int, default=512, help="MiB of data (default 512)")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio run (default 8)")
    ap.add_argument("--dir", default=None, help="where the files go (default /var/tmp)")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        raise SystemExit("benchmarks.rebuild: fio is missing (make test installs it)")
    d = tempfile.mkdtemp(prefix="storaged-bench-rebuild-", dir=choose_dir(args.dir))
    print(f"benchmarks.rebuild: ec:4+2 on 6 files, {args.size} MiB of data; files in {d} "
          f"({fs_type(d)}); {os.cpu_count()} cores", flush=True)
    try:
        tune_process()   # as the daemon runs
        r = trio.run(bench, d, args.size * MiB, args.runtime)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    cache = "from the device" if r["cold"] else "cached (not root: page cache not dropped)"
    raw, rd = float(r["raw_read"]), float(r["rebuild_read"])
    idle, busy = float(r["iops_idle"]), float(r["iops_rebuild"])
    print(f"raw sequential read of the 5 survivors   {raw / 1e6:8.0f} MB/s  ({cache})")
    print(f"rebuild, idle: survivors read at         {rd / 1e6:8.0f} MB/s  {rd / raw:.2f}x raw "
          f"{'PASS' if rd >= 0.5 * raw else 'MISS'} >=0.5x")
    print(f"               new member written at     {float(r['rebuilt']) / 1e6:8.0f} MB/s  "
          f"({float(r['rebuilt_bytes']) / MiB:.0f} MiB)")
    print(f"fio randread 4K over NBD, no rebuild     {idle:8.0f} IOPS")
    print(f"fio randread 4K over NBD, rebuilding     {busy:8.0f} IOPS  {busy / idle:.2f}x "
          f"{'PASS' if busy >= 0.7 * idle else 'MISS'} >=0.7x"
          + ("" if r["rebuild_finished_during_fio"] else " (the rebuild ran the whole time)"))
    print(f"(the second rebuild took {float(r['second_rebuild_s']):.1f} s with fio running)")


if __name__ == "__main__":
    main()
