"""Crash suite: invariants 1, 2 and 3 under power loss at every sync point and at sampled
points between them (DESIGN §4).

A workload runs on file devices wrapped in RecordingDevice. Each op is sequential, so the
volume's content at every completed flush (and clean close) is known exactly. For each crash
state the pool is imported from in-memory copies of the post-crash device images, the
checker must report no problem, and the volume must read back as it was at the last flush
that completed before the crash, or (if the crash hit a flush in progress) as at that flush.
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from pool import FileDevice, MemoryDevice, Pool
from pool.checker import check
from pool.errors import ImportFailed
from pool.faults import RecordingDevice, WriteLog
from tests.kit.crashsim import CrashSimulator, CrashState, unexplained
from volumes import VolumeManager

DEV_SIZE = 4 << 20
VOL_SIZE = 512 << 10
BLOCK = 4096


@dataclass
class Flush:
    start: int               # log position when the flush was requested
    end: int                 # log position when it returned
    content: bytes           # volume v's content it made durable
    scratch: bytes | None    # volume w's content, None when w did not exist


async def _record_workload(tmp: str, seed: int, profile: str) -> tuple[
        CrashSimulator, list[Flush], bytes]:
    rng = random.Random(seed)
    paths = [os.path.join(tmp, f"d{i}") for i in range(3)]
    devs = [FileDevice(p, create_size=DEV_SIZE) for p in paths]
    pool = await Pool.create("crash", devs, profile=profile, extent_size=64 << 10,
                             meta_size=1 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", VOL_SIZE, block_size=BLOCK, compression=True)
    initial = os.urandom(VOL_SIZE // 2)
    await vol.write(0, initial)
    await vol.flush()
    await pool.close()
    base = [await trio.Path(p).read_bytes() for p in paths]
    log = WriteLog()
    devs2 = [RecordingDevice(FileDevice(p), i, log) for i, p in enumerate(paths)]
    pool = await Pool.open(devs2)
    model = bytearray(initial + bytes(VOL_SIZE - len(initial)))
    scratch: bytes | None = None
    flushes = [Flush(0, 0, bytes(model), None)]
    vm = VolumeManager(pool)
    vol = vm.get("v")
    for step in range(70):
        op = rng.random()
        off = rng.randrange(0, VOL_SIZE // 512) * 512
        n = min(rng.choice([512, 4096, 8192, 20000, 65536]), VOL_SIZE - off)
        if step % 12 == 5:
            # Create (and fill) or delete a second volume: map_new/map_del, segment frees
            # and reuse of freed extents all happen under the crash points.
            start = log.mark(f"scratch {step} start")
            if scratch is None:
                w = await vm.create("w", VOL_SIZE // 2, block_size=BLOCK, compression=False)
                created = log.mark(f"scratch {step} created")
                # A commit for w does not write back v's buffer: v stays as last flushed.
                flushes.append(Flush(start, created, flushes[-1].content,
                                     bytes(VOL_SIZE // 2)))
                start = created
                scratch = os.urandom(VOL_SIZE // 2)
                await w.write(0, scratch)
                await w.flush()
            else:
                await vm.delete("w")
                scratch = None
            flushes.append(Flush(start, log.mark(f"scratch {step} end"), flushes[-1].content,
                                 scratch))
        elif op < 0.55:
            data = (os.urandom(n) if rng.random() < 0.6
                    else bytes([rng.randrange(256)]) * n)
            await vol.write(off, data)
            model[off:off + n] = data
        elif op < 0.62:
            await vol.trim(off, n)
            model[off:off + n] = bytes(n)
        elif op < 0.68:
            await vol.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        elif op < 0.74:
            # FUA: durable when acknowledged (invariant 1) -- a flush point of its own.
            data = os.urandom(n)
            start = log.mark(f"fua {step} start")
            await vol.write(off, data, fua=True)
            model[off:off + n] = data
            flushes.append(Flush(start, log.mark(f"fua {step} end"), bytes(model), scratch))
        elif op < 0.95:
            start = log.mark(f"flush {step} start")
            await vol.flush()
            flushes.append(Flush(start, log.mark(f"flush {step} end"), bytes(model),
                                 scratch))
        else:
            start = log.mark(f"reopen {step} start")
            await pool.close()
            devs2 = [RecordingDevice(FileDevice(p), i, log) for i, p in enumerate(paths)]
            pool = await Pool.open(devs2)
            vm = VolumeManager(pool)
            vol = vm.get("v")
            flushes.append(Flush(start, log.mark(f"reopen {step} end"), bytes(model),
                                 scratch))
    start = log.mark("final close start")
    await pool.close()
    flushes.append(Flush(start, log.mark("final close end"), bytes(model), scratch))
    return CrashSimulator(base, log), flushes, bytes(model)


def _sampled(sim: CrashSimulator, rng: random.Random, writes: int) -> list[int]:
    """Every sync point and ``writes`` positions drawn among the writes between them."""
    return sorted(set(sim.sync_points()) | set(rng.sample(sim.write_points(), writes)))


async def _open_checked(cs: CrashState) -> Pool:
    """The pool as the crash left it, imported and passing the checker (invariant 2)."""
    mem = [MemoryDevice(len(img), path=f"c{i}", data=img) for i, img in enumerate(cs.images)]
    pool = await Pool.open(mem)
    report = await check(pool)
    assert report.ok, f"crash at {cs.position} ({cs.variant}): {report.render()}"
    return pool


def _allowed(flushes: list[Flush], pos: int) -> list[tuple[bytes, bytes | None]]:
    done = [f for f in flushes if f.end < pos]
    allowed = [(done[-1].content, done[-1].scratch)]
    allowed += [(f.content, f.scratch) for f in flushes if f.start < pos <= f.end]
    return allowed


@pytest.mark.parametrize(("seed", "profile"), [(1, "ec:2+1"), (2, "mirror:2"), (3, "plain")])
async def test_crash_states_recover_last_flush(tmp_path: object, seed: int,
                                               profile: str) -> None:
    """Invariants 1-3: every crash state imports, checks clean, and holds the last flush."""
    sim, flushes, _final = await _record_workload(str(tmp_path), seed, profile)
    rng = random.Random(seed)
    syncs = sim.sync_points()
    writes = sim.write_points()
    between = rng.sample(writes, min(len(writes), 150))
    positions = sorted(set(syncs) | set(between))
    n_states = 0
    for cs in sim.states(positions, rng):
        devs = [MemoryDevice(len(img), path=f"crash-dev{i}", data=img)
                for i, img in enumerate(cs.images)]
        pool = await Pool.open(devs)
        report = await check(pool)
        assert report.ok, f"crash at {cs.position} ({cs.variant}): {report.render()}"
        vm = VolumeManager(pool)
        content = await vm.get("v").read(0, VOL_SIZE)
        scratch = await vm.get("w").read(0, VOL_SIZE // 2) if "w" in vm.names() else None
        allowed = _allowed(flushes, cs.position)
        assert (content, scratch) in allowed, (
            f"crash at log position {cs.position} ({cs.variant}): volume matches none of "
            f"the {len(allowed)} states allowed (last completed flush or one in progress)")
        await pool.close()
        n_states += 1
    assert n_states >= 3 * len(syncs)
    print(f"{profile}: {n_states} crash states checked ({len(syncs)} sync points)")


async def test_crash_during_add_device(tmp_path: object) -> None:
    """Invariant 2 for membership changes: a crash at any point of add_device leaves a pool
    that imports either without the new device (it is refused as not listed, and the pool
    imports from the old members) or with it, and all flushed data reads back."""
    tmp = str(tmp_path)
    paths = [os.path.join(tmp, f"d{i}") for i in range(4)]
    devs = [FileDevice(p, create_size=DEV_SIZE) for p in paths[:3]]
    FileDevice(paths[3], create_size=DEV_SIZE).close()
    pool = await Pool.create("grow", devs, profile="ec:2+1", extent_size=64 << 10,
                             meta_size=1 << 20)
    vol = await VolumeManager(pool).create("v", VOL_SIZE, block_size=BLOCK)
    before = os.urandom(VOL_SIZE)
    await vol.write(0, before)
    await vol.flush()
    await pool.close()
    base = [await trio.Path(p).read_bytes() for p in paths]
    log = WriteLog()
    pool = await Pool.open([RecordingDevice(FileDevice(p), i, log)
                            for i, p in enumerate(paths[:3])])
    added_at = log.mark("add start")
    await pool.add_device(RecordingDevice(FileDevice(paths[3]), 3, log))
    added = log.mark("add end")
    vol = VolumeManager(pool).get("v")
    after = os.urandom(VOL_SIZE)
    await vol.write(0, after)
    await vol.flush()
    flushed = log.mark("flush end")
    await pool.close()
    sim = CrashSimulator(base, log)
    rng = random.Random(7)
    outcomes = {"with": 0, "without": 0}
    for cs in sim.states(sim.sync_points() + sim.write_points(), rng):
        mem = [MemoryDevice(len(img), path=f"grow{i}", data=img)
               for i, img in enumerate(cs.images)]
        try:
            pool = await Pool.open(mem)
            outcomes["with"] += 1
            assert len(pool.statistics().members) == 4
        except ImportFailed as e:
            assert cs.position <= added, f"new member refused after add completed: {e}"
            assert "does not list it" in e.message or "not a storaged pool member" in e.message
            pool = await Pool.open(mem[:3])
            outcomes["without"] += 1
        assert cs.position > added_at or len(pool.statistics().members) == 3
        report = await check(pool)
        assert report.ok, f"crash at {cs.position} ({cs.variant}): {report.render()}"
        content = await VolumeManager(pool).get("v").read(0, VOL_SIZE)
        expected = [after] if cs.position > flushed else [before, after]
        assert content in expected, f"crash at {cs.position} ({cs.variant}): wrong data"
        await pool.close()
    assert outcomes["with"] and outcomes["without"], outcomes


async def test_crash_during_snapshot_create_delete_rollback_clone(tmp_path: object) -> None:
    """Invariants 2, 3 and 7 under power loss: at every crash point of a workload of
    snapshots, clones, rollbacks, snapshot deletions and cleaner runs, the pool imports,
    checks clean, and every volume and snapshot holds exactly what it held at a completed
    commit."""
    tmp = str(tmp_path)
    paths = [os.path.join(tmp, f"d{i}") for i in range(3)]
    pool = await Pool.create("snapcrash", [FileDevice(p, create_size=DEV_SIZE)
                                           for p in paths],
                             profile="ec:2+1", extent_size=64 << 10, meta_size=1 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", VOL_SIZE, block_size=BLOCK)
    await vol.write(0, os.urandom(VOL_SIZE))
    await vol.flush()
    await pool.close()
    base = [await trio.Path(p).read_bytes() for p in paths]
    log = WriteLog()
    pool = await Pool.open([RecordingDevice(FileDevice(p), i, log)
                            for i, p in enumerate(paths)])
    vm = VolumeManager(pool)
    rng = random.Random(11)
    # Durable states: (start, end, {export name: content}) as the oracle.
    points: list[tuple[int, int, dict[str, bytes]]] = []

    async def state() -> dict[str, bytes]:
        out = {n: await vm.get(n).read(0, VOL_SIZE) for n in vm.names()}
        for n in vm.names():
            for s in vm.snapshot_names(n):
                out[f"{n}@{s}"] = await vm.snapshot_volume(n, s).read(0, VOL_SIZE)
        return out
    points.append((0, 0, await state()))

    async def point(label: str, action: Callable[[], Awaitable[object]]) -> None:
        """One committed operation: a durable state of its own (no writes are buffered
        between operations, so what the volumes read is what is durable)."""
        start = log.mark(f"{label} start")
        await action()
        points.append((start, log.mark(f"{label} end"), await state()))

    for step in range(24):
        name = rng.choice(vm.names())
        off = rng.randrange(0, VOL_SIZE // BLOCK) * BLOCK
        await vm.get(name).write(off, os.urandom(min(BLOCK * rng.randrange(1, 5),
                                                     VOL_SIZE - off)))
        await point(f"flush {step}", vm.get(name).flush)
        snaps = vm.snapshot_names("v")
        choice = rng.random()
        if step % 4 == 3:
            # The cleaner mid-run (pool.cleaner invariants 3 and 5): records move under
            # live snapshots; a crash anywhere must leave every volume and snapshot
            # exactly as before.
            async def clean_and_commit() -> None:
                await pool.clean(max_segments=8, threshold=1.0)
                await pool.commit()
            await point(f"clean {step}", clean_and_commit)
            continue
        if choice < 0.4 or not snaps:
            await point(f"snapshot {step}", partial(vm.snapshot, "v", f"s{step}"))
        elif choice < 0.6:
            await point(f"rollback {step}", partial(vm.rollback, "v", rng.choice(snaps)))
        elif choice < 0.8 and "c" not in vm.names():
            await point(f"clone {step}", partial(vm.clone, "v", rng.choice(snaps), "c"))
        else:
            victim = rng.choice(snaps)
            origin = vm.get("c").origin if "c" in vm.names() else None
            if origin == vm.snapshot_record("v", victim)[0]:
                await point(f"delete clone {step}", partial(vm.delete, "c"))
            else:
                await point(f"delete {step}", partial(vm.delete_snapshot, "v", victim))
    relocated = pool.statistics().records_relocated
    await pool.close()
    assert relocated > 0, "the workload never made the cleaner move a record"
    sim = CrashSimulator(base, log)
    checked = 0
    for cs in sim.states(_sampled(sim, rng, 120), rng):
        pool = await _open_checked(cs)
        vm = VolumeManager(pool)
        got = await state()
        done = [p for p in points if p[1] < cs.position]
        allowed = [done[-1][2]] + [p[2] for p in points if p[0] < cs.position <= p[1]]
        assert got in allowed, (f"crash at {cs.position} ({cs.variant}): volumes and "
                                f"snapshots match neither the last completed operation nor "
                                f"the one in progress")
        await pool.close()
        checked += 1
    assert checked > 300


@dataclass
class Writer:
    """One task's region of the volume and its history: ``states[i]`` is the region after
    its i-th change, issued at log position ``issued[i]`` and acknowledged at ``acked[i]``
    (``states[0]``: as before the workload); ``fua`` lists the changes that were FUA."""
    lo: int
    hi: int
    states: list[bytes]
    issued: list[int]
    acked: list[int]
    fua: set[int] = field(default_factory=set)

    def span(self, pos: int, flushes: list[tuple[int, int]]) -> tuple[int, int]:
        """The changes a crash at ``pos`` may show (invariant 1): from the last one a
        completed flush or a FUA made durable, to the last one issued."""
        durable = 0
        for fs, fe in flushes:
            if fe < pos:
                durable = max([durable] + [i for i, a in enumerate(self.acked) if a < fs])
        durable = max([durable] + [i for i in self.fua if self.acked[i] < pos])
        last = max(i for i, s in enumerate(self.issued) if s < pos)
        return durable, last


@pytest.mark.slow
async def test_crash_concurrent_writers_and_snapshots(tmp_path: object) -> None:
    """Invariants 1, 2, 3 and 7 with concurrency between crash points: three tasks write,
    trim, FUA-write and flush their own regions of one volume at once while a fourth takes
    snapshots. Every crash state imports and checks clean; each writer's region holds, byte
    by byte, a value from its last durable change (completed flush or FUA) up to its last
    issued one; a snapshot completed before the crash exists and reads exactly as it did
    when taken, one requested later does not exist; and each snapshot, when taken, held per
    writer a change at least as new as the last acknowledged before it was requested and
    no newer than the last issued before it completed."""
    tmp = str(tmp_path)
    paths = [os.path.join(tmp, f"d{i}") for i in range(3)]
    pool = await Pool.create("multi", [FileDevice(p, create_size=DEV_SIZE) for p in paths],
                             profile="ec:2+1", extent_size=64 << 10, meta_size=1 << 20)
    vol = await VolumeManager(pool).create("v", VOL_SIZE, block_size=BLOCK)
    initial = os.urandom(VOL_SIZE)
    await vol.write(0, initial)
    await vol.flush()
    await pool.close()
    base = [await trio.Path(p).read_bytes() for p in paths]
    log = WriteLog()
    pool = await Pool.open([RecordingDevice(FileDevice(p), i, log)
                            for i, p in enumerate(paths)])
    vm = VolumeManager(pool)
    vol = vm.get("v")
    rng = random.Random(23)
    n_writers = 3
    part = VOL_SIZE // n_writers // BLOCK * BLOCK
    writers = [Writer(i * part, (i + 1) * part, [initial[i * part:(i + 1) * part]], [0], [0])
               for i in range(n_writers)]
    flushes: list[tuple[int, int]] = []
    # name -> (requested, completed, content when taken)
    snaps: dict[str, tuple[int, int, bytes]] = {}

    async def writer(w: Writer, wid: int) -> None:
        region = bytearray(w.states[0])
        for step in range(10):
            r = rng.random()
            if r < 0.2:
                start = log.mark(f"w{wid} flush {step} start")
                await vol.flush()
                flushes.append((start, log.mark(f"w{wid} flush {step} end")))
                continue
            off = rng.randrange(0, part - 1)
            n = min(rng.choice([1, 700, BLOCK, 3 * BLOCK, 5000]), part - off)
            data = bytes(n) if r < 0.3 else os.urandom(n)
            fua = 0.3 <= r < 0.45
            w.issued.append(log.mark(f"w{wid} write {step} issued"))
            if r < 0.3:
                await vol.trim(w.lo + off, n)
            else:
                await vol.write(w.lo + off, data, fua=fua)
            w.acked.append(log.mark(f"w{wid} write {step} acked"))
            region[off:off + n] = data
            w.states.append(bytes(region))
            if fua:
                w.fua.add(len(w.states) - 1)
            await trio.sleep(rng.random() * 0.002)

    async def snapshotter() -> None:
        for i in range(5):
            await trio.sleep(rng.random() * 0.01)
            name = f"s{i}"
            start = log.mark(f"snapshot {name} start")
            await vm.snapshot("v", name)
            end = log.mark(f"snapshot {name} end")
            content = await vm.snapshot_volume("v", name).read(0, VOL_SIZE)
            snaps[name] = (start, end, content)

    async with trio.open_nursery() as nursery:
        for wid, w in enumerate(writers):
            nursery.start_soon(writer, w, wid)
        nursery.start_soon(snapshotter)
    for name, (start, end, content) in snaps.items():
        for w in writers:   # invariant 7, as taken (writes then in flight are known now)
            lo = max(i for i, a in enumerate(w.acked) if a < start)
            hi = max(i for i, s in enumerate(w.issued) if s < end)
            assert unexplained(content[w.lo:w.hi], w.states[lo:hi + 1]) == 0, (
                f"snapshot {name}: region {w.lo} holds writes older than those "
                f"acknowledged before it was requested, or newer than it")
    start = log.mark("final close start")
    await pool.close()
    flushes.append((start, log.mark("final close end")))
    sim = CrashSimulator(base, log)
    checked = 0
    for cs in sim.states(_sampled(sim, rng, 40), rng):
        pool = await _open_checked(cs)
        vm = VolumeManager(pool)
        content = await vm.get("v").read(0, VOL_SIZE)
        for w in writers:
            lo, hi = w.span(cs.position, flushes)
            bad = unexplained(content[w.lo:w.hi], w.states[lo:hi + 1])
            assert bad == 0, (f"crash at {cs.position} ({cs.variant}): {bad} byte(s) of "
                              f"region {w.lo} hold none of its changes {lo}..{hi}")
        present = set(vm.snapshot_names("v"))
        for name, (start, end, taken) in snaps.items():
            if end < cs.position:
                assert name in present, f"crash at {cs.position}: snapshot {name} lost"
            if start >= cs.position:
                assert name not in present, f"crash at {cs.position}: {name} too early"
            if name in present:
                assert await vm.snapshot_volume("v", name).read(0, VOL_SIZE) == taken, (
                    f"crash at {cs.position} ({cs.variant}): snapshot {name} changed")
        await pool.close()
        checked += 1
    assert len(snaps) == 5 and len(flushes) > 3
    assert checked >= 3 * len(sim.sync_points())
    print(f"concurrent writers: {checked} crash states checked, "
          f"{sum(len(w.states) - 1 for w in writers)} changes, {len(flushes)} flushes, "
          f"{len(snaps)} snapshots")
