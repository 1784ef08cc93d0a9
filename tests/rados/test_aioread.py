"""The RADOS read path (pool/rados/reader.py, pool/rados/aioread.py) on a real cluster:
reads go out as asynchronous librados reads, one per run of records, verified as they
complete, and read back byte-exact; anything they cannot serve (a rotten fragment, a
fenced client) takes the general path, which reports exactly as before; a cancelled read
leaves its completion harmless, and the pool closes with reads in flight. No mocks.

"reader invariant N" is pool/rados/reader.py's, "aioread invariant N" aioread.py's, "conn
invariant N" pool/rados/conn.py's."""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.testing

from pool import owner as owners
from pool import records
from pool.errors import MediumError, NotFound, StorageError
from pool.layout import SECTOR
from pool.pool import Pool
from pool.rados import reader as rados_reader
from pool.rados.conn import THROTTLE_BYTES, THROTTLE_OPS, Connection
from pool.rados.reader import RadosRecordReader
from pool.rados.segments import ObjectColumn
from pool.rados.target import RadosTarget
from pool.readcache import RecordCache
from pool.state import ENTRY
from pool.tuning import PoolTuning
from tests.kit.cephkit import TEST_POOL, Cluster
from tests.rados.radoskit import connect, owner
from volumes.manager import VolumeManager
from volumes.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
EXTENT = 4 * MiB
QUOTA = 2 << 30


async def _pool(ceph: Cluster, name: str) -> tuple[Pool, Volume, bytes]:
    """A pool with the record cache off (every read reaches the OSD) and a volume 'v'
    holding 6 MiB of random bytes, flushed: two 4 MiB segments and a half."""
    conn = await connect(ceph)
    await conn.mon_command({"prefix": "osd pool set-quota", "pool": TEST_POOL,
                            "field": "max_bytes", "val": str(QUOTA)})
    await conn.close()
    pool = await Pool.create_rados(name, RadosTarget.parse(TEST_POOL, str(ceph.conf)),
                                   extent_size=EXTENT, claim=owners.Claim(owner("a")),
                                   tuning=PoolTuning(record_cache=0))
    vol = await VolumeManager(pool).create("v", 16 * MiB, block_size=BS, compression=False)
    data = os.urandom(6 * MiB)
    await vol.write(0, data)
    await vol.flush()
    assert isinstance(pool.reader, RadosRecordReader)
    return pool, vol, data


def _conn(pool: Pool) -> Connection:
    assert pool.rados is not None
    return pool.rados.conn


async def _settle(pool: Pool) -> None:
    """Wait until no asynchronous read is in flight and their completions ran."""
    aio = _conn(pool).aio
    for _ in range(3000):
        if not aio.pending:
            break
        await trio.sleep(0.01)
    assert aio.pending == 0
    await trio.sleep(0.05)


async def _frontend_read(vol: Volume, offset: int, length: int) -> tuple[bytes, bool]:
    """Read as the NBD server does: ``read_sparse_nowait`` first, then ``read`` if that
    could not answer at once; (the bytes, whether they were answered at once)."""
    pieces = vol.read_sparse_nowait(offset, length)
    if pieces is None:
        return await vol.read(offset, length), False
    return b"".join(b for _o, n, d in pieces
                    for b in (d if d is not None else [bytes(n)])), True


async def test_reads_are_asynchronous_and_byte_exact(ceph: Cluster) -> None:
    """Reader invariant 1, aioread invariants 1, 3, 4: the objecter throttle is raised;
    reads of whole runs, unaligned ranges
    and ranges across two segments (two runs, two reads), one at a time and 8 at once,
    are byte-exact; each run is one asynchronous read, each counted once in the ``read``
    histogram; ``read_blocks_nowait`` answers None without reading (reader invariant 3);
    nothing is left in flight; lz4-compressed records read back byte-exact."""
    pool, vol, data = await _pool(ceph, "p-aio")
    try:
        conn = _conn(pool)
        # aio_read on the loop never waits on the objecter's throttle (aioread 3)
        assert int(conn.cluster.conf_get("objecter_inflight_op_bytes")) == THROTTLE_BYTES
        assert int(conn.cluster.conf_get("objecter_inflight_ops")) == THROTTLE_OPS
        aio = conn.aio
        started, hist = aio.started, conn.statistics().latency["read"].count
        assert await vol.read(0, MiB) == data[:MiB]
        assert aio.started == started + 1
        assert conn.statistics().latency["read"].count == hist + 1
        for off, n in [(12345, 70000), (EXTENT - BS, 2 * BS), (3 * MiB + 777, 2 * MiB),
                       (6 * MiB - 5, 5)]:
            assert await vol.read(off, n) == data[off:off + n], (off, n)
        # across two segments: two runs, two reads
        before = aio.started
        assert await vol.read(EXTENT - 4 * BS, 8 * BS) == data[EXTENT - 4 * BS:EXTENT + 4 * BS]
        assert aio.started - before >= 2
        assert pool.read_blocks_nowait(vol._map, range(16), BS) is None
        assert aio.started - before >= 2 and aio.pending == 0

        rng = random.Random(7)
        wrong: list[int] = []

        async def reader() -> None:
            for _ in range(8):
                off = rng.randrange(0, 5 * MiB)
                if await vol.read(off, MiB) != data[off:off + MiB]:
                    wrong.append(off)
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(reader)
        assert wrong == []
        assert aio.pending == 0 and aio.bytes == 0

        # lz4-compressed records are expanded in the completion too
        z = await VolumeManager(pool).create("z", 4 * MiB, block_size=BS)
        text = b"".join(os.urandom(64) * 200 for _ in range(2 * MiB // 12800 + 1))
        text = text[:2 * MiB]
        await z.write(0, text)
        await z.flush()
        before = aio.started
        assert await z.read(12345, MiB) == text[12345:12345 + MiB]
        assert aio.started > before
    finally:
        await pool.close()


async def test_rotten_fragment_takes_the_general_path(ceph: Cluster) -> None:
    """Reader invariant 1: a read that meets a fragment whose bytes were overwritten in
    the object returns nothing of it: the request is read again by the general path,
    which raises MediumError for that block and counts it once (as without this path);
    a read of other blocks of the same object is byte-exact; nothing was written."""
    pool, vol, data = await _pool(ceph, "p-aio-rot")
    try:
        conn = _conn(pool)
        seg = next(iter(pool.state.segments.values()))
        oid = pool.store.columns(seg)[0].name
        await conn.run("write", "damage", conn.ioctx.write, oid, b"\xff" * 512, 70000)
        size, _ = await conn.run("read", "stat", conn.ioctx.stat, oid)
        before = await conn.run("read", "read", conn.ioctx.read, oid, size, 0)
        unreadable = pool.counters["unreadable_records"]
        with pytest.raises(MediumError):
            await vol.read(0, MiB)
        assert pool.counters["unreadable_records"] == unreadable + 1
        assert await vol.read(2 * BS, 6 * BS) == data[2 * BS:8 * BS]
        assert await conn.run("read", "read", conn.ioctx.read, oid, size, 0) == before
        assert conn.aio.pending == 0
    finally:
        await pool.close()


async def test_fenced_client_reads_nothing(ceph: Cluster) -> None:
    """Conn invariant 3, aioread invariant 4: once the pool's client is blocklisted, a
    read fails with a StorageError (the general path's Fenced) and returns no bytes; the
    connection is fenced, and no asynchronous read starts after that."""
    pool, vol, _data = await _pool(ceph, "p-aio-fence")
    other = await connect(ceph)
    try:
        conn = _conn(pool)
        await other.mon_command({"prefix": "osd blocklist", "blocklistop": "add",
                                 "addr": conn.addrs})
        # as a takeover does (owner invariant 3): the OSD map with the blocklist, then an
        # op of the other client, so the OSD has that map before the read arrives
        await other.run("command", "osd map", other.cluster.wait_for_latest_osdmap)
        await other.run("write", "probe", other.ioctx.write_full, "aio-probe", b"x")
        with trio.fail_after(60), pytest.raises(StorageError):
            await vol.read(0, MiB)
        assert conn.fenced is not None
        started = conn.aio.started
        with pytest.raises(StorageError):
            await vol.read(MiB, MiB)
        assert conn.aio.started == started
    finally:
        await other.mon_command({"prefix": "osd blocklist", "blocklistop": "rm",
                                 "addr": _conn(pool).addrs})
        await other.close()
        await pool.close()


async def test_cancelled_reads_and_close_in_flight(ceph: Cluster) -> None:
    """Aioread invariant 2, reader invariant 2: reads cancelled while their asynchronous
    reads are in flight end at once; the completions that arrive later harm nothing (the
    next reads are byte-exact, the read hold was released: nothing in flight is counted);
    and a pool closed right after cancelling reads in flight closes cleanly (``close``
    waits for them)."""
    pool, vol, data = await _pool(ceph, "p-aio-cancel")
    closed = False
    try:
        aio = _conn(pool).aio
        holds = sum(pool.store.readers.values())       # pins of open segments

        async def cancel_four_reads() -> None:
            started = aio.started
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        nursery.start_soon(vol.read, i * MiB, MiB)
                    await trio.testing.wait_all_tasks_blocked()
                    assert aio.started >= started + 4
                    scope.cancel()
            assert scope.cancelled_caught
        for _ in range(3):
            await cancel_four_reads()
        await _settle(pool)        # reads ahead hold until they completed (invariant 5)
        assert sum(pool.store.readers.values()) == holds
        assert await vol.read(MiB, 2 * MiB) == data[MiB:3 * MiB]
        await cancel_four_reads()       # and close with those reads still in flight
        closed = True
        await pool.close()
        assert aio.pending == 0 and aio.closed
    finally:
        if not closed:
            await pool.close()


async def test_plan_is_the_general_plan(ceph: Cluster) -> None:
    """Reader invariant 4: for whole runs, a read across two segments, holes, scattered
    blocks, one block and the whole volume, with a record-cache hit in the middle of a
    run, ``_plan_runs`` gives the entries, cached blocks and holes of ``_read_plan`` and
    exactly the runs ``records._runs`` makes of its plans (object, base, first sector,
    sectors, each record's slot, sectors, length, flags and xxh3), and their bytes; the
    read with the hit in it is byte-exact; a deleted map is NotFound, and nothing was
    read by planning."""
    pool, vol, data = await _pool(ceph, "p-aio-plan")
    try:
        reader = pool.reader
        assert isinstance(reader, RadosRecordReader)
        reader.cache = RecordCache(4 * MiB)
        hit = reader._read_plan(vol._map, [3])[0][0]
        assert hit is not None
        reader.cache.put(hit, data[3 * BS:4 * BS])
        started = _conn(pool).aio.started
        per = EXTENT // BS
        cases: list[list[int]] = [list(range(16)), list(range(per - 6, per + 6)),
                                  list(range(90, 100)), [1, 5, 6, 7, per, per + 1, 200],
                                  [3], [7], list(range(256))]
        for blocks in cases:
            entries, result, plans = reader._read_plan(vol._map, blocks)
            got = reader._plan_runs(vol._map, blocks)
            assert got is not None, blocks
            entries2, result2, runs, need = got
            assert entries2 == entries and result2 == result, blocks
            want = list(records._runs(plans))
            assert [(r[0], r[1], r[2], r[3]) for r in runs] == [
                (run[0].columns[0][0], run[0].columns[0][1], run[0].offset,
                 sum(p.units for p in run)) for run in want], blocks
            assert [r[4] for r in runs] == [
                [(p.slot, p.units, p.plen, p.flags, p.rhash) for p in run]
                for run in want], blocks
            assert need == sum(p.units for p in plans) * SECTOR, blocks
        # a cached block splits its run, as in the general plan; without one, one run
        assert len(reader._plan_runs(vol._map, list(range(16)))[2]) == 2  # type: ignore[index]
        assert len(reader._plan_runs(vol._map, list(range(16, 32)))[2]) == 1  # type: ignore[index]
        assert _conn(pool).aio.started == started
        assert await vol.read(0, MiB) == data[:MiB]
        assert reader.cache.hits >= 1
        with pytest.raises(NotFound):
            reader._plan_runs(vol._map + 1000, [0])
    finally:
        await pool.close()


async def test_read_ahead_of_a_sequential_stream(ceph: Cluster) -> None:
    """Reader invariant 5: 1 MiB reads in a row, as the NBD server makes them, are
    byte-exact; after RUN of them the next ones are read ahead (several requests in one
    batch) and answered at once by ``read_blocks_nowait`` (no task, no new read of their
    own); bytes read ahead never
    exceed AHEAD_TOTAL; a jump drops what was read ahead; every hold is released once the
    reads ahead completed; a random pattern starts nothing ahead."""
    pool, vol, data = await _pool(ceph, "p-ahead")
    try:
        reader = pool.reader
        assert isinstance(reader, RadosRecordReader)
        holds = sum(pool.store.readers.values())
        aio = _conn(pool).aio
        at_once = 0
        for i in range(5):
            before = aio.started
            got, now = await _frontend_read(vol, i * MiB, MiB)
            assert got == data[i * MiB:(i + 1) * MiB], i
            at_once += now
            if i >= 3:      # in the batch read ahead at the third: no read of its own
                assert now and aio.started == before, i
            assert reader.ahead_bytes <= rados_reader.AHEAD_TOTAL
            await _settle(pool)
        assert reader.ahead_started >= 1
        assert reader.ahead_taken >= 2 and at_once >= 2
        # a jump past the stream's end: what was read ahead is dropped
        assert reader.ahead_bytes > 0
        off = 5 * MiB + 8 * BS
        assert (await _frontend_read(vol, off, MiB))[0] == data[off:] + bytes(
            off + MiB - len(data))
        assert reader.ahead_bytes == 0
        await _settle(pool)
        assert sum(pool.store.readers.values()) == holds
        # random 1 MiB reads: no stream, nothing read ahead
        started = reader.ahead_started
        for off in (3 * MiB, 17, 5 * MiB - 3, MiB + 5, 2 * MiB + 9):
            assert (await _frontend_read(vol, off, MiB))[0] == data[off:off + MiB]
        assert reader.ahead_started == started
    finally:
        await pool.close()


async def test_read_ahead_never_serves_a_changed_block(ceph: Cluster) -> None:
    """Reader invariant 5: blocks written (flushed, so their map entries moved), trimmed,
    or only buffered after they were read ahead read back as they are now, never as they
    were read ahead; the stream goes on byte-exact; a volume deleted while its blocks were
    read ahead reads NotFound."""
    pool, vol, data = await _pool(ceph, "p-ahead-write")
    try:
        reader = pool.reader
        assert isinstance(reader, RadosRecordReader)
        want = bytearray(data)
        for i in range(3):
            assert (await _frontend_read(vol, i * MiB, MiB))[0] == data[i * MiB:(i + 1) * MiB]
        await _settle(pool)
        assert any(a.at <= 3 * MiB // BS and 5 * MiB // BS <= a.at + a.count
                   for a in next(iter(reader._streams.values())).ahead.values())
        new = os.urandom(BS)
        await vol.write(3 * MiB + BS, new)          # a block of the next batch, flushed
        await vol.flush()
        want[3 * MiB + BS:3 * MiB + 2 * BS] = new
        await vol.trim(4 * MiB, BS)                 # a block of the one after: a hole
        await vol.flush()
        want[4 * MiB:4 * MiB + BS] = bytes(BS)
        taken = reader.ahead_taken
        assert (await _frontend_read(vol, 3 * MiB, MiB))[0] == want[3 * MiB:4 * MiB]
        assert (await _frontend_read(vol, 4 * MiB, MiB))[0] == want[4 * MiB:5 * MiB]
        assert reader.ahead_taken == taken          # both read again, not from ahead
        await _settle(pool)
        more = os.urandom(BS)
        await vol.write(5 * MiB, more)              # buffered only, not flushed
        want[5 * MiB:5 * MiB + BS] = more
        assert (await _frontend_read(vol, 5 * MiB, MiB))[0] == want[5 * MiB:6 * MiB]
        assert await vol.read(0, 6 * MiB) == bytes(want[:6 * MiB])

        doomed = await VolumeManager(pool).create("d", 8 * MiB, block_size=BS,
                                                  compression=False)
        await doomed.write(0, data[:6 * MiB])
        await doomed.flush()
        for i in range(3):
            await _frontend_read(doomed, i * MiB, MiB)
        await VolumeManager(pool).delete("d")
        with pytest.raises(NotFound):
            await pool.read_blocks(doomed._map, list(range(48, 64)), BS)
        await _settle(pool)
    finally:
        await pool.close()


async def test_read_ahead_of_a_rotten_fragment(ceph: Cluster) -> None:
    """Reader invariants 1 and 5: a batch read ahead that meets a rotten fragment serves
    nothing; its request takes the general path, which raises MediumError for it and
    counts it once; the stream's other requests are byte-exact."""
    pool, vol, data = await _pool(ceph, "p-ahead-rot")
    try:
        conn = _conn(pool)
        # rot in block 52's record (inside the fourth MiB of the volume)
        entry = pool.reader._read_plan(vol._map, [52])[0][0]
        assert entry is not None
        seg_id, off, *_ = ENTRY.unpack(entry)
        dev, base, _name = pool.store.columns(pool.state.segments[seg_id])[0]
        assert isinstance(dev, ObjectColumn)
        await conn.run("write", "damage", conn.ioctx.write, dev.oid, b"\xff" * 512,
                       base + off * SECTOR + 1024)
        for i in range(3):
            assert (await _frontend_read(vol, i * MiB, MiB))[0] == data[i * MiB:(i + 1) * MiB]
        unreadable = pool.counters["unreadable_records"]
        with pytest.raises(MediumError):
            await _frontend_read(vol, 3 * MiB, MiB)
        assert pool.counters["unreadable_records"] == unreadable + 1
        assert (await _frontend_read(vol, 4 * MiB, MiB))[0] == data[4 * MiB:5 * MiB]
        await _settle(pool)
    finally:
        await pool.close()


async def test_read_ahead_under_a_writer(ceph: Cluster) -> None:
    """Reader invariant 5 with two clients at once: a sequential reader (as the NBD server
    reads, so its stream is read ahead) over the blocks that a writer rewrites and flushes
    meanwhile. Every block read is a version that was written to it, and never older than
    the last version whose flush completed before the read began (nothing read ahead is
    served stale); the volume is exact at the end. (How much is read ahead depends on the
    interleaving: a request with a buffered block in it asks the pool for the others
    only, which breaks the stream. A second sequential reader of the same volume would
    make it jump at every request: correct, but nothing would be read ahead.)"""
    pool, vol, data = await _pool(ceph, "p-ahead-many")
    try:
        span = 6 * MiB
        nblocks = span // BS
        committed = [0] * nblocks          # version of each block whose flush completed
        versions: dict[tuple[int, int], bytes] = {}
        for b in range(nblocks):
            versions[(b, 0)] = data[b * BS:(b + 1) * BS]
        rng = random.Random(11)
        stale: list[tuple[int, int, int]] = []
        unknown: list[int] = []
        done = False

        def block(b: int, v: int) -> bytes:
            return b"%08d%08d" % (b, v) + os.urandom(BS - 16)

        async def writer() -> None:
            nonlocal done
            try:
                for v in range(1, 25):
                    batch = {rng.randrange(nblocks) for _ in range(6)}
                    for b in batch:
                        versions[(b, v)] = block(b, v)
                        await vol.write(b * BS, versions[(b, v)])
                    await vol.flush()
                    for b in batch:
                        committed[b] = v
                    await trio.sleep(0.01)
            finally:
                done = True

        def version_of(b: int, got: bytes) -> int | None:
            for (bb, v), content in versions.items():
                if bb == b and content == got:
                    return v
            return None

        async def reader() -> None:
            while not done:
                for i in range(span // MiB):
                    floor = list(committed)
                    got, _now = await _frontend_read(vol, i * MiB, MiB)
                    for k in range(MiB // BS):
                        b = i * MiB // BS + k
                        v = version_of(b, got[k * BS:(k + 1) * BS])
                        if v is None:
                            unknown.append(b)
                        elif v < floor[b]:
                            stale.append((b, v, floor[b]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(reader)
        assert unknown == [] and stale == []
        final = b"".join(versions[(b, committed[b])] for b in range(nblocks))
        assert await vol.read(0, span) == final
        await _settle(pool)
    finally:
        await pool.close()
