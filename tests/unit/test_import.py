"""Import from devices alone, labels, and bad input.

Invariant 9 (bad input gets a clear error and changes nothing): corrupted labels, a device
of another pool, a truncated device, a stale member, a device already in a pool, bad
profiles, extent sizes, names, volume sizes and out-of-range I/O are each refused with an
error that says what is wrong -- and every refused import leaves the device files
byte-identical.
DESIGN §2 ("a pool is self-describing"): import works from the devices alone, in any order,
from another directory; invariant 5: labels and metadata are on every member (a backup
label at the end of each device).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pool import FileDevice, Pool
from pool.checker import check
from pool.errors import AlreadyExists, ImportFailed, InvalidArgument, NoSpace
from pool.layout import LABEL_SIZE, PAGE_UNIT, SB_OFFSET, SB_SLOT_SIZE, SB_SLOTS
from tests.conftest import DiskSet
from volumes import VolumeManager

DEV = 32 << 20
MiB = 1 << 20
EXT = 1 << 20
VOL = 2 << 20

Disks = Callable[..., DiskSet]


async def _tank(disks: Disks, name: str = "tank", n: int = 3, profile: str = "ec:2+1",
                seed: int = 1) -> tuple[DiskSet, bytes]:
    """A closed pool ``name`` on n devices holding volume 'v' full of random data."""
    ds = disks(n, size=DEV, prefix=name)
    pool = await Pool.create(name, ds.create(), profile=profile, extent_size=EXT)
    vol = await VolumeManager(pool).create("v", VOL)
    data = random.Random(seed).randbytes(VOL)
    await vol.write(0, data)
    await vol.flush()
    await pool.close()
    return ds, data


async def _content(devices: list[FileDevice], **kw: Any) -> bytes:
    pool = await Pool.open(devices, **kw)
    try:
        return await VolumeManager(pool).get("v").read(0, VOL)
    finally:
        await pool.close()


async def _refused(sets: list[DiskSet], devices: list[FileDevice], *fragments: str,
                   **kw: Any) -> str:
    """Pool.open(devices) raises ImportFailed whose message holds every fragment, and no
    byte of any file in ``sets`` changes. Returns the message."""
    before = [ds.digests() for ds in sets]
    try:
        with pytest.raises(ImportFailed) as err:
            await Pool.open(devices, **kw)
    finally:
        for d in devices:
            d.close()
    msg = err.value.message
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert [ds.digests() for ds in sets] == before, "a refused import changed a device"
    return msg


def _scribble(path: Path, *offsets: int, data: bytes = b"\xde\xad\xbe\xef") -> None:
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(data)


# ---- labels -----------------------------------------------------------------------------

async def test_corrupt_primary_labels_fall_back_to_the_backup_copy(disks: Disks) -> None:
    """Invariant 4/5 for labels: each device has a second label at its end; with the
    primary corrupted (one device) or zeroed (all devices) the pool still imports and reads
    back exactly."""
    ds, data = await _tank(disks)
    _scribble(ds.paths[1], 100)
    assert await _content(ds.open()) == data
    for p in ds.paths:
        _scribble(p, 0, data=bytes(LABEL_SIZE))
    assert await _content(ds.open(order=[2, 0, 1])) == data


async def test_one_members_metadata_copy_corrupt_still_imports_and_is_reported(
        disks: Disks) -> None:
    """Invariants 4 and 5 for metadata: member 0's copy of the page area, its newest
    superblock and its journal are scribbled over; the checksums catch it, the import
    uses the other members' copies, the data reads back exactly and the checker names the
    bad copies on member 0."""
    ds, data = await _tank(disks)
    pool = await Pool.open(ds.open())
    layout, gen = pool.layout, pool.state.generation
    await pool.close()
    gen += 1                                # the close wrote one more superblock
    spots = [layout.pages_offset + u * PAGE_UNIT for u in range(layout.pages_size // PAGE_UNIT)]
    spots += [SB_OFFSET + (gen % SB_SLOTS) * SB_SLOT_SIZE + 64, layout.journal_offset]
    _scribble(ds.paths[0], *spots, data=b"\xff" * 64)
    pool = await Pool.open(ds.open(order=[0, 2, 1]))
    try:
        assert await VolumeManager(pool).get("v").read(0, VOL) == data
        report = await check(pool)
        assert report.problems, "corrupt metadata copies went unreported"
        assert all(p.startswith(f"{ds.paths[0]}: copy of map node") for p in report.problems)
    finally:
        await pool.close()


async def test_a_grown_member_device_still_imports(disks: Disks) -> None:
    """DESIGN §2: a member whose device grew (a resized LUN or image file) is still
    itself: the pool imports and reads back exactly. A device that shrank is truncated
    (see below)."""
    ds, data = await _tank(disks)
    os.truncate(ds.paths[1], DEV + (8 << 20))
    assert await _content(ds.open()) == data


async def test_both_labels_corrupt_is_refused_naming_the_device(disks: Disks) -> None:
    """Invariant 9: a device whose two labels are both bad is refused, naming it and what
    is wrong with each copy; nothing is changed."""
    ds, _ = await _tank(disks)
    _scribble(ds.paths[2], 100, DEV - LABEL_SIZE + 100)
    msg = await _refused([ds], ds.open(), f"{ds.paths[2]} is not a storaged pool member",
                         "primary: label checksum mismatch", "backup: label checksum mismatch")
    assert str(ds.paths[0]) not in msg and str(ds.paths[1]) not in msg


async def test_a_device_of_another_pool_is_refused(disks: Disks) -> None:
    """Invariant 9: a device of another pool mixed in. With a name, the message says which
    device belongs to another pool; without, it lists the pools and their devices. An
    unknown name says so. Nothing is changed on any device (pool.importer invariant 3)."""
    ds, data = await _tank(disks)
    other, _ = await _tank(disks, "other", n=1, profile="plain", seed=2)
    mixed = [2, 0, 1]
    await _refused([ds, other], [*ds.open(order=mixed), *other.open()],
                   f"{other.paths[0]}: belongs to another pool, not 'tank'", name="tank")
    msg = await _refused([ds, other], [*ds.open(order=mixed), *other.open()],
                         "the devices belong to 2 pools", "tank (", "other (")
    for p in [*ds.paths, *other.paths]:
        assert str(p) in msg
    await _refused([ds, other], [*ds.open(), *other.open()],
                   "no device given belongs to a pool named 'nope'", name="nope")
    assert await _content(ds.open(), name="tank") == data   # and the right ones still work


async def test_a_truncated_device_is_refused(disks: Disks) -> None:
    """Invariant 9: a member file shorter than its label says (cut by 1 MiB, or by just
    one sector) is refused as truncated, naming it; nothing is changed (pool.labels
    invariant 2)."""
    ds, data = await _tank(disks)
    pristine = ds.save()
    for cut in (1 << 20, 512):
        ds.restore(pristine)
        os.truncate(ds.paths[0], DEV - cut)
        await _refused([ds], ds.open(), f"{ds.paths[0]} is truncated",
                       f"its label says {DEV} bytes but the device has {DEV - cut}")
    ds.restore(pristine)
    assert await _content(ds.open()) == data


async def test_a_stale_member_is_refused(disks: Disks) -> None:
    """Invariant 9 (pool.importer invariant 3): an older copy of a member (it may lack
    acknowledged data) is refused as stale, saying what to do, and nothing is changed --
    whether the pool kept running with the member online (the copy is behind the pool)
    or the member was away for a while (the copy is older than the member was when it
    left). The member itself, back from being away untouched, is taken back (invariant
    5)."""
    ds, data = await _tank(disks, "copy", seed=3)
    old = ds.save()
    for i in range(2):      # the pool moves on (imports, writes, checkpoints)
        pool = await Pool.open(ds.open())
        vol = VolumeManager(pool).get("v")
        fresh = os.urandom(65536)
        await vol.write(i * 65536, fresh)
        data = data[:i * 65536] + fresh + data[(i + 1) * 65536:]
        await pool.close()
    current = ds.save()
    ds.restore([old[0], *current[1:]])          # an old copy of member 0 comes back
    await _refused([ds], ds.open(order=[1, 0, 2]),
                   f"{ds.paths[0]} is a stale member 0 of pool copy", "older copy",
                   "Import without it")
    ds.restore(current)

    older = ds.save()
    for _ in range(2):                          # time passes with member 1 online
        pool = await Pool.open(ds.open())
        await pool.close()
    left = ds.save()
    pool = await Pool.open(ds.open(without=(1,)))   # then member 1 is away for a while
    await pool.close()
    ds.restore([*ds.save()[:1], older[1], *ds.save()[2:]])   # an older copy of it returns
    await _refused([ds], ds.open(), f"{ds.paths[1]} is a stale member 1 of pool copy",
                   "Import without it")
    ds.restore([*ds.save()[:1], left[1], *ds.save()[2:]])    # the member as it left
    assert await _content(ds.open(order=[2, 1, 0])) == data


async def test_the_same_member_twice_is_refused(disks: Disks) -> None:
    """Invariant 9: the same device given twice (by the same path, or by a symlink: it is
    the same inode, pool.identity invariant 1) is refused as the same device; a copy of a
    member beside the member itself is refused as both claiming the same member index;
    nothing is changed."""
    ds, _ = await _tank(disks)
    await _refused([ds], [*ds.open(), FileDevice(str(ds.paths[1]))],
                   "are the same device", str(ds.paths[1]))
    link = ds.paths[0].parent / "link-to-1"
    link.symlink_to(ds.paths[1])
    await _refused([ds], [*ds.open(), FileDevice(str(link))],
                   f"{ds.paths[1]} and {link} are the same device")
    twin = ds.paths[0].parent / "twin"
    shutil.copy(ds.paths[0], twin)
    await _refused([ds], [*ds.open(), FileDevice(str(twin))],
                   "both claim to be member 0 of pool tank", str(twin))


async def test_no_devices_or_unlabelled_devices_are_refused(disks: Disks) -> None:
    """Invariant 9: importing from nothing, or from blank devices, is refused."""
    with pytest.raises(ImportFailed):
        await Pool.open([])
    blank = disks(2, size=DEV, prefix="blank")
    blank.create()
    await _refused([blank], blank.open(), f"{blank.paths[0]} is not a storaged pool member",
                   "no storaged label")


# ---- import anywhere --------------------------------------------------------------------

async def test_import_from_devices_in_any_order(disks: Disks) -> None:
    """DESIGN §2: the devices alone, in any order, give back the pool: its name, volume
    and data, with each member found at its index whatever position it was passed in."""
    ds, data = await _tank(disks)
    rng = random.Random(7)
    for _ in range(4):
        order = [0, 1, 2]
        rng.shuffle(order)
        pool = await Pool.open(ds.open(order=order))
        try:
            assert pool.name == "tank"
            assert VolumeManager(pool).names() == ["v"]
            assert await VolumeManager(pool).get("v").read(0, VOL) == data
            st = pool.statistics()
            assert st.state == "online"
            assert [m.path for m in st.members] == [str(p) for p in ds.paths]
        finally:
            await pool.close()


async def test_import_on_another_machine(disks: Disks, tmp_path: Path) -> None:
    """DESIGN §2: the device files copied to another directory under other names import
    there (the pool does not remember paths); the originals are untouched and still
    import too."""
    ds, data = await _tank(disks)
    before = ds.digests()
    elsewhere = tmp_path / "another-machine"
    elsewhere.mkdir()
    copies = []
    for i, p in enumerate(ds.paths):
        target = elsewhere / f"sd{'cab'[i]}.img"
        shutil.copy(p, target)
        copies.append(FileDevice(str(target)))
    pool = await Pool.open(copies)
    try:
        assert await VolumeManager(pool).get("v").read(0, VOL) == data
        assert [m.path for m in pool.statistics().members] == [
            str(elsewhere / f"sd{c}.img") for c in "cab"]
    finally:
        await pool.close()
    assert ds.digests() == before
    assert await _content(ds.open()) == data


async def test_destroy_wipes_the_labels(disks: Disks) -> None:
    """Invariant 9: a destroyed pool's devices are no pool's members any more (import is
    refused saying so) and can be used for a new pool without force (pool.labels
    invariant 4)."""
    ds, _ = await _tank(disks)
    pool = await Pool.open(ds.open())
    await pool.destroy()
    await _refused([ds], ds.open(), "is not a storaged pool member", "no storaged label")
    for i in range(3):
        await _refused([ds], ds.open(order=[i]),
                       f"{ds.paths[i]} is not a storaged pool member")
    pool = await Pool.create("reborn", ds.open(), profile="ec:2+1", extent_size=EXT)
    await pool.close()
    pool = await Pool.open(ds.open())
    try:
        assert pool.name == "reborn"
        assert VolumeManager(pool).names() == []
    finally:
        await pool.close()


# ---- create: refusals -------------------------------------------------------------------

async def test_create_refuses_a_device_of_a_pool_unless_forced(disks: Disks) -> None:
    """Invariant 9: a device labelled as a member of a pool (even with only the backup
    label intact) is not silently overwritten: create refuses, naming the pool, and
    changes no device -- not even the blank one listed beside it; force=True takes it
    (pool.importer invariant 5, pool.labels invariant 3)."""
    ds, _ = await _tank(disks)
    fresh = disks(1, size=DEV, prefix="fresh")
    fresh.create()
    _scribble(ds.paths[1], 100)            # primary label of member 1 corrupt
    before = ds.digests(), fresh.digests()
    for i in (0, 1):
        with pytest.raises(InvalidArgument) as err:
            await Pool.create("again", [*fresh.open(), *ds.open(order=[i])],
                              profile="mirror:2", extent_size=EXT)
        assert f"{ds.paths[i]} is already member {i} of pool 'tank'" in err.value.message
        assert "destroy that pool first" in err.value.message
        assert (ds.digests(), fresh.digests()) == before
    pool = await Pool.create("again", [*fresh.open(), *ds.open(order=[0])],
                             profile="mirror:2", extent_size=EXT, force=True)
    await pool.close()
    pool = await Pool.open([*fresh.open(), *ds.open(order=[0])])
    try:
        assert pool.name == "again" and pool.statistics().state == "online"
    finally:
        await pool.close()


@pytest.mark.parametrize(("n", "kwargs", "match"), [
    (5, {"profile": "ec:4+2"}, "profile ec:4+2 needs 6 devices, only 5 given"),
    (3, {"profile": "mirror:1"}, "mirror:N needs 2 <= N <= 16, got 'mirror:1'"),
    (3, {"profile": "mirror:17"}, "mirror:N needs 2 <= N <= 16"),
    (3, {"profile": "raid5"}, "unknown redundancy profile 'raid5'"),
    (3, {"profile": ""}, "unknown redundancy profile"),
    (3, {"profile": "ec:2+0"}, "ec:K+M needs"),
    (3, {"profile": "ec:1+1"}, "ec:K+M needs"),
    (3, {"extent_size": 3 << 20}, "extent size must be a power of two"),
    (3, {"extent_size": 4096}, "extent size must be a power of two"),
    (3, {"extent_size": 0}, "extent size must be a power of two"),
    (3, {"extent_size": -(1 << 20)}, "extent size must be a power of two"),
    (3, {"extent_size": 2 << 30}, "extent size must be a power of two"),
    (3, {"extent_size": 64 << 20}, "is too small"),
    (0, {}, "a pool needs at least one device"),
])
async def test_bad_pool_parameters_are_refused_and_write_nothing(
        disks: Disks, n: int, kwargs: dict[str, Any], match: str) -> None:
    """Invariant 9: impossible profiles and extent sizes are InvalidArgument, with the
    reason, before any device is written."""
    ds = disks(n, size=DEV)
    devs = ds.create()
    before = ds.digests()
    try:
        with pytest.raises(InvalidArgument) as err:
            await Pool.create("p", devs, **kwargs)
        assert match in err.value.message, err.value.message
    finally:
        for d in devs:
            d.close()
    assert ds.digests() == before


@pytest.mark.parametrize("name", ["", "bad name", "-dash", ".dot", "a" * 65, "x/y", "tank\n",
                                  "tänk", "a;b"])
async def test_bad_pool_names_are_refused(disks: Disks, name: str) -> None:
    """Invariant 9: pool names outside [A-Za-z0-9][A-Za-z0-9_.-]{0,63} are refused."""
    ds = disks(1, size=DEV)
    devs = ds.create()
    before = ds.digests()
    try:
        with pytest.raises(InvalidArgument, match="invalid pool name"):
            await Pool.create(name, devs, extent_size=EXT)
    finally:
        for d in devs:
            d.close()
    assert ds.digests() == before


# ---- volumes and I/O: refusals ----------------------------------------------------------

async def test_bad_volume_parameters_are_refused_and_change_nothing(disks: Disks) -> None:
    """Invariant 9: bad volume names, sizes (0, not a multiple of 512, negative), block
    sizes and profiles are InvalidArgument with the reason; no volume appears, not even
    after a re-import."""
    ds = disks(3, size=DEV)
    pool = await Pool.create("p", ds.create(), profile="ec:2+1", extent_size=EXT)
    try:
        vm = VolumeManager(pool)
        await vm.create("ok", 1 << 20)
        cases: list[tuple[str, int, dict[str, Any], str]] = [
            ("", 1 << 20, {}, "invalid volume name"),
            ("a/b", 1 << 20, {}, "invalid volume name"),
            ("-x", 1 << 20, {}, "invalid volume name"),
            ("a" * 129, 1 << 20, {}, "invalid volume name"),
            ("v", 0, {}, "volume size must be a positive multiple of 512 bytes, got 0"),
            ("v", 1000, {}, "volume size must be a positive multiple of 512 bytes, got 1000"),
            ("v", -512, {}, "positive multiple of 512"),
            ("v", 1 << 20, {"block_size": 3000}, "block size must be a power of two"),
            ("v", 1 << 20, {"block_size": 2048}, "block size must be a power of two"),
            ("v", 1 << 20, {"block_size": 2 << 20}, "block size must be a power of two"),
            ("v", 1 << 20, {"profile": "ec:4+2"}, "profile ec:4+2 needs 6 devices"),
            ("v", 1 << 20, {"profile": "raid5"}, "unknown redundancy profile"),
        ]
        for name, size, kw, match in cases:
            with pytest.raises(InvalidArgument) as err:
                await vm.create(name, size, **kw)
            assert match in err.value.message, (name, size, kw, err.value.message)
            assert vm.names() == ["ok"]
        with pytest.raises(AlreadyExists, match="volume 'ok' already exists"):
            await vm.create("ok", 2 << 20)
        assert vm.get("ok").size == 1 << 20
    finally:
        await pool.close()
    pool = await Pool.open(ds.open())
    try:
        assert VolumeManager(pool).names() == ["ok"]
        assert VolumeManager(pool).get("ok").size == 1 << 20
    finally:
        await pool.close()


async def test_out_of_range_io_is_refused_and_changes_nothing(disks: Disks) -> None:
    """Invariant 9: reads, writes, trims, zero writes and allocation queries beyond the end
    of a volume, at a negative offset or with a negative length are InvalidArgument naming
    the range; the volume's content and counters are unchanged."""
    ds = disks(3, size=DEV)
    pool = await Pool.create("p", ds.create(), profile="ec:2+1", extent_size=EXT)
    size = (1 << 20) + 512
    try:
        vol = await VolumeManager(pool).create("v", size, block_size=4096)
        data = random.Random(3).randbytes(size)
        await vol.write(0, data)
        assert await vol.read(size, 0) == b""       # empty I/O at the very end is fine
        await vol.write(size, b"")
        await vol.flush()
        stats = vol.statistics()
        bad = [(-1, 10), (size - 5, 10), (0, size + 1), (size, 1), (1 << 62, 1), (0, -1),
               (100, -50)]
        for off, n in bad:
            expect = f"range {off}+{n} is outside volume v of {size} bytes"
            for op in ("read", "write", "trim", "write_zeroes", "allocation"):
                if op == "write" and n < 0:
                    continue        # a write's length is its data's: never negative
                with pytest.raises(InvalidArgument) as err:
                    if op == "read":
                        await vol.read(off, n)
                    elif op == "write":
                        await vol.write(off, b"\xff" * n)
                    elif op == "trim":
                        await vol.trim(off, n)
                    elif op == "write_zeroes":
                        await vol.write_zeroes(off, n)
                    else:
                        await vol.allocation(off, n)
                assert err.value.message == expect, (op, err.value.message)
        await vol.flush()
        after = vol.statistics()
        assert (after.writes, after.bytes_written, after.trims, after.mapped_bytes,
                after.stored_bytes) == (stats.writes, stats.bytes_written, stats.trims,
                                        stats.mapped_bytes, stats.stored_bytes)
        assert await vol.read(0, size) == data
    finally:
        await pool.close()


# ---- growing ----------------------------------------------------------------------------

async def test_add_device_grows_the_pool(disks: Disks) -> None:
    """A pool grows by a device: capacity goes up by its extents, new writes use it, and
    after a re-import with all devices (any order) everything reads back exactly. Adding a
    member twice, a device of another pool or a too-small device is refused (invariant 9)
    without changing the device."""
    ds, data = await _tank(disks)
    extra = disks(1, size=DEV, prefix="extra")
    other, _ = await _tank(disks, "other", n=1, profile="plain", seed=4)
    tiny = disks(1, size=2 << 20, prefix="tiny")
    pool = await Pool.open(ds.open())
    try:
        st = pool.statistics()
        cap, free = st.capacity_bytes, st.free_bytes
        new_dev = extra.create()[0]
        await pool.add_device(new_dev)
        st = pool.statistics()
        assert len(st.members) == 4 and st.members[3].path == str(extra.paths[0])
        n_ext = st.members[3].extents
        assert n_ext == pool.layout.n_extents(DEV) > 0
        assert st.capacity_bytes == cap + n_ext * EXT
        assert st.free_bytes == free + n_ext * EXT
        vol = VolumeManager(pool).get("v")
        more = random.Random(5).randbytes(VOL // 2)
        await vol.write(VOL // 4, more)
        await vol.flush()
        assert pool.statistics().members[3].free_extents < n_ext   # the new device is used
        data = data[:VOL // 4] + more + data[3 * VOL // 4:]

        before = other.digests()
        with pytest.raises(InvalidArgument, match="already member 0 of pool 'other'"):
            await pool.add_device(other.open()[0])
        assert other.digests() == before
        with pytest.raises(InvalidArgument, match="already a member of pool tank"):
            await pool.add_device(FileDevice(str(ds.paths[1])))
        with pytest.raises(InvalidArgument, match="too small for this pool's layout"):
            await pool.add_device(tiny.create()[0])
        assert len(pool.statistics().members) == 4
    finally:
        await pool.close()
    pool = await Pool.open([*extra.open(), *ds.open(order=[2, 0, 1])])
    try:
        assert pool.statistics().state == "online"
        assert await VolumeManager(pool).get("v").read(0, VOL) == data
    finally:
        await pool.close()


async def test_a_full_pool_grown_by_one_device_never_acknowledges_what_it_cannot_store(
        disks: Disks) -> None:
    """Invariants 1 and 8 after add_device: an ec:2+1 pool is filled until writes are
    refused (ENOSPC), then grows by one (big) device. Its capacity goes up, but a record
    still needs free extents on 3 distinct devices. Each later write must either be stored
    (its flush succeeds) or be refused when it is made -- never acknowledged and then lost
    in a failing flush or close. Everything flushed reads back after a re-import."""
    ds = disks(3, size=16 << 20)
    extra = disks(1, size=64 << 20, prefix="extra")
    pool = await Pool.create("full", ds.create(), profile="ec:2+1", extent_size=EXT)
    model: dict[int, bytes] = {}
    rng = random.Random(6)
    try:
        vol = await VolumeManager(pool).create("v", 128 << 20, compression=False)

        async def fill(limit: int) -> int:
            """Write 1 MiB pieces (each flushed) until one is refused; returns how many
            were stored. A refusal must come from the write, not from its flush."""
            for _ in range(limit):
                i = len(model)
                piece = rng.randbytes(MiB)
                try:
                    await vol.write(i * MiB, piece)
                except NoSpace:
                    assert vol.statistics().dirty_bytes == 0
                    return i
                await vol.flush()       # acknowledged: this must not fail for lack of room
                model[i] = piece
            raise AssertionError(f"{limit} MiB written and still not full")

        first = await fill(40)
        assert first >= 10
        cap = pool.statistics().capacity_bytes
        await pool.add_device(extra.create()[0])
        assert pool.statistics().capacity_bytes == cap + pool.layout.n_extents(64 << 20) * EXT
        await fill(80)
    finally:
        await pool.close()              # must succeed: nothing acknowledged is pending
    pool = await Pool.open([*ds.open(order=[1, 2, 0]), *extra.open()])
    try:
        vol = VolumeManager(pool).get("v")
        for i, piece in model.items():
            assert await vol.read(i * MiB, MiB) == piece, i
    finally:
        await pool.close()
