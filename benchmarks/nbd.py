"""benchmarks/nbd: fio's nbd engine against storaged and against qemu-nbd serving a qcow2
file (the anchor), with qemu-nbd serving a raw file as the ceiling (the thinnest NBD server on
the same disk), on the same machine in interleaved rounds (benchmarks/common.py).

Each target serves a 1 GiB export on loopback, filled once first. Rows, per storaged volume
(plain and ec:4+2 in one pool of six sparse files; lz4 with --lz4): 1 MiB sequential write
(iodepth 4, fsync at the end so buffered writes are not flattered), 1 MiB sequential read
(iodepth 4), 4 KiB random write (iodepth 16, fsync at the end) and 4 KiB random read
(iodepth 16); then the latency rows: 4 KiB random reads and writes at queue depth 1,
p50 and p99 of fio's total latency (lat) and of its completion latency (clat), in
microseconds, from the same run (PERCENTILES says why lat is the one to compare; the
ratio is inverted, qemu-nbd+qcow2's latency over storaged's, so above 1 is still better
(common.py invariant 4); the issue's target, storaged's latency at most 1.2x the anchor's,
is a ratio of at least 0.83; ``--latency`` runs only these). Each row runs qemu-nbd+qcow2,
storaged and qemu-nbd+raw back to back in every round, the order alternating; the table
gives the median of the paired ratios (storaged against qemu-nbd+qcow2 of the same round)
and their spread. storaged runs as a separate process
(`--serve`). The issue's target is at least 1.0x on every throughput row.

    .venv/bin/python -m benchmarks.nbd [--rounds N] [--smoke] [--lz4] [--latency]
        [--only TEXT]... [--dir PATH] [--runtime SECONDS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import (
    Figures,
    Pair,
    Report,
    RowResult,
    add_round_args,
    check_rounds,
    cpu_meter,
    extra_rounds,
    fio_side,
    free_port,
    per_op,
    run_rounds,
    serve_until_signal,
    stderr_log,
    wait_port,
)
from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer
from pool import FileDevice, Pool
from storaged.tuning import freeze_startup, tune_process
from volumes import VolumeManager

MiB = 1 << 20
SIZE = 1 << 30
TESTS = [("seq write 1M", "write", "1m", 4), ("seq read 1M", "read", "1m", 4),
         ("rand write 4K", "randwrite", "4k", 16), ("rand read 4K", "randread", "4k", 16)]
LATENCY = [("QD1 rand read 4K", "randread"), ("QD1 rand write 4K", "randwrite")]
# Of one run: fio's total latency (submission to completion: slat + clat) and its
# completion latency (clat, from the request's submission call returning), p50 and p99.
# clat alone leaves out the request's send, and a reply that arrives while that send call
# is still returning makes it a few µs that no round trip takes (seen for qemu-nbd:
# 2-7 µs p50 in some rounds, 17-25 in others), so lat is the figure to compare.
PERCENTILES = ("lat p50", "lat p99", "clat p50", "clat p99")


def fio_job(uri: str, test: str, rw: str, bs: str, depth: int, runtime: int,
            extra: list[str]) -> dict[str, Any]:
    """One fio run; its job's read or write section of fio's JSON."""
    size = "256m" if bs == "1m" else "128m"
    return fio_side(["--ioengine=nbd", f"--uri={uri}"], rw, bs, depth, size, runtime,
                    f"{test} on {uri}", extra, slack=60)


def fio(uri: str, test: str, rw: str, bs: str, depth: int, runtime: int,
        extra: list[str], pid: int | None = None) -> float:
    """One fio run; MB/s (with ``pid``, the server's CPU per request beside it:
    benchmarks/common.py invariant 9)."""
    def run() -> tuple[float, int]:
        job = fio_job(uri, test, rw, bs, depth, runtime, extra)
        return float(job["bw_bytes"]) / 1e6, int(job["total_ios"])
    return per_op(pid, run)


def fio_latency(uri: str, test: str, rw: str, runtime: int,
                pid: int | None = None) -> list[float]:
    """One fio run of 4 KiB at queue depth 1: its total and its completion latency, p50
    and p99 of each, in us (PERCENTILES); with ``pid``, each with the server's CPU per
    request of that run (benchmarks/common.py invariant 9)."""
    sample = cpu_meter(pid)
    side = fio_job(uri, test, rw, "4k", 1, runtime,
                   ["--percentile_list=50:99", "--lat_percentiles=1",
                    "--clat_percentiles=1"])
    return [sample(float(side[kind]["percentile"][p]) / 1000, int(side["total_ios"]))
            for kind in ("lat_ns", "clat_ns") for p in ("50.000000", "99.000000")]


def prefill(uri: str) -> None:
    subprocess.run(["fio", "--name=prefill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                    "--bs=1m", "--iodepth=4", "--size=256m", "--refill_buffers",
                    "--end_fsync=1"], capture_output=True, check=True, timeout=300)


def serve(directory: str, port: int) -> None:
    """The storaged side: a pool of six sparse files, three volumes, NBD until SIGTERM."""

    async def main() -> None:
        devs = [FileDevice(os.path.join(directory, f"dev{i}"), create_size=3 << 30)
                for i in range(6)]
        pool = await Pool.create("bench", devs, profile="ec:4+2", extent_size=16 * MiB,
                                 force=True)
        vm = VolumeManager(pool)
        await vm.create("plain", SIZE, profile="plain", compression=False)
        await vm.create("ec", SIZE, profile="ec:4+2", compression=False)
        await vm.create("lz4", SIZE, profile="plain", compression=True)
        server = NBDServer(VolumeCatalog({"bench": vm}), NBDConfig(port=port))
        freeze_startup()   # as the daemon does once it serves
        try:
            await serve_until_signal(server.serve)
        finally:
            await pool.close()
    tune_process()   # as the daemon runs
    trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.nbd")
    add_round_args(ap)
    ap.add_argument("--runtime", type=int, default=None, help="seconds per fio run (5)")
    ap.add_argument("--lz4", action="store_true", help="also the lz4-compressed volume")
    ap.add_argument("--latency", action="store_true", help="only the QD1 latency rows")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="only the rows whose name contains TEXT (repeatable)")
    ap.add_argument("--dir", default="/var/tmp", help="where the files go (not tmpfs)")
    ap.add_argument("--serve", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    check_rounds(ap, args.rounds)
    for tool in ("fio", "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks.nbd: {tool} is missing (run `make bench-nbd`, "
                             f"which installs it)")
    runtime = args.runtime or (1 if args.smoke else 5)
    tests = [TESTS[0], TESTS[3]] if args.smoke else TESTS
    latency_tests = LATENCY[:1] if args.smoke else LATENCY
    if args.latency:
        tests = []
    if args.only:
        tests = [t for t in tests if any(o in t[0] for o in args.only)]
        latency_tests = [t for t in latency_tests if any(o in t[0] for o in args.only)]
    vols: list[tuple[str, str, list[str]]] = [("plain", "plain", []), ("ec", "ec:4+2", [])]
    if args.smoke:
        vols = vols[:1]
    elif args.lz4:
        vols.append(("lz4", "lz4", ["--buffer_compress_percentage=50"]))
    work = Path(tempfile.mkdtemp(prefix="storaged-nbd-bench-", dir=args.dir))
    report = Report("nbd")
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, cmd: list[str], port: int) -> int:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_port(port, proc, name)
        return proc.pid

    try:
        raw, qcow = work / "disk.raw", work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-f", "raw", str(raw), "1G"], check=True,
                       capture_output=True)
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(qcow), "1G"], check=True,
                       capture_output=True)
        uris = {}
        pids: dict[str, int] = {}       # each URI's server (invariant 9's CPU per request)
        for name, fmt, path in (("qcow2", "qcow2", qcow), ("raw", "raw", raw)):
            port = free_port()
            uris[name] = f"nbd://127.0.0.1:{port}/d"
            pids[uris[name]] = start(
                f"qemu-nbd {fmt}", ["qemu-nbd", "-f", fmt, "-x", "d", "-t",
                                    "--cache=writeback", "-b", "127.0.0.1", "-p", str(port),
                                    str(path)], port)
        sdir = work / "storaged"
        sdir.mkdir()
        port = free_port()
        storaged = start("storaged", [sys.executable, "-m", "benchmarks.nbd", "--serve",
                                      str(sdir), str(port)], port)
        for vol, _label, _extra in vols:
            uris[vol] = f"nbd://127.0.0.1:{port}/bench/{vol}"
            pids[uris[vol]] = storaged
        for uri in uris.values():
            prefill(uri)

        def measure(uri: str, test: str, rw: str, bs: str, depth: int,
                    extra: list[str]) -> Callable[[], float]:
            return lambda: fio(uri, test, rw, bs, depth, runtime, extra, pids.get(uri))

        def latency(uri: str, test: str, rw: str) -> Callable[[], list[float]]:
            return lambda: fio_latency(uri, test, rw, runtime, pids.get(uri))

        pairs: list[Pair | Figures] = [
            Pair(f"{label} {test}",
                 anchor=measure(uris["qcow2"], test, rw, bs, depth, extra),
                 storaged=measure(uris[vol], test, rw, bs, depth, extra),
                 ceiling=measure(uris["raw"], test, rw, bs, depth, extra),
                 anchor_name="qemu-nbd qcow2", ceiling_name="qemu-nbd raw")
            for vol, label, extra in vols for test, rw, bs, depth in tests]
        pairs += [Figures(f"{label} {test}", PERCENTILES,
                          anchor=latency(uris["qcow2"], test, rw),
                          storaged=latency(uris[vol], test, rw),
                          ceiling=latency(uris["raw"], test, rw), unit="us",
                          anchor_name="qemu-nbd qcow2", ceiling_name="qemu-nbd raw",
                          higher_is_better=False)
                  for vol, label, _extra in vols for test, rw in latency_tests]
        report.add(run_rounds("nbd", pairs, args.rounds, stderr_log,
                              extra=extra_rounds(args.smoke)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    report.write(args.results, f"fio over NBD, {runtime} s per run; the anchor is "
                 "qemu-nbd serving qcow2, the ceiling qemu-nbd serving a raw file on the same "
                 "disk. Target: at least 1.0x on every throughput row; on the QD1 latency rows "
                 "(us; ratio = anchor / storaged) at least 0.83x: storaged's latency within "
                 "1.2x of the anchor's." + latency_note(report.rows))


def latency_note(rows: list[RowResult]) -> str:
    """The latency rows as the issue states its target: storaged's latency over the
    anchor's (median of the paired rounds; at most 1.2x)."""
    lat = [r for r in rows if not r.higher_is_better]
    if not lat:
        return ""

    def over(r: RowResult) -> float:
        return statistics.median(s / a for s, a in zip(r.storaged_rounds, r.anchor_rounds,
                                                       strict=True))
    return (" Latency, storaged / anchor (paired median; target <= 1.2x): "
            + "; ".join(f"{r.row} {over(r):.2f}x" for r in lat) + ".")


if __name__ == "__main__":
    main()
