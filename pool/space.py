"""Space accounting: what is free, what is promised, and the reserves that keep a full pool
working (DESIGN invariant 8), composed by ``Pool`` as ``Pool.space``. It asks the segment
store (``pool.store``) for the room its free space still forms and for capacity, and knows
nothing of the Pool facade: what it needs of the pool (commit, reap, clean, write back
the volumes' buffers) comes through ``SpaceHooks``.

The rules S1-S6 are in docs/INTERNALS.md "Space" (the tests cite them). In short: S1 a
block is charged its record's share of a segment; S2 client writes leave the cleaner's
and the zeroing reserve alone, and the cleaner only moves what fits in the unreserved
space; S3 a reservation that does not fit makes room under the room lock, in turn, and
fails only when nothing can be won back; S4 everything buffered holds its reservation
until written, so a flush never needs unpromised space; S5 freed extents wait only for
reads older than their freeing commit (the store's invariant 3); S6 no segment that
nothing references is left unfreed.

Invariants this module owns (DESIGN numbers in parentheses):

1. ``reserved`` is the sum of what ``reserve``/``reserve_wait``/``make_room`` granted
   minus what ``unreserve`` returned, never below zero; ``available_bytes`` is the
   store's free bytes plus the open segments' room minus ``reserved`` (6).
2. A grant never takes the cleaner's reserve (two segments of the widest profile), and
   only a zeroing grant takes the zeroing reserve (S2; 8).
3. While a task makes room (the room lock is held), no other grant is made outside the
   lock's queue: ``reserve`` refuses, ``reserve_wait`` queues (S3).
4. ``make_room`` raises NoSpace only after a round in which nothing could be won back
   (S3; 8), and then grants nothing.
5. Past META_RESERVE of the metadata area, only zeroing grants are made: the rest is
   kept for the commits of deletes, trims and snapshot removal (8).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from pool import codec
from pool.errors import NoSpace
from pool.layout import SECTOR
from pool.profile import Profile
from pool.state import PoolState, Segment
from pool.store import Reclaim, SegmentStore

META_RESERVE = 0.9   # writes stop when the metadata area is this full
ZEROING_RESERVE_RECORDS = 4   # largest records kept for trims' partial blocks (rule S2)


@dataclass(frozen=True, slots=True)
class SpaceHooks:
    """What making room needs of the pool that composes the account."""

    check_ok: Callable[[], None]                 # raise if the pool cannot be written
    reap: Callable[[], None]                     # free segments nothing references (S6)
    commit: Callable[[], Awaitable[None]]        # make the frees durable
    clean_one: Callable[[], Awaitable[bool]]     # the cleaner: empty one segment
    writebacks: Callable[[], Sequence[Callable[[], Awaitable[None]]]]  # volumes' buffers
    metadata_used: Callable[[], float]           # fraction of the metadata area in use


class SpaceAccount:
    """The pool's usage, reservations and reserves (``Pool.space``).

    ``open_segments`` is the pool's own dict of open segments by (k, m), whose unused
    room counts as available."""

    def __init__(self, state: PoolState, store: SegmentStore, extent_size: int,
                 open_segments: dict[tuple[int, int], Segment], host: SpaceHooks) -> None:
        self.state = state
        self._store = store
        self._extent = extent_size
        self._open = open_segments
        self._host = host
        self.reserved = 0
        # Per profile, the largest record charged or stored (an open segment's tail that
        # may not fit one more); the largest block charge (the zeroing reserve is counted
        # in them); the room lock that reservations making room take in turn (the
        # cleaner has its own lock).
        self.tail_units: dict[tuple[int, int], int] = {}
        self._largest_cost = 0
        self._room_lock = trio.Lock()
        self._widest: tuple[tuple[int, int], int] = ((-1, -1), 1)   # see cleaner_reserve

    def record_cost(self, block_size: int, prof: Profile) -> int:
        """Device bytes one block of this profile is charged (rule S1): its worst-case
        record's share of a segment, i.e. a segment's bytes divided by how many such
        records fit in one (the tail that does not fit one more is charged too)."""
        units = codec.worst_case_units(block_size, prof.k)
        cap = self._extent // SECTOR
        per_segment = max(1, cap // units)
        key = (prof.k, prof.m)
        self.tail_units[key] = max(self.tail_units.get(key, 1), units)
        self._largest_cost = max(self._largest_cost, -(-cap // per_segment) * SECTOR * prof.width)
        return -(-cap // per_segment) * SECTOR * prof.width

    def available_bytes(self, prof: Profile | None = None) -> int:
        """Device bytes not yet promised to anything. With a profile, only the free
        extents that can form its full stripes (k + m extents on distinct devices) count:
        a big new device beside full ones adds capacity, but no room for a wide stripe.
        An open segment's room counts without the tail that the largest record charged so
        far might not fit into (rule S1), and with a profile only its own open segment's."""
        free = self._store.room(prof).free_bytes
        cap = self._extent // SECTOR
        room = sum(max(0, cap - s.fill - self.tail_units.get(key, 1) + 1) * SECTOR * (s.k + s.m)
                   for key, s in self._open.items()
                   if prof is None or key == (prof.k, prof.m))
        return free + room - self.reserved

    def usable_capacity(self, prof: Profile) -> tuple[int, int]:
        """(size, avail): the data bytes that the present members hold, and that their free
        extents can still take, under ``prof`` —
        full stripes of k + m extents on distinct devices, of which k carry data. A
        mirror:2 pool of two 2 GiB devices holds about 2 GiB, not 4. Both are before
        compression, metadata and the cleaner's reserve."""
        size = self._store.room(prof).capacity_bytes * prof.k // prof.width
        avail = max(0, self.available_bytes(prof)) * prof.k // prof.width
        return size, min(size, avail)

    def cleaner_reserve(self) -> int:
        """Space client writes may not take: room for the cleaner to move one segment's
        records, so that space can always be won back (invariant 8)."""
        segs = self.state.segments
        key = (len(segs), self.state.next_id)   # changes when a segment comes or goes
        if self._widest[0] != key:
            self._widest = (key, max((s.k + s.m for s in segs.values()), default=1))
        return 2 * self._widest[1] * self._extent

    def zeroing_reserve(self) -> int:
        """Space only the partial-block rewrites of trims and write-zeroes may take (rule
        S2), so that they go on on a pool that writes have filled (invariant 8); each one
        leaves its old record dead, which the cleaner wins back for the next."""
        return ZEROING_RESERVE_RECORDS * self._largest_cost

    def check_writable(self, prof: Profile) -> None:
        """Refuse, before anything is acknowledged, writes of a profile that no segment can
        take: too few present members with free extents for its k + m fragments."""
        seg = self._open.get((prof.k, prof.m))
        if seg is not None and seg.fill < self._extent // SECTOR:
            return
        room = self._store.room(prof)
        if room.with_room + min(room.away_with_room, prof.m) < prof.width:
            if room.usable + min(room.away, prof.m) >= prof.width:
                return   # enough members, only full ones: reservations make room (S3)
            raise NoSpace(f"pool {self.state.name} cannot store {prof} records now: they need "
                          f"{prof.width} devices with free space, {room.with_room} of the "
                          f"{room.present} present have some ({room.missing} missing)")

    def _limit(self, prof: Profile | None, zeroing: bool) -> int:
        """Bytes a reservation of this kind may still take (rule S2)."""
        return (self.available_bytes(prof) - self.cleaner_reserve()
                - (0 if zeroing else self.zeroing_reserve()))

    def _refusal(self, nbytes: int, prof: Profile | None, zeroing: bool) -> NoSpace | None:
        """Why ``nbytes`` cannot be reserved now, or None when it can."""
        if self._host.metadata_used() > META_RESERVE and not zeroing:
            # The rest is kept for deletes, trims and snapshot removal, whose commits must
            # always fit (a checkpoint that cannot be written would fail the pool).
            return NoSpace(f"pool {self.state.name}: its metadata area is "
                           f"{100 * self._host.metadata_used():.0f}% full; delete snapshots or "
                           f"volumes, or trim, to make room")
        if nbytes > self._limit(prof, zeroing):
            return NoSpace(f"pool {self.state.name} is out of space" +
                           (f" for {prof} records" if prof is not None and
                            nbytes <= self._limit(None, zeroing) else ""))
        return None

    def reserve(self, nbytes: int, prof: Profile | None = None, *,
                zeroing: bool = False) -> None:
        """Promise space to a buffered write now, or raise NoSpace (invariant 8); with
        ``zeroing``, for the partial blocks of a trim or write-zeroes (rule S2)."""
        if not nbytes:
            return
        refusal = self._refusal(nbytes, prof, zeroing)
        if refusal is None and self._room_lock.locked():
            # Others wait for room in turn: do not take what is being won for them.
            refusal = NoSpace(f"pool {self.state.name} is making room")
        if refusal is not None:
            raise refusal
        self.reserved += nbytes

    async def reserve_wait(self, nbytes: int, prof: Profile | None = None, *,
                           zeroing: bool = False) -> None:
        """``reserve``, making room when it does not fit (rule S3): NoSpace only when the
        pool's live data, buffered writes included, and its reserves truly fill it."""
        if not nbytes:
            return
        if self._refusal(nbytes, prof, zeroing) is None and not self._room_lock.locked():
            self.reserved += nbytes
            return
        await self.make_room(nbytes, prof, zeroing=zeroing)

    async def make_room(self, nbytes: int, prof: Profile | None = None, *,
                        zeroing: bool = False) -> None:
        """Reserve ``nbytes``, winning space back first (rule S3). One task at a time makes
        room (the room lock, taken in arrival order), so concurrent reservations neither
        race each other's cleaning nor give up while another is winning space back: each
        waits its turn and tries again on what the one before won. A step that wins space
        (a segment cleaned, freed extents released, buffered overwrites written back, which
        kills the records they replace) is followed by another try; NoSpace only after a
        round in which nothing could be won."""
        async with self._room_lock:
            wrote_back = False
            while True:
                self._host.check_ok()
                self._host.reap()
                refusal = self._refusal(nbytes, prof, zeroing)
                if refusal is None:
                    self.reserved += nbytes
                    return
                if self._host.metadata_used() > META_RESERVE and not zeroing:
                    raise refusal
                reclaimed = await self._store.reclaim()
                if reclaimed is Reclaim.WAITED:
                    # Freed by a commit, still possibly read by reads begun before it.
                    continue
                if await self._host.clean_one() or reclaimed is Reclaim.COMMIT:
                    await self._host.commit()      # (which frees the cleaned segment)
                    continue
                if not wrote_back:
                    # Buffered overwrites hold their old records live and a worst-case
                    # reservation each: written back, the old ones become cleanable.
                    wrote_back = True
                    for writeback in self._host.writebacks():
                        await writeback()
                    continue
                raise refusal

    def unreserve(self, nbytes: int) -> None:
        self.reserved = max(0, self.reserved - nbytes)

