"""The process tuning (storaged.tuning) does what it is for: buffers of a MiB allocated
and freed over and over reuse their pages instead of faulting in fresh ones each time, and
the write path's short-lived objects no longer set off a young collection every few
hundred allocations; storagectl starts light (it is part of every send and receive)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from storaged.ctl import cli

SCRIPT = """
import resource, sys
from storaged.tuning import tune_malloc
if sys.argv[1] == "tuned" and not tune_malloc():
    raise SystemExit("mallopt refused")
data = bytes(1 << 20)
def churn():
    for _ in range(200):
        a = b"x" * 40 + data + b"y" * 8      # two MiB-sized temporaries, freed at once
        del a
churn()                                      # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return int(out)


def test_tuned_allocator_reuses_pages_of_large_buffers() -> None:
    tuned = _faults("tuned")
    # 200 rounds of two 1 MiB buffers are 400 MiB: 100k pages if each came fresh.
    # (glibc's defaults take about 96k here: each temporary starts on fresh pages.)
    assert tuned < 1000, f"{tuned} page faults for 200 rounds of 1 MiB buffers"


GC_SCRIPT = """
import gc, sys
from storaged.tuning import tune_gc
if sys.argv[1] == "tuned":
    tune_gc()
data = memoryview(bytes(1 << 16))
def batch():
    # Like a writeback batch: a few thousand views and tuples alive until it is written.
    pieces = [(data[i:i + 512], i) for i in range(2_000)]
    del pieces
young = gc.get_stats()[0]["collections"]
for _ in range(500):
    batch()
print(gc.get_stats()[0]["collections"] - young)
"""


def _young_collections(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", GC_SCRIPT, mode], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return int(out)


def test_tuned_collector_leaves_a_batch_of_pieces_alone() -> None:
    default, tuned = _young_collections("default"), _young_collections("tuned")
    # 4,000 containers alive per batch: at the default threshold CPython collects in each.
    assert default >= 500, f"only {default} young collections at the default threshold"
    assert tuned < default // 10, f"{tuned} young collections tuned, {default} by default"


def test_storagectl_starts_without_loading_the_daemon() -> None:
    """storagectl (storaged.ctl.cli, and the old storaged.cli path installed console scripts
    run) imports the control client only, not the pool, volumes, trio or the daemon side."""
    heavy = ("trio", "pool.pool", "volumes.volume", "storaged.api", "storaged.control",
             "storaged.daemon", "iscsi.server", "zfec")
    out = subprocess.run([sys.executable, "-c", "import storaged.cli, storaged.ctl.cli, sys; "
                          f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "", f"storagectl loaded {out.strip()}"


@pytest.mark.parametrize(("argv", "group"), [
    (["volume", "send", "tank/vm@s1", "-o", "f"], "volume"),
    (["--socket", "volume", "pool", "list"], "pool"),      # a socket named like a group
    (["--socket=/run/s", "--json", "snapshot", "list"], "snapshot"),
    (["status"], "status"),
    (["--help"], None),
    (["bogus", "list"], None),
    ([], None),
])
def test_storagectl_builds_only_the_group_it_runs(argv: list[str], group: str | None
                                                  ) -> None:
    """The parser of just the named group reads a command line as the whole one does."""
    assert cli._group_of(argv) == group
    if group is not None:
        assert cli.build_parser(group).parse_args(argv) == cli.build_parser().parse_args(argv)


FREEZE_SCRIPT = """
import gc, sys, time, weakref
from storaged.tuning import freeze_startup, tune_gc
tune_gc()
class Node:
    pass
# Start-up state: 100,000 tracked objects that live as long as the process.
state = [[i, Node()] for i in range(50_000)]
if sys.argv[1] == "frozen":
    frozen = freeze_startup()
    assert frozen >= 100_000, frozen
# An object of start-up freed later (no cycle) is still freed at once.
late = Node()
state.append([late])
gone = []
ref = weakref.ref(late, lambda r: gone.append(1))
if sys.argv[1] == "frozen":
    freeze_startup()
del late, state[-1]
assert gone, "a frozen object without a cycle was not freed when its last reference went"
# A cycle made after start-up is still collected.
a, b = Node(), Node()
a.b, b.a = b, a
cyc = weakref.ref(a)
del a, b
gc.collect()
assert cyc() is None, "a cycle made after start-up was not collected"
t0 = time.perf_counter()
for _ in range(5):
    gc.collect()
print(len(gc.get_objects(2)), (time.perf_counter() - t0) / 5 * 1e6)
"""


def _full_collection(mode: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", FREEZE_SCRIPT, mode], capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    return int(out[0]), float(out[1])


def test_frozen_startup_objects_leave_the_full_collection() -> None:
    """After freeze_startup (the daemon calls it once it serves) a full collection no
    longer traverses start-up's objects (docs/INTERNALS.md "Process tuning"), objects
    freed by reference count still go at once, and later cycles are still collected."""
    plain_objects, _plain_us = _full_collection("plain")
    frozen_objects, _frozen_us = _full_collection("frozen")
    # (The times are printed for the record; on a loaded machine they say little.)
    assert plain_objects >= 100_000, plain_objects
    assert frozen_objects < 1_000, f"{frozen_objects} objects still in the oldest generation"
