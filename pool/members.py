"""The pool's members: faulting one, adding one, taking one offline and back online,
replacing and removing one, watching that their devices are still there, and their status
rows. Works on the pool through ``PoolHandle``, the narrow set of pool parts it uses.

Invariants this module owns (DESIGN invariants cited in brackets):

1. A member is used (``devices[i]``) or away; a faulted or offline member's device is
   parked (kept, unused) until it comes back online, is replaced or removed, or the pool
   closes; a removed member has no device at all.
2. A member that goes away (``fault``) gets a new epoch (pool.health) and, in the same
   metadata op, marks for every segment it holds: the whole segment when the member may
   have missed writes anywhere in it (``full``, a pinned segment being written), else
   what is written past the current fill; rebuild clears the marks [5].
3. A member comes back (``online``) only with a device whose label names it; a
   replacement or a new member is refused when it is labelled, too small, or the same
   device as a current member under any path, and gets the committed metadata and its
   label, synced, before it is used [9, 10].
4. ``offline`` and ``remove`` are refused, changing nothing, when segments would be left
   with fewer than k fragments, too few devices would remain for a profile in use, or the
   others lack the room for the member's records [5, 8, 9].
5. When the last member goes away the pool fails: nothing can be written durably.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import trio

from pool import identity
from pool.deadlines import Deadlines
from pool.device import Device
from pool.devio import close_devices, run, write_within
from pool.errors import DeviceHung, InvalidArgument, MediumError, NoSpace, NotFound
from pool.health import MemberHealth
from pool.labels import read_label, refuse_labelled, wipe_quietly, write_label
from pool.layout import LABEL_SIZE, SB_OFFSET, SECTOR, Label, Layout, new_uuid
from pool.metastore import MetaStore
from pool.pins import SegmentPins
from pool.profile import Profile
from pool.state import AWAY, MemberInfo, PoolState, Segment, op_json
from pool.status import MemberStatus
from pool.store import LocalStore, stripes
from pool.txn import Transaction

if TYPE_CHECKING:
    from pool.cleaner import SegmentCleaner

log = logging.getLogger(__name__)


class PoolHandle(Protocol):
    """What ``Members`` uses of the pool: the shared parts (state, layout, devices,
    metadata, deadlines), the transaction (``txn``: its lock, ops, checkpoints, state),
    the store (``store``: free extents, placement, limiters, column handles), and the
    pool's own open segments, pins and reaping."""

    @property
    def state(self) -> PoolState: ...
    @property
    def layout(self) -> Layout: ...
    @property
    def devices(self) -> list[Device | None]: ...
    @property
    def meta(self) -> MetaStore: ...
    @property
    def deadlines(self) -> Deadlines: ...
    @property
    def left_out(self) -> dict[str, str]: ...
    @property
    def txn(self) -> Transaction: ...
    @property
    def devstore(self) -> LocalStore: ...
    @property
    def cleaner(self) -> SegmentCleaner: ...
    @property
    def open_segments(self) -> dict[tuple[int, int], Segment]: ...
    @property
    def pins(self) -> SegmentPins: ...
    def reap(self) -> None: ...


def same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


class Members:
    """The members of one pool (invariants 1-5); ``health`` counts their errors and
    reports a member to fault back to ``fault``."""

    def __init__(self, pool: PoolHandle, health: MemberHealth) -> None:
        self._pool = pool
        self.health = health
        # Devices of members that are faulted or offline: kept (not used) so that
        # ``online`` can take them back and ``close`` releases them.
        self.parked: dict[int, Device] = {}

    @property
    def _name(self) -> str:
        return self._pool.state.name

    # ---- going away -----------------------------------------------------------------------
    def fault(self, index: int, why: str, *, state: str = "faulted",
              full: bool = False) -> None:
        """Stop using member ``index`` (faulted, or offline for maintenance). I/O goes on
        degraded; everything written to its segments from now on is marked for a rebuild
        when it comes back or is replaced (invariant 2)."""
        p = self._pool
        dev = p.devices[index]
        if dev is None:
            return
        p.devices[index] = p.meta.devices[index] = None
        self.health.went_away(index, why)
        self.parked[index] = dev
        p.txn.dirty.discard(index)
        # New writes go to segments without it where possible: close the open ones on it.
        self._close_open_on(index)
        # A segment being written right now (pinned) may lack its fragment anywhere.
        marks = [[sg.id, 0 if full or sg.id in p.pins else sg.fill]
                 for sg in p.state.segments.values()
                 if any(i == index for i, _e in sg.extents)]
        p.txn.do(op_json(op="member_state", index=index, state=state,
                         last_gen=p.txn.sb_gen, marks=marks))
        if state == "faulted":
            log.error("pool %s: member %d (%s) faulted: %s; running degraded",
                      self._name, index, dev.path, why)
        else:
            log.warning("pool %s: member %d (%s) taken offline", self._name, index,
                        dev.path)
        if not any(d is not None for d in p.devices):
            p.txn.fail(f"no member left ({why})")

    def _close_open_on(self, index: int) -> None:
        p = self._pool
        for key, seg in list(p.open_segments.items()):
            if any(i == index for i, _e in seg.extents):
                del p.open_segments[key]
                if seg.live == 0:
                    p.state.emptied.add(seg.id)

    def absorb_meta_failures(self) -> None:
        """Fault every member whose metadata write failed (``MetaStore.failed``)."""
        meta = self._pool.meta
        for i, err in sorted(meta.failed.items()):
            self.fault(i, f"its metadata write failed: {err.message}",
                       full=isinstance(err, DeviceHung))
            self.health.count(i, "write", err.message)
        meta.failed.clear()

    def unavailable_segments(self) -> int:
        """Segments with more fragments away than their parity covers (reads fail)."""
        return sum(1 for sg in self._pool.state.segments.values()
                   if sum(1 for i, _e in sg.extents if self.col_absent(i, sg.id)) > sg.m)

    def col_absent(self, index: int, seg_id: int) -> bool:
        """Whether member ``index``'s fragments of segment ``seg_id`` are unusable."""
        p = self._pool
        if index >= len(p.devices):
            return False        # not a member: the RADOS pool (pool.rados), never away
        return p.devices[index] is None or seg_id in p.state.members[index].marks

    def epoch(self, index: int) -> int:
        """Changes whenever member ``index`` goes away (see ``mark_rebuilt``)."""
        return self.health.epochs[index]

    def mark_rebuilt(self, index: int, seg_id: int, dev: Device, epoch: int) -> None:
        """Member ``index`` (still ``dev``, and not away since ``epoch`` gave ``epoch``
        when the rebuild of the segment began) holds every fragment of ``seg_id`` again. If
        it went away meanwhile, even to come back with the same device, writes may have
        missed it: the mark stays for the next pass (MemberHealth invariant 4)."""
        p = self._pool
        if p.devices[index] is not dev or self.health.epochs[index] != epoch:
            return
        p.txn.dirty.add(index)
        p.txn.do(op_json(op="member_clean", index=index, seg=seg_id))

    def _away_after(self, index: int) -> int:
        """Segments that would lose more fragments than their parity covers without
        ``index`` (on top of what is away now)."""
        return sum(1 for sg in self._pool.state.segments.values()
                   if any(i == index for i, _e in sg.extents)
                   and sum(1 for i, _e in sg.extents
                           if i == index or self.col_absent(i, sg.id)) > sg.m)

    # ---- adding and bringing back ---------------------------------------------------------
    async def add(self, dev: Device) -> None:
        """Grow the pool by one member (gets a label and a copy of the metadata)."""
        p = self._pool
        p.txn.check_ok()
        if any(d is not None and d.path == dev.path for d in p.devices):
            raise InvalidArgument(f"{dev.path} is already a member of pool {self._name}")
        self.refuse_device(dev)
        n_ext = p.layout.n_extents(dev.size)
        if n_ext < 1:
            need = p.layout.data_offset + p.layout.extent_size + LABEL_SIZE
            raise InvalidArgument(f"{dev.path} is too small for this pool's layout "
                                  f"(needs at least {need} bytes)")
        await run(refuse_labelled, [dev], p.deadlines)
        async with p.txn.lock:
            idx = len(p.state.members)
            mi = MemberInfo(new_uuid(), idx, dev.size, n_ext)
            await self._prepare(dev, mi, idx)
            p.txn.do(op_json(op="member_add", uuid=mi.uuid, index=idx, size=dev.size,
                             n_extents=n_ext, path=dev.path))
            p.devices.append(dev)
            p.meta.devices.append(dev)
            p.devstore.limiters.append(trio.CapacityLimiter(4))
            self.health.add_member()
            p.devstore.free_extents.append(set(range(n_ext)))
            await p.txn.checkpoint_locked()
        log.info("pool %s: added %s as member %d (%d extents)", self._name, dev.path,
                 idx, n_ext)

    async def _prepare(self, dev: Device, mi: MemberInfo, index: int) -> None:
        """Give ``dev`` the committed metadata and member ``index``'s label, synced
        (invariant 3)."""
        p = self._pool

        def prepare() -> None:
            dev.pwrite(SB_OFFSET, bytes(p.layout.pages_offset - SB_OFFSET))
            p.meta.copy_used_units(dev)
            write_label(dev, Label(p.state.uuid, p.state.name, mi.uuid, index,
                                   p.state.generation + 1, dev.size, p.layout))
            dev.sync()
        await write_within([(dev, prepare)], "preparing a new member", p.deadlines)

    async def offline(self, index: int) -> None:
        """Stop using a member for maintenance; what is written meanwhile is tracked, and
        ``online`` rebuilds only that."""
        p = self._pool
        p.txn.check_ok()
        if p.devices[index] is None:
            raise InvalidArgument(f"member {index} of pool {self._name} is already "
                                  f"{self.state_of(index)}")
        if n := self._away_after(index):
            raise InvalidArgument(f"member {index} cannot go offline: {n} segment(s) would "
                                  f"have fewer than k fragments left (their data would be "
                                  f"unreadable)")
        self.fault(index, "taken offline", state="offline")
        await p.txn.checkpoint()

    async def online(self, index: int, dev: Device | None = None) -> None:
        """Take a member back (the device it had, or ``dev`` carrying its label): its
        metadata is refreshed and what it missed is marked for the rebuild."""
        p = self._pool
        p.txn.check_ok()
        mi = p.state.members[index]
        if mi.state == "removed":
            raise InvalidArgument(f"member {index} was removed from the pool")
        if p.devices[index] is not None:
            raise InvalidArgument(f"member {index} of pool {self._name} is online")
        dev = dev or self.parked.get(index)
        if dev is None:
            raise InvalidArgument(f"member {index} of pool {self._name} has no device; "
                                  f"give its path, or use replace-device")
        label = await run(read_label, dev, p.deadlines)
        if label.pool_uuid != p.state.uuid or label.device_uuid != mi.uuid:
            raise InvalidArgument(f"{dev.path} is not member {index} of pool "
                                  f"{self._name} (its label says member {label.index} "
                                  f"of {label.pool_name!r})")
        if dev is not self.parked.get(index):
            self.refuse_device(dev, but=index)
        async with p.txn.lock:
            await self._attach(index, dev, mi)
            p.txn.do(op_json(op="member_state", index=index, state="online"))
            if dev.path != mi.path:
                p.left_out.pop(mi.path, None)
                p.txn.do(op_json(op="member_path", index=index, path=dev.path))
            await p.txn.checkpoint_locked()
        parked = self.parked.pop(index, None)
        if parked is not None and parked is not dev:
            await close_devices([parked])
        log.info("pool %s: member %d (%s) online; %d segment(s) to resilver",
                 self._name, index, dev.path, len(mi.marks))

    async def _attach(self, index: int, dev: Device, mi: MemberInfo) -> None:
        """Give ``dev`` the committed metadata and member ``index``'s label, and use it."""
        p = self._pool
        await self._prepare(dev, mi, index)
        p.devices[index] = p.meta.devices[index] = dev
        self.health.came_back(index)

    async def replace(self, index: int, dev: Device) -> None:
        """Put ``dev`` in member ``index``'s place; every fragment the member held is then
        rebuilt onto it (``pool.rebuild``) while the pool stays online. The old device, if
        still there, is let go and its label wiped."""
        p = self._pool
        p.txn.check_ok()
        mi = p.state.members[index]
        if mi.state == "removed":
            raise InvalidArgument(f"member {index} was removed from the pool")
        # By path among the present members; a parked device (faulted, offline) may have
        # lost its path to a new device, so it is compared by identity only.
        if any(d is not None and same_path(d.path, dev.path) for d in p.devices):
            raise InvalidArgument(f"{dev.path} is already a member of pool {self._name}")
        self.refuse_device(dev)
        if p.layout.n_extents(dev.size) < mi.n_extents:
            raise InvalidArgument(f"{dev.path} is too small to replace member {index}: it "
                                  f"needs at least {mi.size} bytes, it has {dev.size}")
        await run(refuse_labelled, [dev], p.deadlines)
        old = p.devices[index] or self.parked.get(index)
        p.left_out.pop(mi.path, None)
        async with p.txn.lock:
            new = MemberInfo(new_uuid(), index, dev.size, mi.n_extents)
            await self._attach(index, dev, new)
            p.txn.do(op_json(op="member_replace", index=index, uuid=new.uuid, size=dev.size,
                             n_extents=mi.n_extents, path=dev.path))
            await p.txn.checkpoint_locked()
        self.parked.pop(index, None)
        if old is not None:
            await wipe_quietly(old, p.deadlines)
        log.info("pool %s: %s replaces member %d; %d segment(s) to rebuild",
                 self._name, dev.path, index, len(p.state.members[index].marks))

    # ---- removing -------------------------------------------------------------------------
    def _profiles_in_use(self) -> set[Profile]:
        st = self._pool.state
        out = {Profile(s.k, s.m) for s in st.segments.values()}
        out.add(Profile.parse(st.profile))
        for obj in st.objects.values():
            if isinstance(obj.get("profile"), str):
                try:
                    out.add(Profile.parse(obj["profile"]))
                except InvalidArgument:
                    continue
        return out

    async def remove(self, index: int,
                     progress: Callable[[int, int], Awaitable[None]] | None = None) -> None:
        """Move every live record off member ``index``, then detach it and wipe its label.
        Refused, changing nothing, when the others lack the room or would be too few for a
        profile in use (invariant 4)."""
        p = self._pool
        p.txn.check_ok()
        mi = p.state.members[index]
        if mi.state == "removed":
            raise InvalidArgument(f"member {index} was already removed")
        others = [m.index for m in p.state.members
                  if m.index != index and m.state != "removed"]
        widest = max(self._profiles_in_use(), key=lambda p: p.width)
        if len(others) < widest.width:
            raise InvalidArgument(f"cannot remove member {index} of pool {self._name}: "
                                  f"{len(others)} device(s) would remain and profile "
                                  f"{widest} needs {widest.width}")
        mine = [sg for sg in p.state.segments.values()
                if any(i == index for i, _e in sg.extents)]
        counts = [len(p.devstore.free_extents[i]) for i in others if p.devices[i] is not None]
        for prof in {Profile(sg.k, sg.m) for sg in mine}:
            sectors = sum(sg.live for sg in mine if (sg.k, sg.m) == (prof.k, prof.m))
            need = -(-sectors // (p.layout.extent_size // SECTOR)) + 1
            have = stripes(tuple(counts), prof.width)
            if have < need:
                raise NoSpace(f"cannot remove member {index} of pool {self._name}: its "
                              f"{prof} records need {need} free stripe(s) of {prof.width} "
                              f"extents on the other devices, they have room for {have}")
            counts = sorted(counts, reverse=True)
            for _ in range(need):   # take the stripes from the counts, widest first
                counts = sorted([c - 1 if j < prof.width else c
                                 for j, c in enumerate(counts)], reverse=True)
        p.devstore.avoid.add(index)
        try:
            self._close_open_on(index)
            p.reap()
            total = len(mine)
            for n, sg in enumerate(mine):
                if not await p.cleaner.evacuate(sg.id):
                    raise MediumError(f"cannot remove member {index}: records of segment "
                                      f"{sg.id} are unreadable (see the log)")
                await p.txn.commit()
                if progress is not None:
                    await progress(n + 1, total)
            while any(any(i == index for i, _e in sg.extents)
                      for sg in p.state.segments.values()):
                p.reap()
                await p.txn.commit()
                await trio.sleep(0.01)
            dev = p.devices[index] or self.parked.get(index)
            async with p.txn.lock:
                p.devices[index] = p.meta.devices[index] = None
                self.parked.pop(index, None)
                p.txn.do(op_json(op="member_state", index=index, state="removed"))
                await p.txn.checkpoint_locked()
            p.devstore.free_extents[index] = set()
            if dev is not None:
                await wipe_quietly(dev, p.deadlines)
        finally:
            p.devstore.avoid.discard(index)
        log.info("pool %s: member %d removed", self._name, index)

    # ---- watching the devices -------------------------------------------------------------
    def absent_devices(self) -> dict[int, str]:
        """Members whose device vanished, shrank or was replaced under the pool, with why
        (blocking: a stat per device; ``FileDevice.vanished``)."""
        p = self._pool
        out = {}
        for i, dev in enumerate(list(p.devices)):
            vanished = getattr(dev, "vanished", None)
            if dev is None or not callable(vanished):
                continue
            why = vanished(p.state.members[i].size)
            if isinstance(why, str):
                out[i] = why
        return out

    async def watch_presence(self) -> None:
        """Fault every member whose device disappeared, shrank or was replaced."""
        p = self._pool
        gone = await trio.to_thread.run_sync(self.absent_devices)
        if p.txn.closed:
            return
        for i, why in gone.items():
            if p.devices[i] is not None:
                self.fault(i, why)
        if p.txn.pending:
            await p.txn.commit()

    async def watch(self, interval: float) -> None:
        """Until the pool closes: check the members' devices (``watch_presence``) every
        ``interval`` seconds, and at once after a read error (a short read of a truncated
        file is one), so a member that vanishes or shrinks is faulted within seconds."""
        p = self._pool
        while not p.txn.closed:
            with trio.move_on_after(interval):
                await self.health.recheck.wait()
            self.health.recheck = trio.Event()
            if not p.txn.closed and p.txn.failed is None:
                await self.watch_presence()

    def refuse_device(self, dev: Device, but: int | None = None) -> None:
        """Refuse ``dev`` if it is the same device (pool.identity) as a current member,
        present or parked (other than member ``but``), whatever path names it."""
        mine = identity.identity_of(dev)
        if mine is None:
            return
        for i, other in [*enumerate(self._pool.devices), *self.parked.items()]:
            if other is not None and i != but and identity.identity_of(other) == mine:
                raise InvalidArgument(
                    f"{dev.path} is the same device as member {i} of pool "
                    f"{self._name} ({other.path}: {identity.describe(mine)})")

    # ---- status ---------------------------------------------------------------------------
    def state_of(self, index: int) -> str:
        """online | rebuilding | faulted | offline | missing | removed."""
        p = self._pool
        mi = p.state.members[index]
        if mi.state == "removed":
            return "removed"
        if p.devices[index] is None:
            return mi.state if mi.state in AWAY else "missing"
        return "rebuilding" if mi.marks else "online"

    def path_of(self, index: int) -> str:
        """The path of member ``index``'s device; for one that is away, the last path it
        was seen at (``MemberInfo.path``, kept in the metadata)."""
        dev = self._pool.devices[index] or self.parked.get(index)
        return dev.path if dev is not None else self._pool.state.members[index].path

    def index_of(self, name: str) -> int:
        """A member by number, device path (its last known path if it is away) or UUID.
        A path of a present member wins over the same last known path of one away."""
        p = self._pool
        live = [mi for mi in p.state.members if mi.state != "removed"]
        for mi in live:
            if name in (str(mi.index), mi.uuid):
                return mi.index
        for present in (True, False):
            for mi in live:
                path = self.path_of(mi.index)
                if ((p.devices[mi.index] is not None) == present and path
                        and same_path(path, name)):
                    return mi.index
        raise NotFound(f"pool {self._name} has no member {name!r} (give its number, "
                       f"path or UUID; see pool status)")

    def rows(self) -> tuple[MemberStatus, ...]:
        """A status row per member (``Pool.statistics``)."""
        p = self._pool
        return tuple(
            MemberStatus(mi.index, mi.uuid, self.path_of(mi.index), self.state_of(mi.index),
                         mi.size, mi.n_extents, len(p.devstore.free_extents[mi.index]),
                         *self.health.counts(mi.index), len(mi.marks),
                         self.health.reason(mi.index) if p.devices[mi.index] is None
                         and mi.state != "removed" else "")
            for mi in p.state.members)

    def warnings(self) -> list[str]:
        """Plain-language warnings about redundancy right now (``Pool.health``)."""
        out = []
        members = self._pool.state.members
        missing = [mi.index for mi in members if self.state_of(mi.index) == "missing"]
        if missing:
            out.append(f"members missing: {', '.join(map(str, missing))}")
        for mi in members:
            st = self.state_of(mi.index)
            if st in ("faulted", "offline"):
                out.append(f"member {mi.index} is {st}")
            elif st == "rebuilding":
                out.append(f"member {mi.index} has {len(mi.marks)} segment(s) to rebuild")
        at_risk = self.unavailable_segments()
        if at_risk:
            out.append(f"{at_risk} segment(s) have more fragments missing than their "
                       f"parity covers: reads of their records will fail")
        return out
