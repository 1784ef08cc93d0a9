"""The record cache (pool.readcache) on its own: its numbered invariants, against a plain
dict-and-list model of an LRU, and through a real pool that the cache serves repeated
small reads without device I/O."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.errors import MediumError
from pool.readcache import RecordCache
from tests.conftest import DiskSet
from tests.kit.poolkit import BS, corrupt, filled_pool, fragments
from volumes import VolumeManager

DiskSetMaker = Callable[..., DiskSet]


@given(limit=st.integers(0, 64),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 20)),
                    max_size=60))
@settings(max_examples=150, deadline=None)
def test_cache_matches_an_lru_model(limit: int, ops: list[tuple[bool, int, int]]) -> None:
    """Invariants 2-5: bounded bytes, put of a held key changes nothing, LRU eviction,
    every hit counted."""
    cache = RecordCache(limit)
    model: dict[bytes, bytes] = {}
    order: list[bytes] = []          # least recently used first
    hits = 0
    for is_put, k, n in ops:
        key = bytes([k])
        if is_put:
            data = bytes([k]) * n
            if key not in model:
                model[key] = data
                order.append(key)
                while sum(map(len, model.values())) > limit:
                    del model[order.pop(0)]
            cache.put(key, data)
        else:
            got = cache.get(key)
            assert got == model.get(key)
            if key in model:
                hits += 1
                order.remove(key)
                order.append(key)
        assert cache.nbytes == sum(map(len, model.values())) <= max(limit, 0)
        assert len(cache) == len(model) and all(k in cache for k in model)
        assert cache.hits == hits


def test_a_put_never_replaces_and_clear_forgets() -> None:
    """Invariant 3: a second put under the same key keeps the first data and its age."""
    cache = RecordCache(8)
    cache.put(b"a", b"1234")
    cache.put(b"b", b"5678")
    cache.put(b"a", b"xxxx")              # no change, and "a" stays the oldest
    assert cache.get(b"a") == b"1234"      # now "b" is the oldest
    cache.put(b"c", b"9")
    assert b"b" not in cache and cache.get(b"a") == b"1234" and cache.nbytes == 5
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.hits == 2


async def test_a_hit_reaches_no_device_and_a_miss_is_verified(disks: DiskSetMaker) -> None:
    """Through a real pool on files: a repeated small read is a hit, counted by
    foreground_records, and reaches no device (the record, corrupted on disk behind the
    pool's back, is still served right); once the cache is cleared the read goes to the
    device again and the corruption is caught (DESIGN invariant 4: only verified data
    ever entered the cache, readcache invariant 1)."""
    ds = disks(1)
    pool, data = await filled_pool(ds, "plain", 2 * BS)
    try:
        vol = VolumeManager(pool).get("v")
        assert await vol.read(0, BS) == data[:BS]           # a miss: read and kept
        before, hits = pool.reader.activity(), pool.record_cache.hits
        read = pool.statistics().records_read
        corrupt(ds, *fragments(pool)[(0, 0)], random.Random(3))
        assert await vol.read(0, BS) == data[:BS]           # a hit: no device read
        assert pool.record_cache.hits == hits + 1
        assert pool.reader.activity() == before + 1
        assert pool.statistics().records_read == read
        pool.record_cache.clear()
        with pytest.raises(MediumError):
            await vol.read(0, BS)
        assert await vol.read(BS, BS) == data[BS:]          # the other block is intact
    finally:
        await pool.close()
