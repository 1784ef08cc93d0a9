"""Tuning is handed in, not set in module globals (issue 23): each pool reads its own
``PoolTuning`` (pool/tuning.py) and each VolumeManager counts against the ``WriteBuffer``
it was given, so two pools in one process can be tuned differently."""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import pytest
import trio

from pool import Device, MemoryDevice, Pool
from pool.faults import FaultyDevice
from pool.tuning import PoolTuning
from storaged.config import load
from storaged.daemon import apply_live
from storaged.registry import PoolEntry, Registry
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
    # Earlier tests in this process may hold bytes in the default buffer (test_owner does):
    # what matters is that these pools add none.
    default_used = volume_module.WRITE_BUFFER.used
    try:
        assert (a.devstore.discard_freed, b.devstore.discard_freed) == (False, True)
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
        assert volume_module.WRITE_BUFFER.used == default_used   # the default is untouched
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


# ---- deadlines: the live part, one per pool (pool/deadlines.py) -----------------------------
async def _hanging_pool(name: str, write_timeout: float) -> tuple[Pool, FaultyDevice]:
    hung = FaultyDevice(MemoryDevice(128 * MiB, path=f"{name}0"))
    devs: list[Device] = [hung, *(MemoryDevice(128 * MiB, path=f"{name}{i}")
                                  for i in (1, 2))]
    pool = await Pool.create(name, devs, profile="ec:2+1", extent_size=4 * MiB,
                             tuning=PoolTuning(write_timeout=write_timeout))
    return pool, hung


async def test_two_pools_give_up_a_hanging_member_each_at_its_own_deadline() -> None:
    """Deadlines invariant 1: pool a (write deadline 0.2 s) and pool b (30 s) each have a
    member whose writes hang for 2 s. a's flush gives the member up and faults it within
    the second and goes on degraded; b, at the same moment, still waits for its member
    (not faulted); once the hang ends b's flush completes with the member online. Both
    read back byte-exact."""
    a, hung_a = await _hanging_pool("a", 0.2)
    b, hung_b = await _hanging_pool("b", 30.0)
    try:
        assert (a.deadlines.write, b.deadlines.write) == (0.2, 30.0)
        assert a.deadlines is not b.deadlines and a.meta.deadlines is a.deadlines
        data = random.Random(2).randbytes(4 * BS)
        va = await VolumeManager(a, WriteBuffer(0)).create("v", 4 * MiB, block_size=BS)
        vb = await VolumeManager(b, WriteBuffer(0)).create("v", 4 * MiB, block_size=BS)
        await va.write(0, data)
        await vb.write(0, data)
        hung_a.write_delay = hung_b.write_delay = 2.0
        b_done = trio.Event()

        async def flush_b() -> None:
            await vb.flush()
            b_done.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush_b)
            with trio.fail_after(1.5):          # well before the hang would end
                await va.flush()
            assert a.statistics().members[0].state == "faulted"
            assert b.statistics().members[0].state == "online" and not b_done.is_set()
            hung_b.write_delay = 0.0            # the calls still sleeping end at 2 s
        assert b_done.is_set() and b.statistics().members[0].state == "online"
        assert await va.read(0, len(data)) == data
        assert await vb.read(0, len(data)) == data
    finally:
        hung_a.write_delay = 0.0
        await trio.sleep(2.0)                   # a's abandoned calls return
        await a.close()
        await b.close()


async def test_a_reload_changes_every_open_pools_deadlines() -> None:
    """Deadlines invariant 1 and storaged.service.LIVE_KEYS: ``apply_live`` (what SIGHUP
    runs) sets faults.read_timeout/write_timeout on each open pool's own deadlines and on
    the tuning of pools imported later; a pool changed alone changes no other."""
    a = await _pool("a", PoolTuning(read_timeout=1.0, write_timeout=2.0))
    b = await _pool("b", PoolTuning())
    reg = Registry("unused", tuning=PoolTuning(read_timeout=1.0, write_timeout=2.0))
    reg.pools = {p.name: PoolEntry(p, VolumeManager(p), []) for p in (a, b)}
    level = logging.getLogger().level
    try:
        assert (a.deadlines.read, a.deadlines.write) == (1.0, 2.0)
        assert (b.deadlines.read, b.deadlines.write) == (30.0, 120.0)
        apply_live(replace(load(None), read_timeout=5.0, write_timeout=7.0,
                           log_level=logging.getLevelName(level).lower()), reg)
        for p in (a, b):
            assert (p.deadlines.read, p.deadlines.write) == (5.0, 7.0)
            assert p.meta.deadlines is p.deadlines
        assert (reg.tuning.read_timeout, reg.tuning.write_timeout) == (5.0, 7.0)
        a.deadlines.write = 0.5
        assert b.deadlines.write == 7.0
    finally:
        logging.getLogger().setLevel(level)
        await a.close()
        await b.close()
