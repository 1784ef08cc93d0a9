"""Member health (pool.health invariants 1-6; DESIGN invariants 4 and 5): pure unit tests
of ``MemberHealth``, plus one on a real pool whose member fails reads."""

from __future__ import annotations

from collections.abc import Callable

from pool import Pool
from pool.faults import FaultyDevice
from pool.health import MemberHealth
from tests.conftest import DiskSet
from tests.kit.poolkit import filled_pool, read_all

Disks = Callable[..., DiskSet]
SIZE = 1 << 20


def _health(n: int = 2, threshold: int = 3) -> tuple[MemberHealth, list[tuple[int, str]]]:
    faults: list[tuple[int, str]] = []
    return MemberHealth(n, lambda i, why: faults.append((i, why)), threshold), faults


def test_the_threshold_reports_a_member_once_until_it_comes_back() -> None:
    """Invariants 1 and 2: read + write errors reaching the threshold report the member
    once, naming the counts and the last error; more errors do not report it again; once
    it came back its counts start over and it can be reported again."""
    h, faults = _health()
    h.count(1, "read", "a")
    h.count(1, "write", "b")
    assert faults == [] and h.counts(1) == (1, 1, 0) and h.counts(0) == (0, 0, 0)
    h.count(1, "read", "short read")
    assert faults == [(1, "2 read and 1 write errors, last: short read")]
    for _ in range(5):
        h.count(1, "write")
    assert len(faults) == 1 and h.counts(1) == (2, 6, 0)
    h.came_back(1)
    assert h.counts(1) == (0, 0, 0)
    for _ in range(3):
        h.count(1, "write")
    assert faults[1:] == [(1, "0 read and 3 write errors")]


def test_checksum_errors_never_fault_and_a_lower_threshold_applies_at_once() -> None:
    """Invariant 2 (DESIGN 4: a bad fragment is repaired, not held against the device),
    and a threshold lowered at run time (a config reload) counts the errors so far."""
    h, faults = _health(threshold=3)
    for _ in range(100):
        h.count(0, "checksum")
    h.count(0, "read")
    h.count(0, "read")
    assert faults == [] and h.counts(0) == (2, 0, 100)
    h.threshold = 2
    h.count(0, "checksum")
    assert faults == []
    h.count(0, "write")
    assert faults == [(0, "2 read and 1 write errors")]


def test_a_read_error_wakes_the_watcher_and_strangers_are_ignored() -> None:
    """Invariants 3 and 6: only a read error sets ``recheck``; an index that is not a
    member changes nothing; an added member starts clean."""
    h, faults = _health(n=1, threshold=1)
    h.count(0, "checksum")
    assert not h.recheck.is_set()
    h.count(5, "read")
    h.count(-1, "write")
    assert not h.recheck.is_set() and faults == [] and h.errors == [{"checksum": 1}]
    h.add_member()
    assert h.counts(1) == (0, 0, 0) and h.epoch(1) == 0
    h.count(1, "read")
    assert h.recheck.is_set() and faults == [(1, "1 read and 0 write errors")]


def test_epochs_only_grow_and_reasons_last_until_the_member_is_back() -> None:
    """Invariants 4 and 5: each time a member goes away its epoch grows (coming back does
    not lower it); why it is away is kept until it comes back; a member left out at
    import has a reason but no new epoch."""
    h, _ = _health(n=3)
    h.went_away(0, "taken offline")
    assert (h.epoch(0), h.reason(0)) == (1, "taken offline")
    h.came_back(0)
    assert (h.epoch(0), h.reason(0)) == (1, "")
    h.went_away(0, "sync failed")
    assert (h.epoch(0), h.reason(0), h.epoch(1)) == (2, "sync failed", 0)
    h.left_out(2, "left out at import: truncated")
    assert (h.epoch(2), h.reason(2)) == (0, "left out at import: truncated")


async def test_a_pool_faults_a_failing_member_once_and_reads_go_on(disks: Disks) -> None:
    """On a real mirror pool: a member whose reads fail reaches the threshold and is
    faulted through the callback exactly once (one new epoch, the counts in its reason);
    reads stay byte-exact (degraded, DESIGN 5)."""
    ds = disks(2)
    pool, data = await filled_pool(ds, "mirror:2", SIZE)
    await pool.close()
    devs = ds.open()
    bad = FaultyDevice(devs[0], seed=2)
    pool = await Pool.open([bad, devs[1]])
    try:
        pool.member_health.threshold = 2
        bad.read_error_rate = 1.0
        for _ in range(3):
            pool.record_cache.clear()
            assert await read_all(pool, SIZE) == data
        assert pool.member_state(0) == "faulted" and pool.member_state(1) == "online"
        assert pool.member_health.epoch(0) == 1 and pool.member_health.epoch(1) == 0
        assert pool.statistics().members[0].why.startswith("2 read and 0 write errors")
    finally:
        bad.read_error_rate = 0.0
        await pool.close()
