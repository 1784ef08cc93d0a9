"""The write and read paths (pool.writer, pool.reader) through a real Pool on file devices:
their numbered invariants ("writer invariant N", "reader invariant N") and DESIGN's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from pool import codec
from pool.device import FileDevice
from pool.errors import MediumError
from pool.layout import SECTOR
from pool.pool import Pool
from pool.profile import Profile
from pool.state import ENTRY
from pool.tuning import PoolTuning

BS = 64 * 1024
PROF = Profile(2, 1)


async def _pool(tmp_path: Path, cache: int = 1 << 20) -> Pool:
    devs = [FileDevice(str(tmp_path / f"d{i}"), create_size=64 << 20) for i in range(3)]
    return await Pool.create("dp", devs, profile="ec:2+1", extent_size=1 << 20,
                             tuning=PoolTuning(record_cache=cache, discard_freed=False))


async def test_records_are_appended_and_referenced_only_once_written(tmp_path: Path) -> None:
    """Writer invariants 1, 2 (DESIGN 1, 3): each store appends after the last record of
    the open segment, never at an offset used before; overwrites get new records; the
    map points at a record only once ``write_blocks`` returned; byte-exact read-back."""
    pool = await _pool(tmp_path)
    m = pool.create_map()
    seen: set[tuple[int, int]] = set()
    datas: dict[int, bytes] = {}
    for rnd in range(6):
        items = [(b, os.urandom(BS)) for b in range(rnd % 3, 12, 2)]
        await pool.write_blocks(m, PROF, False, items)
        datas.update(items)
        for b, _d in items:
            raw = pool.state.forest.get(m, b)
            assert raw is not None
            seg, off = ENTRY.unpack(raw)[:2]
            assert (seg, off) not in seen           # never-used space, every time
            seen.add((seg, off))
            assert off + 1 <= pool.state.segments[seg].fill
    got = await pool.read_blocks(m, sorted(datas), BS)
    assert [bytes(v) for v in got if v is not None] == [datas[b] for b in sorted(datas)]
    await pool.close()


async def test_a_segment_is_pinned_while_its_records_are_in_flight(tmp_path: Path) -> None:
    """Writer invariant 3 (space rule S6): while a store's column writes are in flight its
    segment is pinned (not reaped), and afterwards the pin is gone."""
    pool = await _pool(tmp_path)
    m = pool.create_map()
    pinned: list[bool] = []
    real = pool.store.write

    async def watching(runs):  # type: ignore[no-untyped-def]
        pinned.extend(seg.id in pool.pins for seg, _off, _recs in runs)
        return await real(runs)
    pool.store.write = watching  # type: ignore[method-assign]
    await pool.write_blocks(m, PROF, False, [(0, os.urandom(BS))])
    assert pinned == [True]
    seg = ENTRY.unpack(pool.state.forest.get(m, 0) or b"")[0]
    assert seg not in pool.pins
    await pool.close()


async def test_a_write_that_loses_too_many_columns_fails_and_leaves_nothing(
        tmp_path: Path) -> None:
    """Writer invariant 4 (DESIGN 5): with two of three ec:2+1 members failing their
    writes, the write fails with MediumError and the map is unchanged (the old block
    still reads back)."""
    pool = await _pool(tmp_path)
    m = pool.create_map()
    old = os.urandom(BS)
    await pool.write_blocks(m, PROF, False, [(0, old)])
    await pool.commit()
    before = pool.state.forest.get(m, 0)
    for i in (0, 1):
        dev = pool.devices[i]
        assert dev is not None
        dev.close()                          # every write to it now fails
    with pytest.raises(MediumError, match="cannot lose more than 1 fragments"):
        await pool.write_blocks(m, PROF, False, [(0, os.urandom(BS))])
    assert pool.state.forest.get(m, 0) == before
    assert not any(s in pool.pins for s in pool.state.segments)
    await pool.close()


async def test_small_reads_are_cached_verified_and_large_ones_are_not(tmp_path: Path) -> None:
    """Reader invariants 1, 3: a small read's verified blocks enter the record cache
    under their map entries and are served from it; a larger read's are not cached."""
    pool = await _pool(tmp_path)
    m = pool.create_map()
    datas = {b: os.urandom(BS) for b in range(8)}
    await pool.write_blocks(m, PROF, False, list(datas.items()))
    got = await pool.read_blocks(m, [3], BS)
    assert bytes(got[0] or b"") == datas[3]
    key = pool.state.forest.get(m, 3)
    assert key is not None and key in pool.record_cache
    answered, v = pool.read_block_nowait(m, 3, BS)
    assert answered and bytes(v or b"") == datas[3]
    before = len(pool.record_cache)
    got = await pool.read_blocks(m, [4, 5, 6], BS)
    assert [bytes(x or b"") for x in got] == [datas[4], datas[5], datas[6]]
    assert len(pool.record_cache) == before
    await pool.close()


async def test_a_read_in_a_thread_holds_freed_space_back(tmp_path: Path) -> None:
    """Reader invariant 2 (DESIGN 3, rule S5): a read that waits in a thread counts as
    in flight with the store for its whole duration."""
    pool = await _pool(tmp_path, cache=0)
    m = pool.create_map()
    await pool.write_blocks(m, PROF, False, [(0, os.urandom(BS))])
    await pool.commit()
    held: list[int] = []
    gate = trio.Event()
    real = trio.to_thread.run_sync
    in_flight = pool.store.readers

    async def slow(fn, *args, **kw):  # type: ignore[no-untyped-def]
        held.append(sum(in_flight.values()))
        await gate.wait()
        return await real(fn, *args, **kw)
    seg = ENTRY.unpack(pool.state.forest.get(m, 0) or b"")[0]
    dev = pool.devices[pool.state.segments[seg].extents[0][0]]
    assert isinstance(dev, FileDevice)
    dev.drop_cache(0, dev.size)              # not page-cached: the read takes a thread
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trio.to_thread, "run_sync", slow)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.read_blocks, m, [0], BS)
            await trio.testing.wait_all_tasks_blocked()
            assert held == [1] and sum(in_flight.values()) == 1
            gate.set()
    assert sum(in_flight.values()) == 0
    await pool.close()


@pytest.mark.parametrize(("k", "m", "n"), [(1, 0, 5), (4, 2, 3), (2, 1, 1)])
def test_a_column_read_in_pieces_verifies_only_untouched_fragments(k: int, m: int,
                                                                    n: int) -> None:
    """Reader invariant 1 (DESIGN 4) for the read into the caller's buffer: the headers
    of a column's fragments land ``gap`` bytes apart and their chunks elsewhere
    (records.read_runs_into); ``codec.check_column`` accepts them as written and refuses
    a flip of any header byte, of a chunk byte, and a record hash, index, k, m or length
    that is not the one asked for."""
    payloads = [os.urandom(BS) for _ in range(n)]
    recs = [codec.stripe(p, 0, k, m) for p in payloads]
    clen = BS // k
    gap = recs[0].units * SECTOR - clen
    hashes = [r.rhash for r in recs]
    for index in range(k):
        frags = [r.fragments[index] for r in recs]
        between = bytearray(n * gap)
        chunks: list[memoryview] = []
        for i, f in enumerate(frags):     # as the preadv lays them out
            between[i * gap:i * gap + codec.HEADER_SIZE] = f[:codec.HEADER_SIZE]
            chunks.append(memoryview(bytearray(f[codec.HEADER_SIZE:codec.HEADER_SIZE
                                                 + clen])))

        def ok(idx: int = index, kk: int = k, mm: int = m, plen: int = BS,
               rh: list[int] = hashes, between: bytearray = between,
               chunks: list[memoryview] = chunks) -> bool:
            return codec.check_column(memoryview(between), gap, chunks, idx, kk, mm, plen,
                                      rh)
        assert ok()
        assert not ok(idx=(index + 1) % (k + m or 1)) or k + m == 1
        assert not ok(kk=k + 1) and not ok(mm=m + 1) and not ok(plen=BS - SECTOR)
        assert not ok(rh=[*hashes[:-1], hashes[-1] ^ 1])
        for i in range(n):
            for at in range(codec.HEADER_SIZE):
                between[i * gap + at] ^= 0x10
                assert not ok(), (index, i, at)
                between[i * gap + at] ^= 0x10
            for at in (0, clen // 2, clen - 1):
                chunks[i][at] ^= 1
                assert not ok(), (index, i, at)
                chunks[i][at] ^= 1
        assert ok()     # every flip undone: the column verifies again


@pytest.mark.parametrize(("k", "m"), [(1, 0), (4, 2), (2, 1)])
def test_one_fragment_read_in_pieces_is_checked_as_a_column_of_one(k: int, m: int) -> None:
    """Reader invariant 1 for a one-record run (``records._read_one_into``):
    ``codec.check_one`` of a fragment's header and chunk answers what ``check_column``
    answers for a column of one, accepting it as written and refusing a flip of any header
    byte, of a chunk byte, a short header or chunk, and a record hash, index, k, m or
    length that is not the one asked for."""
    rec = codec.stripe(os.urandom(BS), 0, k, m)
    clen = BS // k
    gap = rec.units * SECTOR - clen
    for index in range(k):
        frag = bytearray(rec.fragments[index])
        head = memoryview(frag)[:codec.HEADER_SIZE]
        chunk = memoryview(frag)[codec.HEADER_SIZE:codec.HEADER_SIZE + clen]

        def one(idx: int = index, kk: int = k, mm: int = m, plen: int = BS,
                rh: int = rec.rhash, head: memoryview = head,
                chunk: memoryview = chunk) -> bool:
            got = codec.check_one(head, chunk, idx, kk, mm, plen, rh)
            between = bytearray(gap)
            between[:len(head)] = head
            assert got == (len(head) == codec.HEADER_SIZE and codec.check_column(
                memoryview(between), gap, [chunk], idx, kk, mm, plen, [rh]))
            return got
        assert one()
        assert not one(idx=(index + 1) % (k + m)) or k + m == 1
        assert not one(idx=k + m) and not one(kk=k + 1) and not one(mm=m + 1)
        assert not one(plen=BS - SECTOR) and not one(rh=rec.rhash ^ 1)
        assert not one(head=head[:-1]) and not one(chunk=chunk[:-1])
        for at in range(codec.HEADER_SIZE):
            frag[at] ^= 0x10
            assert not one(), (index, at)
            frag[at] ^= 0x10
        for at in (0, clen // 2, clen - 1):
            chunk[at] ^= 1
            assert not one(), (index, at)
            chunk[at] ^= 1
        assert one()    # every flip undone


def _text(seed: int) -> bytes:
    """A block lz4 packs to well under 7/8 (so it is stored compressed)."""
    words = [b"read ", b"write ", b"flush ", b"segment ", b"extent ", b"%d " % seed]
    out = b"".join(words[(i * 7 + seed) % len(words)] for i in range(BS // 4))
    return out[:BS]


@pytest.mark.parametrize("prof", [PROF, Profile(1, 0)], ids=["ec:2+1", "plain"])
async def test_compressed_blocks_are_read_verified_into_the_callers_buffer(
        tmp_path: Path, prof: Profile) -> None:
    """Reader invariant 1 (DESIGN 4) for lz4 records read on the event loop into the
    caller's buffers (codec.expand_into, straight into them): compressed and raw records,
    holes and a record-cache hit come back byte-exact; a flipped byte in one compressed
    fragment makes the event-loop read give up (nothing of it is taken as read) and the
    general path rebuilds the block (ec) or refuses it (plain), counted either way."""
    pool = await _pool(tmp_path, cache=1 << 20)
    m = pool.create_map()
    datas: dict[int, bytes] = {b: _text(b) for b in (0, 1, 2, 4, 5, 6)}
    datas[5] = os.urandom(BS)                 # stored raw beside the compressed ones
    await pool.write_blocks(m, prof, True, list(datas.items()))
    entries = {b: ENTRY.unpack(pool.state.forest.get(m, b) or b"") for b in datas}
    assert all(entries[b][3] & codec.FLAG_LZ4 for b in (0, 1, 2, 4, 6))
    assert not entries[5][3] & codec.FLAG_LZ4
    await pool.read_blocks(m, [6], BS)        # block 6 now comes from the record cache
    want = b"".join(datas.get(b, bytes(BS)) for b in range(7))
    buf = bytearray(b"\xaa" * 7 * BS)
    dests = [memoryview(buf)[i * BS:(i + 1) * BS] for i in range(7)]
    before = pool.statistics().records_read
    assert pool.read_blocks_into_nowait(m, range(7), BS, dests)
    assert bytes(buf) == want
    assert pool.statistics().records_read - before == 5   # not the hole, not the hit

    seg_id, off = entries[1][0], entries[1][1]
    dev, base, _name = pool.reader._store.columns(pool.state.segments[seg_id])[0]
    assert isinstance(dev, FileDevice)
    at = base + off * SECTOR + codec.HEADER_SIZE + 100      # inside the first chunk
    dev.pwrite(at, bytes([dev.pread(at, 1)[0] ^ 0x40]))      # bit rot, page-cached
    buf[:] = b"\xaa" * 7 * BS
    assert not pool.read_blocks_into_nowait(m, range(7), BS, dests)
    if prof.m:
        await pool.read_blocks_into(m, range(7), BS, dests)
        assert bytes(buf) == want
        st = pool.statistics()
        assert (st.degraded_reads, st.repaired_fragments) == (1, 1)
    else:
        with pytest.raises(MediumError):
            await pool.read_blocks_into(m, range(7), BS, dests)
        assert pool.statistics().unreadable_records == 1
    await pool.close()
