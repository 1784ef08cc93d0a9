"""The daemon's pools: which are imported, from which devices, remembered across restarts.

The state directory holds ``pools.json`` (like ZFS's zpool.cache): for each pool the daemon
has imported, its name, UUID and device paths. At start every remembered pool is imported;
one that cannot be is reported and the others still come up. A device that is missing or
damaged (cannot be opened or read, too short, not a file or block device, no intact label
or superblock, the same device as another path) is left out of its pool's import with the
reason logged and shown in ``pool status``; the pool imports degraded if the others can
serve it (``Pool.open``'s ``left_out``). Its path stays remembered. A device held by
someone else (DeviceBusy: another pool or daemon has it) is never left out: the import is
refused (DESIGN invariant 10, pool.owner).

A pool on Ceph RADOS (issue 24) is remembered by its RADOS target instead of device paths
(``"backend": "rados"``, ``"rados": RadosTarget.to_json()``), and so is each
``[[rados_pool]]`` of the configuration. At start it is imported like any other, never
with takeover: one that another daemon holds is reported as failed (its holder named)
and the others come up.

Invariants (RADOS pools):

R1. ``pools.json`` names a RADOS pool by its uuid, name and target; reading it back gives
    the same target (``RadosTarget.from_json``), so a restart imports the same pool.
R2. Nothing at start takes another daemon's pool: ``load`` opens every RADOS pool with
    ``takeover=False``; only ``pool import --takeover`` (an operator's word) does. (The
    engine does fence this daemon's own earlier run, same host and instance, after a
    kill -9: that run is dead.)
R3. A refused create or import (bad target, devices beside ``--rados``, ec/mirror
    profile, pool owned elsewhere, name already imported) leaves ``pools`` and
    ``pools.json`` as they were.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from pool import Device, FileDevice, Pool, close_devices, radosimporter
from pool import owner as owners
from pool.deadlines import Deadlines
from pool.errors import (
    AlreadyExists,
    Busy,
    DeviceBusy,
    DeviceError,
    InvalidArgument,
    NotFound,
    StorageError,
)
from pool.labels import label_copies
from pool.layout import LABEL_SIZE, Label
from pool.metastore import MetaStore
from pool.rados.target import RadosTarget
from pool.state import PoolState
from pool.tuning import PoolTuning
from volumes import VolumeManager
from volumes.qos import QosSettings
from volumes.volume import WriteBuffer

log = logging.getLogger(__name__)
CACHE = "pools.json"


FULL_WARNING = 0.8   # fraction of capacity in use at which a pool warns (log + metric)


@dataclass
class PoolEntry:
    pool: Pool
    volumes: VolumeManager
    devices: list[str]
    full_warning: float = FULL_WARNING
    spares: list[str] = field(default_factory=list)   # device paths kept for replacements
    taken_over: str | None = None    # import --force: whose pool this was (said once)

    @property
    def name(self) -> str:
        return self.pool.name


@dataclass
class Registry:
    state_dir: str
    pools: dict[str, PoolEntry] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)   # pool name -> why not imported
    heartbeat: float = owners.DEFAULT_INTERVAL    # owner records: seconds between beats
    activity: float = owners.DEFAULT_ACTIVITY     # ... silence after which an owner is gone
    # Config [qos]: the QoS new volumes get in pools without defaults of their own.
    qos_defaults: QosSettings = field(default_factory=QosSettings)
    overcommit_warning: float = 1.0   # volumes' sizes / usable size that volume create warns at
    # What each pool created or imported is tuned with, and the one write buffer all their
    # volume managers share (the daemon builds both from the configuration).
    tuning: PoolTuning = field(default_factory=PoolTuning)
    write_buffer: WriteBuffer = field(default_factory=WriteBuffer)
    # Config [[rados_pool]]: pool name -> where it lives (imported at start).
    declared: dict[str, RadosTarget] = field(default_factory=dict)
    _lock: trio.Lock = field(default_factory=trio.Lock)
    _me: owners.Owner | None = None

    # ---- the cache file -------------------------------------------------------------------
    def _cache_path(self) -> str:
        return os.path.join(self.state_dir, CACHE)

    def _read_cache(self) -> list[dict[str, Any]]:
        try:
            with open(self._cache_path()) as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise StorageError(f"{self._cache_path()} is unreadable: {e}") from e
        pools = data.get("pools", []) if isinstance(data, dict) else []
        return [p for p in pools if isinstance(p, dict) and "name" in p]

    def _write_cache(self) -> None:
        entries = [_cache_entry(e) for e in self.pools.values()]
        # Pools that failed to import stay remembered, so a missing disk is not forgotten.
        for p in self._read_cache():
            if p["name"] in self.failed and p["name"] not in self.pools:
                entries.append(p)
        tmp = self._cache_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pools": entries}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._cache_path())

    async def save(self) -> None:
        await trio.to_thread.run_sync(self._write_cache)

    # ---- start and stop -------------------------------------------------------------------
    async def load(self, rados_pools: Sequence[tuple[str, RadosTarget]] = ()) -> None:
        """Import every remembered pool, then the RADOS pools the configuration declares
        (``[[rados_pool]]``: name, target) that are not among them; record (and log) the
        ones that fail. None is taken over (R2)."""
        await trio.Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        self.declared = dict(rados_pools)
        remembered = await trio.to_thread.run_sync(self._read_cache)
        for entry in remembered:
            name = entry["name"]
            try:
                if entry.get("backend") == "rados":
                    target = _cached_target(entry)
                    await self._import_rados(name, target, takeover=False, save=False)
                else:
                    imported = await self._import(entry.get("devices", []), name)
                    imported.spares = [p for p in entry.get("spares", [])
                                       if isinstance(p, str)]
            except StorageError as e:
                self.failed[name] = e.message
                log.error("pool %s could not be imported: %s", name, e.message)
        known = {e["name"] for e in remembered}
        for name, target in rados_pools:
            if name in known:
                continue            # remembered (imported or failed above)
            try:
                await self._import_rados(name, target, takeover=False)
            except StorageError as e:
                self.failed[name] = e.message
                log.error("pool %s (config rados_pool, %s) could not be imported: %s",
                          name, target.describe(), e.message)

    async def close(self) -> None:
        for name in list(self.pools):
            entry = self.pools.pop(name)
            try:
                await entry.pool.close()
            except StorageError as e:
                log.error("pool %s: close failed: %s", name, e.message)

    # ---- operations -----------------------------------------------------------------------
    def get(self, name: str) -> PoolEntry:
        entry = self.pools.get(name)
        if entry is None:
            why = f" (import failed: {self.failed[name]})" if name in self.failed else ""
            raise NotFound(f"no pool named {name!r}{why}")
        return entry

    async def create(self, name: str, paths: list[str], *, profile: str, extent_size: int,
                     file_size: int | None, force: bool) -> PoolEntry:
        async with self._lock:
            if name in self.pools:
                raise AlreadyExists(f"pool {name!r} already exists")
            claim = await self._claim()
            created: list[str] = []
            devices = await self._open_devices(paths, file_size, created=created)
            try:
                if force:
                    await trio.to_thread.run_sync(_refuse_live_owner, devices, claim.owner,
                                                  self.tuning.deadlines())
                pool = await Pool.create(name, devices, profile=profile,
                                         extent_size=extent_size, force=force, claim=claim,
                                         tuning=self.tuning)
            except BaseException:
                await close_devices(devices)
                await trio.to_thread.run_sync(_unlink, created)   # leave no file behind
                raise
            return await self._adopt(pool, paths)

    async def _adopt(self, pool: Pool, paths: list[str], *, save: bool = True) -> PoolEntry:
        entry = PoolEntry(pool, VolumeManager(pool, self.write_buffer),
                          [_abspath(p) for p in paths])
        self.pools[pool.name] = entry
        self.failed.pop(pool.name, None)
        if save:
            await self.save()
        return entry

    # ---- pools on Ceph RADOS (issue 24) --------------------------------------------------
    async def create_rados(self, name: str, target: RadosTarget, *, profile: str,
                           extent_size: int) -> PoolEntry:
        """A new pool in the RADOS pool of ``target`` (``Pool.create_rados``: ec/mirror
        profiles and a name already used there are refused, nothing changed)."""
        async with self._lock:
            if name in self.pools:
                raise AlreadyExists(f"pool {name!r} already exists")
            claim = await self._claim()
            pool = await Pool.create_rados(name, target, profile=profile,
                                           extent_size=extent_size, claim=claim,
                                           tuning=self.tuning)
            return await self._adopt(pool, [])

    async def import_rados(self, name: str, target: RadosTarget, *,
                           takeover: bool = False) -> PoolEntry:
        """Import pool ``name`` from the RADOS pool of ``target``; refused (PoolOwned,
        naming the holder) while another daemon holds it, unless ``takeover``: then that
        daemon is fenced first (``Pool.open_rados``)."""
        async with self._lock:
            entry = await self._import_rados(name, target, takeover=takeover)
            if takeover:
                entry.taken_over = f"took pool {name} over on {target.describe()}"
                log.warning("pool %s: %s (pool import --takeover)", name,
                            entry.taken_over)
            return entry

    async def _import_rados(self, name: str, target: RadosTarget, *, takeover: bool,
                            save: bool = True) -> PoolEntry:
        if name in self.pools:
            raise AlreadyExists(f"pool {name!r} is already imported")
        claim = await self._claim()
        pool = await Pool.open_rados(target, name, takeover=takeover, claim=claim,
                                     tuning=self.tuning)
        if any(e.pool.uuid == pool.uuid for e in self.pools.values()):
            await pool.close()
            raise AlreadyExists(f"pool {name!r} ({pool.uuid}) is already imported")
        return await self._adopt(pool, [], save=save)

    async def import_pool(self, name: str | None, paths: list[str], *,
                          force: bool = False) -> PoolEntry:
        async with self._lock:
            if name is not None and name in self.pools:   # before any device is opened
                raise AlreadyExists(f"pool {name!r} is already imported")
            if not paths and name is not None:
                # A RADOS pool remembered or declared ([[rados_pool]]) whose import at
                # start failed: its target.
                for cached in await trio.to_thread.run_sync(self._read_cache):
                    if cached["name"] == name and cached.get("backend") == "rados":
                        return await self._import_rados(name, _cached_target(cached),
                                                        takeover=False)
                if name in self.declared:
                    return await self._import_rados(name, self.declared[name],
                                                    takeover=False)
            if not paths:
                paths = await trio.to_thread.run_sync(_scan, self.state_dir, name)
                if not paths:
                    raise NotFound(f"no pool member found under {self.state_dir}"
                                   + (f" for pool {name!r}" if name else "")
                                   + "; name the devices with --device")
            return await self._import(paths, name, force=force)

    async def _import(self, paths: list[str], name: str | None, *,
                      force: bool = False) -> PoolEntry:
        if name is not None and name in self.pools:
            raise AlreadyExists(f"pool {name!r} is already imported")
        claim = await self._claim()
        left_out: dict[str, str] = {}
        devices = await self._open_devices(paths, None, left_out=left_out)
        if not devices:
            raise NotFound(f"none of the devices of pool {name or '?'} is present: "
                           + "; ".join(f"{p}: {why}" for p, why in left_out.items()))
        try:
            taken_over = await self._check_owner(devices, name, claim.owner, force)
            pool = await Pool.open(devices, name=name, left_out=left_out, claim=claim,
                                   tuning=self.tuning)
        except BaseException:
            await close_devices(devices)
            raise
        if pool.name in self.pools:
            await pool.close()
            raise AlreadyExists(f"pool {pool.name!r} is already imported")
        # Every path given is remembered, the ones left out too: a member that comes back
        # (a disk reattached, a file restored) is found at the next start.
        entry = await self._adopt(pool, list(dict.fromkeys(_abspath(p) for p in paths)))
        entry.taken_over = taken_over
        return entry

    # ---- ownership (DESIGN invariant 10; pool.owner) ---------------------------------------
    async def _open_devices(self, paths: list[str], file_size: int | None, *,
                            left_out: dict[str, str] | None = None,
                            created: list[str] | None = None) -> list[Device]:
        """``_open_devices``; a device held by this daemon is named by the pool that holds
        it (a current member under another path: that pool's identity check's words)."""
        try:
            return await _open_devices(paths, file_size, left_out=left_out,
                                       created=created)
        except DeviceBusy:
            await trio.to_thread.run_sync(self._refuse_own_member, paths)
            raise

    def _refuse_own_member(self, paths: list[str]) -> None:
        """Blocking: InvalidArgument if a path is a member of a pool imported here."""
        for p in paths:
            try:
                probe = FileDevice(p, read_only=True)
            except DeviceError:
                continue
            try:
                for entry in list(self.pools.values()):
                    entry.pool.refuse_member_device(probe)
            except InvalidArgument as e:
                raise InvalidArgument(f"{e.message}, imported by this daemon") from e
            finally:
                probe.close()

    async def _claim(self) -> owners.Claim:
        if self._me is None:
            await trio.Path(self.state_dir).mkdir(parents=True, exist_ok=True)
            self._me = await trio.to_thread.run_sync(owners.me, self.state_dir)
        return owners.Claim(self._me, self.heartbeat, self.activity)

    async def _check_owner(self, devices: list[Device], name: str | None, me: owners.Owner,
                           force: bool) -> str | None:
        """Decide whether this import may take the pool, from the labels and owner records
        (read only): refuse a pool already imported here (by uuid), a pool whose owner
        record names another daemon (without ``force``), and one whose heartbeat moves
        within its activity interval (with ``force``, watched first). Returns what a
        forced takeover took over from (to be said), or None."""
        labels = await trio.to_thread.run_sync(_labels_of, devices,
                                                self.tuning.deadlines())
        uuids = {lab.pool_uuid for lab in labels.values()
                 if name is None or lab.pool_name == name}
        for entry in self.pools.values():
            if entry.pool.uuid in uuids:
                raise AlreadyExists(f"pool {entry.name!r} ({entry.pool.uuid}) is already "
                                    f"imported")
        if len(uuids) != 1:
            return None          # Pool.open says what is wrong with these devices
        (pool_uuid,) = uuids
        pool_name = next(lab.pool_name for lab in labels.values()
                         if lab.pool_uuid == pool_uuid)
        mine = [d for d in devices if d.path in labels and
                labels[d.path].pool_uuid == pool_uuid]
        records = await trio.to_thread.run_sync(
            lambda: [owners.read_record(d) for d in mine])
        found = owners.assess(records, pool_uuid, me)
        rec = found.record
        if rec is None:
            return None
        if not force:
            if time.time() - rec.time < rec.activity:
                raise Busy(f"pool {pool_name} is active on another daemon: "
                           f"{owners.describe(rec)}; export it there first")
            raise Busy(f"pool {pool_name} was not exported by its last owner, "
                       f"{owners.describe(rec)}; if that daemon is gone, `pool import "
                       f"--force` takes the pool over (after watching for "
                       f"{rec.activity:g} s that no heartbeat comes)")
        log.warning("pool %s: owned by %s; watching its heartbeat for %g s before taking "
                    "it over", pool_name, owners.describe(rec), rec.activity)
        await trio.to_thread.run_sync(owners.watch, mine, rec, pool_name)
        said = (f"took over pool {pool_name} from {owners.describe(rec)}: no heartbeat "
                f"for {rec.activity:g} s")
        log.warning("%s", said)
        return said

    async def importable(self, paths: list[str]) -> list[dict[str, Any]]:
        """What ``pool import`` with no name shows: the pools whose members are found
        (under the state directory, or among ``paths``), each with its state, members
        found and missing, and who owns it. Opens every device read-only, takes no lock,
        writes nothing."""
        if not paths:
            paths = await trio.to_thread.run_sync(_scan, self.state_dir, None)
        here = {e.pool.uuid: e.name for e in self.pools.values()}
        me = (await self._claim()).owner
        return await trio.to_thread.run_sync(_survey, paths, here, me,
                                                 self.tuning.deadlines())

    async def export(self, name: str, *, force: bool = False) -> None:
        """Export (close and release) a pool. Refused (Busy, naming them) while its volumes
        or snapshots have clients, as ``zpool export`` refuses a busy pool; ``force``
        disconnects them first. The pool leaves ``pools`` with no await after the last
        check, so no new client can find it before it is closed."""
        async with self._lock:
            entry = self.get(name)
            await entry.volumes.claim_pool("export it", force=force)
            del self.pools[name]
            await entry.pool.close(release=True)
            await self.save()

    async def destroy(self, name: str, target: RadosTarget | None = None, *,
                      progress: Callable[[int, int], Awaitable[None]] | None = None) -> None:
        """Destroy an empty pool: one with volumes (in use or not) is refused, naming them
        and their clients; there is nothing to force (delete the volumes first). A RADOS
        pool not imported here (its import failed, or ``target`` names it) is one whose
        destroy was interrupted: that destroy is finished (pool/rados/destroy.py), and a
        whole pool is refused (import it first)."""
        async with self._lock:
            if name not in self.pools:
                target = target or self.declared.get(name) or next(
                    (_cached_target(c) for c in await trio.to_thread.run_sync(
                        self._read_cache)
                     if c["name"] == name and c.get("backend") == "rados"), None)
            if name not in self.pools and target is not None:
                await radosimporter.destroy_named(target, name, claim=await self._claim(),
                                                  progress=progress)
                self.failed.pop(name, None)
                await self.save()
                return
            entry = self.get(name)
            lost = entry.pool.rados.lock.lost if entry.pool.rados is not None else None
            if lost is not None:
                raise Busy(f"pool {name!r} is no longer this daemon's ({lost}); export it")
            if entry.volumes.names():
                clients = entry.volumes.all_clients()
                busy = (f"; in use by {len(clients)} client(s) "
                        f"({'; '.join(o.describe() for o in clients)})" if clients else "")
                raise Busy(f"pool {name!r} still has volumes "
                           f"({', '.join(entry.volumes.names())}){busy}; delete them "
                           f"first")
            del self.pools[name]
            await entry.pool.destroy(progress)
            await self.save()

    async def add_device(self, name: str, path: str, file_size: int | None) -> None:
        async with self._lock:
            entry = self.get(name)
            created: list[str] = []
            (dev,) = await self._open_devices([path], file_size, created=created)
            try:
                await entry.pool.add_device(dev)
            except BaseException:
                await close_devices([dev])
                await trio.to_thread.run_sync(_unlink, created)
                raise
            entry.devices.append(_abspath(path))
            await self.save()


    # ---- failing disks (issue 9) ------------------------------------------------------------
    async def replace_device(self, name: str, old: str, new: str,
                             file_size: int | None) -> int:
        """Put device ``new`` in member ``old``'s place (the rebuild runs in the
        background); returns the member index."""
        async with self._lock:
            entry = self.get(name)
            index = entry.pool.member_index(old)
            old_path = entry.pool.statistics().members[index].path
            created: list[str] = []
            (dev,) = await self._open_devices([new], file_size, created=created)
            try:
                await entry.pool.replace_device(index, dev)
            except BaseException:
                await close_devices([dev])
                await trio.to_thread.run_sync(_unlink, created)
                raise
            self._set_path(entry, old_path, _abspath(new))
            if _abspath(new) in entry.spares:
                entry.spares.remove(_abspath(new))
            await self.save()
            return index

    @staticmethod
    def _set_path(entry: PoolEntry, old: str, path: str) -> None:
        """The remembered device paths, with ``old`` (a member's previous device, wiped
        or gone) swapped for ``path``."""
        if old and _abspath(old) in entry.devices:
            entry.devices.remove(_abspath(old))
        if path not in entry.devices:
            entry.devices.append(path)

    async def add_spare(self, name: str, path: str, file_size: int | None) -> None:
        async with self._lock:
            entry = self.get(name)
            created: list[str] = []
            (dev,) = await self._open_devices([path], file_size, created=created)
            refused = True
            try:
                if any(_abspath(path) == p for p in entry.spares):
                    raise InvalidArgument(f"{path} is already a spare of pool {name}")
                try:
                    entry.pool.member_index(path)
                except NotFound:
                    pass
                else:
                    raise InvalidArgument(f"{path} is a member of pool {name}")
                entry.pool.refuse_member_device(dev)
                label = await trio.to_thread.run_sync(_label_of, dev)
                if label is not None:
                    raise InvalidArgument(f"{path} carries the label of pool "
                                          f"{label.pool_name!r}; destroy that first")
                if entry.pool.layout.n_extents(dev.size) < max(
                        m.n_extents for m in entry.pool.state.members):
                    raise InvalidArgument(f"{path} is too small to replace every member of "
                                          f"pool {name}")
                refused = False
            finally:
                await close_devices([dev])
                if refused:
                    await trio.to_thread.run_sync(_unlink, created)   # leave no file behind
            entry.spares.append(_abspath(path))
            await self.save()

    async def online(self, name: str, member: str, path: str | None) -> int:
        async with self._lock:
            entry = self.get(name)
            index = entry.pool.member_index(member)
            dev = None
            if path is not None:
                (dev,) = await self._open_devices([path], None)
            try:
                await entry.pool.online(index, dev)
            except BaseException:
                await close_devices([dev])
                raise
            if path is not None:
                self._set_path(entry, "", _abspath(path))
                await self.save()
            return index

    async def remove_device(self, name: str, member: str,
                            progress: Callable[[int, int], Awaitable[None]]) -> int:
        entry = self.get(name)
        index = entry.pool.member_index(member)
        old_path = entry.pool.statistics().members[index].path
        await entry.pool.remove_device(index, progress)
        async with self._lock:
            if old_path and _abspath(old_path) in entry.devices:
                entry.devices.remove(_abspath(old_path))
            await self.save()
        return index

    async def auto_replace(self, entry: PoolEntry) -> int | None:
        """Replace the first faulted member by the first spare (the config switch
        ``auto_replace``); returns the member replaced."""
        faulted = [m.index for m in entry.pool.statistics().members if m.state == "faulted"]
        if not faulted or not entry.spares:
            return None
        spare = entry.spares[0]
        log.warning("pool %s: replacing faulted member %d by spare %s", entry.name,
                    faulted[0], spare)
        await self.replace_device(entry.name, str(faulted[0]), spare, None)
        return faulted[0]


def _cache_entry(entry: PoolEntry) -> dict[str, Any]:
    """A pool as pools.json remembers it (R1)."""
    target = entry.pool.rados_target
    if target is not None:
        return {"name": entry.name, "uuid": entry.pool.uuid, "backend": "rados",
                "rados": target.to_json()}
    return {"name": entry.name, "uuid": entry.pool.uuid, "devices": entry.devices,
            "spares": entry.spares}


def _cached_target(entry: dict[str, Any]) -> RadosTarget:
    """The RADOS target a pools.json entry names (R1); a damaged one is an error."""
    raw = entry.get("rados")
    try:
        if not isinstance(raw, dict):
            raise KeyError("rados")
        return RadosTarget.from_json(raw)
    except (KeyError, TypeError) as e:
        raise StorageError(f"pools.json: pool {entry['name']!r} has no valid RADOS "
                           f"target ({e})") from e


def _label_of(dev: Device) -> Label | None:
    try:
        return Label.decode(dev.pread(0, LABEL_SIZE))
    except DeviceError:
        return None


def _abspath(path: str) -> str:
    return os.path.normpath(os.path.join(os.getcwd(), path))


async def _open_devices(paths: list[str], file_size: int | None, *,
                        left_out: dict[str, str] | None = None,
                        created: list[str] | None = None) -> list[Device]:
    """Open devices. With ``left_out``, one that is missing or cannot be opened (a
    directory, EIO, EACCES...) is recorded there (path -> why) instead of failing the lot.
    ``created`` gets the files this call created (to remove on a refusal)."""
    def op() -> list[Device]:
        out: list[Device] = []
        try:
            aliases = _aliases(paths)
            opened: set[tuple[int, int] | None] = set()
            for p in _lock_order(paths):
                new = not os.path.exists(p)
                if new:
                    if left_out is not None:
                        left_out[_abspath(p)] = "no such device or file"
                        log.error("%s left out of the import: no such device or file", p)
                        continue
                    if file_size is None:
                        raise DeviceError(f"{p}: no such device or file (give a size to "
                                          f"create sparse files)")
                try:
                    # A second path to a device already given is opened plainly (the
                    # first holds the lock), for the pool's identity check to name it.
                    dev = (FileDevice(p) if p in aliases or _identity(p) in opened
                           else _open_exclusive(p, file_size if new else None))
                except DeviceBusy:
                    raise     # held by a live pool: never left out (DESIGN invariant 10)
                except DeviceError as e:
                    if left_out is None:
                        raise
                    left_out[_abspath(p)] = e.message
                    log.error("%s left out of the import: %s", p, e.message)
                    continue
                if new and created is not None:
                    created.append(os.path.realpath(p))
                opened.add(_identity(p))
                out.append(dev)
        except BaseException:
            for d in out:
                d.close()
            if created:
                _unlink(created)
                created.clear()
            raise
        return _given_order(out, paths)
    return await trio.to_thread.run_sync(op)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_rdev, -1) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)


def _aliases(paths: list[str]) -> set[str]:
    """The paths that lead to a device an earlier path (in the order given) leads to."""
    seen: set[tuple[int, int]] = set()
    out: set[str] = set()
    for p in paths:
        ident = _identity(p)
        if ident is None:
            continue
        if ident in seen:
            out.add(p)
        seen.add(ident)
    return out


def _lock_order(paths: list[str]) -> list[str]:
    """Members are locked in one order (by absolute path) whatever order they were given
    in: two daemons importing the same members race for the same first lock, so exactly
    one wins (in the order given, each could take one member and both would lose)."""
    return sorted(paths, key=_abspath)


def _given_order(devices: list[Device], paths: list[str]) -> list[Device]:
    rank = {_abspath(p): i for i, p in enumerate(paths)}
    return sorted(devices, key=lambda d: rank.get(_abspath(d.path), len(rank)))


def _unlink(paths: list[str]) -> None:
    """Remove files this daemon created for a refused request."""
    for p in paths:
        try:
            os.unlink(p)
        except OSError as e:
            log.warning("could not remove %s: %s", p, e.strerror)


def _scan(directory: str, name: str | None) -> list[str]:
    """Files directly under ``directory`` that carry a storaged label (of pool ``name``)."""
    found = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for fname in names:
        path = os.path.join(directory, fname)
        if not os.path.isfile(path) or os.path.getsize(path) < 2 * LABEL_SIZE:
            continue
        try:
            with open(path, "rb") as f:
                label = Label.decode(f.read(LABEL_SIZE))
        except (OSError, DeviceError):
            continue
        if name is None or label.pool_name == name:
            found.append(path)
    return found


# ---- ownership helpers (blocking) ------------------------------------------------------------
def _open_exclusive(path: str, create_size: int | None) -> FileDevice:
    """A member device, held exclusively (DESIGN invariant 10); a held one is refused
    naming who holds it."""
    try:
        return FileDevice(path, create_size=create_size, exclusive=True)
    except DeviceBusy as e:
        raise DeviceBusy(_holder(path)) from e


def _label_at(path: str) -> Label | None:
    try:
        dev = FileDevice(path, read_only=True)
    except DeviceError:
        return None
    try:
        # A diagnostic read of a device another holder has: the default deadlines.
        return next((lab for _, lab in label_copies(dev, Deadlines()) if isinstance(lab, Label)),
                    None)
    finally:
        dev.close()


def _holder(path: str) -> str:
    """Who holds a busy device, as far as can be told: its pool (label), the process
    holding the lock (/proc/locks) and the owner record."""
    text = f"{path} is in use"
    label = _label_at(path)
    if label is not None:
        text += f": member {label.index} of pool {label.pool_name!r} ({label.pool_uuid})"
    pid = owners.lock_holder(path)
    if pid == os.getpid():
        text += ", imported by this daemon"
    elif pid is not None:
        text += f", held by pid {pid}"
    rec = owners.read_path(path)
    if rec is not None and pid != os.getpid() and (label is None
                                                    or rec.pool_uuid == label.pool_uuid):
        text += f"; owner {owners.describe(rec)}"
    return text


def _labels_of(devices: list[Device], dl: Deadlines) -> dict[str, Label]:
    out: dict[str, Label] = {}
    for dev in devices:
        lab = next((lab for _, lab in label_copies(dev, dl) if isinstance(lab, Label)), None)
        if lab is not None:
            out[dev.path] = lab
    return out


def _refuse_live_owner(devices: list[Device], me: owners.Owner, dl: Deadlines) -> None:
    """``pool create --force`` overrides the label of an exported or destroyed pool, never
    a member of a live one: a device whose owner record names another daemon that beats
    (fresh, or moving while watched for its activity interval) is refused."""
    labels = _labels_of(devices, dl)
    for dev in devices:
        rec = owners.read_record(dev)
        lab = labels.get(dev.path)
        if rec is None or lab is None or rec.pool_uuid != lab.pool_uuid:
            continue
        if owners.assess([rec], lab.pool_uuid, me).record is None:
            continue         # ours, and we hold the lock: the old process is gone
        if time.time() - rec.time < rec.activity:
            raise Busy(f"{dev.path} is member {lab.index} of pool {lab.pool_name!r}, "
                       f"active on another daemon ({owners.describe(rec)}); --force does "
                       f"not override a live pool")
        owners.watch([dev], rec, lab.pool_name)


def _survey(paths: list[str], here: dict[str, str],
            me: owners.Owner, dl: Deadlines) -> list[dict[str, Any]]:
    """The pools on ``paths`` (read-only; see Registry.importable)."""
    groups: dict[str, list[tuple[FileDevice, Label]]] = {}
    opened: list[FileDevice] = []
    try:
        for path in paths:
            try:
                dev = FileDevice(path, read_only=True)
            except DeviceError:
                continue
            opened.append(dev)
            lab = next((lab for _, lab in label_copies(dev, dl) if isinstance(lab, Label)), None)
            if lab is not None:
                groups.setdefault(lab.pool_uuid, []).append((dev, lab))
        return [_survey_pool(uuid, found, here, me, dl) for uuid, found in groups.items()]
    finally:
        for dev in opened:
            dev.close()


def _survey_pool(pool_uuid: str, found: list[tuple[FileDevice, Label]],
                 here: dict[str, str], me: owners.Owner, dl: Deadlines) -> dict[str, Any]:
    name = found[0][1].pool_name
    out: dict[str, Any] = {"name": name, "uuid": pool_uuid,
                           "found": sorted(d.path for d, _ in found), "missing": []}
    try:
        best = max((sb for d, _ in found for sb in MetaStore.read_superblocks(d, pool_uuid, dl)),
                   key=lambda sb: sb.generation, default=None)
        if best is None:
            raise StorageError("no intact superblock")
        state = PoolState.from_json(MetaStore(found[0][1].layout, [d for d, _ in found],
                                              pool_uuid, dl).read_blob(best.state))
    except (StorageError, ValueError, KeyError) as e:
        msg = e.message if isinstance(e, StorageError) else str(e)
        out.update(state="unavailable", error=f"metadata unreadable: {msg}")
    else:
        have = {lab.device_uuid for _, lab in found}
        expected = [m for m in state.members if m.state != "removed"]
        out["members"] = len(expected)
        out["missing"] = [m.index for m in expected if m.uuid not in have]
        out["state"] = "degraded" if out["missing"] else "online"
    holders = {pid for d, _ in found if (pid := owners.lock_holder(d.path)) is not None}
    rec = max((r for r in (owners.read_record(d) for d, _ in found)
               if r is not None and r.pool_uuid == pool_uuid),
              key=lambda r: r.seq, default=None)
    if pool_uuid in here:
        out["owner"] = f"imported by this daemon as {here[pool_uuid]!r}"
    elif holders:
        out["owner"] = (f"in use by pid {', '.join(map(str, sorted(holders)))}"
                        + (f" ({owners.describe(rec)})" if rec else ""))
    elif rec is not None and owners.assess([rec], pool_uuid, me).mine:
        # Left by this daemon (stopped or killed): it imports without --force.
        out["owner"] = "last used by this daemon (not exported)"
    elif rec is not None and time.time() - rec.time < rec.activity:
        out["owner"] = f"active on another daemon: {owners.describe(rec)}"
    elif rec is not None:
        out["owner"] = f"not exported by {owners.describe(rec)} (import --force)"
    else:
        out["owner"] = "exported"
    out["importable"] = (out["owner"] in ("exported", "last used by this daemon (not "
                                          "exported)") and out["state"] != "unavailable")
    return out
