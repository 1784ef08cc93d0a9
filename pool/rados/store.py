"""RadosStore: the SegmentStore (pool/store.py, DESIGN section 8) on a Ceph RADOS pool
(issue 24).

A segment is one RADOS object (``RadosSegments.oid``: ``<pool uuid>.seg.<n>.0``), so
several storaged pools share one RADOS pool. Redundancy is the RADOS pool's (replicated
or erasure-coded, chosen in Ceph): storaged's profile here is ``plain`` only (k = 1,
m = 0), and ``allocate`` refuses any other. Compression and per-record checksums stay
storaged's, so rot that Ceph misses is still caught by the record reader.

The vocabulary, in RADOS terms:

- ``allocate(1, 0)``: a placement ``((0, n),)``: failure domain 0 (the RADOS pool) and
  object number n, never handed out before by this store (numbers only grow; on open they
  start above every placement the pool's state records and every object found under the
  prefix), so no stale object lies under a new segment's name.
- ``columns(seg)``: one ``Column`` whose reader is an ``ObjectColumn`` (ranged reads of
  the object from worker threads, base 0).
- ``write(runs)``: each run is one ``write`` at its byte offset. Runs of one segment
  may be in flight at once (the OSD applies non-overlapping writes to an object in any
  order alike); an ``append`` would misplace a run that overtook an earlier one, and a
  ``write_full`` at 0 would truncate one, so neither is used (and write-at-offset
  measured no slower: docs/INTERNALS.md "RADOS backend").
- ``sync``: a barrier only against a fenced client; otherwise nothing. librados
  completes a write (``rados_write``, an aio's completion) only once every replica or EC
  shard of the placement group has committed it (since Luminous "complete" means
  "safe": durable on the OSDs), and ``write`` returns only after its calls completed.
- ``free``/``durable``/``read_hold``: as LocalStore's invariant 3; the
  released object is deleted (RADOS gives the space back, so discard is free) by ``run``,
  ``reclaim`` or ``run(settle=True)``.
- ``room``: the capacity is the RADOS pool's quota (``osd pool
  set-quota POOL max_bytes N``, read from the OSD map with the mon command ``osd pool
  ls detail``; ``osd pool get-quota`` answers only with a mgr's stats), bounded by the
  cluster's free raw space divided by the pool's size when a mgr reports it. A pool
  with neither is refused at ``open`` with a message saying so: an unbounded pool would
  promise room it may not have. Used space is what this store holds: a segment-sized
  object per allocated, not yet deleted, number.
- ``health``: one failure domain, the RADOS pool, named with the cluster's health
  (``HEALTH_OK``, ...); absent once fenced.

Invariants this module owns (DESIGN numbers, and pool.store's "Store N", in parentheses):

1. Only ``plain`` segments: ``allocate`` with k != 1 or m != 0 raises InvalidArgument
   before anything changes (Store 1: the one failure domain is the RADOS pool).
2. An object number is handed out at most once per store, above every number the state
   or the RADOS pool holds when the store opened (Store 2; DESIGN 3).
3. A freed segment's object is deleted only after the commit that freed it is durable
   (``durable``) and no read (or pin) begun before that commit is in flight (Store 3;
   DESIGN 3).
4. ``write`` returns only after every object write it issued completed or failed; a
   failure is counted against domain 0 and returned in ``failed`` (Store 5).
5. Fenced is final (conn invariant 3): from the moment the connection is fenced, the
   store reports it once through ``hooks.fault(0, ...)``; every later write, sync or
   delete raises ``Fenced`` (a one-line StorageError) without reaching librados.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence

import trio

from pool import codec, records
from pool.errors import InvalidArgument, NoSpace, StorageError
from pool.layout import SECTOR
from pool.profile import Profile
from pool.rados.conn import Connection, Fenced
from pool.rados.segments import ObjectColumn, RadosSegments
from pool.state import PoolState, Segment
from pool.store import (
    Column,
    DomainHealth,
    Placement,
    ReadGenerations,
    Reclaim,
    Room,
    StoreHooks,
    WriteOutcome,
)

log = logging.getLogger(__name__)
DOMAIN = 0              # the one failure domain: the RADOS pool
PARALLEL = 16           # object writes or deletes in flight at once
REFRESH = 30.0          # seconds between refreshes of quota, usage and health in ``run``
RETRY = 1.0             # seconds before ``run`` retries deletes that failed


def refuse_profile(prof: Profile, rados_pool: str) -> None:
    """InvalidArgument unless ``prof`` is plain (invariant 1)."""
    if prof.k != 1 or prof.m != 0:
        raise InvalidArgument(
            f"profile {prof} is not possible on RADOS pool {rados_pool}: redundancy is "
            f"the RADOS pool's (replicated or erasure-coded, chosen in Ceph); use plain")


class RadosStore(ReadGenerations):
    """The segments of the storaged pool ``state`` as objects of ``conn``'s RADOS pool.

    Build it with ``await RadosStore.open(...)`` (it reads the quota, the usage and the
    object names under the pool's prefix before the pool uses it)."""

    def __init__(self, conn: Connection, state: PoolState, hooks: StoreHooks, *,
                 first_number: int) -> None:
        self.conn = conn
        self.state = state
        self.segments = RadosSegments(conn, state.uuid)
        self.segment_size = state.extent_size
        self._hooks = hooks
        self._next = first_number
        self.held: set[int] = {n for sg in state.segments.values() for _d, n in sg.extents}
        self.quota_bytes = 0
        self.cluster_room: int | None = None   # free raw / pool size, when a mgr says
        self.cluster_health = "unknown"
        self.pending_free: list[tuple[int, int]] = []      # freed by uncommitted ops
        self.releasable: list[tuple[int, int]] = []        # (release gen, number)
        self.deletable: list[int] = []                     # released: delete these
        self.release_gen = 0
        self.readers: Counter[int] = Counter()
        self.column_cache: dict[int, tuple[Column, ...]] = {}
        self._running = False
        self._wake = trio.Event()                 # wakes ``run``
        self._released = trio.Event()             # set (and replaced) on each release
        self._deleting = trio.Lock()
        conn.watch_fenced(self._fenced)

    @staticmethod
    async def open(conn: Connection, state: PoolState, hooks: StoreHooks) -> RadosStore:
        """A store for ``state`` on ``conn``; refuses a non-plain pool profile and a RADOS
        pool whose capacity nobody states (no quota, no mgr)."""
        store = RadosStore(conn, state, hooks, first_number=0)
        await store.start()
        return store

    async def start(self) -> None:
        """What ``open`` does to a store built with the constructor (a Pool builds its
        own, then starts it before anything is written): refuse a non-plain profile and
        a RADOS pool whose capacity nobody states; number new segments above every one
        the state or the RADOS pool holds (invariant 2). Reads only."""
        conn, state = self.conn, self.state
        refuse_profile(Profile.parse(state.profile), conn.pool)
        found = await _numbers(conn, state)
        top = max([*found, *(n for sg in state.segments.values() for _d, n in sg.extents)],
                  default=0)
        self._next = max(self._next, top + 1)
        self.held |= {n for sg in state.segments.values() for _d, n in sg.extents}
        await self.refresh()
        if not self.capacity():
            raise InvalidArgument(
                f"RADOS pool {conn.pool} has no quota and the cluster reports no capacity "
                f"(no mgr): set one with `ceph osd pool set-quota {conn.pool} max_bytes N`")

    async def orphans(self) -> list[str]:
        """Segment objects under the pool's prefix that the store does not hold (nothing
        references them, and they are not waiting to be deleted): for the checker."""
        return [self.segments.oid(n) for n in sorted(await _numbers(self.conn, self.state))
                if n not in self.held]

    # ==== cluster facts ====================================================================
    async def refresh(self) -> None:
        """Read the pool's quota and size from the OSD map (``osd pool ls detail``, a mon
        command: ``osd pool get-quota`` needs the mgr's stats), the cluster's free space
        (librados' stats, zeros without a mgr) and its health."""
        out = await self.conn.mon_command({"prefix": "osd pool ls", "detail": "detail",
                                           "format": "json"})
        pools = [p for p in json.loads(out) if p.get("pool_name") == self.conn.pool]
        if not pools:
            raise InvalidArgument(f"RADOS pool {self.conn.pool} is not in the OSD map")
        self.quota_bytes = int(pools[0].get("quota_max_bytes", 0))
        size = max(1, int(pools[0].get("size", 1)))
        usage = await self.conn.usage()
        if usage.known:
            mine = len(self.held) * self.segment_size
            self.cluster_room = usage.avail_bytes // size + mine
        else:
            self.cluster_room = None
        self.cluster_health = await self.conn.health()

    async def sweep(self) -> int:
        """Delete the segment objects under the pool's prefix that the state does not
        reference (a crash after a freeing commit and before the delete, or after a write
        and before the commit that would have named the segment); how many went. Only
        for the pool's open, after its journal is replayed and before anything is
        allocated: then every referenced object is in ``state.segments``."""
        self._check_fenced()
        keep = {n for sg in self.state.segments.values() for _d, n in sg.extents}
        orphans = [n for n in await _numbers(self.conn, self.state)
                   if n not in keep and n not in self.held]
        for n in orphans:
            await self.segments.delete(n)
        if orphans:
            log.info("pool %s: deleted %d orphaned segment objects in RADOS pool %s",
                     self.state.name, len(orphans), self.conn.pool)
        return len(orphans)

    def capacity(self) -> int:
        """Bytes this store may hold in all, in whole segments (0: unknown)."""
        bounds = [b for b in (self.quota_bytes, self.cluster_room) if b]
        cap = min(bounds) if bounds else 0
        return cap // self.segment_size * self.segment_size

    # ==== placement (invariants 1, 2) ======================================================
    def allocate(self, k: int, m: int) -> Placement:
        refuse_profile(Profile(k, m), self.conn.pool)
        if self.conn.fenced is not None:
            raise Fenced(f"pool {self.state.name}: refused, {self.conn.fenced}")
        if (len(self.held) + 1) * self.segment_size > self.capacity():
            raise NoSpace(f"pool {self.state.name}: no room for a new segment in RADOS pool "
                          f"{self.conn.pool} ({len(self.held)} segments of "
                          f"{self.segment_size} bytes held, capacity {self.capacity()})")
        n = self._next
        self._next += 1
        self.held.add(n)
        return ((DOMAIN, n),)

    # ==== columns ==========================================================================
    def columns(self, seg: Segment, *, rebuilding: int | None = None
                ) -> tuple[Column, ...]:
        cache = self.column_cache
        cols = cache.get(seg.id)
        if cols is None:
            if len(cache) > 2 * len(self.state.segments) + 64:
                cache.clear()                       # entries of freed segments
            cols = cache[seg.id] = tuple(
                Column(self._reader(n, c), 0, self.segments.oid(n, c))
                for c, (_d, n) in enumerate(seg.extents))
        return cols

    def _reader(self, n: int, c: int) -> ObjectColumn:
        return self.segments.reader(n, c, self.segment_size)

    def _count_errors(self, errors: Counter[tuple[str, str]]) -> None:
        prefix = f"{self.state.uuid}.seg."
        for (name, kind), n in errors.items():
            if name.startswith(prefix):
                for _ in range(n):
                    self._hooks.count_error(DOMAIN, kind, f"{kind} error on {name}")

    # ==== writes and syncs (invariants 4, 5) ===============================================
    async def write(self, runs: Sequence[tuple[Segment, int,
                                               Sequence[codec.EncodedRecord]]]
                    ) -> WriteOutcome:
        """Each run as one object write at its byte offset."""
        self._check_fenced()
        errors: list[StorageError] = []
        limit = trio.Semaphore(PARALLEL)

        async def one(n: int, c: int, off: int, data: bytes) -> None:
            async with limit:
                try:
                    await self.segments.write_at(n, c, off, data)
                except StorageError as e:
                    errors.append(e)
        async with trio.open_nursery() as nursery:
            for seg, off, recs in runs:
                for c, (_d, n) in enumerate(seg.extents):
                    data = b"".join(b for rec in recs for b in rec.pieces[c])
                    nursery.start_soon(one, n, c, off * SECTOR, data)
        fenced = [e for e in errors if isinstance(e, Fenced)]
        if fenced:
            raise fenced[0]
        for e in errors:
            self._hooks.count_error(DOMAIN, "write", e.message)
        if errors:
            return WriteOutcome(frozenset(), frozenset({DOMAIN}))
        return WriteOutcome(frozenset({DOMAIN}) if runs else frozenset(), frozenset())

    async def write_fragments(self, repairs: Sequence[records.Repair], *,
                              errors: Counter[tuple[str, str]] | None = None,
                              foreground: bool = False) -> tuple[int, frozenset[int]]:
        """Count ``errors`` (the read's, by object name) against the RADOS pool; then
        rewrite fragments in place (a plain segment has none to rebuild; a read repair
        would rewrite a record's one fragment): through the column objects, in a
        thread, counted as a read in flight so no freed object goes meanwhile."""
        if errors:
            self._count_errors(errors)
        self._check_fenced()
        if not repairs:
            return 0, frozenset()
        hold = self.read_hold()
        try:
            wrote, lost = await trio.to_thread.run_sync(records.write_repairs, repairs)
        finally:
            hold.release()
        for _r in lost:
            self._hooks.count_error(DOMAIN, "write", "writing a rebuilt fragment")
        return wrote, frozenset({DOMAIN})

    async def sync(self, which: Sequence[int] | None = None) -> None:
        """Nothing to flush: a completed librados write is durable (module docstring);
        a fenced client's commit must not be called durable, so it raises."""
        self._check_fenced()

    def _check_fenced(self) -> None:
        if self.conn.fenced is not None:
            raise Fenced(f"pool {self.state.name}: refused, {self.conn.fenced}")

    def _fenced(self, reason: str) -> None:
        self._hooks.fault(DOMAIN, f"RADOS pool {self.conn.pool}: {reason}", full=True)
        self._wake.set()

    # ==== frees, readers and deletes (invariant 3) =========================================
    def free(self, placement: Placement) -> None:
        self.pending_free.extend(placement)

    def durable(self, freed: int) -> None:
        self.release_gen += 1
        self.releasable.extend((self.release_gen, n) for _d, n in self.pending_free[:freed])
        del self.pending_free[:freed]
        self.release()

    def release(self) -> None:
        """Move the freed numbers no read in flight may still reach to ``deletable``:
        those freed by a commit no later than the oldest such read's generation."""
        if not self.releasable:
            return
        oldest = min(self.readers) if self.readers else self.release_gen + 1
        ready = [n for gen, n in self.releasable if gen <= oldest]
        if ready:
            self.releasable = [r for r in self.releasable if r[0] > oldest]
            self.deletable.extend(ready)
            self._wake.set()
            self._released.set()
            self._released = trio.Event()

    async def delete_released(self) -> int:
        """Delete the released objects (one task at a time); how many went. A failed
        delete is counted and retried next time; Fenced propagates."""
        self._check_fenced()
        async with self._deleting:
            batch, self.deletable = self.deletable, []
            gone: list[int] = []
            fenced: list[Fenced] = []
            limit = trio.Semaphore(PARALLEL)

            async def one(n: int) -> None:
                async with limit:
                    try:
                        await self.segments.delete(n)
                    except Fenced as e:
                        fenced.append(e)
                        self.deletable.append(n)
                        return
                    except StorageError as e:
                        self._hooks.count_error(DOMAIN, "write", e.message)
                        self.deletable.append(n)
                        return
                    gone.append(n)
            try:
                async with trio.open_nursery() as nursery:
                    for n in batch:
                        nursery.start_soon(one, n)
            finally:
                self.held.difference_update(gone)
                self.column_cache.clear()
            if fenced:
                raise fenced[0]
            if gone:
                self._hooks.count("discarded_extents", len(gone))
            return len(gone)

    async def reclaim(self) -> Reclaim:
        """Delete what no read holds back; if some freed object still waits for a read
        older than its freeing commit, wait until some is released (WAITED: the caller
        tries again); COMMIT when frees wait for a commit; else NOTHING."""
        self.release()
        if self.deletable:
            await self.delete_released()
        if self.releasable:
            await self._released.wait()
            return Reclaim.WAITED
        return Reclaim.COMMIT if self.pending_free else Reclaim.NOTHING

    async def run(self, *, settle: bool = False,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pool's background task: delete released objects as they come, refresh
        quota, usage and health every REFRESH seconds, until the pool is closed or the
        client fenced (then it returns: the new owner deletes what is left). A failed
        refresh keeps the last numbers (logged); failed deletes are retried after RETRY
        seconds; any other exception propagates to the owner's nursery. ``settle``:
        delete every released object now (a RADOS delete is the discard) and return."""
        if settle:
            task_status.started()
            self.release()
            if self.deletable:
                await self.delete_released()
            return
        if self._running:
            raise InvalidArgument(f"pool {self.state.name}: its background task runs already")
        self._running = True
        task_status.started()
        try:
            next_refresh = trio.current_time() + REFRESH
            while not self._hooks.closed and self.conn.fenced is None:
                self._wake = trio.Event()       # before the round: no release is missed
                if self.deletable:
                    await self.delete_released()
                if trio.current_time() >= next_refresh:
                    next_refresh = trio.current_time() + REFRESH
                    try:
                        await self.refresh()
                    except Fenced:
                        raise
                    except StorageError as e:   # a mon hiccup: keep the last numbers
                        log.warning("pool %s: %s", self.state.name, e.message)
                if self._hooks.closed:
                    break
                # Deletes that failed are retried after RETRY seconds, not in a loop.
                until = min(next_refresh, trio.current_time() + RETRY) if self.deletable \
                    else next_refresh
                with trio.move_on_at(until):
                    await self._wake.wait()
        except Fenced:
            return
        finally:
            self._running = False

    def wake(self) -> None:
        """Let ``run`` see a closed pool now."""
        self._wake.set()

    # ==== room and health ==================================================================
    def _free_bytes(self, prof: Profile | None) -> int:
        if prof is not None and (prof.k, prof.m) != (1, 0):
            return 0
        return max(0, self.capacity() - len(self.held) * self.segment_size)

    def room(self, prof: Profile | None) -> Room:
        ok = (prof is None or (prof.k, prof.m) == (1, 0)) and self.conn.fenced is None
        present = int(self.conn.fenced is None)
        cap = self.capacity() if ok else 0
        free = self._free_bytes(prof) if ok else 0
        return Room(free, cap, int(ok and free > 0), 0, int(ok), 0, present, 1 - present)

    def is_free(self, index: int, extent: int) -> bool:
        """For the checker (LocalStore's free list): a RADOS object number held by a
        segment is never free; numbers are not reused."""
        return False

    def health(self) -> tuple[DomainHealth, ...]:
        cap = self.capacity()
        units = cap // self.segment_size if self.segment_size else 0
        return (DomainHealth(DOMAIN, f"rados:{self.conn.pool} ({self.cluster_health})",
                             self.conn.fenced is None, units,
                             max(0, units - len(self.held))),)


async def _numbers(conn: Connection, state: PoolState) -> set[int]:
    """The segment numbers of ``state``'s pool that have an object in the RADOS pool."""
    prefix = f"{state.uuid}.seg."

    def scan() -> set[int]:
        return {int(obj.key[len(prefix):].split(".")[0], 16)
                for obj in conn.ioctx.list_objects() if obj.key.startswith(prefix)}
    return await conn.run("read", f"list the segments of pool {state.name}", scan)

