"""Asynchronous record reads on RADOS for the pool's read path (pool/rados/reader.py):
one ``Ioctx.aio_read`` per run of records, verified on the librados thread that completes
it, the waiting task woken with ``TrioToken.run_sync_soon``.

Invariants:

1. A block is kept (``Batch.payloads``) only after its record's fragment verified: its
   header names this record and its xxh3 matches; otherwise the batch is marked failed
   and its caller takes the general read path for the whole request.
2. The bytes a completion fills are the binding's own (python-rados allocates the buffer
   and keeps it, with the completion, until the callback ran); a cancelled caller only
   stops waiting, and a late completion touches only its own ``Batch``. ``close`` waits
   for every read in flight before the ioctx goes (``Connection.close``).
3. Reads in flight never exceed LIMIT bytes and about OPS ops (a request that would
   pass either takes the general path). With the client's objecter throttle set far above
   all the client ever has in flight (``Connection.open``: THROTTLE_BYTES, THROTTLE_OPS),
   ``aio_read`` only queues the op: it never waits on the throttle or on an OSD on the
   event loop (conn invariant 1).
4. Every asynchronous read lands in the connection's ``read`` histogram once, from its
   completion, failed ones as failures (conn invariant 2); none starts once fenced or
   closed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from pool import codec
from pool.layout import SECTOR

if TYPE_CHECKING:
    from pool.rados.conn import Connection
    from pool.rados.segments import ObjectColumn
    from pool.store import ReadHold

log = logging.getLogger(__name__)
LIMIT = 32 << 20         # bytes of asynchronous reads in flight at once (invariant 3)
OPS = 1024               # asynchronous reads in flight at once (invariant 3)
WAIT = 30.0              # seconds ``close`` waits for reads in flight

# One record of a run to read, as the read path plans it (pool/rados/reader.py): its slot
# in the request, the sectors it takes, its payload's length, flags and xxh3. A plain
# tuple: one is made per block read, on the event loop.
Record = tuple[int, int, int, int, int]


class Batch:
    """The asynchronous reads of one request: what each run verified, and how many are
    still in flight. Touched by completions (librados threads) under ``lock``."""

    __slots__ = ("block_size", "done", "failed", "hold", "left", "lock", "payloads", "token")

    def __init__(self, runs: int, block_size: int, token: trio.lowlevel.TrioToken,
                 hold: ReadHold | None = None) -> None:
        self.left = runs
        self.block_size = block_size
        self.token = token
        self.failed = False
        self.payloads: dict[int, bytes | memoryview] = {}
        self.lock = threading.Lock()
        self.done = trio.Event()
        # A read ahead (pool/rados/reader.py invariant 5) holds the store's read hold
        # until its last read completed, whether or not a request ever takes it.
        self.hold = hold

    def complete(self) -> None:
        """The last read completed: on the event loop (``_finish``)."""
        self.done.set()
        if self.hold is not None:
            self.hold.release()
            self.hold = None


class AioReads:
    """The asynchronous record reads of one connection (``Connection.aio``)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.bytes = 0                   # bytes of reads in flight (invariant 3)
        self.pending = 0                 # reads in flight
        self.started = 0                 # reads started, ever
        self.idle = threading.Condition(self.lock)
        self.closed = False

    def room(self, n: int) -> bool:
        """Whether reads of ``n`` more bytes (one request's runs, at most a few) may start
        now (invariant 3)."""
        return (not self.closed and self.conn.fenced is None and self.bytes + n <= LIMIT
                and self.pending < OPS)

    def start(self, col: ObjectColumn, base: int, offset: int, units: int,
              recs: Sequence[Record], batch: Batch) -> None:
        """Start the read of ``units`` sectors at sector ``offset`` of the column object
        ``col`` (whose bytes start at ``base``): the records ``recs``, one after another,
        to be verified into ``batch`` by its completion. On the event loop."""
        start = base + offset * SECTOR
        n = units * SECTOR
        with self.lock:
            self.bytes += n
            self.pending += 1
            self.started += 1
        t0 = time.perf_counter()

        def complete(comp: Any, data: Any) -> None:
            try:
                rv = int(comp.get_return_value())
                self.conn.observe("read", time.perf_counter() - t0, rv >= 0)
                ok = rv >= n and data is not None and _verify(
                    memoryview(data)[:n], recs, batch)
            except BaseException:       # a librados thread: never let it die
                log.exception("asynchronous read of %s", col.oid)
                ok = False
            finally:
                self._ended(n)
            _finish(batch, ok)
        try:
            self.conn.ioctx.aio_read(col.oid, n, start, complete)
        except Exception as e:          # the general path reads (and reports) it
            log.debug("asynchronous read of %s at %d not started: %s", col.oid, start, e)
            self._ended(n)
            _finish(batch, False)

    def _ended(self, n: int) -> None:
        """A read of ``n`` bytes is no longer in flight (invariant 3)."""
        with self.lock:
            self.bytes -= n
            self.pending -= 1
            if not self.pending:
                self.idle.notify_all()

    def close(self, timeout: float = WAIT) -> None:
        """Start nothing more; wait (blocking: from a worker thread) for every read in
        flight (invariant 2)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.closed = True
            while self.pending and time.monotonic() < deadline:
                self.idle.wait(max(0.0, deadline - time.monotonic()))


def _verify(view: memoryview, recs: Sequence[Record], batch: Batch) -> bool:
    """Check each record of ``recs`` in ``view`` (their bytes, back to back) and keep its
    logical block in ``batch``; False at the first one that does not verify
    (invariant 1). On a librados thread."""
    out: dict[int, bytes | memoryview] = {}
    pos = 0
    bs = batch.block_size
    check = codec.check_fragment
    expand = codec.expand
    for slot, units, plen, flags, rhash in recs:
        end = pos + units * SECTOR
        chunk = check(view[pos:end], 0, 1, 0, plen, rhash)
        if chunk is None:
            return False
        out[slot] = expand(chunk[:plen], flags, bs)
        pos = end
    with batch.lock:
        batch.payloads.update(out)
    return True


def _finish(batch: Batch, ok: bool) -> None:
    with batch.lock:
        batch.failed |= not ok
        batch.left -= 1
        last = batch.left == 0
    if last:
        with contextlib.suppress(trio.RunFinishedError):   # nobody waits any more
            batch.token.run_sync_soon(batch.complete)


