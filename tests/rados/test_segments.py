"""Segment column objects on RADOS (pool/rados/segments.py) against a real cluster:
byte-exact ranged reads, refusals that return nothing made up, delete, the column as a
Device for worker threads, and a fenced client's columns refusing I/O."""

from __future__ import annotations

import os
import random

import pytest
import trio

from pool.errors import DeviceError, NotFound
from pool.rados.conn import Connection, Fenced, RadosError
from pool.rados.owner import OwnershipLock
from pool.rados.segments import RadosSegments
from tests.kit.cephkit import TEST_POOL, Cluster
from tests.rados.radoskit import connect, new_uuid, owner, snapshot


async def test_write_whole_and_ranged_reads(ceph: Cluster) -> None:
    """Segments invariants 1-2: what was written reads back exactly, at any range."""
    conn = await connect(ceph)
    segs = RadosSegments(conn, new_uuid())
    data = os.urandom(4 << 20)
    await segs.write_whole(7, 0, data)
    assert await segs.size(7) == len(data)
    rnd = random.Random(5)
    for _ in range(20):
        off = rnd.randrange(0, len(data) - 4096, 512)
        n = rnd.choice([512, 4096, 65536, 1 << 20])
        n = min(n, len(data) - off)
        assert await segs.read(7, 0, off, n) == data[off:off + n]
    assert await segs.read(7, 0, len(data) - 1, 1) == data[-1:]
    # Past the end: an error, never zeros (invariant 2).
    with pytest.raises(DeviceError, match="short read"):
        await segs.read(7, 0, len(data) - 100, 4096)
    with pytest.raises(NotFound):
        await segs.read(8, 0, 0, 4096)
    st = conn.statistics().latency
    assert st["read"].count >= 23 and st["read"].failed == 2 and st["write"].count == 1
    await conn.close()


async def test_append_write_at_and_delete(ceph: Cluster) -> None:
    conn = await connect(ceph)
    uuid = new_uuid()
    segs = RadosSegments(conn, uuid)
    runs = [os.urandom(n) for n in (4096, 12288, 512)]
    for run in runs:
        await segs.append(1, 0, run)
    await segs.write_at(1, 0, 4096, b"\xab" * 512)      # a rewrite inside, in place
    want = bytearray(b"".join(runs))
    want[4096:4608] = b"\xab" * 512
    assert await segs.read(1, 0, 0, len(want)) == bytes(want)
    cols = [os.urandom(65536) for _ in range(6)]
    await segs.write_columns(2, cols)
    assert [await segs.read(2, c, 0, 65536) for c in range(6)] == cols
    await segs.delete(2, columns=6)
    await segs.delete(2, columns=6)                      # again: nothing left to delete
    objs = await trio.to_thread.run_sync(snapshot, conn, uuid)
    assert sorted(objs) == [segs.oid(1, 0)]
    await conn.close()


async def test_column_as_device_in_a_thread(ceph: Cluster) -> None:
    """The reader the record reader would get: blocking pread/pwrite from a worker
    thread, byte-exact; never a cached read; short reads are DeviceError."""
    conn = await connect(ceph)
    segs = RadosSegments(conn, new_uuid())
    col = segs.reader(3, 0, 16 << 20)
    data = os.urandom(1 << 20)
    await trio.to_thread.run_sync(col.pwritev, 0, [data[:4096], data[4096:]])
    assert await trio.to_thread.run_sync(col.pread, 4096, 8192) == data[4096:12288]
    assert col.preadv_nowait(0, [bytearray(4096)]) == 0
    with pytest.raises(DeviceError):
        await trio.to_thread.run_sync(col.pread, (1 << 20) - 10, 4096)
    assert col.size == 16 << 20 and col.path.endswith(segs.oid(3, 0))
    await conn.close()


async def test_fenced_client_writes_no_segment(ceph: Cluster) -> None:
    """DESIGN invariant 10: after a takeover the old owner's segment writes fail (through
    both the async helpers and a column reader) and the object keeps the new owner's
    bytes."""
    uuid = new_uuid()
    a, b = await connect(ceph), await connect(ceph)
    await OwnershipLock(a, uuid, owner("a")).acquire(create=True)
    sa, sb = RadosSegments(a, uuid), RadosSegments(b, uuid)
    await sa.write_whole(1, 0, b"a" * 4096)
    col = sa.reader(1, 0, 1 << 20)
    lb = OwnershipLock(b, uuid, owner("b"))
    await lb.acquire(takeover=True)
    await sb.write_whole(1, 0, b"b" * 4096)
    with pytest.raises(Fenced):
        await sa.write_at(1, 0, 0, b"x" * 4096)
    with pytest.raises(Fenced):
        await trio.to_thread.run_sync(col.pwrite, 0, b"y" * 4096)
    with pytest.raises(Fenced):
        await sa.delete(1)
    assert await sb.read(1, 0, 0, 4096) == b"b" * 4096
    await lb.release()
    await a.close()
    await b.close()


def test_cluster_serves_io(ceph: Cluster) -> None:
    with ceph.client() as r:
        io = r.open_ioctx(TEST_POOL)
        io.write_full("kit", b"x" * 5000)
        assert io.read("kit", 10000) == b"x" * 5000
        io.remove_object("kit")
        io.close()
        assert r.get_fsid() in ceph.conf.read_text()


async def test_health_and_usage_without_mgr(ceph: Cluster) -> None:
    """Without a mgr, health answers (a mon command) and usage says it is not known."""
    conn = await Connection.open(TEST_POOL, conf=str(ceph.conf))
    assert (await conn.health()).startswith("HEALTH_")
    assert not (await conn.usage()).known
    await conn.close()


async def test_bad_client_or_pool_is_a_clear_error(ceph: Cluster) -> None:
    """DESIGN invariant 9: a client cephx does not know, or a RADOS pool that does not
    exist, is a one-line error naming it."""
    with pytest.raises(RadosError) as e:
        await Connection.open(TEST_POOL, conf=str(ceph.conf), client="nobody",
                              connect_timeout=5)
    assert "client.nobody" in e.value.message and "\n" not in e.value.message
    with pytest.raises(NotFound, match="'nope' does not exist"):
        await Connection.open("nope", conf=str(ceph.conf))
