"""The write and read paths (pool.writer, pool.reader) through a real Pool on file devices:
their numbered invariants ("writer invariant N", "reader invariant N") and DESIGN's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from pool.device import FileDevice
from pool.errors import MediumError
from pool.pool import Pool
from pool.profile import Profile
from pool.state import ENTRY
from pool.tuning import PoolTuning

BS = 64 * 1024
PROF = Profile(2, 1)


async def _pool(tmp_path: Path, cache: int = 1 << 20) -> Pool:
    devs = [FileDevice(str(tmp_path / f"d{i}"), create_size=64 << 20) for i in range(3)]
    return await Pool.create("dp", devs, profile="ec:2+1", extent_size=1 << 20,
                             tuning=PoolTuning(record_cache=cache, discard_freed=False))


async def test_records_are_appended_and_referenced_only_once_written(tmp_path: Path) -> None:
    """Writer invariants 1, 2 (DESIGN 1, 3): each store appends after the last record of
    the open segment, never at an offset used before; overwrites get new records; the
    map points at a record only once ``write_blocks`` returned; byte-exact read-back."""
    pool = await _pool(tmp_path)
    m = pool.create_map()
    seen: set[tuple[int, int]] = set()
    datas: dict[int, bytes] = {}
    for rnd in range(6):
        items = [(b, os.urandom(BS)) for b in range(rnd % 3, 12, 2)]
        await pool.write_blocks(m, PROF, False, items)
        datas.update(items)
        for b, _d in items:
            raw = pool.state.forest.get(m, b)
            assert raw is not None
            seg, off = ENTRY.unpack(raw)[:2]
            assert (seg, off) not in seen           # never-used space, every time
            seen.add((seg, off))
            assert off + 1 <= pool.state.segments[seg].fill
    got = await pool.read_blocks(m, sorted(datas), BS)
    assert [bytes(v) for v in got if v is not None] == [datas[b] for b in sorted(datas)]
    await pool.close()


async def test_a_segment_is_pinned_while_its_records_are_in_flight(tmp_path: Path) -> None:
    """Writer invariant 3 (space rule S6): while a store's column writes are in flight its
    segment is pinned (not reaped), and afterwards the pin is gone."""
    pool = await _pool(tmp_path)
    m = pool.create_map()
    pinned: list[bool] = []
    real = pool.store.write

    async def watching(runs):  # type: ignore[no-untyped-def]
        pinned.extend(seg.id in pool.pins for seg, _off, _recs in runs)
        return await real(runs)
    pool.store.write = watching  # type: ignore[method-assign]
    await pool.write_blocks(m, PROF, False, [(0, os.urandom(BS))])
    assert pinned == [True]
    seg = ENTRY.unpack(pool.state.forest.get(m, 0) or b"")[0]
    assert seg not in pool.pins
    await pool.close()


async def test_a_write_that_loses_too_many_columns_fails_and_leaves_nothing(
        tmp_path: Path) -> None:
    """Writer invariant 4 (DESIGN 5): with two of three ec:2+1 members failing their
    writes, the write fails with MediumError and the map is unchanged (the old block
    still reads back)."""
    pool = await _pool(tmp_path)
    m = pool.create_map()
    old = os.urandom(BS)
    await pool.write_blocks(m, PROF, False, [(0, old)])
    await pool.commit()
    before = pool.state.forest.get(m, 0)
    for i in (0, 1):
        dev = pool.devices[i]
        assert dev is not None
        dev.close()                          # every write to it now fails
    with pytest.raises(MediumError, match="cannot lose more than 1 fragments"):
        await pool.write_blocks(m, PROF, False, [(0, os.urandom(BS))])
    assert pool.state.forest.get(m, 0) == before
    assert not any(s in pool.pins for s in pool.state.segments)
    await pool.close()


async def test_small_reads_are_cached_verified_and_large_ones_are_not(tmp_path: Path) -> None:
    """Reader invariants 1, 3: a small read's verified blocks enter the record cache
    under their map entries and are served from it; a larger read's are not cached."""
    pool = await _pool(tmp_path)
    m = pool.create_map()
    datas = {b: os.urandom(BS) for b in range(8)}
    await pool.write_blocks(m, PROF, False, list(datas.items()))
    got = await pool.read_blocks(m, [3], BS)
    assert bytes(got[0] or b"") == datas[3]
    key = pool.state.forest.get(m, 3)
    assert key is not None and key in pool.record_cache
    answered, v = pool.read_block_nowait(m, 3, BS)
    assert answered and bytes(v or b"") == datas[3]
    before = len(pool.record_cache)
    got = await pool.read_blocks(m, [4, 5, 6], BS)
    assert [bytes(x or b"") for x in got] == [datas[4], datas[5], datas[6]]
    assert len(pool.record_cache) == before
    await pool.close()


async def test_a_read_in_a_thread_holds_freed_space_back(tmp_path: Path) -> None:
    """Reader invariant 2 (DESIGN 3, rule S5): a read that waits in a thread counts as
    in flight with the store for its whole duration."""
    pool = await _pool(tmp_path, cache=0)
    m = pool.create_map()
    await pool.write_blocks(m, PROF, False, [(0, os.urandom(BS))])
    await pool.commit()
    held: list[int] = []
    gate = trio.Event()
    real = trio.to_thread.run_sync
    in_flight = pool.store.readers

    async def slow(fn, *args, **kw):  # type: ignore[no-untyped-def]
        held.append(sum(in_flight.values()))
        await gate.wait()
        return await real(fn, *args, **kw)
    seg = ENTRY.unpack(pool.state.forest.get(m, 0) or b"")[0]
    dev = pool.devices[pool.state.segments[seg].extents[0][0]]
    assert isinstance(dev, FileDevice)
    dev.drop_cache(0, dev.size)              # not page-cached: the read takes a thread
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trio.to_thread, "run_sync", slow)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.read_blocks, m, [0], BS)
            await trio.testing.wait_all_tasks_blocked()
            assert held == [1] and sum(in_flight.values()) == 1
            gate.set()
    assert sum(in_flight.values()) == 0
    await pool.close()
