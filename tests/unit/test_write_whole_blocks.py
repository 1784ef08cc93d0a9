"""Whole-block writes taken at once (``Volume.write_nowait`` -> ``VolumeBuffer.put_whole``,
the path of FUSE and NBD 1 MiB writes): the buffer's counts and the pool's reservations
stay exact (buffer invariant 2, rule S4), zero blocks become holes (DESIGN invariant 6),
every byte reads back exactly before and after a flush and a re-import (DESIGN invariant
1), and a write the path refuses changes nothing (DESIGN invariant 9)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from pool import Device, MemoryDevice, Pool
from pool.device import FileDevice
from volumes import NotFound, ReadOnly, Volume, VolumeManager
from volumes import volume as volume_module

MiB = 1 << 20
BS = 64 << 10


@pytest.fixture
def own_buffer(monkeypatch: pytest.MonkeyPatch) -> volume_module.WriteBuffer:
    """A budget of this test's own (64 MiB), so that its counts are this test's alone."""
    buf = volume_module.WriteBuffer(64 * MiB)
    monkeypatch.setattr(volume_module, "WRITE_BUFFER", buf)
    return buf


def _counts(vol: Volume, pool: Pool) -> tuple[int, int, int, dict[int, object]]:
    buf = vol._buf
    return (buf.dirty_blocks, buf.write_buffer.used, pool.space.reserved, dict(buf.dirty))


def _assert_exact_counts(vol: Volume, pool: Pool, reserved0: int) -> None:
    """Buffer invariant 2 and rule S4: one reservation of ``cost`` per buffered data block,
    the budget counting each in bytes, holes counting nothing."""
    buf = vol._buf
    data = sum(1 for v in buf.dirty.values() if v is not None)
    assert buf.dirty_blocks == data
    assert buf.write_buffer.used == data * BS
    assert pool.space.reserved == reserved0 + data * buf.cost


async def test_whole_block_writes_keep_counts_bytes_and_holes_exact(
        tmp_path: Path, own_buffer: volume_module.WriteBuffer) -> None:
    rng = random.Random(27)
    size = 4 * MiB
    paths = [str(tmp_path / f"d{i}") for i in range(3)]
    pool = await Pool.create("wb", [FileDevice(p, create_size=64 * MiB) for p in paths],
                             profile="ec:2+1", extent_size=4 * MiB)
    vm = VolumeManager(pool)
    vol = await vm.create("v", size, block_size=BS, compression=False)
    reserved0 = pool.space.reserved
    model = bytearray(size)
    for step in range(200):
        nblocks = rng.randint(1, 16)
        first = rng.randrange(0, size // BS - nblocks + 1)
        parts = []
        for _ in range(nblocks):
            kind = rng.random()
            parts.append(bytes(BS) if kind < 0.25 else rng.randbytes(BS))
        payload = b"".join(parts)
        # bytes (kept as views), a bytearray the caller changes afterwards (copied), or
        # a view of bytes.
        shape = step % 3
        data: bytes | bytearray | memoryview = (
            payload if shape == 0 else bytearray(payload) if shape == 1
            else memoryview(payload))
        assert vol.write_nowait(first * BS, data)
        if isinstance(data, bytearray):
            data[:] = bytes(len(data))          # the volume copied it: no effect
        model[first * BS:first * BS + len(payload)] = payload
        _assert_exact_counts(vol, pool, reserved0)
        for i, part in enumerate(parts):        # zero blocks are holes (invariant 6)
            held = vol._buf.dirty[first + i]
            assert (held is None) == (part == bytes(BS))
        if step % 40 == 39:
            assert await vol.read(0, size) == bytes(model)
    assert await vol.read(0, size) == bytes(model)
    await vol.flush()
    assert vol._buf.dirty_blocks == 0 and own_buffer.used == 0
    assert pool.space.reserved == reserved0
    assert await vol.read(0, size) == bytes(model)
    await pool.close()
    # What the flush made durable is what an import of the devices finds (invariant 1).
    pool = await Pool.open([FileDevice(p) for p in paths])
    try:
        assert await VolumeManager(pool).get("v").read(0, size) == bytes(model)
    finally:
        await pool.close()


async def _mem_pool(device_size: int = 64 * MiB) -> Pool:
    devs: list[Device] = [MemoryDevice(device_size, path=f"w{i}") for i in range(3)]
    return await Pool.create("w", devs, profile="ec:2+1", extent_size=MiB)


async def test_refused_whole_block_writes_change_nothing(
        monkeypatch: pytest.MonkeyPatch, own_buffer: volume_module.WriteBuffer) -> None:
    pool = await _mem_pool()
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", 8 * MiB, block_size=BS)
        first = random.Random(1).randbytes(MiB)
        assert vol.write_nowait(0, first)
        before = _counts(vol, pool)
        # A partial write of block 3 holds its lock (it reads the block): a write over
        # it waits, so it is not taken at once (buffer invariant 6).
        vol._buf.locks[3] = trio.Lock()
        assert not vol.write_nowait(0, bytes(b"x" * MiB))
        assert _counts(vol, pool) == before
        del vol._buf.locks[3]
        # Past the writeback threshold it is the waiting path's turn.
        own_buffer.limit = 0
        monkeypatch.setattr(volume_module, "WRITEBACK_MIN", MiB)
        assert not vol.write_nowait(MiB, bytes(b"y" * MiB))
        assert _counts(vol, pool) == before
        own_buffer.limit = 64 * MiB
        assert await vol.read(0, MiB) == first
        # A deleted volume and a read-only view raise, as ``write`` does (the snapshot
        # writes the buffer back first).
        await vm.snapshot("v", "s")
        before = _counts(vol, pool)
        with pytest.raises(ReadOnly):
            vm.snapshot_volume("v", "s").write_nowait(0, bytes(b"z" * BS))
        assert _counts(vol, pool) == before
        vol.mark_deleted()
        with pytest.raises(NotFound):
            vol.write_nowait(0, bytes(b"z" * BS))
    finally:
        await pool.close()


async def test_a_full_pool_refuses_at_once_and_changes_nothing(
        own_buffer: volume_module.WriteBuffer) -> None:
    pool = await _mem_pool(device_size=16 * MiB)
    try:
        vol = await VolumeManager(pool).create("v", 64 * MiB, block_size=BS,
                                               compression=False)
        rng = random.Random(2)
        taken = 0
        while vol.write_nowait(taken * MiB, rng.randbytes(MiB)):
            taken += 1
            assert taken < 64, "a 16 MiB x 3 pool took 64 MiB"
        before = _counts(vol, pool)
        assert not vol.write_nowait(taken * MiB, rng.randbytes(MiB))
        assert _counts(vol, pool) == before
        reserved0 = pool.space.reserved - before[0] * vol._buf.cost
        _assert_exact_counts(vol, pool, reserved0)
    finally:
        await pool.close()
