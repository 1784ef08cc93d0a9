"""Snapshots, clones, rollback and diff (invariants 6 and 7).

A hypothesis program of writes, trims, flushes, snapshots, clones (of clones), rollbacks,
deletions in random order and reopens runs against a real pool and a dict model; after every
step every volume and every snapshot must read back byte-exact, and the checker must find
the shared map trees and record accounting consistent. When everything is deleted the pool
holds no live data (space returns to the empty baseline).
"""

from __future__ import annotations

import os
import random
import tempfile

import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool import FileDevice, Pool
from pool.checker import check
from pool.errors import Busy
from volumes import VolumeManager

SIZE = 96 << 10
BS = 4096


async def _verify(vm: VolumeManager, vols: dict[str, bytearray],
                  snaps: dict[tuple[str, str], bytes], where: str) -> None:
    assert sorted(vm.names()) == sorted(vols), where
    for name, model in vols.items():
        assert await vm.get(name).read(0, len(model)) == bytes(model), f"{where}: {name}"
    for (vol, snap), content in snaps.items():
        view = vm.snapshot_volume(vol, snap)
        assert await view.read(0, len(content)) == content, f"{where}: {vol}@{snap}"


async def _check_space(pool: Pool, vm: VolumeManager, where: str) -> None:
    """Exact accounting: every byte of live data is unique to one volume or snapshot, or
    shared; the sum equals the distinct bytes the pool holds (after a commit, so that the
    maps are final)."""
    for name in vm.names():
        await vm.get(name).flush()
    used, shared = pool.record_space()
    unique = sum(vm.get(n).statistics().unique_bytes for n in vm.names())
    unique += sum(vm.snapshot_info(n, s)["unique_bytes"] for n in vm.names()
                  for s in vm.snapshot_names(n))
    assert unique + shared == used, f"{where}: unique {unique} + shared {shared} != {used}"


async def _program(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="snap-")
    paths = [os.path.join(tmp, f"d{i}") for i in range(3)]
    pool = await Pool.create("s", [FileDevice(p, create_size=48 << 20) for p in paths],
                             profile="ec:2+1", extent_size=256 << 10, meta_size=4 << 20)
    vm = VolumeManager(pool)
    await vm.create("v", SIZE, block_size=BS)
    vols: dict[str, bytearray] = {"v": bytearray(SIZE)}
    snaps: dict[tuple[str, str], bytes] = {}
    origin: dict[str, tuple[str, str]] = {}       # clone -> the snapshot it came from
    counter = 0
    try:
        for step in range(steps):
            op = rng.random()
            name = rng.choice(sorted(vols))
            model = vols[name]
            where = f"seed {seed} step {step}"
            size = len(model)
            if op < 0.35:
                off = rng.randrange(0, size - 1) if size > 1 else 0
                n = rng.randrange(1, min(3 * BS, size - off) + 1)
                data = os.urandom(n) if rng.random() < 0.7 else bytes([step % 256]) * n
                await vm.get(name).write(off, data)
                model[off:off + n] = data
            elif op < 0.42 and size >= BS:
                off = rng.randrange(0, size // BS) * BS
                n = min(rng.randrange(1, 6) * BS, size - off)
                await vm.get(name).trim(off, n)
                model[off:off + n] = bytes(n)
            elif op < 0.55:
                counter += 1
                snap = f"s{counter}"
                await vm.snapshot(name, snap)
                snaps[(name, snap)] = bytes(model)
            elif op < 0.62 and snaps:
                vol, snap = rng.choice(sorted(snaps))
                counter += 1
                clone = f"c{counter}"
                await vm.clone(vol, snap, clone)
                vols[clone] = bytearray(snaps[(vol, snap)])
                origin[clone] = (vol, snap)
            elif op < 0.70 and snaps:
                vol, snap = rng.choice(sorted(snaps))
                await vm.rollback(vol, snap)
                vols[vol] = bytearray(snaps[(vol, snap)])
            elif op < 0.80 and snaps:
                vol, snap = rng.choice(sorted(snaps))
                if any(o == (vol, snap) for o in origin.values()):
                    with pytest.raises(Busy, match="has clones"):
                        await vm.delete_snapshot(vol, snap)
                else:
                    await vm.delete_snapshot(vol, snap)
                    del snaps[(vol, snap)]
            elif op < 0.86 and len(vols) > 1:
                victim = rng.choice(sorted(v for v in vols if v != "v"))
                mine = [s for (v, s) in snaps if v == victim]
                blocked = any(o[0] == victim for o in origin.values())
                if blocked:
                    with pytest.raises(Busy):
                        await vm.delete(victim, recursive=True)
                else:
                    await vm.delete(victim, recursive=True)
                    del vols[victim]
                    origin.pop(victim, None)
                    for s in mine:
                        del snaps[(victim, s)]
            elif op < 0.90:
                await vm.get(name).flush()
            elif op < 0.94:
                new_size = rng.randrange(1, 2 * SIZE // 512) * 512
                await vm.resize(name, new_size, allow_shrink=True)
                if new_size < len(model):
                    del model[new_size:]
                else:
                    model.extend(bytes(new_size - len(model)))
            else:
                await pool.close()
                pool = await Pool.open([FileDevice(p) for p in paths])
                vm = VolumeManager(pool)
            await _verify(vm, vols, snaps, where)
            await _check_space(pool, vm, where)
        report = await check(pool)
        assert report.ok, report.render()
        # Delete everything (clones first, then snapshots): no live data may remain.
        for clone in sorted(origin, key=lambda c: -int(c[1:])):
            if clone in vols:
                await vm.delete(clone, recursive=True)
                del vols[clone]
        for vol, snap in sorted(snaps):
            if vol in vols:
                await vm.delete_snapshot(vol, snap)
        await vm.delete("v", recursive=True)
        for name in vm.names():
            await vm.delete(name, recursive=True)
        assert pool.statistics().live_bytes == 0
        assert not pool.state.forest.nodes, "map nodes leaked"
        assert (await check(pool)).ok
    finally:
        await pool.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1 << 30))
def test_snapshot_clone_rollback_program(seed: int) -> None:
    trio.run(_program, seed, 40)


async def test_snapshot_excludes_writes_acknowledged_after_it(tmp_path: object) -> None:
    """Invariant 7 with concurrent writers: the snapshot holds every write acknowledged
    before it was requested and none acknowledged after."""
    pool = await Pool.create("c", [FileDevice(os.path.join(str(tmp_path), "d0"),
                                              create_size=64 << 20)],
                             extent_size=256 << 10, meta_size=4 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 1 << 20, block_size=BS)
    acked_before: list[int] = []
    acked_after: list[int] = []
    requested = trio.Event()

    async def writer(i: int) -> None:
        await vol.write(i * BS, bytes([i + 1]) * BS)
        (acked_after if requested.is_set() else acked_before).append(i)

    async with trio.open_nursery() as n:
        for i in range(100):
            n.start_soon(writer, i)
        await trio.lowlevel.checkpoint()

        async def snap() -> None:
            requested.set()
            await vm.snapshot("v", "s")
        n.start_soon(snap)
        for i in range(100, 200):
            n.start_soon(writer, i)
    view = vm.snapshot_volume("v", "s")
    for i in acked_before:
        assert await view.read(i * BS, BS) == bytes([i + 1]) * BS
    for i in acked_after:
        if i >= 100:
            assert await view.read(i * BS, BS) == bytes(BS)
    await pool.close()


async def test_diff_lists_exactly_the_changed_blocks(tmp_path: object) -> None:
    pool = await Pool.create("d", [FileDevice(os.path.join(str(tmp_path), "d0"),
                                              create_size=64 << 20)],
                             extent_size=256 << 10, meta_size=4 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 64 << 20, block_size=65536)
    await vol.write(0, os.urandom(1 << 20))
    await vm.snapshot("v", "a")
    await vol.write(3 * 65536, os.urandom(2 * 65536))       # blocks 3, 4
    await vol.write(40 << 20, os.urandom(100))               # one block far away
    await vm.snapshot("v", "b")
    assert await vm.diff("v", "a", "b") == [(3 * 65536, 2 * 65536), (40 << 20, 65536)]
    await vol.trim(0, 65536)                                 # block 0, after b
    assert await vm.diff("v", "b") == [(0, 65536)]
    assert await vm.diff("v", "a") == [(0, 65536), (3 * 65536, 2 * 65536),
                                       (40 << 20, 65536)]
    await pool.close()


async def test_snapshot_metadata_cost_does_not_grow_with_volume_size(tmp_path: object) -> None:
    """Invariant 7: creating a snapshot writes no map nodes; a later write copies only the
    path to one leaf."""
    pool = await Pool.create("m", [FileDevice(os.path.join(str(tmp_path), "d0"),
                                              create_size=128 << 20)],
                             extent_size=1 << 20, meta_size=8 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 64 << 30, block_size=65536)   # 1M blocks of map
    for i in range(0, 64 << 30, 4 << 30):                     # touch 16 distant leaves
        await vol.write(i, b"x" * 65536)
    await vol.flush()
    forest = pool.state.forest
    before = len(forest.nodes)
    await vm.snapshot("v", "s")
    assert len(forest.nodes) == before                        # O(1): shared root only
    await vol.write(0, b"y" * 65536)
    await vol.flush()
    assert len(forest.nodes) == before + 3                    # root, mid, leaf copied
    await pool.close()


async def test_unique_bytes_is_what_deleting_frees(tmp_path: object) -> None:
    """Space accounting: unique bytes of a volume and of its snapshot count exactly the
    records nobody else references."""
    pool = await Pool.create("u", [FileDevice(os.path.join(str(tmp_path), "d0"),
                                              create_size=128 << 20)],
                             extent_size=1 << 20, meta_size=8 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 16 << 20, block_size=65536, compression=False)
    await vol.write(0, os.urandom(8 << 20))               # 128 blocks
    await vol.flush()
    per_block = vol.statistics().stored_bytes // 128
    await vm.snapshot("v", "s")
    assert vol.statistics().unique_bytes == 0             # everything shared
    await vol.write(0, os.urandom(1 << 20))               # 16 blocks diverge
    await vol.flush()
    assert vol.statistics().unique_bytes == 16 * per_block
    snap = vm.snapshot_info("v", "s")
    assert snap["unique_bytes"] == 16 * per_block         # the old versions of those 16
    assert snap["referenced_bytes"] == 128 * per_block
    await vm.delete_snapshot("v", "s")
    assert vol.statistics().unique_bytes == 128 * per_block   # nothing shared any more
    await pool.close()
