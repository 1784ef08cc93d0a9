"""Blocks a small write rewrote enter the record cache as they are written back (writer
invariant 6, buffer invariant 7, record cache invariant 1): a 4 KiB read after 4 KiB
writes costs no record read and no checksum, and is byte-exact; whole blocks written from
the caller's bytes are not kept; a writeback that fails puts copies back, so what the
cache holds for a record never changes. Real file devices; faults from a device wrapper."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pool import Pool, writer
from pool.errors import MediumError
from pool.faults import FaultyDevice
from tests.conftest import DiskSet
from tests.kit.poolkit import fail_stores_after
from volumes import VolumeManager

BS = 64 << 10
KiB = 1 << 10


async def test_small_writes_are_read_back_from_the_cache(
        disks: Callable[..., DiskSet]) -> None:
    """4 KiB written into 16 blocks (read-modify-write) and 4 whole blocks, flushed: each
    4 KiB reads back byte-exact from the record cache (no record read), the rest of each
    rewritten block too, and a further small write's read-modify-write reads it there
    (its new version then replaces the old one in the cache); the whole blocks are read
    from the devices."""
    pool = await Pool.create("p", disks(1).create(), profile="plain", extent_size=1 << 20)
    try:
        vol = await VolumeManager(pool).create("v", 32 * BS, block_size=BS)
        base = random.Random(1).randbytes(32 * BS)
        await vol.write(0, base)
        await vol.flush()
        pool.record_cache.clear()
        rng = random.Random(2)
        want = bytearray(base)
        for b in range(16):
            off = b * BS + rng.randrange(0, BS - 4 * KiB, 512)
            piece = rng.randbytes(4 * KiB)
            await vol.write(off, piece)
            want[off:off + len(piece)] = piece
        whole = rng.randbytes(4 * BS)
        await vol.write(16 * BS, whole)
        want[16 * BS:20 * BS] = whole
        await vol.flush()
        assert pool.record_cache.nbytes == 16 * BS      # the 16 rewritten blocks only
        before = pool.statistics().records_read
        hits = pool.record_cache.hits
        for b in range(16):
            assert await vol.read(b * BS, BS) == want[b * BS:(b + 1) * BS]
        assert pool.statistics().records_read == before
        assert pool.record_cache.hits == hits + 16
        assert await vol.read(16 * BS, 4 * BS) == whole
        assert pool.statistics().records_read == before + 4
        # A second small write into a rewritten block reads it from the cache too.
        hits = pool.record_cache.hits
        old_block = bytes(want[3 * BS:4 * BS])
        await vol.write(3 * BS + 10, b"again")
        want[3 * BS + 10:3 * BS + 15] = b"again"
        assert pool.record_cache.hits == hits + 1
        assert pool.statistics().records_read == before + 4
        # The buffer patched a copy: the cache still holds the record the map points at
        # (what a snapshot taken now reads), unchanged.
        cached = pool.cached_block(vol._buf.map_id, 3)
        assert cached is not None and bytes(cached) == old_block
        await vol.flush()
        # Writer invariant 6: the version it replaced left the cache (memory reused).
        assert pool.record_cache.nbytes == 16 * BS
        assert await vol.read(0, 32 * BS) == want
    finally:
        await pool.close()
    pool = await Pool.open(disks(1).open())     # what the devices hold, no cache
    try:
        assert await VolumeManager(pool).get("v").read(0, 32 * BS) == want
    finally:
        await pool.close()


async def test_a_cached_block_never_changes(disks: Callable[..., DiskSet],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffer invariant 7: a writeback of 12 rewritten blocks in batches of 4 fails on the
    third batch; the first two batches stay mapped and cached. The blocks go back to the
    buffer as copies: writing into them again changes the buffer, never what the cache
    holds for the records the map points at."""
    monkeypatch.setattr(writer, "PIPELINE_BYTES", 4 * BS)
    monkeypatch.setattr(writer, "PIPELINE_MIN", 1)
    ds = disks(6)
    faulty = [FaultyDevice(d, seed=i) for i, d in enumerate(ds.create())]
    pool = await Pool.create("p", list(faulty), profile="ec:4+2", extent_size=1 << 20)
    try:
        pool.member_health.threshold = 10 ** 6     # count the failures, fault nobody
        vol = await VolumeManager(pool).create("v", 12 * BS, block_size=BS)
        await vol.write(0, bytes(range(256)) * (12 * BS // 256))
        await vol.flush()
        first = [b"a%02d" % b for b in range(12)]
        for b in range(12):
            await vol.write(b * BS + 100, first[b])
        want = [await vol.read(b * BS, BS) for b in range(12)]
        pool.record_cache.clear()                  # (the read-modify-writes' reads)
        undo = fail_stores_after(pool, faulty, 2)
        with pytest.raises(MediumError):
            await vol.flush()
        assert undo() == 3
        assert pool.record_cache.nbytes == 8 * BS  # the two batches that were stored
        for b in range(12):                        # patched again, in the buffer
            await vol.write(b * BS + 100, b"B%02d" % b)
        map_id = vol._buf.map_id
        hits = pool.record_cache.hits
        got = await pool.read_blocks(map_id, list(range(8)), BS)
        assert pool.record_cache.hits == hits + 8
        assert [bytes(g) for g in got if g is not None] == want[:8]
        again = [bytearray(x) for x in want]
        for b in range(12):
            again[b][100:103] = b"B%02d" % b
        assert [await vol.read(b * BS, BS) for b in range(12)] == again
        await vol.flush()
        assert [await vol.read(b * BS, BS) for b in range(12)] == again
    finally:
        await pool.close()


async def test_one_call_cached_read(disks: Callable[..., DiskSet]) -> None:
    """``Volume.read_cached_nowait`` (FUSE's 4 KiB read in one call) answers a record-cache
    hit as a read-only view, byte-exact, and counts it; it answers None -- leaving the
    general path to answer -- when the block's newest version is in the write buffer
    (rule W2), when the record is not cached, for a hole, for a range that crosses a block
    or leaves the volume, and once the volume is deleted. Nothing is changed by a None."""
    pool = await Pool.create("p", disks(1).create(), profile="plain", extent_size=1 << 20)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", 8 * BS, block_size=BS)
        base = random.Random(3).randbytes(6 * BS)          # blocks 6-7 stay holes
        await vol.write(0, base)
        await vol.flush()
        pool.record_cache.clear()
        for b in range(4):                                  # rewritten: cached at writeback
            await vol.write(b * BS + 512, b"x" * 512)
        await vol.flush()
        want = bytearray(base)
        for b in range(4):
            want[b * BS + 512:b * BS + 1024] = b"x" * 512
        reads = vol.statistics().reads
        hit = vol.read_cached_nowait(2 * BS + 4 * KiB, 4 * KiB)
        assert isinstance(hit, memoryview) and hit.readonly
        assert bytes(hit) == want[2 * BS + 4 * KiB:2 * BS + 8 * KiB]
        got = vol.read_cached_nowait(BS + 256, 1024)
        assert got is not None and bytes(got) == want[BS + 256:BS + 1280]
        assert vol.statistics().reads == reads + 2
        # The buffer holds a newer version of block 1: not answered from the cache.
        await vol.write(BS + 600, b"new")
        assert vol.read_cached_nowait(BS + 256, 1024) is None
        want[BS + 600:BS + 603] = b"new"
        assert await vol.read(BS + 256, 1024) == want[BS + 256:BS + 1280]
        hits = pool.record_cache.hits
        assert vol.read_cached_nowait(5 * BS, 4 * KiB) is None      # never cached
        assert vol.read_cached_nowait(6 * BS, 4 * KiB) is None      # a hole
        assert vol.read_cached_nowait(3 * BS - 10, 20) is None      # crosses a block
        assert vol.read_cached_nowait(8 * BS - 10, 20) is None      # leaves the volume
        assert vol.read_cached_nowait(-1, 20) is None
        assert vol.statistics().reads == reads + 3                  # the awaited read
        assert pool.record_cache.hits == hits
        await vol.flush()
        await vm.delete("v")
        assert vol.read_cached_nowait(0, 4 * KiB) is None
    finally:
        await pool.close()
