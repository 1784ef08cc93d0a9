"""The read path of a pool on RADOS: each run of records read with one asynchronous
librados read, verified on the librados thread that completes it, and handed back to the
event loop (issue 24, the seq read row).

The general read path (pool/reader.py) first tries a read on the event loop (bytes that
are already here: the page cache of a file), then reads in a worker thread. On RADOS
nothing is ever already here (unless the read-ahead, pool/rados/prefetch.py, is on), so
every read paid for an attempt that allocates its buffers and fails, twice (the frontend
asks ``read_blocks_nowait``, then ``read_blocks`` asks again), and a trio thread round
trip around a synchronous ``Ioctx.read``. ``RadosRecordReader`` instead:

- answers ``read_blocks_nowait`` from the record cache only (None as soon as a record
  must be read, and at once for more than two blocks), without touching a buffer;
- in ``read_blocks``, starts one ``Ioctx.aio_read`` per run of records lying one after
  another in one segment (``records._runs``; a 1 MiB read of 64 KiB blocks is one run),
  from the event loop (``AioReads.start``: it queues the op and returns);
- verifies each record's fragment (xxh3, ``codec.check_fragment``) in the completion,
  on the librados thread, and wakes the waiting task with ``TrioToken.run_sync_soon``;
- takes the general path for anything else: a read that failed or came back short, a
  fragment that did not verify, a fenced connection, too many bytes in flight. That path
  reads again, counts and reports the error exactly as before (and raises ``Fenced``,
  ``MediumError``), so this one never has to.

The reads themselves (buffers, completions, the bound on bytes in flight) are
pool/rados/aioread.py's. Invariants (reader invariants 1-3, aioread invariants 1-4 and
conn invariants 1-3 hold as they are):

1. A block is returned only after its record's fragment verified (aioread invariant 1);
   if any record of a request did not, or any read failed, nothing of it is returned
   from here: the general path reads the whole request again, and reports.
2. The store's read hold (``read_hold``) is held from before the first read starts until
   every read of the request completed or the request was cancelled; a freed segment's
   object is not deleted under a read the request still waits for (reader invariant 2).
3. ``read_blocks_nowait`` never reads: record-cache hits and holes of small reads (two
   blocks at most, the reads the cache keeps: reader invariant 3) only, else None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from pool import records
from pool.layout import SECTOR
from pool.rados.aioread import Batch
from pool.reader import RecordReader

if TYPE_CHECKING:
    from pool.rados.conn import Connection


class RadosRecordReader(RecordReader):
    """``RecordReader`` for a pool on RADOS (module docstring)."""

    def __init__(self, conn: Connection, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = conn

    def read_blocks_nowait(self, map_id: int, blocks: Sequence[int],
                           block_size: int) -> list[bytes | memoryview | None] | None:
        if self.conn.prefetch.limit:        # the read-ahead may hold the bytes
            return super().read_blocks_nowait(map_id, blocks, block_size)
        if map_id not in self.state.maps or len(blocks) > 2:
            # Only small reads enter the record cache (reader invariant 3): a larger one
            # would look every block up here and then again in ``read_blocks``.
            return None
        _entries, result, plans = self._read_plan(map_id, blocks)
        if plans:
            return None
        return result

    async def read_blocks(self, map_id: int, blocks: Sequence[int],
                          block_size: int) -> list[bytes | memoryview | None]:
        if self.conn.prefetch.limit:
            return await super().read_blocks(map_id, blocks, block_size)
        entries, result, plans = self._plan_existing(map_id, blocks)
        if not plans:
            return result
        aio = self.conn.aio
        runs = list(records._runs(plans))
        need = sum(p.units for p in plans) * SECTOR
        if any(p.k != 1 or p.m != 0 or p.columns[0][0] is None for p in plans) \
                or not aio.room(need):
            return await super().read_blocks(map_id, blocks, block_size)
        batch = Batch(len(runs), block_size, trio.lowlevel.current_trio_token())
        hold = self._store.read_hold()
        try:
            for run in runs:
                col, base, _name = run[0].columns[0]
                aio.start(col, base, run, batch)  # type: ignore[arg-type]
            await batch.done.wait()
        finally:
            hold.release()
        if batch.failed:
            return await super().read_blocks(map_id, blocks, block_size)
        self._keep(records.ReadOutcome(payloads=batch.payloads), entries, result)
        return result
