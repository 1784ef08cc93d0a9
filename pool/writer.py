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
5. ``write_blocks`` is a two-stage pipeline over batches of its blocks: worker threads
   encode batch N+1 while batch N is placed, written and mapped on the event loop. The
   batches are stored and mapped one at a time, in order, each only after its column
   writes returned (invariant 2 holds per batch); at most ``PIPELINE_AHEAD`` encoded
   batches wait for the store. A failure stops the pipeline: batches already mapped stay
   mapped (uncommitted, like any write before a failure), the rest are not written.
6. A block the caller names in ``keep`` enters the record cache under its new map entry,
   once its record is written, as a read-only view of the caller's bytes (which the
   caller never changes again, buffer invariant 7): the record was made from exactly
   those bytes, so a read of the entry returns them (record cache invariant 1). The
   entry it replaces in the map leaves the cache.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass

import trio

from pool import codec
from pool.device import Device
from pool.errors import MediumError, StorageError
from pool.layout import SECTOR
from pool.pins import SegmentPins
from pool.profile import Profile
from pool.readcache import RecordCache
from pool.space import SpaceAccount
from pool.state import ENTRY, HOLE, Op, PoolState, Segment, op_json
from pool.store import SegmentStore

# Blocks per pipeline stage (``write_blocks``): about PIPELINE_BYTES of them, so that a
# thread hop carries enough work to be worth it and a batch's device writes are long
# enough to cover the encoding of the next one; never fewer than PIPELINE_MIN blocks.
PIPELINE_BYTES = 16 << 20
PIPELINE_MIN = 16
PIPELINE_AHEAD = 1          # encoded batches waiting for the store (besides the one encoding)


@dataclass(frozen=True, slots=True)
class WriterHooks:
    """What the write path needs of the pool that composes it."""

    check_ok: Callable[[], None]                 # raise if the pool may not be written
    confirm_owner: Callable[[], Awaitable[None]]  # DESIGN 10: still ours before writing
    do: Callable[[Op], None]                     # apply and queue a metadata op
    # ``do(op_map_set(map, block, entry))`` for each (block, entry), in one call
    do_map_sets: Callable[[int, Sequence[int], Sequence[bytes]], None]
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
                 cpu: trio.CapacityLimiter, hooks: WriterHooks, cache: RecordCache) -> None:
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
        self._cache = cache

    async def write_blocks(self, map_id: int, prof: Profile, compress: bool,
                           items: Sequence[tuple[int, codec.Buffer | None]], *,
                           raw: Container[int] = (), keep: Container[int] = ()) -> None:
        """Store blocks as new records (``None`` unmaps) and point the map at them; with
        ``compress``, lz4 is tried on each block but those in ``raw``. Blocks in ``keep``
        go into the record cache as they are written (invariant 6).

        The change is in memory until the next ``commit``; the records are written (not
        synced) before the map moves, so a commit never references unwritten data.
        """
        self._hooks.check_ok()
        if map_id not in self.state.maps:
            raise StorageError(f"map {map_id} does not exist")
        blocks = [b for b, d in items if d is not None]
        datas = [d for _b, d in items if d is not None]
        tries = [compress and b not in raw for b in blocks]
        size = max((len(d) for d in datas), default=1) or 1
        step = max(PIPELINE_MIN, PIPELINE_BYTES // size)
        cuts = [(lo, min(lo + step, len(datas))) for lo in range(0, len(datas), step)]
        kept = [d if b in keep else None for b, d in zip(blocks, datas, strict=True)] \
            if keep else None
        if len(cuts) == 1:
            encoded = await self.encode(datas, prof, tries)
            await self._store_and_map(map_id, prof, blocks, encoded, kept)
        elif cuts:
            await self._pipeline(map_id, prof, blocks, datas, tries, cuts, kept)
        holes = [block for block, maybe in items if maybe is None]
        if holes:
            self._hooks.do_map_sets(map_id, holes, [HOLE] * len(holes))
        self._hooks.reap()

    async def _store_and_map(self, map_id: int, prof: Profile, blocks: Sequence[int],
                             encoded: Sequence[codec.EncodedRecord],
                             kept: Sequence[codec.Buffer | None] | None) -> None:
        """Store one batch and point the map at its records (invariant 2), then reap:
        no await between the entries coming back and the map moving. ``kept``: the
        blocks (None for the others) that go into the record cache (invariant 6)."""
        self._hooks.check_ok()
        entries = await self.store(prof, encoded)
        if kept is not None:
            # The versions these blocks replace leave the cache (a snapshot that still
            # holds one reads it from the devices), so a small write's new block buffer
            # reuses the memory of the one before instead of fresh pages.
            get, drop = self.state.forest.get, self._cache.drop
            for block, data in zip(blocks, kept, strict=True):
                if data is not None and (old := get(map_id, block)) is not None:
                    drop(old)
        self._hooks.do_map_sets(map_id, blocks, entries)
        if kept is not None:
            put = self._cache.put
            for entry, data in zip(entries, kept, strict=True):
                if data is not None:
                    put(entry, memoryview(data).toreadonly())
        self._hooks.reap()

    async def _pipeline(self, map_id: int, prof: Profile, blocks: Sequence[int],
                        datas: Sequence[codec.Buffer], tries: Sequence[bool],
                        cuts: Sequence[tuple[int, int]],
                        kept: Sequence[codec.Buffer | None] | None) -> None:
        """Invariant 5: an encoder task encodes the batches ``cuts`` in order (each in
        one or two thread hops, ``encode``) into a bounded channel; this task stores and
        maps them in the same order. The first error of either stage stops both and is
        re-raised as itself."""
        send, recv = trio.open_memory_channel[list[codec.EncodedRecord]](PIPELINE_AHEAD)
        failure: list[BaseException] = []

        async def encoder() -> None:
            async with send:
                try:
                    for lo, hi in cuts:
                        await send.send(await self.encode(list(datas[lo:hi]), prof,
                                                          list(tries[lo:hi])))
                except trio.BrokenResourceError:
                    pass                    # the store stopped: its error is the one
                except Exception as e:
                    failure.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(encoder)
            try:
                async with recv:
                    at = 0
                    async for encoded in recv:
                        lo, hi = cuts[at]
                        at += 1
                        await self._store_and_map(map_id, prof, blocks[lo:hi], encoded,
                                                  None if kept is None else kept[lo:hi])
            except Exception as e:
                failure.append(e)
                nursery.cancel_scope.cancel()
        if failure:
            raise failure[0]

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
            return await trio.to_thread.run_sync(codec.encode_all, datas, prof.k, prof.m,
                                                 compress, limiter=self._cpu)
        half = len(datas) // 2
        parts: list[list[codec.EncodedRecord]] = [[], []]

        async def one(i: int, lo: int, hi: int) -> None:
            parts[i] = await trio.to_thread.run_sync(codec.encode_all, datas[lo:hi],
                                                     prof.k, prof.m, compress[lo:hi],
                                                     limiter=self._cpu)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0, 0, half)
            nursery.start_soon(one, 1, half, len(datas))
        return parts[0] + parts[1]

