"""What the benchmarks share: a result row, a free port, waiting for a server to listen, and
the round runner that makes a ratio mean something on a machine whose speed changes.

The round runner (issue 27). A benchmark hands it rows (:class:`Pair`): per row, three
callables that each run one measurement and return one figure -- the anchor (the program
storaged is compared with), storaged, and optionally the ceiling (what no export here can
beat: the disk floor, a codec's rate, the pyfuse3 null file system). :func:`run_rounds`
runs each row in rounds, and its invariants are what the table's numbers rest on:

1. Every row runs at least :data:`MIN_ROUNDS` rounds, and each round measures all of the
   row's sides back to back, so the anchor, storaged, the ceiling and the measurements
   beside them (7) of one round share the machine's conditions.
2. The order alternates: even rounds run anchor, storaged, ceiling, then the beside
   measurements in their order; odd rounds the reverse (the beside ones last first,
   ceiling, storaged, anchor). Neither side always goes first (warm caches, a slowing
   machine): AB, BA, AB, ...
3. A ratio is only ever taken within one round (storaged over the anchor of the same
   round, "paired"); the row reports the median of those paired ratios and their spread
   (min and max, and the interquartile range), never a ratio of medians taken at other
   times.
4. A ratio above 1 always means storaged is better: for a figure where lower is better
   (latency) the pair is inverted (anchor / storaged).
5. The anchor's own spread (max / min of its rounds) above :data:`NOISY_SPREAD` marks the
   row "noisy": the machine changed speed while it ran, and its ratio is weaker evidence.
6. One run may give several figures (:class:`Figures`: a latency run's p50 and p99). They
   become one row each, and every row keeps invariants 1-5: the figures of one round come
   from the same runs, so they share that round's conditions and order.
7. A row may carry measurements *beside* its sides (``beside``: named callables, e.g. a
   second ceiling that bounds what the first leaves out): more sides of the same rounds,
   run with the others (1) in the alternating order (2). Each is summarised by its name,
   its median, storaged's median paired ratio to it (3, 4) and its own median paired
   ratio to the ceiling when the row has one (a share of the ceiling, the same round's);
   they do not make a row noisy (5 is the anchor's). A row without them runs, pairs and
   prints exactly as before.
8. A row that is noisy (5) after its rounds runs :data:`NOISY_EXTRA` more (the runners'
   ``extra``), once, in the same alternating order (2), so that its median rests on more
   pairs taken while the machine was changing speed; it stays marked noisy, and its
   round count says how many it ran. A steady row runs exactly the rounds asked for.
9. A side may give its figure as a :class:`Sample`: the figure with the CPU time its
   server spent per operation in that same run (all of the serving process's threads,
   user and system). When the anchor and storaged both do in every round, the row also
   reports each one's median CPU per operation and their median paired ratio (anchor
   over storaged, within one round as in 3: above 1 storaged spent less): what each
   operation costs, which moves with the machine's phases far less than a rate does and
   tells a server that is slower per operation from one that uses fewer cores. It takes
   no part in the row's ratio (3) or noisiness (5). A sample may also say how many cores
   its server kept busy over the run (its CPU seconds over the run's wall seconds); the
   row then reports each side's median of those too, in the same cell: a server pinned at
   one core while the anchor uses more is bound by its one loop, not by its cost per
   operation.

:class:`Report` collects the rows of one benchmark with the machine's facts (cores, load
average at start and end, kernel) and writes them as one markdown table and one JSON file
under benchmarks/results/ (not committed); ``python -m benchmarks.all`` (``make bench``)
merges every benchmark's JSON into one table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

MIN_ROUNDS = 3
NOISY_SPREAD = 1.3        # the anchor's max/min over the rounds above this: "noisy"
NOISY_EXTRA = 2           # rounds more for a row that is noisy after its rounds (8)
RESULTS = Path(__file__).parent / "results"
FIELDS = ("benchmark", "row", "unit", "anchor", "ceiling", "storaged_median",
          "anchor_median", "ratio_median", "ratio_min", "ratio_max", "ratio_iqr",
          "ceiling_median", "ceiling_ratio_median", "anchor_spread", "noisy", "rounds",
          "higher_is_better", "machine",
          "order", "storaged_rounds", "anchor_rounds", "ceiling_rounds", "beside", "cpu")
# One entry of a row's "beside" list (invariant 7); JSON written before it has no "beside".
BESIDE_FIELDS = ("name", "median", "ratio_median", "ceiling_ratio_median", "rounds")
# A row's "cpu" (invariant 9), when not null; JSON written before it has no "cpu".
CPU_FIELDS = ("storaged_median", "anchor_median", "ratio_median", "ratio_min", "ratio_max",
              "storaged_rounds", "anchor_rounds")


@dataclass
class Result:
    target: str
    test: str
    mbps: float
    iops: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str,
              timeout: float = 60) -> None:
    """Return once something listens on ``port``; raise if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port}")


# -- serving processes --------------------------------------------------------------------

async def serve_until_signal(*tasks: Callable[..., Awaitable[object]]) -> None:
    """Start each of ``tasks`` (``nursery.start``: they report when they serve) and run
    until SIGTERM or SIGINT, then cancel them: the ``--serve`` side of a benchmark."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                await nursery.start(task)
            async for _sig in signals:
                nursery.cancel_scope.cancel()
                break


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_meter(pid: int | None) -> Callable[[float, int], float]:
    """Start counting process ``pid``'s CPU time; the function returned gives a figure of
    the run since then as a :class:`Sample` with that CPU per operation (``ops`` of them:
    invariant 9) and the cores it kept busy meanwhile, or the figure as it is without a
    ``pid`` or operations."""
    before = cpu_seconds(pid) if pid is not None else 0.0
    started = time.perf_counter()

    def sample(figure: float, ops: int) -> float:
        if pid is None or ops <= 0:
            return figure
        used = cpu_seconds(pid) - before
        wall = time.perf_counter() - started
        return Sample(figure, used / ops, used / wall if wall > 0 else None)
    return sample


def per_op(pid: int | None, run: Callable[[], tuple[float, int]]) -> float:
    """``run()`` gives (a figure, how many operations it counted); with ``pid``, the figure
    as a :class:`Sample` with that process's CPU per operation over the whole run
    (invariant 9), else the figure."""
    sample = cpu_meter(pid)
    return sample(*run())


# -- fio ------------------------------------------------------------------------------------

def fio_side(target: list[str], rw: str, bs: str, depth: int, size: str, runtime: int,
             what: str, extra: Sequence[str] = (), env: dict[str, str] | None = None,
             slack: float = 120) -> dict[str, Any]:
    """One time-based fio run on ``target`` (its engine and file arguments): the job's
    read or write section of fio's JSON. Writes end with an fsync, so what is measured is
    durable. ``what`` names the run in the error a failed run raises."""
    args = ["fio", "--name=bench", *target, f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--size={size}", "--time_based", f"--runtime={runtime}",
            f"--ramp_time={1 if runtime > 2 else 0}", "--output-format=json",
            "--refill_buffers", *extra]
    if "write" in rw:
        args.append("--end_fsync=1")
    r = subprocess.run(args, capture_output=True, text=True, check=False, env=env,
                       timeout=runtime * 6 + slack)
    if r.returncode != 0:
        raise RuntimeError(f"fio {rw} {bs} on {what} failed: {r.stderr.strip()[-500:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side: dict[str, Any] = job["write"] if "write" in rw else job["read"]
    if "write" in rw:
        # fio's runtime (which its rate divides by) includes the final fsync: say how
        # much of the run it was, so that a slow flush is told apart from slow writes.
        flush = side["runtime"] / 1e3 - runtime
        stderr_log(f"    fio {rw} {bs} on {what}: the final fsync took about {flush:.2f} s "
                   f"of {side['runtime'] / 1e3:.2f}")
    return side


# -- the round runner ---------------------------------------------------------------------

class Sample(float):
    """A side's figure with its server's CPU seconds per operation in the run that gave
    it (invariant 9); a float everywhere else."""

    __slots__ = ("cores", "cpu")
    cpu: float
    cores: float | None          # the server's CPU seconds over the run's wall seconds

    def __new__(cls, value: float, cpu: float, cores: float | None = None) -> Sample:
        sample = super().__new__(cls, value)
        sample.cpu = cpu
        sample.cores = cores
        return sample


Measure = Callable[[], float]


@dataclass(frozen=True)
class Pair:
    """One row: the callables each return one figure in ``unit`` for one round."""
    row: str
    anchor: Measure
    storaged: Measure
    ceiling: Measure | None = None
    unit: str = "MB/s"
    anchor_name: str = "anchor"
    ceiling_name: str = ""
    higher_is_better: bool = True
    beside: tuple[tuple[str, Measure], ...] = ()    # invariant 7: (name, measure) each


FigureMeasure = Callable[[], Sequence[float]]


@dataclass(frozen=True)
class Figures:
    """Rows that one run measures together (invariant 6): each callable returns one value
    per name in ``figures``, in that order; row ``i`` is named ``f"{row} {figures[i]}"``."""
    row: str
    figures: tuple[str, ...]
    anchor: FigureMeasure
    storaged: FigureMeasure
    ceiling: FigureMeasure | None = None
    unit: str = "MB/s"
    anchor_name: str = "anchor"
    ceiling_name: str = ""
    higher_is_better: bool = True
    beside: tuple[tuple[str, FigureMeasure], ...] = ()   # invariant 7


def beside_tag(name: str) -> str:
    """How a beside measurement appears in a row's ``order``."""
    return f"B:{name}"


def _check_beside(row: str, names: Sequence[str]) -> None:
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"{row}: beside measurements need distinct, non-empty names")


@dataclass
class RowResult:
    benchmark: str
    row: str
    unit: str
    anchor: str
    ceiling: str
    higher_is_better: bool
    order: list[str] = field(default_factory=list)   # who ran when, as "A", "S", "C"
    storaged_rounds: list[float] = field(default_factory=list)
    anchor_rounds: list[float] = field(default_factory=list)
    ceiling_rounds: list[float] = field(default_factory=list)
    beside_rounds: dict[str, list[float]] = field(default_factory=dict)   # invariant 7
    # Invariant 9: per side tag ("A", "S", ...), each round's CPU seconds per operation
    # (None where that round's figure was a plain float).
    cpu_rounds: dict[str, list[float | None]] = field(default_factory=dict)
    # ... and the cores its server kept busy in that round (None where not measured).
    cores_rounds: dict[str, list[float | None]] = field(default_factory=dict)

    def record(self, tag: str, out: list[float], value: float) -> None:
        """One side's figure of one round (and its CPU per operation and cores busy:
        invariant 9)."""
        self.order.append(tag)
        out.append(float(value))
        sample = value if isinstance(value, Sample) else None
        # (``is not None``: a Sample is a float, and a figure of 0 is false)
        self.cpu_rounds.setdefault(tag, []).append(
            sample.cpu if sample is not None else None)
        self.cores_rounds.setdefault(tag, []).append(
            sample.cores if sample is not None else None)

    def cpu_summary(self) -> dict[str, Any] | None:
        """Invariant 9: each side's median CPU per operation and their median paired
        ratio (anchor over storaged), or None unless both reported it in every round."""
        ours, theirs = self.cpu_rounds.get("S", []), self.cpu_rounds.get("A", [])
        if not ours or not theirs or None in ours or None in theirs:
            return None
        s = [float(x) for x in ours if x is not None]
        a = [float(x) for x in theirs if x is not None]
        r = [x / y if y else float("inf") for x, y in zip(a, s, strict=True)]
        out: dict[str, Any] = {
            "storaged_median": statistics.median(s), "anchor_median": statistics.median(a),
            "ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r),
            "storaged_rounds": s, "anchor_rounds": a}
        cores_s, cores_a = self.cores_rounds.get("S", []), self.cores_rounds.get("A", [])
        if cores_s and cores_a and None not in cores_s and None not in cores_a:
            out["storaged_cores"] = statistics.median(float(x) for x in cores_s if x is not None)
            out["anchor_cores"] = statistics.median(float(x) for x in cores_a if x is not None)
        return out

    def _better(self, ours: float, theirs: float) -> float:
        """Invariant 4: above 1 means storaged is better."""
        if self.higher_is_better:
            return ours / theirs if theirs else float("inf")
        return theirs / ours if ours else float("inf")

    @property
    def rounds(self) -> int:
        return len(self.storaged_rounds)

    @property
    def ratios(self) -> list[float]:
        """Invariant 3: storaged against the anchor of the same round."""
        return [self._better(s, a) for s, a in zip(self.storaged_rounds, self.anchor_rounds,
                                                   strict=True)]

    @property
    def ceiling_ratios(self) -> list[float]:
        return [self._better(s, c) for s, c in zip(self.storaged_rounds, self.ceiling_rounds,
                                                   strict=False)]

    def beside_ratios(self, name: str) -> list[float]:
        """Invariants 3, 4 and 7: storaged against the beside measurement of the same
        round."""
        return [self._better(s, b) for s, b in zip(self.storaged_rounds,
                                                   self.beside_rounds[name], strict=True)]

    def beside_ceiling_ratios(self, name: str) -> list[float]:
        """Invariant 7: the beside measurement as a share of the same round's ceiling."""
        return [self._better(b, c) for b, c in zip(self.beside_rounds[name],
                                                   self.ceiling_rounds, strict=False)]

    @property
    def anchor_spread(self) -> float:
        lo, hi = min(self.anchor_rounds), max(self.anchor_rounds)
        return hi / lo if lo > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        """Invariant 5."""
        return self.anchor_spread > NOISY_SPREAD

    def summary(self) -> dict[str, Any]:
        r = self.ratios
        q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
        cr = self.ceiling_ratios
        return {
            "benchmark": self.benchmark, "row": self.row, "unit": self.unit,
            "anchor": self.anchor, "ceiling": self.ceiling or None,
            "storaged_median": statistics.median(self.storaged_rounds),
            "anchor_median": statistics.median(self.anchor_rounds),
            "ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r),
            "ratio_iqr": q[2] - q[0],
            "ceiling_median": (statistics.median(self.ceiling_rounds)
                               if self.ceiling_rounds else None),
            "ceiling_ratio_median": statistics.median(cr) if cr else None,
            "anchor_spread": self.anchor_spread, "noisy": self.noisy, "rounds": self.rounds,
            "higher_is_better": self.higher_is_better, "order": self.order,
            "storaged_rounds": self.storaged_rounds, "anchor_rounds": self.anchor_rounds,
            "ceiling_rounds": self.ceiling_rounds,
            "beside": [self._beside_summary(name) for name in self.beside_rounds],
            "cpu": self.cpu_summary(),
        }

    def _beside_summary(self, name: str) -> dict[str, Any]:
        rounds = self.beside_rounds[name]
        cr = self.beside_ceiling_ratios(name)
        return {"name": name, "median": statistics.median(rounds),
                "ratio_median": statistics.median(self.beside_ratios(name)),
                "ceiling_ratio_median": statistics.median(cr) if cr else None,
                "rounds": rounds}


def _round_numbers(rounds: int, extra: int, noisy: Callable[[], bool]) -> Iterator[int]:
    """The round numbers of a row (invariant 8): ``rounds`` of them, then ``extra`` more,
    once, if ``noisy()`` says so after the last (asked lazily, once that round has run)."""
    yield from range(rounds)
    if extra and noisy():
        yield from range(rounds, rounds + extra)


def run_pair(benchmark: str, pair: Pair, rounds: int,
             log: Callable[[str], None] | None = None, *,
             extra: int = NOISY_EXTRA) -> RowResult:
    """Run one row for ``rounds`` rounds, alternating the order (invariants 1, 2 and 7),
    and ``extra`` more if it is noisy after them (invariant 8)."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"a row needs at least {MIN_ROUNDS} rounds, not {rounds}")
    _check_beside(pair.row, [name for name, _m in pair.beside])
    res = RowResult(benchmark, pair.row, pair.unit, pair.anchor_name, pair.ceiling_name,
                    pair.higher_is_better)
    sides: list[tuple[str, Measure, list[float]]] = [
        ("A", pair.anchor, res.anchor_rounds), ("S", pair.storaged, res.storaged_rounds)]
    if pair.ceiling is not None:
        sides.append(("C", pair.ceiling, res.ceiling_rounds))
    for name, measure in pair.beside:
        sides.append((beside_tag(name), measure, res.beside_rounds.setdefault(name, [])))
    for i in _round_numbers(rounds, extra, lambda: res.noisy):
        for tag, measure, out in (sides if i % 2 == 0 else sides[::-1]):
            res.record(tag, out, measure())
        if log is not None:
            shown = res.ceiling_rounds if res.beside_rounds else []   # beside it, the ceiling
            log(f"  {benchmark} | {pair.row} | round {i + 1}: storaged "
                f"{res.storaged_rounds[-1]:.1f} anchor {res.anchor_rounds[-1]:.1f}"
                + (f" ceiling {shown[-1]:.1f}" if shown else "")
                + "".join(f" {name} {v[-1]:.1f}" for name, v in res.beside_rounds.items())
                + f" {pair.unit}")
    return res


def run_figures(benchmark: str, group: Figures, rounds: int,
                log: Callable[[str], None] | None = None, *,
                extra: int = NOISY_EXTRA) -> list[RowResult]:
    """One row per figure, all from the same runs (invariant 6), alternating the order
    (invariants 1, 2 and 7), and ``extra`` rounds more if any of them is noisy after
    them (invariant 8)."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"a row needs at least {MIN_ROUNDS} rounds, not {rounds}")
    _check_beside(group.row, [name for name, _m in group.beside])
    n = len(group.figures)
    res = [RowResult(benchmark, f"{group.row} {f}", group.unit, group.anchor_name,
                     group.ceiling_name, group.higher_is_better) for f in group.figures]
    # Each side: its tag and measure, and the list of each row its figures go to.
    sides: list[tuple[str, FigureMeasure, list[list[float]]]] = [
        ("A", group.anchor, [r.anchor_rounds for r in res]),
        ("S", group.storaged, [r.storaged_rounds for r in res])]
    if group.ceiling is not None:
        sides.append(("C", group.ceiling, [r.ceiling_rounds for r in res]))
    for name, fmeasure in group.beside:
        sides.append((beside_tag(name), fmeasure,
                      [r.beside_rounds.setdefault(name, []) for r in res]))
    for i in _round_numbers(rounds, extra, lambda: any(r.noisy for r in res)):
        for tag, measure, outs in (sides if i % 2 == 0 else sides[::-1]):
            values = list(measure())
            if len(values) != n:
                raise ValueError(f"{group.row}: {tag} gave {len(values)} figures, not {n}")
            for r, out, v in zip(res, outs, values, strict=True):
                r.record(tag, out, v)
        if log is not None:
            log(f"  {benchmark} | {group.row} | round {i + 1}: "
                + ", ".join(f"{f} storaged {r.storaged_rounds[-1]:.1f} anchor "
                            f"{r.anchor_rounds[-1]:.1f}" for f, r in zip(group.figures, res,
                                                                         strict=True))
                + f" {group.unit}")
    return res


def run_rounds(benchmark: str, pairs: Sequence[Pair | Figures], rounds: int = MIN_ROUNDS,
               log: Callable[[str], None] | None = None, *,
               extra: int = NOISY_EXTRA) -> list[RowResult]:
    """Every row in turn, each in its own interleaved rounds (``extra``: invariant 8)."""
    out: list[RowResult] = []
    for p in pairs:
        if isinstance(p, Figures):
            out += run_figures(benchmark, p, rounds, log, extra=extra)
        else:
            out.append(run_pair(benchmark, p, rounds, log, extra=extra))
    return out


PRECONDITION_PASSES = 5  # preconditioning passes at most
SETTLED = 64 << 20       # a pass that grows the pool by no more than this: steady state


def settle(label: str, allocated: Callable[[], int],
           precondition: Callable[[], None]) -> None:
    """Precondition storaged's volumes (``precondition``: one pass over all of them),
    pass after pass, until a pass no longer grows the pool's files (``allocated``: their
    bytes) by more than SETTLED: the pool has reached its steady state."""
    for n in range(1, PRECONDITION_PASSES + 1):
        before = allocated()
        precondition()
        grown = allocated() - before
        stderr_log(f"  {label} | precondition pass {n}: the pool grew {grown >> 20} MiB")
        if grown <= SETTLED:
            return
    stderr_log(f"  {label} | the pool still grew after {PRECONDITION_PASSES} passes")


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def machine_facts() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": list(os.getloadavg()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ceiling_cells(r: dict[str, Any]) -> tuple[str, str]:
    """The ceiling and "of ceiling" cells: the ceiling's median and storaged's share of
    it, then each beside measurement's (invariant 7) after a ``;``: its median with its
    own share of the ceiling, and storaged's share of it. Rows from JSON written before
    beside measurements existed have none."""
    ceiling = (f"{_fmt(r['ceiling_median'])} ({r['ceiling']})"
               if r["ceiling_median"] is not None else "-")
    of_ceiling = (f"{r['ceiling_ratio_median']:.2f}x"
                  if r["ceiling_ratio_median"] is not None else "-")
    for b in r.get("beside") or []:
        share = (f", {b['ceiling_ratio_median']:.2f} of the ceiling"
                 if b["ceiling_ratio_median"] is not None else "")
        ceiling += f"; {_fmt(b['median'])} ({b['name']}{share})"
        of_ceiling += f"; {b['ratio_median']:.2f}x of {b['name']}"
    return ceiling, of_ceiling


def _cpu_cell(r: dict[str, Any]) -> str:
    """Invariant 9's cell: storaged's and the anchor's median CPU per operation and their
    median paired ratio with its spread; "-" for a row without them (and older JSON)."""
    c = r.get("cpu")
    if not c:
        return "-"
    cell = (f"{_fmt(c['storaged_median'] * 1e6)} / {_fmt(c['anchor_median'] * 1e6)} us, "
            f"{c['ratio_median']:.2f}x ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})")
    if c.get("storaged_cores") is not None and c.get("anchor_cores") is not None:
        cell += f"; cores {c['storaged_cores']:.2f} / {c['anchor_cores']:.2f}"
    return cell


CPU_NOTE = ("server CPU per op = the median CPU time (user + system, all threads) that "
            "storaged's server and the anchor's spent per operation in their runs, and the "
            "median of their per-round ratios (anchor / storaged: above 1, storaged spends "
            "less) with its spread; it follows the machine's phases less than a rate does. "
            "cores = the median of each server's CPU seconds over its runs' wall seconds "
            "(storaged / anchor): how many of the machine's cores it kept busy.")


def cpu_note(rows: Sequence[dict[str, Any]]) -> str:
    """CPU_NOTE if some row has invariant 9's figures, else nothing."""
    return CPU_NOTE if any(r.get("cpu") for r in rows) else ""


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One table over any benchmarks' row summaries; with a column of CPU per operation
    (invariant 9) when some row has it."""
    cpu = any(r.get("cpu") for r in rows)
    lines = ["| benchmark | row | unit | storaged | anchor | ratio (median) | spread min-max "
             "(IQR) | ceiling | of ceiling | rounds | noisy |"
             + (" server CPU per op, storaged / anchor (paired) |" if cpu else ""),
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---|" + ("---|" if cpu else "")]
    for r in rows:
        ceiling, of_ceiling = _ceiling_cells(r)
        noisy = f"noisy ({r['anchor_spread']:.2f})" if r["noisy"] else ""
        lines.append(
            f"| {r['benchmark']} | {r['row']} | {r['unit']} | {_fmt(r['storaged_median'])} "
            f"| {_fmt(r['anchor_median'])} ({r['anchor']}) | {r['ratio_median']:.2f}x "
            f"| {r['ratio_min']:.2f}-{r['ratio_max']:.2f} ({r['ratio_iqr']:.2f}) "
            f"| {ceiling} | {of_ceiling} | {r['rounds']} | {noisy} |"
            + (f" {_cpu_cell(r)} |" if cpu else ""))
    return "\n".join(lines)


def facts_line(start: dict[str, Any], end: dict[str, Any]) -> str:
    la0 = "/".join(f"{x:.2f}" for x in start["loadavg"])
    la1 = "/".join(f"{x:.2f}" for x in end["loadavg"])
    return (f"{start['cores']} cores, kernel {start['kernel']}, load average {la0} at the "
            f"start ({start['time']}) and {la1} at the end ({end['time']}).")


class Report:
    """One benchmark's rows and the machine's facts around them."""

    def __init__(self, benchmark: str) -> None:
        self.benchmark = benchmark
        self.start = machine_facts()
        self.rows: list[RowResult] = []

    def add(self, rows: Sequence[RowResult]) -> None:
        self.rows.extend(rows)

    def as_json(self) -> dict[str, Any]:
        end = machine_facts()
        machine = {"cores": self.start["cores"], "kernel": self.start["kernel"],
                   "loadavg_start": self.start["loadavg"], "loadavg_end": end["loadavg"]}
        rows = [dict(r.summary(), machine=machine) for r in self.rows]
        return {"benchmark": self.benchmark, "machine": {"start": self.start, "end": end},
                "noisy_spread": NOISY_SPREAD, "rows": rows}

    def write(self, directory: Path = RESULTS, extra: str = "") -> dict[str, Any]:
        """Print the table and write ``<benchmark>.md`` and ``<benchmark>.json``."""
        data = self.as_json()
        text = "\n\n".join(x for x in (markdown(data["rows"]),
                                       facts_line(data["machine"]["start"],
                                                  data["machine"]["end"]), extra,
                                       cpu_note(data["rows"])) if x)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{self.benchmark}.json").write_text(json.dumps(data, indent=1) + "\n")
        (directory / f"{self.benchmark}.md").write_text(text + "\n")
        print(text)
        return data


def add_round_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                    help=f"rounds per row, at least {MIN_ROUNDS} (default {MIN_ROUNDS})")
    ap.add_argument("--smoke", action="store_true",
                    help="a short run to check the benchmark works: fewer rows, 1 s each, "
                    "no extra rounds for noisy rows")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="where the table and JSON go (default benchmarks/results)")


def extra_rounds(smoke: bool) -> int:
    """The rounds a noisy row adds (invariant 8): none in a ``--smoke`` run, which only
    checks that the benchmark works."""
    return 0 if smoke else NOISY_EXTRA


def check_rounds(ap: argparse.ArgumentParser, rounds: int) -> None:
    if rounds < MIN_ROUNDS:
        ap.error(f"--rounds must be at least {MIN_ROUNDS}")


__all__ = ["BESIDE_FIELDS", "CPU_FIELDS", "CPU_NOTE", "FIELDS", "MIN_ROUNDS", "NOISY_EXTRA",
           "NOISY_SPREAD", "Figures", "Pair", "Report", "Result", "RowResult", "Sample",
           "add_round_args", "beside_tag", "check_rounds", "cpu_meter", "cpu_note", "cpu_seconds",
           "extra_rounds", "free_port", "machine_facts", "markdown", "per_op", "run_figures",
           "run_pair", "run_rounds", "settle", "stderr_log", "wait_port"]
