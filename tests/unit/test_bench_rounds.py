"""The benchmarks' round runner (benchmarks/common.py, its invariants 1-5): pairing,
alternating order, the median paired ratio and its spread, the noisy flag, the JSON and
table it writes. Pure and fast: synthetic callables stand in for the measured programs.
A quick --smoke run of the real NBD benchmark (marked slow) checks every JSON field."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.all import write_table
from benchmarks.common import (
    FIELDS,
    MIN_ROUNDS,
    Figures,
    Pair,
    Report,
    machine_facts,
    markdown,
    run_pair,
    run_rounds,
)
from benchmarks.nbd import latency_note

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
    res = run_pair("nbd", pair, 3)
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
    s = run_pair("b", pair, 4).summary()
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
    loud = run_pair("b", Pair("n", anchor=scripted([100, 250, 105], [], "A"),
                              storaged=scripted([1, 1, 1], [], "S")), 3)
    assert loud.noisy and loud.anchor_spread == pytest.approx(2.5)
    assert "noisy (2.50)" in markdown([loud.summary()])
    assert "noisy" not in markdown([quiet.summary()]).splitlines()[-1]


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
        it = iter(values)

        def measure() -> list[float]:
            log.append(tag)
            return list(next(it))
        return measure
    group = Figures("QD1 rand read 4K", ("p50", "p99"),
                    anchor=runs([(20, 100), (40, 200), (20, 100)], "A"),
                    storaged=runs([(40, 100), (40, 100), (10, 100)], "S"),
                    ceiling=runs([(10, 50)] * 3, "C"), unit="us", higher_is_better=False)
    p50, p99 = run_rounds("nbd", [group], 3)
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


def scripted_list(values: list[list[float]], log: list[str]) -> Callable[[], list[float]]:
    it = iter(values)

    def measure() -> list[float]:
        log.append("S")
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
        assert row["rounds"] == MIN_ROUNDS
        assert row["storaged_median"] > 0 and row["anchor_median"] > 0
        assert row["ceiling_median"] > 0
        assert row["order"][:3] == ["A", "S", "C"] and row["order"][3:6] == ["C", "S", "A"]
    assert "| nbd |" in (tmp_path / "out" / "nbd.md").read_text()
