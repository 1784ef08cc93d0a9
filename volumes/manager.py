"""The volumes of one pool: create, open, list, delete; snapshots, clones, rollback, diff.

There is exactly one ``Volume`` object per volume, shared by every frontend and every
connection, so that writes from one connection are seen by reads and covered by flushes on
all others (NBD multi-conn).

Snapshots and clones share the volume's block map copy-on-write (``pool.maps``):
- a snapshot is a read-only map cloned from the volume's at the instant it is requested:
  every write acknowledged before is in it, none acknowledged after (invariant 7);
- a clone is a writable volume whose map is cloned from a snapshot; the snapshot cannot be
  deleted while clones of it exist (the refusal names them);
- rollback replaces the volume's map by a clone of the snapshot's (buffered writes that were
  never flushed are discarded, as the rollback replaces the content anyway);
- a volume with snapshots is deleted only with ``recursive`` (its snapshots go with it),
  and never while a clone depends on one of them;
- resizing never touches snapshots: each keeps its own size and data; a shrink discards
  the tail and is done only when the caller allows it (``allow_shrink``, as ``rbd resize
  --allow-shrink``);
- a volume (or snapshot) with clients (``volumes.openers``) is not deleted, renamed or
  rolled back: the refusal (Busy) names the clients; with ``force`` they are disconnected
  first (``pool export`` likewise, for every volume and snapshot of the pool: ``claim_pool``).
  The check comes after the operation's other checks, so a refusal for another
  reason never disconnects anyone, and the other checks run again after the disconnect
  (it waits, and the namespace may change meanwhile).
"""

from __future__ import annotations

import builtins
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from pool.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from pool.maps import MAX_BLOCKS
from pool.pool import Pool
from pool.profile import Profile
from volumes.openers import Opener, Openers, evict, in_use, refuse_in_use
from volumes.qos import QosSettings, WeightedDispatcher
from volumes.qosbook import QosBook
from volumes.records import SnapshotRecord, VolumeRecord
from volumes.volume import (
    DEFAULT_BLOCK,
    Volume,
    VolumeStatistics,
    WriteBuffer,
    check_block_size,
)

log = logging.getLogger(__name__)
DEVICE_QUEUE = 4        # the pool's reads and writes in flight per device (its limiters)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def _check_size(size: int, block_size: int) -> None:
    if size <= 0 or size % 512:
        raise InvalidArgument(f"volume size must be a positive multiple of 512 bytes, "
                              f"got {size}")
    if -(-size // block_size) > MAX_BLOCKS:
        raise InvalidArgument(f"a volume of block size {block_size} can be at most "
                              f"{MAX_BLOCKS * block_size} bytes")


def check_volume_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"invalid volume name {name!r}: use 1-128 letters, digits, "
                              f"'_', '.', ':', '-', starting with a letter or digit")


class VolumeManager:
    """Volumes stored in ``pool`` (as pool objects of type 'volume' with a block map).
    Their unflushed writes count against ``write_buffer`` (shared with the managers of the
    process's other pools when they are handed the same one; default volume.WRITE_BUFFER)."""

    def __init__(self, pool: Pool, write_buffer: WriteBuffer | None = None) -> None:
        self.pool = pool
        self.write_buffer = write_buffer     # None: each Volume takes volume.WRITE_BUFFER
        self._volumes: dict[str, Volume] = {}
        self._snapshots: dict[str, dict[str, tuple[int, SnapshotRecord]]] = {}
        # Hidden volumes a receive is filling (volumes/portable.py), by target name.
        self._partials: dict[str, Volume] = {}
        # The clients of each snapshot, by snapshot object id, shared by all its read-only
        # views (openers invariant 2).
        self._snap_openers: dict[int, Openers] = {}
        # Weights under contention: one dispatcher for all the pool's volumes (qos.py),
        # as deep as the pool's devices serve requests at once (DEVICE_QUEUE each).
        self.dispatcher = WeightedDispatcher(DEVICE_QUEUE * max(1, len(pool.state.members)))
        objects = pool.objects()
        for obj_id, meta in objects.items():
            if meta.get("type") == "volume":
                record = VolumeRecord.decode(meta)
                if record.receiving is not None:
                    self._partials[record.receiving.target] = self._new_volume(obj_id, record)
                else:
                    self._volumes[record.name] = self._new_volume(obj_id, record)
        for obj_id, meta in objects.items():
            if meta.get("type") == "snapshot":
                snap = SnapshotRecord.decode(meta)
                owner = objects[snap.volume]["name"]
                self._snapshots.setdefault(owner, {})[snap.name] = (obj_id, snap)
        # QoS defaults and groups (volumes/qosbook.py); each volume's settings are in its
        # record, applied with its group's Throttle.
        self.qos = QosBook(pool)
        for vol in self._volumes.values():
            vol.set_qos(vol.qos, self.qos.throttle(vol.qos.group))
        pool.add_cache(self._writeback_all)

    def _new_volume(self, obj_id: int, record: VolumeRecord) -> Volume:
        vol = Volume(self.pool, obj_id, record, self.write_buffer)
        vol.dispatcher = self.dispatcher
        return vol

    async def _writeback_all(self) -> None:
        for name in self.names():
            await self._volumes[name].write_back()
        for part in list(self._partials.values()):
            await part.write_back()

    async def write_back_older_than(self, age: float) -> int:
        """Write back and commit the buffers of volumes whose oldest buffered data is more
        than ``age`` seconds old, so that writes never flushed reach the devices within a
        bounded time (like the kernel's dirty_expire or ZFS's transaction group timeout).
        Returns how many volumes were written back."""
        old = [v for v in self._volumes.values() if v.buffered_age() > age]
        written: builtins.list[tuple[Volume, int]] = []
        try:
            for vol in old:
                written.append((vol, await vol.write_back(commit_next=True)))
            if old:
                await self.pool.commit()
        finally:
            # Only now are their dirty_bytes durable (rule W9), or, on an error, left to
            # the next flush.
            for vol, blocks in written:
                vol.durable(blocks)
        return len(old)

    def names(self) -> list[str]:
        return sorted(self._volumes)

    def get(self, name: str) -> Volume:
        vol = self._volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume {name!r} in pool {self.pool.name}")
        return vol

    def list(self) -> builtins.list[VolumeStatistics]:
        return [self._volumes[n].statistics() for n in self.names()]

    async def create(self, name: str, size: int, *, block_size: int = DEFAULT_BLOCK,
                     profile: str | None = None, compression: bool = True,
                     qos: QosSettings | None = None) -> Volume:
        """Create a thin volume (durable when this returns). Its QoS: the pool's defaults
        when the pool has some, else ``qos`` (the daemon's config), else none."""
        check_volume_name(name)
        check_block_size(block_size)
        _check_size(size, block_size)
        prof = Profile.parse(profile) if profile is not None else self.pool.default_profile
        self.pool.check_profile(prof)
        if name in self._volumes:
            raise AlreadyExists(f"volume {name!r} already exists in pool {self.pool.name}")
        map_id = self.pool.create_map()
        record = VolumeRecord(name, size, block_size, str(prof), compression, map_id,
                              int(time.time()), qos=self._new_qos(qos))
        obj_id = self.pool.put_object(record.encode())
        vol = self._volumes[name] = self._new_volume(obj_id, record)
        vol.set_qos(vol.qos, self.qos.throttle(vol.qos.group))
        await self.pool.commit()
        log.info("pool %s: created volume %s (%d bytes, block %d, %s%s)", self.pool.name, name,
                 size, block_size, prof, ", lz4" if compression else "")
        return vol

    # ---- clients (volumes.openers) ---------------------------------------------------------
    def clients(self, volume: str, snap: str | None = None) -> builtins.list[Opener]:
        """The clients connected to ``volume`` (or to ``volume@snap``)."""
        if snap is None:
            return list(self.get(volume).openers)
        obj_id, _meta = self.snapshot_record(volume, snap)
        return list(self._snap_openers.get(obj_id, ()))

    def all_clients(self) -> builtins.list[Opener]:
        """Every client of every volume and snapshot of the pool."""
        return in_use(self._all_openers())

    def _all_openers(self) -> builtins.list[Openers]:
        return ([v.openers for v in self._volumes.values()]
                + list(self._snap_openers.values()))

    async def claim_pool(self, action: str, *, force: bool) -> None:
        """Before the pool is exported (closed): refuse (Busy) naming every client of its
        volumes and snapshots, or with ``force`` disconnect them all (openers invariants
        3-5). Returns with no await after its last check, so a caller that then drops the
        pool synchronously (no new client can find it) leaves only stragglers."""
        await self._claim(f"pool {self.pool.name}", self._all_openers(), action, force, ())

    async def _claim(self, what: str, groups: builtins.list[Openers], action: str,
                     force: bool, ignore: Iterable[Opener]) -> bool:
        """Refuse (Busy) if ``groups`` have clients other than ``ignore``, or with ``force``
        disconnect them; True if it disconnected anyone (the caller then checks again
        what it checked before, openers invariant 3)."""
        if not force:
            refuse_in_use(what, in_use(groups, ignore=ignore), action)
            return False
        return await evict(what, groups, ignore)

    async def rename(self, name: str, new_name: str, *, force: bool = False,
                     ignore: Iterable[Opener] = ()) -> Volume:
        """Rename a volume (its snapshots follow it); durable on return. Refused while it
        has clients other than ``ignore`` (Busy naming them) unless ``force``, which
        disconnects them first."""
        check_volume_name(new_name)
        vol = self._check_rename(name, new_name)
        if new_name == name:
            return vol
        if await self._claim(f"volume {self.pool.name}/{name}", [vol.openers], "rename it",
                             force, ignore):
            vol = self._check_rename(name, new_name)
        vol.rename_to(new_name)
        self._volumes[new_name] = self._volumes.pop(name)
        if name in self._snapshots:
            self._snapshots[new_name] = self._snapshots.pop(name)
        await self.pool.commit()
        log.info("pool %s: renamed volume %s to %s", self.pool.name, name, new_name)
        return vol

    def _check_rename(self, name: str, new_name: str) -> Volume:
        vol = self.get(name)
        if new_name == name:
            return vol
        if new_name in self._volumes:
            raise AlreadyExists(f"volume {new_name!r} already exists in pool {self.pool.name}")
        if new_name in self._partials:
            raise Busy(f"a receive into {new_name!r} is kept for --resume; abort it first")
        return vol

    async def delete(self, name: str, *, recursive: bool = False, force: bool = False,
                     ignore: Iterable[Opener] = ()) -> None:
        """Delete a volume and release its space (durable when this returns). Refused while
        it (or, with ``recursive``, one of its snapshots) has clients other than
        ``ignore``, unless ``force``, which disconnects them first."""
        vol, snaps = self._check_delete(name, recursive)
        groups = [vol.openers] + [self._snap_openers[obj_id] for obj_id, _m in snaps.values()
                                  if obj_id in self._snap_openers]
        if await self._claim(f"volume {self.pool.name}/{name}", groups, "delete it", force,
                             ignore):
            vol, snaps = self._check_delete(name, recursive)

        def drop() -> None:
            # Under the volume's writeback lock, so that no writeback is still pointing
            # the map at new records when it goes (rule W7); checked again in there.
            nonlocal snaps
            self._still(name, vol)
            _vol, snaps = self._check_delete(name, recursive)
            vol.mark_deleted()
            del self._volumes[name]
            for snap in sorted(snaps):
                obj_id, srec = snaps[snap]
                self.pool.delete_map(srec.map)
                self.pool.delete_object(obj_id)
                self._snap_openers.pop(obj_id, None)
            self._snapshots.pop(name, None)
            self.pool.delete_map(vol.map_id)
            self.pool.delete_object(vol.obj_id)
        await vol.writeback_then(drop, write_back=False)
        await self.pool.commit()
        log.info("pool %s: deleted volume %s%s", self.pool.name, name,
                 f" and {len(snaps)} snapshot(s)" if snaps else "")

    def _check_delete(self, name: str, recursive: bool
                      ) -> tuple[Volume, dict[str, tuple[int, SnapshotRecord]]]:
        vol = self.get(name)
        snaps = self._snapshots.get(name, {})
        if snaps and not recursive:
            raise Busy(f"volume {name!r} has {len(snaps)} snapshot(s) "
                       f"({', '.join(sorted(snaps))}); delete them first or delete "
                       f"recursively")
        for snap in sorted(snaps):
            self._refuse_if_cloned(name, snap)
        return vol, snaps

    # ---- snapshots ------------------------------------------------------------------------
    def snapshot_names(self, volume: str) -> builtins.list[str]:
        self.get(volume)
        return sorted(self._snapshots.get(volume, {}))

    def _still(self, name: str, vol: Volume) -> None:
        """Refuse if ``vol`` is no longer the volume called ``name`` (deleted or renamed
        while a request waited for its writeback lock)."""
        if self._volumes.get(name) is not vol:
            raise NotFound(f"no volume {name!r} in pool {self.pool.name}")

    def snapshot_record(self, volume: str, snap: str) -> tuple[int, SnapshotRecord]:
        """(object id, stored record) of ``volume@snap``; NotFound if either is missing."""
        self.get(volume)
        found = self._snapshots.get(volume, {}).get(snap)
        if found is None:
            raise NotFound(f"volume {volume!r} has no snapshot {snap!r}")
        return found

    def snapshots_of(self, volume: str) -> dict[str, tuple[int, SnapshotRecord]]:
        """``volume``'s snapshots: name -> (object id, stored record); {} if none (or no
        such volume)."""
        return dict(self._snapshots.get(volume, {}))

    def has_volume(self, name: str) -> bool:
        return name in self._volumes

    def add_snapshot(self, volume: str, record: SnapshotRecord) -> int:
        """Store a snapshot record of ``volume`` (part of the next commit, as a received
        snapshot is); its object id."""
        obj_id = self.pool.put_object(record.encode())
        self._snapshots.setdefault(volume, {})[record.name] = (obj_id, record)
        return obj_id

    async def snapshot_uuid(self, volume: str, snap: str) -> str:
        """The snapshot's stream identity (given at creation; older snapshots get one
        now, durably)."""
        obj_id, record = self.snapshot_record(volume, snap)
        if record.uuid is None:
            record = replace(record, uuid=uuid.uuid4().hex)
            self.pool.put_object(record.encode(), obj_id)
            self._snapshots[volume][snap] = (obj_id, record)
            await self.pool.commit()
        assert record.uuid is not None
        return record.uuid

    # ---- receives' hidden volumes (volumes/portable.py), by target name ------------------
    def partial(self, target: str) -> Volume | None:
        return self._partials.get(target)

    def add_partial(self, target: str, obj_id: int, record: VolumeRecord) -> Volume:
        part = self._partials[target] = self._new_volume(obj_id, record)
        return part

    def promote_partial(self, target: str, *, volume: bool) -> Volume:
        """The receive into ``target`` is complete: it is no longer a partial; with
        ``volume``, it becomes the volume ``target`` (the caller stored its record)."""
        part = self._partials.pop(target)
        if volume:
            self._volumes[target] = part
        return part

    async def discard_partial(self, part: Volume) -> None:
        """Delete a receive's hidden volume and what it holds (durable on return)."""
        kept = part.receiving
        assert kept is not None
        self._partials.pop(kept.target, None)
        part.mark_deleted()
        self.pool.delete_map(part.map_id)
        self.pool.delete_object(part.obj_id)
        await self.pool.commit()

    async def claim_volume(self, volume: str, action: str, *, force: bool) -> bool:
        """Refuse (Busy) while ``volume`` has clients, or with ``force`` disconnect them
        (True if it did: the caller checks again, openers invariant 3)."""
        return await self._claim(f"volume {self.pool.name}/{volume}",
                                 [self.get(volume).openers], action, force, ())

    def snapshot_info(self, volume: str, snap: str) -> dict[str, Any]:
        obj_id, record = self.snapshot_record(volume, snap)
        clones = self._clones_of(obj_id)
        return {"volume": volume, "name": snap, "size": record.size,
                "block_size": record.block_size, "created": record.created,
                "referenced_bytes": self.pool.stored_bytes(record.map),
                "unique_bytes": self.pool.exclusive_bytes(record.map),
                "clones": clones}

    def _clones_of(self, snap_obj: int) -> builtins.list[str]:
        return sorted(n for n, v in self._volumes.items() if v.origin == snap_obj)

    def _refuse_if_cloned(self, volume: str, snap: str) -> None:
        obj_id, _meta = self.snapshot_record(volume, snap)
        clones = self._clones_of(obj_id)
        if clones:
            raise Busy(f"snapshot {volume}@{snap} has clones ({', '.join(clones)}); delete "
                       f"those first")

    async def snapshot(self, volume: str, snap: str) -> dict[str, Any]:
        """Snapshot ``volume`` now (invariant 7); O(1) in metadata; durable on return."""
        check_volume_name(snap)
        vol = self.get(volume)
        if snap in self._snapshots.get(volume, {}):
            raise AlreadyExists(f"volume {volume!r} already has a snapshot {snap!r}")

        def take() -> None:
            # Checked again: the wait for the writeback lock may have let another request
            # in (W5).
            self._still(volume, vol)
            if snap in self._snapshots.get(volume, {}):
                raise AlreadyExists(f"volume {volume!r} already has a snapshot {snap!r}")
            map_id = self.pool.clone_map(vol.map_id)
            record = SnapshotRecord(vol.obj_id, snap, map_id, vol.size, vol.block_size,
                                    str(vol.profile), vol.compression, int(time.time()),
                                    uuid.uuid4().hex)
            obj_id = self.pool.put_object(record.encode())
            self._snapshots.setdefault(volume, {})[snap] = (obj_id, record)
        await vol.writeback_then(take)
        await self.pool.commit()
        log.info("pool %s: snapshot %s@%s", self.pool.name, volume, snap)
        return self.snapshot_info(volume, snap)

    def snapshot_volume(self, volume: str, snap: str) -> Volume:
        """A read-only Volume reading the snapshot (for exports)."""
        obj_id, record = self.snapshot_record(volume, snap)
        view = self._new_volume(obj_id, VolumeRecord(
            f"{volume}@{snap}", record.size, record.block_size, record.profile,
            record.compression, record.map, record.created))
        view.read_only = True
        view.openers = self._snap_openers.setdefault(obj_id, Openers())
        return view

    async def delete_snapshot(self, volume: str, snap: str, *, force: bool = False) -> None:
        """Delete a snapshot. Refused while it has clones, and while it is exported and
        open (unless ``force``, which disconnects its clients first)."""
        self._refuse_if_cloned(volume, snap)
        obj_id, _meta = self.snapshot_record(volume, snap)
        groups = [self._snap_openers[obj_id]] if obj_id in self._snap_openers else []
        if await self._claim(f"snapshot {self.pool.name}/{volume}@{snap}", groups, "delete it",
                             force, ()):
            self._refuse_if_cloned(volume, snap)
        obj_id, record = self.snapshot_record(volume, snap)
        del self._snapshots[volume][snap]
        self._snap_openers.pop(obj_id, None)
        self.pool.delete_map(record.map)
        self.pool.delete_object(obj_id)
        await self.pool.commit()
        log.info("pool %s: deleted snapshot %s@%s", self.pool.name, volume, snap)

    async def rollback(self, volume: str, snap: str, *, force: bool = False) -> Volume:
        """Make ``volume`` read as ``snap`` again (durable on return). Refused while the
        volume has clients (their view of the disk would change under them) unless
        ``force``, which disconnects them first."""
        self.snapshot_record(volume, snap)
        if await self._claim(f"volume {self.pool.name}/{volume}", [self.get(volume).openers],
                             f"roll it back to @{snap}", force, ()):
            self.snapshot_record(volume, snap)
        vol = self.get(volume)

        def swap() -> None:
            self._still(volume, vol)
            _obj, record = self.snapshot_record(volume, snap)  # (not deleted while we waited)
            old = vol.replace_map(self.pool.clone_map(record.map), record.size)
            self.pool.delete_map(old)
        await vol.writeback_then(swap, write_back=False)    # the buffer is discarded
        await self.pool.commit()
        log.info("pool %s: rolled %s back to @%s", self.pool.name, volume, snap)
        return vol

    def _new_qos(self, fallback: QosSettings | None) -> QosSettings:
        if self.qos.defaults != QosSettings() or fallback is None:
            return self.qos.defaults
        return fallback

    async def clone(self, volume: str, snap: str, new_name: str, *,
                    qos: QosSettings | None = None) -> Volume:
        """A writable volume ``new_name`` starting as ``volume@snap`` (shares its records)."""
        check_volume_name(new_name)
        if new_name in self._volumes:
            raise AlreadyExists(f"volume {new_name!r} already exists in pool {self.pool.name}")
        obj_id, snap_rec = self.snapshot_record(volume, snap)
        map_id = self.pool.clone_map(snap_rec.map)
        record = VolumeRecord(new_name, snap_rec.size, snap_rec.block_size, snap_rec.profile,
                              snap_rec.compression, map_id, int(time.time()), origin=obj_id,
                              qos=self._new_qos(qos))
        new_id = self.pool.put_object(record.encode())
        vol = self._volumes[new_name] = self._new_volume(new_id, record)
        vol.set_qos(vol.qos, self.qos.throttle(vol.qos.group))
        await self.pool.commit()
        log.info("pool %s: cloned %s@%s as %s", self.pool.name, volume, snap, new_name)
        return vol

    async def diff(self, volume: str, snap_a: str,
                   snap_b: str | None = None) -> builtins.list[tuple[int, int]]:
        """Byte ranges (offset, length) that differ between ``volume@snap_a`` and
        ``volume@snap_b`` (or the live volume): changed-block tracking for backups."""
        _oa, ma = self.snapshot_record(volume, snap_a)
        vol = self.get(volume)
        if snap_b is not None:
            _ob, mb = self.snapshot_record(volume, snap_b)
            other, size = mb.map, max(ma.size, mb.size)
            blocks = self.pool.diff_maps(ma.map, other)
        else:
            found: builtins.list[int] = []

            def compare() -> None:
                self._still(volume, vol)
                found.extend(self.pool.diff_maps(self.snapshot_record(volume, snap_a)[1].map,
                                                 vol.map_id))
            await vol.writeback_then(compare)
            blocks, size = found, max(ma.size, vol.size)
        bs = ma.block_size
        ranges: builtins.list[tuple[int, int]] = []
        for b in blocks:
            start = b * bs
            if start >= size:
                break
            length = min(bs, size - start)
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((start, length))
        return ranges

    async def resize(self, name: str, size: int, *, allow_shrink: bool = False) -> Volume:
        """Grow or shrink a volume (durable on return). Shrinking discards the tail, so it
        is refused (nothing changes) unless ``allow_shrink``."""
        vol = self.get(name)
        _check_size(size, vol.block_size)
        old = vol.size
        if size < old and not allow_shrink:
            raise InvalidArgument(f"volume {self.pool.name}/{name}: {size} bytes is smaller "
                                  f"than its {old}; a shrink discards the data past the new "
                                  f"end: pass --allow-shrink to do it")
        if size < old:
            # The tail beyond the new end is trimmed, including the part of the new last
            # block past the end, so that growing again later reads zeros there.
            await vol.trim(size, old - size)
        vol.set_size(size)
        await vol.flush()
        log.info("pool %s: resized volume %s from %d to %d bytes", self.pool.name, name, old,
                 size)
        return vol

    # ---- QoS (volumes/qos.py, volumes/qosbook.py) -----------------------------------------
    async def set_qos(self, name: str, changes: dict[str, Any], *,
                      clear: bool = False) -> QosSettings:
        """Change a volume's QoS settings (``clear``: start from the defaults); durable
        and applied to its waiting requests when this returns. Bad values or an unknown
        group raise InvalidArgument and change nothing."""
        vol = self.get(name)
        new = (QosSettings() if clear else vol.qos).updated(changes)
        self.qos.check_group(new.group)
        if new != vol.qos:
            vol.store_qos(new, self.qos.throttle(new.group))
            await self.pool.commit()
            log.info("pool %s: volume %s QoS %s", self.pool.name, name, new.encode() or
                     "cleared")
        return new

    def apply_received_qos(self, vol: Volume, encoded: Any) -> None:
        """A received volume's QoS (a stream's optional property, part of the next
        commit): taken when valid, without a group (groups are the sending pool's);
        otherwise the pool's defaults stay, with a warning."""
        if encoded is None:
            return
        try:
            if not isinstance(encoded, dict):
                raise InvalidArgument("not an object")
            new = QosSettings.decode({k: v for k, v in encoded.items() if k != "group"})
        except InvalidArgument as e:
            log.warning("pool %s: volume %s: the stream's QoS settings are not used: %s",
                        self.pool.name, vol.name, e)
            return
        vol.store_qos(new)

    async def set_qos_defaults(self, changes: dict[str, Any], *,
                               clear: bool = False) -> QosSettings:
        """Change the settings new volumes of this pool get (existing ones keep theirs)."""
        new = (QosSettings() if clear else self.qos.defaults).updated(changes)
        self.qos.check_group(new.group)
        self.qos.put_defaults(new)
        await self.pool.commit()
        return new

    async def set_qos_group(self, group: str, changes: dict[str, Any], *,
                            clear: bool = False) -> QosSettings:
        """Create or change a QoS group's shared limits; applied at once to its members."""
        QosSettings().updated({"group": group})            # a valid name
        new = self.qos.group_settings(self.qos.groups.get(group, QosSettings()), changes,
                                      clear)
        self.qos.put_group(group, new)
        for vol in self._volumes.values():
            if vol.qos.group == group:
                vol.set_qos(vol.qos, self.qos.throttle(group))
        await self.pool.commit()
        return new

    async def delete_qos_group(self, group: str) -> None:
        """Delete a QoS group no volume (nor the defaults) names (qosbook invariant 1)."""
        members = [n for n in self.names() if self._volumes[n].qos.group == group]
        if self.qos.defaults.group == group:
            members.append("the pool's defaults")
        if members:
            raise Busy(f"QoS group {group!r} is in use by {', '.join(members)}")
        self.qos.delete_group(group)
        await self.pool.commit()

    def qos_list(self) -> dict[str, Any]:
        """The pool's QoS: defaults, groups (with members) and the volumes' settings."""
        volumes = {n: self._volumes[n].qos for n in self.names()}
        return {
            "defaults": self.qos.defaults.encode(),
            "groups": {g: {"limits": s.encode(),
                           "members": [n for n, q in volumes.items() if q.group == g]}
                       for g, s in sorted(self.qos.groups.items())},
            "volumes": {n: q.encode() for n, q in volumes.items()},
        }

    async def flush_all(self) -> None:
        for name in self.names():
            await self._volumes[name].flush()
        await self.pool.commit()
