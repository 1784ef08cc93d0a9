"""The read path: map entries to verified blocks, through the record cache and the
segment store's column handles, without a thread hop when the fragments are page-cached
(docs/INTERNALS.md "Read path"). Composed by ``Pool`` as ``Pool.reader``; the Pool checks
its own state (failed, closed) before it delegates here.

Invariants this module owns (DESIGN numbers in parentheses):

1. A block is returned only after its record verified (xxh3 of the payload and of each
   fragment used); a record that cannot be verified or rebuilt raises MediumError and
   nothing of it is returned (4).
2. A read that waits (a thread) is counted as in flight with the store (``read_begin``/
   ``read_end``) for its whole duration, so space freed meanwhile is not reused under it
   (3; space rule S5). Reads served at once on the event loop never await, so no free can
   be released during them.
3. Only verified blocks enter the record cache, keyed by their map entry (a record never
   changes where it lies, DESIGN 3), and only for small reads (two blocks at most).
4. Fragments a read rebuilt are rewritten only in segments that still exist, through the
   store, under the write deadline (4, 5).
5. A block handed out as a view of a read's own buffer is read-only, and nothing writes
   that buffer while any view of it is alive (so what a frontend is still sending cannot
   change under it): a buffer is reused only once nothing but the reader refers to it.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import cast

import trio

from pool import codec, records
from pool.deadlines import Deadlines
from pool.errors import MediumError, NotFound
from pool.layout import SECTOR
from pool.readcache import RecordCache
from pool.state import ENTRY, HOLE, PoolState
from pool.store import SegmentStore

log = logging.getLogger("pool.pool")   # its lines keep the name they always had


_ENTRIES: dict[int, struct.Struct] = {}
SPARES = 8                      # large reads' buffers kept for reuse (_read_buffer)...
SPARE_SIZE = 4 << 20            # ...of at most this size each


# read_packed_into's plan: the runs, the slots that are holes, the record-cache hits
_Packed = tuple[list[records.PackedRun], list[int], list[tuple[int, bytes | memoryview]]]


def _entries(n: int) -> struct.Struct:
    """A Struct of ``n`` map entries back to back (ENTRY's format ``n`` times)."""
    layout = _ENTRIES.get(n)
    if layout is None:
        layout = struct.Struct("<" + ENTRY.format.lstrip("<") * n)
        if len(_ENTRIES) < 256:
            _ENTRIES[n] = layout
    return layout


def _handed_out(view: memoryview, n: int, block_size: int,
                holes: Iterable[int]) -> list[bytes | memoryview | None]:
    """The ``n`` blocks a read filled ``view`` with, as read-only views of it (invariant
    5), holes None."""
    out = view.toreadonly()
    result: list[bytes | memoryview | None] = [
        out[at:at + block_size] for at in range(0, n * block_size, block_size)]
    for slot in holes:
        result[slot] = None
    return result


class RecordReader:
    """Reads blocks of a pool's maps (``Pool.reader``).

    ``counters`` is the pool's statistics dict (records_read, degraded_reads,
    unreadable_records, repaired_fragments are counted in it); ``written`` is told which
    members a read repair wrote to (they need a sync before the next commit)."""

    def __init__(self, state: PoolState, store: SegmentStore, cache: RecordCache,
                 deadlines: Deadlines, cpu: trio.CapacityLimiter, counters: dict[str, int],
                 written: Callable[[Iterable[int]], None],
                 confirm_owner: Callable[[], Awaitable[None]]) -> None:
        self.state = state
        self._confirm_owner = confirm_owner
        self.cache = cache
        self._store = store
        self._deadlines = deadlines
        self._cpu = cpu
        self._counters = counters
        self._written = written
        self._zero_block = b""     # zeros for holes read into a caller's buffer
        self._spare: list[bytearray] = []     # large reads' buffers (_read_buffer)

    def _plan_existing(self, map_id: int, blocks: Sequence[int]
                       ) -> tuple[list[bytes | None], list[bytes | memoryview | None],
                                  list[records.RecordPlan]]:
        """``_read_plan`` of a map that must exist (NotFound if it was deleted)."""
        self._require_map(map_id)
        return self._read_plan(map_id, blocks)

    def _require_map(self, map_id: int) -> None:
        """NotFound if map ``map_id`` was deleted (its volume or snapshot)."""
        if map_id not in self.state.maps:
            raise NotFound(f"map {map_id} no longer exists (its volume or snapshot was "
                           f"deleted)")

    def _read_plan(self, map_id: int, blocks: Sequence[int]
                   ) -> tuple[list[bytes | None], list[bytes | memoryview | None],
                              list[records.RecordPlan]]:
        """Map entries of ``blocks``, the result with record-cache hits filled in, and
        the records still to read."""
        forest = self.state.forest
        if len(blocks) == 1:
            entries = [forest.get(map_id, blocks[0])]
        elif blocks and blocks[-1] - blocks[0] + 1 == len(blocks):
            entries = forest.get_range(map_id, blocks[0], len(blocks))
        else:
            entries = [forest.get(map_id, b) for b in blocks]
        plans: list[records.RecordPlan] = []
        segments = self.state.segments
        columns = self._store.columns
        unpack = ENTRY.unpack
        result: list[bytes | memoryview | None] = [None] * len(blocks)
        cached = self.cache.get
        for slot, raw in enumerate(entries):
            if raw is None:
                continue
            hit = cached(raw)
            if hit is not None:
                result[slot] = hit
                continue
            seg_id, off, plen, flags, rhash = unpack(raw)
            seg = segments[seg_id]
            k = seg.k
            plans.append(records.RecordPlan(
                slot, seg_id, off, -(-(codec.HEADER_SIZE + -(-plen // k)) // SECTOR), k, seg.m,
                plen, flags, rhash, columns(seg)))
        return entries, result, plans

    def _keep(self, out: records.ReadOutcome, entries: list[bytes | None],
              result: list[bytes | memoryview | None]) -> None:
        """Put what was read into ``result`` (and small reads into the record cache)."""
        self._counters["records_read"] += len(out.payloads)
        small = len(entries) <= 2
        for slot, data in out.payloads.items():
            key = entries[slot]
            if small and key is not None:
                # Small reads (random I/O, read-modify-write) keep the verified block: a
                # record never changes where it lies, so the entry is a safe key. A view
                # of the read's own buffer is kept as it is (read-only), not copied.
                kept = data if isinstance(data, bytes) else data.toreadonly()
                self.cache.put(key, kept)
                result[slot] = kept
            else:
                result[slot] = data

    def read_block_nowait(self, map_id: int, block: int,
                          block_size: int) -> tuple[bool, bytes | memoryview | None]:
        """``read_blocks_nowait`` of one block: (whether it could be read at once, its
        content or None for a hole). A record-cache hit costs a map lookup."""
        if map_id in self.state.maps:
            raw, hit = self._cached(map_id, block)
            if raw is None:
                return True, None
            if hit is not None:
                return True, hit
        got = self.read_blocks_nowait(map_id, (block,), block_size)
        return (False, None) if got is None else (True, got[0])

    def cached_block(self, map_id: int, block: int) -> bytes | memoryview | None:
        """The record cache's verified content of ``block`` of map ``map_id``, or None (not
        cached, a hole, or no such map): the one lookup of a small read's fastest path."""
        if map_id not in self.state.maps:
            return None
        raw = self.state.forest.get(map_id, block)
        return None if raw is None else self.cache.get(raw)

    def _cached(self, map_id: int, block: int) -> tuple[bytes | None, bytes | memoryview | None]:
        """The map entry of ``block`` of an existing map (None: a hole) and the record
        cache's block for it (None: not cached)."""
        raw = self.state.forest.get(map_id, block)
        return raw, (self.cache.get(raw) if raw is not None else None)

    def read_blocks_nowait(self, map_id: int, blocks: Sequence[int],
                           block_size: int) -> list[bytes | memoryview | None] | None:
        """``read_blocks`` if it can be done at once on the event loop (record-cache hits,
        page-cached healthy fragments), else None: the caller awaits ``read_blocks``."""
        # (without ``whole`` the answer is never one view)
        return cast("list[bytes | memoryview | None] | None",
                    self._nowait(map_id, blocks, block_size, whole=False))

    def read_span_nowait(self, map_id: int, first: int, n: int, block_size: int
                         ) -> memoryview | list[bytes | memoryview | None] | None:
        """``read_blocks_nowait`` of the ``n`` blocks from ``first`` on, which answers a
        large read of records stored raw with no hole among them as one read-only view
        of all ``n`` blocks back to back (invariant 5), instead of a view per block: a
        frontend then sends it as one buffer, and nobody cuts and gathers it per block."""
        return self._nowait(map_id, range(first, first + n), block_size, whole=True)

    def _nowait(self, map_id: int, blocks: Sequence[int], block_size: int, *,
                whole: bool) -> memoryview | list[bytes | memoryview | None] | None:
        if map_id not in self.state.maps:
            return None
        if len(blocks) > 2:
            # A large read of whole blocks stored raw: read like ``read_blocks_into``
            # into one buffer of its own (for ec, each chunk straight to its place in
            # its block, no join; a column's headers checked in one pass), and hand out
            # read-only views of it (invariant 5).
            planned = self._into_runs(map_id, blocks, block_size)
            if planned is not None:
                return self._runs_nowait(planned, len(blocks), block_size,
                                         whole=whole and not planned[1])
            packed = self._packed_runs(map_id, blocks)
            if packed is not None:
                return self._packed_nowait(packed, len(blocks), block_size)
        entries, result, plans = self._read_plan(map_id, blocks)
        if plans:
            try:
                out = records.read_records(plans, block_size, self._deadlines, nowait=True)
            except records.WouldBlock:
                return None
            self._keep(out, entries, result)
        return result

    def _runs_nowait(self, planned: tuple[list[records.IntoRun], list[int]], n: int,
                     block_size: int, *, whole: bool = False
                     ) -> memoryview | list[bytes | memoryview | None] | None:
        """``read_blocks_nowait`` of ``n`` blocks planned by ``_into_runs``: each record
        read and verified into its place in one new buffer; holes None (``whole``: no
        holes, and the buffer is handed out as one read-only view). None if something
        needs the general path."""
        runs, holes = planned
        view = memoryview(self._read_buffer(n * block_size))
        dests = [view[at:at + block_size] for at in range(0, n * block_size, block_size)]
        try:
            done = records.read_runs_into(runs, block_size, dests)
        except records.WouldBlock:
            return None
        self._counters["records_read"] += done
        if whole:
            return view.toreadonly()
        return _handed_out(view, n, block_size, holes)

    def _packed_nowait(self, packed: _Packed, n: int, block_size: int
                       ) -> list[bytes | memoryview | None] | None:
        """``read_blocks_nowait`` of ``n`` blocks planned by ``_packed_runs``: each record
        read, verified and expanded into its place in one new buffer (handed out as
        read-only views, invariant 5); holes None, record-cache hits as they are. None if
        something needs the general path."""
        runs, holes, hits = packed
        view = memoryview(self._read_buffer(n * block_size))
        dests = [view[at:at + block_size] for at in range(0, n * block_size, block_size)]
        try:
            done = records.read_packed_into(runs, dests)
        except records.WouldBlock:
            return None
        self._counters["records_read"] += done
        result = _handed_out(view, n, block_size, holes)
        for slot, hit in hits:
            result[slot] = hit
        return result

    async def read_blocks(self, map_id: int, blocks: Sequence[int],
                          block_size: int) -> list[bytes | memoryview | None]:
        """The logical content of each block (``None`` for a hole), verified."""
        entries, result, plans = self._plan_existing(map_id, blocks)
        if not plans:
            return result
        try:
            # Page-cached, healthy data is served without a thread hop (~120 us here):
            # preadv(RWF_NOWAIT) never blocks, and verification is a hash per fragment.
            out = records.read_records(plans, block_size, self._deadlines, nowait=True)
        except records.WouldBlock:
            hold = self._store.read_hold()
            try:
                out = await trio.to_thread.run_sync(records.read_records, plans, block_size,
                                                    self._deadlines,
                                                    limiter=self._cpu)
            finally:
                hold.release()
        self._counters["degraded_reads"] += out.degraded
        if out.repairs or out.device_errors:
            await self.repair(out.repairs, out.device_errors)
        if out.failures:
            self._counters["unreadable_records"] += len(out.failures)
            slot, why = next(iter(out.failures.items()))
            log.error("pool %s: unreadable block %d of map %d: %s", self.state.name,
                      blocks[slot], map_id, why)
            raise MediumError(f"block {blocks[slot]}: {why}")
        self._keep(out, entries, result)
        return result

    def read_blocks_into_nowait(self, map_id: int, blocks: Sequence[int], block_size: int,
                                dests: Sequence[memoryview]) -> bool:
        """``read_blocks_into`` if it can be done at once on the event loop (holes,
        record-cache hits, and records in page-cached, healthy fragments); else False, and
        what ``dests`` hold is undefined."""
        if map_id not in self.state.maps:
            return False
        if len(blocks) == 1 and len(self.cache):
            # One block (a read-modify-write's read): the record cache first, which holds
            # the blocks small writes produced (writer invariant 6).
            _raw, hit = self._cached(map_id, blocks[0])
            if hit is not None:
                dests[0][:] = hit
                return True
        planned = self._into_runs(map_id, blocks, block_size)
        try:
            if planned is not None:
                runs, holes = planned
                for slot in holes:
                    dests[slot][:] = self.zeros(block_size)
                done = records.read_runs_into(runs, block_size, dests)
            elif (packed := self._packed_runs(map_id, blocks)) is not None:
                done = self._packed_into(packed, block_size, dests)
            else:
                done = self._records_into_nowait(map_id, blocks, block_size, dests)
        except records.WouldBlock:
            return False
        self._counters["records_read"] += done
        return True

    def _packed_into(self, packed: _Packed, block_size: int,
                     dests: Sequence[memoryview]) -> int:
        """Blocks planned by ``_packed_runs`` into ``dests``: records read and verified
        (``records.read_packed_into``), holes zeroed, record-cache hits copied. Raises
        WouldBlock as ``read_packed_into`` does."""
        runs, holes, hits = packed
        for slot in holes:
            dests[slot][:] = self.zeros(block_size)
        for slot, hit in hits:
            dests[slot][:] = hit
        return records.read_packed_into(runs, dests)

    def _packed_runs(self, map_id: int, blocks: Sequence[int]) -> _Packed | None:
        """The records of ``blocks`` as runs for ``records.read_packed_into`` (lz4 or raw,
        whole or not), the slots that are holes and the record-cache hits; None if a
        record lies in a segment with k > 1 (``_records_into_nowait`` reads those)."""
        spans = self._spans(map_id, blocks)
        segments = self.state.segments
        columns = self._store.columns
        cached = self.cache.get if len(self.cache) else None
        runs: list[records.PackedRun] = []
        holes: list[int] = []
        hits: list[tuple[int, bytes | memoryview]] = []
        run: records.PackedRun | None = None
        run_seg = after = -1
        size = ENTRY.size
        hs = codec.HEADER_SIZE
        limit = records.PACKED_MAX
        slot = 0
        for n, raw in spans:
            if raw is None:
                holes.extend(range(slot, slot + n))
                slot += n
                run = None
                continue
            for i, (seg_id, off, plen, flags, rhash) in enumerate(ENTRY.iter_unpack(raw)):
                if not plen:                   # a hole (HOLE unpacks to zeros)
                    holes.append(slot)
                    slot += 1
                    run = None
                    continue
                if cached is not None and (hit := cached(raw[i * size:(i + 1) * size])
                                           ) is not None:
                    hits.append((slot, hit))
                    slot += 1
                    run = None
                    continue
                units = -(-(hs + plen) // SECTOR)
                if (run is None or seg_id != run_seg or off != after
                        or run.size + units * SECTOR > limit):
                    seg = segments[seg_id]
                    if seg.k != 1:
                        return None
                    run = records.PackedRun(columns(seg)[0], seg.m, off)
                    runs.append(run)
                    run_seg = seg_id
                run.slots.append(slot)
                run.ats.append(run.size)
                run.plens.append(plen)
                run.flags.append(flags)
                run.hashes.append(rhash)
                run.size += units * SECTOR
                after = off + units
                slot += 1
        return runs, holes, hits

    def _records_into_nowait(self, map_id: int, blocks: Sequence[int], block_size: int,
                             dests: Sequence[memoryview]) -> int:
        """Blocks that are not all whole and stored raw (lz4-compressed ones): each
        record read and verified as ``read_blocks_nowait`` does, its logical block
        written into its ``dests`` entry (``records.read_records_into``: lz4 decompressed
        straight into it); holes zeroed, record-cache hits copied. WouldBlock as there."""
        entries, result, plans = self._read_plan(map_id, blocks)
        done = records.read_records_into(plans, block_size, dests, self._deadlines)
        for slot, raw in enumerate(entries):
            hit = result[slot]
            if raw is None:
                dests[slot][:] = self.zeros(block_size)
            elif hit is not None:
                dests[slot][:] = hit
        return done

    def _read_buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes for a large read: a spare one that nothing refers to
        any more (invariant 5: every view of it is gone), else a new one, kept as a spare
        in place of the oldest. A spare saves zeroing a new buffer (about 5% of a 1 MiB
        read's CPU over NBD). CPython: the spare's only references are then the list's,
        the loop's and ``getrefcount``'s own, as views hold the buffer itself."""
        spare = self._spare
        for buf in spare:
            if len(buf) == size and sys.getrefcount(buf) == 3:
                return buf
        buf = bytearray(size)
        if size <= SPARE_SIZE:
            spare.append(buf)
            if len(spare) > SPARES:
                del spare[0]
        return buf

    def _spans(self, map_id: int, blocks: Sequence[int]) -> list[tuple[int, bytes | None]]:
        """The map entries of ``blocks`` as spans (how many, their entries back to back;
        None or HOLE for holes), as ``MapForest.leaf_spans`` gives them for a range."""
        forest = self.state.forest
        if blocks and blocks[-1] - blocks[0] + 1 == len(blocks):
            return forest.leaf_spans(map_id, blocks[0], len(blocks))
        return [(1, forest.get(map_id, b) or HOLE) for b in blocks]

    def _into_runs(self, map_id: int, blocks: Sequence[int], block_size: int
                   ) -> tuple[list[records.IntoRun], list[int]] | None:
        """The records of ``blocks`` as runs for ``records.read_runs_into``, and the
        slots that are holes; None if some block is not a whole block stored raw."""
        spans = self._spans(map_id, blocks)
        segments = self.state.segments
        columns = self._store.columns
        n, raw = spans[0] if len(spans) == 1 else (0, None)
        if raw is not None and n > 1:
            # The usual large read: records one after another in one segment. Checked
            # column-wise (a few C-level calls), not entry by entry.
            # n entries in one unpack; every 5th field is one column of them.
            fields = _entries(n).unpack(raw)
            segs, offs, plens, flags = (fields[0::5], fields[1::5], fields[2::5],
                                        fields[3::5])
            hashes = fields[4::5]
            seg = segments.get(segs[0])
            if (seg is not None and plens.count(block_size) == n and segs.count(seg.id) == n
                    and not any(flags) and not block_size % seg.k):
                units = codec.fragment_units(block_size, seg.k)
                if offs == tuple(range(offs[0], offs[0] + n * units, units)):
                    return [records.IntoRun(columns(seg), seg.k, seg.m, offs[0], units,
                                            list(range(n)), list(hashes))], []
        runs: list[records.IntoRun] = []
        holes: list[int] = []
        run: records.IntoRun | None = None
        run_seg = after = units = -1
        slot = 0
        for n, raw in spans:
            if raw is None:
                holes.extend(range(slot, slot + n))
                slot += n
                run = None
                continue
            for seg_id, off, plen, flags, rhash in ENTRY.iter_unpack(raw):
                if not plen:                   # a hole (HOLE unpacks to zeros)
                    holes.append(slot)
                    slot += 1
                    run = None
                    continue
                if plen != block_size or flags:
                    return None
                if run is None or seg_id != run_seg or off != after:
                    seg = segments[seg_id]
                    if block_size % seg.k:
                        return None
                    units = codec.fragment_units(plen, seg.k)
                    run = records.IntoRun(columns(seg), seg.k, seg.m, off, units, [],
                                          [])
                    runs.append(run)
                    run_seg = seg_id
                run.slots.append(slot)
                run.hashes.append(rhash)
                after = off + units
                slot += 1
        return runs, holes

    def zeros(self, n: int) -> bytes:
        """``n`` zero bytes (one buffer kept for the usual block size)."""
        z = self._zero_block
        if len(z) != n:
            z = self._zero_block = bytes(n)
        return z

    def activity(self) -> int:
        """Records read (from the devices or the record cache) and written for volumes so
        far: maintenance work watches it to tell whether the pool is idle."""
        c = self._counters
        return c["records_read"] + c["records_written"] + self.cache.hits

    async def repair(self, repairs: Sequence[records.Repair],
                     errors: Counter[tuple[str, str]] | None = None, *,
                     foreground: bool = True) -> int:
        """Hand a read's or a verify pass's outcome back to the store: count the errors
        it met, and rewrite the bad fragments it rebuilt (invariant 4); returns how many
        were written. A read's repair (``foreground``) has a member that hangs on it
        faulted rather than hanging the read that found the damage; a maintenance
        engine's (scrub, rebuild: ``foreground=False``) first confirms this daemon still
        owns the pool (DESIGN invariant 10), and runs beside their next verify step."""
        if not foreground:
            await self._confirm_owner()
        # Heal only fragments of segments that still exist: a segment freed meanwhile
        # may not be reused yet (reads in flight hold frees back), but it is not ours.
        live = [r for r in repairs if r.segment in self.state.segments]
        done, touched = await self._store.write_fragments(live, errors=errors,
                                                           foreground=foreground)
        self._written(touched)
        if not foreground:
            return done
        self._counters["repaired_fragments"] += done
        if done:
            log.warning("pool %s: rewrote %d bad fragment(s) from redundancy",
                        self.state.name, done)
        return done
