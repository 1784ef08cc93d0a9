"""A pool: member devices, their extents, segments of records, and the metadata that ties
them together.

Invariants this module owns (numbers from shared/DESIGN.md):

1. Durability: ``commit`` returns only after every record referenced by the committed ops
   and the journal entry (or checkpoint) describing them are synced on every member.
2. Atomic metadata: a commit is one journal entry or one superblock flip; replay takes
   whole entries only (``MetaStore``).
3. No in-place overwrite: records go to never-used space at the end of open segments;
   extents of a freed segment are reused only after the freeing commit is durable and no
   read that might still use them is in flight; checkpoint blobs go to free units.
4. Checksums: every fragment and metadata blob is verified on read (``records``,
   ``MetaStore``); a record that cannot be verified raises ``MediumError``.
5. Redundancy: records use their profile's k + m columns on distinct members; metadata is
   mirrored on every member.

State machine of a Pool object: OPEN -> FAILED -> CLOSED, or OPEN -> CLOSED; its diagram,
and every way into FAILED, are in ``pool.txn`` (``Transaction``, which ``Pool.txn`` is).

Background work (discarding freed extents) runs in ``Pool.run``, in a nursery its owner
holds; without a runner it is done at ``settle_discards`` and ``close``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
from functools import lru_cache, partial
from types import MappingProxyType
from typing import Any, TypeVar

import trio

from pool import codec, importer, readcache, records
from pool import owner as owners
from pool.catalog import Catalog
from pool.cleaner import SegmentCleaner
from pool.deadlines import Deadlines
from pool.device import Device
from pool.devio import close_devices
from pool.devio import write_within as _write_within
from pool.errors import (
    DeviceError,
    DeviceHung,
    InvalidArgument,
    MediumError,
    NoSpace,
    NotFound,
    StorageError,
)
from pool.health import MemberHealth
from pool.labels import label_copies
from pool.labels import wipe as _wipe
from pool.labels import write_label as _write_label
from pool.layout import (
    DEFAULT_EXTENT,
    SECTOR,
    Label,
    Layout,
)
from pool.members import Members
from pool.metastore import Loc, MetaStore, Superblock
from pool.profile import Profile
from pool.state import (
    ENTRY,
    HOLE,
    MemberInfo,
    Op,
    PoolState,
    Segment,
    op_json,
    op_map_set,
)
from pool.status import PoolStatistics
from pool.tuning import PoolTuning
from pool.txn import CommitHooks, Transaction

log = logging.getLogger(__name__)
T = TypeVar("T")
META_RESERVE = 0.9   # writes stop when the metadata area is this full
_NODE_UNITS = 7      # 4 KiB units of the largest map node blob (a 24 KiB leaf, lz4 framed)
_STATE_UNITS_GUESS = 4
DISCARD_BATCH = 256   # freed extents discarded per round of the discard task
DISCARD_DELAY = 10.0  # seconds an extent stays free before it is discarded
ZEROING_RESERVE_RECORDS = 4   # largest records kept for trims' partial blocks (rule S2)


class Pool:
    """An imported pool. Build one with ``Pool.create`` or ``Pool.open``."""

    def __init__(self, state: PoolState, layout: Layout, devices: list[Device | None],
                 meta: MetaStore, superblock: Superblock | None,
                 tuning: PoolTuning | None = None) -> None:
        self.tuning = tuning = tuning if tuning is not None else PoolTuning()
        # The live part of the tuning (deadlines invariant 1): the MetaStore's, built from
        # ``tuning`` by create/open, changed in place by a reload.
        self.deadlines: Deadlines = meta.deadlines
        self.state = state
        self.layout = layout
        self.devices = devices
        self.meta = meta
        self._free: list[set[int]] = [set() for _ in state.members]
        self._pending_free: list[tuple[int, int]] = []   # freed by uncommitted ops
        # Committed frees (generation, member, extent), waiting for older readers.
        self._releasable: list[tuple[int, int, int]] = []
        # Free extents to discard (hole punch / BLKDISCARD: thin backing files and SSDs
        # get the space back), and those being discarded now (writes into one of these,
        # reused meanwhile, wait for its discard: see _store).
        self.discard_freed = tuning.discard_freed
        self._discard_queue: dict[tuple[int, int], float] = {}   # -> when it was freed
        self._discarding: dict[tuple[int, int], trio.Event] = {}
        self._running = False                       # a ``run`` task is serving the pool
        self._settled = trio.Event()                # set after each round ``run`` finishes
        self._discard_wake = trio.Event()           # cut the runner's wait short
        self._settling = 0                          # settle_discards waiting: discard all now
        self._discard_lock = trio.Lock()            # one inline discarder without a runner
        self._open: dict[tuple[int, int], Segment] = {}
        self._pins: dict[int, int] = {}
        self._fill_moved: set[int] = set()   # segments whose fill changed since last commit
        self._column_cache: dict[int, tuple[tuple[Device | None, int, str], ...]] = {}
        # Verified logical blocks of recent small reads, keyed by map entry (an LRU).
        self.record_cache = readcache.RecordCache(tuning.record_cache)
        self.cleaner = SegmentCleaner(self)
        self._zero_block = b""     # zeros for holes read into a caller's buffer
        # Pending ops, group commit, OPEN / FAILED / CLOSED (pool.txn). Its lock and the set
        # of members written since the last commit, under the names the pool uses.
        self.txn = Transaction(state, meta, layout, superblock, CommitHooks(
            self._confirm_owner, self._sync_members, self._absorb_meta_failures,
            self._seal_fills, self._frees_pending, self._after_commit))
        self._commit_lock = self.txn.lock
        self._dirty_devices = self.txn.dirty
        # Objects and block maps (pool.catalog), changed through the transaction.
        self.catalog = Catalog(state, self.txn, self._reap)
        # The owner record this daemon keeps on every member (pool.owner.OwnerKeeper).
        self.owner_keeper = owners.OwnerKeeper(self)
        self._reserved = 0
        # Space (see the rules at ``record_cost``): per profile, the largest record
        # charged or stored (an open segment's tail that may not fit one more); the
        # largest block charge (the zeroing reserve is counted in them); the room lock
        # that reservations making room take in turn (the cleaner has its own lock).
        self._tail_units: dict[tuple[int, int], int] = {}
        self._largest_cost = 0
        self._room_lock = trio.Lock()
        self._released = trio.Event()   # set (and replaced) when freed extents come back
        # Reads in flight by the release generation they began in: extents freed by a
        # commit of generation g are reused once no read begun before g is in flight.
        self._release_gen = 0
        self._readers: Counter[int] = Counter()
        self._pin_gens: dict[int, list[int]] = {}
        self._caches: list[Callable[[], Awaitable[None]]] = []
        self._limiters = [trio.CapacityLimiter(4) for _ in devices]
        # Per member: read / write / checksum errors, the fault threshold, why a member is
        # away, and epochs (bumped each time it goes away, so a rebuild that started on a
        # segment before that does not clear marks set while it was away: mark_rebuilt).
        self.member_health = MemberHealth(len(devices), self.fault)
        # Fault, add, offline/online, replace, remove; parked devices of away members.
        self.members = Members(self, self.member_health)
        self._widest: tuple[tuple[int, int], int] = ((-1, -1), 1)   # see _cleaner_reserve
        self._avoid: set[int] = set()    # members new segments must not use (removal)
        # Devices given to the import but left out of it (path -> reason): see ``open``.
        self.left_out: dict[str, str] = {}
        # What the maintenance engines (pool.scrub, pool.rebuild) report while they run.
        self.activity: dict[str, Any] = {}
        self._cpu = trio.CapacityLimiter(2)
        self._bg = trio.CapacityLimiter(1)   # scrub/rebuild work: one core at most
        self._bg_writes = trio.CapacityLimiter(1)  # their writes (I/O, beside the work)
        self._counters = dict.fromkeys(
            ("commits", "checkpoints", "records_written", "records_read", "degraded_reads",
             "repaired_fragments", "unreadable_records", "records_relocated",
            "rebuilt_bytes", "scrubbed_bytes", "discarded_extents"), 0)

    # ==== creation and import (pool.importer) ==============================================
    @classmethod
    async def create(cls, name: str, devices: Sequence[Device], *, profile: str = "plain",
                     extent_size: int = DEFAULT_EXTENT, meta_size: int | None = None,
                     force: bool = False, claim: owners.Claim | None = None,
                     tuning: PoolTuning | None = None) -> Pool:
        """Make a new pool on ``devices`` (their current contents are overwritten).

        Devices that carry a storaged label are refused unless ``force`` is given.
        ``claim``: the owner record to keep on the members (written with the labels).
        """
        return await importer.create(cls, name, devices, profile=profile,
                                     extent_size=extent_size, meta_size=meta_size,
                                     force=force, claim=claim, tuning=tuning)

    @classmethod
    async def open(cls, devices: Sequence[Device], *, name: str | None = None,
                   left_out: dict[str, str] | None = None,
                   claim: owners.Claim | None = None,
                   tuning: PoolTuning | None = None) -> Pool:
        """Import a pool from its member devices (any order, members may be missing).

        Refuses, changing nothing, when a device is unlabelled, truncated, of another pool,
        or a stale member, and when the members present cannot serve every segment.

        With ``left_out`` (a dict, filled in: path -> reason), a device that is damaged --
        unreadable, shorter than its label says, without an intact label, the same device
        as another one given, or without any intact superblock -- is instead closed and
        left out, as if it had not been given, and the pool imports degraded if the
        others can; what is left out is logged and kept in ``Pool.left_out``. A device
        of another pool or a stale copy of a member is still refused.

        ``claim``: the owner record to keep on the members; it is the first thing written,
        once everything was read and the import decided (DESIGN invariant 10).
        """
        return await importer.open_pool(cls, devices, name=name, left_out=left_out,
                                        claim=claim, tuning=tuning)

    def _label(self, mi: MemberInfo) -> Label:
        return Label(self.state.uuid, self.state.name, mi.uuid, mi.index,
                     self.state.generation, mi.size, self.layout)

    # ==== small helpers ===================================================================
    def _do(self, op: Op) -> None:
        self.txn.do(op)

    def _check_ok(self) -> None:
        self.txn.check_ok()

    def fail(self, reason: str) -> None:
        """Stop all I/O to the pool (``Transaction.fail``: FAILED, refused with PoolFailed
        until a re-import)."""
        self.txn.fail(reason)

    # The transaction's state under the names the rest of the pool still uses (pool.txn);
    # read-only: the way into FAILED is ``fail``.
    @property
    def _failed(self) -> str | None:
        return self.txn.failed

    @property
    def _closed(self) -> bool:
        return self.txn.closed

    @property
    def _pending(self) -> list[Op]:
        return self.txn.pending

    @property
    def _sb_gen(self) -> int:
        return self.txn.sb_gen

    @property
    def _page_locs(self) -> dict[int, Loc]:
        return self.txn.page_locs

    @_page_locs.setter
    def _page_locs(self, locs: dict[int, Loc]) -> None:
        self.txn.page_locs = locs

    @property
    def _meta_locs(self) -> tuple[Loc, ...]:
        return self.txn.meta_locs

    @property
    def _meta_units_used(self) -> int:
        return self.txn.meta_units_used

    async def _on_devices(self, fn: Callable[[Device], None],
                          which: Sequence[int] | None = None) -> None:
        """Run ``fn(device)`` for each chosen present member, in parallel threads."""
        await self._per_device(self._calls(fn, which), "write")

    async def _sync_members(self, which: Sequence[int] | None = None) -> None:
        """Sync members; one whose sync fails is faulted (what it took may not be
        durable), and the commit goes on with the others."""
        failed = await self._per_device(self._calls(lambda d: d.sync(), which), "write",
                                        tolerate=True, what="a sync")
        for i, e in failed.items():
            self.fault(i, f"sync failed: {e.message}", full=True)
        if not any(d is not None for d in self.devices):
            raise DeviceError(f"pool {self.state.name}: no member could be synced")

    def _calls(self, fn: Callable[[Device], None],
               which: Sequence[int] | None = None) -> list[tuple[int, Callable[[], None]]]:
        idx = [i for i in (which if which is not None else range(len(self.devices)))
               if self.devices[i] is not None]
        calls: list[tuple[int, Callable[[], None]]] = []
        for i in idx:
            dev = self.devices[i]
            assert dev is not None
            calls.append((i, partial(fn, dev)))
        return calls

    async def _per_device(self, calls: Sequence[tuple[int, Callable[[], None]]],
                          kind: str, *, tolerate: bool = False,
                          what: str = "a write") -> dict[int, DeviceError]:
        """Run blocking calls, one per member, in parallel threads. A DeviceError is
        counted against its member and the first one re-raised as itself (not as an
        exception group), so callers can handle it as the I/O error it is; with
        ``tolerate`` the failures are returned instead (member -> error).

        A call that has not returned after ``self.deadlines.write`` seconds is given up
        (its thread is left to finish) and fails with a DeviceError, and its member is
        faulted at once, for a full rebuild (the stuck write may still land). The wait
        is shielded from the caller's cancellation, as a thread's always was: only the
        deadline abandons a call."""
        failures: dict[int, DeviceError] = {}
        hung: list[int] = []
        timeout = self.deadlines.write

        async def one(i: int, call: Callable[[], None]) -> None:
            dev = self.devices[i]
            with trio.CancelScope(shield=True) as scope:
                if timeout is not None:
                    scope.deadline = trio.current_time() + timeout
                try:
                    await trio.to_thread.run_sync(call, limiter=self._limiters[i],
                                                  abandon_on_cancel=timeout is not None)
                except DeviceError as e:
                    failures[i] = e
            if scope.cancelled_caught and dev is not None and timeout is not None:
                failures[i] = records.timed_out(what, dev, timeout)
                hung.append(i)
        async with trio.open_nursery() as nursery:
            for i, call in calls:
                nursery.start_soon(one, i, call)
        for i in hung:
            self.fault(i, failures[i].message, full=True)
        for i, e in failures.items():
            self.count_error(i, kind, e.message)
        if failures and not tolerate:
            raise next(iter(failures.values()))
        return failures

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def uuid(self) -> str:
        return self.state.uuid

    @property
    def default_profile(self) -> Profile:
        return Profile.parse(self.state.profile)

    # ==== metadata objects and maps (used by the volumes layer; pool.catalog) ===========
    def objects(self) -> dict[int, dict[str, Any]]:
        return self.catalog.objects()

    def put_object(self, value: dict[str, Any], obj_id: int | None = None) -> int:
        return self.catalog.put_object(value, obj_id)

    def delete_object(self, obj_id: int) -> None:
        self.catalog.delete_object(obj_id)

    def create_map(self) -> int:
        return self.catalog.create_map()

    def clone_map(self, src: int) -> int:
        return self.catalog.clone_map(src)

    def diff_maps(self, a: int, b: int) -> list[int]:
        return self.catalog.diff_maps(a, b)

    def exclusive_bytes(self, map_id: int) -> int:
        return self.catalog.exclusive_bytes(map_id)

    def record_space(self) -> tuple[int, int]:
        return self.catalog.record_space()

    def delete_map(self, map_id: int) -> None:
        self.catalog.delete_map(map_id)

    def clear_map_range(self, map_id: int, start: int, count: int) -> None:
        self.catalog.clear_map_range(map_id, start, count)

    def is_mapped(self, map_id: int, block: int) -> bool:
        return self.catalog.is_mapped(map_id, block)

    def mapped_blocks(self, map_id: int, start: int, end: int) -> list[int]:
        return self.catalog.mapped_blocks(map_id, start, end)

    def any_compressed(self, map_id: int, start: int, count: int) -> bool:
        return self.catalog.any_compressed(map_id, start, count)

    def mapped_count(self, map_id: int) -> int:
        return self.catalog.mapped_count(map_id)

    def mapped_among(self, map_id: int, blocks: Iterable[int]) -> set[int]:
        return self.catalog.mapped_among(map_id, blocks)

    def stored_bytes(self, map_id: int) -> int:
        return self.catalog.stored_bytes(map_id)

    # ==== space ===========================================================================
    # The space rules, S1-S6, are in docs/INTERNALS.md "Space" (the tests cite them). In
    # short: S1 a block is charged its record's share of a segment; S2 client writes leave
    # the cleaner's and the zeroing reserve alone, and the cleaner only moves what fits in
    # the unreserved space; S3 a reservation that does not fit makes room under the room
    # lock, in turn, and fails only when nothing can be won back; S4 everything buffered
    # holds its reservation until written, so a flush never needs unpromised space; S5
    # freed extents wait only for reads older than their freeing commit; S6 no segment
    # that nothing references is left unfreed.
    def record_cost(self, block_size: int, prof: Profile) -> int:
        """Device bytes one block of this profile is charged (rule S1): its worst-case
        record's share of a segment, i.e. a segment's bytes divided by how many such
        records fit in one (the tail that does not fit one more is charged too)."""
        units = codec.worst_case_units(block_size, prof.k)
        cap = self.layout.extent_size // SECTOR
        per_segment = max(1, cap // units)
        key = (prof.k, prof.m)
        self._tail_units[key] = max(self._tail_units.get(key, 1), units)
        self._largest_cost = max(self._largest_cost, -(-cap // per_segment) * SECTOR * prof.width)
        return -(-cap // per_segment) * SECTOR * prof.width

    def available_bytes(self, prof: Profile | None = None) -> int:
        """Device bytes not yet promised to anything. With a profile, only the free
        extents that can form its full stripes (k + m extents on distinct devices) count:
        a big new device beside full ones adds capacity, but no room for a wide stripe.
        An open segment's room counts without the tail that the largest record charged so
        far might not fit into (rule S1), and with a profile only its own open segment's."""
        counts = [len(f) for i, f in enumerate(self._free) if self.devices[i] is not None]
        if prof is None:
            free = sum(counts)
        else:
            # Members away take degraded stripes' columns (rebuilt later), up to m of them.
            away = sorted((len(f) for i, f in enumerate(self._free) if self._placeable(i)
                           and self.devices[i] is None), reverse=True)[:prof.m]
            free = prof.width * _stripes(tuple(counts + away), prof.width)
        cap = self.layout.extent_size // SECTOR
        room = sum(max(0, cap - s.fill - self._tail_units.get(key, 1) + 1) * SECTOR * (s.k + s.m)
                   for key, s in self._open.items()
                   if prof is None or key == (prof.k, prof.m))
        return free * self.layout.extent_size + room - self._reserved

    def usable_capacity(self, prof: Profile | None = None) -> tuple[int, int]:
        """(size, avail): the data bytes that the present members hold, and that their free
        extents can still take, under ``prof`` (default: the pool's default profile) —
        full stripes of k + m extents on distinct devices, of which k carry data. A
        mirror:2 pool of two 2 GiB devices holds about 2 GiB, not 4. Both are before
        compression, metadata and the cleaner's reserve."""
        prof = prof or self.default_profile
        ext = self.layout.extent_size
        counts = tuple(mi.n_extents for mi in self.state.members
                       if self.devices[mi.index] is not None)
        size = _stripes(counts, prof.width) * prof.k * ext
        avail = max(0, self.available_bytes(prof)) * prof.k // prof.width
        return size, min(size, avail)

    def _cleaner_reserve(self) -> int:
        """Space client writes may not take: room for the cleaner to move one segment's
        records, so that space can always be won back (invariant 8)."""
        segs = self.state.segments
        key = (len(segs), self.state.next_id)   # changes when a segment comes or goes
        if self._widest[0] != key:
            self._widest = (key, max((s.k + s.m for s in segs.values()), default=1))
        return 2 * self._widest[1] * self.layout.extent_size

    def _zeroing_reserve(self) -> int:
        """Space only the partial-block rewrites of trims and write-zeroes may take (rule
        S2), so that they go on on a pool that writes have filled (invariant 8); each one
        leaves its old record dead, which the cleaner wins back for the next."""
        return ZEROING_RESERVE_RECORDS * self._largest_cost

    def metadata_used(self) -> float:
        """Fraction of the metadata page area in use: what the last checkpoint wrote plus,
        at worst-case size, every map node changed since (the next checkpoint writes them
        beside the old copies)."""
        pending = len(self.state.forest.dirty) * _NODE_UNITS + 2 * _STATE_UNITS_GUESS
        return (self._meta_units_used + pending) / self.meta.n_units

    def check_writable(self, prof: Profile) -> None:
        """Refuse, before anything is acknowledged, writes of a profile that no segment can
        take: too few present members with free extents for its k + m fragments."""
        seg = self._open.get((prof.k, prof.m))
        if seg is not None and seg.fill < self.layout.extent_size // SECTOR:
            return
        able = sum(1 for i, f in enumerate(self._free) if f and self.devices[i] is not None
                   and i not in self._avoid)
        away = sum(1 for i, f in enumerate(self._free) if f and self.devices[i] is None
                   and self._placeable(i))
        if able + min(away, prof.m) < prof.width:
            members = sum(1 for i, d in enumerate(self.devices)
                          if d is not None and i not in self._avoid)
            gone = sum(1 for i, d in enumerate(self.devices)
                       if d is None and self._placeable(i))
            if members + min(gone, prof.m) >= prof.width:
                return   # enough members, only full ones: reservations make room (S3)
            present = sum(1 for d in self.devices if d is not None)
            raise NoSpace(f"pool {self.state.name} cannot store {prof} records now: they need "
                          f"{prof.width} devices with free space, {able} of the {present} "
                          f"present have some ({len(self.devices) - present} missing)")

    def _limit(self, prof: Profile | None, zeroing: bool) -> int:
        """Bytes a reservation of this kind may still take (rule S2)."""
        return (self.available_bytes(prof) - self._cleaner_reserve()
                - (0 if zeroing else self._zeroing_reserve()))

    def _refusal(self, nbytes: int, prof: Profile | None, zeroing: bool) -> NoSpace | None:
        """Why ``nbytes`` cannot be reserved now, or None when it can."""
        if self.metadata_used() > META_RESERVE and not zeroing:
            # The rest is kept for deletes, trims and snapshot removal, whose commits must
            # always fit (a checkpoint that cannot be written would fail the pool).
            return NoSpace(f"pool {self.state.name}: its metadata area is "
                           f"{100 * self.metadata_used():.0f}% full; delete snapshots or "
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
        self._reserved += nbytes

    async def reserve_wait(self, nbytes: int, prof: Profile | None = None, *,
                           zeroing: bool = False) -> None:
        """``reserve``, making room when it does not fit (rule S3): NoSpace only when the
        pool's live data, buffered writes included, and its reserves truly fill it."""
        if not nbytes:
            return
        if self._refusal(nbytes, prof, zeroing) is None and not self._room_lock.locked():
            self._reserved += nbytes
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
                self._check_ok()
                self._reap()
                refusal = self._refusal(nbytes, prof, zeroing)
                if refusal is None:
                    self._reserved += nbytes
                    return
                if self.metadata_used() > META_RESERVE and not zeroing:
                    raise refusal
                self._release_extents()
                if self._releasable:
                    # Freed by a commit, still possibly read by reads begun before it.
                    await self._released.wait()
                    continue
                if await self.cleaner.clean_one() or self._pending_free:
                    await self.commit()      # (which frees the cleaned segment)
                    continue
                if not wrote_back:
                    # Buffered overwrites hold their old records live and a worst-case
                    # reservation each: written back, the old ones become cleanable.
                    wrote_back = True
                    for writeback in self._caches:
                        await writeback()
                    continue
                raise refusal

    def unreserve(self, nbytes: int) -> None:
        self._reserved = max(0, self._reserved - nbytes)

    def _room(self, prof: tuple[int, int], units: int) -> Segment:
        seg = self._open.get(prof)
        cap = self.layout.extent_size // SECTOR
        if seg is not None and seg.fill + units <= cap:
            return seg
        if seg is not None:
            del self._open[prof]
            if seg.live == 0:
                self.state.emptied.add(seg.id)
            self._reap()
        seg = self._new_segment(*prof)
        self._open[prof] = seg
        return seg

    def _new_segment(self, k: int, m: int) -> Segment:
        candidates = sorted(
            (i for i, f in enumerate(self._free) if f and self.devices[i] is not None
             and i not in self._avoid),
            key=lambda i: (-len(self._free[i]), i))
        if len(candidates) < k + m:
            # Degraded: members away take up to m columns, which a rebuild fills in later
            # (their marks say so), so writes go on while redundancy allows.
            away = sorted((i for i, f in enumerate(self._free) if f and self._placeable(i)
                           and self.devices[i] is None),
                          key=lambda i: (-len(self._free[i]), i))
            candidates += away[:min(m, k + m - len(candidates))]
        if len(candidates) < k + m:
            raise NoSpace(f"pool {self.state.name}: no room for a new {Profile(k, m)} segment "
                          f"(needs free extents on {k + m} distinct devices, "
                          f"{len(candidates)} have some)")
        chosen = sorted(candidates[:k + m])
        extents = []
        for i in chosen:
            e = min(self._free[i])
            self._free[i].discard(e)
            self._discard_queue.pop((i, e), None)   # about to be written: no need
            extents.append([i, e])
        seg_id = self.state.next_id
        self._do(op_json(op="seg_new", id=seg_id, k=k, m=m, extents=extents,
                         birth=self.state.txg + 1))
        return self.state.segments[seg_id]

    def _placeable(self, index: int) -> bool:
        """Whether a segment may put a column on this member (away members included)."""
        return index not in self._avoid and self.state.members[index].state != "removed"

    def _reap(self) -> None:
        """Free segments that hold no live record and can take no more."""
        open_ids = {s.id for s in self._open.values()}
        for seg_id in sorted(self.state.emptied):
            if seg_id in open_ids or self._pins.get(seg_id):
                continue
            seg = self.state.segments.get(seg_id)
            if seg is None or seg.live:
                self.state.emptied.discard(seg_id)
                continue
            self._do(op_json(op="seg_free", id=seg_id))
            self._pending_free.extend(seg.extents)
            self._column_cache.pop(seg_id, None)

    def _read_begin(self) -> int:
        """Note a read (or a pin) in flight; returns its generation for ``_read_end``."""
        gen = self._release_gen
        self._readers[gen] += 1
        return gen

    def _read_end(self, gen: int) -> None:
        self._readers[gen] -= 1
        if not self._readers[gen]:
            del self._readers[gen]
        self._release_extents()

    def _release_extents(self) -> None:
        """Give back the extents of freed segments that no read in flight may still use:
        those freed by a commit before the oldest such read began (a read begun later
        found no reference to them). Reads that keep coming never hold them back."""
        if not self._releasable:
            return
        oldest = min(self._readers) if self._readers else self._release_gen + 1
        ready = [(i, e) for gen, i, e in self._releasable if gen <= oldest]
        if not ready:
            return
        self._releasable = [r for r in self._releasable if r[0] > oldest]
        now = trio.current_time()
        for idx, e in ready:
            if idx < len(self._free):
                self._free[idx].add(e)
                if self.discard_freed:
                    self._discard_queue[(idx, e)] = now
        self._released.set()
        self._released = trio.Event()
        if self._discard_queue:
            self._discard_wake.set()                # the runner, if any, takes them

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The pool's background work, in a nursery its owner holds (the daemon's
        ``maintain``): discarding freed extents, each once it has stayed free
        DISCARD_DELAY seconds, so a flush never waits for it, and an extent reused before
        that (an overwrite frees segments that the next writes take again) is never
        discarded: a busy pool does not punch holes only to fill them again.

        Returns once the pool is closed (``close`` settles the discards first). An
        exception is not swallowed: the queue of extents still to discard is dropped
        (they stay free; discard is advisory) and the exception propagates to the owner,
        which logs it and starts ``run`` again. Without a runner (tools and tests that
        use a Pool alone), freed extents are discarded by ``settle_discards`` and
        ``close``, in the caller's task."""
        if self._running:
            raise InvalidArgument(f"pool {self.state.name}: its background task runs already")
        self._running = True
        task_status.started()
        try:
            while not self._closed:
                await self._discard_rounds()
                self._settled.set()
                if self._closed:
                    break
                self._discard_wake = trio.Event()
                await self._discard_wake.wait()
        except Exception:
            self._discard_queue.clear()
            raise
        finally:
            self._running = False
            self._settled.set()

    async def _discard_rounds(self) -> None:
        """Discard queued extents as they fall due (all of them at once while a
        ``settle_discards`` waits) until the queue is empty or the pool has failed."""
        while self._discard_queue and self._failed is None:
            now = trio.current_time()
            if not self._settling:
                due = min(self._discard_queue.values()) + DISCARD_DELAY
                if due > now:
                    self._discard_wake = trio.Event()
                    with trio.move_on_at(due):
                        await self._discard_wake.wait()
                    continue
            await self._discard_freed(now if self._settling else now - DISCARD_DELAY)

    async def settle_discards(self) -> None:
        """Discard every extent freed so far, now, and wait for it: the runner does it
        if one is running, else this task does."""
        self._settling += 1
        try:
            if not self._running:
                async with self._discard_lock:
                    await self._discard_rounds()
            while (self._running and self._failed is None
                   and (self._discard_queue or self._discarding)):
                settled = self._settled = trio.Event()
                self._discard_wake.set()
                await settled.wait()
        finally:
            self._settling -= 1
            self._discard_wake.set()        # a closed pool's runner sees it and returns

    async def _discard_freed(self, cutoff: float) -> None:
        """Discard extents freed (their frees committed) no later than ``cutoff``, one
        thread per member. They stay allocatable meanwhile: a segment given one of them
        waits for its discard before writing (``_store``), and one taken before its turn
        is not discarded at all. Discard is advisory: a device that cannot do it keeps
        the bytes, and one that fails it is charged a write error."""
        for key in [k for k in self._discard_queue
                    if k[0] >= len(self.devices) or self.devices[k[0]] is None]:
            del self._discard_queue[key]
        # A bounded batch: each member's share must finish well within the write timeout.
        batch = sorted(k for k, t in self._discard_queue.items() if t <= cutoff)
        batch = batch[:DISCARD_BATCH]
        for key in batch:
            del self._discard_queue[key]
        if not batch:
            return
        done = trio.Event()
        for key in batch:
            self._discarding[key] = done
        size = self.layout.extent_size
        by_member: dict[int, list[int]] = {}
        for i, e in batch:
            by_member.setdefault(i, []).append(self.layout.extent_offset(e))

        def punch(dev: Device, offsets: list[int]) -> None:
            for off in offsets:
                dev.discard(off, size)
        try:
            await self._per_device(
                [(i, partial(punch, dev, offs)) for i, offs in by_member.items()
                 if (dev := self.devices[i]) is not None],
                "write", tolerate=True, what="a discard")
            self._counters["discarded_extents"] += len(batch)
        finally:
            for key in batch:
                del self._discarding[key]
            done.set()

    # ==== the data path ===================================================================
    async def write_blocks(self, map_id: int, prof: Profile, compress: bool,
                           items: Sequence[tuple[int, codec.Buffer | None]], *,
                           raw: Container[int] = ()) -> None:
        """Store blocks as new records (``None`` unmaps) and point the map at them; with
        ``compress``, lz4 is tried on each block but those in ``raw``.

        The change is in memory until the next ``commit``; the records are written (not
        synced) before the map moves, so a commit never references unwritten data.
        """
        self._check_ok()
        if map_id not in self.state.maps:
            raise StorageError(f"map {map_id} does not exist")
        blocks = [b for b, d in items if d is not None]
        datas = [d for _b, d in items if d is not None]
        encoded = await self._encode(datas, prof,
                                     [compress and b not in raw for b in blocks])
        self._check_ok()
        entries = await self._store(prof, encoded)
        for block, entry in zip(blocks, entries, strict=True):
            self._do(op_map_set(map_id, block, entry))
        for block, maybe in items:
            if maybe is None:
                self._do(op_map_set(map_id, block, HOLE))
        self._reap()

    async def _store(self, prof: Profile,
                     encoded: Sequence[codec.EncodedRecord]) -> list[bytes]:
        """Place encoded records at the end of the profile's open segment(s), write them
        (one write per column per run), and return their map entries. The caller points
        maps at them afterwards: nothing references a record before it is written."""
        await self._confirm_owner()
        placed: list[tuple[Segment, int, codec.EncodedRecord]] = []
        writes: dict[int, list[tuple[Device, int, list[codec.Buffer]]]] = {}
        pinned: list[int] = []
        failed_store = False
        try:
            key = (prof.k, prof.m)
            if encoded:
                largest = max(rec.units for rec in encoded)
                if largest > self._tail_units.get(key, 1):
                    self._tail_units[key] = largest
            for rec in encoded:
                seg = self._room(key, rec.units)
                if not pinned or pinned[-1] != seg.id:
                    self._pins[seg.id] = self._pins.get(seg.id, 0) + 1
                    pinned.append(seg.id)
                placed.append((seg, seg.fill, rec))
                seg.fill += rec.units
                self._fill_moved.add(seg.id)
            i = 0
            while i < len(placed):
                j = i
                while j < len(placed) and placed[j][0] is placed[i][0]:
                    j += 1
                seg, off = placed[i][0], placed[i][1]
                for c, (idx, ext) in enumerate(seg.extents):
                    dev = self.devices[idx]
                    if dev is None:
                        continue
                    frags = [b for x in range(i, j) for b in placed[x][2].pieces[c]]
                    writes.setdefault(idx, []).append(
                        (dev, self.layout.extent_offset(ext) + off * SECTOR, frags))
                i = j
            if self._discarding:
                # A new segment may have been given an extent whose discard is under way.
                for seg_id in pinned:
                    for key in self.state.segments[seg_id].extents:
                        ev = self._discarding.get((key[0], key[1]))
                        if ev is not None:
                            await ev.wait()
            failed = await self._per_device([(idx, partial(records.write_columns, wl))
                                             for idx, wl in writes.items()], "write",
                                            tolerate=True)
            self._dirty_devices.update(i for i in writes if i not in failed)
            self._check_ok()
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
                self._pins[seg_id] -= 1
                if not self._pins[seg_id]:
                    del self._pins[seg_id]
            if failed_store:
                # Nobody will point at these records: a segment that holds only them (or
                # that emptied while we pinned it) must not linger unfreed.
                for seg_id in pinned:
                    sg = self.state.segments.get(seg_id)
                    if sg is not None and not sg.live:
                        self.state.emptied.add(seg_id)
                self._reap()

    def _degraded_store(self, placed: Sequence[tuple[Segment, int, codec.EncodedRecord]],
                        failed: set[int]) -> None:
        """Some column writes failed. The records stand if each still has k fragments
        (the member is marked for a rebuild of them); otherwise the write fails."""
        first: dict[int, int] = {}
        for seg, off, _rec in placed:
            first.setdefault(seg.id, off)
            absent = sum(1 for i, _e in seg.extents if self.devices[i] is None or i in failed)
            if absent > seg.m:
                raise MediumError(f"pool {self.state.name}: writes failed on "
                                  f"{len(failed)} device(s) and a {Profile(seg.k, seg.m)} "
                                  f"record cannot lose more than {seg.m} fragments")
        self._column_cache.clear()
        for seg_id, off in first.items():
            for i, _e in self.state.segments[seg_id].extents:
                if i in failed:
                    self._do(op_json(op="member_state", index=i,
                                     state=self.state.members[i].state,
                                     last_gen=self._sb_gen, marks=[[seg_id, off]]))

    # ==== member health ===================================================================
    def count_error(self, index: int, kind: str, why: str = "") -> None:
        """Count an I/O error ("read" | "write" | "checksum") against a member; one that
        reaches ``fault_threshold`` read + write errors is faulted (checksum errors are
        repaired and reported, not held against the device): ``MemberHealth.count``."""
        self.member_health.count(index, kind, why)

    @property
    def fault_threshold(self) -> int:
        """Read + write errors after which a member is faulted (pool.health)."""
        return self.member_health.threshold

    @fault_threshold.setter
    def fault_threshold(self, value: int) -> None:
        self.member_health.threshold = value

    @property
    def _epochs(self) -> list[int]:
        return self.member_health.epochs

    def fault(self, index: int, why: str, *, state: str = "faulted",
              full: bool = False) -> None:
        """``Members.fault``: stop using member ``index`` (faulted, or offline); I/O goes
        on degraded and what its segments miss is marked for a rebuild."""
        self.members.fault(index, why, state=state, full=full)

    def _absorb_meta_failures(self) -> None:
        self.members.absorb_meta_failures()

    def unavailable_segments(self) -> int:
        """Segments with more fragments away than their parity covers (reads fail)."""
        return self.members.unavailable_segments()

    @property
    def _parked(self) -> dict[int, Device]:
        """Devices of members that are faulted or offline (``Members.parked``)."""
        return self.members.parked

    def _forget_columns(self) -> None:
        """The members changed: segments' column lists are stale (used by Members)."""
        self._column_cache.clear()

    # ==== the segment cleaner (pool.cleaner) ==============================================
    async def clean(self, *, max_segments: int = 4, threshold: float = 0.5) -> int:
        """``SegmentCleaner.clean``: move the live records out of up to ``max_segments``
        closed segments whose live part is below ``threshold`` of what they hold; the
        number of segments emptied (the space returns at the next commit)."""
        return await self.cleaner.clean(max_segments=max_segments, threshold=threshold)

    async def _encode(self, datas: list[codec.Buffer], prof: Profile,
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

    def _columns(self, seg: Segment) -> tuple[tuple[Device | None, int, str], ...]:
        cols = self._column_cache.get(seg.id)
        if cols is None:
            cols = self._column_cache[seg.id] = tuple(
                self._column(idx, ext) if seg.id not in self.state.members[idx].marks
                else (None, 0, f"member {idx} (awaiting rebuild)")
                for idx, ext in seg.extents)
        return cols

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
        unpack = ENTRY.unpack
        result: list[bytes | memoryview | None] = [None] * len(blocks)
        cached = self.record_cache.get
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
                plen, flags, rhash, self._columns(seg)))
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
                self.record_cache.put(key, kept)
                result[slot] = kept
            else:
                result[slot] = data

    def read_block_nowait(self, map_id: int, block: int,
                          block_size: int) -> tuple[bool, bytes | memoryview | None]:
        """``read_blocks_nowait`` of one block: (whether it could be read at once, its
        content or None for a hole). A record-cache hit costs a map lookup."""
        if self._failed is None and not self.closed and map_id in self.state.maps:
            raw = self.state.forest.get(map_id, block)
            if raw is None:
                return True, None
            hit = self.record_cache.get(raw)
            if hit is not None:
                return True, hit
        got = self.read_blocks_nowait(map_id, (block,), block_size)
        return (False, None) if got is None else (True, got[0])

    def read_blocks_nowait(self, map_id: int, blocks: Sequence[int],
                           block_size: int) -> list[bytes | memoryview | None] | None:
        """``read_blocks`` if it can be done at once on the event loop (record-cache hits,
        page-cached healthy fragments), else None: the caller awaits ``read_blocks``."""
        if self._failed is not None or self.closed or map_id not in self.state.maps:
            return None
        entries, result, plans = self._read_plan(map_id, blocks)
        if plans:
            try:
                out = records.read_records(plans, block_size, self.deadlines, nowait=True)
            except records.WouldBlock:
                return None
            self._keep(out, entries, result)
        return result

    async def read_blocks(self, map_id: int, blocks: Sequence[int],
                          block_size: int) -> list[bytes | memoryview | None]:
        """The logical content of each block (``None`` for a hole), verified."""
        self._check_ok()
        if map_id not in self.state.maps:
            raise NotFound(f"map {map_id} no longer exists (its volume or snapshot was "
                           f"deleted)")
        entries, result, plans = self._read_plan(map_id, blocks)
        if not plans:
            return result
        try:
            # Page-cached, healthy data is served without a thread hop (~120 us here):
            # preadv(RWF_NOWAIT) never blocks, and verification is a hash per fragment.
            out = records.read_records(plans, block_size, self.deadlines, nowait=True)
        except records.WouldBlock:
            gen = self._read_begin()
            try:
                out = await trio.to_thread.run_sync(records.read_records, plans, block_size,
                                                    self.deadlines,
                                                    limiter=self._cpu)
            finally:
                self._read_end(gen)
        self._counters["degraded_reads"] += out.degraded
        if out.device_errors:
            paths = {d.path: i for i, d in enumerate(self.devices) if d is not None}
            for (path, kind), n in out.device_errors.items():
                if path in paths:
                    for _ in range(n):
                        self.count_error(paths[path], kind, f"{kind} error on {path}")
        if out.repairs:
            await self._repair(out.repairs)
        if out.failures:
            self._counters["unreadable_records"] += len(out.failures)
            slot, why = next(iter(out.failures.items()))
            log.error("pool %s: unreadable block %d of map %d: %s", self.state.name,
                      blocks[slot], map_id, why)
            raise MediumError(f"block {blocks[slot]}: {why}")
        self._keep(out, entries, result)
        return result

    async def read_blocks_into(self, map_id: int, blocks: Sequence[int], block_size: int,
                               dests: Sequence[memoryview]) -> None:
        """``read_blocks``, each block's content written into its ``dests`` entry (of
        ``block_size`` bytes; a hole as zeros) rather than returned: page-cached records
        are read straight into them, with no buffer of their own and no copy."""
        if self.read_blocks_into_nowait(map_id, blocks, block_size, dests):
            return
        got = await self.read_blocks(map_id, blocks, block_size)
        for dest, v in zip(dests, got, strict=True):
            dest[:] = v if v is not None else self._zeros(block_size)

    def read_blocks_into_nowait(self, map_id: int, blocks: Sequence[int], block_size: int,
                                dests: Sequence[memoryview]) -> bool:
        """``read_blocks_into`` if it can be done at once on the event loop (holes, and
        whole blocks stored raw in page-cached, healthy fragments); else False, and what
        ``dests`` hold is undefined."""
        if self._failed is not None or self.closed or map_id not in self.state.maps:
            return False
        runs = self._into_runs(map_id, blocks, block_size, dests)
        if runs is None:
            return False
        try:
            done = records.read_runs_into(runs, block_size, dests)
        except records.WouldBlock:
            return False
        self._counters["records_read"] += done
        return True

    def _into_runs(self, map_id: int, blocks: Sequence[int], block_size: int,
                   dests: Sequence[memoryview]) -> list[records.IntoRun] | None:
        """The records of ``blocks`` as runs for ``records.read_runs_into`` (holes are
        zeroed in ``dests`` here), or None if some block is not a whole block stored raw."""
        forest = self.state.forest
        if blocks and blocks[-1] - blocks[0] + 1 == len(blocks):
            spans = forest.leaf_spans(map_id, blocks[0], len(blocks))
        else:
            spans = [(1, forest.get(map_id, b) or HOLE) for b in blocks]
        segments = self.state.segments
        n, raw = spans[0] if len(spans) == 1 else (0, None)
        if raw is not None and n > 1:
            # The usual large read: records one after another in one segment. Checked
            # column-wise (a few C-level calls), not entry by entry.
            segs, offs, plens, flags, hashes = zip(*ENTRY.iter_unpack(raw), strict=True)
            seg = segments.get(segs[0])
            if (seg is not None and plens.count(block_size) == n and segs.count(seg.id) == n
                    and not any(flags) and not block_size % seg.k):
                units = codec.fragment_units(block_size, seg.k)
                if offs == tuple(range(offs[0], offs[0] + n * units, units)):
                    return [records.IntoRun(self._columns(seg), seg.k, seg.m, offs[0], units,
                                            list(range(n)), list(hashes))]
        runs: list[records.IntoRun] = []
        run: records.IntoRun | None = None
        run_seg = after = units = -1
        slot = 0
        for n, raw in spans:
            if raw is None:
                for _ in range(n):
                    dests[slot][:] = self._zeros(block_size)
                    slot += 1
                run = None
                continue
            for seg_id, off, plen, flags, rhash in ENTRY.iter_unpack(raw):
                if not plen:                   # a hole (HOLE unpacks to zeros)
                    dests[slot][:] = self._zeros(block_size)
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
                    run = records.IntoRun(self._columns(seg), seg.k, seg.m, off, units, [],
                                          [])
                    runs.append(run)
                    run_seg = seg_id
                run.slots.append(slot)
                run.hashes.append(rhash)
                after = off + units
                slot += 1
        return runs

    def _zeros(self, n: int) -> bytes:
        z = self._zero_block
        if len(z) != n:
            z = self._zero_block = bytes(n)
        return z

    def _column(self, idx: int, ext: int) -> tuple[Device | None, int, str]:
        dev = self.devices[idx]
        name = dev.path if dev is not None else f"member {idx} (missing)"
        return (dev, self.layout.extent_offset(ext), name)

    async def _repair(self, repairs: Sequence[records.Repair]) -> None:
        """Rewrite bad fragments a read rebuilt, one thread per member, under the write
        deadline: a member that hangs on the repair is faulted rather than hanging the
        read that found the damage."""
        # Heal only fragments of segments that still exist: a segment freed meanwhile
        # may not be reused yet (reads in flight hold frees back), but it is not ours.
        live = [r for r in repairs if r.segment in self.state.segments]
        index = {id(d): i for i, d in enumerate(self.devices) if d is not None}
        by_member: dict[int, list[records.Repair]] = {}
        for r in live:
            i = index.get(id(r.device))
            if i is not None:
                by_member.setdefault(i, []).append(r)
        written: list[int] = []

        def rewrite(rs: list[records.Repair]) -> None:
            written.append(records.apply_repairs(rs))
        # Counted as a read in flight, so that extents freed meanwhile are not reused
        # (or discarded) under these writes.
        gen = self._read_begin()
        try:
            await self._per_device([(i, partial(rewrite, rs)) for i, rs in by_member.items()],
                                   "write", tolerate=True, what="a repair write")
        finally:
            self._read_end(gen)
        done = sum(written)
        self._counters["repaired_fragments"] += done
        self._dirty_devices.update(i for i in by_member if self.devices[i] is not None)
        if done:
            log.warning("pool %s: rewrote %d bad fragment(s) from redundancy",
                        self.state.name, done)

    # ==== commit (pool.txn) ================================================================
    async def commit(self) -> None:
        """Make everything applied so far durable (group commit: concurrent callers share;
        ``Transaction.commit``)."""
        await self.txn.commit()

    async def _checkpoint(self) -> None:
        await self.txn.checkpoint()

    async def _checkpoint_locked(self) -> None:
        await self.txn.checkpoint_locked()

    def _seal_fills(self) -> None:
        """A commit's last ops: the fill of each segment written since the last one."""
        for seg_id in sorted(self._fill_moved):
            seg = self.state.segments.get(seg_id)
            if seg is not None:
                self._do(op_json(op="seg_fill", id=seg.id, fill=seg.fill))
        self._fill_moved.clear()

    def _frees_pending(self) -> int:
        return len(self._pending_free)

    def _after_commit(self, kind: str, freed_here: int) -> None:
        """A commit (``kind``: "commits" | "checkpoints") is durable, and with it the first
        ``freed_here`` frees: their extents are reused once older reads are done."""
        self._release_gen += 1
        self._releasable.extend((self._release_gen, i, e)
                                for i, e in self._pending_free[:freed_here])
        del self._pending_free[:freed_here]
        self._release_extents()
        self._counters[kind] += 1

    # ==== ownership (DESIGN invariant 10; pool.owner) =====================================
    @property
    def owner(self) -> owners.OwnerRecord | None:
        """The owner record this daemon keeps on the members (None: none written)."""
        return self.owner_keeper.record

    async def heartbeat(self) -> None:
        """One beat of the owner record (``OwnerKeeper.heartbeat``); a pool found taken
        over fails."""
        await self.owner_keeper.heartbeat()

    async def _confirm_owner(self) -> None:
        """Before data and metadata writes: ownership confirmed (``OwnerKeeper.confirm``)."""
        await self.owner_keeper.confirm()

    async def _release_owner(self, *, clear: bool) -> None:
        """Stop heartbeats; ``clear``: also zero the owner record on every member."""
        await self.owner_keeper.release(clear=clear)

    # ==== lifecycle =======================================================================
    def add_cache(self, writeback: Callable[[], Awaitable[None]]) -> None:
        """Register an upper layer's write cache: ``close`` awaits ``writeback`` first, so
        writes acknowledged into it are written out before the final checkpoint."""
        self._caches.append(writeback)

    async def close(self, *, release: bool = False) -> None:
        """Write back registered caches, commit everything (checkpoint), release devices.
        ``release`` (export): clear the owner record too, so another daemon may import
        the pool at once; otherwise it stays (the pool still belongs to this daemon,
        which imports it again at its next start)."""
        if self.txn.closed:
            return
        try:
            if self.txn.failed is None:
                for writeback in self._caches:
                    await writeback()
                self._open.clear()
                self._reap()
                await self._checkpoint()
        finally:
            with trio.CancelScope(shield=True):
                await self._release_owner(clear=release and self.txn.failed is None)
            self.txn.close()
            with trio.CancelScope(shield=True):
                await self.settle_discards()    # its threads use the devices
                await close_devices([*self.devices, *self._parked.values()])
            self._parked.clear()

    async def destroy(self) -> None:
        """Wipe labels, superblocks and owner records of every present member; data is not
        zeroed."""
        await self._release_owner(clear=False)
        self.txn.close()
        await self._on_devices(_wipe)
        with trio.CancelScope(shield=True):
            await self.settle_discards()
            await close_devices(self.devices)
        log.info("destroyed pool %s (%s)", self.state.name, self.state.uuid)

    async def add_device(self, dev: Device) -> None:
        """Grow the pool by one member (gets a label and a copy of the metadata)."""
        await self.members.add(dev)

    # ==== member maintenance: offline / online / replace / remove ==========================
    @property
    def closed(self) -> bool:
        return self.txn.closed

    async def offline(self, index: int) -> None:
        """Stop using a member for maintenance; what is written meanwhile is tracked, and
        ``online`` rebuilds only that."""
        await self.members.offline(index)

    async def online(self, index: int, dev: Device | None = None) -> None:
        """Take a member back (the device it had, or ``dev`` carrying its label)."""
        await self.members.online(index, dev)

    async def replace_device(self, index: int, dev: Device) -> None:
        """Put ``dev`` in member ``index``'s place and rebuild onto it (``Members.replace``)."""
        await self.members.replace(index, dev)

    async def remove_device(self, index: int,
                            progress: Callable[[int, int], Awaitable[None]] | None = None
                            ) -> None:
        """Move every live record off member ``index``, then detach it and wipe its label
        (``Members.remove``)."""
        await self.members.remove(index, progress)

    def absent_devices(self) -> dict[int, str]:
        """Members whose device vanished, shrank or was replaced (blocking)."""
        return self.members.absent_devices()

    async def watch_presence(self) -> None:
        """Fault every member whose device disappeared, shrank or was replaced."""
        await self.members.watch_presence()

    async def watch_members(self, interval: float) -> None:
        """Until the pool closes: check the members' devices every ``interval`` seconds
        and at once after a read error (``Members.watch``)."""
        await self.members.watch(interval)

    def refuse_member_device(self, dev: Device, but: int | None = None) -> None:
        """Refuse ``dev`` if it is the same device as a current member (but ``but``)."""
        self.members.refuse_device(dev, but)

    # ---- support for the maintenance engines (pool.scrub, pool.rebuild) ------------------
    def segment_records(self, seg_id: int, start: int = 0) -> list[bytes]:
        """The distinct live map entries in segment ``seg_id`` at sector >= ``start``, in
        offset order (a scan of every leaf: there is no reverse index yet)."""
        found: set[bytes] = set()
        size = ENTRY.size
        for node in self.state.forest.nodes.values():
            data = node.data
            if not isinstance(data, bytearray):
                continue
            for pos, (seg, off, *_rest) in enumerate(ENTRY.iter_unpack(data)):
                if seg == seg_id and off >= start:
                    found.add(bytes(data[pos * size:(pos + 1) * size]))
        return sorted(found, key=lambda r: ENTRY.unpack_from(r)[1])

    def record_plans(self, seg: Segment, entries: Sequence[bytes],
                     target: int | None = None) -> list[records.RecordPlan]:
        """Read plans for entries of ``seg``; column ``target`` gets its device even when
        it awaits a rebuild (the rebuild writes it)."""
        cols = list(self._columns(seg))
        if target is not None:
            idx, ext = seg.extents[target]
            cols[target] = self._column(idx, ext)
        plans = []
        for n, raw in enumerate(entries):
            _s, off, plen, flags, rhash = ENTRY.unpack(raw)
            plans.append(records.RecordPlan(n, seg.id, off, codec.fragment_units(plen, seg.k),
                                            seg.k, seg.m, plen, flags, rhash, tuple(cols)))
        return plans

    def pin(self, seg_id: int) -> None:
        self._pins[seg_id] = self._pins.get(seg_id, 0) + 1
        self._pin_gens.setdefault(seg_id, []).append(self._read_begin())

    def unpin(self, seg_id: int) -> None:
        self._unpin(seg_id)
        self._reap()

    def _unpin(self, seg_id: int) -> None:
        """``unpin`` without reaping (for a caller whose new records nothing references
        yet: a reap now could free the segment they are in)."""
        gens = self._pin_gens[seg_id]
        gen = gens.pop()
        if not gens:
            del self._pin_gens[seg_id]
        self._pins[seg_id] -= 1
        if not self._pins[seg_id]:
            del self._pins[seg_id]
        self._read_end(gen)

    def pinned(self, seg_id: int) -> bool:
        return bool(self._pins.get(seg_id))

    async def background(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking maintenance work in a thread, one at a time per pool (so the
        foreground keeps the other core)."""
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self._bg)

    def note_outcome(self, out: records.StripeOutcome) -> None:
        """Count a scrub/rebuild pass's device errors against their members."""
        paths = {d.path: i for i, d in enumerate(self.devices) if d is not None}
        for (path, kind), n in out.device_errors.items():
            if path in paths:
                for _ in range(n):
                    self.count_error(paths[path], kind, f"{kind} error on {path}")

    async def write_fragments(self, repairs: Sequence[records.Repair]) -> int:
        """Write rebuilt fragments (of pinned segments); returns how many were written.
        Runs beside ``background`` work (a thread of its own, one at a time per pool), so a
        rebuild computes its next step while the last one is written.

        Each device's fragments are written under the write deadline
        (``self.deadlines.write``): a device that has not finished by then fails all of
        them, and a member that hung so is faulted at once, for a full rebuild (the stuck
        write may still land), as a hung foreground write faults it."""
        await self._confirm_owner()
        live = [r for r in repairs if r.segment in self.state.segments]
        groups: dict[int, list[records.Repair]] = {}
        for r in live:
            groups.setdefault(id(r.device), []).append(r)
        batches = list(groups.values())
        outcomes: dict[int, tuple[int, list[records.Repair]]] = {}

        def writer(k: int) -> Callable[[], None]:
            def write() -> None:
                outcomes[k] = records.write_repairs(batches[k])
            return write

        errors = await trio.to_thread.run_sync(
            records.writes_within, [(b[0].device, writer(k)) for k, b in enumerate(batches)],
            "a rebuild write", self.deadlines, limiter=self._bg_writes)
        index = {id(d): i for i, d in enumerate(self.devices) if d is not None}
        for r in live:
            i = index.get(id(r.device))
            if i is not None:
                self._dirty_devices.add(i)
        done, failed = 0, 0
        for k, (batch, error) in enumerate(zip(batches, errors, strict=True)):
            i = index.get(id(batch[0].device))
            if error is not None:           # given up (hung), or raised outside a write
                failed += len(batch)
                if i is not None:
                    if isinstance(error, DeviceHung):
                        self.fault(i, error.message, full=True)
                    else:
                        self.count_error(i, "write", error.message)
                continue
            wrote, lost = outcomes[k]
            done += wrote
            failed += len(lost)
            if i is not None:
                for _r in lost:
                    self.count_error(i, "write", "writing a rebuilt fragment")
        return len(live) - failed if done or not failed else 0

    def member_epoch(self, index: int) -> int:
        """Changes whenever member ``index`` goes away (see ``mark_rebuilt``)."""
        return self._epochs[index]

    def mark_rebuilt(self, index: int, seg_id: int, dev: Device, epoch: int) -> None:
        """Member ``index`` (still ``dev``, and not away since ``member_epoch`` gave
        ``epoch``, when the rebuild of the segment began) holds every fragment of
        ``seg_id`` again. If it went away meanwhile, even to come back with the same
        device, writes may have missed it: the mark stays for the next pass."""
        if self.devices[index] is not dev or self._epochs[index] != epoch:
            return
        self._dirty_devices.add(index)
        self._do(op_json(op="member_clean", index=index, seg=seg_id))
        self._column_cache.pop(seg_id, None)

    def set_task(self, name: str, value: dict[str, Any] | None) -> None:
        self._check_ok()
        self._do(op_json(op="task", name=name, value=value))

    def count(self, counter: str, n: int) -> None:
        self._counters[counter] += n

    def foreground_records(self) -> int:
        """Records read (from the devices or the record cache) and written for volumes so
        far: maintenance work watches it to tell whether the pool is idle."""
        return (self._counters["records_read"] + self._counters["records_written"]
                + self.record_cache.hits)

    def locate(self, entry: bytes) -> list[str]:
        """Which volumes/snapshots and byte offsets reference a record (for reports)."""
        names: dict[int, tuple[str, int]] = {}
        objs = self.state.objects
        for obj in objs.values():
            if "map" in obj:
                name = str(obj.get("name", "?"))
                if obj.get("type") == "snapshot":
                    vol = objs.get(int(obj.get("volume", -1)), {})
                    name = f"{vol.get('name', '?')}@{name}"
                names[int(obj["map"])] = (name, int(obj.get("block_size", 0)))
        out = []
        forest = self.state.forest
        for map_id in forest.roots:
            for block, raw in forest.items(map_id):
                if raw == entry:
                    name, bs = names.get(map_id, (f"map {map_id}", 0))
                    out.append(f"{name} offset {block * bs}" if bs else
                               f"{name} block {block}")
        return out

    def meta_locations(self) -> list[Loc]:
        return [*self._page_locs.values(), *self._meta_locs]

    def page_locations(self) -> Mapping[int, Loc]:
        """Where the last checkpoint put each map node (node id -> location); read-only."""
        return MappingProxyType(self._page_locs)

    def is_free(self, index: int, extent: int) -> bool:
        """Whether extent ``extent`` of member ``index`` is on the free list."""
        return index < len(self._free) and extent in self._free[index]

    async def scrub_metadata(self) -> tuple[int, int, int]:
        """Verify every copy of every metadata blob and both labels of each present
        member; rewrite bad copies from a good one. Returns (checked, bad, repaired)."""
        # Its thread work does not go through ``background``: a rebuild holds that for its
        # whole run, and waiting for it here while holding the commit lock (which the
        # rebuild's commits need) would deadlock. Metadata is small.
        checked = bad = repaired = 0
        locs = self.meta_locations()
        for i in range(0, len(locs), 64):
            async with self._commit_lock:   # a checkpoint may reuse units: not meanwhile
                current = set(self.meta_locations())
                chunk = [loc for loc in locs[i:i + 64] if loc in current]
                c, b, r, failed = await trio.to_thread.run_sync(self.meta.repair_blobs,
                                                                chunk)
            checked, bad, repaired = checked + c, bad + b, repaired + r
            for idx in failed:
                self.count_error(idx, "checksum", "metadata copy")
        for mi in self.state.members:
            dev = self.devices[mi.index]
            if dev is None:
                continue
            copies = await trio.to_thread.run_sync(label_copies, dev, self.deadlines, mi.size)
            checked += 2
            wrong = [w for w, lab in copies if isinstance(lab, str) or lab.device_uuid
                     != mi.uuid]
            if wrong:
                bad += len(wrong)
                async with self._commit_lock:
                    await _write_within([(dev, partial(_write_label, dev, self._label(mi)))],
                                        "repairing a label", self.deadlines)
                repaired += len(wrong)
                self._dirty_devices.add(mi.index)
        return checked, bad, repaired

    # ==== status ==========================================================================
    def statistics(self) -> PoolStatistics:
        st = self.state
        ext = self.layout.extent_size
        members = self.members.rows()
        present = [m for m in members if m.state in ("online", "rebuilding")]
        live = sum(s.live * SECTOR * (s.k + s.m) for s in st.segments.values())
        # Segments beyond their parity (unavailable_segments) leave the state "degraded"
        # here; the control API calls such a pool faulted.
        state = ("failed" if self._failed else
                 "degraded" if any(m.state not in ("online", "removed") for m in members)
                 else "online")
        return PoolStatistics(
            st.name, st.uuid, state, st.profile, ext, members,
            sum(m.extents for m in present) * ext,
            sum(len(s.extents) for s in st.segments.values()) * ext,
            sum(m.free_extents for m in present) * ext,
            live, self._reserved, len(st.segments), st.txg, st.generation,
            **self._counters)

    def member_state(self, index: int) -> str:
        """online | rebuilding | faulted | offline | missing | removed."""
        return self.members.state_of(index)

    def member_index(self, name: str) -> int:
        """A member by number, device path (its last known path if away) or UUID."""
        return self.members.index_of(name)

    def health(self) -> list[str]:
        """Plain-language warnings about redundancy right now."""
        return self.members.warnings()


# ==== blocking helpers (run in threads) ====================================================
@lru_cache(maxsize=256)        # asked on every reserve; the counts change rarely
def _stripes(counts: tuple[int, ...], width: int) -> int:
    """How many stripes of ``width`` extents on distinct devices the free-extent counts
    allow: the largest S with sum(min(c, S)) >= width * S (what allocating each stripe
    from the devices with the most free extents reaches)."""
    lo, hi = 0, sum(counts) // width if width else 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in counts) >= width * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


