"""The volumes of one pool: create, open, list, delete.

There is exactly one ``Volume`` object per volume, shared by every frontend and every
connection, so that writes from one connection are seen by reads and covered by flushes on
all others (NBD multi-conn).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from pool.errors import AlreadyExists, InvalidArgument, NotFound
from pool.pool import Pool, Profile
from volumes.volume import DEFAULT_BLOCK, Volume, VolumeStatistics, check_block_size

log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def check_volume_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"invalid volume name {name!r}: use 1-128 letters, digits, "
                              f"'_', '.', ':', '-', starting with a letter or digit")


class VolumeManager:
    """Volumes stored in ``pool`` (as pool objects of type 'volume' with a block map)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._volumes: dict[str, Volume] = {}
        for obj_id, meta in pool.objects().items():
            if meta.get("type") == "volume":
                self._volumes[meta["name"]] = Volume(pool, obj_id, meta)
        pool.add_cache(self._writeback_all)

    async def _writeback_all(self) -> None:
        for name in self.names():
            await self._volumes[name]._writeback()

    def names(self) -> list[str]:
        return sorted(self._volumes)

    def get(self, name: str) -> Volume:
        vol = self._volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume {name!r} in pool {self.pool.name}")
        return vol

    def list(self) -> list[VolumeStatistics]:
        return [self._volumes[n].statistics() for n in self.names()]

    async def create(self, name: str, size: int, *, block_size: int = DEFAULT_BLOCK,
                     profile: str | None = None, compression: bool = True) -> Volume:
        """Create a thin volume (durable when this returns)."""
        check_volume_name(name)
        check_block_size(block_size)
        if size <= 0 or size % 512:
            raise InvalidArgument(f"volume size must be a positive multiple of 512 bytes, "
                                  f"got {size}")
        prof = Profile.parse(profile) if profile is not None else self.pool.default_profile
        members = sum(1 for m in self.pool.statistics().members if m.state == "online")
        if prof.width > len(self.pool.state.members) or prof.width > members:
            raise InvalidArgument(f"profile {prof} needs {prof.width} devices; pool "
                                  f"{self.pool.name} has {members} online")
        if name in self._volumes:
            raise AlreadyExists(f"volume {name!r} already exists in pool {self.pool.name}")
        map_id = self.pool.create_map()
        meta: dict[str, Any] = {"type": "volume", "name": name, "size": size,
                                "block_size": block_size, "profile": str(prof),
                                "compression": compression, "map": map_id,
                                "created": int(time.time())}
        obj_id = self.pool.put_object(meta)
        vol = self._volumes[name] = Volume(self.pool, obj_id, meta)
        await self.pool.commit()
        log.info("pool %s: created volume %s (%d bytes, block %d, %s%s)", self.pool.name, name,
                 size, block_size, prof, ", lz4" if compression else "")
        return vol

    async def delete(self, name: str) -> None:
        """Delete a volume and release its space (durable when this returns)."""
        vol = self.get(name)
        vol._drop()
        del self._volumes[name]
        self.pool.delete_map(vol._map)
        self.pool.delete_object(vol._obj_id)
        await self.pool.commit()
        log.info("pool %s: deleted volume %s", self.pool.name, name)

    async def resize(self, name: str, size: int) -> Volume:
        """Grow or shrink a volume; shrinking discards the tail (durable on return)."""
        vol = self.get(name)
        if size <= 0 or size % 512:
            raise InvalidArgument(f"volume size must be a positive multiple of 512 bytes, "
                                  f"got {size}")
        old = vol.size
        if size < old:
            # The tail beyond the new end is trimmed, including the part of the new last
            # block past the end, so that growing again later reads zeros there.
            await vol.trim(size, old - size)
        vol._meta = {**vol._meta, "size": size}
        self.pool.put_object(vol._meta, vol._obj_id)
        vol.size = size
        await vol.flush()
        log.info("pool %s: resized volume %s from %d to %d bytes", self.pool.name, name, old,
                 size)
        return vol

    async def flush_all(self) -> None:
        for name in self.names():
            await self._volumes[name].flush()
        await self.pool.commit()
