"""Thin provisioning and a full pool (invariants 6 and 8).

- Unwritten ranges read as zeros and take no space; zero writes and trims give space back.
- When the pool is full, writes fail with ENOSPC (NoSpace) before anything changes, data
  already written stays intact, trims still work, and once space is released writes work.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from pool import FileDevice, Pool, codec
from pool import store as store_impl
from pool.checker import check
from pool.errors import NoSpace
from pool.faults import FaultyDevice
from pool.state import ENTRY, HOLE
from pool.tuning import PoolTuning
from storaged.config import load
from storaged.daemon import _background, pool_tuning
from storaged.registry import PoolEntry
from volumes import VolumeManager


async def _pool(tmp_path: Path, size: int = 8 << 20) -> Pool:
    devs = [FileDevice(str(tmp_path / f"d{i}"), create_size=size) for i in range(3)]
    return await Pool.create("t", devs, profile="ec:2+1", extent_size=256 << 10,
                             meta_size=1 << 20)


async def test_unwritten_reads_zero_and_takes_no_space(tmp_path: Path) -> None:
    pool = await _pool(tmp_path)
    try:
        vol = await VolumeManager(pool).create("v", 1 << 30, block_size=65536)  # overcommit
        assert await vol.read((1 << 30) - 8192, 8192) == bytes(8192)
        assert vol.statistics().mapped_bytes == 0
        assert pool.statistics().live_bytes == 0
        await vol.write(65536 * 3, os.urandom(65536))
        await vol.write(65536 * 5, bytes(65536))  # a zero block is a hole
        await vol.flush()
        assert vol.statistics().mapped_bytes == 65536
        assert [(e.offset, e.length, e.allocated) for e in await vol.allocation(0, 65536 * 8)] \
            == [(0, 65536 * 3, False), (65536 * 3, 65536, True), (65536 * 4, 65536 * 4, False)]
        await vol.write_zeroes(65536 * 3, 65536)
        await vol.flush()
        assert vol.statistics().mapped_bytes == 0
        assert vol.statistics().stored_bytes == 0
        assert pool.statistics().live_bytes == 0
    finally:
        await pool.close()


async def test_full_pool_fails_writes_with_enospc_and_recovers(tmp_path: Path) -> None:
    pool = await _pool(tmp_path)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 256 << 20, block_size=65536, compression=False)
    chunk = 1 << 20
    written: dict[int, bytes] = {}
    with pytest.raises(NoSpace):
        for i in range(256):
            data = os.urandom(chunk)
            await vol.write(i * chunk, data)
            written[i] = data
            if i % 4 == 3:
                await vol.flush()
    assert written, "the pool took no data at all"
    await vol.flush()  # what was acknowledged is written back: the reservation held it
    for i, data in written.items():
        assert await vol.read(i * chunk, chunk) == data
    # Trim works on a full pool, and frees space for new writes.
    await vol.trim(0, len(written) * chunk)
    await vol.flush()
    assert pool.statistics().live_bytes == 0
    fresh = os.urandom(chunk)
    await vol.write(0, fresh)
    await vol.flush()
    assert await vol.read(0, chunk) == fresh
    await pool.close()
    pool = await Pool.open([FileDevice(str(tmp_path / f"d{i}")) for i in range(3)])
    try:
        assert await VolumeManager(pool).get("v").read(0, chunk) == fresh
    finally:
        await pool.close()


async def test_cleaner_keeps_up_with_overwrites_of_ten_times_the_volume(tmp_path: Path) -> None:
    """Random overwrites totalling 10x the volume on a pool barely larger than it: the
    cleaner moves live records out of mostly-dead segments, no ENOSPC happens, the data is
    exact and the checker finds everything consistent (invariants 6 and 8)."""
    pool = await Pool.create("gc", [FileDevice(str(tmp_path / "d0"), create_size=48 << 20)],
                             extent_size=1 << 20, meta_size=4 << 20)
    vm = VolumeManager(pool)
    size = 24 << 20
    vol = await vm.create("v", size, block_size=65536, compression=False)
    model = bytearray(size)
    rng = random.Random(5)
    written = 0
    while written < 10 * size:
        off = rng.randrange(size // 65536) * 65536
        n = min(rng.choice([65536, 4 * 65536]), size - off)
        data = os.urandom(n)
        await vol.write(off, data)
        model[off:off + n] = data
        written += n
        if rng.random() < 0.05:
            await vol.flush()
    await vol.flush()
    st = pool.statistics()
    assert st.records_relocated > 0
    assert await vol.read(0, size) == bytes(model)
    assert (await check(pool)).ok
    await pool.close()
    pool = await Pool.open([FileDevice(str(tmp_path / "d0"))])
    try:
        assert await VolumeManager(pool).get("v").read(0, size) == bytes(model)
    finally:
        await pool.close()


async def test_enospc_then_deleting_a_snapshot_frees_space(tmp_path: Path) -> None:
    """Invariant 8: a full pool fails writes with ENOSPC and nothing else breaks; deleting
    a snapshot always works and gives its space back to new writes."""
    pool = await Pool.create("full", [FileDevice(str(tmp_path / "d0"), create_size=40 << 20)],
                             extent_size=1 << 20, meta_size=4 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 256 << 20, block_size=65536, compression=False)
    first = os.urandom(12 << 20)
    await vol.write(0, first)
    await vm.snapshot("v", "old")                         # holds the first 12 MiB
    second = os.urandom(12 << 20)
    await vol.write(0, second)                            # overwrites, snapshot keeps old
    await vol.flush()
    with pytest.raises(NoSpace):
        for i in range(64):
            await vol.write((12 << 20) + i * (1 << 20), os.urandom(1 << 20))
            await vol.flush()
    await vol.flush()
    assert await vol.read(0, 12 << 20) == second          # nothing else broke
    assert await vm.snapshot_volume("v", "old").read(0, 12 << 20) == first
    await vm.delete_snapshot("v", "old")                  # always succeeds
    more = os.urandom(8 << 20)
    await vol.write(200 << 20, more)                      # the cleaner wins the space back
    await vol.flush()
    assert await vol.read(200 << 20, 8 << 20) == more
    assert await vol.read(0, 12 << 20) == second
    assert (await check(pool)).ok
    await pool.close()


async def test_metadata_area_full_refuses_writes_but_deletes_work(tmp_path: Path) -> None:
    """Invariant 8 for metadata: when the map nodes would outgrow the metadata area, writes
    get ENOSPC before anything fails, and deleting still commits (the pool never fails)."""
    pool = await Pool.create("meta", [FileDevice(str(tmp_path / "d0"), create_size=64 << 20)],
                             extent_size=1 << 20, meta_size=1 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 64 << 30, block_size=4096, compression=False)
    written = []
    with pytest.raises(NoSpace, match="metadata area"):
        for i in range(4096):                 # one block per leaf: each write a new node
            await vol.write(i * (4 << 20), os.urandom(4096))
            written.append(i)
            await vol.flush()
    assert len(written) > 10
    for i in written[:5]:
        assert len(await vol.read(i * (4 << 20), 4096)) == 4096
    await vm.snapshot("v", "s")               # metadata-only operations still work
    await vm.delete_snapshot("v", "s")
    await vm.delete("v")
    assert pool.statistics().state == "online"
    assert (await check(pool)).ok
    vol = await vm.create("w", 1 << 20)
    await vol.write(0, b"again")
    await vol.flush()
    await pool.close()


def _allocated(paths: list[Path]) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in paths)


async def _sparse_pool(tmp_path: Path, tuning: PoolTuning | None = None
                       ) -> tuple[Pool, list[Path], list[FaultyDevice]]:
    """An ec:2+1 pool of 1 MiB extents on three sparse files (behind FaultyDevices, to
    slow their discards down), the files' paths and the devices."""
    paths = [tmp_path / f"d{i}" for i in range(3)]
    devs = [FaultyDevice(FileDevice(str(p), create_size=64 << 20)) for p in paths]
    pool = await Pool.create("t", devs, profile="ec:2+1", extent_size=1 << 20,
                             meta_size=1 << 20, tuning=tuning)
    return pool, paths, devs


async def _fill_and_delete(pool: Pool, paths: list[Path], mib: int) -> int:
    """Write ``mib`` MiB of random bytes to a new volume, flush, delete it and wait for
    its discards; the device files' allocated bytes while the volume held the data."""
    vm = VolumeManager(pool)
    vol = await vm.create("v", mib << 20)
    await vol.write(0, os.urandom(mib << 20))
    await vol.flush()
    held = _allocated(paths)
    await vm.delete("v")
    await pool.settle_discards()            # discards run in the background
    return held


async def test_freed_space_goes_back_to_sparse_device_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 6 down to the backing store: extents freed by a delete (or by trims, or
    the cleaner) are discarded once the freeing commit is durable, so sparse device files
    shrink, as blocks trimmed in a thin LUN or an SSD would be; and an extent reused
    right after is written after its discard, never zeroed under new data."""
    monkeypatch.setattr(store_impl, "DISCARD_BATCH", 8)     # several rounds per delete
    monkeypatch.setattr(store_impl, "DISCARD_DELAY", 0.0)   # discard as soon as freed
    pool, paths, devs = await _sparse_pool(tmp_path)
    vm = VolumeManager(pool)
    try:
        # No runner yet (a Pool used alone): settle_discards discards in its own task.
        empty = _allocated(paths)
        full = await _fill_and_delete(pool, paths, 24)
        assert full - empty >= 36 << 20        # 24 MiB of data + 12 MiB of parity
        assert pool.statistics().discarded_extents >= 36
        assert _allocated(paths) - empty < 2 << 20
        # From here the pool's own task (Pool.run, in a nursery this test owns, as the
        # daemon's) discards in the background. Extents freed by one task's delete are
        # reused by another's writes while their (slow) discards are under way; what
        # those writes put there reads back.
        async with trio.open_nursery() as background:
            await background.start(pool.run)
            for d in devs:
                d.discard_delay = 0.05
            data = random.Random(3).randbytes(24 << 20)
            again = await vm.create("w", 32 << 20)
            discarded = pool.statistics().discarded_extents
            for r in range(3):
                old = await vm.create(f"v{r}", 16 << 20)
                await old.write(0, os.urandom(16 << 20))
                await old.flush()

                async def rewrite(r: int = r) -> None:
                    for off in range(r * (8 << 20), (r + 1) * (8 << 20), 1 << 20):
                        await again.write(off, data[off:off + (1 << 20)])
                        await again.flush()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(vm.delete, f"v{r}")
                    nursery.start_soon(rewrite)
            assert pool.statistics().discarded_extents > discarded   # in the background
            assert await again.read(0, len(data)) == data
            assert (await check(pool)).ok
            await pool.close()                 # settles the discards; run returns
    finally:
        await pool.close()
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    try:
        assert await VolumeManager(pool).get("w").read(0, 24 << 20) == data
    finally:
        await pool.close()


async def test_discard_can_be_turned_off(tmp_path: Path) -> None:
    """`discard = false` (for backing stores where a discard is slow or unwanted): freed
    extents go back to the pool only, the device files keep their blocks."""
    conf = tmp_path / "storaged.toml"
    conf.write_text("discard = false\n")
    assert load(str(conf)).discard is False and load(None).discard is True
    tuning = pool_tuning(load(str(conf)))       # what the daemon hands the registry
    assert tuning.discard_freed is False
    pool, paths, _devs = await _sparse_pool(tmp_path, tuning)
    try:
        held = await _fill_and_delete(pool, paths, 16)
        assert pool.statistics().discarded_extents == 0
        assert _allocated(paths) >= held
    finally:
        await pool.close()


async def test_make_room_frees_a_segment_left_by_a_failed_store(tmp_path: Path) -> None:
    """The write hang of issue 20 (rules S3, S6): a store that fails with NoSpace half-way
    leaves a closed segment holding only its unreferenced record. ``make_room`` used to
    count that segment as cleaned, free nothing, commit and try again -- a busy loop in
    which every writer of the pool hung at 100% CPU while reads and flushes went on. Now
    it frees such a segment and answers."""
    pool = await _pool(tmp_path, size=4 << 20)
    try:
        prof = pool.default_profile
        map_id = pool.create_map()
        block = os.urandom(65536)
        cost = pool.record_cost(65536, prof)
        units = codec.worst_case_units(65536, prof.k)
        cap = pool.layout.extent_size // 512
        b = 0
        # Fill the pool until its last segment is open and has room for one record only.
        while True:
            segs = pool.state.segments
            last = segs[max(segs)] if segs else None
            no_free = not any(m.free_extents for m in pool.statistics().members)
            if last is not None and no_free and cap - last.fill < 2 * units:
                break
            await pool.write_blocks(map_id, prof, False, [(b, block)])
            b += 1
        assert cap - last.fill >= units, "the last segment is full: adjust sizes"
        in_last = [i for i in range(b)
                   if ENTRY.unpack_from(pool.state.forest.get(map_id, i) or HOLE)[0]
                   == last.id]
        pool.clear_map_range(map_id, in_last[0], in_last[-1] - in_last[0] + 1)
        await pool.commit()
        # Two records: the first goes into the last segment's tail, the second finds
        # no room and no free extent.
        with pytest.raises(NoSpace):
            await pool.write_blocks(map_id, prof, False, [(b, block), (b + 1, block)])
        # The pool is truly full (its reserves aside): making room must answer NoSpace,
        # at once, having freed that segment.
        with trio.fail_after(10), pytest.raises(NoSpace):
            await pool.make_room(cost, prof)
        assert last.id not in pool.state.segments
        pool.delete_map(map_id)        # (a bare map: no volume object refers to it)
        await pool.commit()
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()


class _BuggyDiscard(FaultyDevice):
    """A device whose discard hits a bug (not an I/O error): fault injection for the
    pool's background task."""

    broken = True

    def discard(self, offset: int, length: int) -> None:
        if self.broken:
            raise RuntimeError("a bug in discard")
        super().discard(offset, length)


async def test_a_failing_background_task_reaches_its_owner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The discard task runs in a nursery its owner holds (Pool.run) and a failure there
    is not swallowed: it reaches the owner (the daemon logs it and starts run again).
    Nothing else changes: the pool stays online and consistent, kept data reads back
    byte-exact, the freed extents stay free (not discarded), and a new runner starts."""
    monkeypatch.setattr(store_impl, "DISCARD_DELAY", 0.0)
    paths = [tmp_path / f"d{i}" for i in range(3)]
    devs = [_BuggyDiscard(FileDevice(str(p), create_size=64 << 20)) for p in paths]
    pool = await Pool.create("t", devs, profile="ec:2+1", extent_size=1 << 20,
                             meta_size=1 << 20)
    vm = VolumeManager(pool)
    data = random.Random(5).randbytes(4 << 20)
    try:
        keep = await vm.create("k", 4 << 20)
        await keep.write(0, data)
        await keep.flush()
        with trio.fail_after(20), pytest.raises(BaseExceptionGroup) as err:
            async with trio.open_nursery() as background:
                await background.start(pool.run)
                gone = await vm.create("v", 8 << 20)
                await gone.write(0, os.urandom(8 << 20))
                await gone.flush()
                await vm.delete("v")
                await trio.sleep_forever()      # until the runner's failure cancels it
        assert err.group_contains(RuntimeError, match="a bug in discard")
        st = pool.statistics()
        assert st.state == "online" and st.discarded_extents == 0
        assert await keep.read(0, len(data)) == data
        assert (await check(pool)).ok
        for d in devs:
            d.broken = False
        async with trio.open_nursery() as background:
            await background.start(pool.run)    # the owner can start it again
            await pool.close()                  # settles what is queued; run returns
    finally:
        await pool.close()
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    try:
        assert await VolumeManager(pool).get("k").read(0, len(data)) == data
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Poll (the test's fail_after bounds it)."""
    for _ in range(100_000):
        if condition():
            return
        await trio.sleep(0.01)


async def test_the_daemon_logs_a_failed_background_task_and_starts_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The owner's side (storaged.daemon._background, which ``maintain`` starts per pool):
    a failure of Pool.run is logged once with its traceback, run is started again, and
    the new runner discards what is freed next; once the pool closes, the owner returns."""
    monkeypatch.setattr(store_impl, "DISCARD_DELAY", 0.0)
    paths = [tmp_path / f"d{i}" for i in range(3)]
    devs = [_BuggyDiscard(FileDevice(str(p), create_size=64 << 20)) for p in paths]
    pool = await Pool.create("t", devs, profile="ec:2+1", extent_size=1 << 20,
                             meta_size=1 << 20)
    vm = VolumeManager(pool)
    entry = PoolEntry(pool, vm, [str(p) for p in paths])

    async def fill_and_delete(name: str) -> None:
        vol = await vm.create(name, 8 << 20)
        await vol.write(0, os.urandom(8 << 20))
        await vol.flush()
        await vm.delete(name)

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_background, entry, 0.01)
                await fill_and_delete("a")
                await _until(lambda: "its background task failed" in caplog.text)
                assert "RuntimeError: a bug in discard" in caplog.text   # the traceback
                assert pool.statistics().discarded_extents == 0
                for d in devs:
                    d.broken = False
                await fill_and_delete("b")
                await _until(lambda: pool.statistics().discarded_extents > 0)   # restarted
                assert caplog.text.count("its background task failed") == 1
                assert (await check(pool)).ok
                await pool.close()                  # _background returns
    finally:
        await pool.close()
