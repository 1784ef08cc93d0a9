"""The read-ahead of segment objects (pool/rados/prefetch.py) on a real cluster: a
sequential stream is answered on the event loop byte-exact; a write or delete is never
answered with bytes from before it; a missing object and a fenced client read exactly as
without read-ahead; a read in flight outlives its cancelled caller safely; the RADOS op
histogram counts the asynchronous reads. No mocks: the column readers the record reader
would get (``ObjectColumn``), called from the event loop and from worker threads."""

from __future__ import annotations

import os

import pytest
import trio

from pool.errors import DeviceError
from pool.rados import prefetch
from pool.rados.conn import Connection, Fenced
from pool.rados.owner import OwnershipLock
from pool.rados.prefetch import Prefetcher
from pool.rados.segments import ObjectColumn, RadosSegments
from tests.kit.cephkit import Cluster
from tests.rados.radoskit import connect, new_uuid, owner

SEG = 16 << 20
READ = 256 << 10


@pytest.fixture(autouse=True)
def _readahead_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-ahead is off by default (prefetch.LIMIT = 0); these tests turn it on."""
    monkeypatch.setattr(prefetch, "LIMIT", prefetch.ENABLED)


async def _settle(pf: Prefetcher) -> None:
    """Wait until no asynchronous read is in flight."""
    def wait() -> None:
        with pf.lock:
            events = [c.event for cs in pf.chunks.values() for c in cs if not c.done]
        for ev in events:
            assert ev.wait(30)
    await trio.to_thread.run_sync(wait)
    assert pf.pending == 0


async def _stream(col: ObjectColumn, start: int, count: int) -> list[bytes]:
    """``count`` reads of READ bytes from ``start`` on, each the way the record reader
    does it: on the event loop if the read-ahead holds it, else from a worker thread."""
    out = []
    for i in range(count):
        off = start + i * READ
        buf = bytearray(READ)
        if col.preadv_nowait(off, [buf]) == READ:
            out.append(bytes(buf))
        else:
            out.append(await trio.to_thread.run_sync(col.pread, off, READ))
    return out


async def _object(conn: Connection, size: int = 8 << 20) -> tuple[RadosSegments, bytes]:
    segs = RadosSegments(conn, new_uuid())
    data = os.urandom(size)
    await segs.write_whole(1, 0, data)
    return segs, data


async def test_sequential_stream_is_answered_on_the_loop(ceph: Cluster) -> None:
    """Prefetch invariants 1, 4, 6: after RUN sequential reads the stream is read ahead;
    later reads are answered by ``preadv_nowait`` byte-exact (scattered over several
    buffers); the asynchronous reads are in the ``read`` histogram; memory stays within
    the limit and nothing is left once the stream was read to the end."""
    conn = await connect(ceph)
    segs, data = await _object(conn)
    pf = conn.prefetch
    col = segs.reader(1, 0, len(data))
    before = conn.statistics().latency["read"].count
    got = await _stream(col, 0, 3)
    assert b"".join(got) == data[:3 * READ]
    assert pf.issued > 0 and pf.held <= pf.limit
    await _settle(pf)
    hits = pf.hits
    off = 3 * READ
    bufs = [bytearray(1000), bytearray(READ - 1000)]       # a scatter, like preadv
    assert col.preadv_nowait(off, bufs) == READ
    assert bytes(bufs[0] + bufs[1]) == data[off:off + READ]
    assert pf.hits == hits + 1
    rest = await _stream(col, 4 * READ, len(data) // READ - 4)
    assert b"".join(rest) == data[4 * READ:]
    await _settle(pf)
    st = conn.statistics().latency["read"]
    assert st.count - before >= pf.issued and st.failed == 0
    assert pf.hits > len(data) // READ // 2, (pf.hits, pf.misses)
    assert pf.held == 0 and not pf.chunks        # every read-ahead byte was used once
    await conn.close()


async def test_a_write_is_never_answered_with_older_bytes(ceph: Cluster) -> None:
    """Prefetch invariant 3: once a write of a range completed, no read of the range
    gets bytes from before it, whether the read-ahead held them or was still reading
    them when the write completed; the same after a delete (a read then fails)."""
    conn = await connect(ceph)
    segs, data = await _object(conn)
    pf = conn.prefetch
    col = segs.reader(1, 0, len(data))
    want = bytearray(data)
    await _stream(col, 0, 3)                 # read-ahead starts: reads in flight now
    for at in (3 * READ, 5 * READ + 4096, 7 * READ):
        new = os.urandom(8192)
        await segs.write_at(1, 0, at, new)   # some chunks pending, some done by now
        want[at:at + len(new)] = new
    await _settle(pf)
    for off in range(3 * READ, 9 * READ, READ):
        buf = bytearray(READ)
        n = col.preadv_nowait(off, [buf])
        assert n == 0 or bytes(buf) == want[off:off + READ], off
        assert await trio.to_thread.run_sync(col.pread, off, READ) == want[off:off + READ]
    await _stream(col, 9 * READ, 3)
    await segs.delete(1)
    assert not pf.chunks.get(segs.oid(1, 0))
    with pytest.raises(DeviceError, match="no such object"):
        await trio.to_thread.run_sync(col.pread, 12 * READ, READ)
    await _settle(pf)
    await conn.close()


async def test_missing_object_reads_as_before(ceph: Cluster) -> None:
    """Prefetch invariant 4: read-ahead of an object that does not exist serves nothing
    (its failed reads are counted in the histogram), and the reader's own read reports
    the missing object as it always did (DeviceError naming it)."""
    conn = await connect(ceph)
    segs = RadosSegments(conn, new_uuid())
    col = segs.reader(5, 0, SEG)
    pf = conn.prefetch
    for i in range(3):                       # a sequential stream of a missing object
        assert col.preadv_nowait(i * READ, [bytearray(READ)]) == 0
    assert pf.issued > 0
    await _settle(pf)
    assert pf.held == 0 and not pf.chunks
    assert col.preadv_nowait(3 * READ, [bytearray(READ)]) == 0
    with pytest.raises(DeviceError, match="no such object"):
        await trio.to_thread.run_sync(col.pread, 4 * READ, READ)
    await _settle(pf)
    assert pf.held == 0 and not pf.chunks
    assert conn.statistics().latency["read"].failed >= pf.issued + 1
    await conn.close()


async def test_fenced_client_reads_nothing_ahead(ceph: Cluster) -> None:
    """Prefetch invariant 6, conn invariant 3: after another daemon's takeover, the old
    owner's read-ahead gets nothing from the OSDs; its reader's read fails with Fenced;
    once fenced, nothing is started or served."""
    uuid = new_uuid()
    a, b = await connect(ceph), await connect(ceph)
    await OwnershipLock(a, uuid, owner("a")).acquire(create=True)
    segs = RadosSegments(a, uuid)
    data = os.urandom(8 << 20)
    await segs.write_whole(1, 0, data)
    col = segs.reader(1, 0, len(data))
    lb = OwnershipLock(b, uuid, owner("b"))
    await lb.acquire(takeover=True)          # a is blocklisted from here on
    pf = a.prefetch
    for i in range(3):                       # read-ahead starts, and fails
        assert col.preadv_nowait(i * READ, [bytearray(READ)]) == 0
    assert pf.issued > 0
    await _settle(pf)
    assert not pf.chunks and pf.held == 0
    with pytest.raises(Fenced):
        await trio.to_thread.run_sync(col.pread, 3 * READ, READ)
    assert a.fenced is not None
    issued = pf.issued
    for i in range(4, 8):
        assert col.preadv_nowait(i * READ, [bytearray(READ)]) == 0
    assert pf.issued == issued               # fenced: nothing more is started
    await lb.release()
    await a.close()
    await b.close()


async def test_cancelled_reader_and_close_with_reads_in_flight(ceph: Cluster) -> None:
    """Prefetch invariant 5: a caller's buffer is never written after ``preadv_nowait``
    returned 0, though the read it started completes later; readers cancelled with reads
    in flight leave the connection usable; ``close`` waits for every read in flight."""
    conn = await connect(ceph)
    segs, data = await _object(conn)
    pf = conn.prefetch
    col = segs.reader(1, 0, len(data))
    await _stream(col, 0, 3)                  # read-ahead in flight
    sentinel = [bytearray(b"\x5a" * READ) for _ in range(4)]
    pending = [i for i in range(3, 7)
               if col.preadv_nowait(i * READ, [sentinel[i - 3]]) == 0]
    with trio.move_on_after(0):              # readers cancelled at their first await
        async with trio.open_nursery() as nursery:
            for i in range(8, 16):
                nursery.start_soon(_stream, col, i * READ, 1)
    await _settle(pf)
    for i in pending:
        assert sentinel[i - 3] == b"\x5a" * READ
    assert await trio.to_thread.run_sync(col.pread, 9 * READ, READ) == \
        data[9 * READ:10 * READ]
    await _stream(col, 10 * READ, 3)          # more reads in flight, then close
    await conn.close()
    assert pf.pending == 0 and pf.held == 0 and not pf.chunks


async def test_off_by_default_reads_as_before(ceph: Cluster,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With LIMIT 0 (the default) nothing is read ahead and every read is the worker
    thread's own synchronous read, byte-exact."""
    monkeypatch.setattr(prefetch, "LIMIT", 0)
    conn = await connect(ceph)
    segs, data = await _object(conn, 2 << 20)
    col = segs.reader(1, 0, len(data))
    assert b"".join(await _stream(col, 0, len(data) // READ)) == data
    assert conn.prefetch.issued == 0 and conn.prefetch.hits == 0 and not conn.prefetch.chunks
    await conn.close()
