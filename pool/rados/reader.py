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
- in ``read_blocks``, plans the runs of records lying one after another in one segment
  straight from the map entries (``_plan_runs``, invariant 4; a 1 MiB read of 64 KiB
  blocks is one run) and starts one ``Ioctx.aio_read`` per run from the event loop
  (``AioReads.start``: it queues the op and returns);
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
4. ``_plan_runs`` plans what ``_read_plan`` and ``records._runs`` would: the same map
   entries, record-cache hits and holes, and the same runs (records one after another
   in one segment, in request order) and bytes, as plain tuples (no ``RecordPlan`` per
   block, no column lookup per record). A record in a segment that is not ``plain``
   (k = 1, m = 0) on an object column sends the whole request down the general path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from pool import records
from pool.codec import HEADER_SIZE
from pool.layout import SECTOR
from pool.rados.aioread import Batch, Record
from pool.rados.segments import ObjectColumn
from pool.reader import RecordReader
from pool.state import ENTRY

if TYPE_CHECKING:
    from pool.rados.conn import Connection

# One asynchronous read: the column object, its base, the first sector, the sectors, and
# the records it holds.
_Run = tuple[ObjectColumn, int, int, int, list[Record]]


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
        planned = self._plan_runs(map_id, blocks)
        if planned is None:
            return await super().read_blocks(map_id, blocks, block_size)
        entries, result, runs, need = planned
        if not runs:
            return result
        aio = self.conn.aio
        if not aio.room(need):
            return await super().read_blocks(map_id, blocks, block_size)
        batch = Batch(len(runs), block_size, trio.lowlevel.current_trio_token())
        hold = self._store.read_hold()
        try:
            for col, base, offset, units, recs in runs:
                aio.start(col, base, offset, units, recs, batch)
            await batch.done.wait()
        finally:
            hold.release()
        if batch.failed:
            return await super().read_blocks(map_id, blocks, block_size)
        self._keep(records.ReadOutcome(payloads=batch.payloads), entries, result)
        return result

    def _plan_runs(self, map_id: int, blocks: Sequence[int]) -> tuple[
            list[bytes | None], list[bytes | memoryview | None], list[_Run], int] | None:
        """``_read_plan`` for this path (invariant 4): the map entries of ``blocks``, the
        result with record-cache hits filled in, the runs to read (records one after
        another in one segment, in request order, as ``records._runs`` makes them) and
        their bytes; None if a record lies in a segment this path cannot read (not
        ``plain``, or no object column). NotFound if the map was deleted."""
        state = self.state
        self._require_map(map_id)
        forest = state.forest
        n = len(blocks)
        entries: list[bytes | None]
        if n == 1:
            entries = [forest.get(map_id, blocks[0])]
        elif n and blocks[-1] - blocks[0] + 1 == n:
            entries = forest.get_range(map_id, blocks[0], n)
        else:
            entries = [forest.get(map_id, b) for b in blocks]
        result: list[bytes | memoryview | None] = [None] * n
        cached = self.cache.get
        unpack = ENTRY.unpack
        segments = state.segments
        columns = self._store.columns
        runs: list[_Run] = []
        recs: list[Record] = []     # the records of the run being built
        col: ObjectColumn | None = None
        cur = end = -1              # its segment and next sector
        base = first = need = 0
        for slot, raw in enumerate(entries):
            if raw is None:
                continue
            hit = cached(raw)
            if hit is not None:
                result[slot] = hit
                continue
            seg_id, off, plen, flags, rhash = unpack(raw)
            units = -(-(HEADER_SIZE + plen) // SECTOR)      # k = 1: the whole payload
            if seg_id == cur and off == end:
                recs.append((slot, units, plen, flags, rhash))
                end += units
                continue
            if col is not None:
                runs.append((col, base, first, end - first, recs))
                need += (end - first) * SECTOR
            seg = segments[seg_id]
            if seg.k != 1 or seg.m != 0:
                return None
            dev, base, _name = columns(seg)[0]
            if not isinstance(dev, ObjectColumn):
                return None
            col, recs = dev, [(slot, units, plen, flags, rhash)]
            cur, first, end = seg_id, off, off + units
        if col is not None:
            runs.append((col, base, first, end - first, recs))
            need += (end - first) * SECTOR
        return entries, result, runs, need
