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
present. Reads skip a marked member's column until the segment is clean. The work runs in
one thread at a time per pool (``Pool.background``) and may be throttled to a byte rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import trio

from pool import records
from pool.codec import fragment_units
from pool.layout import SECTOR
from pool.pool import Pool
from pool.state import ENTRY

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


async def run(pool: Pool, *, rate: float | None = None,
              progress: Callable[[RebuildProgress], Awaitable[None]] | None = None) -> int:
    """Work off every present member's marks; returns the bytes of fragments rebuilt.
    ``rate``: at most this many bytes per second read (None: as fast as it goes)."""
    work = pending(pool)
    if not work:
        return 0
    seg_fill = {seg: pool.state.segments[seg].fill for _i, seg, _s in work}
    total = sum(max(0, seg_fill[seg] - start) * SECTOR for _i, seg, start in work)
    done = written = 0
    started = last_commit = time.monotonic()
    budget_start, budget_bytes = started, 0
    log.info("pool %s: rebuilding %d segment(s), %d bytes", pool.name, len(work), total)
    try:
        for index, seg_id, start in work:
            dev = pool.devices[index]
            seg = pool.state.segments.get(seg_id)
            if dev is None or seg is None or seg_id not in pool.state.members[index].marks:
                continue
            # A write placed in this segment before the member came back may still be in
            # flight without its fragment: let it land (and reach the map) first.
            # (Pins have no event to wait on; they last one device write.)
            while pool.pinned(seg_id):  # noqa: ASYNC110
                await trio.sleep(0.005)
            column = next(c for c, (i, _e) in enumerate(seg.extents) if i == index)
            entries = pool.segment_records(seg_id, start)
            pool.pin(seg_id)
            try:
                for batch, size in steps(entries, seg.k):
                    plans = pool.record_plans(seg, batch, target=column)
                    verify = partial(records.verify_stripes, target=column)
                    out = await pool.background(verify, plans)
                    pool.note_outcome(out)
                    for slot, why in out.failures.items():
                        where = ", ".join(pool.locate(batch[slot])) or "no map"
                        log.error("pool %s: cannot rebuild a record of segment %d (%s): %s",
                                  pool.name, seg_id, where, why)
                    mine = [r for r in out.repairs if r.index == column]
                    n_ok = await pool.write_fragments(out.repairs)
                    written += sum(len(r.data) for r in mine)
                    pool.count("rebuilt_bytes", sum(len(r.data) for r in mine))
                    if n_ok < len(out.repairs):
                        return written   # the member failed writes: it is being faulted
                    done += size
                    budget_bytes += out.bytes_read
                    if progress is not None:
                        await progress(_progress(index, done, total, started))
                    pool.activity["rebuild"] = _progress(index, done, total, started)
                    budget_start, budget_bytes = await _throttle(rate, budget_start,
                                                                 budget_bytes)
            finally:
                pool.unpin(seg_id)
            pool.mark_rebuilt(index, seg_id, dev)
            if time.monotonic() - last_commit > COMMIT_EVERY:
                await pool.commit()
                last_commit = time.monotonic()
        await pool.commit()
    finally:
        pool.activity.pop("rebuild", None)
    log.info("pool %s: rebuild done: %d bytes of fragments written in %.1f s", pool.name,
             written, time.monotonic() - started)
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
