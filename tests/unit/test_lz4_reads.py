"""Large reads of lz4-compressed blocks into the caller's buffer (``Volume.readinto``,
``Pool.read_blocks_into``): every fragment is read and verified, then decompressed
straight into its place (issue 27). Byte-exact
against what was written, holes and record-cache hits included; a fragment that fails its
checksum is never decompressed into the answer (pool.reader invariant 1; DESIGN invariant
4); nothing writes into the buffer once the read has returned, even a cancelled one."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio

from pool import Pool
from pool.errors import MediumError
from pool.state import ENTRY
from tests.conftest import DiskSet
from tests.kit.poolkit import BS, corrupt, fragments
from volumes import Volume, VolumeManager

N = 24                      # blocks in the volume


def _text(n: int, seed: int) -> bytes:
    """Log-like bytes that lz4 packs well (so every block is stored compressed)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += f"{rng.randrange(10**6):06d} level=info pool=p seg={rng.randrange(99)}\n".encode()
    return bytes(out[:n])


async def _rotten(ds: DiskSet, profile: str, where: tuple[int, int],
                  seed: int) -> tuple[Pool, bytearray]:
    """``_lz4_volume`` with fragment ``where`` (block, column) corrupted on its member,
    reopened; the pool and the model."""
    pool, _vol, model = await _lz4_volume(ds, profile)
    member, off, length = fragments(pool)[where]
    await pool.close()
    corrupt(ds, member, off, length, random.Random(seed))
    return await Pool.open(ds.open()), model


async def _lz4_volume(ds: DiskSet, profile: str) -> tuple[Pool, Volume, bytearray]:
    """A volume of N compressed blocks: 0-9 and 12-20 written (two flushes), 10-11 and
    21-23 holes; its model."""
    pool = await Pool.create("p", ds.create(), profile=profile, extent_size=1 << 20)
    vol = await VolumeManager(pool).create("v", N * BS, block_size=BS, compression=True)
    model = bytearray(N * BS)
    for lo, hi, seed in ((0, 10, 1), (12, 21, 2)):
        data = _text((hi - lo) * BS, seed)
        await vol.write(lo * BS, data)
        model[lo * BS:hi * BS] = data
        await vol.flush()
    map_id = vol.map_id
    flags = [ENTRY.unpack(raw)[3] for _b, raw in pool.state.forest.items(map_id)]
    assert len(flags) == 19 and all(flags)          # every block stored lz4-compressed
    return pool, vol, model


@pytest.mark.parametrize("profile", ["plain", "ec:2+1"])
async def test_large_lz4_readinto_is_exact(disks: Callable[..., DiskSet],
                                           profile: str) -> None:
    pool, vol, model = await _lz4_volume(disks(3), profile)
    try:
        assert await vol.read(5 * BS, 100) == model[5 * BS:5 * BS + 100]  # block 5 cached
        read0 = pool.counters["records_read"]
        buf = bytearray(b"\xee" * (N * BS))
        await vol.readinto(0, buf)
        assert buf == model                                 # holes zeroed, hit copied
        assert pool.counters["records_read"] == read0 + 18  # 19 records, one cached
        small = bytearray(2 * BS)
        await vol.readinto(12 * BS, small)
        assert small == model[12 * BS:14 * BS]
    finally:
        await pool.close()


async def test_bad_compressed_fragment_is_never_expanded_into_the_answer(
        disks: Callable[..., DiskSet]) -> None:
    ds = disks(3)
    pool, model = await _rotten(ds, "plain", (3, 0), 5)
    try:
        vol = VolumeManager(pool).get("v")
        buf = bytearray(N * BS)
        with pytest.raises(MediumError):            # plain: nothing to rebuild from
            await vol.readinto(0, buf)
        assert pool.counters["unreadable_records"] == 1
        ok = bytearray(3 * BS)                      # the blocks around it still read
        await vol.readinto(0, ok)
        assert ok == model[:3 * BS]
    finally:
        await pool.close()


async def test_degraded_compressed_read_is_rebuilt_exactly(
        disks: Callable[..., DiskSet]) -> None:
    ds = disks(3)
    pool, model = await _rotten(ds, "ec:2+1", (14, 1), 6)
    try:
        vol = VolumeManager(pool).get("v")
        buf = bytearray(N * BS)
        await vol.readinto(0, buf)
        assert buf == model
        assert pool.counters["degraded_reads"] == 1
        assert pool.counters["repaired_fragments"] == 1
    finally:
        await pool.close()


async def test_cancelled_lz4_read_writes_nothing_after_it_returns(
        disks: Callable[..., DiskSet]) -> None:
    pool, vol, model = await _lz4_volume(disks(3), "plain")
    try:
        for _ in range(5):
            buf = bytearray(N * BS)
            with trio.move_on_after(0):
                await vol.readinto(0, buf)
            after = bytes(buf)
            await trio.sleep(0.02)                 # a worker still writing would show
            assert bytes(buf) == after
        await vol.readinto(0, buf)
        assert buf == model
    finally:
        await pool.close()
