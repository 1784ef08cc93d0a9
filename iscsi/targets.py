"""Which volumes are iSCSI targets, under what names, and their logical units.

Each volume is a target ``BASE:POOL:VOLUME`` with the volume as LUN 0; each snapshot is a
read-only target ``BASE:POOL:VOLUME:SNAPSHOT``. iSCSI names allow only lower-case letters,
digits, '-', '.' and ':' (RFC 7143 §4.2.7, after stringprep folds case), so a component is
mapped: upper case is folded to lower case, '_' becomes '-', and ':' inside a name becomes
'.'. Names that collide after mapping (``Vol_1`` and ``vol-1`` in one pool) would make a
target ambiguous: such volumes are left out of iSCSI (and logged) rather than guessed at.

The catalog is read from the volume managers on every lookup, so volumes and snapshots
created or deleted through the control API are visible to the next login or discovery.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence

from iscsi.cdb import Gate
from iscsi.login import TargetPolicy
from iscsi.reservations import ReservationStore
from iscsi.scsi import LogicalUnit
from volumes import NotFound, Volume, VolumeManager

log = logging.getLogger(__name__)
DEFAULT_BASE_IQN = "iqn.2026-11.org.storaged"
_BASE = re.compile(r"(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[a-z0-9.:-]+)?|eui\.[0-9a-f]{16})")


def check_base_iqn(base: str) -> None:
    if not _BASE.fullmatch(base):
        raise ValueError(f"{base!r} is not an iSCSI name like iqn.2026-11.org.example")


def component(name: str) -> str:
    """One volume, pool or snapshot name as an iSCSI name component."""
    return name.lower().replace("_", "-").replace(":", ".")


class TargetCatalog:
    """Targets for every volume and snapshot of the given pools (name -> VolumeManager).

    ``policies`` gives a volume's access policy by ``POOL/VOLUME`` (snapshots use their
    volume's); ``gate`` makes the shared/exclusive lock of a new logical unit;
    ``reservations`` keeps each unit's persistent reservations (by ``POOL/VOLUME`` or
    ``POOL/VOLUME@SNAPSHOT``) across restarts."""

    def __init__(self, managers: Mapping[str, VolumeManager], gate: Callable[[], Gate], *,
                 base_iqn: str = DEFAULT_BASE_IQN,
                 policies: Callable[[str], TargetPolicy] | None = None,
                 reservations: ReservationStore | None = None) -> None:
        check_base_iqn(base_iqn)
        self._managers = managers
        self._gate = gate
        self.base_iqn = base_iqn
        self._policies = policies or (lambda _name: TargetPolicy())
        self._units: dict[str, LogicalUnit] = {}
        self._reservations = reservations

    def target_name(self, pool: str, volume: str, snapshot: str | None = None) -> str:
        parts = [self.base_iqn, component(pool), component(volume)]
        if snapshot is not None:
            parts.append(component(snapshot))
        return ":".join(parts)

    def _catalog(self) -> dict[str, tuple[str, str, str | None]]:
        """target name -> (pool, volume, snapshot), without ambiguous names."""
        seen: dict[str, tuple[str, str, str | None]] = {}
        clash: set[str] = set()
        for pool in sorted(self._managers):
            vm = self._managers[pool]
            for vol in vm.names():
                entries: list[tuple[str, str, str | None]] = [(pool, vol, None)]
                try:
                    entries += [(pool, vol, s) for s in vm.snapshot_names(vol)]
                except NotFound:
                    continue
                for entry in entries:
                    name = self.target_name(*entry)
                    if name in seen and seen[name] != entry:
                        clash.add(name)
                    seen[name] = entry
        for name in clash:
            log.warning("iSCSI: target name %s is ambiguous (names that differ only in "
                        "case, '_' or ':'); it is not exported", name)
            del seen[name]
        return seen

    def names(self) -> list[str]:
        return sorted(self._catalog())

    def find(self, target: str) -> tuple[str, str, str | None] | None:
        return self._catalog().get(target.lower())

    def volume(self, target: str) -> Volume | None:
        found = self.find(target)
        if found is None:
            return None
        pool, vol, snap = found
        vm = self._managers.get(pool)
        if vm is None:
            return None
        try:
            return vm.snapshot_volume(vol, snap) if snap is not None else vm.get(vol)
        except NotFound:
            return None

    # ---- TargetDirectory ---------------------------------------------------------------
    def policy(self, target: str) -> TargetPolicy | None:
        found = self.find(target)
        if found is None:
            return None
        return self._policies(f"{found[0]}/{found[1]}")

    def visible(self, initiator: str) -> Sequence[str]:
        out = []
        for name, (pool, vol, _snap) in sorted(self._catalog().items()):
            if self._policies(f"{pool}/{vol}").permits(initiator):
                out.append(name)
        return out

    # ---- logical units -----------------------------------------------------------------
    def unit(self, target: str) -> LogicalUnit | None:
        """The target's logical unit, shared by every session (reservations, mode pages
        and COMPARE AND WRITE atomicity span sessions)."""
        key = target.lower()
        found = self.find(key)
        if found is None:
            self._units.pop(key, None)
            return None
        lu = self._units.get(key)
        pool, vol, snap = found
        vm = self._managers[pool]
        if lu is not None and (snap is not None or lu.volume is vm.get(vol)):
            return lu
        volume = self.volume(key)
        if volume is None:
            return None
        serial = hashlib.sha256(f"{vm.pool.uuid}/{vol}@{snap or ''}".encode()).hexdigest()
        lu = LogicalUnit(volume, self._gate(), serial=serial[:32], target_name=key,
                         store=self._reservations,
                         unit_key=f"{pool}/{vol}" + (f"@{snap}" if snap else ""))
        self._units[key] = lu
        return lu
