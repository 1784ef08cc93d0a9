"""Creating a pool on new devices and importing one from its members: reading labels,
choosing the pool, loading superblocks, the map pages and the journal, and leaving
damaged devices out. ``Pool.create``/``Pool.open`` delegate here.

Invariants this module owns (DESIGN invariants cited in brackets):

1. An import reads before it writes: labels, superblocks, state, pages and journal are
   all read and the import decided before anything is written; the owner record (when
   claimed) is the first write [10].
2. An import takes the newest intact superblock of the pool among the devices given, and
   replays only whole journal entries after it (``MetaStore.read_journal``) [2].
3. An import is refused, changing nothing, for a device of another pool (or when the
   devices hold several), a device labelled as a member the metadata does not list, two
   devices claiming one member, or a stale copy of a member (its newest superblock older
   than when the pool last had it) [1, 9].
4. With ``left_out``, a damaged device (unreadable, truncated, no intact label, a second
   path to a device given, or no intact superblock) is closed and left out, as if not
   given, and recorded with why; a device of another pool or a stale member is still
   refused [5].
5. ``create`` refuses labelled devices unless forced, and clears each device's
   superblocks and journal before its label is written, so nothing of a previous life is
   replayed [2, 9].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from pool import identity, labels, records
from pool import owner as owners
from pool.deadlines import Deadlines
from pool.device import Device
from pool.devio import close_devices, run, write_within
from pool.errors import DeviceError, ImportFailed, InvalidArgument
from pool.layout import DEFAULT_EXTENT, SB_OFFSET, Label, Layout, new_uuid
from pool.maps import Node
from pool.metastore import PAGE_INDEX, Loc, MetaStore, Superblock
from pool.profile import Profile
from pool.state import MemberInfo, PoolState, iter_ops, op_json
from pool.tuning import PoolTuning

if TYPE_CHECKING:
    from pool.pool import Pool

log = logging.getLogger(__name__)


async def create(cls: type[Pool], name: str, devices: Sequence[Device], *,
                 profile: str = "plain", extent_size: int = DEFAULT_EXTENT,
                 meta_size: int | None = None, force: bool = False,
                 claim: owners.Claim | None = None,
                 tuning: PoolTuning | None = None) -> Pool:
    """``Pool.create``: make a new pool on ``devices`` (invariant 5)."""
    labels.check_name(name)
    prof = Profile.parse(profile)
    if not devices:
        raise InvalidArgument("a pool needs at least one device")
    if prof.width > len(devices):
        raise InvalidArgument(f"profile {prof} needs {prof.width} devices, only "
                              f"{len(devices)} given")
    paths = [d.path for d in devices]
    if len(set(paths)) != len(paths):
        raise InvalidArgument("the same device is listed twice")
    labels.refuse_same_device(devices)
    layout = Layout.choose(min(d.size for d in devices), extent_size, meta_size)
    dl = (tuning or PoolTuning()).deadlines()
    if not force:
        await run(labels.refuse_labelled, list(devices), dl)
    pool_uuid = new_uuid()
    members = [MemberInfo(new_uuid(), i, d.size, layout.n_extents(d.size), path=d.path)
               for i, d in enumerate(devices)]
    state = PoolState(pool_uuid, name, extent_size, str(prof), members)
    devs: list[Device | None] = list(devices)
    pool = cls(state, layout, devs, MetaStore(layout, devs, pool_uuid, dl), None, tuning)
    pool.devstore.free_extents = [set(range(mi.n_extents)) for mi in members]

    def write_label(mi: MemberInfo, dev: Device) -> None:
        # Clear old superblocks/journal so nothing of a previous life is replayed.
        dev.pwrite(SB_OFFSET, bytes(layout.pages_offset - SB_OFFSET))
        labels.write_label(dev, pool.label(mi))
    await write_within([(dev, partial(write_label, mi, dev))
                        for mi, dev in zip(members, devices, strict=True)],
                       "writing a new member's label", dl)
    if claim is not None:
        await pool.owner_keeper.take(claim)
    await pool.txn.checkpoint()
    log.info("created pool %s (%s) on %d devices, profile %s, extent size %d",
             name, pool_uuid, len(devices), prof, extent_size)
    return pool


async def open_pool(cls: type[Pool], devices: Sequence[Device], *, name: str | None = None,
                    left_out: dict[str, str] | None = None,
                    claim: owners.Claim | None = None,
                    tuning: PoolTuning | None = None) -> Pool:
    """``Pool.open``: import a pool from its member devices (invariants 1-4)."""
    devices = list(devices)
    dl = (tuning or PoolTuning()).deadlines()
    if left_out is None:
        labels.refuse_same_device(devices, ImportFailed)
    else:
        devices = await leave_out_duplicates(devices, left_out)
    found = await run(read_labels, devices, dl, left_out)
    pool_uuid, members = choose_pool(found, name)
    loaded = await run(load_pool, pool_uuid, members, dl, left_out)
    if left_out is not None:
        used = {id(d) for d in loaded.devices if d is not None}
        await close_devices([d for d in devices if id(d) not in used])
    pool = cls(loaded.state, loaded.layout, loaded.devices, loaded.meta, loaded.superblock,
               tuning)
    pool.txn.page_locs = loaded.page_locs
    if left_out:
        pool.left_out = dict(left_out)
    if claim is not None:
        await pool.owner_keeper.take(claim, [d for d in loaded.devices if d is not None])
    await finish_import(pool, loaded.replayed)
    log.info("imported pool %s (%s): generation %d, txg %d, %d journal entries replayed",
             pool.name, pool.uuid, pool.state.generation, pool.state.txg,
             len(loaded.replayed))
    return pool


def choose_pool(found: list[tuple[Device, Label]], name: str | None
                ) -> tuple[str, list[tuple[Device, Label]]]:
    """The one pool the labelled devices belong to (named ``name`` if given), with its
    devices; refused when they belong to several (invariant 3)."""
    by_pool: dict[str, list[tuple[Device, Label]]] = {}
    for dev, lab in found:
        by_pool.setdefault(lab.pool_uuid, []).append((dev, lab))
    if name is not None:
        chosen = {u: v for u, v in by_pool.items() if v[0][1].pool_name == name}
        if not chosen:
            raise ImportFailed(f"no device given belongs to a pool named {name!r}")
        others = [d.path for u, v in by_pool.items() if u not in chosen for d, _ in v]
        if others:
            raise ImportFailed(f"{', '.join(others)}: belongs to another pool, not "
                               f"{name!r}")
        by_pool = chosen
    if len(by_pool) != 1:
        desc = "; ".join(f"{v[0][1].pool_name} ({u}): " + ", ".join(d.path for d, _ in v)
                         for u, v in by_pool.items())
        raise ImportFailed(f"the devices belong to {len(by_pool)} pools: {desc}")
    return next(iter(by_pool.items()))


async def finish_import(pool: Pool, replayed: list[tuple[int, bytes]]) -> None:
    """Apply the replayed journal entries, rebuild the free lists, bring the members'
    states in line with the devices found (away members stay parked), checkpoint."""
    for txg, payload in replayed:
        for op in iter_ops(payload):
            pool.state.apply(op)
        pool.state.txg = txg
    used = {e for seg in pool.state.segments.values() for e in seg.extents}
    pool.devstore.free_extents = [{e for e in range(mi.n_extents) if (mi.index, e) not in used}
                  for mi in pool.state.members]
    for mi in pool.state.members:
        dev = pool.devices[mi.index]
        if mi.state in ("faulted", "offline", "removed"):
            # Kept out until an admin brings it back (``online``) or replaces it.
            if dev is not None:
                pool.devices[mi.index] = pool.meta.devices[mi.index] = None
                if mi.state == "removed":
                    dev.close()
                else:
                    pool.members.parked[mi.index] = dev
            continue
        want = "online" if dev is not None else "missing"
        if mi.state != want:
            pool.txn.do(op_json(op="member_state", index=mi.index, state=want,
                                last_gen=pool.txn.sb_gen))
        if dev is not None and dev.path != mi.path:
            pool.txn.do(op_json(op="member_path", index=mi.index, path=dev.path))
        elif dev is None and mi.path in pool.left_out:
            pool.member_health.left_out(mi.index, f"left out at import: {pool.left_out[mi.path]}")
    pool.reap()
    await pool.txn.checkpoint()


async def leave_out_duplicates(devices: list[Device],
                               left_out: dict[str, str]) -> list[Device]:
    """``devices`` without the second and later paths to one device (closed, recorded)."""
    while (dup := identity.first_duplicate(devices)) is not None:
        first, again = dup
        left_out[again.path] = f"the same device as {first.path}"
        log.warning("%s is the same device as %s: importing it once", again.path,
                    first.path)
        devices = [d for d in devices if d is not again]
        await close_devices([again])
    return devices


def leave_out(left_out: dict[str, str], dev: Device, why: str) -> None:
    left_out[dev.path] = why
    log.error("%s left out of the import: %s", dev.path, why)


def read_labels(devices: list[Device], dl: Deadlines,
                 left_out: dict[str, str] | None = None) -> list[tuple[Device, Label]]:
    """Each device's label. A device that does not answer (its label reads timed out) is
    left out, as if it were not given: the pool imports without it if it can; so is one
    without a usable label when ``left_out`` is given (see ``open_pool``)."""
    out: list[tuple[Device, Label]] = []
    for dev in devices:
        try:
            out.append((dev, labels.read_label(dev, dl)))
        except ImportFailed as e:
            if left_out is not None:
                leave_out(left_out, dev, e.message)
                continue
            if not records.hung(dev):
                raise
            log.warning("%s does not answer (a read of its label has been waiting more "
                        "than %g s): importing without it", dev.path, dl.read)
    if devices and not out:
        if left_out:
            raise ImportFailed("no device given is a usable pool member: " + "; ".join(
                f"{p}: {why}" for p, why in left_out.items()))
        raise ImportFailed("none of the devices given answers: "
                           + ", ".join(d.path for d in devices))
    return out


@dataclass
class Loaded:
    state: PoolState
    layout: Layout
    devices: list[Device | None]
    meta: MetaStore
    superblock: Superblock
    page_locs: dict[int, Loc]
    replayed: list[tuple[int, bytes]]


def load_pool(pool_uuid: str, found: list[tuple[Device, Label]], dl: Deadlines,
               left_out: dict[str, str] | None = None) -> Loaded:
    """Read superblocks, state, pages and journal of a pool; check the members."""
    layout = found[0][1].layout
    name = found[0][1].pool_name
    for dev, lab in found:
        if lab.layout != layout:
            raise ImportFailed(f"{dev.path}: its label's layout differs from the other "
                               f"members of pool {name}")
    newest: dict[str, int] = {}
    blank: set[str] = set()     # devices without one intact superblock of this pool
    best: Superblock | None = None
    for dev, lab in list(found):
        try:
            sbs = MetaStore.read_superblocks(dev, pool_uuid, dl)
        except DeviceError as e:
            # Every member holds the metadata: one whose superblocks cannot be read is
            # left out (the pool runs degraded), as if it had not been given.
            log.warning("%s: its superblocks cannot be read (%s): importing without it",
                        dev.path, e.message)
            found.remove((dev, lab))
            if left_out is not None:
                left_out[dev.path] = f"its superblocks cannot be read ({e.message})"
            continue
        if not sbs:
            blank.add(dev.path)
        # A member added at generation g carries g in its label and a synced copy of the
        # metadata of g - 1 even if the crash took its first superblock.
        newest[dev.path] = max([sb.generation for sb in sbs] + [lab.generation - 1])
        for sb in sbs:
            if best is None or sb.generation > best.generation:
                best = sb
    if best is None:
        raise ImportFailed(f"pool {name}: no intact superblock on any device given")
    state = PoolState.from_json(MetaStore(layout, [d for d, _ in found],
                                          pool_uuid, dl).read_blob(best.state))
    devices: list[Device | None] = [None] * len(state.members)
    by_uuid = {mi.uuid: mi for mi in state.members}
    for dev, lab in found:
        mi = by_uuid.get(lab.device_uuid)
        if mi is None or mi.index != lab.index:
            raise ImportFailed(f"{dev.path}: labelled as member {lab.index} of pool {name}, "
                               f"but the pool's metadata does not list it (a device added "
                               f"when a crash interrupted, or from another copy of the pool)")
        # A member that was merely away comes back as it left (newest superblock no older
        # than when it went missing): nothing it holds changed meanwhile, since records are
        # never overwritten in place and segments made while it was away do not use it.
        # Anything older is an old copy of the device, which may lack acknowledged data.
        seen = mi.last_gen if mi.state == "missing" else best.generation
        if mi.state in ("faulted", "offline", "removed"):
            pass   # not used until brought back online, which refreshes its metadata
        elif newest[dev.path] < seen - 1 and dev.path in blank and left_out is not None:
            # Every superblock slot garbled while the pool went on: its metadata is
            # damaged (the other members hold the same, invariant 5), not an old copy.
            leave_out(left_out, dev, "no intact superblock: its metadata is damaged")
            continue
        elif newest[dev.path] < seen - 1:
            raise ImportFailed(
                f"{dev.path} is a stale member {mi.index} of pool {name}: its newest "
                f"superblock is generation {newest[dev.path]}, but the pool had it at "
                f"generation {seen}: this is an older copy of the device and may lack data "
                f"written since. Import without it (the pool runs degraded)")
        other = devices[mi.index]
        if other is not None:
            raise ImportFailed(f"{dev.path} and {other.path} both claim to be member "
                               f"{mi.index} of pool {name}")
        devices[mi.index] = dev
    meta = MetaStore(layout, [d if state.members[i].state not in ("faulted", "offline",
                                                                    "removed") else None
                              for i, d in enumerate(devices)], pool_uuid, dl)
    meta.mark_used(best.state)
    meta.mark_used(best.index)
    index = meta.read_blob(best.index)
    page_locs: dict[int, Loc] = {}
    for off in range(0, len(index), PAGE_INDEX.size):
        nid, unit, units, length, h = PAGE_INDEX.unpack_from(index, off)
        loc = Loc(unit, units, length, h)
        meta.mark_used(loc)
        page_locs[nid] = loc
    for nid, blob in zip(page_locs, meta.read_blobs(list(page_locs.values())), strict=True):
        try:
            state.forest.nodes[nid] = Node.deserialize(blob)
        except ValueError as e:
            raise ImportFailed(f"pool {name}: map node {nid} is unreadable: {e}") from e
    state.forest.recount()
    short = [s for s in state.segments.values()
             if sum(1 for i, _ in s.extents if meta.devices[i] is not None
                    and s.id not in state.members[i].marks) < s.k]
    if short:
        # Metadata is intact (it is on every member), so the pool imports; reads of records
        # in these segments fail with EIO naming the missing members.
        missing = sorted({i for s in short for i, _ in s.extents if meta.devices[i] is None})
        log.error("pool %s: %d segment(s) have fewer than k fragments present; records in "
                  "them are unreadable until members %s return", name, len(short),
                  ", ".join(map(str, missing)))
    replayed = meta.read_journal(best.txg)
    return Loaded(state, layout, devices, meta, best, page_locs, replayed)
