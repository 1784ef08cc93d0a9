"""Read-ahead of segment objects with librados asynchronous reads (issue 24, the read rows).

The record reader (pool/records.py) reads a column as a device: first ``preadv_nowait``
on the event loop (bytes that are already here, like the page cache of a file), then, if
that cannot answer, ``pread`` from a worker thread. On RADOS nothing was ever "already
here", so every read took two thread hops and one synchronous ``Ioctx.read``. A
``Prefetcher`` gives ``ObjectColumn`` a page cache of its own:

- **Sequential streams.** After RUN reads of an object in a row that each start where
  the previous one ended, and on every read the read-ahead answered, the read-ahead
  reaches past the read's end: CHUNK bytes, doubling with each such read up to AHEAD,
  in ``Ioctx.aio_read`` calls of the stream's own read size (CHUNK for small reads).
  Later reads of the stream find their bytes here and are answered on the event loop
  (``take``), with no thread hop; a read whose bytes are still on their way waits for
  them in its worker thread (``read``) instead of reading them a second time.
- **A miss** (MISS_AHEAD, off: measured costlier) could start an asynchronous read of
  exactly the range asked for, for the worker thread to wait for.

Invariants:

1. No librados call on the event loop (conn invariant 1): ``aio_read`` is called by one
   submitter thread (or by the worker thread that already runs ``read``); the event loop
   only queues requests. Completions arrive on a librados thread and touch only this
   module's state, under its lock (never trio's).
2. Bounded memory: the bytes of pending and held chunks never exceed LIMIT; held chunks
   are dropped when every byte was read once, least recently used first when room is
   needed, and at once when their object is written or deleted.
3. Never stale: a chunk overlapping a range written (``invalidate``, called when a write
   of the range completed) or an object deleted is dropped (or, if its read is still in
   flight, marked stale and dropped when it completes), so no byte read before a write
   completed is served after it. Object numbers are never reused (store invariant 2).
4. Never unverified, never made up: bytes served here go to the record reader, which
   checks every fragment's xxh3 before use, exactly as for a device read; a short or
   failed asynchronous read serves nothing past what it returned (python-rados hands a
   0-byte read's buffer back uninitialised, so the length is the completion's return
   value, never ``len(data)``), and the caller reads synchronously instead, which
   reports the error as before (ENOENT, EIO, fenced: conn invariants 3-4).
5. Cancellation is safe: the buffer a completion fills is the binding's own, referenced
   by its completion until it fires; callers only ever receive copies made under the
   lock. ``close`` waits for every read in flight before the ioctx goes.
6. Every asynchronous read lands in the connection's ``read`` histogram (conn invariant
   2), failed ones as failures; a fenced connection starts none and serves nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pool.rados.conn import Connection

log = logging.getLogger(__name__)
CHUNK = 1 << 20          # bytes per read-ahead request
AHEAD = 8 << 20          # how far a sequential stream is read ahead of its last read
# Bytes pending or held at once, per connection (invariant 2); 0 turns read-ahead off.
# Off by default: in paired in-process rounds (1 MiB reads at QD4, record cache off,
# load 13-22 on 2 cores) it cost 5-20% more CPU per read and gave no more MB/s than
# the worker thread's synchronous read (docs/INTERNALS.md "RADOS backend"). ENABLED
# is the value to measure it with (benchmarks.rbd --readahead).
LIMIT = 0
ENABLED = 48 << 20
STREAMS = 256            # objects whose last read end is remembered
RUN = 2                  # sequential reads in a row that start read-ahead
# Whether a miss on the event loop starts a read of its own range for the worker thread
# to wait for. Measured (in-process 4K reads at QD16, record cache off): 20-40% more CPU
# per read than the worker's synchronous read (two more GIL handoffs: the submitter and
# the completion), for no gain in IOPS; so off.
MISS_AHEAD = False
WAIT = 30.0              # seconds ``read`` waits for a completion before reading itself


class Chunk:
    """Bytes [start, end) of object ``oid``: pending until ``event`` is set."""

    __slots__ = ("ahead", "data", "done", "end", "event", "oid", "seen", "stale", "start",
                 "t0", "used")

    def __init__(self, oid: str, start: int, end: int, ahead: bool) -> None:
        self.ahead = ahead            # read ahead of a stream (else: a miss's own range)
        self.oid = oid
        self.start = start
        self.end = end
        self.data: bytes = b""
        self.done = False
        self.stale = False
        self.used = 0                 # bytes read out of it so far
        self.event = threading.Event()
        self.t0 = time.perf_counter()
        self.seen = 0.0               # last use, for LRU eviction

    @property
    def size(self) -> int:
        return self.end - self.start


class Prefetcher:
    """The read-ahead of one connection (``Connection.prefetch``)."""

    def __init__(self, conn: Connection, *, limit: int | None = None, ahead: int = AHEAD,
                 chunk: int = CHUNK) -> None:
        self.conn = conn
        self.limit = LIMIT if limit is None else limit      # 0: no read-ahead at all
        self.ahead = ahead
        self.chunk = chunk
        self.lock = threading.Lock()
        self.chunks: dict[str, list[Chunk]] = {}      # by object, sorted by start
        # per object: the last read's start and end, and how many reads in a row were
        # sequential (the record reader tries a range up to three times: twice on the
        # event loop, then from its worker thread)
        self.last_end: dict[str, tuple[int, int, int]] = {}
        self.held = 0                                 # bytes of pending and held chunks
        self.pending = 0                              # reads in flight
        self.hits = self.misses = self.issued = 0
        self._queue: queue.SimpleQueue[list[Chunk] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- the two ways in: the event loop (take) and a worker thread (read) --------------
    def take(self, oid: str, offset: int, buffers: Sequence[bytearray | memoryview],
             size: int) -> int:
        """Fill ``buffers`` from bytes held here (on the event loop): their total length,
        or 0 (with MISS_AHEAD, an asynchronous read of what no chunk covers is started
        then). Either way the read counts for the stream's read-ahead. ``size``: the
        object's capacity (read-ahead stops there). Off (``limit`` 0): 0 at once."""
        if not self.limit or self.conn.fenced is not None:
            return 0
        n = sum(len(b) for b in buffers)
        if n == 0:
            return 0
        submit: list[Chunk] = []
        with self.lock:
            got, ahead = self._serve(oid, offset, n)
            self._extend(oid, offset, n, size, ahead, submit)
            if got is None and MISS_AHEAD:
                for lo, hi in self._gaps(oid, offset, offset + n):
                    c = self._add(oid, lo, hi, False)
                    if c is None:
                        break
                    submit.append(c)
        if submit:
            self._queue_submit(submit)
        if got is None:
            self.misses += 1
            return 0
        self.hits += 1
        _scatter(got, buffers)
        return n

    def read(self, oid: str, offset: int, length: int, size: int) -> bytes | None:
        """The range from bytes held or pending here (in a worker thread: waits for a
        pending read), else None: the caller reads it itself."""
        if not self.limit or self.conn.fenced is not None or length == 0:
            return None
        submit: list[Chunk] = []
        with self.lock:
            got, ahead = self._serve(oid, offset, length)
            self._extend(oid, offset, length, size, ahead, submit)
            waits = [] if got is not None else [
                c.event for c in self.chunks.get(oid, ())
                if not c.done and c.start < offset + length and c.end > offset]
        for c in submit:
            self._submit(c)
        if got is None and waits:
            deadline = time.monotonic() + WAIT
            for ev in waits:
                ev.wait(max(0.0, deadline - time.monotonic()))
            with self.lock:
                got, _ahead = self._serve(oid, offset, length)
        if got is None:
            self.misses += 1
            return None
        self.hits += 1
        if len(got) == 1:
            whole = got[0].obj
            return whole if isinstance(whole, bytes) and len(whole) == length else \
                got[0].tobytes()
        return b"".join(got)

    # ---- writes and deletes (invariant 3) -----------------------------------------------
    def invalidate(self, oid: str, start: int = 0, end: int | None = None) -> None:
        """Forget what is held of ``oid`` in [start, end) (all of it for None): called
        once a write of that range (or the object's delete) completed."""
        with self.lock:
            chunks = self.chunks.get(oid)
            if end is None:
                self.last_end.pop(oid, None)
            if not chunks:
                return
            keep = []
            for c in chunks:
                if c.start < (end if end is not None else c.end) and c.end > start:
                    if c.done:
                        self.held -= c.size
                        continue
                    c.stale = True
                keep.append(c)
            self._set(oid, keep)

    # ---- inside the lock ----------------------------------------------------------------
    def _set(self, oid: str, chunks: list[Chunk]) -> None:
        if chunks:
            self.chunks[oid] = chunks
        else:
            self.chunks.pop(oid, None)

    def _serve(self, oid: str, offset: int, n: int
               ) -> tuple[list[memoryview] | None, bool]:
        """Views of the bytes [offset, offset + n) if done chunks hold all of them
        (marked used; chunks read to the last byte are dropped), else None; and whether
        read-ahead answered (some of) it. A chunk's bytes never change, so the views stay
        right after the lock is let go."""
        chunks = self.chunks.get(oid)
        if not chunks:
            return None, False
        end = offset + n
        parts: list[memoryview] = []
        at = offset
        hit: list[tuple[Chunk, int]] = []
        for c in chunks:
            if c.end <= at or c.stale:
                continue
            if c.start > at or not c.done:
                return None, False
            hi = min(end, c.end)
            parts.append(memoryview(c.data)[at - c.start:hi - c.start])
            hit.append((c, hi - at))
            at = hi
            if at >= end:
                break
        if at < end:
            return None, False
        now = time.monotonic()
        gone = False
        for c, used in hit:
            c.used += used
            c.seen = now
            gone |= c.used >= c.size
        behind = offset - self.ahead        # done chunks a stream passed long ago
        gone |= chunks[0].end <= behind and chunks[0].done
        if gone:
            keep = []
            for c in chunks:
                if c.done and (c.used >= c.size or c.end <= behind):
                    self.held -= c.size
                else:
                    keep.append(c)
            self._set(oid, keep)
        return parts, any(c.ahead for c, _used in hit)

    def _gaps(self, oid: str, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) no chunk (pending or done, not stale) covers."""
        out = []
        at = start
        for c in self.chunks.get(oid, ()):
            if c.end <= at or c.stale:
                continue
            if c.start >= end:
                break
            if c.start > at:
                out.append((at, c.start))
            at = c.end
            if at >= end:
                return out
        if at < end:
            out.append((at, end))
        return out

    def _extend(self, oid: str, offset: int, n: int, size: int, hit: bool,
                submit: list[Chunk]) -> None:
        """Remember where this read ended; a stream of reads that each start where the
        last ended (RUN of them: random reads meet a neighbour now and then) or one that
        read-ahead answered reads on past its end: CHUNK bytes, doubling with each such
        read up to AHEAD."""
        end = offset + n
        first, last, run = self.last_end.pop(oid, (-1, -1, 0))
        if (offset, end) != (first, last):       # not the same read tried again
            run = run + 1 if hit or last == offset else 0
        self.last_end[oid] = (offset, end, run)
        if len(self.last_end) > STREAMS:
            del self.last_end[next(iter(self.last_end))]
        if run < RUN:
            return
        chunks = self.chunks.get(oid, ())
        frontier = max([end, *(c.end for c in chunks if not c.stale)])
        want = min(size, end + min(self.ahead, self.chunk << min(run - RUN, 8)))
        # Steps of the stream's own read size when it is large: each later read is then
        # one whole chunk (no read waits on two, none is joined from pieces).
        step = n if self.chunk // 4 <= n <= 4 * self.chunk else self.chunk
        while frontier < want:
            c = self._add(oid, frontier, min(size, frontier + step), True)
            if c is None:
                return
            submit.append(c)
            frontier = c.end

    def _add(self, oid: str, start: int, end: int, ahead: bool) -> Chunk | None:
        """A new pending chunk, if room can be made for it (invariant 2)."""
        if self._closed:
            return None
        size = end - start
        if self.held + size > self.limit:
            self._evict(self.held + size - self.limit)
            if self.held + size > self.limit:
                return None
        c = Chunk(oid, start, end, ahead)
        chunks = self.chunks.setdefault(oid, [])
        i = len(chunks)
        while i and chunks[i - 1].start > start:
            i -= 1
        chunks.insert(i, c)
        self.held += size
        self.pending += 1
        self.issued += 1
        return c

    def _evict(self, need: int) -> None:
        done = sorted((c for cs in self.chunks.values() for c in cs if c.done),
                      key=lambda c: c.seen)
        freed = 0
        for c in done:
            if freed >= need:
                break
            cs = self.chunks[c.oid]
            cs.remove(c)
            self._set(c.oid, cs)
            self.held -= c.size
            freed += c.size

    # ---- submission and completion (invariants 1, 4, 5, 6) ------------------------------
    def _queue_submit(self, chunks: list[Chunk]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._submitter, daemon=True,
                                            name="storaged-rados-prefetch")
            self._thread.start()
        self._queue.put(chunks)

    def _submitter(self) -> None:
        while True:
            chunks = self._queue.get()
            if chunks is None:
                return
            for c in chunks:
                self._submit(c)

    def _submit(self, c: Chunk) -> None:
        c.t0 = time.perf_counter()
        if self.conn.fenced is None:
            try:
                self.conn.ioctx.aio_read(c.oid, c.size, c.start,
                                         lambda comp, data: self._complete(c, comp, data))
                return
            except Exception as e:          # the caller reads the range itself
                log.debug("read-ahead of %s at %d not started: %s", c.oid, c.start, e)
        self._finish(c, None)

    def _complete(self, c: Chunk, comp: Any, data: Any) -> None:
        try:
            rv = int(comp.get_return_value())
            self.conn.observe("read", time.perf_counter() - c.t0, rv >= 0)
            self._finish(c, bytes(data[:rv]) if rv > 0 and data is not None else None)
        except BaseException:               # a librados thread: never let it die
            log.exception("read-ahead completion of %s", c.oid)
            self._finish(c, None)

    def _finish(self, c: Chunk, data: bytes | None) -> None:
        with self.lock:
            if c.done:
                return
            c.done = True
            self.pending -= 1
            chunks = self.chunks.get(c.oid, [])
            if data is None or c.stale:
                if c in chunks:
                    chunks.remove(c)
                    self._set(c.oid, chunks)
                self.held -= c.size
            else:
                c.data = data
                c.seen = time.monotonic()
                if len(data) < c.size:            # short: past the object's end
                    self.held -= c.size - len(data)
                    c.end = c.start + len(data)
                    if not data and c in chunks:
                        chunks.remove(c)
                        self._set(c.oid, chunks)
        c.event.set()

    def close(self, timeout: float = WAIT) -> None:
        """Start nothing more; wait (blocking: from a worker thread) for every read in
        flight (invariant 5), then drop what is held."""
        with self.lock:
            self._closed = True
            waits = [c.event for cs in self.chunks.values() for c in cs if not c.done]
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        for ev in waits:
            ev.wait(max(0.0, deadline - time.monotonic()))
        with self.lock:
            self.chunks.clear()
            self.last_end.clear()
            self.held = 0


def _scatter(parts: Sequence[memoryview], buffers: Sequence[bytearray | memoryview]) -> None:
    """Copy the concatenation of ``parts`` into ``buffers`` (the same total length)."""
    pi, po = 0, 0
    for b in buffers:
        dst = memoryview(b).cast("B")
        bo = 0
        while bo < len(dst):
            part = parts[pi]
            k = min(len(dst) - bo, len(part) - po)
            dst[bo:bo + k] = part[po:po + k]
            bo += k
            po += k
            if po == len(part):
                pi, po = pi + 1, 0
