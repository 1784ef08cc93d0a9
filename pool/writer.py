"""The write path: blocks to records, records into the open segments of their profile,
map entries pointing at them (docs/INTERNALS.md "Write path"). Composed by ``Pool`` as
``Pool.writer``; the segment cleaner re-stores the records it moves through ``store``.

Invariants this module owns (DESIGN numbers in parentheses):

1. Records go to never-used space at the end of an open segment of their profile; a
   segment is filled append-only, never past its extents (3).
2. Nothing references a record before it is written: ``write_blocks`` points the map at
   the entries ``store`` returns, after the column writes returned (1, 3).
3. Each segment being written is pinned for the duration of the store, so it is not
   reaped (freed) while its records are in flight; a store that fails leaves no segment
   that only its records held unfreed (space rule S6).
4. Records stand after some column writes failed only if each still has k fragments;
   the members that missed them are marked for a rebuild from that offset (5);
   otherwise the write fails with MediumError.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass

import trio

from pool import codec, records
from pool.device import Device
from pool.errors import MediumError, StorageError
from pool.layout import SECTOR
from pool.pins import SegmentPins
from pool.profile import Profile
from pool.space import SpaceAccount
from pool.state import ENTRY, HOLE, Op, PoolState, Segment, op_json, op_map_set
from pool.store import SegmentStore


@dataclass(frozen=True, slots=True)
class WriterHooks:
    """What the write path needs of the pool that composes it."""

    check_ok: Callable[[], None]                 # raise if the pool may not be written
    confirm_owner: Callable[[], Awaitable[None]]  # DESIGN 10: still ours before writing
    do: Callable[[Op], None]                     # apply and queue a metadata op
    reap: Callable[[], None]                     # free segments nothing references
    sb_gen: Callable[[], int]                    # the current superblock generation


class RecordWriter:
    """Stores blocks as records (``Pool.writer``).

    ``open_segments``, ``pins``, ``fill_moved``, ``dirty`` and ``counters`` are the pool's
    own containers (open segment per (k, m); pin counts per segment; segments whose fill
    changed since the last commit; members written since the last sync; statistics),
    shared, not copied: the pool's other parts read and change them too."""

    def __init__(self, state: PoolState, store: SegmentStore, space: SpaceAccount,
                 devices: list[Device | None], extent_size: int,
                 open_segments: dict[tuple[int, int], Segment], pins: SegmentPins,
                 fill_moved: set[int], dirty: set[int], counters: dict[str, int],
                 cpu: trio.CapacityLimiter, hooks: WriterHooks) -> None:
        self.state = state
        self._store = store
        self._space = space
        self._devices = devices
        self._cap = extent_size // SECTOR
        self._open = open_segments
        self._pins = pins
        self._fill_moved = fill_moved
        self._dirty = dirty
        self._counters = counters
        self._cpu = cpu
        self._hooks = hooks

    async def write_blocks(self, map_id: int, prof: Profile, compress: bool,
                           items: Sequence[tuple[int, codec.Buffer | None]], *,
                           raw: Container[int] = ()) -> None:
        """Store blocks as new records (``None`` unmaps) and point the map at them; with
        ``compress``, lz4 is tried on each block but those in ``raw``.

        The change is in memory until the next ``commit``; the records are written (not
        synced) before the map moves, so a commit never references unwritten data.
        """
        self._hooks.check_ok()
        if map_id not in self.state.maps:
            raise StorageError(f"map {map_id} does not exist")
        blocks = [b for b, d in items if d is not None]
        datas = [d for _b, d in items if d is not None]
        encoded = await self.encode(datas, prof,
                                     [compress and b not in raw for b in blocks])
        self._hooks.check_ok()
        entries = await self.store(prof, encoded)
        for block, entry in zip(blocks, entries, strict=True):
            self._hooks.do(op_map_set(map_id, block, entry))
        for block, maybe in items:
            if maybe is None:
                self._hooks.do(op_map_set(map_id, block, HOLE))
        self._hooks.reap()

    async def store(self, prof: Profile,
                     encoded: Sequence[codec.EncodedRecord]) -> list[bytes]:
        """Place encoded records at the end of the profile's open segment(s), write them
        (one write per column per run), and return their map entries. The caller points
        maps at them afterwards: nothing references a record before it is written."""
        await self._hooks.confirm_owner()
        placed: list[tuple[Segment, int, codec.EncodedRecord]] = []
        pinned: list[int] = []
        failed_store = False
        try:
            key = (prof.k, prof.m)
            if encoded:
                largest = max(rec.units for rec in encoded)
                tails = self._space.tail_units
                if largest > tails.get(key, 1):
                    tails[key] = largest
            for rec in encoded:
                seg = self.room(key, rec.units)
                if not pinned or pinned[-1] != seg.id:
                    self._pins.take(seg.id)
                    pinned.append(seg.id)
                placed.append((seg, seg.fill, rec))
                seg.fill += rec.units
                self._fill_moved.add(seg.id)
            runs: list[tuple[Segment, int, list[codec.EncodedRecord]]] = []
            for seg, off, rec in placed:
                if runs and runs[-1][0] is seg:
                    runs[-1][2].append(rec)
                else:
                    runs.append((seg, off, [rec]))
            outcome = await self._store.write(runs)
            failed = outcome.failed
            self._dirty.update(outcome.written)
            self._hooks.check_ok()
            if failed:
                self._degraded_store(placed, set(failed))
            self._counters["records_written"] += len(placed)
            return [ENTRY.pack(seg.id, off, rec.plen, rec.flags, rec.rhash)
                    for seg, off, rec in placed]
        except BaseException:
            failed_store = True
            raise
        finally:
            # No reaping here: the caller points maps at the records first (without an
            # await in between) and reaps after, or a segment closed while its records
            # were in flight would look empty and be freed under them.
            for seg_id in pinned:
                self._pins.drop(seg_id)
            if failed_store:
                # Nobody will point at these records: a segment that holds only them (or
                # that emptied while we pinned it) must not linger unfreed.
                for seg_id in pinned:
                    sg = self.state.segments.get(seg_id)
                    if sg is not None and not sg.live:
                        self.state.emptied.add(seg_id)
                self._hooks.reap()

    def _degraded_store(self, placed: Sequence[tuple[Segment, int, codec.EncodedRecord]],
                        failed: set[int]) -> None:
        """Some column writes failed. The records stand if each still has k fragments
        (the member is marked for a rebuild of them); otherwise the write fails."""
        first: dict[int, int] = {}
        for seg, off, _rec in placed:
            first.setdefault(seg.id, off)
            absent = sum(1 for i, _e in seg.extents
                         if i in failed or i >= len(self._devices) or self._devices[i] is None)
            if absent > seg.m:
                raise MediumError(f"pool {self.state.name}: writes failed on "
                                  f"{len(failed)} device(s) and a {Profile(seg.k, seg.m)} "
                                  f"record cannot lose more than {seg.m} fragments")
        for seg_id, off in first.items():
            for i, _e in self.state.segments[seg_id].extents:
                if i in failed:
                    self._hooks.do(op_json(op="member_state", index=i,
                                     state=self.state.members[i].state,
                                     last_gen=self._hooks.sb_gen(), marks=[[seg_id, off]]))

    def room(self, prof: tuple[int, int], units: int) -> Segment:
        seg = self._open.get(prof)
        cap = self._cap
        if seg is not None and seg.fill + units <= cap:
            return seg
        if seg is not None:
            del self._open[prof]
            if seg.live == 0:
                self.state.emptied.add(seg.id)
            self._hooks.reap()
        seg = self._new_segment(*prof)
        self._open[prof] = seg
        return seg

    def _new_segment(self, k: int, m: int) -> Segment:
        extents = self._store.allocate(k, m)
        seg_id = self.state.next_id
        self._hooks.do(op_json(op="seg_new", id=seg_id, k=k, m=m, extents=extents,
                         birth=self.state.txg + 1))
        return self.state.segments[seg_id]

    async def encode(self, datas: list[codec.Buffer], prof: Profile,
                      compress: list[bool]) -> list[codec.EncodedRecord]:
        """Compress (where ``compress`` says), split and encode records, on both cores
        when there are enough (zfec and lz4 release the GIL)."""
        if len(datas) < 8:
            return await trio.to_thread.run_sync(records.encode_all, datas, prof.k, prof.m,
                                                 compress, limiter=self._cpu)
        half = len(datas) // 2
        parts: list[list[codec.EncodedRecord]] = [[], []]

        async def one(i: int, lo: int, hi: int) -> None:
            parts[i] = await trio.to_thread.run_sync(records.encode_all, datas[lo:hi],
                                                     prof.k, prof.m, compress[lo:hi],
                                                     limiter=self._cpu)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0, 0, half)
            nursery.start_soon(one, 1, half, len(datas))
        return parts[0] + parts[1]

