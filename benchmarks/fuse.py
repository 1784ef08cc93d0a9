"""benchmarks/fuse: fio on a storaged volume file in the FUSE mount (plain and ec:4+2)
against qemu-storage-daemon's FUSE export of a qcow2 file and a plain file of the host file
system, on the same machine in one run, and on a pyfuse3 file system with nothing behind it
(benchmarks/nullfuse.py: handlers that answer at once), the ceiling of any pyfuse3 export
here, so the table shows how much of a gap is storaged's and how much pyfuse3's.

Every target is a 1 GiB file; fio uses libaio with --direct=1: a prefill, 1 MiB sequential
write (iodepth 4, fsync at the end), 1 MiB sequential read (iodepth 4), 4 KiB random write
(iodepth 16, fsync at the end), 4 KiB random read (iodepth 16). storaged runs as a separate
process (the real daemon, `--fuse-mount`) on a pool of six sparse files. The table gives
MB/s and IOPS and each figure as a ratio to qemu-storage-daemon; the target for storaged is
at least 0.5x on every row. Needs root (mounts) and qemu-storage-daemon
(qemu-system-common, installed by `make bench-fuse`).

    .venv/bin/python -m benchmarks.fuse [--quick] [--dir PATH] [--runtime SECONDS]
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
import time
from pathlib import Path

from benchmarks.common import Result
from fuse.mount import mount_entry, raise_max_background

MiB = 1 << 20
SIZE = 1 << 30
TESTS = [("seq write 1M", "write", "1m", 4), ("seq read 1M", "read", "1m", 4),
         ("rand write 4K", "randwrite", "4k", 16), ("rand read 4K", "randread", "4k", 16)]
BIN = Path(sys.executable).parent
NULL = "pyfuse3 null"      # the ceiling: pyfuse3 with no storage behind it


def fio(path: Path, test: str, rw: str, bs: str, depth: int, runtime: int,
        target: str) -> Result:
    args = ["fio", "--name=bench", f"--filename={path}", "--ioengine=libaio", "--direct=1",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--size=512m", "--time_based",
            f"--runtime={runtime}", "--ramp_time=1", "--output-format=json",
            "--refill_buffers"]
    if "write" in rw:
        args.append("--end_fsync=1")
    r = subprocess.run(args, capture_output=True, text=True, check=False,
                       timeout=runtime * 4 + 120)
    if r.returncode != 0:
        raise RuntimeError(f"fio {test} on {target}: {r.stderr.strip()[-500:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return Result(target, test, side["bw_bytes"] / 1e6, side["iops"])


def prefill(path: Path) -> None:
    subprocess.run(["fio", "--name=fill", f"--filename={path}", "--ioengine=libaio",
                    "--direct=1", "--rw=write", "--bs=1m", "--iodepth=4", "--size=512m",
                    "--refill_buffers", "--end_fsync=1"], capture_output=True, check=True)


def _wait(cond: object, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early")
        if callable(cond) and cond():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up")


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def start_storaged(work: Path) -> tuple[subprocess.Popen[bytes], Path, str]:
    sock = str(work / "ctl.sock")
    mnt = work / "mnt"
    log = open(work / "storaged.log", "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen([str(BIN / "storaged"), "--state-dir", str(work / "state"),
                             "--socket", sock, "--nbd-listen", "off", "--metrics-listen",
                             "off", "--fuse-mount", str(mnt), "--log-level", "warning"],
                            stdout=log, stderr=log)
    _wait(lambda: os.path.exists(sock) and _mounted(mnt), proc, "storaged")

    def ctl(*args: str) -> None:
        subprocess.run([str(BIN / "storagectl"), "--socket", sock, *args], check=True,
                       capture_output=True)
    devs = [str(work / f"d{i}.img") for i in range(6)]
    ctl("pool", "create", "bench", *devs, "--profile", "plain", "--file-size", "4G")
    ctl("volume", "create", "bench/plain", "--size", str(SIZE), "--compression", "off")
    ctl("volume", "create", "bench/ec", "--size", str(SIZE), "--profile", "ec:4+2",
        "--compression", "off")
    return proc, mnt, sock


def start_qsd(work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    img = work / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), str(SIZE)], check=True,
                   capture_output=True)
    target = work / "qsd-export"
    target.touch()
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev",
         f"driver=file,node-name=file,filename={img},cache.direct=off,aio=threads",
         "--blockdev", "driver=qcow2,node-name=qcow2,file=file",
         "--export", f"type=fuse,id=exp,node-name=qcow2,mountpoint={target},writable=on"],
        stdout=subprocess.DEVNULL, stderr=open(work / "qsd.log", "ab"))  # noqa: SIM115
    _wait(lambda: _mounted(target), proc, "qemu-storage-daemon")
    return proc, target


def start_null(work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    mnt = work / "null"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.nullfuse", str(mnt)],
                            stdout=subprocess.DEVNULL,
                            stderr=open(work / "null.log", "ab"))  # noqa: SIM115
    _wait(lambda: _mounted(mnt), proc, "the pyfuse3 null file system")
    entry = mount_entry(str(mnt))
    if entry is not None:      # the same kernel queue depth as storaged's mount
        raise_max_background(entry[1])
    return proc, mnt / "file"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per test instead of 10")
    ap.add_argument("--runtime", type=int, default=None)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args(argv)
    runtime = args.runtime or (3 if args.quick else 10)
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is missing: install qemu-system-common (make bench-fuse)",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir=args.dir))
    procs: list[subprocess.Popen[bytes]] = []
    results: list[Result] = []
    try:
        sd, mnt, _sock = start_storaged(work)
        procs.append(sd)
        qsd, qsd_file = start_qsd(work)
        procs.append(qsd)
        null, null_file = start_null(work)
        procs.append(null)
        host = work / "host.raw"
        with open(host, "wb") as f:
            f.truncate(SIZE)
        targets = [("qsd qcow2", qsd_file), ("storaged plain", mnt / "bench" / "plain"),
                   ("storaged ec:4+2", mnt / "bench" / "ec"), ("host file", host),
                   (NULL, null_file)]
        for name, path in targets:
            prefill(path)
            for test, rw, bs, depth in TESTS:
                res = fio(path, test, rw, bs, depth, runtime, name)
                results.append(res)
                print(f"  {name:16} {test:14} {res.mbps:9.1f} MB/s {res.iops:10.0f} IOPS",
                      file=sys.stderr, flush=True)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for m in (work / "mnt", work / "qsd-export", work / "null"):
            if _mounted(m):
                subprocess.run(["fusermount3", "-u", "-z", str(m)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    return 0


def print_table(results: list[Result]) -> None:
    base = {r.test: r for r in results if r.target == "qsd qcow2"}
    print("\n| target | test | MB/s | IOPS | vs qsd qcow2 |\n|---|---|---:|---:|---:|")
    for r in results:
        ref = base.get(r.test)
        ratio = r.iops / ref.iops if ref and ref.iops else 0.0
        print(f"| {r.target} | {r.test} | {r.mbps:.1f} | {r.iops:.0f} | {ratio:.2f}x |")
    print(f"\n'{NULL}' answers every request at once with no storage behind it: no pyfuse3 "
          "export can go faster here, and storaged's rows are also given as a share of it.")
    ceiling = {r.test: r for r in results if r.target == NULL}
    for r in results:
        top = ceiling.get(r.test)
        if r.target.startswith("storaged") and top and top.iops:
            print(f"  {r.target:16} {r.test:14} {r.iops / top.iops:.2f} of the pyfuse3 ceiling")


if __name__ == "__main__":
    sys.exit(main())
