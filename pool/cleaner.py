"""The segment cleaner: moves the live records out of sparse closed segments so that their
extents free up (log-structured cleaning, as in LFS/F2FS), composed by ``Pool``.

Invariants this module owns (DESIGN numbers in parentheses):

1. One cleaning runs at a time per pool (``SegmentCleaner._lock``).
2. A record is moved only after it was read verified (4); a segment any of whose records
   cannot be read is left where it is (logged), never half-relocated.
3. Moved records go to never-used space at the end of open segments of the same profile
   (3, 5); every leaf that pointed at the old copy is repointed by one journaled
   ``relocate`` op, in place (snapshots sharing the leaf share the record), and a leaf
   changed meanwhile keeps its new entry.
4. The cleaner never takes space promised to reservations (rule S2): it moves a segment
   only when its live records, with a tail each side, fit in the unreserved space.
5. The segment being moved is pinned while its records are read and re-stored, so it is
   not reaped before the relocations point at the new copies; its extents free up only
   at the next commit (3).

It reads columns through the SegmentStore (``Pool.store``), re-stores records through
the write path (``Pool.writer``) and asks the space account (``Pool.space``); it still
uses the pool's private segment bookkeeping (open segments, pins, reap, ops).
"""

from __future__ import annotations

import logging
from collections.abc import Container
from functools import partial
from typing import TYPE_CHECKING

import trio

from pool import codec, records
from pool.layout import SECTOR
from pool.profile import Profile
from pool.state import ENTRY, HOLE, Segment, op_relocate

if TYPE_CHECKING:
    from pool.pool import Pool

log = logging.getLogger("pool.pool")   # its lines keep the name they always had


class SegmentCleaner:
    """The cleaner of one pool (``Pool.cleaner``)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._lock = trio.Lock()

    async def clean(self, *, max_segments: int = 4, threshold: float = 0.5) -> int:
        """Move the live records out of up to ``max_segments`` closed segments whose live
        part is below ``threshold`` of what they hold, so that their extents free up.

        Each record is read verified (its stored payload, not decompressed), re-striped
        into the open segment of its profile, and every leaf still pointing at the old
        copy is repointed by a journaled ``relocate`` op -- in place, since snapshots that
        share the leaf share the record too. A leaf changed meanwhile keeps its new entry.
        One cleaner runs at a time, and it moves a segment only when its live records fit
        in what no reservation holds (rule S2), so it never takes space promised to
        buffered writes. Returns the number of segments emptied; the space returns at the
        next commit.
        """
        p = self._pool
        p.txn.check_ok()
        emptied = 0
        async with self._lock:
            p.reap()
            tried: set[int] = set()
            while emptied < max_segments:
                seg = self.cleanable(threshold, tried)
                if seg is None:
                    break
                tried.add(seg.id)
                if await self.evacuate(seg.id):
                    emptied += 1
        return emptied

    async def clean_one(self) -> bool:
        """Clean the sparsest segment with any dead space that the cleaner has room to
        move (``make_room``); whether one was emptied."""
        return bool(await self.clean(max_segments=1, threshold=1.0))

    def cleanable(self, threshold: float, tried: Container[int]) -> Segment | None:
        """The closed, unpinned segment with the smallest live part below ``threshold``
        whose live records fit in the unreserved space (with a tail each side), and whose
        cleaning wins at least a record's worth (less would be lost to the tails)."""
        p = self._pool
        open_ids = {s.id for s in p.open_segments.values()}
        cap = p.layout.extent_size // SECTOR
        room: dict[tuple[int, int], int] = {}
        for s in sorted((s for s in p.state.segments.values()
                         if s.id not in open_ids and s.id not in tried
                         and s.id not in p.pins and s.fill
                         and s.live < threshold * s.fill),
                        key=lambda s: s.live / s.fill):
            key = (s.k, s.m)
            if key not in room:
                room[key] = p.available_bytes(Profile(*key))
            tail = p.space.tail_units.get(key, 1)
            need = (s.live + 2 * tail) * SECTOR * (s.k + s.m)
            if not s.live or (need <= room[key] and cap - s.live > 2 * tail):
                return s
        return None

    async def evacuate(self, seg_id: int) -> bool:
        """Move the live records of one segment elsewhere (or free it if nothing references
        it); whether it is empty now. The caller commits."""
        p = self._pool
        seg = p.state.segments.get(seg_id)
        if seg is None:
            return True
        refs: dict[bytes, list[tuple[int, int]]] = {}
        for nid, node in p.state.forest.nodes.items():
            if not isinstance(node.data, bytearray):
                continue
            for slot in range(len(node.data) // ENTRY.size):
                raw = bytes(node.data[slot * ENTRY.size:(slot + 1) * ENTRY.size])
                if raw != HOLE and ENTRY.unpack_from(raw)[0] == seg_id:
                    refs.setdefault(raw, []).append((nid, slot))
        if not refs:
            # Nothing references it (records of a store that failed, or the last ones
            # dropped while it was pinned): free it now. Returning "emptied" without
            # freeing it made ``make_room`` pick it again and again, a busy loop that
            # left writers hanging after an ENOSPC burst (issue 20).
            p.state.emptied.add(seg_id)
            p.reap()
            return seg_id not in p.state.segments
        olds = sorted(refs, key=lambda r: ENTRY.unpack_from(r)[1])
        cols = p.store.columns(seg)
        plans = []
        for i, raw in enumerate(olds):
            _s, off, plen, flags, rhash = ENTRY.unpack(raw)
            plans.append(records.RecordPlan(i, seg_id, off, codec.fragment_units(plen, seg.k),
                                            seg.k, seg.m, plen, flags, rhash, cols))
        p.pins.pin(seg_id)
        try:
            out = await trio.to_thread.run_sync(
                partial(records.read_records, plans, 0, p.deadlines, stored=True), limiter=p.cpu)
            if out.failures:
                log.error("pool %s: cleaner cannot move segment %d: %s", p.state.name,
                          seg_id, next(iter(out.failures.values())))
                return False
            prof = Profile(seg.k, seg.m)
            encoded = await trio.to_thread.run_sync(
                lambda: [codec.stripe(out.payloads[i], ENTRY.unpack_from(raw)[3], prof.k,
                                      prof.m) for i, raw in enumerate(olds)],
                limiter=p.cpu)
            news = await p.writer.store(prof, encoded)
        finally:
            p.pins.unpin(seg_id, reap=False)   # no reap before the relocations point at the news
        for old, new in zip(olds, news, strict=True):
            for nid, slot in refs[old]:
                p.txn.do(op_relocate(nid, slot, old, new))
        p.reap()
        p.counters["records_relocated"] += len(olds)
        return seg_id not in p.state.segments or p.state.segments[seg_id].live == 0
