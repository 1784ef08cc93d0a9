"""benchmarks/fuse: fio on a storaged volume file in the FUSE mount (plain and ec:4+2)
against qemu-storage-daemon's FUSE export of a qcow2 file (the anchor), with a pyfuse3 file
system that has nothing behind it (benchmarks/nullfuse.py: handlers that answer at once) as
the ceiling of any pyfuse3 export here, on the same machine in interleaved rounds
(benchmarks/common.py), so the table shows how much of a gap is storaged's and how much
pyfuse3's. On the 4K rows a second ceiling runs beside them in the same rounds: the same
null file system with ``--memory`` ("pyfuse3 memory"), which keeps the file's bytes in a
512 MiB in-process buffer of random bytes, answers reads with a view of it at the offset
and copies writes into it. Touching real bytes spread over 512 MiB (cold cache lines and
TLB entries) costs this VM 10-15% of the null file system's rate, so no export that serves
real data gets much above 0.9 of the null one; the table shows that bound measured, not
assumed: the memory ceiling's share of the null one, and storaged's share of each.

Every target is a 1 GiB file (the memory one 512 MiB, all that fio touches), filled once
first; fio uses libaio with --direct=1: 1 MiB sequential write (iodepth 4, fsync at the
end), 1 MiB sequential read (iodepth 4), 4 KiB random write (iodepth 16, fsync at the
end), 4 KiB random read (iodepth 16). Each row runs qemu-storage-daemon, storaged and the
null file system (and on the 4K rows the memory one) back to back in every round, the
order alternating; the table gives the median paired ratio and its spread, and storaged
as a share of the ceiling(s). storaged runs as a separate process (the real daemon,
`--fuse-mount`) on a pool of six sparse files. Targets: at least 1.0x on the sequential
rows, at least 0.9 of the null file system on the 4K rows. Needs root (mounts) and
qemu-storage-daemon (qemu-system-common, installed by `make bench-fuse`).

    .venv/bin/python -m benchmarks.fuse [--rounds N] [--smoke] [--dir PATH]
        [--runtime SECONDS] [--rows 'rand write 4K,rand read 4K'] [--volumes plain]
        [--no-precondition]

Before the rounds storaged's volumes are overwritten as the write row does (1 MiB writes
around the 512 MiB it writes, four times, fsync at the end), pass after pass until a pass
grows the pool's files by at most 64 MiB (``settle``), as the iSCSI benchmark does (see
benchmarks/iscsi.py): qemu-storage-daemon overwrites its qcow2 clusters in place, in pages
the prefill brought into the page cache, while storaged writes copy-on-write, and until its
pool has grown to the room a write row needs every flush lands on never-written extents of
its sparse files, whose new page-cache pages cost this VM 5-13 ms of kernel time per MiB on
first touch (pwrite of 256 MiB to a new file region: 3.3 s of CPU, the same region again
0.06 s). The plain rows ran first, on that fresh pool, and the ec:4+2 rows later on
extents the plain rows had freed: that was the plain volume writing slower than the
ec:4+2 one. ``--no-precondition`` measures the fresh pool.

``--rows`` and ``--volumes`` run a part of the table (a row is kept when its name contains
one of the comma-separated words given), for measuring one change without the rest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import (
    Pair,
    Report,
    add_round_args,
    check_rounds,
    extra_rounds,
    fio_side,
    per_op,
    run_rounds,
    settle,
    stderr_log,
)
from fuse.mount import mount_entry, raise_max_background

MiB = 1 << 20
SIZE = 1 << 30
REGION = 512 * MiB       # what every fio run works on (--size), and the memory FS's size
TESTS = [("seq write 1M", "write", "1m", 4), ("seq read 1M", "read", "1m", 4),
         ("rand write 4K", "randwrite", "4k", 16), ("rand read 4K", "randread", "4k", 16)]
BIN = Path(sys.executable).parent
NULL = "pyfuse3 null"      # the ceiling: pyfuse3 with no storage behind it
MEMORY = "pyfuse3 memory"  # beside it on the 4K rows: pyfuse3 serving a buffer's bytes


def fio(path: Path, test: str, rw: str, bs: str, depth: int, runtime: int,
        target: str, pid: int | None = None) -> float:
    """One fio run; MB/s (with ``pid``, the serving process's CPU per request beside it:
    benchmarks/common.py invariant 9)."""
    def run() -> tuple[float, int]:
        side = fio_side([f"--filename={path}", "--ioengine=libaio", "--direct=1"], rw, bs,
                        depth, f"{REGION // MiB}m", runtime, f"{test} on {target}")
        return float(side["bw_bytes"]) / 1e6, int(side["total_ios"])
    return per_op(pid, run)


def prefill(path: Path) -> None:
    subprocess.run(["fio", "--name=fill", f"--filename={path}", "--ioengine=libaio",
                    "--direct=1", "--rw=write", "--bs=1m", "--iodepth=4", f"--size={REGION}",
                    "--refill_buffers", "--end_fsync=1"], capture_output=True, check=True)


def precondition(path: Path) -> None:
    """Overwrite the region as the write row does: 1 MiB at depth 4, around it four times,
    fsync at the end."""
    subprocess.run(["fio", "--name=precondition", f"--filename={path}", "--ioengine=libaio",
                    "--direct=1", "--rw=write", "--bs=1m", "--iodepth=4",
                    f"--size={REGION}", f"--io_size={4 * REGION}", "--refill_buffers",
                    "--end_fsync=1"], capture_output=True, check=True)


def allocated(directory: Path) -> int:
    """Bytes of file system blocks the device files in ``directory`` hold."""
    return sum(p.stat().st_blocks * 512 for p in directory.glob("d*.img"))


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
                             "off", "--iscsi-listen", "off", "--fuse-mount", str(mnt),
                             "--log-level", "warning"],
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


def start_null(work: Path, memory: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    """The pyfuse3 null file system, or with ``memory`` its ``--memory`` mode holding
    REGION bytes (all fio touches)."""
    name = "memory" if memory else "null"
    mnt = work / name
    mnt.mkdir()
    extra = ["--memory", "--size", str(REGION)] if memory else []
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.nullfuse", *extra, str(mnt)],
                            stdout=subprocess.DEVNULL,
                            stderr=open(work / f"{name}.log", "ab"))  # noqa: SIM115
    _wait(lambda: _mounted(mnt), proc, f"the pyfuse3 {name} file system")
    entry = mount_entry(str(mnt))
    if entry is not None:      # the same kernel queue depth as storaged's mount
        raise_max_background(entry[1])
    return proc, mnt / "file"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_round_args(ap)
    ap.add_argument("--runtime", type=int, default=None, help="seconds per fio run (5)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--rows", default="", help="only rows whose name contains one of these "
                    "comma-separated words (e.g. '4K' or 'seq write')")
    ap.add_argument("--no-precondition", action="store_true",
                    help="measure the fresh pool (shows what preconditioning hides)")
    ap.add_argument("--volumes", default="plain,ec:4+2",
                    help="the volumes measured: plain, ec:4+2 or both (default)")
    args = ap.parse_args(argv)
    check_rounds(ap, args.rounds)
    words = [w.strip() for w in args.rows.split(",") if w.strip()]
    labels = [v.strip() for v in args.volumes.split(",") if v.strip()]
    if not labels or any(v not in ("plain", "ec:4+2") for v in labels):
        ap.error("--volumes takes plain, ec:4+2 or both, comma-separated")
    runtime = args.runtime or (1 if args.smoke else 5)
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is missing: install qemu-system-common (make bench-fuse)",
              file=sys.stderr)
        return 2
    tests = [TESTS[0], TESTS[3]] if args.smoke else TESTS
    if words:
        tests = [t for t in tests if any(w in t[0] for w in words)]
        if not tests:
            ap.error(f"--rows {args.rows!r} matches none of: "
                     f"{', '.join(t[0] for t in TESTS)}")
    work = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir=args.dir))
    procs: list[subprocess.Popen[bytes]] = []
    report = Report("fuse")
    try:
        sd, mnt, _sock = start_storaged(work)
        procs.append(sd)
        qsd, qsd_file = start_qsd(work)
        procs.append(qsd)
        null, null_file = start_null(work)
        procs.append(null)
        mem_files: list[Path] = []
        if any(bs == "4k" for _t, _rw, bs, _d in tests):
            memfs, mem_file = start_null(work, memory=True)
            procs.append(memfs)
            mem_files.append(mem_file)
        vols = [(label, mnt / "bench" / ("plain" if label == "plain" else "ec"))
                for label in ("plain", "ec:4+2")
                if label in labels and (label == "plain" or not args.smoke)]
        for path in (qsd_file, null_file, *mem_files, *(p for _, p in vols)):
            prefill(path)
        if not args.no_precondition and vols:
            def one_pass() -> None:
                for _label, path in vols:
                    precondition(path)
            settle("fuse", lambda: allocated(work), one_pass)

        def measure(path: Path, test: str, rw: str, bs: str, depth: int,
                    target: str, pid: int | None = None) -> Callable[[], float]:
            return lambda: fio(path, test, rw, bs, depth, runtime, target, pid)

        pairs = [Pair(f"{label} {test}",
                      anchor=measure(qsd_file, test, rw, bs, depth, "qsd qcow2", qsd.pid),
                      storaged=measure(path, test, rw, bs, depth, f"storaged {label}",
                                       sd.pid),
                      ceiling=measure(null_file, test, rw, bs, depth, NULL),
                      anchor_name="qsd qcow2", ceiling_name=NULL,
                      beside=tuple((MEMORY, measure(f, test, rw, bs, depth, MEMORY))
                                   for f in mem_files if bs == "4k"))
                 for label, path in vols for test, rw, bs, depth in tests]
        report.add(run_rounds("fuse", pairs, args.rounds, stderr_log,
                              extra=extra_rounds(args.smoke)))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for m in (work / "mnt", work / "qsd-export", work / "null", work / "memory"):
            if _mounted(m):
                subprocess.run(["fusermount3", "-u", "-z", str(m)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    report.write(args.results, f"fio (libaio, direct) on FUSE, {runtime} s per run; the "
                 f"anchor is qemu-storage-daemon's FUSE export of a qcow2 file, the ceiling "
                 f"'{NULL}', which answers every request at once with no storage behind it: "
                 "no pyfuse3 export can go faster here. On the 4K rows "
                 f"'{MEMORY}' ran beside them in the same rounds: the same file system "
                 f"serving a {REGION // MiB} MiB in-process buffer of random bytes (reads "
                 "answer a view of it at the offset, writes are copied into it), the "
                 "ceiling of an export that serves real data; the ceiling column gives its "
                 "median and its paired share of the null one, 'of ceiling' storaged's "
                 "paired share of each. Targets: at least 1.0x on the sequential rows, at "
                 "least 0.9 of the ceiling on the 4K rows.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
