"""Large reads of lz4-compressed blocks into the caller's buffer (``Volume.readinto``,
``RecordReader.read_blocks_into``): every fragment is read and verified on the event loop,
then one worker thread decompresses all of the read's blocks (issue 27). Byte-exact
against what was written, holes and record-cache hits included; a fragment that fails its
checksum is never decompressed into the answer (pool.reader invariant 1; DESIGN invariant
4); nothing writes into the buffer once the read has returned, even a cancelled one."""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Callable
from typing import Any

import pytest
import trio

from pool import Pool, reader
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


class _Counting(concurrent.futures.ThreadPoolExecutor):
    """A real executor that counts what it is given (to tell the thread path ran)."""

    def __init__(self) -> None:
        super().__init__(max_workers=2, thread_name_prefix="test-lz4")
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


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
async def test_large_lz4_readinto_is_exact_and_expands_in_one_thread_hop(
        disks: Callable[..., DiskSet], profile: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pool, vol, model = await _lz4_volume(disks(3), profile)
    counting = _Counting()
    monkeypatch.setattr(reader, "_expanders", counting)
    try:
        assert await vol.read(5 * BS, 100) == model[5 * BS:5 * BS + 100]  # block 5 cached
        read0 = pool.counters["records_read"]
        buf = bytearray(b"\xee" * (N * BS))
        await vol.readinto(0, buf)
        assert buf == model                                 # holes zeroed, hit copied
        assert counting.submitted == 1                      # one hop for the whole read
        assert pool.counters["records_read"] == read0 + 18  # 19 records, one cached
        # A read below THREAD_EXPAND expands on the event loop: no hop.
        small = bytearray(2 * BS)
        await vol.readinto(12 * BS, small)
        assert small == model[12 * BS:14 * BS] and counting.submitted == 1
    finally:
        counting.shutdown()
        await pool.close()


async def test_bad_compressed_fragment_is_never_expanded_into_the_answer(
        disks: Callable[..., DiskSet]) -> None:
    ds = disks(3)
    pool, vol, model = await _lz4_volume(ds, "plain")
    member, off, length = fragments(pool)[(3, 0)]
    await pool.close()
    corrupt(ds, member, off, length, random.Random(5))
    pool = await Pool.open(ds.open())
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
    pool, vol, model = await _lz4_volume(ds, "ec:2+1")
    member, off, length = fragments(pool)[(14, 1)]
    await pool.close()
    corrupt(ds, member, off, length, random.Random(6))
    pool = await Pool.open(ds.open())
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
