"""Large reads answered at once (``Volume.read_sparse_nowait`` of more than two blocks, the
NBD and iSCSI servers' inline path): whole blocks stored raw are read the
``read_runs_into`` way, into one buffer of the read's own, and handed out as read-only
views of it (pool.reader invariants 1 and 5; DESIGN invariant 4). Each answer is exactly
what ``read_sparse`` answers -- data runs and holes -- and a fragment that fails its
checksum makes the fast path decline, never serve it (issue 27)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pool import Pool
from pool.errors import MediumError
from pool.state import ENTRY
from tests.conftest import DiskSet
from tests.kit.poolkit import BS, filled_pool, fragments, rotten_pool
from volumes import VolumeManager

Runs = list[tuple[int, int, bytes | None]]


def _flat(pieces: object, *, readonly: bool = True) -> Runs:
    """(offset, length, joined data or None) of a read_sparse answer, and (``readonly``)
    each data piece checked read-only (invariant 5)."""
    out: Runs = []
    assert isinstance(pieces, list)
    for off, n, data in pieces:
        if data is None:
            out.append((off, n, None))
            continue
        for d in data:
            assert not readonly or isinstance(d, bytes) or memoryview(d).readonly
        out.append((off, n, b"".join(bytes(d) for d in data)))
    return out


@pytest.mark.parametrize("profile", ["plain", "ec:2+1"])
async def test_large_nowait_read_answers_runs_and_holes_as_read_does(
        disks: Callable[..., DiskSet], profile: str) -> None:
    ds = disks(3)
    pool = await Pool.create("p", ds.create(), profile=profile, extent_size=1 << 20)
    try:
        vol = await VolumeManager(pool).create("v", 24 * BS, block_size=BS)
        rng = random.Random(7)
        model = bytearray(24 * BS)
        # Blocks 0-5 in one flush, 8-13 in another (another run, maybe another
        # segment), 17 alone, the rest never written (holes).
        for lo, hi in ((0, 6), (8, 14)):
            chunk = rng.randbytes((hi - lo) * BS)
            await vol.write(lo * BS, chunk)
            model[lo * BS:hi * BS] = chunk
            await vol.flush()
        chunk = rng.randbytes(BS)
        await vol.write(17 * BS, chunk)
        model[17 * BS:18 * BS] = chunk
        await vol.flush()
        want = _flat(await vol.read_sparse(0, 24 * BS), readonly=False)
        read0 = pool.counters["records_read"]
        got = vol.read_sparse_nowait(0, 24 * BS)
        assert got is not None
        flat = _flat(got)
        assert flat == want
        assert [(o, n) for o, n, d in flat if d is None] == [
            (6 * BS, 2 * BS), (14 * BS, 3 * BS), (18 * BS, 6 * BS)]
        assert b"".join(d if d is not None else bytes(n) for _o, n, d in flat) == model
        # A later write does not show through what was handed out (invariant 5).
        await vol.write(0, b"y" * (2 * BS))
        assert _flat(got) == flat
        assert pool.counters["records_read"] == read0 + 13     # 6 + 6 + 1 records
        # An unaligned large read: partial blocks at both ends, byte-exact.
        got = vol.read_sparse_nowait(BS + 100, 10 * BS)
        assert got is not None
        model[0:2 * BS] = b"y" * (2 * BS)
        assert b"".join(d if d is not None else bytes(n)
                        for _o, n, d in _flat(got)) == model[BS + 100:11 * BS + 100]
        # A block stored lz4-compressed in the range: the general nowait path answers
        # (still at once, still exact).
        await vol.write(20 * BS, b"x" * BS)
        await vol.flush()
        model[20 * BS:21 * BS] = b"x" * BS
        assert any(ENTRY.unpack(raw)[3] for _b, raw in pool.state.forest.items(vol._map))
        got = vol.read_sparse_nowait(0, 24 * BS)
        assert got is not None
        assert _flat(got, readonly=False) == _flat(await vol.read_sparse(0, 24 * BS),
                                                   readonly=False)
        assert b"".join(d if d is not None else bytes(n)
                        for _o, n, d in _flat(got, readonly=False)) == model
    finally:
        await pool.close()


async def test_large_nowait_read_never_serves_a_rotten_fragment(
        disks: Callable[..., DiskSet]) -> None:
    """A corrupt fragment in the middle of a large read: the fast path declines (None),
    and the awaited read rebuilds it from the other two byte-exact and heals it."""
    ds = disks(3)
    pool, data, _path = await rotten_pool(ds, "ec:2+1", 8 * BS, 5, 1, seed=11)
    try:
        vol = VolumeManager(pool).get("v")
        assert vol.read_sparse_nowait(0, 8 * BS) is None
        pieces = await vol.read_sparse(0, 8 * BS)
        assert b"".join(b"".join(bytes(x) for x in d) for _o, _n, d in pieces
                        if d is not None) == data
        assert pool.counters["repaired_fragments"] == 1
        assert len(fragments(pool)) == 8 * 3
        # Healed: now answered at once, the same bytes.
        got = vol.read_sparse_nowait(0, 8 * BS)
        assert got is not None
        assert b"".join(d for _o, _n, d in _flat(got) if d is not None) == data
    finally:
        await pool.close()


def _flip(path: str, pos: int) -> None:
    """Flip one bit of the byte at ``pos`` of a device file."""
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ 0x04]))


def _map_id(pool: Pool) -> int:
    return next(int(o["map"]) for o in pool.objects().values()
                if o.get("type") == "volume" and o["name"] == "v")


@pytest.mark.parametrize(("profile", "column", "where"),
                         [("plain", 0, "header"), ("plain", 0, "chunk end"),
                          ("ec:2+1", 0, "header"), ("ec:2+1", 1, "chunk start"),
                          ("ec:2+1", 1, "chunk end")])
async def test_a_one_block_nowait_read_checks_each_fragment(
        disks: Callable[..., DiskSet], profile: str, column: int, where: str) -> None:
    """A one-record run (a small read's block, a partial write's base) is read by
    ``records._read_one_into``: the header and the chunk of each data column, checked
    with ``codec.check_one`` (reader invariant 1; DESIGN invariant 4). Healthy, the block
    comes back byte-exact; with one bit of a data fragment's header or chunk flipped on
    its device, the fast path declines, and the awaited read rebuilds and heals it."""
    ds = disks(3)
    pool, data = await filled_pool(ds, profile, 8 * BS)
    member, off, _length = fragments(pool)[(5, column)]
    want = data[5 * BS:6 * BS]
    dest = bytearray(BS)
    pool.record_cache.clear()
    read0 = pool.counters["records_read"]
    assert pool.read_blocks_into_nowait(_map_id(pool), [5], BS, [memoryview(dest)])
    assert dest == want and pool.counters["records_read"] == read0 + 1
    await pool.close()
    clen = BS // (1 if profile == "plain" else 2)
    at = {"header": 20, "chunk start": 32, "chunk end": 32 + clen - 1}[where]
    _flip(str(ds.paths[member]), off + at)
    pool = await Pool.open(ds.open())
    try:
        dest[:] = bytes(BS)
        assert not pool.read_blocks_into_nowait(_map_id(pool), [5], BS, [memoryview(dest)])
        vol = VolumeManager(pool).get("v")
        if profile == "plain":
            # Nothing to rebuild it from: the read fails, it never answers rotten bytes.
            with pytest.raises(MediumError, match="fragments it needs verified"):
                await vol.read(5 * BS, BS)
            return
        assert await vol.read(5 * BS, BS) == want
        assert pool.counters["repaired_fragments"] == 1
        pool.record_cache.clear()
        assert pool.read_blocks_into_nowait(_map_id(pool), [5], BS, [memoryview(dest)])
        assert dest == want
    finally:
        await pool.close()


async def test_a_large_read_buffer_is_reused_only_once_no_view_of_it_is_left(
        disks: Callable[..., DiskSet]) -> None:
    """Reader invariant 5: a read's buffer is written again only after every view handed
    out of it is gone; answers held meanwhile keep their bytes."""
    ds = disks(3)
    pool = await Pool.create("p", ds.create(), profile="ec:2+1", extent_size=1 << 20)
    try:
        vol = await VolumeManager(pool).create("v", 16 * BS, block_size=BS,
                                               compression=False)
        data = random.Random(5).randbytes(16 * BS)
        await vol.write(0, data)
        await vol.flush()

        def owner(pieces: object) -> object:
            assert isinstance(pieces, list)
            return memoryview(pieces[0][2][0]).obj

        held = [vol.read_sparse_nowait(at, 4 * BS) for at in range(0, 16 * BS, 4 * BS)]
        held += [vol.read_sparse_nowait(at, 4 * BS) for at in range(0, 16 * BS, 4 * BS)]
        owners = {id(owner(h)) for h in held}
        assert len(owners) == len(held)          # each read still held: its own buffer
        for i, h in enumerate(held):
            at = i % 4 * 4 * BS
            assert b"".join(d for _o, _n, d in _flat(h) if d is not None) == \
                data[at:at + 4 * BS]
        del h
        kept = held[3]
        held.clear()
        again = [vol.read_sparse_nowait(0, 4 * BS) for _ in range(4)]
        assert id(owner(kept)) not in {id(owner(a)) for a in again}
        assert {id(owner(a)) for a in again} <= owners     # spares reused
        assert b"".join(d for _o, _n, d in _flat(kept) if d is not None) == \
            data[12 * BS:16 * BS]
    finally:
        await pool.close()


async def test_small_nowait_read_hands_out_a_read_only_view_and_copies_buffered_blocks(
        disks: Callable[..., DiskSet]) -> None:
    """``read_sparse_nowait`` inside one block: a block the pool read or cached comes as
    a read-only view (no copy); a block in the write buffer as a copy (readshape
    invariant 1), which a later write does not change."""
    ds = disks(3)
    pool = await Pool.create("p", ds.create(), profile="ec:2+1", extent_size=1 << 20)
    try:
        vol = await VolumeManager(pool).create("v", 4 * BS, block_size=BS, compression=False)
        data = random.Random(6).randbytes(4 * BS)
        await vol.write(0, data)
        await vol.flush()
        for _ in range(2):                       # read from the devices, then cached
            got = vol.read_sparse_nowait(BS + 100, 4096)
            assert got is not None
            (piece,) = got[0][2] or []
            assert memoryview(piece).readonly and bytes(piece) == data[BS + 100:BS + 4196]
        await vol.write(2 * BS, b"a" * 8192)     # buffered, not flushed
        got = vol.read_sparse_nowait(2 * BS + 10, 100)
        assert got is not None
        (piece,) = got[0][2] or []
        assert bytes(piece) == b"a" * 100
        await vol.write(2 * BS, b"b" * 8192)
        assert bytes(piece) == b"a" * 100
    finally:
        await pool.close()


@pytest.mark.parametrize("profile", ["plain", "ec:2+1"])
async def test_a_large_read_without_holes_comes_as_one_view(
        disks: Callable[..., DiskSet], profile: str) -> None:
    """``Pool.read_span_nowait``: blocks stored raw with no hole among them and none
    buffered are answered as one read-only view of the read's buffer (readshape
    invariant 1, reader invariant 5), by ``read_sparse_nowait`` and
    ``read_vectored_nowait`` alike, byte-exact also with partial blocks at the ends; a
    later write does not show through it. With a hole, or a block in the write buffer,
    the answer is per block as before, and exact."""
    ds = disks(3)
    pool = await Pool.create("p", ds.create(), profile=profile, extent_size=1 << 20)
    try:
        vol = await VolumeManager(pool).create("v", 16 * BS, block_size=BS,
                                               compression=False)
        data = bytearray(random.Random(9).randbytes(12 * BS))
        await vol.write(0, bytes(data))
        await vol.flush()
        for off, n in ((0, 12 * BS), (BS + 100, 10 * BS), (3 * BS, 3 * BS + 1)):
            sparse = vol.read_sparse_nowait(off, n)
            assert sparse is not None and len(sparse) == 1
            (at, length, pieces), = sparse
            assert (at, length) == (off, n)
            assert pieces is not None and len(pieces) == 1
            assert memoryview(pieces[0]).readonly and bytes(pieces[0]) == data[off:off + n]
            vec = vol.read_vectored_nowait(off, n, view=True)
            assert vec is not None and len(vec) == 1
            assert memoryview(vec[0]).readonly and bytes(vec[0]) == data[off:off + n]
        before = bytes(data)
        held = vol.read_vectored_nowait(0, 12 * BS)
        assert held is not None and len(held) == 1
        await vol.write(2 * BS, b"w" * BS)          # buffered now
        mixed = vol.read_vectored_nowait(0, 12 * BS)
        assert mixed is not None and len(mixed) == 12    # per block: one is buffered
        data[2 * BS:3 * BS] = b"w" * BS
        assert b"".join(bytes(p) for p in mixed) == data
        await vol.flush()
        await vol.write(2 * BS + 7, b"z" * 9)        # patches the buffered block in place
        await vol.write(4 * BS, b"z" * BS)
        await vol.flush()
        assert bytes(held[0]) == before               # nothing showed through either
        assert b"".join(bytes(p) for p in mixed) == data
        data[2 * BS + 7:2 * BS + 16] = b"z" * 9
        data[4 * BS:5 * BS] = b"z" * BS
        # A hole in the range (blocks 12-15 were never written): per block, exact.
        vec = vol.read_vectored_nowait(8 * BS, 8 * BS)
        assert vec is not None and len(vec) == 8
        assert b"".join(bytes(p) for p in vec) == data[8 * BS:] + bytes(4 * BS)
        whole = vol.read_vectored_nowait(0, 12 * BS)
        assert whole is not None and len(whole) == 1 and bytes(whole[0]) == data
    finally:
        await pool.close()
