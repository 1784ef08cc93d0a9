"""The read path of a pool on RADOS: each run of records read with one asynchronous
librados read, verified on the librados thread that completes it, and handed back to the
event loop (issue 24, the seq read row).

The general read path (pool/reader.py) first tries a read on the event loop (bytes that
are already here: the page cache of a file), then reads in a worker thread. On RADOS
nothing is ever already here (unless the read-ahead, pool/rados/prefetch.py, is on), so
every read paid for an attempt that allocates its buffers and fails, twice (the frontend
asks ``read_blocks_nowait``, then ``read_blocks`` asks again), and a trio thread round
trip around a synchronous ``Ioctx.read``. ``RadosRecordReader`` instead:

- answers ``read_blocks_nowait`` from what was read ahead (below) and the record cache
  only (None as soon as a record must be read, and at once for more than two blocks
  not read ahead), without touching a buffer;
- in ``read_blocks``, plans the runs of records lying one after another in one segment
  straight from the map entries (``_plan_runs``, invariant 4; a 1 MiB read of 64 KiB
  blocks is one run) and starts one ``Ioctx.aio_read`` per run from the event loop
  (``AioReads.start``: it queues the op and returns);
- verifies each record's fragment (xxh3, ``codec.check_fragment``) in the completion,
  on the librados thread, and wakes the waiting task with ``TrioToken.run_sync_soon``;
- takes the general path for anything else: a read that failed or came back short, a
  fragment that did not verify, a fenced connection, too many bytes in flight. That path
  reads again, counts and reports the error exactly as before (and raises ``Fenced``,
  ``MediumError``), so this one never has to;
- reads ahead of sequential streams (invariant 5): after RUN requests of a map in a row
  that each start where the last one ended, the next AHEAD bytes are read (in batches of
  about BATCH bytes, a whole number of the stream's requests: one OSD op for several
  requests) before they are asked for, so the OSD works on the next requests while this
  one is sent, and a request whose batch has arrived is answered at once by
  ``read_blocks_nowait``, on the event loop, without a task.

The reads themselves (buffers, completions, the bound on bytes in flight) are
pool/rados/aioread.py's. Invariants (reader invariants 1-3, aioread invariants 1-4 and
conn invariants 1-3 hold as they are):

1. A block is returned only after its record's fragment verified (aioread invariant 1);
   if any record of a request did not, or any read failed, nothing of it is returned
   from here: the general path reads the whole request again, and reports.
2. The store's read hold (``read_hold``) is held from before the first read starts until
   every read of the request completed or the request was cancelled; a freed segment's
   object is not deleted under a read the request still waits for (reader invariant 2).
3. ``read_blocks_nowait`` never waits and never reads for its own request: it answers
   record-cache hits and holes of small reads (two blocks at most, the reads the cache
   keeps: reader invariant 3) and batches read ahead that have completed (invariant 5),
   else None. The only reads it starts are reads ahead, which it does not wait for.
4. ``_plan_runs`` plans what ``_read_plan`` and ``records._runs`` would: the same map
   entries, record-cache hits and holes, and the same runs (records one after another
   in one segment, in request order) and bytes, as plain tuples (no ``RecordPlan`` per
   block, no column lookup per record). A record in a segment that is not ``plain``
   (k = 1, m = 0) on an object column sends the whole request down the general path.
5. A block read ahead is returned only for a request whose blocks all lie in one batch,
   only if every one of the request's map entries is still the one the batch was planned
   from (a record never changes where it lies, DESIGN 3: the same entry is the same
   verified bytes; a block written, trimmed or moved since has another entry, and the
   whole request is read again), and only if every read of the batch verified
   (invariant 1). A batch holds the store's read hold (invariant 2) from before its
   first read starts until its last one completed. Bytes read ahead and not yet taken
   never exceed AHEAD_TOTAL, and at most STREAMS maps have a stream; a stream that jumps
   drops what it read ahead, and a batch goes once all its blocks were taken or the
   stream is a WINDOW past it.
"""

from __future__ import annotations

from collections import OrderedDict
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

AHEAD = 16 << 20         # bytes read ahead of a sequential stream's last request (0: off)
BATCH = 4 << 20          # bytes of one batch read ahead (a whole number of requests)
AHEAD_TOTAL = 64 << 20   # bytes read ahead and not taken yet, all streams (invariant 5)
RUN = 2                  # sequential requests in a row before reading ahead
STREAMS = 16             # maps whose stream is followed (least recently used dropped)
WINDOW = 16 << 20        # requests this far behind a stream's end are part of it


class _Ahead:
    """The blocks ``at`` .. ``at + count`` read ahead: their map entries then, the result
    with record-cache hits filled in, the batch of reads, its bytes, and how many of its
    blocks requests have not taken yet."""

    __slots__ = ("at", "batch", "count", "entries", "left", "need", "result")

    def __init__(self, at: int, count: int, entries: list[bytes | None],
                 result: list[bytes | memoryview | None], batch: Batch, need: int) -> None:
        self.at = at
        self.count = count
        self.entries = entries
        self.result = result
        self.batch = batch
        self.need = need
        self.left = count


class _Stream:
    """Where a map is being read: the end of the furthest request (a block number), how
    many requests in a row started where the last one ended, how far reads ahead were
    started, and the batches read ahead by first block."""

    __slots__ = ("ahead", "ahead_end", "end", "streak")

    def __init__(self, end: int) -> None:
        self.end = end
        self.streak = 0
        self.ahead_end = end
        self.ahead: dict[int, _Ahead] = {}


class RadosRecordReader(RecordReader):
    """``RecordReader`` for a pool on RADOS (module docstring)."""

    def __init__(self, conn: Connection, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = conn
        self._streams: OrderedDict[int, _Stream] = OrderedDict()
        self.ahead_bytes = 0            # read ahead and not taken (invariant 5)
        self.ahead_started = 0          # batches read ahead, ever
        self.ahead_taken = 0            # ... that answered a request

    def read_span_nowait(self, map_id: int, first: int, n: int, block_size: int
                         ) -> memoryview | list[bytes | memoryview | None] | None:
        # (always block by block: the read-ahead answers in blocks)
        return self.read_blocks_nowait(map_id, range(first, first + n), block_size)

    def read_blocks_nowait(self, map_id: int, blocks: Sequence[int],
                           block_size: int) -> list[bytes | memoryview | None] | None:
        if self.conn.prefetch.limit:        # the read-ahead may hold the bytes
            return super().read_blocks_nowait(map_id, blocks, block_size)
        if map_id not in self.state.maps:
            return None
        stream = self._follow(map_id, blocks, block_size)
        if stream is not None:
            ahead = _holding(stream, blocks)
            if ahead is not None and ahead.batch.done.is_set():
                result = self._take(map_id, blocks, stream, ahead)
                if result is not None:
                    return result
        if len(blocks) > 2:
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
        stream = self._follow(map_id, blocks, block_size)
        if stream is not None:
            ahead = _holding(stream, blocks)
            if ahead is not None:
                await ahead.batch.done.wait()
                self._require_map(map_id)
                result = self._take(map_id, blocks, stream, ahead)
                if result is not None:
                    return result
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

    # ---- read-ahead (invariant 5) ------------------------------------------------------
    def _follow(self, map_id: int, blocks: Sequence[int], block_size: int) -> _Stream | None:
        """Note a request of ``blocks`` of map ``map_id`` in its stream and start what
        should be read ahead of it; the stream if it has any (else None)."""
        n = len(blocks)
        if not AHEAD or not n or blocks[-1] - blocks[0] + 1 != n:
            return None
        first, end = blocks[0], blocks[-1] + 1
        streams = self._streams
        stream = streams.get(map_id)
        if stream is None:
            stream = streams[map_id] = _Stream(end)
            if len(streams) > STREAMS:
                _old, gone = streams.popitem(last=False)
                self._drop_all(gone)
            return stream
        streams.move_to_end(map_id)
        if first == stream.end:
            stream.streak += 1
            stream.end = end
            # Requests received but not yet read (several in flight) still take theirs;
            # what lies a WINDOW behind was passed by, not asked for.
            behind = end - WINDOW // block_size
            for at in [a for a, ah in stream.ahead.items() if a + ah.count <= behind]:
                self._drop(stream, at)
        elif not (stream.end - WINDOW // block_size <= first and end <= stream.end):
            # A jump: a new stream here (a request the stream already saw, e.g. asked
            # again by read_blocks after read_blocks_nowait, or one of several in flight,
            # lies behind its end and changes nothing).
            self._drop_all(stream)
            stream.streak = 0
            stream.end = stream.ahead_end = end
        if stream.streak >= RUN:
            self._read_ahead(map_id, stream, n, block_size)
        return stream

    def _read_ahead(self, map_id: int, stream: _Stream, n: int, block_size: int) -> None:
        """Start the reads of the next batches (a whole number of requests of ``n``
        blocks, about BATCH bytes) up to AHEAD bytes past the stream's end
        (invariant 5)."""
        m = max(1, BATCH // block_size // n) * n
        limit = stream.end + max(m, AHEAD // block_size)
        at = max(stream.ahead_end, stream.end)
        aio = self.conn.aio
        token: trio.lowlevel.TrioToken | None = None
        while at + m <= limit:
            planned = self._plan_runs(map_id, range(at, at + m))
            if planned is None:
                return
            entries, result, runs, need = planned
            if runs:
                if self.ahead_bytes + need > AHEAD_TOTAL or not aio.room(need):
                    return
                if token is None:
                    token = trio.lowlevel.current_trio_token()
                batch = Batch(len(runs), block_size, token, self._store.read_hold())
                for col, base, offset, units, recs in runs:
                    aio.start(col, base, offset, units, recs, batch)
                stream.ahead[at] = _Ahead(at, m, entries, result, batch, need)
                self.ahead_bytes += need
                self.ahead_started += 1
            at += m
            stream.ahead_end = at

    def _take(self, map_id: int, blocks: Sequence[int], stream: _Stream,
              ahead: _Ahead) -> list[bytes | memoryview | None] | None:
        """The result of ``blocks`` (all in ``ahead``'s) from what was read ahead of
        them, if each entry is still the one it was read for and every read of the batch
        verified; else None (invariant 5). A batch whose blocks were all taken goes."""
        if ahead.batch.failed:
            return None
        n = len(blocks)
        lo = blocks[0] - ahead.at
        entries = self.state.forest.get_range(map_id, blocks[0], n)
        if entries != ahead.entries[lo:lo + n]:
            return None
        result = ahead.result[lo:lo + n]
        got = ahead.batch.payloads.get
        payloads: dict[int, bytes | memoryview] = {}
        for i in range(n):
            data = got(lo + i)
            if data is not None:
                payloads[i] = data
        self._keep(records.ReadOutcome(payloads=payloads), entries, result)
        self.ahead_taken += 1
        ahead.left -= n
        if ahead.left <= 0 and stream.ahead.get(ahead.at) is ahead:
            self._drop(stream, ahead.at)
        return result

    def _drop(self, stream: _Stream, at: int) -> None:
        ahead = stream.ahead.pop(at)
        self.ahead_bytes -= ahead.need

    def _drop_all(self, stream: _Stream) -> None:
        for at in list(stream.ahead):
            self._drop(stream, at)


def _holding(stream: _Stream, blocks: Sequence[int]) -> _Ahead | None:
    """The batch of ``stream`` that holds all of ``blocks`` (contiguous), if any."""
    first, end = blocks[0], blocks[-1] + 1
    for ahead in stream.ahead.values():
        if ahead.at <= first and end <= ahead.at + ahead.count:
            return ahead
    return None

