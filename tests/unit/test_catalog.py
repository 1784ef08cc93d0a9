"""The catalog: objects and block maps (pool.catalog invariants 1-5; DESIGN invariants 6,
7 and 9), on a pool of real files."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pool import Pool
from pool.errors import PoolFailed, StorageError
from tests.conftest import DiskSet

Disks = Callable[..., DiskSet]
EXT = 1 << 20
BS = 64 << 10
BLOCKS = 24            # 1.5 MiB: more than one segment of 1 MiB extents


def _snapshot(pool: Pool) -> tuple[object, ...]:
    st = pool.state
    return (pool.objects(), sorted(st.maps), st.next_id, len(pool.txn.pending),
            len(st.forest.nodes), len(st.segments))


async def test_refused_changes_change_nothing(disks: Disks) -> None:
    """Invariant 1: a clone of a map that does not exist, and every change once the pool
    has failed or closed, is refused and leaves objects, maps, ids and pending ops as
    they were. Invariant 2: an id is never handed out twice."""
    ds = disks(1)
    pool = await Pool.create("p", ds.create(), extent_size=EXT)
    try:
        a = pool.put_object({"tag": "a"})
        pool.delete_object(a)
        b = pool.put_object({"tag": "b"})
        m = pool.create_map()
        assert len({a, b, m}) == 3
        before = _snapshot(pool)
        with pytest.raises(StorageError, match="map 999 does not exist"):
            pool.clone_map(999)
        assert _snapshot(pool) == before
        pool.fail("test: stop here")
        before = _snapshot(pool)
        for change in (lambda: pool.put_object({"tag": "c"}), lambda: pool.delete_object(b),
                       pool.create_map, lambda: pool.clone_map(m),
                       lambda: pool.delete_map(m), lambda: pool.clear_map_range(m, 0, 4)):
            with pytest.raises(PoolFailed, match="test: stop here"):
                change()
            assert _snapshot(pool) == before
    finally:
        await pool.close()
    with pytest.raises(StorageError, match="is closed"):
        pool.create_map()


async def test_clones_share_space_counts_once_and_drops_reap(disks: Disks) -> None:
    """Invariant 3: a clone adds no map node and differs nowhere; invariant 5: a record
    shared by two maps counts once in ``record_space`` and is nobody's exclusive bytes;
    invariant 4: dropping the maps frees, in the same commit, every segment left without
    a live record (only the open one stays)."""
    ds = disks(1)
    pool = await Pool.create("p", ds.create(), extent_size=EXT)
    try:
        rng = random.Random(3)
        m = pool.create_map()
        await pool.write_blocks(m, pool.default_profile, False,
                                [(b, rng.randbytes(BS)) for b in range(BLOCKS)])
        await pool.commit()
        assert len(pool.state.segments) >= 2
        used = pool.stored_bytes(m)
        assert used >= BLOCKS * BS and pool.record_space() == (used, 0)
        assert pool.exclusive_bytes(m) == used
        nodes = len(pool.state.forest.nodes)
        c = pool.clone_map(m)
        assert len(pool.state.forest.nodes) == nodes and pool.diff_maps(m, c) == []
        assert pool.mapped_count(c) == BLOCKS and pool.stored_bytes(c) == used
        assert pool.record_space() == (used, used)
        assert pool.exclusive_bytes(m) == pool.exclusive_bytes(c) == 0
        pool.clear_map_range(c, 0, BLOCKS // 2)
        assert pool.diff_maps(m, c) == list(range(BLOCKS // 2))
        assert pool.mapped_among(c, [0, BLOCKS - 1]) == {BLOCKS - 1}
        half = pool.stored_bytes(c)
        assert pool.record_space() == (used, half) and pool.exclusive_bytes(m) == used - half
        pool.delete_map(m)
        pool.delete_map(c)
        await pool.commit()
        assert pool.record_space() == (0, 0) and pool.statistics().live_bytes == 0
        assert len(pool.state.segments) == 1        # the open one, empty
    finally:
        await pool.close()
