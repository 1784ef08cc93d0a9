"""benchmarks/radoscpu: where the CPU of ``make bench-rados``'s seq read 1M row goes.

On a loaded 2-core machine the rate of that row is bounded by the CPU seconds every
process spends per GiB delivered, and CPU time is disturbed by load far less than MB/s.
This runs the row's fio (1 MiB sequential reads at QD4 over 512 MiB, no ramp) against
three sides in interleaved rounds, on one throwaway Ceph cluster (one bluestore OSD):

- ``rbd``: fio's rbd engine on an RBD image (librbd runs inside fio);
- ``rados``: fio over NBD against a storaged volume on a RADOS pool (as benchmarks.rbd);
- ``rados-unix``: the same server and volume, over its NBD Unix socket (``nbd.socket``);
- ``local``: fio over NBD against a storaged volume on a pool of one local file, page
  cached: what the NBD leg alone costs (the ceiling of the rados side).

Per run it reads the user + system CPU of each process from /proc before and after
(ceph-osd; the serving storaged, also per thread: event loop, librados threads, worker
threads) and fio's own from ``wait4`` (its children and threads included), and prints
CPU seconds per GiB delivered beside MB/s; then the median per side.

    .venv/bin/python -m benchmarks.radoscpu [--rounds N] [--runtime S] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from benchmarks.common import free_port, wait_port
from benchmarks.rbd import _prefill, rbd_image, serve_plain
from pool import Pool
from pool.device import FileDevice
from storaged.tuning import tune_process
from tests.kit.cephkit import Cluster, why_not

GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: str) -> tuple[str, float]:
    """(comm, user + system seconds) of /proc/.../stat at ``path``."""
    with open(path) as f:
        text = f.read()
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, (int(fields[11]) + int(fields[12])) / TICK


def _group(comm: str) -> str:
    """A thread's group by its name: librados' messenger and other Ceph threads, trio's
    worker threads, the pool's reader threads, or the main thread (the event loop)."""
    if comm.startswith("msgr-worker"):
        return "librados msgr"
    if comm.startswith("Trio thread") or comm.startswith("trio"):
        return "trio workers"
    if comm.startswith("storaged-"):
        return "pool threads"
    if comm == "python" or comm.startswith("python"):
        return "main (event loop)"
    if re.match(r"^[a-z_]+", comm):
        return "other ceph threads"
    return "other"


def _threads(pid: int) -> Counter[str]:
    """CPU clock ticks per thread group of process ``pid``."""
    out: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, sec = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        out[_group(comm) if int(tid) != pid else "main (event loop)"] += int(sec * TICK)
    return out


def _fio(target: list[str], env: dict[str, str] | None, runtime: int
         ) -> tuple[float, float, float]:
    """One fio run: (bytes read, seconds, fio's CPU seconds)."""
    args = ["fio", "--name=bench", *target, "--rw=read", "--bs=1m", "--iodepth=4",
            "--size=512m", "--time_based", f"--runtime={runtime}", "--output-format=json"]
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _pid, status, ru = os.wait4(p.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if code != 0:
        raise RuntimeError(f"fio on {target} failed")
    job = json.loads(text[text.index("{"):])["jobs"][0]["read"]
    return float(job["io_bytes"]), float(job["runtime"]) / 1000, ru.ru_utime + ru.ru_stime


def serve_local(directory: str, port: int) -> None:
    """A pool of one local file (page cached after the prefill), one plain volume."""
    async def main() -> None:
        dev = FileDevice(os.path.join(directory, "dev0"), create_size=3 * GiB)
        pool = await Pool.create("local", [dev], profile="plain", extent_size=16 << 20,
                                 force=True)
        await serve_plain(pool, port)
    tune_process()
    trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.radoscpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--sides", default="rbd,rados,rados-unix,local")
    ap.add_argument("--old-tree", default=None, metavar="PATH",
                    help="also the side 'rados-old': the storaged of the source tree at "
                         "PATH (e.g. `git archive BASE | tar -x -C PATH`), in the same "
                         "rounds: old code against new, paired")
    ap.add_argument("--serve-local", nargs=2, metavar=("DIR", "PORT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_local:
        serve_local(args.serve_local[0], int(args.serve_local[1]))
        return
    reason = why_not()
    if reason is not None:
        raise SystemExit(f"benchmarks.radoscpu: {reason}")
    work = Path(tempfile.mkdtemp(prefix="storaged-radoscpu-", dir=args.dir))
    procs: list[subprocess.Popen[bytes]] = []
    cluster = Cluster.start(work / "ceph", block_size=16 << 30)
    try:
        env = {**os.environ, "CEPH_CONF": str(cluster.conf)}
        rbd = rbd_image(cluster)
        osds = [int(p.read_text()) for p in (work / "ceph" / "run").glob("osd.*.pid")]
        sides: dict[str, tuple[list[str], dict[str, str] | None, int | None]] = {
            "rbd": (rbd, env, None)}
        servers = [("rados", ["benchmarks.rbd", "--pool-name", "bench-new", "--serve",
                              str(cluster.conf)], None),
                   ("local", ["benchmarks.radoscpu", "--serve-local"], None)]
        if args.old_tree:
            servers.append(("rados-old", ["benchmarks.rbd", "--serve", str(cluster.conf)],
                            args.old_tree))
            args.sides += ",rados-old"
        for name, cmd, tree in servers:
            if name not in args.sides.split(","):
                continue
            d = work / name
            d.mkdir()
            port = free_port()
            penv = None if tree is None else {**os.environ, "PYTHONPATH": tree}
            p = subprocess.Popen([sys.executable, "-m", *cmd, str(d), str(port)],
                                 stdout=subprocess.DEVNULL, env=penv, cwd=tree,
                                 stderr=open(work / f"{name}.log", "ab"))  # noqa: SIM115
            procs.append(p)
            wait_port(port, p, name)
            sides[name] = (["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/bench/plain"],
                           None, p.pid)
            if name == "rados":     # the same server, on its Unix socket (nbd.socket)
                sides["rados-unix"] = (
                    ["--ioengine=nbd", f"--uri=nbd+unix:///bench/plain?socket={d}/nbd.sock"],
                    None, p.pid)
        sides = {k: v for k, v in sides.items() if k in args.sides.split(",")}
        for target, e, _pid in sides.values():
            _prefill(target, e)
        rows: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
            for name in order:
                target, e, pid = sides[name]
                osd0 = sum(_stat_cpu(f"/proc/{p}/stat")[1] for p in osds)
                th0 = _threads(pid) if pid else Counter()
                nbytes, secs, fio_cpu = _fio(target, e, args.runtime)
                osd1 = sum(_stat_cpu(f"/proc/{p}/stat")[1] for p in osds)
                th1 = _threads(pid) if pid else Counter()
                gib = nbytes / GiB
                row = {"MB/s": nbytes / secs / 1e6, "osd": (osd1 - osd0) / gib,
                       "fio": fio_cpu / gib}
                th = {g: s / TICK for g, s in (th1 - th0).items()}
                if pid:
                    row["storaged"] = sum(th.values()) / gib
                    for g, s in th.items():
                        row[f"  {g}"] = s / gib
                row["total"] = row["osd"] + row["fio"] + row.get("storaged", 0.0)
                rows[name].append(row)
                print(f"round {rnd + 1} {name}: " + ", ".join(
                    f"{k.strip()} {v:.2f}" for k, v in row.items()), flush=True)
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(f"\nmedians (CPU seconds per GiB delivered; load {' '.join(load)}):")
        for name, rs in rows.items():
            keys = sorted({k for r in rs for k in r}, key=lambda k: (k.startswith(" "), k))
            print(f"{name}:")
            for k in keys:
                print(f"  {k:24} {statistics.median(r.get(k, 0.0) for r in rs):8.2f}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
        time.sleep(0)


if __name__ == "__main__":
    main()
