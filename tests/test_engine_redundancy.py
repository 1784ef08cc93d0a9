"""Redundancy and self-healing (invariants 4 and 5).

- ec:4+2 on 6 file devices: with any two device files removed (all 15 pairs) the pool imports
  degraded and every byte reads back exactly; with three removed, reads fail with a clear
  error naming the missing members -- never wrong bytes.
- Bit flips in fragments on disk are detected, rebuilt from the other fragments, rewritten
  in place and counted; a second read finds nothing left to repair. More than m bad
  fragments in one record is EIO for that block only.
- Flips injected at read time (FaultyDevice) never reach the caller.
- mirror:2 / mirror:3 / plain round trips; lz4 compression stores compressible data small
  and incompressible data raw.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
from pathlib import Path

import pytest

from pool import FileDevice, Pool
from pool.checker import check
from pool.errors import MediumError, StorageError
from pool.faults import FaultyDevice
from pool.layout import SECTOR
from pool.state import ENTRY
from volumes import VolumeManager

DEV = 48 << 20
VOL = 4 << 20


async def _make(tmp: Path, n: int, profile: str, *, compression: bool = False,
                block: int = 65536) -> tuple[list[Path], bytes]:
    paths = [tmp / f"d{i}" for i in range(n)]
    pool = await Pool.create("r", [FileDevice(str(p), create_size=DEV) for p in paths],
                             profile=profile, extent_size=1 << 20, meta_size=4 << 20)
    vol = await VolumeManager(pool).create("v", VOL, block_size=block,
                                           compression=compression)
    data = os.urandom(VOL)
    await vol.write(0, data)
    await pool.close()
    return paths, data


async def _read_all(paths: list[Path]) -> tuple[Pool, bytes]:
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    return pool, await VolumeManager(pool).get("v").read(0, VOL)


async def test_ec42_survives_any_two_missing_devices(tmp_path: Path) -> None:
    paths, data = await _make(tmp_path, 6, "ec:4+2")
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    for p in paths:
        shutil.copy(p, pristine / p.name)
    for gone in itertools.combinations(range(6), 2):
        for p in paths:  # every import rewrites metadata: start each case from the original
            shutil.copy(pristine / p.name, p)
        present = [p for i, p in enumerate(paths) if i not in gone]
        pool, got = await _read_all(present)
        try:
            assert got == data, f"wrong bytes with members {gone} missing"
            st = pool.statistics()
            assert st.state == "degraded"
            assert sorted(m.index for m in st.members if m.state == "missing") == list(gone)
            assert st.degraded_reads > 0 or set(gone) >= {4, 5} or not set(gone) & {0, 1, 2, 3}
        finally:
            await pool.close()


async def test_ec42_with_three_missing_fails_reads_clearly(tmp_path: Path) -> None:
    paths, _data = await _make(tmp_path, 6, "ec:4+2")
    pool = await Pool.open([FileDevice(str(p)) for p in paths[3:]])
    try:
        with pytest.raises(MediumError) as err:
            await VolumeManager(pool).get("v").read(0, VOL)
        msg = err.value.message
        assert "member 0 (missing)" in msg and "member 1 (missing)" in msg
        assert "only" in msg and "fragments" in msg
        assert pool.statistics().unreadable_records >= 1
        assert any("more fragments missing than their parity" in w for w in pool.health())
    finally:
        await pool.close()


async def test_a_device_missing_at_import_is_stale_when_it_returns(tmp_path: Path) -> None:
    paths, data = await _make(tmp_path, 6, "ec:4+2")
    pool, got = await _read_all(paths[1:])       # runs (and commits) without member 0
    assert got == data
    await pool.close()
    with pytest.raises(Exception, match="stale member 0") as err:
        await Pool.open([FileDevice(str(p)) for p in paths])
    assert "run without it" in str(err.value)
    pool, got = await _read_all(paths[1:])        # still fine without it
    assert got == data
    await pool.close()


def _fragment_offsets(pool: Pool, column: int) -> list[tuple[int, int, int]]:
    """(member index, byte offset, length) of column ``column``'s fragment of every record."""
    out = []
    for node in pool.state.forest.nodes.values():
        if not isinstance(node.data, bytearray):
            continue
        for o in range(0, len(node.data), ENTRY.size):
            raw = bytes(node.data[o:o + ENTRY.size])
            if raw == bytes(ENTRY.size):
                continue
            seg_id, off, plen, _f, _h = ENTRY.unpack(raw)
            seg = pool.state.segments[seg_id]
            idx, ext = seg.extents[column]
            units = -(-(32 + -(-plen // seg.k)) // SECTOR)
            out.append((idx, pool.layout.extent_offset(ext) + off * SECTOR, units * SECTOR))
    return out


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


async def test_bit_rot_is_detected_repaired_and_counted(tmp_path: Path) -> None:
    paths, data = await _make(tmp_path, 6, "ec:4+2")
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    col1 = _fragment_offsets(pool, 1)
    col4 = _fragment_offsets(pool, 4)
    await pool.close()
    # Two bad fragments per record at most (= m): a data column and a parity column.
    for (idx, off, n), (idx2, off2, n2) in zip(col1, col4, strict=True):
        _flip(paths[idx], off + 40 + (off % 997) % (n - 40))
        _flip(paths[idx2], off2 + 40 + (off2 % 991) % (n2 - 40))
    pool, got = await _read_all(paths)
    try:
        assert got == data
        st = pool.statistics()
        # Each record had one bad data and one bad parity fragment: the degraded read
        # went to parity, met the bad one too, and rewrote both.
        assert st.repaired_fragments == len(col1) + len(col4)
        assert st.degraded_reads == len(col1)
        assert st.unreadable_records == 0
        first = st.repaired_fragments
        assert await VolumeManager(pool).get("v").read(0, VOL) == data
        assert pool.statistics().repaired_fragments == first   # nothing left to repair
        report = await check(pool, deep=True)
        assert report.ok and report.fragments_bad == 0
        assert report.fragments_checked == 6 * len(col1)
    finally:
        await pool.close()


async def test_more_than_m_bad_fragments_is_eio_for_that_block_only(tmp_path: Path) -> None:
    paths, data = await _make(tmp_path, 6, "ec:4+2")
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    by_col = [_fragment_offsets(pool, c) for c in (0, 2, 5)]
    await pool.close()
    # Corrupt three fragments of one record (its first in map order).
    for col in by_col:
        idx, off, _n = col[0]
        _flip(paths[idx], off + 100)
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    try:
        vol = VolumeManager(pool).get("v")
        bad_blocks = []
        for b in range(VOL // 65536):
            try:
                assert await vol.read(b * 65536, 65536) == data[b * 65536:(b + 1) * 65536]
            except MediumError as e:
                assert "fragments it needs verified" in e.message
                bad_blocks.append(b)
        assert len(bad_blocks) == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("profile", ["ec:4+2", "mirror:2"])
async def test_read_time_bit_flips_never_reach_the_caller(tmp_path: Path, profile: str) -> None:
    n = 6 if profile.startswith("ec") else 2
    paths, data = await _make(tmp_path, n, profile)
    faulty = FaultyDevice(FileDevice(str(paths[0])), seed=7)
    pool = await Pool.open([faulty, *(FileDevice(str(p)) for p in paths[1:])])
    faulty.bitflip_rate = 0.5   # from now on half the reads of member 0 come back flipped
    try:
        vol = VolumeManager(pool).get("v")
        for _ in range(3):
            assert await vol.read(0, VOL) == data
        assert faulty.injected_flips > 0
        st = pool.statistics()
        assert st.degraded_reads >= faulty.injected_flips // 2
        assert st.unreadable_records == 0
        # Every flip is charged to the member it came from, and to no other.
        assert st.members[0].checksum_errors > 0
        assert all(m.checksum_errors == 0 for m in st.members[1:])
    finally:
        await pool.close()


@pytest.mark.parametrize(("profile", "n", "lose"), [
    ("mirror:2", 2, [(0,), (1,)]), ("mirror:3", 3, [(0, 1), (0, 2), (1, 2)]),
    ("plain", 1, [()]),
])
async def test_mirror_and_plain(tmp_path: Path, profile: str, n: int,
                                lose: list[tuple[int, ...]]) -> None:
    paths, data = await _make(tmp_path, n, profile, block=4096)
    pristine = [p.read_bytes() for p in paths]
    for gone in lose:
        for p, img in zip(paths, pristine, strict=True):
            p.write_bytes(img)
        pool, got = await _read_all([p for i, p in enumerate(paths) if i not in gone])
        try:
            assert got == data, f"{profile} without {gone}"
        finally:
            await pool.close()


async def test_compression_small_when_compressible_raw_when_not(tmp_path: Path) -> None:
    devs = [FileDevice(str(tmp_path / f"d{i}"), create_size=DEV) for i in range(3)]
    pool = await Pool.create("z", devs, profile="ec:2+1", extent_size=1 << 20,
                             meta_size=4 << 20)
    vm = VolumeManager(pool)
    text = (b"storaged keeps thin volumes on pooled disks. " * (VOL // 40))[:VOL]
    noise = os.urandom(VOL)
    vols = {"text": (True, text), "noise": (True, noise), "noise-raw": (False, noise)}
    for name, (comp, data) in vols.items():
        vol = await vm.create(name, VOL, compression=comp)
        await vol.write(0, data)
    await pool.close()
    pool = await Pool.open([FileDevice(str(tmp_path / f"d{i}")) for i in range(3)])
    try:
        vm = VolumeManager(pool)
        stored = {}
        for name, (_comp, data) in vols.items():
            vol = vm.get(name)
            assert await vol.read(0, VOL) == data
            stored[name] = vol.statistics().stored_bytes
        assert stored["text"] < stored["noise"] / 4
        assert stored["noise"] == stored["noise-raw"]   # incompressible is stored raw
    finally:
        await pool.close()


async def test_write_errors_fail_the_flush_plainly_and_are_counted(tmp_path: Path) -> None:
    """A device that fails writes: flush raises a storage error (EIO), never an exception
    group; the member's write errors are counted; the writes stay buffered (not lost)."""
    paths = [tmp_path / f"d{i}" for i in range(3)]
    faulty = FaultyDevice(FileDevice(str(paths[0]), create_size=DEV), seed=1)
    pool = await Pool.create("w", [faulty, *(FileDevice(str(p), create_size=DEV)
                                             for p in paths[1:])],
                             profile="ec:2+1", extent_size=1 << 20, meta_size=4 << 20)
    vol = await VolumeManager(pool).create("v", VOL)
    data = os.urandom(1 << 20)
    await vol.write(0, data)
    faulty.write_error_rate = 1.0
    with pytest.raises(StorageError) as err:
        await vol.flush()
    assert err.value.errno == errno.EIO
    assert pool.statistics().members[0].write_errors >= 1
    assert await vol.read(0, 1 << 20) == data      # still buffered, still readable
    faulty.write_error_rate = 0.0
    await pool.close()
