"""benchmarks/nbd: fio's nbd engine against storaged and against qemu-nbd (raw and qcow2
files) and nbdkit's file plugin, on the same machine in one run.

Each target serves a 1 GiB export on loopback; fio runs, in this order: a prefill, 1 MiB
sequential write (iodepth 4, fsync at the end so buffered writes are not flattered),
1 MiB sequential read (iodepth 4), 4 KiB random write (iodepth 16, fsync at the end) and
4 KiB random read (iodepth 16). storaged runs as a separate process (`--serve`), with
plain, ec:4+2 and lz4-compressed volumes in one pool of six sparse files. The table gives
MB/s and IOPS and each storaged figure as a ratio to qemu-nbd serving qcow2; the target for
the plain volume is at least 0.5x on every row.

    .venv/bin/python -m benchmarks.nbd [--quick] [--dir PATH] [--runtime SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from benchmarks.common import Result, free_port, wait_port
from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer
from pool import FileDevice, Pool
from storaged.tuning import tune_process
from volumes import VolumeManager

MiB = 1 << 20
SIZE = 1 << 30
TESTS = [("seq write 1M", "write", "1m", 4), ("seq read 1M", "read", "1m", 4),
         ("rand write 4K", "randwrite", "4k", 16), ("rand read 4K", "randread", "4k", 16)]


def fio(uri: str, test: str, rw: str, bs: str, depth: int, runtime: int, out: Path,
        extra: list[str]) -> Result:
    size = "256m" if bs == "1m" else "128m"
    args = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={depth}", f"--size={size}", "--time_based",
            f"--runtime={runtime}", "--ramp_time=1", "--output-format=json",
            "--refill_buffers", *extra]
    if "write" in rw:
        args.append("--end_fsync=1")
    r = subprocess.run(args, capture_output=True, text=True, check=False,
                       timeout=runtime * 4 + 60)
    if r.returncode != 0:
        raise RuntimeError(f"fio {test} on {uri} failed: {r.stderr.strip()[-500:]}")
    out.write_text(r.stdout)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return Result("", test, side["bw_bytes"] / 1e6, side["iops"])


def prefill(uri: str) -> None:
    subprocess.run(["fio", "--name=prefill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                    "--bs=1m", "--iodepth=4", "--size=256m", "--refill_buffers",
                    "--end_fsync=1"], capture_output=True, check=True, timeout=300)


def run_target(name: str, uri: str, runtime: int, results: Path,
               extra: list[str]) -> list[Result]:
    prefill(uri)
    out = []
    for test, rw, bs, depth in TESTS:
        res = fio(uri, test, rw, bs, depth, runtime,
                  results / f"{name.replace(' ', '_').replace(':', '')}-{rw}.json", extra)
        res.target = name
        out.append(res)
        print(f"  {name:<22} {test:<14} {res.mbps:8.0f} MB/s {res.iops:9.0f} IOPS",
              file=sys.stderr, flush=True)
    return out


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
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve)
                    async for _sig in signals:
                        nursery.cancel_scope.cancel()
                        break
        finally:
            await pool.close()
    tune_process()   # as the daemon runs
    trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.nbd")
    ap.add_argument("--quick", action="store_true", help="3 s per test instead of 8")
    ap.add_argument("--runtime", type=int, default=None)
    ap.add_argument("--dir", default="/var/tmp", help="where the files go (not tmpfs)")
    ap.add_argument("--serve", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    for tool in ("fio", "qemu-nbd", "qemu-img", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks.nbd: {tool} is missing (run `make bench-nbd`, "
                             f"which installs it)")
    runtime = args.runtime or (3 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="storaged-nbd-bench-", dir=args.dir))
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    rows: list[Result] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        raw, qcow = work / "disk.raw", work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-f", "raw", str(raw), "1G"], check=True,
                       capture_output=True)
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(qcow), "1G"], check=True,
                       capture_output=True)
        baselines = [
            ("qemu-nbd raw", ["qemu-nbd", "-f", "raw", "-x", "d", "-t", "--cache=writeback",
                              "-b", "127.0.0.1", "-p", "{port}", str(raw)]),
            ("qemu-nbd qcow2", ["qemu-nbd", "-f", "qcow2", "-x", "d", "-t",
                                "--cache=writeback", "-b", "127.0.0.1", "-p", "{port}",
                                str(qcow)]),
            ("nbdkit file", ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "{port}", "file",
                             str(raw)]),
        ]
        for name, cmd in baselines:
            port = free_port()
            proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            wait_port(port, proc, name)
            export = "d" if name.startswith("qemu") else ""
            rows += run_target(name, f"nbd://127.0.0.1:{port}/{export}", runtime, results,
                               [])
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            os.sync()
        sdir = work / "storaged"
        sdir.mkdir()
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.nbd", "--serve", str(sdir),
                                 str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_port(port, proc, "storaged")
        for vol, extra in (("plain", []), ("ec", []),
                           ("lz4", ["--buffer_compress_percentage=50"])):
            rows += run_target(f"storaged {vol}", f"nbd://127.0.0.1:{port}/bench/{vol}",
                               runtime, results, extra)
            os.sync()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(report(rows))


def report(rows: list[Result]) -> str:
    base = {r.test: r for r in rows if r.target == "qemu-nbd qcow2"}
    lines = [f"{'target':<22} {'test':<14} {'MB/s':>8} {'IOPS':>9}  {'vs qcow2':>8}"]
    for r in rows:
        ratio = ""
        if r.target.startswith("storaged") and r.test in base:
            q = r.mbps / base[r.test].mbps
            ratio = f"{q:.2f}x"
            if r.target == "storaged plain":
                ratio += "  PASS" if q >= 0.5 else "  MISS"
        lines.append(f"{r.target:<22} {r.test:<14} {r.mbps:8.0f} {r.iops:9.0f}  {ratio}")
    lines.append("Target: storaged plain >= 0.5x qemu-nbd+qcow2 on every row. Raw fio JSON "
                 "is in benchmarks/results/.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
