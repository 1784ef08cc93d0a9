"""The read fast paths a frontend answers from without a task (FUSE): ``Volume.read_nowait``
(a range inside one block, as bytes) and ``Volume.readinto_nowait`` (whole blocks into the
caller's buffer). Each answers exactly what ``read`` answers -- buffered writes, holes,
cached or page-cached records -- or declines (None/False) when something needs a wait, and
never hands out bytes that failed verification (issue 27: no cached bytes unverified)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pool import Device, MemoryDevice, Pool
from pool.faults import FaultyDevice
from tests.conftest import DiskSet
from tests.kit.poolkit import rotten_pool
from volumes import InvalidArgument, VolumeManager

MiB = 1 << 20
BS = 64 << 10


async def _pool(*, cold: bool = False) -> Pool:
    """ec:2+1 on RAM disks; ``cold``: every device read must wait (FaultyDevice, no faults)."""
    devs: list[Device] = [MemoryDevice(256 * MiB, path=f"nr{i}") for i in range(3)]
    if cold:
        devs = [FaultyDevice(d) for d in devs]
    return await Pool.create("nr", devs, profile="ec:2+1", extent_size=4 * MiB)


async def test_nowait_reads_answer_what_read_answers() -> None:
    pool = await _pool()                       # RAM disks: never a device wait
    try:
        vol = await VolumeManager(pool).create("v", 2 * MiB, block_size=BS)
        model = bytearray(random.Random(1).randbytes(MiB))     # the first MiB flushed
        await vol.write(0, bytes(model))
        await vol.flush()
        model += bytes(MiB)                                    # the second a hole...
        await vol.write(MiB + BS + 7, b"w" * 100)              # ...but for a buffered part
        model[MiB + BS + 7:MiB + BS + 107] = b"w" * 100
        await vol.write(2 * BS, b"z" * BS)                     # a buffered whole block
        model[2 * BS:3 * BS] = b"z" * BS
        assert await vol.read(0, 2 * MiB) == bytes(model)
        buf = bytearray(MiB)
        for off in (0, MiB):
            assert vol.readinto_nowait(off, buf)
            assert buf == model[off:off + MiB]
        for off, n in ((0, 4096), (BS - 4096, 4096), (2 * BS + 1, 999), (MiB + BS, 4096),
                       (MiB + 5 * BS, 512), (3 * BS - 1, 1)):
            assert vol.read_nowait(off, n) == bytes(model[off:off + n])
        # Outside its shapes each declines, changing nothing: across a block, empty,
        # unaligned or partial blocks for readinto.
        assert vol.read_nowait(BS - 10, 20) is None and vol.read_nowait(0, 0) is None
        assert not vol.readinto_nowait(100, bytearray(BS))
        assert not vol.readinto_nowait(0, bytearray(BS + 512))
        assert await vol.read(0, 2 * MiB) == bytes(model)
        # Bad ranges raise as read does.
        with pytest.raises(InvalidArgument):
            vol.read_nowait(2 * MiB, 10)
        with pytest.raises(InvalidArgument):
            vol.readinto_nowait(2 * MiB - BS, bytearray(2 * BS))
    finally:
        await pool.close()


async def test_nowait_reads_decline_what_needs_a_device_wait() -> None:
    pool = await _pool(cold=True)
    try:
        vol = await VolumeManager(pool).create("v", MiB, block_size=BS)
        data = random.Random(2).randbytes(MiB)
        await vol.write(0, data)
        await vol.flush()
        assert vol.read_nowait(4096, 4096) is None
        assert not vol.readinto_nowait(0, bytearray(2 * BS))
        # Buffered blocks need no device: answered.
        await vol.write(0, b"q" * (2 * BS))
        assert vol.readinto_nowait(0, buf := bytearray(2 * BS)) and buf == b"q" * (2 * BS)
        assert vol.read_nowait(BS + 5, 10) == b"q" * 10
        # A read that needs both declines; the awaited read then answers.
        assert not vol.readinto_nowait(0, bytearray(4 * BS))
        assert await vol.read(0, 4 * BS) == b"q" * (2 * BS) + data[2 * BS:4 * BS]
    finally:
        await pool.close()


async def test_readinto_nowait_never_answers_a_rotten_fragment(
        disks: Callable[..., DiskSet]) -> None:
    """A corrupt fragment fails its checksum: the fast paths decline, and the awaited read
    rebuilds the block from the others (k = 2 of 3) byte-exact."""
    ds = disks(3)
    pool, data, _path = await rotten_pool(ds, "ec:2+1", 4 * BS, 1, 0, seed=3)
    try:
        vol = VolumeManager(pool).get("v")
        assert not vol.readinto_nowait(0, bytearray(4 * BS))
        assert vol.read_nowait(BS, 4096) is None
        assert await vol.read(0, 4 * BS) == data
    finally:
        await pool.close()
