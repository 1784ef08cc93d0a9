"""Redundancy, checksums and self-healing on real (sparse) device files.

Invariant 4 (checksummed everything): a bad fragment is found by its checksum, rebuilt from
the others, rewritten and counted; more bad fragments than the profile's parity is an EIO
(MediumError) for that block only, never wrong bytes.
Invariant 5 (redundancy): ec:K+M survives the loss of any M devices, mirror:N any N-1;
reads go on degraded; metadata is on every member.
Invariant 9 (bad input): a member that missed writes (stale) is refused with a clear
message and nothing is changed.
Compression (DESIGN §2, "Record"): lz4 when it pays, raw otherwise.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from pool import FileDevice, Pool, codec
from pool.checker import check
from pool.codec import HEADER_SIZE, chunk_length
from pool.errors import ImportFailed, MediumError, StorageError
from pool.faults import FaultyDevice
from pool.layout import SECTOR
from pool.state import ENTRY
from tests.conftest import DiskSet
from volumes import VolumeManager

EXT = 1 << 20
VOL = 4 << 20
BS = 64 << 10
BLOCKS = VOL // BS

Disks = Callable[..., DiskSet]


async def _filled(ds: DiskSet, profile: str, *, vol_size: int = VOL, block_size: int = BS,
                  seed: int = 1) -> bytes:
    """A pool on ``ds`` with volume 'v' full of random data (flushed); the pool is closed."""
    pool = await Pool.create("red", ds.create(), profile=profile, extent_size=EXT)
    vol = await VolumeManager(pool).create("v", vol_size, block_size=block_size)
    data = random.Random(seed).randbytes(vol_size)
    # Written in uneven pieces, so partial-block writes are part of what is read back.
    pos = 0
    for n in itertools.cycle((BS + 512, 3 * BS - 4096, 7 * 4096)):
        if pos >= vol_size:
            break
        await vol.write(pos, data[pos:pos + n])
        pos += n
    await vol.flush()
    await pool.close()
    return data


async def _read_volume(pool: Pool, size: int = VOL) -> bytes:
    return await VolumeManager(pool).get("v").read(0, size)


def _map_id(pool: Pool, name: str = "v") -> int:
    for meta in pool.objects().values():
        if meta.get("type") == "volume" and meta["name"] == name:
            return int(meta["map"])
    raise AssertionError(f"no volume {name}")


@dataclass(frozen=True)
class Frag:
    """Where fragment ``column`` of one block's record lies, and its checksummed length."""

    block: int
    column: int
    member: int
    offset: int
    length: int     # header + chunk: every byte of it is covered by the fragment checksum


def _fragments(pool: Pool, blocks: range) -> dict[tuple[int, int], Frag]:
    """(block, column) -> Frag for every mapped block in ``blocks``."""
    map_id = _map_id(pool)
    out = {}
    for b in blocks:
        raw = pool.state.forest.get(map_id, b)
        assert raw is not None, f"block {b} is not mapped"
        seg_id, off, plen, _flags, _rhash = ENTRY.unpack(raw)
        seg = pool.state.segments[seg_id]
        for col, (member, ext) in enumerate(seg.extents):
            out[(b, col)] = Frag(b, col, member, pool.layout.extent_offset(ext) + off * SECTOR,
                                 HEADER_SIZE + chunk_length(plen, seg.k))
    return out


async def _locate(ds: DiskSet, blocks: range = range(BLOCKS)) -> dict[tuple[int, int], Frag]:
    pool = await Pool.open(ds.open())
    try:
        return _fragments(pool, blocks)
    finally:
        await pool.close()


def _read_at(ds: DiskSet, f: Frag) -> bytes:
    with open(ds.paths[f.member], "rb") as fh:
        fh.seek(f.offset)
        return fh.read(f.length)


def _corrupt(ds: DiskSet, f: Frag, rng: random.Random) -> None:
    """Flip 3 bytes inside the checksummed part of a fragment (header or chunk)."""
    with open(ds.paths[f.member], "r+b") as fh:
        for pos in (rng.randrange(0, HEADER_SIZE), rng.randrange(HEADER_SIZE, f.length),
                    rng.randrange(0, f.length)):
            fh.seek(f.offset + pos)
            old = fh.read(1)[0]
            fh.seek(f.offset + pos)
            fh.write(bytes([old ^ 0xA5]))


# ---- ec:4+2: any two devices lost -------------------------------------------------------

async def test_ec42_reads_back_exactly_without_any_two_devices(disks: Disks) -> None:
    """Invariant 5: ec:4+2 on 6 devices survives the loss of any 2 (all 15 pairs): the pool
    imports from the 4 files left (metadata is mirrored on every member), reports itself
    degraded with exactly those members missing, and reads every byte back exactly."""
    ds = disks(6)
    data = await _filled(ds, "ec:4+2")
    pristine = ds.save()
    rng = random.Random(5)
    for pair in itertools.combinations(range(6), 2):
        ds.restore(pristine)   # an import checkpoints: start every case from the original
        for i in pair:
            os.remove(ds.paths[i])
        order = [i for i in range(6) if i not in pair]
        rng.shuffle(order)
        pool = await Pool.open(ds.open(order=order))
        try:
            assert await _read_volume(pool) == data, f"wrong bytes without members {pair}"
            st = pool.statistics()
            assert st.state == "degraded", pair
            assert [m.index for m in st.members if m.state == "missing"] == list(pair)
            assert st.unreadable_records == 0
            # Every segment spans all 6 members, column i on member i: records need parity
            # exactly when a data column (members 0-3) is gone.
            data_gone = bool(set(pair) & {0, 1, 2, 3})
            assert st.degraded_reads == (BLOCKS if data_gone else 0), pair
            assert any(f"members missing: {pair[0]}, {pair[1]}" in w for w in pool.health())
        finally:
            await pool.close()


async def test_ec42_without_three_devices_imports_but_reads_fail_naming_them(
        disks: Disks) -> None:
    """Invariants 4 and 5: with 3 of 6 members gone (more than m = 2) the metadata is still
    there (mirrored on every member) so the pool imports and lists its volumes, but every
    read of data fails with MediumError naming the missing members -- never wrong bytes."""
    ds = disks(6)
    await _filled(ds, "ec:4+2")
    pristine = ds.save()
    for gone in [(0, 1, 2), (3, 4, 5), (0, 2, 5)]:
        ds.restore(pristine)
        pool = await Pool.open(ds.open(without=gone))
        try:
            assert VolumeManager(pool).names() == ["v"]
            st = pool.statistics()
            assert st.state == "degraded"
            assert [m.index for m in st.members if m.state == "missing"] == list(gone)
            vol = VolumeManager(pool).get("v")
            for off, n in [(0, VOL), (BS * 7, BS), (BS * 9 + 100, 5000)]:
                with pytest.raises(MediumError) as err:
                    await vol.read(off, n)
                msg = err.value.message
                for i in gone:
                    assert f"member {i} (missing)" in msg, msg
                assert "only 3 of the 4 fragments" in msg, msg
            assert pool.statistics().unreadable_records >= 3
            assert any("parity covers" in w for w in pool.health())
        finally:
            await pool.close()


async def test_members_absent_from_an_import_that_could_not_serve_the_data_come_back(
        disks: Disks) -> None:
    """Invariants 1 and 5: three of six disks of an ec:4+2 pool are unplugged while it is
    imported (the data is unreadable then, as the import says: "until members ... return").
    Plugged back in, the pool must import with all six and every byte read back exactly: a
    transient absence beyond the parity must not turn acknowledged data into lost data."""
    ds = disks(6)
    data = await _filled(ds, "ec:4+2")
    pool = await Pool.open(ds.open(without=(0, 1, 2)))
    try:
        with pytest.raises(MediumError):
            await _read_volume(pool)
    finally:
        await pool.close()
    pool = await Pool.open(ds.open())      # the three disks are back, untouched
    try:
        assert await _read_volume(pool) == data
        assert pool.statistics().state == "online"
    finally:
        await pool.close()


async def test_a_member_that_was_away_returns_but_an_old_copy_is_refused(
        disks: Disks) -> None:
    """Invariants 5 and 9: a member absent while the pool ran comes back as it left
    (records are never overwritten in place and segments made meanwhile do not use it), so
    it is taken back and the pool is whole again. An *older copy* of a member may lack
    acknowledged data: it is refused as stale with a message that says what to do, and the
    refusal changes no byte on any device."""
    ds = disks(6)
    data = await _filled(ds, "ec:4+2")
    old_copy = ds.save()                              # member images as of now
    pool = await Pool.open(ds.open(without=(2,)))   # the pool runs without member 2
    try:
        assert await _read_volume(pool) == data
    finally:
        await pool.close()
    pool = await Pool.open(ds.open(order=[5, 2, 4, 0, 3, 1]))  # member 2 is back
    try:
        assert pool.statistics().state == "online"
        assert await _read_volume(pool) == data
    finally:
        await pool.close()
    for _ in range(2):                                # the pool moves on with everyone
        pool = await Pool.open(ds.open())
        await pool.close()
    current = ds.save()
    ds.restore([current[i] if i != 2 else old_copy[2] for i in range(6)])
    before = ds.digests()
    with pytest.raises(ImportFailed) as err:
        await Pool.open(ds.open())
    msg = err.value.message
    assert f"{ds.paths[2]} is a stale member 2 of pool red" in msg, msg
    assert "older copy" in msg and "Import without it" in msg, msg
    assert ds.digests() == before, "a refused import changed a device"
    pool = await Pool.open(ds.open(without=(2,)))
    try:
        assert await _read_volume(pool) == data
    finally:
        await pool.close()


async def test_a_write_to_a_degraded_pool_is_stored_or_refused_up_front(disks: Disks) -> None:
    """Invariants 1, 5 and 8: with member 2 gone, an ec:4+2 pool on 6 devices either stores
    new writes (degraded) or refuses them when they are made, with a clear error. What it
    must not do is acknowledge a write (reserving room for it) that it can never store:
    the flush and the close must then succeed, and the data read back after a re-import."""
    ds = disks(6)
    data = await _filled(ds, "ec:4+2")
    newer = random.Random(9).randbytes(2 * BS)
    pool = await Pool.open(ds.open(without=(2,)))
    try:
        vol = VolumeManager(pool).get("v")
        try:
            await vol.write(BS, newer)
        except StorageError as e:          # refused up front: clear, and nothing changed
            assert "ec:4+2" in e.message, e.message
            assert vol.statistics().dirty_bytes == 0
        else:
            await vol.flush()
            data = data[:BS] + newer + data[3 * BS:]
        assert await vol.read(0, VOL) == data
    finally:
        await pool.close()
    pool = await Pool.open(ds.open(without=(2,)))
    try:
        assert await _read_volume(pool) == data
    finally:
        await pool.close()


# ---- bit rot on disk --------------------------------------------------------------------

def _rot_plan(block: int) -> tuple[int, ...]:
    """Which columns of a block's record to corrupt: at most m = 2, always a data column
    (a read checks data fragments; parity is read, and so checked, only when needed: the
    parity column corrupted is 4, the first one a degraded read uses)."""
    return [(), (block % 4,), (block % 4, (block + 1) % 4), (block % 4, 4)][block % 4]


async def _read_into(pool: Pool, size: int = VOL) -> bytes:
    buf = bytearray(size)
    await VolumeManager(pool).get("v").readinto(0, buf)
    return bytes(buf)


@pytest.mark.parametrize("reader", [_read_volume, _read_into], ids=["read", "readinto"])
async def test_bit_rot_is_detected_rebuilt_rewritten_and_counted(
        disks: Disks, reader: Callable[[Pool], Awaitable[bytes]]) -> None:
    """Invariant 4: bytes flipped on disk inside up to m fragments of a record are caught by
    the fragment checksums; the read returns the exact data, rebuilt from the others, and
    every bad fragment is rewritten with its original bytes (self-healing) and counted, per
    member. A second read, in the same session and after a re-import, has nothing left to
    repair, and a deep check finds every fragment good. ``readinto`` (which reads
    page-cached blocks straight into the caller's buffer) does the same."""
    ds = disks(6)
    data = await _filled(ds, "ec:4+2")
    frags = await _locate(ds)
    rng = random.Random(3)
    bad = [frags[(b, c)] for b in range(BLOCKS) for c in _rot_plan(b)]
    originals = {(f.block, f.column): _read_at(ds, f) for f in bad}
    for f in bad:
        _corrupt(ds, f, rng)
        assert _read_at(ds, f) != originals[(f.block, f.column)]
    rotten_records = sum(1 for b in range(BLOCKS) if _rot_plan(b))

    pool = await Pool.open(ds.open())
    try:
        assert await reader(pool) == data
        st = pool.statistics()
        assert st.repaired_fragments == len(bad)
        assert st.degraded_reads == rotten_records
        assert st.unreadable_records == 0
        for m in st.members:
            assert m.checksum_errors == sum(1 for f in bad if f.member == m.index), m
        assert await reader(pool) == data
        again = pool.statistics()
        assert (again.repaired_fragments, again.degraded_reads) == (len(bad), rotten_records)
    finally:
        await pool.close()

    for f in bad:   # rewritten in place, byte for byte, and durable across close
        assert _read_at(ds, f) == originals[(f.block, f.column)], f
    pool = await Pool.open(ds.open())
    try:
        assert await _read_volume(pool) == data
        st = pool.statistics()
        assert (st.repaired_fragments, st.degraded_reads) == (0, 0)
        assert all(m.checksum_errors == 0 for m in st.members)
        report = await check(pool, deep=True)
        assert report.ok and report.fragments_bad == 0, report.render()
    finally:
        await pool.close()


async def test_more_than_m_bad_fragments_is_eio_for_that_block_only(disks: Disks) -> None:
    """Invariant 4: three bad fragments (> m = 2) in one record: reading that block raises
    MediumError naming the devices whose fragments failed -- never wrong bytes; every other
    block reads back exactly; nothing is "repaired" from too little; writing the block anew
    makes it readable again."""
    ds = disks(6)
    data = await _filled(ds, "ec:4+2")
    frags = await _locate(ds)
    victim = 21
    bad = [frags[(victim, c)] for c in (0, 3, 4)]
    rng = random.Random(4)
    for f in bad:
        _corrupt(ds, f, rng)
    corrupted = {(f.block, f.column): _read_at(ds, f) for f in bad}

    pool = await Pool.open(ds.open())
    try:
        vol = VolumeManager(pool).get("v")
        for off, n in [(victim * BS, BS), (victim * BS + 4000, 10), (0, VOL)]:
            with pytest.raises(MediumError) as err:
                await vol.read(off, n)
            msg = err.value.message
            assert f"block {victim}:" in msg and "only 3 of the 4 fragments" in msg, msg
            for f in bad:
                assert str(ds.paths[f.member]) in msg, msg
        for b in range(BLOCKS):
            if b != victim:
                assert await vol.read(b * BS, BS) == data[b * BS:(b + 1) * BS], b
        st = pool.statistics()
        assert st.unreadable_records == 3
        assert st.repaired_fragments == 0
        for f in bad:
            assert _read_at(ds, f) == corrupted[(f.block, f.column)], "rewrote a fragment"
        fresh = random.Random(8).randbytes(BS)
        await vol.write(victim * BS, fresh)
        await vol.flush()
        assert await vol.read(0, VOL) == data[:victim * BS] + fresh + data[(victim + 1) * BS:]
    finally:
        await pool.close()


async def test_bit_rot_plus_a_missing_device_within_parity(disks: Disks) -> None:
    """Invariants 4 and 5 together: member 5 is gone and one fragment of every record is
    rotten (2 = m bad per record): still exact, and the rotten fragments are rewritten on
    the devices that are there. One more rotten fragment in a record is an EIO."""
    ds = disks(6)
    data = await _filled(ds, "ec:4+2")
    frags = await _locate(ds)
    rng = random.Random(6)
    for b in range(BLOCKS):
        _corrupt(ds, frags[(b, b % 4)], rng)
    _corrupt(ds, frags[(11, 4)], rng)       # block 11: data 3 and parity 4 bad, 5 missing
    os.remove(ds.paths[5])
    pool = await Pool.open(ds.open(without=(5,)))
    try:
        vol = VolumeManager(pool).get("v")
        with pytest.raises(MediumError, match="block 11:"):
            await vol.read(11 * BS, BS)
        assert await vol.read(0, 11 * BS) == data[:11 * BS]
        assert await vol.read(12 * BS, VOL - 12 * BS) == data[12 * BS:]
        st = pool.statistics()
        assert st.repaired_fragments == BLOCKS - 1
        assert st.degraded_reads == BLOCKS - 1
    finally:
        await pool.close()


# ---- bit flips at read time -------------------------------------------------------------

@pytest.mark.parametrize(("profile", "n"), [("ec:4+2", 6), ("mirror:2", 2)])
async def test_read_time_bit_flips_never_reach_the_caller(disks: Disks, profile: str,
                                                          n: int) -> None:
    """Invariant 4: member 0 (a data column / the first mirror) returns flipped bits on
    half of its reads. Every read is still exact; the flips are caught, served from
    redundancy, counted against member 0 only, and the fragments rewritten."""
    ds = disks(n)
    data = await _filled(ds, profile, block_size=16384)
    faulty = FaultyDevice(FileDevice(str(ds.paths[0])), seed=11)
    pool = await Pool.open([faulty, *ds.open(without=(0,))])
    faulty.bitflip_rate = 0.5     # after the import: only data reads see flips
    try:
        vol = VolumeManager(pool).get("v")
        for b in range(VOL // 16384):     # one device read per block: many flips
            assert await vol.read(b * 16384, 16384) == data[b * 16384:(b + 1) * 16384], b
        assert await vol.read(0, VOL) == data
        assert faulty.injected_flips > 10
        st = pool.statistics()
        # A flip that lands in a fragment's sector padding is harmless and not seen.
        assert 0 < st.degraded_reads <= faulty.injected_flips
        assert st.repaired_fragments == st.degraded_reads
        assert st.members[0].checksum_errors == st.degraded_reads
        assert all(m.checksum_errors == 0 for m in st.members[1:])
        assert st.unreadable_records == 0
    finally:
        faulty.bitflip_rate = 0.0
        await pool.close()


async def test_read_errors_and_a_vanished_member_are_served_from_redundancy(
        disks: Disks) -> None:
    """Invariant 5 and DESIGN §5: a member whose reads fail (bad sectors), then one that
    is pulled out while the pool is open: reads go on degraded and exact; the errors are
    counted against the right member."""
    ds = disks(6)
    data = await _filled(ds, "ec:4+2")
    flaky = FaultyDevice(FileDevice(str(ds.paths[1])), seed=2)
    pulled = FaultyDevice(FileDevice(str(ds.paths[3])), seed=3)
    devs = ds.open()
    pool = await Pool.open([devs[0], flaky, devs[2], pulled, devs[4], devs[5]])
    try:
        vol = VolumeManager(pool).get("v")
        flaky.read_error_rate = 1.0
        assert await vol.read(0, VOL) == data
        st = pool.statistics()
        assert flaky.injected_errors > 0
        assert st.members[1].read_errors == flaky.injected_errors
        assert st.degraded_reads == BLOCKS
        pulled.gone = True
        for b in range(0, BLOCKS, 5):
            assert await vol.read(b * BS, BS) == data[b * BS:(b + 1) * BS]
        assert pool.statistics().members[3].read_errors > 0
        assert pool.statistics().unreadable_records == 0
    finally:
        flaky.read_error_rate = 0.0
        pulled.gone = False
        await pool.close()


# ---- mirrors and plain ------------------------------------------------------------------

@pytest.mark.parametrize(("profile", "n", "losses"), [
    ("mirror:2", 2, [(0,), (1,)]),
    ("mirror:3", 3, [(0, 1), (0, 2), (1, 2), (2,)]),
])
async def test_mirror_survives_losing_all_but_one_copy(disks: Disks, profile: str, n: int,
                                                       losses: list[tuple[int, ...]]) -> None:
    """Invariant 5: mirror:N keeps every block readable, exactly, with any N-1 of its
    devices gone (4 KiB blocks: many small records)."""
    ds = disks(n)
    data = await _filled(ds, profile, block_size=4096, vol_size=2 << 20)
    pristine = ds.save()
    for gone in losses:
        ds.restore(pristine)
        pool = await Pool.open(ds.open(without=gone))
        try:
            assert await _read_volume(pool, 2 << 20) == data, f"{profile} without {gone}"
            st = pool.statistics()
            assert st.state == "degraded"
            assert st.degraded_reads == (512 if 0 in gone else 0)
        finally:
            await pool.close()


async def test_plain_round_trip_across_close_and_reopen(disks: Disks) -> None:
    """Invariant 1 (and 6): a plain pool holds uneven writes, overwrites, trims and zero
    writes, on a volume whose size is not a multiple of its block size, byte-exact across
    close and re-import; unwritten ranges read as zeros."""
    ds = disks(1)
    size = 3 * BS + 4096 + 512
    pool = await Pool.create("plain", ds.create(), profile="plain", extent_size=EXT)
    model = bytearray(size)
    rng = random.Random(12)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", size, block_size=BS, compression=False)
        small = await vm.create("w", 1 << 20, block_size=4096)
        for _ in range(60):
            off = rng.randrange(size)
            n = rng.randrange(1, min(size - off, 3 * BS) + 1)
            kind = rng.random()
            if kind < 0.7:
                chunk = rng.randbytes(n)
                await vol.write(off, chunk)
                model[off:off + n] = chunk
            elif kind < 0.85:
                await vol.trim(off, n)
                model[off:off + n] = bytes(n)
            else:
                await vol.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
        await vol.write(size - 700, b"\xee" * 700)     # the partial last block
        model[size - 700:] = b"\xee" * 700
        text = b"plain text, 4K blocks " * 1000
        await small.write(12345, text)
        assert await vol.read(0, size) == bytes(model)
        await vm.flush_all()
    finally:
        await pool.close()
    pool = await Pool.open(ds.open())
    try:
        vm = VolumeManager(pool)
        assert vm.names() == ["v", "w"]
        assert await vm.get("v").read(0, size) == bytes(model)
        w = await vm.get("w").read(0, 1 << 20)
        assert w == bytes(12345) + text + bytes((1 << 20) - 12345 - len(text))
        assert pool.statistics().state == "online"
    finally:
        await pool.close()


# ---- compression ------------------------------------------------------------------------

async def test_compression_stores_compressible_data_small_and_random_data_raw(
        disks: Disks) -> None:
    """DESIGN §2 (lz4 records) with invariant 6's exact accounting: compressible data is
    stored in a fraction of its size, incompressible data costs the same with compression
    on as off (stored raw); all of it reads back exactly after a re-import."""
    ds = disks(6)
    pool = await Pool.create("zip", ds.create(), profile="ec:4+2", extent_size=EXT)
    size = 2 << 20
    rng = random.Random(13)
    text = b"".join(b"line %06d: the quick brown fox jumps over the lazy dog\n" % i
                    for i in range(size // 50))[:size]
    noise = rng.randbytes(size)
    vols = {"text": (True, text), "noise": (True, noise), "noise-raw": (False, noise),
            "text-raw": (False, text)}
    try:
        vm = VolumeManager(pool)
        for name, (comp, content) in vols.items():
            vol = await vm.create(name, size, compression=comp)
            await vol.write(0, content)
        await vm.flush_all()
    finally:
        await pool.close()
    pool = await Pool.open(ds.open(order=[3, 1, 5, 0, 2, 4]))
    try:
        vm = VolumeManager(pool)
        stored = {}
        for name, (_comp, content) in vols.items():
            vol = vm.get(name)
            assert await vol.read(0, size) == content, name
            stored[name] = vol.statistics().stored_bytes
        assert 0 < stored["text"] < stored["noise"] / 4, stored
        assert abs(stored["noise"] - stored["noise-raw"]) <= stored["noise-raw"] * 0.02, stored
        assert stored["text-raw"] == stored["noise-raw"], stored
        # Raw ec:4+2 costs 6/4 of the data plus fragment headers and sector padding.
        assert size * 1.5 <= stored["noise-raw"] <= size * 1.5 * 1.05, stored
    finally:
        await pool.close()


async def test_write_errors_fault_the_member_and_the_flush_goes_on_degraded(
        disks: Disks) -> None:
    """A device that fails writes (issue 9): its write errors are counted, it is faulted
    (its metadata copy fell behind), and the flush succeeds degraded on the others, which
    still hold k fragments of every record. A second failing member (beyond m = 1) fails
    the flush plainly with EIO, never an exception group; the writes stay buffered."""
    devs = disks(3).create()
    faulty = FaultyDevice(devs[0], seed=1)
    faulty2 = FaultyDevice(devs[1], seed=2)
    pool = await Pool.create("w", [faulty, faulty2, devs[2]], profile="ec:2+1",
                             extent_size=EXT)
    vol = await VolumeManager(pool).create("v", VOL)
    data = os.urandom(1 << 20)
    await vol.write(0, data)
    faulty.write_error_rate = 1.0
    await vol.flush()
    st = pool.statistics()
    assert st.members[0].write_errors >= 1 and st.members[0].state == "faulted"
    assert st.state == "degraded"
    assert await vol.read(0, 1 << 20) == data
    await vol.write(1 << 20, data)
    faulty2.write_error_rate = 1.0
    with pytest.raises(StorageError) as err:
        await vol.flush()
    assert err.value.errno == errno.EIO
    assert await vol.read(1 << 20, 1 << 20) == data      # still buffered, still readable
    faulty2.write_error_rate = 0.0
    await pool.close()


@pytest.mark.parametrize(("k", "m"), [(1, 0), (1, 2), (2, 1), (4, 2), (3, 2), (8, 2)])
def test_one_fragment_is_the_same_fragment_a_full_stripe_holds(k: int, m: int) -> None:
    """A rebuild writes only the lost fragment (codec.one_fragment): it must be exactly the
    bytes the full stripe had there, for every index and for odd payload lengths."""

    rng = random.Random(k * 10 + m)
    for plen in (1, 5, 20, 4095, 4096, 65536, 65536 - 13, 40000):
        payload = rng.randbytes(plen)
        full = codec.stripe(payload, 0, k, m)
        for i in range(k + m):
            assert codec.one_fragment(payload, 0, k, m, i, full.rhash) == full.fragments[i], \
                (plen, i)
