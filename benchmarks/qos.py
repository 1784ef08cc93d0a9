"""benchmarks/qos: what per-volume QoS (volumes/qos.py, issue 25) costs and how well it
holds, as one table.

1. Cost with no limits set: the Volume entry points a frontend calls per request
   (``write_nowait``, ``read_sparse_nowait``, the awaited ``read_sparse`` of a buffered
   block) timed in-process on a RAM pool, in this tree and in a baseline tree without
   QoS (``git archive`` of ``--baseline``, default main), each in its own interpreter;
   then fio's nbd engine (4 KiB random reads and writes, iodepth 16) against an NBD
   server of each tree, so the per-request cost is seen next to a whole request's.
2. Limit accuracy: fio asks far more than a limit (500 IOPS; 8 MiB/s) of a volume served
   by this tree; the table gives what it got as a fraction of the limit.
3. Weights: two fio clients saturate a pool on one device that takes 3 ms per read;
   weights 100 and 300 (and 100 and 100 for comparison), the ratio of reads they got.

    .venv/bin/python -m benchmarks.qos [--quick] [--baseline REV] [--runtime SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a child interpreter with the tree to measure first on sys.path; prints JSON.
_MICRO = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import trio
    from pool import MemoryDevice, Pool
    from volumes import VolumeManager

    N = int(sys.argv[2])

    async def main():
        pool = await Pool.create("b", [MemoryDevice(64 << 20, path="b0")], profile="plain",
                                 extent_size=4 << 20)
        vol = await VolumeManager(pool).create("v", 8 << 20, block_size=4096)
        data = bytes(range(256)) * 16
        await vol.write(0, data)
        out = {}
        for _round in range(5):
            t = time.perf_counter()
            for _ in range(N):
                vol.write_nowait(0, data)
            w = (time.perf_counter() - t) / N
            t = time.perf_counter()
            for _ in range(N):
                vol.read_sparse_nowait(0, 4096)
            r = (time.perf_counter() - t) / N
            t = time.perf_counter()
            for _ in range(N // 4):
                await vol.read_sparse(0, 4096)
            a = (time.perf_counter() - t) / (N // 4)
            for k, v in (("write_nowait", w), ("read_sparse_nowait", r), ("read_sparse", a)):
                out[k] = min(out.get(k, 1.0), v)
        print(json.dumps(out))

    trio.run(main)
""")

# An NBD server of the tree in argv[1] on port argv[2]: volumes v (no limits), and for the
# weight rows a pool on one slow device with volumes a and b (weights argv[3], argv[4]).
_SERVER = textwrap.dedent("""
    import random, sys
    sys.path.insert(0, sys.argv[1])
    import trio
    from nbd.exports import VolumeCatalog
    from nbd.server import NBDConfig, NBDServer
    from pool import FileDevice, Pool
    from storaged.tuning import tune_process
    from volumes import VolumeManager

    async def main():
        tune_process()
        where = sys.argv[5]
        pool = await Pool.create("tank", [FileDevice(f"{where}/d0", create_size=1 << 30)],
                                 profile="plain", extent_size=4 << 20)
        vm = VolumeManager(pool)
        await vm.create("v", 256 << 20)
        managers = {"tank": vm}
        if sys.argv[3] != "0":
            from pool.faults import FaultyDevice
            from pool.tuning import PoolTuning
            dev = FaultyDevice(FileDevice(f"{where}/s0", create_size=256 << 20))
            slow = await Pool.create("slow", [dev], profile="plain", extent_size=4 << 20,
                                     tuning=PoolTuning(record_cache=0))
            svm = VolumeManager(slow)
            rng = random.Random(7)
            for name, w in (("a", sys.argv[3]), ("b", sys.argv[4])):
                vol = await svm.create(name, 16 << 20, compression=False)
                await vol.write(0, rng.randbytes(16 << 20))
                await vol.flush()
                await svm.set_qos(name, {"weight": int(w)})
            dev.read_delay = 0.003
            managers["slow"] = svm
        server = NBDServer(VolumeCatalog(managers),
                           NBDConfig(host="127.0.0.1", port=int(sys.argv[2])))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print("ready", flush=True)
            limits = {"iops": 500} if sys.argv[6] == "iops" else {"read_bps": 8 << 20}
            if sys.argv[6] != "none":
                await vm.set_qos("v", limits)

    trio.run(main)
""")


def _tree(baseline: str, where: Path) -> Path:
    """The baseline revision's tree, extracted under ``where``."""
    out = where / "baseline"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", baseline],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def micro(tree: Path, n: int) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", _MICRO, str(tree), str(n)], capture_output=True,
                       text=True, check=True, cwd=tree, env=_env())
    return dict(json.loads(r.stdout))


class Server:
    def __init__(self, tree: Path, where: Path, *, weights: tuple[int, int] = (0, 0),
                 limit: str = "none") -> None:
        from benchmarks.common import free_port  # noqa: PLC0415
        self.port = free_port()
        d = Path(tempfile.mkdtemp(dir=where))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(tree), str(self.port), str(weights[0]),
             str(weights[1]), str(d), limit], stdout=subprocess.PIPE, cwd=tree, env=_env())
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the benchmark's NBD server did not start")

    def url(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def fio(url: str, rw: str, bs: str, runtime: int) -> dict[str, float]:
    args = ["fio", "--name=q", "--ioengine=nbd", f"--uri={url}", f"--rw={rw}", f"--bs={bs}",
            "--iodepth=16", "--size=64m", "--time_based", f"--runtime={runtime}",
            "--output-format=json"]
    r = subprocess.run(args, capture_output=True, text=True, check=True,
                       timeout=runtime * 4 + 60)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"iops": side["iops"], "bps": side["bw_bytes"], "ios": side["total_ios"]}


def weight_ratio(tree: Path, where: Path, weights: tuple[int, int], runtime: int) -> float:
    srv = Server(tree, where, weights=weights)
    try:
        got: dict[str, float] = {}
        procs = {n: subprocess.Popen(
            ["fio", "--name=w", "--ioengine=nbd", f"--uri={srv.url(f'slow/{n}')}",
             "--rw=randread", "--bs=4k", "--iodepth=16", "--size=16m", "--time_based",
             "--ramp_time=1", f"--runtime={runtime}", "--output-format=json"],
            stdout=subprocess.PIPE,
            text=True) for n in ("a", "b")}
        for n, p in procs.items():
            out, _ = p.communicate(timeout=runtime * 4 + 60)
            got[n] = json.loads(out[out.index("{"):])["jobs"][0]["read"]["total_ios"]
        return got["b"] / got["a"]
    finally:
        srv.close()


def added_cost() -> dict[str, float]:
    """Seconds per request of the code QoS adds when nothing limits a volume: the test
    on the nowait paths, and the dispatcher slot (the inline test + release) an awaited
    request takes. Timed alone (timeit, best of 7), as the machine's noise swamps them
    in whole requests."""
    import timeit  # noqa: PLC0415

    from volumes.qos import WeightedDispatcher  # noqa: PLC0415

    class Vol:
        weight = 100
        finish_tag = 0.0
        _throttles = ()
        dispatcher = WeightedDispatcher()
    env = {"v": Vol(), "d": Vol.dispatcher}
    n = 1_000_000
    empty = min(timeit.repeat("pass", globals=env, number=n, repeat=7)) / n
    return {what: min(timeit.repeat(stmt, globals=env, number=n, repeat=7)) / n - empty
            for what, stmt in (("nowait check", "v._throttles or v.dispatcher.queue"),
                               ("slot", "if d.queue or d.in_service >= d.depth: pass\n"
                                        "else: d.in_service += 1\nd.release()"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations, 3 s runs")
    ap.add_argument("--baseline", default="main", help="revision without QoS (main)")
    ap.add_argument("--runtime", type=int, default=None, help="seconds per fio run")
    args = ap.parse_args()
    runtime = args.runtime or (3 if args.quick else 10)
    n = 20_000 if args.quick else 200_000
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-qos-") as tmp:
        where = Path(tmp)
        base = _tree(args.baseline, where)
        # Alternate the trees, and keep each figure's best (the machine's noise only adds).
        here: dict[str, float] = {}
        before: dict[str, float] = {}
        for _ in range(3):
            for into, tree in ((before, base), (here, ROOT)):
                for k, v in micro(tree, n).items():
                    into[k] = min(into.get(k, 1.0), v)
        for k in ("write_nowait", "read_sparse_nowait", "read_sparse"):
            rows.append((f"entry {k} (no limits)", f"{before[k] * 1e9:.0f} ns",
                         f"{here[k] * 1e9:.0f} ns",
                         f"{(here[k] - before[k]) * 1e9:+.0f} ns"))
        for what, t in added_cost().items():
            rows.append((f"added per request: {what}", "0 ns", f"{t * 1e9:.0f} ns",
                         f"{t * 1e9:+.0f} ns"))
        for rw in ("randread", "randwrite"):
            got = {}
            for label, tree in (("base", base), ("qos", ROOT)):
                srv = Server(tree, where)
                try:
                    got[label] = fio(srv.url("tank/v"), rw, "4k", runtime)["iops"]
                finally:
                    srv.close()
            rows.append((f"fio {rw} 4K iodepth 16 (no limits)", f"{got['base']:.0f} IOPS",
                         f"{got['qos']:.0f} IOPS",
                         f"{100 * (got['qos'] / got['base'] - 1):+.1f}%"))
        for limit, rw, bs, want, unit in (("iops", "randread", "4k", 500, "iops"),
                                          ("bps", "randread", "64k", 8 << 20, "bps")):
            srv = Server(ROOT, where, limit=limit)
            try:
                got_v = fio(srv.url("tank/v"), rw, bs, runtime)[unit]
            finally:
                srv.close()
            shown = f"{want}" if unit == "iops" else f"{want >> 20} MiB/s"
            rows.append((f"limit {limit} {shown}, fio asks more", "-",
                         f"{got_v:.0f}" if unit == "iops" else f"{got_v / (1 << 20):.2f} MiB/s",
                         f"{100 * got_v / want:.1f}% of limit"))
        for weights in ((100, 100), (100, 300)):
            ratio = weight_ratio(ROOT, where, weights, runtime)
            rows.append((f"weights {weights[0]}:{weights[1]}, slow device saturated", "-",
                         f"1:{ratio:.2f}", "want ~1:1" if weights == (100, 100) else
                         "want 1:2..1:4"))
    headers = ("row", f"baseline ({args.baseline})", "this tree", "difference")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
