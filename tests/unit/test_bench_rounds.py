"""The benchmarks' round runner (benchmarks/common.py, its invariants 1-9): pairing,
alternating order, the median paired ratio and its spread, the noisy flag, the
measurements beside a row's sides, the CPU per operation a side reports, the JSON and
table it writes. Pure and fast:
synthetic callables stand in for the measured programs. A quick --smoke run of the real
NBD benchmark (marked slow) checks every JSON field. The memory mode of the null FS
(benchmarks/nullfuse.py --memory) is checked byte for byte through a real mount. Tests of
other invariants that script a noisy anchor pass ``extra=0`` (invariant 8 has its own)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from benchmarks.all import write_table
from benchmarks.common import (
    BESIDE_FIELDS,
    CPU_FIELDS,
    FIELDS,
    MIN_ROUNDS,
    NOISY_EXTRA,
    Figures,
    Pair,
    Report,
    Sample,
    cpu_meter,
    extra_rounds,
    machine_facts,
    markdown,
    run_figures,
    run_pair,
    run_rounds,
)
from benchmarks.nbd import latency_note
from benchmarks.nullfuse import FILE_INODE, FILL, MemoryFS, NullFS, random_buffer

ROOT = Path(__file__).resolve().parents[2]


def scripted(values: list[float], log: list[str], tag: str) -> Callable[[], float]:
    """A measurement that returns the next scripted value and records when it ran."""
    it: Iterator[float] = iter(values)

    def measure() -> float:
        log.append(tag)
        return next(it)
    return measure


def test_rounds_alternate_and_pair_within_a_round() -> None:
    """Invariants 1-3: each round runs every side; AB, BA, AB; ratios pair the same round."""
    log: list[str] = []
    pair = Pair("seq write", anchor=scripted([100, 50, 200], log, "A"),
                storaged=scripted([150, 100, 200], log, "S"),
                ceiling=scripted([300, 300, 300], log, "C"), anchor_name="qemu-nbd",
                ceiling_name="raw")
    res = run_pair("nbd", pair, 3, extra=0)
    assert log == ["A", "S", "C", "C", "S", "A", "A", "S", "C"]
    assert res.order == log
    assert res.ratios == [1.5, 2.0, 1.0]
    s = res.summary()
    assert s["ratio_median"] == 1.5
    assert (s["ratio_min"], s["ratio_max"]) == (1.0, 2.0)
    # A ratio of medians (150 / 100) would also say 1.5 here; the spread is what it hides.
    assert s["storaged_median"] == 150 and s["anchor_median"] == 100
    assert s["ceiling_median"] == 300
    assert s["ceiling_ratio_median"] == pytest.approx(0.5)
    assert s["rounds"] == 3


def test_pairing_differs_from_a_ratio_of_medians() -> None:
    """Invariant 3: a slow phase that hits both sides of one round cancels out."""
    log: list[str] = []
    # Round 2 runs at a third of the speed for both; storaged is 1.2x in every round.
    pair = Pair("r", anchor=scripted([100, 30, 100, 30], log, "A"),
                storaged=scripted([120, 36, 120, 36], log, "S"))
    s = run_pair("b", pair, 4, extra=0).summary()
    assert s["ratio_median"] == pytest.approx(1.2)
    assert s["ratio_max"] - s["ratio_min"] == pytest.approx(0)
    assert s["ratio_iqr"] == pytest.approx(0)
    assert s["ceiling_median"] is None and s["ceiling_rounds"] == []
    assert log == ["A", "S", "S", "A", "A", "S", "S", "A"]


def test_noisy_flag_follows_the_anchor_spread() -> None:
    """Invariant 5: the anchor's max/min above the threshold marks the row noisy."""
    quiet = run_pair("b", Pair("q", anchor=scripted([100, 110, 105], [], "A"),
                               storaged=scripted([1, 1, 1], [], "S")), 3)
    assert not quiet.noisy and quiet.anchor_spread == pytest.approx(1.1)
    loud = run_pair("b", Pair("n", anchor=scripted([100, 250, 105, 100, 100], [], "A"),
                              storaged=scripted([1, 1, 1, 1, 1], [], "S")), 3)
    assert loud.noisy and loud.anchor_spread == pytest.approx(2.5)
    assert "noisy (2.50)" in markdown([loud.summary()])
    assert "noisy" not in markdown([quiet.summary()]).splitlines()[-1]


def test_a_noisy_row_runs_more_rounds_once() -> None:
    """Invariant 8: a row noisy after its rounds runs NOISY_EXTRA more, once, in the
    alternating order, and its median rests on all of them; a steady row runs exactly the
    rounds asked for; a row whose anchor changes speed only in the extra rounds still
    stops there."""
    log: list[str] = []
    # Storaged is 1.2x in every round but the slow second one (0.6x): with three rounds
    # the median would be 1.2 either way, the point is the count and the order.
    row = run_pair("b", Pair("n", anchor=scripted([100, 250, 100, 100, 400, 9], log, "A"),
                             storaged=scripted([120, 150, 120, 120, 480, 9], log, "S")), 3)
    assert NOISY_EXTRA == 2 and row.rounds == 3 + NOISY_EXTRA
    assert log == ["A", "S", "S", "A", "A", "S", "S", "A", "A", "S"]
    assert row.ratios == pytest.approx([1.2, 0.6, 1.2, 1.2, 1.2])
    assert row.summary()["rounds"] == 5 and row.noisy
    steady = run_pair("b", Pair("q", anchor=scripted([100, 101, 102, 400], [], "A"),
                                storaged=scripted([1, 1, 1, 1], [], "S")), 3)
    assert steady.rounds == 3 and not steady.noisy
    figs = run_figures("b", Figures("lat", ("p50", "p99"),
                                    anchor=iter([(10, 10), (10, 30), (10, 10), (10, 10),
                                                 (10, 10)]).__next__,
                                    storaged=iter([(5, 5)] * 5).__next__), 3)
    assert [r.rounds for r in figs] == [5, 5]       # one noisy figure extends them all
    assert [r.noisy for r in figs] == [False, True]
    # A --smoke run only checks that a benchmark works: no extra rounds.
    assert extra_rounds(True) == 0
    assert extra_rounds(False) == NOISY_EXTRA


def test_lower_is_better_inverts_the_ratio() -> None:
    """Invariant 4: for latency, storaged at half the anchor's time is 2x."""
    pair = Pair("lat", anchor=scripted([200, 200, 200], [], "A"),
                storaged=scripted([100, 100, 100], [], "S"), unit="us",
                higher_is_better=False)
    assert run_pair("b", pair, 3).summary()["ratio_median"] == 2.0


def test_figures_of_one_run_become_rows_that_share_its_rounds() -> None:
    """Invariant 6 (with 1-4): a latency run's p50 and p99 become two rows whose rounds come
    from the same runs in the same alternating order, each ratio inverted (lower is
    better) and paired within its round."""
    log: list[str] = []

    def runs(values: list[tuple[float, float]], tag: str) -> Callable[[], list[float]]:
        return scripted_list([list(v) for v in values], log, tag)
    group = Figures("QD1 rand read 4K", ("p50", "p99"),
                    anchor=runs([(20, 100), (40, 200), (20, 100)], "A"),
                    storaged=runs([(40, 100), (40, 100), (10, 100)], "S"),
                    ceiling=runs([(10, 50)] * 3, "C"), unit="us", higher_is_better=False)
    p50, p99 = run_rounds("nbd", [group], 3, extra=0)
    assert log == ["A", "S", "C", "C", "S", "A", "A", "S", "C"]
    assert p50.row == "QD1 rand read 4K p50" and p99.row == "QD1 rand read 4K p99"
    assert p50.order == p99.order == log
    assert p50.ratios == [0.5, 1.0, 2.0] and p99.ratios == [1.0, 2.0, 1.0]
    assert p50.summary()["storaged_median"] == 40 and p99.summary()["anchor_median"] == 100
    assert p99.summary()["ceiling_ratio_median"] == 0.5


def test_latency_rows_are_also_stated_as_the_issue_states_its_target() -> None:
    """The table keeps invariant 4 (anchor / storaged for latencies); the note gives
    storaged / anchor per row, the paired median (target <= 1.2x)."""
    log: list[str] = []
    group = Figures("QD1", ("p50",), anchor=lambda: [20.0],
                    storaged=scripted_list([[70.0], [60.0], [80.0]], log),
                    unit="us", higher_is_better=False)
    (row,) = run_rounds("nbd", [group], 3)
    assert row.summary()["ratio_median"] == pytest.approx(20 / 70)
    assert latency_note([row]) == (" Latency, storaged / anchor (paired median; target "
                                   "<= 1.2x): QD1 p50 3.50x.")
    assert latency_note([]) == ""


def scripted_list(values: list[list[float]], log: list[str],
                  tag: str = "S") -> Callable[[], list[float]]:
    """``scripted`` for a run that gives several figures."""
    it = iter(values)

    def measure() -> list[float]:
        log.append(tag)
        return next(it)
    return measure


def test_figures_refuse_a_wrong_count_and_too_few_rounds() -> None:
    """A run that gives the wrong number of figures is an error, not a shifted row; fewer
    rounds than the minimum runs nothing (invariant 1)."""
    log: list[str] = []

    def one() -> list[float]:
        log.append("x")
        return [1.0]
    group = Figures("lat", ("p50", "p99"), anchor=one, storaged=one)
    with pytest.raises(ValueError, match="at least 3 rounds"):
        run_rounds("b", [group], MIN_ROUNDS - 1)
    assert log == []
    with pytest.raises(ValueError, match="gave 1 figures, not 2"):
        run_rounds("b", [group], MIN_ROUNDS)


def test_fewer_rounds_than_the_minimum_are_refused_before_measuring() -> None:
    """Invariant 1: a refusal runs nothing."""
    log: list[str] = []
    pair = Pair("r", anchor=scripted([1.0] * 5, log, "A"),
                storaged=scripted([1.0] * 5, log, "S"))
    with pytest.raises(ValueError, match="at least 3 rounds"):
        run_rounds("b", [pair], MIN_ROUNDS - 1)
    assert log == []


def test_report_writes_every_field_and_the_machine(tmp_path: Path) -> None:
    rep = Report("synthetic")
    rep.add(run_rounds("synthetic", [
        Pair("a", anchor=scripted([10, 10, 10], [], "A"), storaged=scripted([5, 20, 10], [],
                                                                            "S"))], 3))
    rep.write(tmp_path)
    data = json.loads((tmp_path / "synthetic.json").read_text())
    assert set(FIELDS) <= set(data["rows"][0])
    assert data["rows"][0]["ratio_median"] == 1.0
    assert {"cores", "kernel", "loadavg_start", "loadavg_end"} <= set(
        data["rows"][0]["machine"])
    for when in ("start", "end"):
        assert {"cores", "kernel", "loadavg", "time"} <= set(data["machine"][when])
    table = (tmp_path / "synthetic.md").read_text()
    assert "| synthetic | a | MB/s | 10 | 10 (anchor) | 1.00x | 0.50-2.00" in table


def test_make_bench_table_merges_benchmarks_and_names_failures(tmp_path: Path) -> None:
    """benchmarks/all: one table and one JSON over every benchmark's rows; a failed one is
    named, not silently dropped."""
    for name, ratio in (("nbd", 2.0), ("fuse", 0.5)):
        rep = Report(name)
        rep.add(run_rounds(name, [Pair("seq", anchor=scripted([10.0] * 3, [], "A"),
                                       storaged=scripted([10 * ratio] * 3, [], "S"))], 3))
        rep.write(tmp_path)
    rows = [r for n in ("nbd", "fuse")
            for r in json.loads((tmp_path / f"{n}.json").read_text())["rows"]]
    runs = {"nbd": {"status": 0, "seconds": 60.0}, "fuse": {"status": 0, "seconds": 30.0},
            "iscsi": {"status": 1, "seconds": 6.0}}
    facts = machine_facts()
    assert write_table(tmp_path, facts, facts, 96.0, runs, rows, 3, False) == ["iscsi"]
    table = (tmp_path / "latest.md").read_text()
    assert "| nbd | seq | MB/s | 20 | 10 (anchor) | 2.00x |" in table
    assert "| fuse | seq | MB/s | 5 | 10 (anchor) | 0.50x |" in table
    assert "took 1.6 min" in table and "FAILED (no rows): iscsi" in table
    data = json.loads((tmp_path / "latest.json").read_text())
    assert [r["benchmark"] for r in data["rows"]] == ["nbd", "fuse"]
    assert data["benchmarks"]["iscsi"]["status"] == 1 and data["rounds"] == 3
    for row in data["rows"]:
        assert set(FIELDS) <= set(row)


M = "pyfuse3 memory"


def test_beside_measurements_share_the_rounds_and_the_alternating_order() -> None:
    """Invariants 1, 2 and 7: the beside measurements run in every round, after the
    ceiling in even rounds and first in odd ones; each is paired with storaged (3) and
    with the ceiling of its own round."""
    log: list[str] = []
    pair = Pair("rand read 4K", anchor=scripted([100, 50, 200], log, "A"),
                storaged=scripted([80, 40, 90], log, "S"),
                ceiling=scripted([100, 50, 100], log, "C"), ceiling_name="pyfuse3 null",
                beside=((M, scripted([90, 40, 100], log, "M")),
                        ("other", scripted([200, 200, 200], log, "O"))))
    lines: list[str] = []
    res = run_pair("fuse", pair, 3, lines.append, extra=0)
    assert lines[1] == ("  fuse | rand read 4K | round 2: storaged 40.0 anchor 50.0 ceiling "
                        "50.0 pyfuse3 memory 40.0 other 200.0 MB/s")
    assert log == ["A", "S", "C", "M", "O", "O", "M", "C", "S", "A",
                   "A", "S", "C", "M", "O"]
    tags = {"A": "A", "S": "S", "C": "C", "M": f"B:{M}", "O": "B:other"}
    assert res.order == [tags[t] for t in log]
    assert res.beside_rounds == {M: [90, 40, 100], "other": [200, 200, 200]}
    # Paired within each round: 80/90, 40/40, 90/100 -- not a ratio of medians (80/90).
    assert res.beside_ratios(M) == pytest.approx([80 / 90, 1.0, 0.9])
    assert res.beside_ceiling_ratios(M) == pytest.approx([0.9, 0.8, 1.0])
    s = res.summary()
    assert s["ratio_median"] == 0.8 and s["ceiling_ratio_median"] == pytest.approx(0.8)
    mem, other = s["beside"]
    assert set(BESIDE_FIELDS) == set(mem) == set(other)
    assert mem == {"name": M, "median": 90, "ratio_median": pytest.approx(0.9),
                   "ceiling_ratio_median": pytest.approx(0.9), "rounds": [90, 40, 100]}
    assert other["ratio_median"] == pytest.approx(0.4)
    assert other["ceiling_ratio_median"] == pytest.approx(2.0)
    line = markdown([s]).splitlines()[-1]
    assert ("| 100 (pyfuse3 null); 90 (pyfuse3 memory, 0.90 of the ceiling); 200 (other, "
            "2.00 of the ceiling) | 0.80x; 0.90x of pyfuse3 memory; 0.40x of other |") in line


def test_beside_ratios_follow_invariant_4_and_need_no_ceiling() -> None:
    """For latencies the beside ratio is inverted like the anchor's; a row without a
    ceiling gives no share of it."""
    log: list[str] = []
    pair = Pair("lat", anchor=scripted([200] * 3, log, "A"),
                storaged=scripted([100] * 3, log, "S"), unit="us", higher_is_better=False,
                beside=((M, scripted([50, 50, 50], log, "M")),))
    lines: list[str] = []
    res = run_pair("b", pair, 3, lines.append)
    assert lines[0] == "  b | lat | round 1: storaged 100.0 anchor 200.0 pyfuse3 memory 50.0 us"
    assert log == ["A", "S", "M", "M", "S", "A", "A", "S", "M"]
    (b,) = res.summary()["beside"]
    assert b["ratio_median"] == 0.5 and b["ceiling_ratio_median"] is None
    assert "| -; 50 (pyfuse3 memory) | -; 0.50x of pyfuse3 memory |" in markdown(
        [res.summary()])


def test_a_row_without_beside_measurements_is_unchanged() -> None:
    """Invariant 7: no beside measurements, the same order, summary and table line as
    before they existed (only an empty "beside" list in the JSON)."""
    log: list[str] = []
    pair = Pair("seq", anchor=scripted([100, 50, 200], log, "A"),
                storaged=scripted([150, 100, 200], log, "S"),
                ceiling=scripted([300, 300, 300], log, "C"), anchor_name="qemu-nbd",
                ceiling_name="raw")
    s = run_pair("nbd", pair, 3, extra=0).summary()
    assert log == ["A", "S", "C", "C", "S", "A", "A", "S", "C"] == s["order"]
    assert s["beside"] == []
    line = ("| nbd | seq | MB/s | 150 | 100 (qemu-nbd) | 1.50x | 1.00-2.00 (0.50) "
            "| 300 (raw) | 0.50x | 3 | noisy (4.00) |")
    assert markdown([s]).splitlines()[-1] == line
    old = {k: v for k, v in s.items() if k != "beside"}     # JSON from before "beside"
    assert markdown([old]).splitlines()[-1] == line


def test_figures_carry_beside_measurements_from_the_same_runs() -> None:
    """Invariants 6 and 7: one beside run gives one value per figure, each to its row."""
    log: list[str] = []

    def runs(values: list[tuple[float, float]], tag: str) -> Callable[[], list[float]]:
        return scripted_list([list(v) for v in values], log, tag)
    group = Figures("QD1", ("p50", "p99"), anchor=runs([(20, 100)] * 3, "A"),
                    storaged=runs([(40, 100)] * 3, "S"), unit="us", higher_is_better=False,
                    beside=((M, runs([(10, 50), (20, 50), (40, 400)], "M")),))
    p50, p99 = run_rounds("nbd", [group], 3)
    assert log == ["A", "S", "M", "M", "S", "A", "A", "S", "M"]
    assert p50.order == p99.order == ["A", "S", f"B:{M}", f"B:{M}", "S", "A", "A", "S",
                                      f"B:{M}"]
    assert p50.beside_rounds == {M: [10, 20, 40]} and p99.beside_rounds == {M: [50, 50, 400]}
    assert p50.beside_ratios(M) == [0.25, 0.5, 1.0] and p99.beside_ratios(M) == [0.5, 0.5, 4]


def test_beside_names_must_be_distinct_and_are_checked_before_measuring() -> None:
    log: list[str] = []
    m = scripted([1.0] * 9, log, "x")
    for beside in (((M, m), (M, m)), (("", m),)):
        with pytest.raises(ValueError, match="distinct, non-empty names"):
            run_pair("b", Pair("r", anchor=m, storaged=m, beside=beside), 3)
    assert log == []


def test_report_and_merged_table_carry_beside_measurements(tmp_path: Path) -> None:
    """The JSON holds each beside measurement's fields, the markdown shows them, and
    benchmarks/all merges rows with and without them, also rows from older JSON that has
    no "beside" at all."""
    rep = Report("fuse")
    rep.add(run_rounds("fuse", [
        Pair("plain rand read 4K", anchor=scripted([100] * 3, [], "A"),
             storaged=scripted([60, 80, 70], [], "S"), ceiling=scripted([100] * 3, [], "C"),
             ceiling_name="pyfuse3 null", beside=((M, scripted([80, 100, 70], [], "M")),)),
        Pair("plain seq read 1M", anchor=scripted([100] * 3, [], "A"),
             storaged=scripted([120] * 3, [], "S"), ceiling=scripted([300] * 3, [], "C"),
             ceiling_name="pyfuse3 null")], 3))
    rep.write(tmp_path)
    rows = json.loads((tmp_path / "fuse.json").read_text())["rows"]
    for row in rows:
        assert set(FIELDS) <= set(row)
    (b,) = rows[0]["beside"]
    assert set(BESIDE_FIELDS) <= set(b) and b["rounds"] == [80, 100, 70]
    assert b["ratio_median"] == pytest.approx(0.8) and b["ceiling_ratio_median"] == 0.8
    assert rows[1]["beside"] == []
    assert ("| 100 (pyfuse3 null); 80 (pyfuse3 memory, 0.80 of the ceiling) | 0.70x; 0.80x "
            "of pyfuse3 memory |") in (tmp_path / "fuse.md").read_text()
    old = {k: v for k, v in rows[1].items() if k != "beside"}
    facts = machine_facts()
    runs = {"fuse": {"status": 0, "seconds": 1.0}}
    assert write_table(tmp_path, facts, facts, 1.0, runs, [*rows, old], 3, False) == []
    table = (tmp_path / "latest.md").read_text()
    assert "0.70x; 0.80x of pyfuse3 memory" in table
    assert table.count("| 300 (pyfuse3 null) | 0.40x |") == 2


def sampled(values: list[tuple[float, float]], log: list[str], tag: str
            ) -> Callable[[], float]:
    """``scripted`` whose figures carry their server's CPU seconds per operation."""
    return scripted([Sample(v, cpu) for v, cpu in values], log, tag)


def test_cpu_per_operation_is_paired_within_a_round(tmp_path: Path) -> None:
    """Invariant 9: each side's median CPU per operation and the median of the per-round
    ratios (anchor over storaged: above 1 storaged spends less), not a ratio of medians;
    it leaves the row's own ratio and noisiness alone; the JSON and the table carry it,
    and benchmarks/all merges it with rows that have none (also older JSON)."""
    order: list[str] = []
    rep = Report("iscsi")
    rep.add(run_rounds("iscsi", [
        Pair("ec read 1M", anchor=sampled([(100, 4e-4), (100, 2e-4), (100, 4e-4)], order, "A"),
             storaged=sampled([(90, 2e-4), (80, 4e-4), (95, 5e-4)], order, "S"),
             unit="IOPS"),
        Pair("plain read 1M", anchor=scripted([100] * 3, order, "A"),
             storaged=sampled([(100, 3e-4)] * 3, order, "S"), unit="IOPS")], 3))
    assert order[:6] == ["A", "S", "S", "A", "A", "S"]          # (invariant 2 unchanged)
    rep.write(tmp_path)
    rows = json.loads((tmp_path / "iscsi.json").read_text())["rows"]
    cpu = rows[0]["cpu"]
    assert set(CPU_FIELDS) <= set(cpu)
    assert cpu["storaged_rounds"] == [2e-4, 4e-4, 5e-4]
    assert cpu["anchor_rounds"] == [4e-4, 2e-4, 4e-4]
    assert cpu["storaged_median"] == 4e-4 and cpu["anchor_median"] == 4e-4
    # Paired: 2.0, 0.5, 0.8 -> median 0.8, where the medians' ratio would say 1.0.
    assert cpu["ratio_median"] == pytest.approx(0.8)
    assert (cpu["ratio_min"], cpu["ratio_max"]) == (pytest.approx(0.5), pytest.approx(2.0))
    assert rows[0]["ratio_median"] == pytest.approx(0.9) and not rows[0]["noisy"]
    assert rows[0]["storaged_rounds"] == [90, 80, 95]           # plain floats in the JSON
    assert rows[1]["cpu"] is None            # the anchor gave no CPU: nothing to pair
    table = (tmp_path / "iscsi.md").read_text()
    assert "| server CPU per op, storaged / anchor (paired) |" in table
    assert "| 400 / 400 us, 0.80x (0.50-2.00) |" in table
    assert table.splitlines()[3].endswith("| - |")
    old = {k: v for k, v in rows[1].items() if k != "cpu"}
    facts = machine_facts()
    runs = {"iscsi": {"status": 0, "seconds": 1.0}}
    assert write_table(tmp_path, facts, facts, 1.0, runs, [*rows, old], 3, False) == []
    merged = (tmp_path / "latest.md").read_text()
    lines = [line for line in merged.splitlines() if line.startswith("| iscsi |")]
    assert lines[0].endswith("| 400 / 400 us, 0.80x (0.50-2.00) |")
    assert lines[1].endswith("| - |") and lines[2].endswith("| - |")
    assert "server CPU per op = the median CPU time" in merged


def test_cores_busy_are_reported_beside_cpu_per_operation(tmp_path: Path) -> None:
    """Invariant 9: samples that say how many cores their server kept busy give each
    side's median of them in the CPU cell (a server pinned at one core beside an anchor
    using more); a row where one round of one side lacks them shows CPU per op alone."""
    rep = Report("iscsi")
    rep.add(run_rounds("iscsi", [
        Pair("read 1M", anchor=scripted([Sample(100, 4e-4, 1.3), Sample(100, 4e-4, 1.1),
                                         Sample(100, 4e-4, 1.2)], [], "A"),
             storaged=scripted([Sample(90, 4e-4, 1.0), Sample(90, 4e-4, 0.98),
                                Sample(90, 4e-4, 0.99)], [], "S"), unit="IOPS"),
        # (a figure of 0 still carries its CPU: a Sample of 0.0 is a false float)
        Pair("read 4K", anchor=scripted([Sample(100, 4e-5, 1.0), Sample(100, 4e-5, None),
                                         Sample(100, 4e-5, 1.0)], [], "A"),
             storaged=scripted([Sample(0.0, 2e-5, 0.5), *[Sample(90, 2e-5, 0.5)] * 2], [],
                               "S"), unit="IOPS")], 3))
    rep.write(tmp_path)
    rows = json.loads((tmp_path / "iscsi.json").read_text())["rows"]
    assert rows[0]["cpu"]["storaged_cores"] == pytest.approx(0.99)
    assert rows[0]["cpu"]["anchor_cores"] == pytest.approx(1.2)
    assert "storaged_cores" not in rows[1]["cpu"]
    table = (tmp_path / "iscsi.md").read_text()
    assert "| 400 / 400 us, 1.00x (1.00-1.00); cores 0.99 / 1.20 |" in table
    assert "| 20 / 40 us, 2.00x (2.00-2.00) |" in table
    assert "how many of the machine's cores it kept busy" in table


def test_cpu_meter_measures_cores_busy() -> None:
    """Invariant 9: ``cpu_meter`` of this process across a busy loop reports about one
    core busy and the CPU per operation it spent."""
    t0 = time.perf_counter()
    sample = cpu_meter(os.getpid())
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    got = sample(42.0, 3)
    wall = time.perf_counter() - t0
    assert isinstance(got, Sample) and got == 42.0
    # Busy on one thread: at most about one core (the clock ticks at 1/100 s), at least
    # some of it however loaded the machine; the CPU per operation is the same seconds.
    assert got.cores is not None and 0.1 < got.cores < 1.2
    assert got.cpu * 3 == pytest.approx(got.cores * wall, rel=0.1)
    assert cpu_meter(None)(42.0, 3) == 42.0 and not isinstance(cpu_meter(None)(42.0, 3),
                                                              Sample)


def test_a_table_without_cpu_figures_keeps_its_columns() -> None:
    """Invariant 9 adds its column only when some row has the figures."""
    rows = [r.summary() for r in run_rounds("nbd", [
        Pair("seq", anchor=scripted([10.0] * 3, [], "A"),
             storaged=scripted([20.0] * 3, [], "S"))], 3)]
    assert rows[0]["cpu"] is None
    assert "CPU per op" not in markdown(rows)
    assert markdown(rows).splitlines()[0].endswith("| rounds | noisy |")


def test_figures_carry_cpu_per_operation_from_the_same_run() -> None:
    """Invariants 6 and 9: every figure of a run carries that run's CPU per operation."""
    rows = run_figures("nbd", Figures(
        "QD1 read 4K", ("p50", "p99"),
        anchor=lambda: [Sample(100, 2e-5), Sample(200, 2e-5)],
        storaged=lambda: [Sample(90, 1e-5), Sample(150, 1e-5)],
        unit="us", higher_is_better=False), 3)
    for r in rows:
        c = r.cpu_summary()
        assert c is not None and c["ratio_median"] == pytest.approx(2.0)


# -- the null FS's memory mode (benchmarks/nullfuse.py --memory) ----------------------------

def test_memory_fs_answers_its_buffers_bytes_and_keeps_writes() -> None:
    """Reads are read-only views of the buffer at the offset (short at the end), writes
    copy into it; the default null FS still answers zeros and drops writes."""
    size = 3 * FILL + 4096
    fs = MemoryFS(size)
    data = bytes(fs.data)
    assert len(data) == size and data.count(0) < size // 100   # random, every page written
    assert data[:FILL] == data[FILL:2 * FILL]                   # the pattern, repeated

    async def check() -> None:
        got = await fs.read(1, 12345, 4096)
        assert isinstance(got, memoryview) and got.readonly and bytes(got) == \
            data[12345:12345 + 4096]
        assert bytes(await fs.read(1, size - 100, 4096)) == data[-100:]
        assert bytes(await fs.read(1, size, 4096)) == b""
        payload = os.urandom(8192)
        assert await fs.write(1, FILL - 4096, payload) == 8192
        assert bytes(await fs.read(1, FILL - 4096, 8192)) == payload
        assert bytes(await fs.read(1, 2 * FILL - 4096, 8192)) == data[2 * FILL - 4096:
                                                                      2 * FILL + 4096]
        assert await fs.write(1, size - 10, payload) == 10          # what fits
        with pytest.raises(pyfuse3.FUSEError) as full:
            await fs.write(1, size, payload)
        assert full.value.errno == errno.ENOSPC
        null = NullFS(size)
        assert await null.read(1, 0, 4096) == bytes(4096)
        assert await null.write(1, 0, payload) == 8192
        assert (await null.getattr(FILE_INODE)).st_size == size
    trio.run(check)
    assert len(random_buffer(FILL + 1)) == FILL + 1


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                    reason="mounting the null FS needs /dev/fuse and root")
def test_memory_fs_through_a_real_mount_reads_back_byte_exact(tmp_path: Path) -> None:
    """The memory mode mounted as benchmarks/fuse mounts it: O_DIRECT 4 KiB writes at
    random offsets read back byte for byte, and reads elsewhere are its random fill."""
    mnt = tmp_path / "memory"
    mnt.mkdir()
    size = 8 * FILL
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.nullfuse", "--memory",
                             "--size", str(size), str(mnt)], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mnt):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "the memory FS did not mount"
            time.sleep(0.05)
        path = mnt / "file"
        assert path.stat().st_size == size
        rng = random.Random(27)
        buf = mmap.mmap(-1, 4096)                     # O_DIRECT wants an aligned buffer
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            first = os.pread(fd, size, 0)
            assert len(first) == size and first.count(0) < size // 100
            written: dict[int, bytes] = {}
            for _ in range(64):
                off = rng.randrange(size // 4096) * 4096
                payload = rng.randbytes(4096)
                buf[:] = payload
                assert os.pwritev(fd, [buf], off) == 4096
                written[off] = payload
            for off in range(0, size, 4096):
                assert os.preadv(fd, [buf], off) == 4096
                assert bytes(buf) == written.get(off, first[off:off + 4096]), off
        finally:
            os.close(fd)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if _mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert not _mounted(mnt)


@pytest.mark.slow
def test_nbd_smoke_run_writes_the_json(tmp_path: Path) -> None:
    """A real benchmark end to end: qemu-nbd against storaged, three short rounds."""
    for tool in ("fio", "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "benchmarks.nbd", "--smoke", "--dir",
                        str(tmp_path), "--results", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "out" / "nbd.json").read_text())
    assert data["rows"]
    for row in data["rows"]:
        assert set(FIELDS) <= set(row)
        assert row["rounds"] == MIN_ROUNDS    # a smoke run adds none (extra_rounds)
        assert row["storaged_median"] > 0 and row["anchor_median"] > 0
        assert row["ceiling_median"] > 0
        assert row["order"][:3] == ["A", "S", "C"] and row["order"][3:6] == ["C", "S", "A"]
        # Invariant 9 through real servers: qemu-nbd's and storaged's CPU per request,
        # each round's from its own process (the latency rows' too).
        cpu = row["cpu"]
        assert cpu is not None and set(CPU_FIELDS) <= set(cpu)
        assert len(cpu["storaged_rounds"]) == len(cpu["anchor_rounds"]) == MIN_ROUNDS
        assert all(0 < x < 0.1 for x in cpu["storaged_rounds"] + cpu["anchor_rounds"])
    assert "| nbd |" in (tmp_path / "out" / "nbd.md").read_text()
    assert "server CPU per op" in (tmp_path / "out" / "nbd.md").read_text()
