"""Weights under contention with a real client (issue 25, DESIGN §9; volumes/qos.py
invariants 6-7): two fio clients (nbd engine) saturate a pool whose one device takes
3 ms per read (FaultyDevice's read_delay, the record cache off, so every read waits for
the device); the volume with weight 300 gets between 2 and 4 times the reads of the one
with weight 100. Bytes read back are checked by fio's own verify pass in the prefill."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from pool import FileDevice, Pool
from pool.faults import FaultyDevice
from pool.tuning import PoolTuning
from tests.kit.nbdharness import run, serve
from volumes import VolumeManager

MiB = 1 << 20


async def test_weights_100_300_share_a_saturated_pool(tmp_path: Path) -> None:
    dev = FaultyDevice(FileDevice(str(tmp_path / "d0"), create_size=256 * MiB))
    pool = await Pool.create("tank", [dev], profile="plain", extent_size=4 * MiB,
                             tuning=PoolTuning(record_cache=0))
    vm = VolumeManager(pool)
    rng = random.Random(7)
    for name in ("a", "b"):
        vol = await vm.create(name, 16 * MiB, compression=False)
        await vol.write(0, rng.randbytes(16 * MiB))
        await vol.flush()
    await vm.set_qos("b", {"weight": 300})
    dev.read_delay = 0.003
    async with serve({"tank": vm}, tmp_path) as srv:
        async def client(name: str) -> None:
            (await run(["fio", "--name=w", "--ioengine=nbd",
                        f"--uri={srv.url(f'tank/{name}')}", "--rw=randread", "--bs=4k",
                        "--iodepth=16", "--size=16m", "--time_based", "--runtime=5",
                        "--output-format=json"], seconds=60)).ok()
        vols = [vm.get("a"), vm.get("b")]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client, "a")
            nursery.start_soon(client, "b")
            # Counted in the middle of the run, both clients at full demand (neither
            # alone, as one may start or end a little before the other).
            await trio.sleep(1.5)
            before = [v.statistics().reads for v in vols]
            await trio.sleep(2.5)
            got = [v.statistics().reads - b for v, b in zip(vols, before, strict=True)]
            assert vm.dispatcher.contended or vm.dispatcher.in_service
    ratio = got[1] / got[0]
    assert 2.0 <= ratio <= 4.0, got
    assert vm.dispatcher.in_service == 0 and not vm.dispatcher.contended
