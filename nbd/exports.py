"""Which volumes are exported over NBD, and under what names.

Export names are ``POOL/VOLUME`` for a volume and ``POOL/VOLUME@SNAPSHOT`` for a snapshot,
which is exported read-only. The catalog is read from the volume managers on every lookup,
so a volume or snapshot created or deleted through the control API is visible to the next
handshake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nbd.proto import MAX_PAYLOAD, ExportInfo
from volumes import NotFound, Volume, VolumeManager


class VolumeCatalog:
    """Exports every volume of the given pools (pool name -> VolumeManager)."""

    def __init__(self, managers: Mapping[str, VolumeManager]) -> None:
        self._managers = managers

    def _split(self, name: str) -> tuple[str, str] | None:
        pool, sep, vol = name.partition("/")
        if not sep or not pool or not vol:
            return None
        return pool, vol

    def volume(self, name: str) -> Volume | None:
        parts = self._split(name)
        if parts is None:
            return None
        vm = self._managers.get(parts[0])
        if vm is None:
            return None
        vol, at, snap = parts[1].partition("@")
        try:
            return vm.snapshot_volume(vol, snap) if at else vm.get(vol)
        except NotFound:
            return None

    @staticmethod
    def info(name: str, vol: Volume) -> ExportInfo:
        """The export as the volume's capabilities describe it; NBD only narrows the
        maximum block to its own payload limit."""
        caps = vol.capabilities()
        limit = caps.maximum_block
        return ExportInfo(name=name, size=vol.size, read_only=caps.read_only,
                          description=f"storaged volume {name} ({vol.profile}"
                                      f"{', lz4' if vol.compression else ''})",
                          min_block=caps.minimum_block, preferred_block=caps.preferred_block,
                          max_block=MAX_PAYLOAD if limit is None else min(limit, MAX_PAYLOAD),
                          can_flush=caps.can_flush, can_fua=caps.can_fua,
                          can_trim=caps.can_trim, can_zero=caps.can_zero,
                          can_fast_zero=caps.can_fast_zero, can_cache=caps.can_cache,
                          can_multi_conn=caps.can_multi_conn, rotational=caps.rotational)

    def lookup(self, name: str) -> ExportInfo | None:
        vol = self.volume(name)
        return None if vol is None else self.info(name, vol)

    def _parts(self, name: str) -> tuple[VolumeManager, str, str | None] | None:
        parts = self._split(name)
        if parts is None or parts[0] not in self._managers:
            return None
        vol, at, snap = parts[1].partition("@")
        return self._managers[parts[0]], vol, snap if at else None

    def bitmaps(self, name: str) -> Sequence[str]:
        """The snapshots of the export's volume (other than the export itself): each is a
        ``qemu:dirty-bitmap:SNAP`` context reporting the blocks changed since it."""
        found = self._parts(name)
        if found is None:
            return []
        vm, vol, snap = found
        try:
            return [s for s in vm.snapshot_names(vol) if s != snap]
        except NotFound:
            return []

    async def changed(self, name: str, since: str, offset: int,
                      length: int) -> list[tuple[int, bool]]:
        """(length, changed) runs covering [offset, offset + length): what differs in
        export ``name`` from snapshot ``since`` of its volume."""
        found = self._parts(name)
        if found is None:
            raise NotFound(f"export {name} is gone")
        vm, vol, snap = found
        ranges = await vm.diff(vol, since, snap)
        runs: list[tuple[int, bool]] = []
        pos, end = offset, offset + length
        for start, n in ranges:
            lo, hi = max(start, pos), min(start + n, end)
            if hi <= lo:
                continue
            if lo > pos:
                runs.append((lo - pos, False))
            runs.append((hi - lo, True))
            pos = hi
        if pos < end:
            runs.append((end - pos, False))
        return runs

    def exports(self) -> Sequence[ExportInfo]:
        out = []
        for pool in sorted(self._managers):
            vm = self._managers[pool]
            for vname in vm.names():
                out.append(self.info(f"{pool}/{vname}", vm.get(vname)))
                for snap in vm.snapshot_names(vname):
                    out.append(self.info(f"{pool}/{vname}@{snap}",
                                         vm.snapshot_volume(vname, snap)))
        return out
