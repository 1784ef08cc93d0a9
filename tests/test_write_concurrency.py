"""The write buffer under concurrency (docs/INTERNALS.md, "Write buffer concurrency",
rules W1-W8; DESIGN invariants 1 and 7).

First the exact interleavings of issue 20 item 1, each made deterministic with a slow
device (a flush holds the writeback lock while its batch is written): a flush that holds
the lock while newer writes arrive and a snapshot is requested (W3), a writeback that fails
while a newer write is buffered (W6), a snapshot cancelled while it waits (W5), and a flush
under writers that never stop (W4).

Then a seeded model checker: many tasks write (aligned and not, disjoint and overlapping),
zero, trim, write with FUA and flush, while others create, diff, delete, clone and roll back
snapshots and the write buffer is so small that writebacks run all the time. Every read is
checked against what was acknowledged, every snapshot against the writes acknowledged before
it was requested and after it completed, and everything flushed against a re-import.
``STORAGED_SOAK_SECONDS`` runs it longer (``make soak``); ``STORAGED_SOAK_SEED`` picks the
seed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import trio
import trio.testing

from pool import Device, FileDevice, Pool
from pool.checker import check
from pool.device import Buffer
from pool.faults import FaultyDevice
from volumes import VolumeManager

MiB = 1 << 20
BS = 64 << 10


class FailingWrites(FaultyDevice):
    """FaultyDevice that fails the next ``fail_next`` writes (after ``write_delay``), then
    writes again: a writeback that fails once, at a chosen moment."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.fail_next = 0

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail_next:
            if self.write_delay:
                time.sleep(self.write_delay)
            self.fail_next -= 1
            raise self._fail(f"write at {offset}")
        super().pwrite(offset, data)

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.pwrite(offset, b"".join(buffers))


async def _plain(tmp_path: Path) -> tuple[Pool, FailingWrites]:
    dev = FailingWrites(FileDevice(str(tmp_path / "d0"), create_size=64 * MiB))
    pool = await Pool.create("c", [dev], extent_size=MiB, meta_size=4 * MiB)
    pool.fault_threshold = 1 << 30          # an injected error must not fault the member
    return pool, dev


async def _reopen(tmp_path: Path, pool: Pool) -> Pool:
    await pool.close()
    return await Pool.open([FileDevice(str(tmp_path / "d0"))])


def _blk(tag: int) -> bytes:
    return bytes([tag]) * BS


async def test_flush_holding_the_lock_never_lets_an_older_batch_win(tmp_path: Path) -> None:
    """W3 (issue 20 item 1): a flush holds the writeback lock while a newer write arrives,
    a snapshot is requested, a still newer write arrives and a second flush is called. The
    second flush makes the newest write durable; the snapshot holds the write acknowledged
    before it was requested (or a newer one); nothing older ever comes back."""
    pool, dev = await _plain(tmp_path)
    vm = VolumeManager(pool)
    vol = await vm.create("v", MiB, block_size=BS, compression=False)
    await vol.write(0, _blk(1))
    dev.write_delay = 0.2
    async with trio.open_nursery() as n:
        n.start_soon(vol.flush)                       # F1: holds the lock, writing 1
        await trio.testing.wait_all_tasks_blocked()
        await vol.write(0, _blk(2))                   # acknowledged before the snapshot
        n.start_soon(vm.snapshot, "v", "s")
        await trio.testing.wait_all_tasks_blocked()
        await vol.write(0, _blk(3))                   # concurrent with the snapshot
        await vol.flush()                             # F2: 3 must be durable now
        dev.write_delay = 0.0
    assert await vol.read(0, BS) == _blk(3)
    assert await vm.snapshot_volume("v", "s").read(0, BS) in (_blk(2), _blk(3))
    snap = await vm.snapshot_volume("v", "s").read(0, BS)
    pool = await _reopen(tmp_path, pool)
    try:
        vm = VolumeManager(pool)
        assert await vm.get("v").read(0, BS) == _blk(3)
        assert await vm.snapshot_volume("v", "s").read(0, BS) == snap
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()


async def test_failed_writeback_never_puts_back_over_a_newer_write(tmp_path: Path) -> None:
    """W6: a writeback fails while a newer write of the same block is buffered and a
    snapshot waits for the lock: the failed batch's older value is not put back over it."""
    pool, dev = await _plain(tmp_path)
    vm = VolumeManager(pool)
    vol = await vm.create("v", MiB, block_size=BS, compression=False)
    await vol.write(0, _blk(1))
    await vol.write(BS, _blk(7))                      # in the failing batch, not rewritten
    dev.write_delay, dev.fail_next = 0.2, 1
    failed: list[BaseException] = []

    async def failing_flush() -> None:
        try:
            await vol.flush()
        except Exception as e:
            failed.append(e)
    async with trio.open_nursery() as n:
        n.start_soon(failing_flush)
        await trio.testing.wait_all_tasks_blocked()
        await vol.write(0, _blk(2))
        n.start_soon(vm.snapshot, "v", "s")
        await trio.testing.wait_all_tasks_blocked()
    dev.write_delay = 0.0
    assert failed and dev.injected_errors == 1
    assert await vol.read(0, 2 * BS) == _blk(2) + _blk(7)
    assert await vm.snapshot_volume("v", "s").read(0, 2 * BS) == _blk(2) + _blk(7)
    await vol.flush()
    pool = await _reopen(tmp_path, pool)
    try:
        vm = VolumeManager(pool)
        assert await vm.get("v").read(0, 2 * BS) == _blk(2) + _blk(7)
        assert await vm.snapshot_volume("v", "s").read(0, 2 * BS) == _blk(2) + _blk(7)
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()


async def test_a_cancelled_snapshot_drops_no_buffered_write(tmp_path: Path) -> None:
    """W5: a snapshot request cancelled while it waits for the writeback lock leaves every
    acknowledged write in the buffer."""
    pool, dev = await _plain(tmp_path)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", MiB, block_size=BS, compression=False)
        await vol.write(0, _blk(1))
        dev.write_delay = 0.2
        async with trio.open_nursery() as n:
            n.start_soon(vol.flush)
            await trio.testing.wait_all_tasks_blocked()
            await vol.write(0, _blk(2))
            with trio.move_on_after(0.05):
                await vm.snapshot("v", "s")
        dev.write_delay = 0.0
        assert "s" not in vm.snapshot_names("v")
        assert await vol.read(0, BS) == _blk(2)
        await vol.flush()
        assert await vol.read(0, BS) == _blk(2)
    finally:
        await pool.close()


async def test_flush_ends_while_writers_keep_writing(tmp_path: Path) -> None:
    """W4: a flush writes what was acknowledged before it was called, once; writers that
    never stop do not hold it (or a snapshot queued behind it) up."""
    pool, dev = await _plain(tmp_path)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", 4 * MiB, block_size=BS, compression=False)
        await vol.write(0, bytes(range(256)) * 256)
        dev.write_delay = 0.02
        stop = trio.Event()
        quota = 400                                   # writes per writer, ~5 ms apart
        done = [0, 0]

        async def writer(i: int) -> None:
            rng = random.Random(i)
            while done[i] < quota and not stop.is_set():
                await vol.write(rng.randrange(64) * BS, rng.randbytes(BS))
                done[i] += 1
                await trio.sleep(0.005)
        async with trio.open_nursery() as n:
            n.start_soon(writer, 0)
            n.start_soon(writer, 1)
            await trio.sleep(0.05)
            await vol.flush()
            await vm.snapshot("v", "s")
            stop.set()
        assert min(done) < quota, "the flush waited for the writers to stop"
    finally:
        await pool.close()
