"""benchmarks/all: every benchmark that has an anchor, one after the other, merged into ONE
table -- ``make bench``.

Each benchmark runs as its own process (``python -m benchmarks.NAME --rounds N``) and
writes ``NAME.json`` and ``NAME.md`` under the results folder (benchmarks/results/, not
committed); this then writes ``latest.md`` (printed too) and ``latest.json`` there: every
row with storaged's median, the anchor's median, the median paired ratio and its spread,
the ceiling, the noisy flag, the rounds, and the machine's facts. A benchmark that fails is
named in the table's notes and the others still run; the exit status is then 1.

    .venv/bin/python -m benchmarks.all [--rounds N] [--smoke] [--only nbd,fuse]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MIN_ROUNDS,
    RESULTS,
    cpu_note,
    facts_line,
    machine_facts,
    markdown,
)

BENCHMARKS = ("engine", "nbd", "iscsi", "fuse")


def write_table(results: Path, start: dict[str, Any], end: dict[str, Any], seconds: float,
                runs: dict[str, dict[str, Any]], rows: list[dict[str, Any]], rounds: int,
                smoke: bool) -> list[str]:
    """Write and print ``latest.md`` and ``latest.json``; the names of failed benchmarks."""
    notes = [facts_line(start, end),
             f"`make bench` took {seconds / 60:.1f} min: "
             + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in runs.items()) + ".",
             "Each row ran anchor, storaged and ceiling back to back in every round, the order "
             "alternating (AB, BA, AB, ...). ratio = median over the rounds of storaged / "
             "anchor of the same round (above 1: storaged is faster); spread = the lowest and "
             "highest of those per-round ratios (IQR in brackets); noisy = the anchor's own "
             "max/min over the rounds above 1.3: the machine changed speed during the row, "
             "which then ran two rounds more. A ceiling cell may add measurements beside it "
             "after a ';' (the same rounds): their median, and storaged's paired ratio to "
             "them after the ceiling's."]
    if cpu_note(rows):
        notes[-1] += " " + cpu_note(rows)
    failed = [n for n, r in runs.items() if r["status"] != 0]
    if failed:
        notes.append(f"FAILED (no rows): {', '.join(failed)} -- see its output above.")
    text = "\n\n".join([markdown(rows), *notes])
    (results / "latest.md").write_text(text + "\n")
    (results / "latest.json").write_text(json.dumps(
        {"machine": {"start": start, "end": end}, "seconds": round(seconds, 1),
         "rounds": rounds, "smoke": smoke, "benchmarks": runs, "rows": rows},
        indent=1) + "\n")
    print(text)
    print(f"\n(written to {results / 'latest.md'} and latest.json)", file=sys.stderr)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.all")
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    ap.add_argument("--smoke", action="store_true", help="each benchmark's short mode")
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    if args.rounds < MIN_ROUNDS:
        ap.error(f"--rounds must be at least {MIN_ROUNDS}")
    args.results.mkdir(parents=True, exist_ok=True)
    start = machine_facts()
    began = time.monotonic()
    runs: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for name in names:
        out = args.results / f"{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--rounds", str(args.rounds),
               "--results", str(args.results)]
        if args.smoke:
            cmd.append("--smoke")
        print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL).returncode
        runs[name] = {"status": rc, "seconds": round(time.monotonic() - t0, 1)}
        if rc == 0 and out.exists():
            data = json.loads(out.read_text())
            runs[name]["machine"] = data["machine"]
            rows += data["rows"]
        else:
            runs[name]["status"] = rc or 1
    failed = write_table(args.results, start, machine_facts(), time.monotonic() - began,
                         runs, rows, args.rounds, args.smoke)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
