"""The SegmentStore: where fragments meet storage (DESIGN section 8), and ``LocalStore``,
its implementation on the pool's member devices.

The Pool (and the cleaner, rebuild and scrub above it) decide *what* a segment holds:
records, their map entries, fill and live counts, marks. A store decides *where* and *how*
its bytes live: it places a new segment on k + m failure domains, writes runs of records
into a segment's columns, hands out column handles that reads go through, syncs, takes
freed segments back once nothing can read them, discards, and reports its room and
health. A second backend (Ceph RADOS, issue 24) implements the same Protocol: its
segments are objects, a column handle reads an object's byte ranges, free deletes, its
room is the cluster's.

The interface, as a caller may rely on it (docs/INTERNALS.md "The SegmentStore"):

- ``allocate(k, m)``: a placement for a new segment (an opaque value the caller records
  in the segment's metadata and gives back unchanged): k + m columns on distinct failure
  domains, in never-written or freed-and-released space. NoSpace when there is none.
- ``columns(seg)``: one ``Column`` per column of the segment: a byte-range reader
  (``reader.pread``/``preadv_nowait``; None when the column is absent now), the byte
  offset of the segment's column in it, and a name for messages; ``rebuilding=c``: column
  c's reader even while it awaits a rebuild. Handles may be cached: a store keeps them
  true by itself (invariant 7), no caller tells it when members or marks change.
- ``write(runs)``: write records at sector offsets of segments' columns (one vectored
  write per domain). Not durable until ``sync``; returns the domains written and the
  domains whose writes failed (the caller decides whether the records still stand).
  ``write_fragments(repairs, errors=...)``: the outcome of a read or verify pass goes
  back to the store: the read and checksum errors it met (by column name) are counted
  against their domains first, then the fragments it rebuilt (rebuild, scrub, a read's
  repair) are written in place of bad or missing ones, under the write deadline.
- ``sync(domains)``: everything written to those domains (default: all) is durable when
  it returns (DESIGN 1); a domain whose sync fails is reported through the fault hook.
- ``free(placement)``: the segment is no longer referenced once the next commit is
  durable; ``durable(n)`` says that commit landed, covering the first n columns freed
  (in ``free`` order: the commit noted how many were pending when it began). The space is
  reused only after that and once no read begun before it is in flight (``read_hold()``,
  a token released when the read ends) -- so a read never sees another segment's bytes
  (DESIGN 3). ``reclaim()``: release what no read holds back, and say what the caller does
  next (``Reclaim``): WAITED for older reads and some came back (try again), COMMIT (frees
  wait for a commit), NOTHING.
- ``run()``: background discard of released space (advisory), until the pool closes;
  ``run(settle=True)``: discard everything released so far, now, and return once done
  (the runner does it if one is serving, else the caller's task).
- ``room(prof)``: the space accounting's view (free bytes in full stripes of a profile,
  the capacity, which domains can take a column); ``health()``: each failure domain.

Invariants this module owns (DESIGN numbers in parentheses):

1. A placement's k + m columns lie on distinct failure domains (members), never on a
   removed one or one being removed (5).
2. Space is handed out by ``allocate`` only if it is free: never written since it was
   released, or part of a segment whose free is durable (3).
3. Freed space is released only after the commit that freed it is durable (``durable``)
   and no read (or pin) begun before that commit is in flight (3; space rule S5).
4. A released extent is discarded at most once per release, only while it is still free,
   and a write into an extent whose discard is under way waits for the discard (3, 6).
5. ``write`` returns only after every column write has finished or been given up at the
   write deadline; a domain that hung is faulted at once (for a full rebuild), and every
   failure is counted against its domain (5).
6. ``sync`` returns only after every written domain that is still present is durable;
   one whose sync fails is faulted, and with no domain left it raises (1).
7. ``columns`` never hands out a handle older than the last member op: what columns
   depend on (the members' devices, their marks) changes only beside a member op, which
   moves ``PoolState.members_epoch``; the cache is dropped when that moved (one integer
   compare per call) and trimmed of freed segments when it outgrows the live ones (2, 5).
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import NamedTuple, Protocol

import trio

from pool import codec, records
from pool.deadlines import Deadlines
from pool.device import Device
from pool.errors import DeviceError, DeviceHung, InvalidArgument, NoSpace
from pool.layout import SECTOR, Layout
from pool.profile import Profile
from pool.state import PoolState, Segment

log = logging.getLogger("pool.pool")   # its lines keep the name they always had
DISCARD_BATCH = 256   # freed extents discarded per round of the discard task
DEVICE_QUEUE = 4      # calls in flight per member device (its limiter)
DISCARD_DELAY = 60.0  # seconds an extent stays free before it is discarded

# Where a segment's columns are, in the store's own terms: the caller records it in the
# segment's metadata and gives it back; for LocalStore, (member, extent) per column.
Placement = tuple[tuple[int, int], ...]


class Column(NamedTuple):
    """A handle on one column of a segment, for reads (``pool.records``) and repairs.

    ``reader`` is a byte range (``pool.device.Device``: pread, preadv_nowait, pwrite):
    for LocalStore the member device, for an object store the column's object. None: the
    column is absent now (its domain is away, or its bytes await a rebuild)."""

    reader: Device | None
    base: int            # byte offset of the segment's column in ``reader``
    name: str            # for messages: a device path, an object name


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    written: frozenset[int]        # failure domains whose column writes all landed
    failed: frozenset[int]         # domains whose writes failed (counted, maybe faulted)


@dataclass(frozen=True, slots=True)
class Room:
    """What the store can still place for a profile (``SegmentStore.room``; without one,
    ``free_bytes`` and ``capacity_bytes`` count every free and every held unit)."""

    free_bytes: int          # bytes of the full stripes free space still forms
    capacity_bytes: int      # bytes of the full stripes the present domains hold
    with_room: int           # present domains new segments may use that have free space
    away_with_room: int      # away domains a segment may still use that have free space
    usable: int              # present domains new segments may use
    away: int                # away domains a segment may still use (up to m columns)
    present: int             # domains present
    missing: int             # domains known but away


@dataclass(frozen=True, slots=True)
class DomainHealth:
    """One failure domain as the store sees it (for LocalStore: a member)."""

    domain: int
    name: str
    present: bool
    units: int               # allocation units (extents) it holds
    free_units: int


class ReadHold(Protocol):
    """A read (or a pin) in flight, from ``SegmentStore.read_hold``: space freed by a
    commit durable after it began is not reused until it is released (invariant 3)."""

    def release(self) -> None: ...


class Reclaim(enum.Enum):
    """What ``SegmentStore.reclaim`` found, and what the caller does next."""

    WAITED = "waited"        # freed space came back from reads older than its free: retry
    COMMIT = "commit"        # frees wait for a commit: one would make them reusable
    NOTHING = "nothing"      # nothing freed is held back


class SegmentStore(Protocol):
    """DESIGN section 8's narrow interface; see the module docstring for the promises."""

    def allocate(self, k: int, m: int) -> Placement: ...

    def columns(self, seg: Segment, *, rebuilding: int | None = None
                ) -> tuple[Column, ...]: ...

    async def write(self, runs: Sequence[tuple[Segment, int,
                                               Sequence[codec.EncodedRecord]]]
                    ) -> WriteOutcome: ...

    async def write_fragments(self, repairs: Sequence[records.Repair], *,
                              errors: Counter[tuple[str, str]] | None = None,
                              foreground: bool = False) -> tuple[int, frozenset[int]]: ...

    async def sync(self, which: Sequence[int] | None = None) -> None: ...

    def free(self, placement: Placement) -> None: ...

    def durable(self, freed: int) -> None: ...

    async def reclaim(self) -> Reclaim: ...

    def read_hold(self) -> ReadHold: ...

    async def run(self, *, settle: bool = False,
                  task_status: trio.TaskStatus[None] = ...) -> None: ...

    def room(self, prof: Profile | None) -> Room: ...

    def health(self) -> tuple[DomainHealth, ...]: ...


class StoreHooks(Protocol):
    """What a store reports to (and asks of) its pool."""

    def fault(self, index: int, why: str, *, state: str = ..., full: bool = ...) -> None: ...

    def count_error(self, index: int, kind: str, why: str = "") -> None: ...

    def count(self, counter: str, n: int) -> None: ...

    @property
    def closed(self) -> bool: ...

    @property
    def stopped(self) -> bool: ...


class ReadGenerations:
    """The reads in flight by the release generation they began in, which both stores
    keep for invariant 3: ``release`` (each store's own) frees what a commit freed once no
    read begun before that commit is in flight."""

    release_gen: int
    readers: Counter[int]

    def release(self) -> None:
        raise NotImplementedError

    def read_hold(self) -> HeldRead:
        """Note a read (or a pin) in flight until its ``release`` (invariant 3)."""
        gen = self.release_gen
        self.readers[gen] += 1
        return HeldRead(self._read_end, gen)

    def _read_end(self, gen: int) -> None:
        self.readers[gen] -= 1
        if not self.readers[gen]:
            del self.readers[gen]
        self.release()


class HeldRead:
    """A store's ``read_hold`` token (either store's): the release generation its read
    began in, and the store's function that ends it."""

    __slots__ = ("_end", "_gen")

    def __init__(self, end: Callable[[int], None], gen: int) -> None:
        self._end: Callable[[int], None] | None = end
        self._gen = gen

    def release(self) -> None:
        end, self._end = self._end, None
        if end is not None:                # a second release changes nothing
            end(self._gen)


class LocalStore(ReadGenerations):
    """Segments on extents of the pool's member devices (``Pool.store``).

    ``devices`` is the pool's own list (a member that faults or is added changes it
    there, and the store sees it); ``state`` gives the members and segments."""

    def __init__(self, state: PoolState, layout: Layout, devices: list[Device | None],
                 deadlines: Deadlines, hooks: StoreHooks, *, discard_freed: bool) -> None:
        self.state = state
        self.layout = layout
        self.devices = devices
        self.deadlines = deadlines
        self._hooks = hooks
        self.free_extents: list[set[int]] = [set() for _ in state.members]
        self.pending_free: list[tuple[int, int]] = []   # freed by uncommitted ops
        # Committed frees (generation, member, extent), waiting for older readers.
        self.releasable: list[tuple[int, int, int]] = []
        # Reads in flight by the release generation they began in: extents freed by a
        # commit of generation g are reused once no read begun before g is in flight.
        self.release_gen = 0
        self.readers: Counter[int] = Counter()
        self.released = trio.Event()   # set (and replaced) when freed extents come back
        self.avoid: set[int] = set()    # members new segments must not use (removal)
        self.limiters = [trio.CapacityLimiter(DEVICE_QUEUE) for _ in devices]
        self.column_cache: dict[int, tuple[Column, ...]] = {}
        self._columns_epoch = state.members_epoch     # what column_cache was built at
        self._bg_writes = trio.CapacityLimiter(1)   # rebuild/scrub writes, one at a time
        # Free extents to discard (hole punch / BLKDISCARD: thin backing files and SSDs
        # get the space back), and those being discarded now (writes into one of these,
        # reused meanwhile, wait for its discard: see ``write``).
        self.discard_freed = discard_freed
        self.discard_queue: dict[tuple[int, int], float] = {}   # -> when it was freed
        self.discarding: dict[tuple[int, int], trio.Event] = {}
        self._running = False                       # a ``run`` task is serving the pool
        self._settled = trio.Event()                # set after each round ``run`` finishes
        self._discard_wake = trio.Event()           # cut the runner's wait short
        self._settling = 0                          # run(settle=True) waiting: discard all now
        self._discard_lock = trio.Lock()            # one inline discarder without a runner

    # ==== placement (invariants 1, 2) ======================================================
    def allocate(self, k: int, m: int) -> Placement:
        free = self.free_extents
        candidates = sorted(
            (i for i, f in enumerate(free) if f and self.devices[i] is not None
             and i not in self.avoid),
            key=lambda i: (-len(free[i]), i))
        if len(candidates) < k + m:
            # Degraded: members away take up to m columns, which a rebuild fills in later
            # (their marks say so), so writes go on while redundancy allows.
            away = sorted((i for i, f in enumerate(free) if f and self.placeable(i)
                           and self.devices[i] is None),
                          key=lambda i: (-len(free[i]), i))
            candidates += away[:min(m, k + m - len(candidates))]
        if len(candidates) < k + m:
            raise NoSpace(f"pool {self.state.name}: no room for a new {Profile(k, m)} segment "
                          f"(needs free extents on {k + m} distinct devices, "
                          f"{len(candidates)} have some)")
        extents = []
        for i in sorted(candidates[:k + m]):
            e = min(free[i])
            free[i].discard(e)
            self.discard_queue.pop((i, e), None)   # about to be written: no need
            extents.append((i, e))
        return tuple(extents)

    def placeable(self, index: int) -> bool:
        """Whether a segment may put a column on this member (away members included)."""
        return index not in self.avoid and self.state.members[index].state != "removed"

    def is_free(self, index: int, extent: int) -> bool:
        """Whether extent ``extent`` of member ``index`` is on the free list."""
        return index < len(self.free_extents) and extent in self.free_extents[index]

    # ==== columns ==========================================================================
    def columns(self, seg: Segment, *, rebuilding: int | None = None
                ) -> tuple[Column, ...]:
        """The segment's columns; column ``rebuilding`` gets its reader even while it
        awaits a rebuild (the rebuild writes it). Cached until a member op (invariant 7)."""
        cache = self.column_cache
        if self._columns_epoch != self.state.members_epoch:
            cache.clear()
            self._columns_epoch = self.state.members_epoch
        cols = cache.get(seg.id)
        if cols is None:
            if len(cache) > 2 * len(self.state.segments) + 64:
                cache.clear()                       # entries of freed segments
            cols = cache[seg.id] = tuple(
                self.column(idx, ext) if seg.id not in self.state.members[idx].marks
                else Column(None, 0, f"member {idx} (awaiting rebuild)")
                for idx, ext in seg.extents)
        if rebuilding is not None:
            listed = list(cols)
            listed[rebuilding] = self.column(*seg.extents[rebuilding])
            return tuple(listed)
        return cols

    def column(self, idx: int, ext: int) -> Column:
        """Extent ``ext`` of member ``idx``, present or not, marks aside (a rebuild
        writes the column it targets)."""
        dev = self.devices[idx]
        name = dev.path if dev is not None else f"member {idx} (missing)"
        return Column(dev, self.layout.extent_offset(ext), name)

    def _count_errors(self, errors: Counter[tuple[str, str]]) -> None:
        """Count the errors a read or a verify pass met ((column name, "read" |
        "checksum") -> n) against the members they came from."""
        paths = {d.path: i for i, d in enumerate(self.devices) if d is not None}
        for (path, kind), n in errors.items():
            if path in paths:
                for _ in range(n):
                    self._hooks.count_error(paths[path], kind, f"{kind} error on {path}")

    # ==== writes and syncs (invariants 4-6) ================================================
    async def write(self, runs: Sequence[tuple[Segment, int,
                                               Sequence[codec.EncodedRecord]]]
                    ) -> WriteOutcome:
        """Write each run's records, back to back from its sector offset, into its
        segment's present columns: one vectored write per member for all runs."""
        writes: dict[int, list[tuple[Device, int, list[codec.Buffer]]]] = {}
        for seg, off, recs in runs:
            for c, (idx, ext) in enumerate(seg.extents):
                dev = self.devices[idx]
                if dev is None:
                    continue
                frags = [b for rec in recs for b in rec.pieces[c]]
                writes.setdefault(idx, []).append(
                    (dev, self.layout.extent_offset(ext) + off * SECTOR, frags))
        if self.discarding:
            # A new segment may have been given an extent whose discard is under way.
            for seg, _off, _recs in runs:
                for key in seg.extents:
                    ev = self.discarding.get((key[0], key[1]))
                    if ev is not None:
                        await ev.wait()
        failed = await self.per_device([(idx, partial(records.write_columns, wl))
                                        for idx, wl in writes.items()], "write",
                                       tolerate=True)
        return WriteOutcome(frozenset(i for i in writes if i not in failed),
                            frozenset(failed))

    async def sync(self, which: Sequence[int] | None = None) -> None:
        """Sync members; one whose sync fails is faulted (what it took may not be
        durable), and the commit goes on with the others."""
        failed = await self.per_device(self.calls(lambda d: d.sync(), which), "write",
                                       tolerate=True, what="a sync")
        for i, e in failed.items():
            self._hooks.fault(i, f"sync failed: {e.message}", full=True)
        if not any(d is not None for d in self.devices):
            raise DeviceError(f"pool {self.state.name}: no member could be synced")

    def calls(self, fn: Callable[[Device], None],
              which: Sequence[int] | None = None) -> list[tuple[int, Callable[[], None]]]:
        """``fn`` bound to each chosen present member's device."""
        idx = [i for i in (which if which is not None else range(len(self.devices)))
               if self.devices[i] is not None]
        calls: list[tuple[int, Callable[[], None]]] = []
        for i in idx:
            dev = self.devices[i]
            assert dev is not None
            calls.append((i, partial(fn, dev)))
        return calls

    async def per_device(self, calls: Sequence[tuple[int, Callable[[], None]]],
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
                    await trio.to_thread.run_sync(call, limiter=self.limiters[i],
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
            self._hooks.fault(i, failures[i].message, full=True)
        for i, e in failures.items():
            self._hooks.count_error(i, kind, e.message)
        if failures and not tolerate:
            raise next(iter(failures.values()))
        return failures

    async def write_fragments(self, repairs: Sequence[records.Repair], *,
                              errors: Counter[tuple[str, str]] | None = None,
                              foreground: bool = False) -> tuple[int, frozenset[int]]:
        """Count ``errors``, the read and checksum errors the read or verify pass that
        computed ``repairs`` met, against their members; then write the fragments a
        rebuild or scrub computed, one thread at a time per pool
        beside its verify work: (how many to count as written -- none when some failed
        and none landed --, the members written to). ``foreground``: fragments a read
        rebuilt, written at once, one thread per member (``_rewrite``).

        Each device's fragments are written under the write deadline: a device that has
        not finished by then fails all of them, and a member that hung so is faulted at
        once, for a full rebuild (the stuck write may still land), as a hung foreground
        write faults it (invariant 5)."""
        if errors:
            self._count_errors(errors)
        if not repairs:
            return 0, frozenset()
        if foreground:
            return await self._rewrite(repairs)
        groups: dict[int, list[records.Repair]] = {}
        for r in repairs:
            groups.setdefault(id(r.device), []).append(r)
        batches = list(groups.values())
        outcomes: dict[int, tuple[int, list[records.Repair]]] = {}

        def writer(k: int) -> Callable[[], None]:
            def write() -> None:
                outcomes[k] = records.write_repairs(batches[k])
            return write

        given_up = await trio.to_thread.run_sync(
            records.writes_within, [(b[0].device, writer(k)) for k, b in enumerate(batches)],
            "a rebuild write", self.deadlines, limiter=self._bg_writes)
        index = {id(d): i for i, d in enumerate(self.devices) if d is not None}
        touched = frozenset(i for r in repairs if (i := index.get(id(r.device))) is not None)
        done, failed = 0, 0
        for k, (batch, error) in enumerate(zip(batches, given_up, strict=True)):
            i = index.get(id(batch[0].device))
            if error is not None:           # given up (hung), or raised outside a write
                failed += len(batch)
                if i is not None:
                    if isinstance(error, DeviceHung):
                        self._hooks.fault(i, error.message, full=True)
                    else:
                        self._hooks.count_error(i, "write", error.message)
                continue
            wrote, lost = outcomes[k]
            done += wrote
            failed += len(lost)
            if i is not None:
                for _r in lost:
                    self._hooks.count_error(i, "write", "writing a rebuilt fragment")
        return (len(repairs) - failed if done or not failed else 0), touched

    async def _rewrite(self, repairs: Sequence[records.Repair]
                       ) -> tuple[int, frozenset[int]]:
        """Rewrite fragments a read rebuilt, one thread per member, under the write
        deadline (``per_device``): a member that hangs on it is faulted rather than
        hanging the read; (fragments written, members written to)."""
        index = {id(d): i for i, d in enumerate(self.devices) if d is not None}
        by_member: dict[int, list[records.Repair]] = {}
        for r in repairs:
            i = index.get(id(r.device))
            if i is not None:
                by_member.setdefault(i, []).append(r)
        written: list[int] = []

        def rewrite(rs: list[records.Repair]) -> None:
            written.append(records.apply_repairs(rs))
        # Counted as a read in flight, so that extents freed meanwhile are not reused
        # (or discarded) under these writes.
        hold = self.read_hold()
        try:
            await self.per_device([(i, partial(rewrite, rs)) for i, rs in by_member.items()],
                                  "write", tolerate=True, what="a repair write")
        finally:
            hold.release()
        return sum(written), frozenset(i for i in by_member if self.devices[i] is not None)

    # ==== frees, readers and release (invariant 3) =========================================
    def free(self, placement: Placement) -> None:
        """A segment was freed by an op not yet committed."""
        self.pending_free.extend(placement)

    def durable(self, freed: int) -> None:
        """The commit carrying the first ``freed`` columns freed is durable (a new
        generation of releases; reads begun from now on cannot reach them)."""
        self.release_gen += 1
        self.releasable.extend((self.release_gen, i, e) for i, e in self.pending_free[:freed])
        del self.pending_free[:freed]
        self.release()

    async def reclaim(self) -> Reclaim:
        """Release the freed space no read holds back (invariant 3). If freed space still
        waits for reads older than its freeing commit, wait until some comes back
        (WAITED: the caller tries again); else COMMIT when frees wait for a commit (one
        would make them durable), NOTHING when none does."""
        self.release()
        if self.releasable:
            await self.released.wait()
            return Reclaim.WAITED
        return Reclaim.COMMIT if self.pending_free else Reclaim.NOTHING

    def release(self) -> None:
        """Give back the extents of freed segments that no read in flight may still use:
        those freed by a commit before the oldest such read began (a read begun later
        found no reference to them). Reads that keep coming never hold them back."""
        if not self.releasable:
            return
        oldest = min(self.readers) if self.readers else self.release_gen + 1
        ready = [(i, e) for gen, i, e in self.releasable if gen <= oldest]
        if not ready:
            return
        self.releasable = [r for r in self.releasable if r[0] > oldest]
        now = trio.current_time()
        for idx, e in ready:
            if idx < len(self.free_extents):
                self.free_extents[idx].add(e)
                if self.discard_freed:
                    self.discard_queue[(idx, e)] = now
        self.released.set()
        self.released = trio.Event()
        if self.discard_queue:
            self._discard_wake.set()                # the runner, if any, takes them

    # ==== discard (invariant 4) ============================================================
    async def run(self, *, settle: bool = False,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """``Pool.run``: discard freed extents, each once it has stayed free
        DISCARD_DELAY seconds, until the pool is closed; an exception drops the queue
        (discard is advisory) and propagates to the owner. ``settle``: discard every
        extent freed so far, now, and return once done (``_settle``)."""
        if settle:
            task_status.started()
            await self._settle()
            return
        if self._running:
            raise InvalidArgument(f"pool {self.state.name}: its background task runs already")
        self._running = True
        task_status.started()
        try:
            while not self._hooks.closed:
                await self._discard_rounds()
                self._settled.set()
                if self._hooks.closed:
                    break
                self._discard_wake = trio.Event()
                await self._discard_wake.wait()
        except Exception:
            self.discard_queue.clear()
            raise
        finally:
            self._running = False
            self._settled.set()

    async def _discard_rounds(self) -> None:
        """Discard queued extents as they fall due (all of them at once while a
        ``run(settle=True)`` waits) until the queue is empty or the pool has failed."""
        while self.discard_queue and not self._hooks.stopped:
            now = trio.current_time()
            if not self._settling:
                due = min(self.discard_queue.values()) + DISCARD_DELAY
                if due > now:
                    self._discard_wake = trio.Event()
                    with trio.move_on_at(due):
                        await self._discard_wake.wait()
                    continue
            await self._discard_freed(now if self._settling else now - DISCARD_DELAY)

    async def _settle(self) -> None:
        """Discard every extent freed so far, now, and wait for it: the runner does it
        if one is running, else this task does."""
        self._settling += 1
        try:
            if not self._running:
                async with self._discard_lock:
                    await self._discard_rounds()
            while (self._running and not self._hooks.stopped
                   and (self.discard_queue or self.discarding)):
                settled = self._settled = trio.Event()
                self._discard_wake.set()
                await settled.wait()
        finally:
            self._settling -= 1
            self._discard_wake.set()        # a closed pool's runner sees it and returns

    async def _discard_freed(self, cutoff: float) -> None:
        """Discard extents freed (their frees committed) no later than ``cutoff``, one
        thread per member. They stay allocatable meanwhile: a segment given one of them
        waits for its discard before writing (``write``), and one taken before its turn
        is not discarded at all. Discard is advisory: a device that cannot do it keeps
        the bytes, and one that fails it is charged a write error."""
        for key in [k for k in self.discard_queue
                    if k[0] >= len(self.devices) or self.devices[k[0]] is None]:
            del self.discard_queue[key]
        # A bounded batch: each member's share must finish well within the write timeout.
        batch = sorted(k for k, t in self.discard_queue.items() if t <= cutoff)
        batch = batch[:DISCARD_BATCH]
        for key in batch:
            del self.discard_queue[key]
        if not batch:
            return
        done = trio.Event()
        for key in batch:
            self.discarding[key] = done
        size = self.layout.extent_size
        by_member: dict[int, list[int]] = {}
        for i, e in batch:
            by_member.setdefault(i, []).append(self.layout.extent_offset(e))

        def punch(dev: Device, offsets: list[int]) -> None:
            for off in offsets:
                dev.discard(off, size)
        try:
            await self.per_device(
                [(i, partial(punch, dev, offs)) for i, offs in by_member.items()
                 if (dev := self.devices[i]) is not None],
                "write", tolerate=True, what="a discard")
            self._hooks.count("discarded_extents", len(batch))
        finally:
            for key in batch:
                del self.discarding[key]
            done.set()

    # ==== room and health ==================================================================
    def room(self, prof: Profile | None) -> Room:
        """The free bytes and the capacity in full stripes of ``prof`` on the present
        domains (without a profile: every free and every held extent), and which domains
        can take a column of a new segment. Free extents of members away count for up to
        m columns of a degraded stripe (rebuilt later). One pass over the members: the
        space account asks on every reservation."""
        ext = self.layout.extent_size
        held: list[int] = []
        free_here: list[int] = []
        free_away: list[int] = []
        able = away = usable = gone = 0
        members = self.state.members
        for i, f in enumerate(self.free_extents):
            placeable = i not in self.avoid and members[i].state != "removed"
            if self.devices[i] is not None:
                held.append(members[i].n_extents)
                free_here.append(len(f))
                if i not in self.avoid:
                    usable += 1
                    able += bool(f)
            elif placeable:
                gone += 1
                away += bool(f)
                free_away.append(len(f))
        present = len(held)
        if prof is None:
            free, capacity = sum(free_here) * ext, sum(held) * ext
        else:
            w = prof.width
            best_away = sorted(free_away, reverse=True)[:prof.m]
            free = w * stripes(tuple(free_here + best_away), w) * ext
            capacity = stripes(tuple(held), w) * w * ext
        return Room(free, capacity, able, away, usable, gone, present,
                    len(self.devices) - present)

    def health(self) -> tuple[DomainHealth, ...]:
        return tuple(
            DomainHealth(mi.index, dev.path if (dev := self.devices[mi.index]) is not None
                         else mi.path, dev is not None, mi.n_extents,
                         len(self.free_extents[mi.index]))
            for mi in self.state.members)


@lru_cache(maxsize=256)        # asked on every reserve; the counts change rarely
def stripes(counts: tuple[int, ...], width: int) -> int:
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
