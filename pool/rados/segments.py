"""Segment columns as RADOS objects: what a RADOS SegmentStore writes and reads
(issue 24; not wired into the Pool yet).

A segment of a pool on RADOS has the profile ``plain`` (Ceph's pool provides redundancy),
so one column; the helpers take a column number anyway, so a store could keep k + m
columns as separate objects. Column ``c`` of segment ``s`` is the object
``<pool uuid>.seg.<s as 16 hex digits>.<c>``.

- ``write_whole``: the column in one write_full (a segment filled in memory, then written:
  one object write instead of many small ones);
- ``write_at``: bytes at an offset of the column (runs of records appended as they are
  flushed); ``append``: at the object's end;
- ``read``: a byte range, exactly (a short read is an error, never zeros);
- ``delete``: the segment's columns (a free: RADOS gives the space back at once, so
  discard costs nothing);
- ``reader``: the column as a ``pool.device.Device`` (blocking; for the record reader,
  which calls it from its worker threads), with the connection's read-ahead
  (pool/rados/prefetch.py) as its "page cache": ``preadv_nowait`` answers from it on the
  event loop, ``pread`` waits for a read of it already in flight.

Invariants:

1. A write is durable when it returns: RADOS acknowledges a write once every replica (or
   EC shard) of the placement group has it, so ``sync`` has nothing left to do.
2. ``read`` returns exactly the bytes asked for or raises; nothing here makes up bytes
   (a range past the object's end is an error, like a short read of a device).
3. Every call goes through the connection (conn invariants 1-4): in a worker thread,
   timed, refused once fenced. A column reader's errors are DeviceError (what the record
   reader expects of a device), except Fenced, which passes as it is.
4. Every write and delete tells the read-ahead, once it completed, which range of which
   object changed (prefetch invariant 3), whether it succeeded or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import trio

from pool.device import Buffer
from pool.errors import DeviceError, StorageError
from pool.rados.conn import Connection, Fenced

PARALLEL = 16       # column objects written or deleted at once


class RadosSegments:
    """The segment column objects of one storaged pool on ``conn``'s RADOS pool."""

    def __init__(self, conn: Connection, pool_uuid: str) -> None:
        self.conn = conn
        self.pool_uuid = pool_uuid

    def oid(self, seg: int, col: int = 0) -> str:
        return f"{self.pool_uuid}.seg.{seg:016x}.{col}"

    async def write_whole(self, seg: int, col: int, data: Buffer) -> None:
        oid = self.oid(seg, col)
        try:
            await self.conn.run("write", f"write {oid}", self.conn.ioctx.write_full, oid,
                                bytes(data))
        finally:
            self.conn.prefetch.invalidate(oid)

    async def write_columns(self, seg: int, columns: Sequence[Buffer]) -> None:
        """Column i of ``columns`` as object i of segment ``seg``, all at once."""
        limit = trio.Semaphore(PARALLEL)

        async def one(col: int) -> None:
            async with limit:
                await self.write_whole(seg, col, columns[col])
        async with trio.open_nursery() as nursery:
            for col in range(len(columns)):
                nursery.start_soon(one, col)

    async def write_at(self, seg: int, col: int, offset: int, data: Buffer) -> None:
        oid = self.oid(seg, col)
        try:
            await self.conn.run("write", f"write {oid} at {offset}", self.conn.ioctx.write,
                                oid, bytes(data), offset)
        finally:
            self.conn.prefetch.invalidate(oid, offset, offset + len(data))

    async def append(self, seg: int, col: int, data: Buffer) -> None:
        oid = self.oid(seg, col)
        try:
            await self.conn.run("write", f"append to {oid}", self.conn.ioctx.append, oid,
                                bytes(data))
        finally:
            self.conn.prefetch.invalidate(oid)

    async def read(self, seg: int, col: int, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (invariant 2)."""
        oid = self.oid(seg, col)
        return await self.conn.run("read", f"read {oid}", _read_exact, self.conn, oid,
                                   offset, length)

    async def size(self, seg: int, col: int = 0) -> int:
        oid = self.oid(seg, col)
        size, _mtime = await self.conn.run("read", f"stat {oid}", self.conn.ioctx.stat, oid)
        return int(size)

    async def delete(self, seg: int, columns: int = 1) -> None:
        """Remove the segment's column objects (those that exist)."""
        rados = self.conn.rados

        def rm(oid: str) -> None:
            with contextlib.suppress(rados.ObjectNotFound):
                self.conn.ioctx.remove_object(oid)
        for col in range(columns):
            oid = self.oid(seg, col)
            try:
                await self.conn.run("write", f"delete {oid}", rm, oid)
            finally:
                self.conn.prefetch.invalidate(oid)

    def reader(self, seg: int, col: int, size: int) -> ObjectColumn:
        return ObjectColumn(self.conn, self.oid(seg, col), size)


def _read_exact(conn: Connection, oid: str, offset: int, length: int) -> bytes:
    data = bytes(conn.ioctx.read(oid, length, offset))
    if len(data) != length:
        raise DeviceError(f"short read of {oid}: {len(data)} of {length} bytes at {offset}")
    return data


class ObjectColumn:
    """One column object as a ``pool.device.Device``: blocking calls for worker threads
    (through ``Connection.call_blocking``: timed, refused once fenced). ``size``: the
    column's capacity (the segment size), not the object's current length."""

    def __init__(self, conn: Connection, oid: str, size: int) -> None:
        self.conn = conn
        self.oid = oid
        self._size = size

    @property
    def path(self) -> str:
        return f"rados:{self.conn.pool}/{self.oid}"

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        got = self.conn.prefetch.read(self.oid, offset, length, self._size)
        if got is not None and len(got) == length:
            return got
        try:
            return self.conn.call_blocking("read", f"read {self.oid}", _read_exact,
                                           self.conn, self.oid, offset, length)
        except (DeviceError, Fenced):
            raise
        except StorageError as e:
            raise DeviceError(e.message) from e

    def preadv_nowait(self, offset: int, buffers: Sequence[bytearray | memoryview]) -> int:
        """What the read-ahead holds (on the event loop; 0 starts a read of the range,
        which ``pread`` then waits for): prefetch invariants 1-4."""
        return self.conn.prefetch.take(self.oid, offset, buffers, self._size)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self.conn.call_blocking("write", f"write {self.oid}", self.conn.ioctx.write,
                                    self.oid, bytes(data), offset)
        except Fenced:
            raise
        except StorageError as e:
            raise DeviceError(e.message) from e
        finally:
            self.conn.prefetch.invalidate(self.oid, offset, offset + len(data))

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.pwrite(offset, b"".join(buffers))

    def sync(self) -> None:
        """Nothing to do (invariant 1)."""

    def discard(self, offset: int, length: int) -> None:
        """Nothing to do: a freed segment's objects are deleted whole."""

    def close(self) -> None:
        """The connection is the pool's; nothing of its own to close."""
