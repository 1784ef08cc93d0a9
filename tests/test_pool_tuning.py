"""Tuning is handed in, not set in module globals (issue 23): each pool reads its own
``PoolTuning`` (pool/tuning.py) and each VolumeManager counts against the ``WriteBuffer``
it was given, so two pools in one process can be tuned differently."""

from __future__ import annotations

import random

import pytest

from pool import Device, MemoryDevice, Pool
from pool.tuning import PoolTuning
from volumes import VolumeManager
from volumes import volume as volume_module
from volumes.volume import WriteBuffer

MiB = 1 << 20
BS = 64 << 10


async def _pool(name: str, tuning: PoolTuning) -> Pool:
    devs: list[Device] = [MemoryDevice(128 * MiB, path=f"{name}{i}") for i in range(3)]
    return await Pool.create(name, devs, profile="ec:2+1", extent_size=4 * MiB,
                             tuning=tuning)


async def test_two_pools_in_one_process_are_tuned_differently(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volume_module, "WRITEBACK_MIN", MiB)
    a = await _pool("a", PoolTuning(discard_freed=False, record_cache=0))
    b = await _pool("b", PoolTuning(discard_freed=True, record_cache=64 * MiB))
    buf_a, buf_b = WriteBuffer(0), WriteBuffer(64 * MiB)
    # (what other tests in this worker process left in the process default)
    default_used = volume_module.WRITE_BUFFER.used
    try:
        assert (a.discard_freed, b.discard_freed) == (False, True)
        va = await VolumeManager(a, buf_a).create("v", 4 * MiB, block_size=BS)
        vb = await VolumeManager(b, buf_b).create("v", 4 * MiB, block_size=BS)
        data = random.Random(1).randbytes(4 * MiB)
        await va.write(0, data)
        await vb.write(0, data)
        # a's empty budget wrote back past WRITEBACK_MIN; b's holds all 4 MiB in memory.
        assert a.statistics().records_written > 0
        assert b.statistics().records_written == 0
        assert buf_a.used == va.statistics().dirty_bytes <= MiB
        assert buf_b.used == vb.statistics().dirty_bytes == 4 * MiB
        assert volume_module.WRITE_BUFFER.used == default_used   # the default: untouched
        await va.flush()
        await vb.flush()
        assert buf_a.used == buf_b.used == 0
        # A repeated small read: a (no record cache) goes to the devices each time, b
        # serves it from its cache the second time.
        for pool, vol, again in ((a, va, 1), (b, vb, 0)):
            assert await vol.read(8 * BS, 4096) == data[8 * BS:8 * BS + 4096]
            before = pool.statistics().records_read
            assert await vol.read(8 * BS, 4096) == data[8 * BS:8 * BS + 4096]
            assert pool.statistics().records_read - before == again
            assert await vol.read(0, 4 * MiB) == data
    finally:
        await a.close()
        await b.close()
