"""benchmarks/iscsi: storaged's iSCSI target against tgtd (the Linux SCSI target framework,
Debian package ``tgt``) serving a raw file, in one run on the same machine.

Each target serves a 512 MiB LU on loopback, first filled with random data (so no target
answers reads from holes). Then, per target: ``iscsi-perf`` (libiscsi; 4 KiB sequential
reads at its default queue depth of 32, for RUNTIME seconds) and ``qemu-img bench``
through qemu's libiscsi driver: 1 MiB at depth 4 and 4 KiB at depth 16, reads and writes.
storaged runs as a separate process (``--serve``) with a plain and an ec:4+2 volume
(compression off) in one pool of six sparse files. The table gives IOPS and MB/s and each
storaged figure as a ratio to tgtd; the issue's target is at least 0.5x on every row.

    .venv/bin/python -m benchmarks.iscsi [--quick] [--dir PATH] [--runtime SECONDS]
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
from pathlib import Path

import trio

from benchmarks.common import Result, free_port, wait_port
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


def iscsi_perf(url: str, runtime: int) -> Result:
    out = _run(["iscsi-perf", "-t", str(runtime), "-b", "8", url], runtime * 3 + 60)
    found = re.findall(r"iops average (\d+) \((\d+) MB/s\)", out.replace("\r", "\n"))
    if not found:
        raise RuntimeError(f"no iscsi-perf figures in: {out[-300:]}")
    iops = float(found[-1][0])
    return Result("", "iscsi-perf read 4K d32", iops * 4096 / 1e6, iops)


def qemu_bench(url: str, test: str, bs: int, depth: int, write: bool,
               runtime: int) -> Result:
    """``qemu-img bench`` for about ``runtime`` seconds (a calibrating run first)."""
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
    seconds = once(count)
    return Result("", test, count * bs / seconds / 1e6, count / seconds)


def run_target(name: str, url: str, runtime: int) -> list[Result]:
    rows = [iscsi_perf(url, runtime)]
    rows += [qemu_bench(url, t, bs, d, w, runtime) for t, bs, d, w in QEMU_TESTS]
    for r in rows:
        r.target = name
        print(f"  {name:<18} {r.test:<24} {r.iops:9.0f} IOPS {r.mbps:8.0f} MB/s",
              file=sys.stderr, flush=True)
    return rows


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


def _tgtadm(control: int, *args: str) -> None:
    _run(["tgtadm", "-C", str(control), "--lld", "iscsi", *args], 30)


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.iscsi")
    ap.add_argument("--quick", action="store_true", help="3 s per test instead of 8")
    ap.add_argument("--runtime", type=int, default=None)
    ap.add_argument("--dir", default="/var/tmp", help="where the files go (not tmpfs)")
    ap.add_argument("--serve", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    for tool in ("iscsi-perf", "qemu-img", "tgtd", "tgtadm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks.iscsi: {tool} is missing (run `make bench-iscsi`, "
                             f"which installs it)")
    runtime = args.runtime or (3 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="storaged-iscsi-bench-", dir=args.dir))
    rows: list[Result] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        image = work / "random.img"
        with open(image, "wb") as f:
            for _ in range(SIZE // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        # tgtd serving a raw file (LUN 0 is its controller; the disk is LUN 1).
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(SIZE)
        port, control = free_port(), 7000 + os.getpid() % 1000
        tgtd = subprocess.Popen(["tgtd", "-f", "-C", str(control), "--iscsi",
                                 f"portal=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(tgtd)
        wait_port(port, tgtd, "tgtd")
        _tgtadm(control, "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN)
        _tgtadm(control, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                "-b", str(raw))
        _tgtadm(control, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        url = f"iscsi://127.0.0.1:{port}/{TGT_IQN}/1"
        prefill(url, image)
        rows += run_target("tgtd raw file", url, runtime)
        _tgtadm(control, "--op", "delete", "--mode", "target", "--tid", "1", "--force")
        subprocess.run(["tgtadm", "-C", str(control), "--op", "delete", "--mode", "system"],
                       capture_output=True, check=False, timeout=30)
        try:
            tgtd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tgtd.kill()
            tgtd.wait(timeout=10)
        os.sync()
        # storaged, in its own process.
        sdir = work / "storaged"
        sdir.mkdir()
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.iscsi", "--serve",
                                 str(sdir), str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_port(port, proc, "storaged")
        for vol in ("plain", "ec"):
            url = f"iscsi://127.0.0.1:{port}/{BASE}:bench:{vol}/0"
            prefill(url, image)
            os.sync()
            rows += run_target(f"storaged {vol}", url, runtime)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(report(rows))


def report(rows: list[Result]) -> str:
    base = {r.test: r for r in rows if r.target == "tgtd raw file"}
    lines = [f"{'target':<18} {'test':<24} {'IOPS':>9} {'MB/s':>8}  {'vs tgtd':>8}"]
    for r in rows:
        ratio = ""
        if r.target.startswith("storaged") and r.test in base and base[r.test].iops:
            q = r.iops / base[r.test].iops
            ratio = f"{q:.2f}x" + ("  PASS" if q >= 0.5 else "  MISS")
        lines.append(f"{r.target:<18} {r.test:<24} {r.iops:9.0f} {r.mbps:8.0f}  {ratio}")
    lines.append("Target (issue 7): storaged >= 0.5x tgtd on every row.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
