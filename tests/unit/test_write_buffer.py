"""The write buffer shared by all volumes (volumes.volume.WriteBuffer, DESIGN §4): a
working set that fits is rewritten in memory and reaches the pool once, at the flush;
volumes share the budget; partial writes patch buffered blocks in place, also while
writebacks run and other writers race; every byte reads back exactly."""

from __future__ import annotations

import random
import threading

import pytest
import trio

from pool import Device, MemoryDevice, Pool
from pool.faults import FaultyDevice
from volumes import InvalidArgument, ReadOnly, StorageError, Volume, VolumeManager
from volumes import volume as volume_module

MiB = 1 << 20
BS = 64 << 10


@pytest.fixture
def small_buffer(monkeypatch: pytest.MonkeyPatch) -> volume_module.WriteBuffer:
    """A 4 MiB budget with a 1 MiB per-volume minimum (the defaults are 1/16 of RAM and
    32 MiB), so that the tests cross the thresholds with little data."""
    buf = volume_module.WriteBuffer(4 * MiB)
    monkeypatch.setattr(volume_module, "WRITE_BUFFER", buf)
    monkeypatch.setattr(volume_module, "WRITEBACK_MIN", MiB)
    return buf


async def _pool(*, cold: bool = False) -> Pool:
    """ec:2+1 on RAM disks; ``cold``: every read must wait for the device (as when the
    page cache does not hold it), through FaultyDevice with no faults set."""
    devs: list[Device] = [MemoryDevice(256 * MiB, path=f"wb{i}") for i in range(3)]
    if cold:
        devs = [FaultyDevice(d) for d in devs]
    return await Pool.create("wb", devs, profile="ec:2+1", extent_size=4 * MiB)


def _written(pool: Pool) -> int:
    return pool.statistics().records_written


async def _check(vol: Volume, model: bytearray) -> None:
    assert await vol.read(0, len(model)) == bytes(model)


async def test_rewrites_within_the_buffer_reach_the_pool_once(
        small_buffer: volume_module.WriteBuffer) -> None:
    pool = await _pool()
    try:
        vol = await VolumeManager(pool).create("v", 2 * MiB, block_size=BS)
        model = bytearray(2 * MiB)
        rng = random.Random(5)
        for i in range(1500):
            off = rng.randrange(0, 2 * MiB - 5000)
            n = rng.choice((512, 4096, 4999)) if i % 50 else BS
            data = rng.randbytes(n)
            await vol.write(off, data)
            model[off:off + n] = data
        assert _written(pool) == 0                 # 2 MiB fits: nothing written back yet
        assert small_buffer.used == vol.statistics().dirty_bytes > 0
        await _check(vol, model)
        await vol.flush()
        blocks = sum(1 for b in range(0, 2 * MiB, BS) if any(model[b:b + BS]))
        assert _written(pool) == blocks            # each block once, however often rewritten
        assert small_buffer.used == 0
        await _check(vol, model)
    finally:
        await pool.close()


async def test_volumes_share_the_budget(small_buffer: volume_module.WriteBuffer) -> None:
    pool = await _pool()
    try:
        vm = VolumeManager(pool)
        a = await vm.create("a", 8 * MiB, block_size=BS)
        b = await vm.create("b", 8 * MiB, block_size=BS)
        da, db = random.randbytes(3 * MiB), random.randbytes(4 * MiB)
        await a.write(0, da)
        assert _written(pool) == 0 and small_buffer.used == 3 * MiB
        # b may have what a leaves of the 4 MiB, but never less than the 1 MiB minimum.
        for off in range(0, 4 * MiB, BS):
            await b.write(off, db[off:off + BS])
            assert b.statistics().dirty_bytes <= 2 * MiB      # double buffering at most
        assert _written(pool) > 0
        assert a.statistics().dirty_bytes == 3 * MiB           # a kept its buffer
        assert small_buffer.used <= 5 * MiB
        # Growing past its share (4 MiB less what b holds), a writes back.
        more = random.randbytes(MiB)
        await a.write(3 * MiB, more)
        assert a.statistics().dirty_bytes < 3 * MiB
        assert await a.read(0, 4 * MiB) == da + more and await b.read(0, 4 * MiB) == db
        await a.flush()
        await b.flush()
        assert small_buffer.used == 0
        await vm.delete("a")
        await b.write(0, b"x" * 100)
        assert small_buffer.used == BS
        await vm.delete("b")                       # a deleted volume's buffer is released
        assert small_buffer.used == 0
    finally:
        await pool.close()


async def test_racing_partial_writes_patch_buffered_blocks_exactly(
        small_buffer: volume_module.WriteBuffer) -> None:
    """Many tasks write disjoint 4 KiB slices of the same few blocks, over and over, with
    a budget small enough that writebacks run meanwhile (blocks move to the pool and come
    back as read-modify-writes); readers check the blocks as they go. The last write of
    each slice wins."""
    small_buffer.limit = 0                         # every volume at the 1 MiB minimum
    pool = await _pool()
    try:
        vol = await VolumeManager(pool).create("v", 4 * MiB, block_size=BS)
        model = bytearray(4 * MiB)
        slices = [(blk * BS + s * 4096) for blk in range(48) for s in range(16)]
        done = trio.Event()
        pending: dict[int, bytes] = {}             # slice -> data of the write under way

        async def writer(seed: int) -> None:
            rng = random.Random(seed)
            mine = slices[seed::8]
            for _round in range(4):
                for off in rng.sample(mine, len(mine)):
                    data = rng.randbytes(4096)
                    pending[off] = data
                    await vol.write(off, data)
                    model[off:off + 4096] = data
                    del pending[off]
                    await trio.lowlevel.checkpoint()

        async def reader() -> None:
            rng = random.Random(99)
            while not done.is_set():
                off = rng.choice(slices)
                before = bytes(model[off:off + 4096])
                got = await vol.read(off, 4096)
                # Never torn: the slice as it was, or as the write under way makes it.
                assert got in (before, bytes(model[off:off + 4096]), pending.get(off))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with trio.open_nursery() as writers:
                for seed in range(8):
                    writers.start_soon(writer, seed)
            done.set()
        assert _written(pool) > 0                  # writebacks did run in between
        await _check(vol, model)
        await vol.flush()
        await _check(vol, model)
        assert small_buffer.used == 0
    finally:
        await pool.close()


async def test_write_nowait_takes_only_what_needs_no_wait(
        small_buffer: volume_module.WriteBuffer) -> None:
    small_buffer.limit = 0                         # the volume writes back past 1 MiB
    pool = await _pool(cold=True)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", 4 * MiB, block_size=BS)
        model = bytearray(4 * MiB)
        base = random.randbytes(2 * MiB)
        await vol.write(0, base)
        await vol.flush()
        model[:2 * MiB] = base
        # A part of a block only the pool holds needs a device read: not at once.
        assert not vol.write_nowait(100, b"a" * 10)
        assert vol.statistics().dirty_bytes == 0
        # A part of a hole needs nothing read.
        assert vol.write_nowait(3 * MiB + 100, b"h" * 10)
        model[3 * MiB + 100:3 * MiB + 110] = b"h" * 10
        # Whole blocks can be taken at once, and then parts of them.
        whole = random.randbytes(2 * BS)
        assert vol.write_nowait(BS, whole)
        model[BS:3 * BS] = whole
        assert vol.write_nowait(BS + 5, b"b" * 300)
        model[BS + 5:BS + 305] = b"b" * 300
        # A write reaching a block that needs a read is refused whole, changing nothing.
        assert not vol.write_nowait(3 * BS - 10, b"c" * 20)
        assert await vol.read(0, 4 * MiB) == bytes(model)
        # The same write through ``write`` does it.
        await vol.write(3 * BS - 10, b"c" * 20)
        model[3 * BS - 10:3 * BS + 10] = b"c" * 20
        # Past the writeback threshold it is the waiting path's turn.
        big = random.randbytes(MiB)
        assert not vol.write_nowait(2 * MiB, big)
        assert await vol.read(0, 4 * MiB) == bytes(model)
        await vol.flush()
        assert await vol.read(0, 4 * MiB) == bytes(model)
        # Bad ranges and read-only views raise, as ``write`` does.
        with pytest.raises(InvalidArgument):
            vol.write_nowait(4 * MiB - 10, b"x" * 20)
        await vm.snapshot("v", "s")
        with pytest.raises(ReadOnly):
            vm.snapshot_volume("v", "s").write_nowait(0, bytes(BS))
    finally:
        await pool.close()


async def test_write_nowait_patches_blocks_the_pool_reads_at_once(
        small_buffer: volume_module.WriteBuffer) -> None:
    pool = await _pool()                           # RAM disks: never a device wait
    try:
        vol = await VolumeManager(pool).create("v", MiB, block_size=BS)
        data = bytearray(random.randbytes(MiB))
        await vol.write(0, bytes(data))
        await vol.flush()
        for off in range(7, MiB - 64, 3 * BS + 11):
            assert vol.write_nowait(off, b"p" * 64)
            data[off:off + 64] = b"p" * 64
        assert await vol.read(0, MiB) == bytes(data)
        await vol.flush()
        assert await vol.read(0, MiB) == bytes(data)
    finally:
        await pool.close()


async def test_old_buffered_writes_are_written_back_and_committed(
        small_buffer: volume_module.WriteBuffer) -> None:
    pool = await _pool()
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", MiB, block_size=BS)
        assert vol.buffered_age() == 0.0
        await vol.write(0, b"q" * 5000)
        await trio.sleep(0.05)
        assert vol.buffered_age() >= 0.05
        commits = pool.statistics().commits
        assert await vm.write_back_older_than(10.0) == 0      # not old enough
        assert vol.statistics().dirty_bytes == BS
        assert await vm.write_back_older_than(0.01) == 1
        assert vol.statistics().dirty_bytes == 0 and vol.buffered_age() == 0.0
        assert pool.statistics().commits > commits             # durable, not only written
        assert await vol.read(0, 5000) == b"q" * 5000
    finally:
        await pool.close()


class _HeldSync(FaultyDevice):
    """A device whose sync waits until the test lets it go (a slow cache flush)."""

    def __init__(self, inner: Device, waiting: threading.Event) -> None:
        super().__init__(inner)
        self.go = threading.Event()
        self.go.set()
        self.waiting = waiting

    def sync(self) -> None:
        if not self.go.is_set():
            self.waiting.set()
            self.go.wait(30)
        super().sync()


@pytest.mark.parametrize("how", ["age", "flush"])
async def test_dirty_bytes_drop_only_once_the_commit_is_durable(
        small_buffer: volume_module.WriteBuffer, how: str) -> None:
    """Rule W9: while the commit of an age writeback or a flush waits for the devices'
    sync, the volume still reports its written-back bytes as dirty; 0 only once the
    commit returned. (The old order cleared them when the writeback took the buffer, so an
    observer, like the daemon test that kills the daemon on dirty_bytes == 0, saw a clean
    volume whose data was not durable.)"""
    waiting = threading.Event()
    devs = [_HeldSync(MemoryDevice(256 * MiB, path=f"hs{i}"), waiting) for i in range(3)]
    pool = await Pool.create("hs", list(devs), profile="ec:2+1", extent_size=4 * MiB)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", MiB, block_size=BS)
        await vol.write(BS, b"d" * (2 * BS))
        assert vol.statistics().dirty_bytes == 2 * BS
        commits = pool.statistics().commits
        for d in devs:
            d.go.clear()
        async with trio.open_nursery() as nursery:
            if how == "age":
                nursery.start_soon(vm.write_back_older_than, 0.0)
            else:
                nursery.start_soon(vol.flush)
            try:
                assert await trio.to_thread.run_sync(waiting.wait, 10)
                # The commit is inside a device sync: nothing is durable yet.
                assert pool.statistics().commits == commits
                assert vol.statistics().dirty_bytes == 2 * BS
            finally:
                for d in devs:
                    d.go.set()
        assert pool.statistics().commits > commits
        assert vol.statistics().dirty_bytes == 0
        assert await vol.read(0, 3 * BS) == bytes(BS) + b"d" * (2 * BS)
    finally:
        for d in devs:
            d.go.set()
        await pool.close()


async def test_vectored_and_sparse_reads_never_see_later_patches(
        small_buffer: volume_module.WriteBuffer) -> None:
    """read_vectored and read_sparse hand out buffers a frontend sends later (iSCSI
    Data-In, NBD replies): a partial write that patches the buffered block in place
    afterwards must not show through (readshape invariant 1)."""
    pool = await _pool()
    try:
        vol = await VolumeManager(pool).create("v", 2 * MiB, block_size=BS)
        await vol.write(0, b"a" * (3 * BS))
        await vol.write(100, b"b" * 1000)          # the block is now a patched bytearray
        parts = await vol.read_vectored(0, 3 * BS)
        quick = vol.read_vectored_nowait(50, 2 * BS)
        assert quick is not None
        runs = await vol.read_sparse(0, 3 * BS)
        assert len(runs) == 1 and runs[0][2] is not None
        sparse = runs[0][2]
        before, before_quick = b"".join(parts), b"".join(quick)
        await vol.write(0, b"c" * 2000)            # patches block 0 again, in place
        assert vol.write_nowait(BS + 10, b"d" * 100)
        assert b"".join(parts) == before == b"a" * 100 + b"b" * 1000 + b"a" * (3 * BS - 1100)
        assert b"".join(sparse) == before
        assert b"".join(quick) == before_quick
        assert await vol.read(0, 2000) == b"c" * 2000
    finally:
        await pool.close()


async def test_the_fast_paths_see_the_buffer_after_every_kind_of_writeback(
        small_buffer: volume_module.WriteBuffer) -> None:
    """Buffer invariant 1: the volume's fast paths read and patch the buffer's own dicts
    under their own names, so no writeback (threshold, flush, snapshot, failed, rollback)
    may rebind them. After each, a write_nowait patch of a buffered block and a
    read_sparse_nowait read back exactly, and the pool holds what was acknowledged."""
    devs = [FaultyDevice(MemoryDevice(256 * MiB, path=f"fp{i}")) for i in range(3)]
    pool = await Pool.create("fp", list(devs), profile="ec:2+1", extent_size=4 * MiB)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", 4 * MiB, block_size=BS)
        model = bytearray(4 * MiB)

        async def patch_and_check(step: int) -> None:
            data = bytes([step + 1]) * 3000
            await vol.write(BS + 100, data)                 # buffered as a bytearray
            model[BS + 100:BS + 3100] = data
            nxt = bytes([step + 50]) * 700
            assert vol.write_nowait(BS + 200, nxt)          # the in-place patch
            model[BS + 200:BS + 900] = nxt
            got = vol.read_sparse_nowait(BS, BS)
            assert got is not None
            assert b"".join(bytes(p) for _o, _n, d in got for p in (d or [])) \
                == bytes(model[BS:2 * BS])
            await _check(vol, model)

        await patch_and_check(0)
        big = random.Random(3).randbytes(int(1.5 * MiB))  # past the 1 MiB threshold
        await vol.write(2 * MiB, big)
        model[2 * MiB:2 * MiB + len(big)] = big
        await patch_and_check(1)
        await vol.flush()
        await patch_and_check(2)
        await vm.snapshot("v", "s1")
        await patch_and_check(3)
        for d in devs:
            d.write_error_rate = 1.0
        with pytest.raises(StorageError):
            await vol.flush()                               # the batch goes back (W6)
        for d in devs:
            d.write_error_rate = 0.0
        await patch_and_check(4)
        await vol.flush()
        await vm.rollback("v", "s1")
        model[:] = bytes(await vol.read(0, 4 * MiB))
        await patch_and_check(5)
        await vol.flush()
        assert vol.statistics().dirty_bytes == 0
        await _check(vol, model)
    finally:
        await pool.close()
