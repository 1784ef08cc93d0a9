"""benchmarks/rbd: fio over NBD against a storaged volume on a RADOS pool, beside fio's rbd
engine against an RBD image in the same throwaway Ceph cluster (tests/kit/cephkit.py: one
bluestore OSD on a sparse file), in interleaved rounds (benchmarks/common.py): the same
OSD, the same run, the order alternating.

Rows (issue 24): 1 MiB sequential write and read at queue depth 4, 4 KiB random write and
read at queue depth 16, on a 1 GiB volume / image, each filled first (so no side answers
reads from holes or allocates on the first write). storaged serves in its own process
(``--serve``): a pool on the RADOS pool, one plain volume without compression, NBD on
loopback; the pool's lock renewal and store task run as in the daemon. The RBD image has
the layering feature only (no object map: nothing here needs it). Targets: at least 0.7x
RBD on every row and above 1.0x on 4K random writes.

The read rows have a ceiling measured in the same rounds: fio over the same NBD path
against a storaged volume on a pool of one local, page-cached file
(``benchmarks.radoscpu --serve-local``): what storaged over NBD reaches when the OSD and
librados cost nothing. On this 2-core machine the OSD, librados, fio and storaged share
the cores, so that leg's CPU bounds the RADOS side (benchmarks.radoscpu gives the CPU
per GiB of each process). Three more rows place the seq read row's gap: the same server
on its Unix socket (a hypervisor on the node), python-rados alone (the binding), and
storaged's read path alone (``--path-serve``: in-process reads as the NBD server makes
them, on a pool of its own, nothing sent on).

    .venv/bin/python -m benchmarks.rbd [--rounds N] [--smoke] [--runtime SECONDS]
        [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import (
    Pair,
    Report,
    add_round_args,
    check_rounds,
    extra_rounds,
    fio_side,
    free_port,
    run_rounds,
    serve_until_signal,
    stderr_log,
    wait_port,
)
from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer
from pool import Pool
from pool import owner as owners
from pool.rados import prefetch
from pool.rados.binding import load
from pool.rados.target import RadosTarget
from pool.tuning import PoolTuning
from storaged.startup import bind_unix
from storaged.tuning import tune_process
from tests.kit.cephkit import TEST_POOL, Cluster, why_not
from volumes import VolumeManager

MiB = 1 << 20
SIZE = 1 << 30
RBD_POOL = "rbdbench"
IMAGE = "bench"
QUOTA = 8 << 30           # the storaged pool's capacity (no mgr: the quota states it)
TESTS = [("seq write 1M", "write", "1m", 4), ("seq read 1M", "read", "1m", 4),
         ("rand write 4K", "randwrite", "4k", 16), ("rand read 4K", "randread", "4k", 16)]


def _fio(target: list[str], env: dict[str, str] | None, rw: str, bs: str, depth: int,
         runtime: int, size: str) -> float:
    """One fio run on ``target`` (engine arguments); MB/s."""
    side = fio_side(target, rw, bs, depth, size, runtime, " ".join(target), env=env)
    return float(side["bw_bytes"]) / 1e6


def _prefill(target: list[str], env: dict[str, str] | None) -> None:
    subprocess.run(["fio", "--name=prefill", *target, "--rw=write", "--bs=1m",
                    "--iodepth=4", "--size=1g", "--refill_buffers", "--end_fsync=1"],
                   capture_output=True, check=True, env=env, timeout=900)


async def serve_plain(pool: Pool, port: int, unix: str | None = None) -> None:
    """One plain volume of SIZE on ``pool``, over NBD on ``port`` (and on the Unix socket
    ``unix``, as ``nbd.socket`` serves) until SIGTERM; then the pool is closed."""
    try:
        vm = VolumeManager(pool)
        await vm.create("plain", SIZE, profile="plain", compression=False)
        server = NBDServer(VolumeCatalog({"bench": vm}), NBDConfig(port=port))
        tasks: list[Callable[..., Awaitable[object]]] = [pool.run, server.serve]
        if unix is not None:
            listener, _st = await bind_unix("nbd.socket", unix)
            tasks.append(partial(server.serve_listeners, [listener]))
        await serve_until_signal(*tasks)
    finally:
        await pool.close()


def serve(conf: str, directory: str, port: int, record_cache: int | None,
          readahead: int | None = None, name: str = "bench") -> None:
    """The storaged side: a pool on RADOS pool TEST_POOL, one volume, NBD until SIGTERM.
    ``record_cache``: the pool's record cache in bytes (None: the daemon's default);
    ``readahead``: pool/rados/prefetch.py's LIMIT (None: its default, off); ``name``:
    the storaged pool's (two servers may share the RADOS pool: benchmarks.radoscpu)."""
    if readahead is not None:
        prefetch.LIMIT = readahead

    async def main() -> None:
        claim = owners.Claim(owners.me(directory))
        tuning = PoolTuning() if record_cache is None else PoolTuning(
            record_cache=record_cache)
        pool = await Pool.create_rados(name, RadosTarget.parse(TEST_POOL, conf),
                                       claim=claim, extent_size=16 * MiB, tuning=tuning)
        await serve_plain(pool, port, os.path.join(directory, "nbd.sock"))
    tune_process()   # as the daemon runs
    trio.run(main)


def rbd_image(cluster: Cluster) -> list[str]:
    """Make the RBD side in ``cluster`` (TEST_POOL's quota, pool RBD_POOL with image IMAGE
    of SIZE) and return fio's arguments for it."""
    _ceph(cluster, "osd", "pool", "set-quota", TEST_POOL, "max_bytes", str(QUOTA))
    with cluster.client() as r:
        Cluster.create_pool(r, RBD_POOL)
    _ceph(cluster, "osd", "pool", "application", "enable", RBD_POOL, "rbd",
          "--yes-i-really-mean-it")
    subprocess.run(["rbd", "-c", str(cluster.conf), "create", f"{RBD_POOL}/{IMAGE}",
                    "--size", str(SIZE // MiB), "--image-feature", "layering"],
                   check=True, capture_output=True, timeout=120)
    return ["--ioengine=rbd", "--clientname=admin", f"--pool={RBD_POOL}",
            f"--rbdname={IMAGE}"]


BIND_POOL = "bindbench"
BIND_OBJECT = 4 * MiB          # RBD's object size
BIND_SPAN = 512 * MiB          # what fio reads of the image, in RBD's objects


def binding_fill(cluster: Cluster) -> None:
    """The python-rados side: pool BIND_POOL with BIND_SPAN of random bytes in objects of
    BIND_OBJECT (as RBD lays out an image)."""
    with cluster.client() as r:
        Cluster.create_pool(r, BIND_POOL)
        io = r.open_ioctx(BIND_POOL)
        try:
            for i in range(BIND_SPAN // BIND_OBJECT):
                io.write_full(f"obj.{i}", os.urandom(BIND_OBJECT))
        finally:
            io.close()


def binding_read(conf: str, seconds: float) -> None:
    """python-rados alone (the binding storaged must use, DESIGN: python3-rados): 1 MiB
    sequential reads at queue depth 4 over BIND_SPAN with ``Ioctx.aio_read``, nothing
    verified or sent on; prints MB/s. The read rows' second ceiling: what the binding
    itself reaches beside librbd (fio's rbd engine, C++), same cluster, same rounds."""
    r = load().Rados(conffile=conf)
    r.connect()
    io = r.open_ioctx(BIND_POOL)
    cond = threading.Condition()
    state = {"inflight": 0, "done": 0, "bad": 0}

    def complete(comp: Any, data: bytes) -> None:
        with cond:
            state["inflight"] -= 1
            state["done"] += len(data)
            state["bad"] += len(data) != MiB
            cond.notify()
    try:
        at = 0
        end = time.monotonic() + seconds
        started = time.monotonic()
        while time.monotonic() < end:
            with cond:
                while state["inflight"] >= 4:
                    cond.wait()
                state["inflight"] += 1
            obj, off = divmod(at % BIND_SPAN, BIND_OBJECT)
            io.aio_read(f"obj.{obj}", MiB, off, complete)
            at += MiB
        with cond:
            while state["inflight"]:
                cond.wait()
        took = time.monotonic() - started
        if state["bad"]:
            raise SystemExit(f"binding_read: {state['bad']} short reads")
        print(state["done"] / took / 1e6)
    finally:
        io.close()
        r.shutdown()


def path_serve(conf: str, directory: str) -> None:
    """storaged's read path alone, without NBD: a pool of its own on the RADOS pool (the
    server's pool is locked by the server), one plain volume of SIZE filled with random
    bytes; then, for each line ``SECONDS`` on stdin, 1 MiB sequential reads at queue
    depth 4 for that long as the NBD server makes them (``read_sparse_nowait``, else
    ``read_sparse``: read-ahead and verification as for NBD, nothing sent on), and one
    line of MB/s on stdout. The seq read row's third ceiling: where the RADOS side of
    storaged stands before the NBD leg."""
    async def main() -> None:
        pool = await Pool.create_rados(f"bench-path-{os.getpid()}",
                                       RadosTarget.parse(TEST_POOL, conf),
                                       claim=owners.Claim(owners.me(directory)),
                                       extent_size=16 * MiB)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                vol = await VolumeManager(pool).create("v", SIZE, profile="plain",
                                                       compression=False)
                for off in range(0, SIZE, 4 * MiB):
                    await vol.write(off, os.urandom(4 * MiB))
                await vol.flush()
                print("ready", flush=True)
                while line := await trio.to_thread.run_sync(sys.stdin.readline):
                    print(await _path_run(vol, float(line)), flush=True)
                nursery.cancel_scope.cancel()
        finally:
            await pool.close()
    tune_process()
    trio.run(main)


async def _path_run(vol: Any, seconds: float) -> float:
    """MB/s of 1 MiB sequential reads at queue depth 4 over the first 512 MiB of
    ``vol`` for ``seconds``, each checked for its length."""
    span = 512 * MiB
    at = 0
    done = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal at, done
        while time.monotonic() < end:
            off, at = at, (at + MiB) % span
            pieces = vol.read_sparse_nowait(off, MiB)
            if pieces is None:
                pieces = await vol.read_sparse(off, MiB)
            if sum(n for _o, n, _d in pieces) != MiB:
                raise AssertionError(f"short read at {off}")
            done += MiB
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(worker)
    return done / (time.monotonic() - started) / 1e6


class _PathSide:
    """The ``path_serve`` process, asked for one run at a time."""

    def __init__(self, conf: Path, directory: Path, log: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.rbd", "--path-serve", str(conf),
             str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            stderr=open(log, "ab"))  # noqa: SIM115
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"benchmarks.rbd --path-serve failed: see {log}")

    def run(self, seconds: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _binding(conf: Path, runtime: int) -> float:
    out = subprocess.run([sys.executable, "-m", "benchmarks.rbd", "--binding-read",
                          str(conf), str(runtime)], capture_output=True, text=True,
                         check=True, timeout=runtime + 120).stdout
    return float(out.strip().splitlines()[-1])


def _ceph(c: Cluster, *args: str) -> None:
    subprocess.run(["ceph", "-c", str(c.conf), *args], check=True, capture_output=True,
                   timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.rbd")
    add_round_args(ap)
    ap.add_argument("--runtime", type=int, default=None, help="seconds per fio run (5)")
    ap.add_argument("--dir", default="/var/tmp", help="where the cluster goes (not tmpfs)")
    ap.add_argument("--only", default="", help="rows whose name holds one of these "
                    "comma-separated words (e.g. 'rand read')")
    ap.add_argument("--record-cache", type=int, default=None, metavar="BYTES",
                    help="storaged's record cache (default: the daemon's, 1/16 of RAM; "
                         "0 measures reads that all reach the OSDs)")
    ap.add_argument("--readahead", type=int, default=None, metavar="BYTES",
                    help="storaged's RADOS read-ahead budget (pool/rados/prefetch.py "
                         "LIMIT; default off; e.g. 50331648 to measure it)")
    ap.add_argument("--pool-name", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--serve", nargs=3, metavar=("CONF", "DIR", "PORT"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--binding-read", nargs=2, metavar=("CONF", "SECONDS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--path-serve", nargs=2, metavar=("CONF", "DIR"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path_serve:
        path_serve(args.path_serve[0], args.path_serve[1])
        return
    if args.binding_read:
        binding_read(args.binding_read[0], float(args.binding_read[1]))
        return
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]), args.record_cache,
              args.readahead, args.pool_name)
        return
    check_rounds(ap, args.rounds)
    reason = why_not()
    if reason is not None:
        raise SystemExit(f"benchmarks.rbd: {reason}")
    for tool in ("fio", "rbd", "ceph"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks.rbd: {tool} is missing (run `make bench-rados`, "
                             f"which installs it)")
    engines = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True,
                             check=False).stdout
    if "rbd" not in engines.split():
        raise SystemExit("benchmarks.rbd: this fio has no rbd engine")
    runtime = args.runtime or (1 if args.smoke else 5)
    tests = [TESTS[0], TESTS[3]] if args.smoke else TESTS
    work = Path(tempfile.mkdtemp(prefix="storaged-rbd-bench-", dir=args.dir))
    report = Report("rbd")
    proc: subprocess.Popen[bytes] | None = None
    local: subprocess.Popen[bytes] | None = None
    path: _PathSide | None = None
    cluster = Cluster.start(work / "ceph", block_size=16 << 30)
    try:
        env = {**os.environ, "CEPH_CONF": str(cluster.conf)}
        rbd = rbd_image(cluster)
        sdir = work / "storaged"
        sdir.mkdir()
        port = free_port()
        cache = ([] if args.record_cache is None
                 else ["--record-cache", str(args.record_cache)])
        if args.readahead is not None:
            cache += ["--readahead", str(args.readahead)]
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.rbd", *cache, "--serve",
                                 str(cluster.conf), str(sdir), str(port)],
                                stdout=subprocess.DEVNULL, stderr=open(  # noqa: SIM115
                                    work / "storaged.log", "ab"))
        wait_port(port, proc, "storaged")
        nbd = ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/bench/plain"]
        ldir = work / "local"
        ldir.mkdir()
        lport = free_port()
        local = subprocess.Popen([sys.executable, "-m", "benchmarks.radoscpu",
                                  "--serve-local", str(ldir), str(lport)],
                                 stdout=subprocess.DEVNULL, stderr=open(  # noqa: SIM115
                                     work / "local.log", "ab"))
        wait_port(lport, local, "storaged on a local pool")
        leg = ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{lport}/bench/plain"]
        # The same server on its Unix socket (nbd.socket): a hypervisor on the node.
        unix = ["--ioengine=nbd", f"--uri=nbd+unix:///bench/plain?socket={sdir}/nbd.sock"]
        _prefill(rbd, env)
        _prefill(nbd, None)
        _prefill(leg, None)

        def measure(target: list[str], e: dict[str, str] | None, rw: str, bs: str,
                    depth: int) -> Callable[[], float]:
            size = "512m" if bs == "1m" else "256m"
            return lambda: _fio(target, e, rw, bs, depth, runtime, size)

        pairs = [Pair(f"plain {test}", anchor=measure(rbd, env, rw, bs, depth),
                      storaged=measure(nbd, None, rw, bs, depth), anchor_name="fio rbd",
                      ceiling=measure(leg, None, rw, bs, depth) if "read" in rw else None,
                      ceiling_name="NBD leg alone (local pool)" if "read" in rw else "")
                 for test, rw, bs, depth in tests]
        if any(rw == "read" for _t, rw, _b, _d in tests):
            pairs.append(Pair("plain seq read 1M, NBD on a Unix socket", anchor=measure(
                rbd, env, "read", "1m", 4), storaged=measure(unix, None, "read", "1m", 4),
                anchor_name="fio rbd"))
            # The binding's own ceiling for the sequential read row: python-rados alone
            # (no NBD, no verification) against the same fio rbd reads.
            binding_fill(cluster)
            pairs.append(Pair("ceiling: python-rados alone, seq read 1M", anchor=measure(
                rbd, env, "read", "1m", 4), storaged=lambda: _binding(cluster.conf, runtime),
                anchor_name="fio rbd", ceiling=None, ceiling_name=""))
            # storaged's own RADOS read path without the NBD leg, in its own process.
            pdir = work / "path"
            pdir.mkdir()
            path = _PathSide(cluster.conf, pdir, work / "path.log")
            pairs.append(Pair("ceiling: storaged's read path alone (no NBD), seq read 1M",
                              anchor=measure(rbd, env, "read", "1m", 4),
                              storaged=lambda: path.run(runtime), anchor_name="fio rbd",
                              ceiling=None, ceiling_name=""))
        if args.only:
            pairs = [p for p in pairs if any(w in p.row for w in args.only.split(","))]
        report.add(run_rounds("rbd", pairs, args.rounds, stderr_log,
                              extra=extra_rounds(args.smoke)))
    finally:
        if path is not None:
            path.stop()
        for server in (proc, local):
            if server is not None and server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    server.kill()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    cached = ("storaged's record cache at its default (1/16 of RAM: random reads of the "
              "256 MiB range hit it once warm; librbd's own cache is 32 MiB)"
              if args.record_cache is None else
              f"storaged's record cache at {args.record_cache} bytes")
    if args.readahead:
        cached += f", RADOS read-ahead of {args.readahead} bytes"
    report.write(args.results, f"fio, {runtime} s per run, {cached}, on one throwaway Ceph "
                 "cluster "
                 "(one bluestore OSD on a sparse file): storaged over NBD on a RADOS pool "
                 "against fio's rbd engine on an RBD image of the same cluster. Targets: "
                 "at least 0.7x on every row, above 1.0x on 4K random writes. Ceiling of the "
                 "read rows: the same NBD path on a page-cached local pool, same rounds.")


if __name__ == "__main__":
    main()
