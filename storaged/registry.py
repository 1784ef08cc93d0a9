"""The daemon's pools: which are imported, from which devices, remembered across restarts.

The state directory holds ``pools.json`` (like ZFS's zpool.cache): for each pool the daemon
has imported, its name, UUID and device paths. At start every remembered pool is imported;
one that cannot be is reported and the others still come up. A device that is missing or
damaged (cannot be opened or read, too short, not a file or block device, no intact label
or superblock, the same device as another path) is left out of its pool's import with the
reason logged and shown in ``pool status``; the pool imports degraded if the others can
serve it (``Pool.open``'s ``left_out``). Its path stays remembered.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from pool import Device, FileDevice, Pool, close_devices
from pool.errors import AlreadyExists, DeviceError, InvalidArgument, NotFound, StorageError
from pool.layout import LABEL_SIZE, Label
from volumes import VolumeManager

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

    @property
    def name(self) -> str:
        return self.pool.name


@dataclass
class Registry:
    state_dir: str
    pools: dict[str, PoolEntry] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)   # pool name -> why not imported
    _lock: trio.Lock = field(default_factory=trio.Lock)

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
        entries = [{"name": e.name, "uuid": e.pool.uuid, "devices": e.devices,
                    "spares": e.spares} for e in self.pools.values()]
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
    async def load(self) -> None:
        """Import every remembered pool; record (and log) the ones that fail."""
        await trio.Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        for entry in await trio.to_thread.run_sync(self._read_cache):
            name = entry["name"]
            try:
                imported = await self._import(entry.get("devices", []), name)
                imported.spares = [p for p in entry.get("spares", []) if isinstance(p, str)]
            except StorageError as e:
                self.failed[name] = e.message
                log.error("pool %s could not be imported: %s", name, e.message)

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
            created: list[str] = []
            devices = await _open_devices(paths, file_size, created=created)
            try:
                pool = await Pool.create(name, devices, profile=profile,
                                         extent_size=extent_size, force=force)
            except BaseException:
                await close_devices(devices)
                await trio.to_thread.run_sync(_unlink, created)   # leave no file behind
                raise
            return await self._adopt(pool, paths)

    async def _adopt(self, pool: Pool, paths: list[str]) -> PoolEntry:
        entry = PoolEntry(pool, VolumeManager(pool), [_abspath(p) for p in paths])
        self.pools[pool.name] = entry
        self.failed.pop(pool.name, None)
        await self.save()
        return entry

    async def import_pool(self, name: str | None, paths: list[str]) -> PoolEntry:
        async with self._lock:
            if not paths:
                paths = await trio.to_thread.run_sync(_scan, self.state_dir, name)
                if not paths:
                    raise NotFound(f"no pool member found under {self.state_dir}"
                                   + (f" for pool {name!r}" if name else "")
                                   + "; name the devices with --device")
            return await self._import(paths, name)

    async def _import(self, paths: list[str], name: str | None) -> PoolEntry:
        if name is not None and name in self.pools:
            raise AlreadyExists(f"pool {name!r} is already imported")
        left_out: dict[str, str] = {}
        devices = await _open_devices(paths, None, left_out=left_out)
        if not devices:
            raise NotFound(f"none of the devices of pool {name or '?'} is present: "
                           + "; ".join(f"{p}: {why}" for p, why in left_out.items()))
        try:
            pool = await Pool.open(devices, name=name, left_out=left_out)
        except BaseException:
            await close_devices(devices)
            raise
        if pool.name in self.pools:
            await pool.close()
            raise AlreadyExists(f"pool {pool.name!r} is already imported")
        # Every path given is remembered, the ones left out too: a member that comes back
        # (a disk reattached, a file restored) is found at the next start.
        return await self._adopt(pool, list(dict.fromkeys(_abspath(p) for p in paths)))

    async def export(self, name: str) -> None:
        async with self._lock:
            entry = self.get(name)
            del self.pools[name]
            await entry.pool.close()
            await self.save()

    async def destroy(self, name: str) -> None:
        async with self._lock:
            entry = self.get(name)
            if entry.volumes.names():
                raise InvalidArgument(f"pool {name!r} still has volumes "
                                      f"({', '.join(entry.volumes.names())}); delete them "
                                      f"first")
            del self.pools[name]
            await entry.pool.destroy()
            await self.save()

    async def add_device(self, name: str, path: str, file_size: int | None) -> None:
        async with self._lock:
            entry = self.get(name)
            created: list[str] = []
            (dev,) = await _open_devices([path], file_size, created=created)
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
            (dev,) = await _open_devices([new], file_size, created=created)
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
            (dev,) = await _open_devices([path], file_size)
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
            finally:
                await close_devices([dev])
            entry.spares.append(_abspath(path))
            await self.save()

    async def online(self, name: str, member: str, path: str | None) -> int:
        async with self._lock:
            entry = self.get(name)
            index = entry.pool.member_index(member)
            dev = None
            if path is not None:
                (dev,) = await _open_devices([path], None)
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
            for p in paths:
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
                    dev = FileDevice(p, create_size=file_size if new else None)
                except DeviceError as e:
                    if left_out is None:
                        raise
                    left_out[_abspath(p)] = e.message
                    log.error("%s left out of the import: %s", p, e.message)
                    continue
                if new and created is not None:
                    created.append(os.path.realpath(p))
                out.append(dev)
        except BaseException:
            for d in out:
                d.close()
            if created:
                _unlink(created)
                created.clear()
            raise
        return out
    return await trio.to_thread.run_sync(op)


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
