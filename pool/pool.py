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

import contextlib
import logging
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from pool import codec, importer, radosimporter, readcache
from pool import owner as owners
from pool.catalog import Catalog
from pool.cleaner import SegmentCleaner
from pool.deadlines import Deadlines
from pool.device import Device
from pool.devio import close_devices
from pool.errors import InvalidArgument, StorageError
from pool.health import MemberHealth
from pool.labels import wipe as _wipe
from pool.layout import (
    DEFAULT_EXTENT,
    SECTOR,
    Label,
    Layout,
)
from pool.members import Members
from pool.metaseam import CommitMeta, DeviceMeta
from pool.metastore import MetaStore, Superblock
from pool.pins import SegmentPins
from pool.profile import Profile
from pool.rados.conn import Fenced
from pool.rados.reader import RadosRecordReader
from pool.rados.store import refuse_profile
from pool.reader import RecordReader
from pool.space import SpaceAccount, SpaceHooks
from pool.state import (
    MemberInfo,
    PoolState,
    Segment,
    op_json,
)
from pool.status import PoolStatistics
from pool.store import DEVICE_QUEUE, LocalStore
from pool.tuning import PoolTuning
from pool.txn import CommitHooks, Transaction
from pool.writer import RecordWriter, WriterHooks

if TYPE_CHECKING:
    from pool.rados.backend import RadosParts
    from pool.rados.conn import RadosStatistics
    from pool.rados.store import RadosStore
    from pool.rados.target import RadosTarget

log = logging.getLogger(__name__)
T = TypeVar("T")
RADOS_READS = 16     # record reads in flight at once on a RADOS pool (Connection threads)


class Pool:
    """An imported pool. Build one with ``Pool.create`` or ``Pool.open`` (member devices),
    or ``Pool.create_rados`` or ``Pool.open_rados`` (a RADOS pool: ``rados`` set, no
    members; docs/INTERNALS.md "A Pool on RADOS")."""

    def __init__(self, state: PoolState, layout: Layout, devices: list[Device | None],
                 meta: MetaStore, superblock: Superblock | None,
                 tuning: PoolTuning | None = None, *,
                 rados: RadosParts | None = None) -> None:
        self.tuning = tuning = tuning if tuning is not None else PoolTuning()
        # The live part of the tuning (deadlines invariant 1): the MetaStore's, built from
        # ``tuning`` by create/open, changed in place by a reload.
        self.deadlines: Deadlines = meta.deadlines
        self.state = state
        self.layout = layout
        self.devices = devices
        self.meta = meta
        # A pool on Ceph RADOS (pool.rados.backend): no member devices (``devices`` and
        # ``state.members`` are empty), the RadosStore places segments, the metadata is
        # RADOS objects, and ownership is the RADOS lock (DESIGN 10).
        self.rados = rados
        # Where segments' bytes live: extents, placement, device fan-out, discard.
        self.store: LocalStore | RadosStore
        commit_meta: CommitMeta
        if rados is None:
            self.store = LocalStore(state, layout, devices, meta.deadlines, self,
                                    discard_freed=tuning.discard_freed)
            commit_meta = DeviceMeta(meta, layout, superblock)
            sb_gen = superblock.generation if superblock else 0
        else:
            self.store = rados.make_store(state, self)
            commit_meta = rados.commit
            sb_gen = rados.commit.generation
            rados.conn.watch_fenced(self._rados_fenced, first=True)
            rados.lock.on_lost = self._rados_lost
        self._rados_scope: trio.CancelScope | None = None
        self._rados_done = trio.Event()
        self.open_segments: dict[tuple[int, int], Segment] = {}
        # Segments that work in flight still needs (pool.pins): not freed, not cleaned.
        self.pins = SegmentPins(self.store.read_hold, self.reap)
        self._fill_moved: set[int] = set()   # segments whose fill changed since last commit
        # Verified logical blocks of recent small reads, keyed by map entry (an LRU).
        self.record_cache = readcache.RecordCache(tuning.record_cache)
        self.cleaner = SegmentCleaner(self)
        # The owner record this daemon keeps on every member (pool.owner.OwnerKeeper).
        self.owner_keeper = owners.OwnerKeeper(self)
        # Per member: read / write / checksum errors, the fault threshold, why a member is
        # away, and epochs (bumped each time it goes away, so a rebuild that started on a
        # segment before that does not clear marks set while it was away: mark_rebuilt).
        self.member_health = MemberHealth(len(devices), self.fault)
        # Fault, add, offline/online, replace, remove; parked devices of away members.
        self.members = Members(self, self.member_health)
        # Pending ops, group commit, OPEN / FAILED / CLOSED (pool.txn); its ``lock`` and
        # ``dirty`` (members written since the last commit) are the pool's.
        self.txn = Transaction(state, commit_meta, sb_gen, CommitHooks(
            self._confirm_owner, self.store.sync,
            self.members.absorb_meta_failures, self._seal_fills,
            lambda: len(self.store.pending_free), self._after_commit))
        # Objects and block maps (pool.catalog), changed through the transaction.
        self.catalog = Catalog(state, self.txn, self.reap)
        # Usage, reservations and the reserves of invariant 8 (pool.space).
        self.space = SpaceAccount(state, self.store, layout.extent_size, self.open_segments,
                                  SpaceHooks(self.txn.check_ok, self.reap, self.commit,
                                             self.cleaner.clean_one, lambda: self._caches,
                                             self.metadata_used))
        self._caches: list[Callable[[], Awaitable[None]]] = []
        # Devices given to the import but left out of it (path -> reason): see ``open``.
        self.left_out: dict[str, str] = {}
        # What the maintenance engines (pool.scrub, pool.rebuild) report while they run.
        self.activity: dict[str, Any] = {}
        self.cpu = trio.CapacityLimiter(2)
        # Scrub/rebuild thread work (pool.scrub, pool.rebuild): one core at most, so the
        # foreground keeps the other.
        self.maintenance = trio.CapacityLimiter(1)
        self.counters = dict.fromkeys(
            ("commits", "checkpoints", "records_written", "records_read", "degraded_reads",
             "repaired_fragments", "unreadable_records", "records_relocated",
            "rebuilt_bytes", "scrubbed_bytes", "discarded_extents"), 0)
        # The write path (pool.writer): blocks to records in open segments.
        self.writer = RecordWriter(state, self.store, self.space, devices, layout.extent_size,
                                   self.open_segments, self.pins, self._fill_moved,
                                   self.txn.dirty, self.counters, self.cpu,
                                   WriterHooks(self.txn.check_ok, self._confirm_owner,
                                               self.txn.do, self.txn.do_map_sets,
                                               self.reap, lambda: self.txn.sb_gen),
                                   self.record_cache)
        # The read path (pool.reader): map entries to verified blocks.
        # Reads that miss the page cache run in threads: two at a time on devices (they
        # are mostly verification, CPU), RADOS_READS at a time on RADOS, where a thread
        # mostly waits for an OSD (a round trip each): two would cap a pool at about two
        # reads per round trip whatever the queue depth.
        # On RADOS, reads are asynchronous librados reads verified as they complete
        # (pool.rados.reader), the general path its fallback.
        if rados is None:
            self.reader = RecordReader(state, self.store, self.record_cache, meta.deadlines,
                                       self.cpu, self.counters, self.txn.dirty.update,
                                       self._confirm_owner)
        else:
            self.reader = RadosRecordReader(rados.conn, state, self.store,
                                            self.record_cache, meta.deadlines,
                                            trio.CapacityLimiter(RADOS_READS),
                                            self.counters, self.txn.dirty.update,
                                            self._confirm_owner)

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

    @classmethod
    async def create_rados(cls, name: str, target: RadosTarget, *, profile: str = "plain",
                           extent_size: int = DEFAULT_EXTENT, claim: owners.Claim,
                           tuning: PoolTuning | None = None) -> Pool:
        """Make a new pool on the RADOS pool of ``target`` (``pool.rados.importer``):
        refuses ``ec:``/``mirror:`` profiles (redundancy is the RADOS pool's) and a name
        already used in that RADOS pool (AlreadyExists), changing nothing."""
        return await radosimporter.create(cls, name, target, profile=profile,
                                          extent_size=extent_size, claim=claim,
                                          tuning=tuning)

    @classmethod
    async def open_rados(cls, target: RadosTarget, name: str, *, takeover: bool = False,
                         claim: owners.Claim, tuning: PoolTuning | None = None) -> Pool:
        """Import the pool ``name`` from the RADOS pool of ``target``: NotFound if the
        RADOS pool names no such pool, PoolOwned (Busy) while another daemon holds it
        (nothing changed); ``takeover``: fence that daemon (blocklist), break its lock,
        replay the journal (``pool.rados.importer``)."""
        return await radosimporter.open_pool(cls, target, name, takeover=takeover,
                                             claim=claim, tuning=tuning)

    # ==== the backend ======================================================================
    @property
    def io_depth(self) -> int:
        """How many requests the pool serves at once: DEVICE_QUEUE per member device,
        RADOS_READS on RADOS (where a request mostly waits for an OSD round trip). The
        volumes' weighted dispatcher orders requests beyond it."""
        if self.rados is not None:
            return RADOS_READS
        return DEVICE_QUEUE * max(1, len(self.state.members))

    @property
    def backend(self) -> str:
        """Where the pool lives: "local" (member devices) or "rados"."""
        return "local" if self.rados is None else "rados"

    @property
    def rados_target(self) -> RadosTarget | None:
        return self.rados.target if self.rados is not None else None

    @property
    def devstore(self) -> LocalStore:
        """The member-device store, for what only a pool on devices has (member ops,
        labels, owner records); a pool on RADOS refuses those with one line."""
        if not isinstance(self.store, LocalStore):
            raise InvalidArgument(f"pool {self.name} is on RADOS pool "
                                  f"{self.store.conn.pool}: it has no member devices")
        return self.store

    def rados_status(self) -> dict[str, object] | None:
        """For ``pool status``: the RADOS pool, the cluster's fsid and health, the lock
        holder (this daemon, as the lock describes it) and why the pool was fenced (None
        while it was not). None for a pool on devices."""
        if self.rados is None:
            return None
        r = self.rados
        store = self.store
        health = store.cluster_health if not isinstance(store, LocalStore) else "unknown"
        return {"pool": r.conn.pool, "fsid": r.conn.fsid, "health": health,
                "conf": r.target.conf, "client": r.target.client,
                "lock_holder": r.lock.me.describe() if r.lock.held else None,
                "fenced": r.lock.lost or r.conn.fenced}

    def rados_statistics(self) -> RadosStatistics | None:
        """The connection's op latencies by kind (``Connection.statistics``), for
        metrics; None for a pool on devices."""
        return self.rados.conn.statistics() if self.rados is not None else None

    async def _confirm_owner(self) -> None:
        """Before data and metadata writes: this daemon still owns the pool (DESIGN 10):
        the owner record on the members (``OwnerKeeper.confirm``), or the RADOS lock,
        renewed first when half its duration passed without a renewal."""
        if self.rados is None:
            await self.owner_keeper.confirm()
            return
        lock = self.rados.lock
        if lock.lost is None and lock.held and lock.due():
            with contextlib.suppress(Fenced):   # lost: _rados_lost failed the pool
                await lock.renew()
        if lock.lost is not None:
            self._rados_lost(lock.lost)
        self.txn.check_ok()

    def _rados_fenced(self, reason: str) -> None:
        """The connection was fenced (called first among its watchers): blocklisted by
        another daemon's takeover, or (the lock's renewal failed, ``lost`` already set)
        the lock was lost. The pool refuses I/O from now on."""
        assert self.rados is not None
        if self.rados.lock.lost is not None:
            self._rados_lost(self.rados.lock.lost)
        else:
            self.fail(f"fenced: {reason}")

    def _rados_lost(self, reason: str) -> None:
        self.fail(f"lost its RADOS lock: {reason}")

    def label(self, mi: MemberInfo) -> Label:
        return Label(self.state.uuid, self.state.name, mi.uuid, mi.index,
                     self.state.generation, mi.size, self.layout)

    def fail(self, reason: str) -> None:
        """Stop all I/O to the pool (``Transaction.fail``: FAILED, refused with PoolFailed
        until a re-import)."""
        self.txn.fail(reason)

    @property
    def stopped(self) -> bool:
        """Whether the pool has failed (the store's background work stops)."""
        return self.txn.failed is not None

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
        """``SpaceAccount.record_cost``: device bytes one block is charged (S1)."""
        return self.space.record_cost(block_size, prof)

    def available_bytes(self, prof: Profile | None = None) -> int:
        """``SpaceAccount.available_bytes``: device bytes not yet promised to anything."""
        return self.space.available_bytes(prof)

    def usable_capacity(self, prof: Profile | None = None) -> tuple[int, int]:
        """(size, avail) in data bytes under ``prof`` (default: the pool's default
        profile); ``SpaceAccount.usable_capacity``."""
        return self.space.usable_capacity(prof or self.default_profile)

    def metadata_used(self) -> float:
        """Fraction of the metadata page area in use: what the last checkpoint wrote plus,
        at worst-case size, every map node changed since (the next checkpoint writes them
        beside the old copies)."""
        return self.txn.meta.used(len(self.state.forest.dirty))

    def check_profile(self, prof: Profile) -> None:
        """Refuse a volume profile the pool cannot place: wider than its online members,
        or on RADOS anything but plain (redundancy is the RADOS pool's)."""
        if self.rados is not None:
            refuse_profile(prof, self.rados.conn.pool)
            return
        online = sum(1 for m in self.statistics().members if m.state == "online")
        if prof.width > len(self.state.members) or prof.width > online:
            raise InvalidArgument(f"profile {prof} needs {prof.width} devices; pool "
                                  f"{self.name} has {online} online")

    def check_writable(self, prof: Profile) -> None:
        """Refuse, before anything is acknowledged, writes of a profile that no segment can
        take (``SpaceAccount.check_writable``)."""
        self.space.check_writable(prof)

    def reserve(self, nbytes: int, prof: Profile | None = None, *,
                zeroing: bool = False) -> None:
        """Promise space to a buffered write now, or raise NoSpace (invariant 8)."""
        self.space.reserve(nbytes, prof, zeroing=zeroing)

    async def reserve_wait(self, nbytes: int, prof: Profile | None = None, *,
                           zeroing: bool = False) -> None:
        """``reserve``, making room when it does not fit (rule S3)."""
        await self.space.reserve_wait(nbytes, prof, zeroing=zeroing)

    async def make_room(self, nbytes: int, prof: Profile | None = None, *,
                        zeroing: bool = False) -> None:
        """Reserve ``nbytes``, winning space back first (rule S3)."""
        await self.space.make_room(nbytes, prof, zeroing=zeroing)

    def unreserve(self, nbytes: int) -> None:
        self.space.unreserve(nbytes)

    def reap(self) -> None:
        """Free segments that hold no live record and can take no more."""
        open_ids = {s.id for s in self.open_segments.values()}
        for seg_id in sorted(self.state.emptied):
            if seg_id in open_ids or seg_id in self.pins:
                continue
            seg = self.state.segments.get(seg_id)
            if seg is None or seg.live:
                self.state.emptied.discard(seg_id)
                continue
            self.txn.do(op_json(op="seg_free", id=seg_id))
            self.store.free(seg.extents)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The pool's background work, in a nursery its owner holds (the daemon's
        ``maintain``): discarding freed extents, each once it has stayed free
        DISCARD_DELAY seconds, so a flush never waits for it, and an extent reused before
        that (an overwrite frees segments that the next writes take again) is never
        discarded: a busy pool does not punch holes only to fill them again
        (``LocalStore.run``).

        Returns once the pool is closed (``close`` settles the discards first). An
        exception is not swallowed: the queue of extents still to discard is dropped
        (they stay free; discard is advisory) and the exception propagates to the owner,
        which logs it and starts ``run`` again. Without a runner (tools and tests that
        use a Pool alone), freed extents are discarded by ``settle_discards`` and
        ``close``, in the caller's task."""
        if self.rados is None:
            await self.store.run(task_status=task_status)
            return
        # A pool on RADOS: the lock's renewal (OwnershipLock.run) beside the store's
        # deletes and refreshes; both end when the pool is fenced, the store's when it is
        # closed (``close`` cancels the renewal and waits for it before it disconnects).
        try:
            with trio.CancelScope() as self._rados_scope:
                if self.txn.closed:
                    task_status.started()
                    return
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.rados.lock.run)
                    await self.store.run(task_status=task_status)
                    nursery.cancel_scope.cancel()
        finally:
            self._rados_scope = None
            self._rados_done.set()
            self._rados_done = trio.Event()

    async def settle_discards(self) -> None:
        """Discard every extent freed so far, now, and wait for it: the runner does it
        if one is running, else this task does."""
        await self.store.run(settle=True)

    # ==== the data path ===================================================================
    async def write_blocks(self, map_id: int, prof: Profile, compress: bool,
                           items: Sequence[tuple[int, codec.Buffer | None]], *,
                           raw: Container[int] = (), keep: Container[int] = ()) -> None:
        """Store blocks as new records (``None`` unmaps) and point the map at them; with
        ``compress``, lz4 is tried on each block but those in ``raw``; those in ``keep``
        (bytes the caller never changes again) go into the record cache as they are
        written (``RecordWriter.write_blocks``). In memory until the next ``commit``."""
        await self.writer.write_blocks(map_id, prof, compress, items, raw=raw, keep=keep)

    # ==== member health ===================================================================
    def count_error(self, index: int, kind: str, why: str = "") -> None:
        """Count an I/O error ("read" | "write" | "checksum") against a member; one that
        reaches ``member_health.threshold`` read + write errors is faulted (checksum errors are
        repaired and reported, not held against the device): ``MemberHealth.count``."""
        self.member_health.count(index, kind, why)

    def fault(self, index: int, why: str, *, state: str = "faulted",
              full: bool = False) -> None:
        """``Members.fault``: stop using member ``index`` (faulted, or offline); I/O goes
        on degraded and what its segments miss is marked for a rebuild. On RADOS the one
        failure domain is the RADOS pool, and its only fault is a fenced connection: the
        pool stops."""
        if self.rados is not None:
            self.fail(f"fenced: {why}")
            return
        self.members.fault(index, why, state=state, full=full)

    def unavailable_segments(self) -> int:
        """Segments with more fragments away than their parity covers (reads fail)."""
        return self.members.unavailable_segments()

    # ==== the segment cleaner (pool.cleaner) ==============================================
    async def clean(self, *, max_segments: int = 4, threshold: float = 0.5) -> int:
        """``SegmentCleaner.clean``: move the live records out of up to ``max_segments``
        closed segments whose live part is below ``threshold`` of what they hold; the
        number of segments emptied (the space returns at the next commit)."""
        return await self.cleaner.clean(max_segments=max_segments, threshold=threshold)

    # ---- the read path (pool.reader; the pool's own state is checked here) --------------
    def read_block_nowait(self, map_id: int, block: int,
                          block_size: int) -> tuple[bool, bytes | memoryview | None]:
        """``read_blocks_nowait`` of one block: (whether it could be read at once, its
        content or None for a hole). A record-cache hit costs a map lookup."""
        if self.txn.failed is not None or self.txn.closed:
            return False, None
        return self.reader.read_block_nowait(map_id, block, block_size)

    def cached_block(self, map_id: int, block: int) -> bytes | memoryview | None:
        """The record cache's verified content of one block (``RecordReader.cached_block``),
        or None, also while the pool is failed or closed: a small read's first try."""
        if self.txn.failed is not None or self.txn.closed:
            return None
        return self.reader.cached_block(map_id, block)

    def read_blocks_nowait(self, map_id: int, blocks: Sequence[int],
                           block_size: int) -> list[bytes | memoryview | None] | None:
        """``read_blocks`` if it can be done at once on the event loop (record-cache hits,
        page-cached healthy fragments), else None: the caller awaits ``read_blocks``."""
        if self.txn.failed is not None or self.txn.closed:
            return None
        return self.reader.read_blocks_nowait(map_id, blocks, block_size)

    def read_span_nowait(self, map_id: int, first: int, n: int, block_size: int
                         ) -> memoryview | list[bytes | memoryview | None] | None:
        """``read_blocks_nowait`` of blocks ``first`` to ``first + n - 1``, as one
        read-only view of them all when it can (``RecordReader.read_span_nowait``)."""
        if self.txn.failed is not None or self.txn.closed:
            return None
        return self.reader.read_span_nowait(map_id, first, n, block_size)

    async def read_blocks(self, map_id: int, blocks: Sequence[int],
                          block_size: int) -> list[bytes | memoryview | None]:
        """The logical content of each block (``None`` for a hole), verified."""
        self.txn.check_ok()
        return await self.reader.read_blocks(map_id, blocks, block_size)

    async def read_blocks_into(self, map_id: int, blocks: Sequence[int], block_size: int,
                               dests: Sequence[memoryview]) -> None:
        """``read_blocks``, each block's content written into its ``dests`` entry (of
        ``block_size`` bytes; a hole as zeros) rather than returned: page-cached records
        are read straight into them, with no buffer of their own and no copy."""
        if self.read_blocks_into_nowait(map_id, blocks, block_size, dests):
            return
        got = await self.read_blocks(map_id, blocks, block_size)
        for dest, v in zip(dests, got, strict=True):
            dest[:] = v if v is not None else self.reader.zeros(block_size)

    def read_blocks_into_nowait(self, map_id: int, blocks: Sequence[int], block_size: int,
                                dests: Sequence[memoryview]) -> bool:
        """``read_blocks_into`` if it can be done at once on the event loop (holes, and
        whole blocks stored raw in page-cached, healthy fragments); else False, and what
        ``dests`` hold is undefined."""
        if self.txn.failed is not None or self.txn.closed:
            return False
        return self.reader.read_blocks_into_nowait(map_id, blocks, block_size, dests)

    # ==== commit (pool.txn) ================================================================
    async def commit(self) -> None:
        """Make everything applied so far durable (group commit: concurrent callers share;
        ``Transaction.commit``)."""
        await self.txn.commit()

    def _seal_fills(self) -> None:
        """A commit's last ops: the fill of each segment written since the last one."""
        for seg_id in sorted(self._fill_moved):
            seg = self.state.segments.get(seg_id)
            if seg is not None:
                self.txn.do(op_json(op="seg_fill", id=seg.id, fill=seg.fill))
        self._fill_moved.clear()

    def _after_commit(self, kind: str, freed_here: int) -> None:
        """A commit (``kind``: "commits" | "checkpoints") is durable, and with it the first
        ``freed_here`` frees: their extents are reused once older reads are done."""
        self.store.durable(freed_here)
        self.counters[kind] += 1

    # ==== ownership (DESIGN invariant 10; pool.owner) =====================================
    @property
    def owner(self) -> owners.OwnerRecord | None:
        """The owner record this daemon keeps on the members (None: none written)."""
        return self.owner_keeper.record

    async def heartbeat(self) -> None:
        """One beat of the owner record (``OwnerKeeper.heartbeat``); a pool found taken
        over fails."""
        await self.owner_keeper.heartbeat()

    # ==== lifecycle =======================================================================
    def add_cache(self, writeback: Callable[[], Awaitable[None]]) -> None:
        """Register an upper layer's write cache: ``close`` awaits ``writeback`` first, so
        writes acknowledged into it are written out before the final checkpoint."""
        self._caches.append(writeback)

    async def close(self, *, release: bool = False) -> None:
        """Write back registered caches, commit everything (checkpoint), release devices.
        ``release`` (export): clear the owner record too, so another daemon may import
        the pool at once; otherwise it stays (the pool still belongs to this daemon,
        which imports it again at its next start). A pool on RADOS always releases its
        lock and disconnects (``_close_rados``)."""
        if self.txn.closed:
            return
        try:
            if self.txn.failed is None:
                for writeback in self._caches:
                    await writeback()
                self.open_segments.clear()
                self.reap()
                await self.txn.checkpoint()
        finally:
            if self.rados is not None:
                with trio.CancelScope(shield=True):
                    await self._close_rados()
            else:
                with trio.CancelScope(shield=True):
                    await self.owner_keeper.release(
                        clear=release and self.txn.failed is None)
                self.txn.close()
                with trio.CancelScope(shield=True):
                    await self.settle_discards()    # its threads use the devices
                    await close_devices([*self.devices, *self.members.parked.values()])
                self.members.parked.clear()

    async def _close_rados(self, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """The end of ``close`` for a pool on RADOS: stop the runner (its librados
        calls finish first), delete what was freed, ``then()`` (destroy), release the lock
        (unless it was lost or destroyed) and disconnect."""
        assert self.rados is not None
        self.txn.close()
        store = self.store
        assert not isinstance(store, LocalStore)
        store.wake()
        if self._rados_scope is not None:
            done = self._rados_done
            self._rados_scope.cancel()
            await done.wait()
        try:
            await self.settle_discards()
        except StorageError as e:
            log.warning("pool %s: deleting freed segments at close: %s", self.name,
                        e.message)
        try:
            if then is not None:
                await then()
        finally:
            try:
                await self.rados.lock.release()
            except StorageError as e:
                log.warning("pool %s: releasing its RADOS lock: %s", self.name, e.message)
            await self.rados.conn.close()

    async def destroy(self, progress: Callable[[int, int], Awaitable[None]] | None = None
                      ) -> None:
        """Wipe labels, superblocks and owner records of every present member; data is not
        zeroed. On RADOS: delete every object and the name (pool.rados.destroy)."""
        if self.rados is not None:
            await self._close_rados(partial(radosimporter.destroy, self, progress))
            return
        store = self.devstore
        await self.owner_keeper.release(clear=False)
        self.txn.close()
        await store.per_device(store.calls(_wipe), "write")
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

    # ---- what the store reports (StoreHooks: fault, count_error, count) -------------------
    def count(self, counter: str, n: int) -> None:
        self.counters[counter] += n

    # ==== status ==========================================================================
    def statistics(self) -> PoolStatistics:
        st = self.state
        ext = self.layout.extent_size
        if self.rados is not None:
            room = self.store.room(None)
            live = sum(s.live * SECTOR * (s.k + s.m) for s in st.segments.values())
            return PoolStatistics(
                st.name, st.uuid, "failed" if self.txn.failed else "online", st.profile,
                ext, (), room.capacity_bytes, len(st.segments) * ext, room.free_bytes,
                live, self.space.reserved, len(st.segments), st.txg, st.generation,
                **self.counters)
        members = self.members.rows()
        present = [m for m in members if m.state in ("online", "rebuilding")]
        live = sum(s.live * SECTOR * (s.k + s.m) for s in st.segments.values())
        # Segments beyond their parity (unavailable_segments) leave the state "degraded"
        # here; the control API calls such a pool faulted.
        state = ("failed" if self.txn.failed else
                 "degraded" if any(m.state not in ("online", "removed") for m in members)
                 else "online")
        return PoolStatistics(
            st.name, st.uuid, state, st.profile, ext, members,
            sum(m.extents for m in present) * ext,
            sum(len(s.extents) for s in st.segments.values()) * ext,
            sum(m.free_extents for m in present) * ext,
            live, self.space.reserved, len(st.segments), st.txg, st.generation,
            **self.counters)

    def member_state(self, index: int) -> str:
        """online | rebuilding | faulted | offline | missing | removed."""
        return self.members.state_of(index)

    def member_index(self, name: str) -> int:
        """A member by number, device path (its last known path if away) or UUID."""
        return self.members.index_of(name)

    def health(self) -> list[str]:
        """Plain-language warnings about redundancy right now."""
        if self.rados is not None:
            why = self.rados.lock.lost or self.rados.conn.fenced
            return [f"fenced from RADOS pool {self.rados.conn.pool}: {why}"] if why else []
        return self.members.warnings()


# ==== blocking helpers (run in threads) ====================================================
