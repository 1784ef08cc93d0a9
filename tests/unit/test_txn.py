"""The pool's transaction and its state machine (pool.txn invariants 1-5; DESIGN
invariants 1 and 2).

Real file devices; where a failure is needed, a ``FaultyDevice`` wrapper fails the writes
(the journal entry) and a ``RecordingDevice`` logs what reached the file and when it was
synced.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest
import trio

from pool import Pool
from pool.errors import PoolFailed, StorageError
from pool.faults import FaultyDevice, RecordingDevice, WriteLog
from pool.txn import Phase
from tests.conftest import DiskSet
from volumes import VolumeManager

Disks = Callable[..., DiskSet]
EXT = 1 << 20
BS = 64 << 10
SIZE = 4 * BS


def _phase(pool: Pool) -> Phase:
    return pool.txn.phase          # (read afresh: mypy would narrow the property)


async def _reimported_objects(ds: DiskSet) -> list[dict[str, object]]:
    pool = await Pool.open(ds.open())
    try:
        return sorted((o for o in pool.objects().values() if "tag" in o),
                      key=lambda o: str(o["tag"]))
    finally:
        await pool.close()


async def test_a_group_commit_is_one_journal_entry_synced_before_it_returns(
        disks: Disks) -> None:
    """Invariant 1: concurrent commits share one journal entry, and every commit returns
    after that entry was written and then synced on the member; invariant 3: every op
    applied is in it (the re-import sees them all)."""
    ds = disks(1)
    wlog = WriteLog()
    pool = await Pool.create("p", [RecordingDevice(d, 0, wlog) for d in ds.create()],
                             extent_size=EXT)
    try:
        before = pool.statistics().commits
        for n in range(3):
            pool.put_object({"tag": f"t{n}"})
        assert len(pool.txn.pending) == 3 and pool.txn.committed < pool.txn.applied
        start = len(wlog.entries)
        returned: list[int] = []

        async def commit() -> None:
            await pool.commit()
            returned.append(wlog.mark("commit returned"))
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(commit)
        assert pool.statistics().commits == before + 1          # one entry for all three
        assert pool.txn.pending == [] and pool.txn.committed == pool.txn.applied
        assert _phase(pool) is Phase.OPEN
        lo = pool.layout.journal_offset
        hi = lo + pool.layout.journal_size
        events = wlog.entries[start:]
        journal = [e.seq for e in events if e.kind == "write" and lo <= e.offset < hi]
        assert len(journal) == 1
        synced = [e.seq for e in events if e.kind == "sync" and e.seq > journal[0]]
        assert synced and all(synced[0] < r for r in returned), "returned before the sync"
    finally:
        await pool.close()
    assert [o["tag"] for o in await _reimported_objects(ds)] == ["t0", "t1", "t2"]


async def test_a_failed_journal_write_fails_the_pool_once_and_refuses_all_io(
        disks: Disks, caplog: pytest.LogCaptureFixture) -> None:
    """Invariant 4: a journal entry that could not be written puts the pool in FAILED
    once, with the reason; every later commit, read, write and metadata op is refused with
    PoolFailed and changes nothing; a second ``fail`` keeps the first reason. Invariant 5:
    close from FAILED, then again. DESIGN invariant 2: the re-import holds the last
    committed state exactly (the volume byte-exact, the uncommitted object absent)."""
    ds = disks(1)
    faulty = [FaultyDevice(d) for d in ds.create()]
    pool = await Pool.create("p", faulty, extent_size=EXT)
    data = random.Random(5).randbytes(SIZE)
    vm = VolumeManager(pool)
    vol = await vm.create("v", SIZE, block_size=BS)
    await vol.write(0, data)
    await vol.flush()
    map_id = next(int(o["map"]) for o in pool.objects().values() if o.get("type") == "volume")
    pool.put_object({"tag": "lost"})
    faulty[0].write_error_rate = 1.0
    caplog.set_level(logging.ERROR, logger="pool.txn")
    with pytest.raises(PoolFailed, match="commit failed: injected I/O error"):
        await pool.commit()
    faulty[0].write_error_rate = 0.0       # FAILED holds even once the device would work
    assert _phase(pool) is Phase.FAILED
    reason = pool.txn.failed
    assert reason is not None and reason.startswith("journal commit ")
    pool.fail("something later")
    assert pool.txn.failed == reason
    assert sum("refuses all I/O" in r.getMessage() for r in caplog.records) == 1
    objects, txg = pool.objects(), pool.state.txg
    refused = f"stopped after a failed metadata write \\({reason}\\)"
    with pytest.raises(PoolFailed, match=refused):
        await pool.commit()
    with pytest.raises(PoolFailed, match=refused):
        await pool.read_blocks(map_id, [0], BS)
    with pytest.raises(PoolFailed, match=refused):
        await pool.write_blocks(map_id, pool.default_profile, False, [(0, bytes(BS))])
    with pytest.raises(PoolFailed, match=refused):
        pool.put_object({"tag": "refused"})
    assert pool.read_blocks_nowait(map_id, [0], BS) is None
    assert pool.objects() == objects and pool.state.txg == txg
    assert pool.statistics().state == "failed"
    await pool.close()
    assert _phase(pool) is Phase.CLOSED and pool.closed and pool.txn.failed == reason
    await pool.close()                        # again: nothing happens
    assert _phase(pool) is Phase.CLOSED
    with pytest.raises(StorageError, match="is closed"):
        await pool.commit()
    assert await _reimported_objects(ds) == []
    again = await Pool.open(ds.open())
    try:
        assert await VolumeManager(again).get("v").read(0, SIZE) == data
    finally:
        await again.close()


async def test_the_last_member_going_away_fails_the_pool_through_fail(
        disks: Disks) -> None:
    """Invariant 4, another way in: faulting the only member (``Pool.fault``) fails the
    pool with that reason, and I/O is refused."""
    ds = disks(1)
    pool = await Pool.create("p", ds.create(), extent_size=EXT)
    try:
        pool.fault(0, "pulled")
        assert _phase(pool) is Phase.FAILED
        assert pool.txn.failed == "no member left (pulled)"
        with pytest.raises(PoolFailed, match=r"no member left \(pulled\)"):
            pool.put_object({"tag": "x"})
    finally:
        await pool.close()
    assert _phase(pool) is Phase.CLOSED


async def test_close_from_open_commits_and_is_final(disks: Disks) -> None:
    """Invariant 5: close from OPEN checkpoints what was applied (DESIGN invariant 1), then
    refuses everything; a second close and a late ``fail`` change nothing."""
    ds = disks(2)
    pool = await Pool.create("p", ds.create(), profile="mirror:2", extent_size=EXT)
    gen = pool.state.generation
    pool.put_object({"tag": "kept"})
    await pool.close()
    assert _phase(pool) is Phase.CLOSED and pool.txn.failed is None
    assert pool.state.generation == gen + 1 and pool.txn.pending == []
    await pool.close()
    pool.fail("late")
    assert _phase(pool) is Phase.CLOSED and pool.txn.failed is None
    with pytest.raises(StorageError, match="is closed"):
        pool.put_object({"tag": "refused"})
    assert [o["tag"] for o in await _reimported_objects(ds)] == ["kept"]
