"""Rebuild (resilver): write back the fragments a present member lacks.

A member's ``marks`` (pool.state.MemberInfo) say which segments, from which sector on, may
lack its fragments: everything, for a replacement device (``Pool.replace_device``); only
what was written while it was away, for a member back from offline or a fault
(``Pool.online``). For each marked segment the rebuild reads k fragments of every live
record at or after the mark from the other members (one read per column per run),
rebuilds the member's fragment, writes it, and journals ``member_clean`` once the segment
is done. The commit that carries it syncs the member first (invariant 1), so a crash
leaves the mark in place and the rebuild resumes there after the import.

Nothing here holds a lock: a segment is pinned (not freed, its extents not reused) while
its records are read and written, and new writes reach the member directly because it is
present. Reads skip a marked member's column until the segment is clean.

``run`` is a pipeline that keeps the order (a segment is marked only after all its
writes): the next steps' reads are in flight while one step is verified and rebuilt and
the last one written. The verifying runs in the pool's maintenance thread
(``Pool.maintenance``, held for the whole run: a scrub waits), and while no volume has
read or written a record for IDLE_AFTER seconds in a second thread too; so a rebuild under
foreground I/O leaves the other core to the foreground, an idle one uses both. It may
also be throttled to a byte rate (``faults.rebuild_rate``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import trio

from pool import records
from pool.codec import fragment_units
from pool.deadlines import Deadlines
from pool.device import Device
from pool.layout import SECTOR
from pool.lookup import locate, segment_records
from pool.pool import Pool
from pool.state import ENTRY, Segment
from pool.store import Column

log = logging.getLogger(__name__)
RUN_BYTES = 4 << 20        # records read per step (per column): small steps, fair to I/O
COMMIT_EVERY = 1.0         # seconds between commits of finished segments


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    member: int
    done_bytes: int          # bytes of the member's column worked off
    total_bytes: int
    rate: float              # bytes/s
    eta: float | None        # seconds


def pending(pool: Pool) -> list[tuple[int, int, int]]:
    """(member, segment, first sector) of all rebuild work on present members."""
    return [(mi.index, seg, start) for mi in pool.state.members
            if pool.devices[mi.index] is not None for seg, start in sorted(mi.marks.items())
            if seg in pool.state.segments]


@dataclass(slots=True)
class _Segment:
    """One marked segment of one member, as it goes through the stages of ``run``."""

    index: int
    seg_id: int
    dev: Device
    column: int
    epoch: int              # the member's epoch when the segment's reads began


@dataclass(slots=True)
class _Step:
    seg: _Segment
    batch: Sequence[bytes]          # map entries
    size: int                       # their bytes per column
    plans: list[records.RecordPlan]
    reads: records.StripeReads | None = None
    out: records.StripeOutcome | None = None


# What flows from stage to stage: a step, or the end of a segment (all its steps sent).
_Item = _Step | _Segment
AHEAD = 4   # items between the read and the write stage (each step holds k * RUN_BYTES)
IDLE_AFTER = 0.1   # seconds without volume I/O after which the rebuild takes both cores


class _Verifier:
    """The verify stage: a thread (``Pool.maintenance``) that verifies the steps the read
    stage queues, one after the other, and hands each result to the trio loop without
    waiting for it (a thread hop per step left the thread idle for milliseconds each
    time); while the pool is idle (``idle`` set), a second thread takes steps too (zfec
    releases the GIL: the rebuild then uses both cores). Results reach ``send`` in the
    order the steps were queued."""

    def __init__(self, send: trio.MemorySendChannel[_Item | BaseException],
                 deadlines: Deadlines) -> None:
        self.deadlines = deadlines
        self.inbox: queue.SimpleQueue[tuple[int, _Item] | None] = queue.SimpleQueue()
        self.idle = threading.Event()
        self._queued = itertools.count()
        self._ready: dict[int, _Item] = {}
        self._next = 0
        self.stopping = False
        self._abort = False
        self._send = send
        self._token = trio.lowlevel.current_trio_token()

    def put(self, item: _Item) -> None:
        self.inbox.put((next(self._queued), item))

    def stop(self, *, abort: bool = False) -> None:
        """No more steps come: let the threads end once the queued ones are verified (with
        ``abort``: after their current step; the rest is dropped)."""
        self.stopping = True
        self._abort = self._abort or abort
        self.inbox.put(None)
        self.inbox.put(None)
        self.idle.set()

    def run(self, spare: bool = False) -> None:
        while True:
            if spare:
                while not self.idle.wait(0.05):
                    pass
                if self.stopping:
                    return          # what is queued is the main thread's
            got = self.inbox.get()
            if got is None or self._abort:
                return
            seq, item = got
            if isinstance(item, _Step):
                try:
                    item.out = records.verify_stripes(item.plans, self.deadlines,
                                                      target=item.seg.column,
                                                      reads=item.reads)
                except Exception as e:      # re-raised by the write stage
                    self._token.run_sync_soon(self._failed, e)
                    return
                item.reads = None
            self._token.run_sync_soon(self._deliver, seq, item)

    def _deliver(self, seq: int, item: _Item) -> None:
        # There is room: the read stage took a slot for it. A closed channel: the write
        # stage is gone (the run is ending).
        self._ready[seq] = item
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while self._next in self._ready:
                self._send.send_nowait(self._ready.pop(self._next))
                self._next += 1

    def _failed(self, e: BaseException) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._send.send_nowait(e)


async def run(pool: Pool, *, rate: float | None = None,
              progress: Callable[[RebuildProgress], Awaitable[None]] | None = None) -> int:
    """Work off every present member's marks; returns the bytes of fragments rebuilt.
    ``rate``: at most this many bytes per second read (None: as fast as it goes).

    Three stages run at once and keep the order: *read* (on the event loop) pins each
    segment and starts the reads of its steps' columns (``records.start_stripes``), at
    most AHEAD items ahead of the writes; *verify* (``_Verifier``: one thread, two while
    the pool is idle) waits for them, checks them and computes the member's fragments
    (``records.verify_stripes``); *write* writes them (``RecordReader.repair``) and, once
    a segment's last step is written, unpins it and marks it rebuilt (``member_clean``,
    made durable by a later commit that syncs the member first). So later steps are read
    and verified while one is written, and a segment is marked only after all its writes.
    """
    work = pending(pool)
    if not work:
        return 0
    seg_fill = {seg: pool.state.segments[seg].fill for _i, seg, _s in work}
    total = sum(max(0, seg_fill[seg] - start) * SECTOR for _i, seg, start in work)
    started = time.monotonic()
    log.info("pool %s: rebuilding %d segment(s), %d bytes", pool.name, len(work), total)
    held: list[int] = []     # segments pinned by the read stage, not yet let go by write
    written = 0
    try:
        async with trio.open_nursery() as nursery:
            slots = trio.Semaphore(AHEAD)
            to_write, write_in = trio.open_memory_channel[_Item | BaseException](AHEAD)
            verifier = _Verifier(to_write, pool.deadlines)
            try:
                nursery.start_soon(_read_stage, pool, work, held, verifier, slots)
                nursery.start_soon(_verify_stage, pool, verifier, to_write)
                written = await _write_stage(pool, write_in, slots, held, total, started,
                                             rate, progress)
            finally:
                verifier.stop(abort=True)
            nursery.cancel_scope.cancel()
    finally:
        for seg_id in held:
            pool.pins.unpin(seg_id)
        pool.activity.pop("rebuild", None)
    log.info("pool %s: rebuild done: %d bytes of fragments written in %.1f s", pool.name,
             written, time.monotonic() - started)
    return written


async def _read_stage(pool: Pool, work: list[tuple[int, int, int]], held: list[int],
                      verifier: _Verifier, slots: trio.Semaphore) -> None:
    try:
        for index, seg_id, start in work:
            dev = pool.devices[index]
            seg = pool.state.segments.get(seg_id)
            if dev is None or seg is None or seg_id not in pool.state.members[index].marks:
                continue
            # A write placed in this segment before the member came back may still be in
            # flight without its fragment: let it land (and reach the map) first.
            # (Pins have no event to wait on; they last one device write.)
            while seg_id in pool.pins:  # noqa: ASYNC110
                await trio.sleep(0.005)
            column = next(c for c, (i, _e) in enumerate(seg.extents) if i == index)
            entries = segment_records(pool.state, seg_id, start)
            pool.pins.pin(seg_id)
            held.append(seg_id)
            item = _Segment(index, seg_id, dev, column, pool.members.epoch(index))
            for batch, size in steps(entries, seg.k):
                step = _Step(item, batch, size, record_plans(
                    seg, batch, pool.store.columns(seg, rebuilding=column)))
                await slots.acquire()
                step.reads = records.start_stripes(step.plans, pool.deadlines, target=column)
                verifier.put(step)
            await slots.acquire()
            verifier.put(item)
    finally:
        verifier.stop()     # after the last item: the verify thread ends once it is done


async def _verify_stage(pool: Pool, verifier: _Verifier,
                        send: trio.MemorySendChannel[_Item | BaseException]) -> None:
    # ``send`` is closed once the threads have delivered their last results.
    async with send, trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.to_thread.run_sync, verifier.run, True,
                                   limiter=trio.CapacityLimiter(1)))
        async with trio.open_nursery() as watching:
            watching.start_soon(_watch_idle, pool, verifier)
            await trio.to_thread.run_sync(verifier.run, limiter=pool.maintenance)
            verifier.stop()
            watching.cancel_scope.cancel()


async def _watch_idle(pool: Pool, verifier: _Verifier) -> None:
    """Set ``verifier.idle`` while no volume has read or written a record for IDLE_AFTER
    seconds (the rebuild may then have both cores), clear it as soon as one does."""
    seen, quiet = pool.reader.activity(), time.monotonic()
    while True:
        now = pool.reader.activity()
        if now != seen:
            seen, quiet = now, time.monotonic()
            verifier.idle.clear()
        elif time.monotonic() - quiet >= IDLE_AFTER:
            verifier.idle.set()
        await trio.sleep(0.025)


async def _write_stage(pool: Pool, recv: trio.MemoryReceiveChannel[_Item | BaseException],
                       slots: trio.Semaphore, held: list[int], total: int, started: float,
                       rate: float | None,
                       progress: Callable[[RebuildProgress], Awaitable[None]] | None) -> int:
    done = written = 0
    last_commit = budget_start = started
    budget_bytes = 0
    async with recv:
        async for item in recv:
            slots.release()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Segment):
                held.remove(item.seg_id)
                pool.pins.unpin(item.seg_id)
                pool.members.mark_rebuilt(item.index, item.seg_id, item.dev, item.epoch)
                if time.monotonic() - last_commit > COMMIT_EVERY:
                    await pool.commit()
                    last_commit = time.monotonic()
                continue
            out = item.out
            assert out is not None
            seg_id, column = item.seg.seg_id, item.seg.column
            for slot, why in out.failures.items():
                where = ", ".join(locate(pool.state, item.batch[slot])) or "no map"
                log.error("pool %s: cannot rebuild a record of segment %d (%s): %s",
                          pool.name, seg_id, where, why)
            mine = sum(len(r.data) for r in out.repairs if r.index == column)
            if (await pool.reader.repair(out.repairs, out.device_errors, foreground=False)
                    < len(out.repairs)):
                return written   # the member failed writes: it is being faulted
            written += mine
            pool.counters["rebuilt_bytes"] += mine
            done += item.size
            budget_bytes += out.bytes_read
            now = _progress(item.seg.index, done, total, started)
            if progress is not None:
                await progress(now)
            pool.activity["rebuild"] = now
            budget_start, budget_bytes = await _throttle(rate, budget_start, budget_bytes)
    await pool.commit()
    return written


def steps(entries: Sequence[bytes], k: int) -> Iterator[tuple[Sequence[bytes], int]]:
    """A segment's records (map entries, in order) in steps of about RUN_BYTES per
    column: (the step's entries, their bytes per column). Scrub walks them the same way."""
    i = 0
    while i < len(entries):
        j, size = i, 0
        while j < len(entries) and size < RUN_BYTES:
            size += fragment_units(ENTRY.unpack_from(entries[j])[2], k) * SECTOR
            j += 1
        yield entries[i:j], size
        i = j


def record_plans(seg: Segment, entries: Sequence[bytes], cols: tuple[Column, ...]
                 ) -> list[records.RecordPlan]:
    """Read plans for map entries of ``seg`` whose columns are ``cols``
    (``SegmentStore.columns``). Scrub plans its reads the same way."""
    plans = []
    for n, raw in enumerate(entries):
        _s, off, plen, flags, rhash = ENTRY.unpack(raw)
        plans.append(records.RecordPlan(n, seg.id, off, fragment_units(plen, seg.k),
                                        seg.k, seg.m, plen, flags, rhash, cols))
    return plans


def _progress(member: int, done: int, total: int, started: float) -> RebuildProgress:
    elapsed = max(1e-6, time.monotonic() - started)
    rate = done / elapsed
    eta = (total - done) / rate if rate > 0 and total >= done else None
    return RebuildProgress(member, done, total, rate, eta)


async def _throttle(rate: float | None, start: float, nbytes: int) -> tuple[float, int]:
    """Sleep so that ``nbytes`` since ``start`` stay under ``rate`` bytes/s; always yield
    (a checkpoint for cancellation, and a turn for foreground tasks)."""
    if rate is None or rate <= 0:
        await trio.lowlevel.checkpoint()
        return start, nbytes
    ahead = nbytes / rate - (time.monotonic() - start)
    await trio.sleep(max(0.0, ahead))
    if time.monotonic() - start > 5:
        return time.monotonic(), 0
    return start, nbytes
