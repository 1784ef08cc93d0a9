"""Replace and rebuild, offline/online resilver, remove-device (issue 9; DESIGN §5).

Invariant 5: after a rebuild onto a replacement the pool survives the loss of any M other
devices; a member back from offline is resilvered with only what was written while it was
away. Invariant 1: a crash anywhere in a rebuild loses nothing flushed, and the rebuild
resumes after the import. Invariant 9: a removal that cannot work is refused plainly.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import threading
from collections.abc import Callable

import pytest
import trio
import xxhash

from pool import FileDevice, MemoryDevice, Pool, codec, rebuild, records, scrub
from pool.checker import check
from pool.deadlines import Deadlines
from pool.errors import InvalidArgument, NoSpace
from pool.faults import FaultyDevice, RecordingDevice, WriteLog
from pool.layout import SECTOR, Label
from tests.conftest import DiskSet
from tests.kit.crashsim import CrashSimulator
from tests.kit.poolkit import BS, filled_pool, read_all
from volumes import VolumeManager

Disks = Callable[..., DiskSet]
SIZE = 6 << 20


async def test_replace_a_lost_device_then_lose_two_others(disks: Disks) -> None:
    """ec:4+2: member 1 disappears, reads go on degraded; replace-device onto a new file
    rebuilds every fragment it held; then any two other members can go, byte-exact."""
    ds = disks(6)
    pool, data = await filled_pool(ds, "ec:4+2", SIZE)
    try:
        os.unlink(ds.paths[1])
        await pool.watch_presence()
        st = pool.statistics()
        assert st.members[1].state == "faulted" and st.state == "degraded"
        assert await read_all(pool, SIZE) == data
        # Writes go on degraded meanwhile.
        vol = VolumeManager(pool).get("v")
        new = random.Random(5).randbytes(3 * BS)
        await vol.write(BS, new)
        await vol.flush()
        data = data[:BS] + new + data[4 * BS:]
        spare = disks(1, prefix="spare").create()[0]
        await pool.replace_device(1, spare)
        assert pool.statistics().members[1].state == "rebuilding"
        seen: list[float] = []

        async def progress(p: rebuild.RebuildProgress) -> None:
            seen.append(p.done_bytes / max(1, p.total_bytes))
        written = await rebuild.run(pool, progress=progress)
        assert written > 0 and seen and seen == sorted(seen)
        st = pool.statistics()
        assert st.members[1].state == "online" and st.state == "online"
        assert st.rebuilt_bytes == written
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()
    paths = [*ds.paths[:1], disks(1, prefix="spare").paths[0], *ds.paths[2:]]
    for lost in itertools.combinations(range(6), 2):
        devs = [FileDevice(str(p)) for i, p in enumerate(paths) if i not in lost]
        pool = await Pool.open(devs)
        try:
            assert await read_all(pool, SIZE) == data, lost
        finally:
            await pool.close()


async def test_offline_write_online_resilvers_only_what_was_written(disks: Disks) -> None:
    """The bytes rebuilt for a member back from offline are about the bytes written while
    it was away (its share of them), not the device; afterwards any M can go."""
    ds = disks(6)
    pool, data = await filled_pool(ds, "ec:4+2", SIZE)
    try:
        await pool.offline(3)
        assert pool.statistics().members[3].state == "offline"
        with pytest.raises(InvalidArgument, match="already offline"):
            await pool.offline(3)
        vol = VolumeManager(pool).get("v")
        piece = random.Random(7).randbytes(8 * BS)
        await vol.write(16 * BS, piece)
        await vol.flush()
        data = data[:16 * BS] + piece + data[24 * BS:]
        assert await read_all(pool, SIZE) == data
        await pool.online(3)
        written = await rebuild.run(pool)
        share = len(piece) // 4            # member 3 holds one of 4 data/parity columns
        assert share <= written <= share * 1.2 + (64 << 10), (written, share)
        assert written < SIZE // 8          # nowhere near the whole device's share
        assert pool.statistics().members[3].state == "online"
    finally:
        await pool.close()
    for lost in [(0, 1), (3, 5), (2, 4)]:
        pool = await Pool.open(ds.open(without=lost))
        try:
            assert await read_all(pool, SIZE) == data, lost
        finally:
            await pool.close()


@pytest.mark.parametrize(("profile", "n"), [("plain", 3), ("ec:2+1", 4)])
async def test_remove_device_moves_everything_and_wipes_the_label(
        disks: Disks, profile: str, n: int) -> None:
    ds = disks(n)
    pool, data = await filled_pool(ds, profile, SIZE)
    try:
        victim = next(i for i in range(n)
                      if any(e[0] == i for s in pool.state.segments.values()
                             for e in s.extents))
        steps: list[int] = []

        async def progress(done: int, total: int) -> None:
            steps.append(done)
        await pool.remove_device(victim, progress)
        assert steps
        assert pool.statistics().members[victim].state == "removed"
        assert not any(e[0] == victim for s in pool.state.segments.values()
                       for e in s.extents)
        assert await read_all(pool, SIZE) == data
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()
    head = (await trio.Path(ds.paths[victim]).read_bytes())[:4096]
    assert not head.startswith(b"STORAGED"), "the removed device still carries a label"
    with pytest.raises(Exception):  # noqa: B017 - any decode error: no label there
        Label.decode(head)
    pool = await Pool.open(ds.open(without=[victim]))
    try:
        assert await read_all(pool, SIZE) == data
    finally:
        await pool.close()


async def test_remove_device_is_refused_without_room_or_devices(disks: Disks) -> None:
    ds = disks(3, size=12 << 20)
    pool, data = await filled_pool(ds, "plain", 13 << 20)
    try:
        before = pool.statistics()
        with pytest.raises(NoSpace, match=r"need .* free stripe"):
            await pool.remove_device(0)
        assert pool.statistics().members == before.members
        assert await read_all(pool, 13 << 20) == data
    finally:
        await pool.close()
    ds2 = disks(3, prefix="e")
    pool, _ = await filled_pool(ds2, "ec:2+1", 1 << 20)
    try:
        with pytest.raises(InvalidArgument, match="profile ec:2\\+1 needs 3"):
            await pool.remove_device(2)
    finally:
        await pool.close()


async def test_crash_during_rebuild_loses_nothing_and_resumes(tmp_path: object) -> None:
    """Invariant 1 under a crash at sampled points of a replace + rebuild: every state
    imports, checks clean, reads back byte-exact, and its rebuild finishes."""
    tmp = str(tmp_path)
    size = 4 << 20
    paths = [os.path.join(tmp, f"d{i}") for i in range(4)]
    devs = [FileDevice(p, create_size=24 << 20) for p in paths]
    pool = await Pool.create("c", devs, profile="ec:2+1", extent_size=1 << 20,
                             meta_size=4 << 20)
    vol = await VolumeManager(pool).create("v", size, block_size=BS, compression=False)
    data = random.Random(3).randbytes(size)
    await vol.write(0, data)
    await vol.flush()
    await pool.close()
    spare = os.path.join(tmp, "spare")
    FileDevice(spare, create_size=24 << 20).close()
    all_paths = [*paths, spare]
    base = [await trio.Path(p).read_bytes() for p in all_paths]
    log = WriteLog()
    rec = [RecordingDevice(FileDevice(p), i, log) for i, p in enumerate(all_paths)]
    pool = await Pool.open(rec[:4])
    await pool.replace_device(1, rec[4])
    start = log.mark("rebuild start")
    await rebuild.run(pool)
    await pool.close()
    sim = CrashSimulator(base, log)
    rng = random.Random(11)
    points = [p for p in sim.write_points() + sim.sync_points() if p > start]
    positions = sorted(set(rng.sample(points, min(12, len(points))))
                       | set(sim.sync_points()[-4:]))
    n = 0
    for cs in sim.states(positions, rng, variants=("drop", "random")):
        mem = [MemoryDevice(len(img), path=f"m{i}", data=img)
               for i, img in enumerate(cs.images)]
        # The old member 1 was wiped: import from the others and the replacement.
        p2 = await Pool.open([mem[0], mem[2], mem[3], mem[4]])
        try:
            assert (await check(p2)).ok
            assert await read_all(p2, size) == data, cs.position
            await rebuild.run(p2)
            assert p2.statistics().members[1].state == "online"
            assert await read_all(p2, size) == data
        finally:
            await p2.close()
        n += 1
    assert n >= 10


@pytest.mark.parametrize(("k", "m"), [(4, 2), (2, 1), (3, 2), (1, 2), (8, 3)])
def test_rebuilt_fragments_are_the_encoded_ones(k: int, m: int) -> None:
    """records.verify_stripes with a target rebuilds most records of a run with one zfec
    call over the column buffers: every fragment it makes must be exactly the one the
    full stripe had (odd payload lengths, short payloads with empty chunks, lz4 flag), and
    records with a bad fragment (fixed one by one) or a forged nonzero padding (a parity
    target then falls back to re-encoding the payload) come out right too."""
    rng = random.Random(k * 10 + m)
    n = k + m
    devs = [MemoryDevice(8 << 20, path=f"d{i}") for i in range(n)]
    cols = tuple((d, 4096, d.path) for d in devs)
    plans: list[records.RecordPlan] = []
    encoded: list[codec.EncodedRecord] = []
    off = 0
    for slot in range(40):
        size = rng.choice([65536, 4096, 1, 7, 100, 513, 4095, 12345, 65535, 3])
        rec = codec.stripe(rng.randbytes(size), rng.choice([0, codec.FLAG_LZ4]), k, m)
        for i in range(n):
            devs[i].pwrite(4096 + off * SECTOR, rec.fragments[i])
        plans.append(records.RecordPlan(slot, 7, off, rec.units, k, m, rec.plen, rec.flags,
                                        rec.rhash, cols))
        encoded.append(rec)
        off += rec.units
    # Slot 5: a flipped byte in column 1's chunk (the rebuild reads around it).
    at = 4096 + plans[5].offset * SECTOR + codec.HEADER_SIZE
    devs[1].pwrite(at, bytes([devs[1].pread(at, 1)[0] ^ 0xFF]))
    # Slot 9 (a short payload: the last data chunk is padding): that padding made nonzero
    # and the fragment's own checksum forged to match.
    p9 = plans[9]
    last = k - 1
    if k > 1 and p9.plen < k * codec.chunk_length(p9.plen, k):
        frag = bytearray(encoded[9].fragments[last])
        clen = codec.chunk_length(p9.plen, k)
        frag[codec.HEADER_SIZE + clen - 1] ^= 0x5A
        struct.pack_into("<Q", frag, 0,
                         xxhash.xxh3_64_intdigest(bytes(frag[8:codec.HEADER_SIZE + clen])))
        devs[last].pwrite(4096 + p9.offset * SECTOR, frag)
    for target in range(n):
        out = records.verify_stripes(plans, Deadlines(), target=target)
        # Decoding a data chunk from the forged one gives a payload that fails the record
        # hash: nothing is written for it (as before the batched path).
        allowed = {9} if k > 1 and last != target < k else set()
        if m == 1 and target != 1:
            allowed.add(5)        # one parity and two columns out: beyond repair
        assert set(out.failures) <= allowed, (target, out.failures)
        got = {(r.index, r.offset): bytes(r.data) for r in out.repairs}
        for p, rec in zip(plans, encoded, strict=True):
            if p.slot in out.failures:
                assert (target, 4096 + p.offset * SECTOR) not in got
                continue
            assert got[(target, 4096 + p.offset * SECTOR)] == bytes(rec.fragments[target]), \
                (target, p.slot, p.plen)
        if 5 not in out.failures and target != 1 and (k > 1 or target == 0):
            assert (1, 4096 + plans[5].offset * SECTOR) in got   # the flipped one is fixed
    # Reads done beforehand (as the rebuild pipeline does) give the same result.
    reads = records.read_stripes(plans, Deadlines(), target=0)
    again = records.verify_stripes(plans, Deadlines(), target=0, reads=reads)
    assert sorted((r.index, r.offset, bytes(r.data)) for r in again.repairs) == sorted(
        (r.index, r.offset, bytes(r.data))
        for r in records.verify_stripes(plans, Deadlines(), target=0).repairs)


@pytest.mark.parametrize("fault", ["error", "hang"])
async def test_failed_rebuild_writes_release_the_segments_and_keep_the_marks(
        disks: Disks, fault: str) -> None:
    """The rebuild's stages run ahead of its writes; when the new member's writes fail,
    or hang (given up after the write timeout: the member is faulted at once, and the
    rebuild does not wait for it), every segment they pinned is let go, none is marked
    rebuilt that was not written, and reads go on byte-exact."""
    ds = disks(6)
    size = 4 * SIZE
    pool, data = await filled_pool(ds, "ec:4+2", size)
    try:
        faulty = FaultyDevice(disks(1, prefix="spare").create()[0])
        await pool.replace_device(2, faulty)
        before = dict(pool.state.members[2].marks)
        assert len(before) > 4
        if fault == "error":
            faulty.write_error_rate = 1.0
        else:
            pool.deadlines.write = 0.2
            faulty.write_delay = 2.0
        with trio.fail_after(1.8):          # done before a hung device would answer
            assert await rebuild.run(pool) == 0
        assert not any(s in pool.pins for s in pool.state.segments)
        if fault == "error":
            assert pool.state.members[2].marks == before
        else:
            assert pool.state.members[2].state == "faulted"
            assert set(before) <= set(pool.state.members[2].marks)
        assert await read_all(pool, size) == data
    finally:
        if fault == "hang":
            await trio.sleep(2.5)           # the given-up writes return
        await pool.close()


async def test_rebuild_in_many_small_steps_on_two_threads(
        disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline keeps the order with both verify threads at work (the pool idle at
    once) and steps of a few records: every fragment lands, every segment is marked clean
    only once written, and then any two other members can go."""
    monkeypatch.setattr(rebuild, "IDLE_AFTER", 0.0)
    monkeypatch.setattr(rebuild, "RUN_BYTES", 3 * 17 * 1024)
    ds = disks(6)
    size = 2 * SIZE
    pool, data = await filled_pool(ds, "ec:4+2", size)
    try:
        await pool.replace_device(0, disks(1, prefix="spare").create()[0])
        marked = len(pool.state.members[0].marks)
        assert marked > 2
        seen: list[int] = []

        async def progress(p: rebuild.RebuildProgress) -> None:
            seen.append(p.done_bytes)
        written = await rebuild.run(pool, progress=progress)
        assert written > 0 and len(seen) > 4 * marked and seen == sorted(seen)
        assert not pool.state.members[0].marks
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()
    paths = [disks(1, prefix="spare").paths[0], *ds.paths[1:]]
    for lost in ((1, 2), (4, 5), (2, 5)):
        pool = await Pool.open([FileDevice(str(p)) for i, p in enumerate(paths)
                                if i not in lost])
        try:
            assert await read_all(pool, size) == data, lost
        finally:
            await pool.close()


async def test_rebuild_keeps_to_one_thread_while_volumes_read(
        disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second verify thread is for an idle pool: while a volume keeps reading (here
    record-cache hits only, which reach no device), the rebuild verifies in one thread."""
    monkeypatch.setattr(rebuild, "RUN_BYTES", 3 * 17 * 1024)
    threads: set[str] = set()
    verify = records.verify_stripes

    def counted(*args: object, **kwargs: object) -> records.StripeOutcome:
        threads.add(threading.current_thread().name)
        return verify(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(records, "verify_stripes", counted)
    ds = disks(6)
    pool, data = await filled_pool(ds, "ec:4+2", SIZE)
    try:
        vol = VolumeManager(pool).get("v")
        await pool.replace_device(3, disks(1, prefix="spare").create()[0])
        done = trio.Event()

        async def reader() -> None:
            while not done.is_set():
                assert await vol.read(BS, 4096) == data[BS:BS + 4096]
                await trio.sleep(0.002)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.05)
            assert await rebuild.run(pool) > 0
            done.set()
        assert len(threads) == 1, threads
        assert pool.statistics().members[3].state == "online"
    finally:
        await pool.close()


async def test_rebuild_reads_around_a_survivor_that_fails_reads(disks: Disks) -> None:
    """A survivor's column reads fail over part of the data area during a rebuild: those
    records are rebuilt one by one from the other columns (no batch), the rest in batches;
    afterwards the rebuilt member serves reads with that survivor and another gone."""
    ds = disks(6)
    size = 2 * SIZE
    pool, data = await filled_pool(ds, "ec:4+2", size)
    await pool.close()
    devs: list[FileDevice | FaultyDevice] = list(ds.open())
    faulty = FaultyDevice(devs[2])
    devs[2] = faulty
    pool = await Pool.open(devs)
    try:
        await pool.replace_device(0, disks(1, prefix="spare").create()[0])
        start = pool.layout.data_offset + (1 << 20)
        faulty.bad_ranges = [(start, start + (2 << 20))]
        pool.member_health.threshold = 1 << 30     # keep it a member: its other reads are good
        assert await rebuild.run(pool) > 0
        assert faulty.injected_errors > 0
        assert pool.statistics().members[0].state == "online"
    finally:
        await pool.close()
    paths = [disks(1, prefix="spare").paths[0], *ds.paths[1:]]
    pool = await Pool.open([FileDevice(str(p)) for i, p in enumerate(paths) if i not in (2, 3)])
    try:
        assert await read_all(pool, size) == data
    finally:
        await pool.close()


async def test_a_scrub_and_a_rebuild_at_once_both_finish(
        disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebuild holds the pool's maintenance thread for its whole run; a scrub started
    beside it (its metadata pass takes the commit lock, which the rebuild's commits need)
    must not deadlock with it: both finish, and the pool is whole."""
    monkeypatch.setattr(rebuild, "COMMIT_EVERY", 0.0)     # it commits after each segment
    monkeypatch.setattr(rebuild, "RUN_BYTES", 64 << 10)   # in many small steps
    ds = disks(6)
    pool, data = await filled_pool(ds, "ec:4+2", SIZE)
    try:
        await pool.replace_device(1, disks(1, prefix="spare").create()[0])
        await scrub.control(pool, "start")
        results: dict[str, object] = {}

        async def do_rebuild() -> None:
            results["rebuild"] = await rebuild.run(pool)

        async def do_scrub() -> None:
            await trio.sleep(0.01)                    # the rebuild is under way
            results["scrub"] = await scrub.run(pool)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(do_scrub)
                nursery.start_soon(do_rebuild)
        assert isinstance(results["rebuild"], int) and results["rebuild"] > 0
        done = results["scrub"]
        assert isinstance(done, dict) and done["state"] == "finished", done
        assert pool.statistics().members[1].state == "online"
        assert await read_all(pool, SIZE) == data
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()


async def test_a_segment_rebuilt_while_its_member_went_away_keeps_its_mark(
        disks: Disks) -> None:
    """A rebuild records the member's epoch when a segment's reads begin. If the member
    goes away meanwhile (writes then skip it) and comes back with the same device, the
    rebuild's end must not clear the mark: the next pass redoes the segment."""
    ds = disks(6)
    pool, _data = await filled_pool(ds, "ec:4+2", SIZE)
    try:
        await pool.offline(3)
        vol = VolumeManager(pool).get("v")
        await vol.write(0, random.Random(8).randbytes(4 * BS))
        await vol.flush()
        await pool.online(3)
        marks = dict(pool.state.members[3].marks)
        assert marks
        seg = next(iter(marks))
        dev = pool.devices[3]
        assert dev is not None
        began = pool.members.epoch(3)
        await pool.offline(3)                    # away and back while "rebuilding"
        await pool.online(3)
        assert pool.devices[3] is dev and pool.members.epoch(3) != began
        pool.members.mark_rebuilt(3, seg, dev, began)
        assert seg in pool.state.members[3].marks
        pool.members.mark_rebuilt(3, seg, dev, pool.members.epoch(3))
        assert seg not in pool.state.members[3].marks
        await rebuild.run(pool)
        assert not pool.state.members[3].marks
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()
