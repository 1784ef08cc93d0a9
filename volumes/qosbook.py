"""A pool's QoS book: the defaults new volumes get and the groups (limits shared by
several volumes, like qemu's throttle groups or a cgroup), stored as one pool object
``{"type": "qos", "defaults": {...}, "groups": {name: {...}}}`` so that they travel with
the pool (export/import) and change in the pool's commits; and each group's Throttle.
A volume's own settings live in its record (volumes/records.py).

Invariants:

1. Every group a volume or the defaults name is in the book: naming an unknown group is
   refused, and so is deleting a group that is named (the manager checks both).
2. A group's settings are limits only (no group of its own, the default weight).
3. A change is checked in full before anything is stored or applied; once stored it is
   part of the pool's next commit, and the manager applies it to the volumes at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pool.errors import InvalidArgument, NotFound
from pool.pool import Pool
from volumes.qos import DEFAULT_WEIGHT, QosSettings, Throttle

TYPE = "qos"


class QosBook:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._obj_id: int | None = None
        self.defaults = QosSettings()
        self.groups: dict[str, QosSettings] = {}
        self._throttles: dict[str, Throttle] = {}
        for obj_id, meta in pool.objects().items():
            if meta.get("type") == TYPE:
                self._obj_id = obj_id
                self.defaults = QosSettings.decode(meta.get("defaults") or {})
                self.groups = {str(name): QosSettings.decode(v)
                               for name, v in (meta.get("groups") or {}).items()}
        for name, s in self.groups.items():
            self._throttles[name] = Throttle(s)

    def throttle(self, group: str | None) -> Throttle | None:
        """The Throttle a member of ``group`` waits on too (None: no group, or the group
        limits nothing now)."""
        if group is None or not self.groups.get(group, QosSettings()).limited:
            return None
        return self._throttles[group]

    def check_group(self, group: str | None) -> None:
        if group is not None and group not in self.groups:
            raise InvalidArgument(f"no QoS group {group!r} in pool {self.pool.name}: create "
                                  f"it with 'storagectl qos group {self.pool.name}/{group}'")

    def group_settings(self, current: QosSettings, changes: Mapping[str, Any],
                       clear: bool) -> QosSettings:
        """A group's new settings (invariant 2), checked."""
        if "group" in changes or "weight" in changes:
            raise InvalidArgument("a QoS group has limits only (no group, no weight)")
        new = (QosSettings() if clear else current).updated(changes)
        assert new.group is None and new.weight == DEFAULT_WEIGHT
        return new

    def put_group(self, name: str, settings: QosSettings) -> None:
        """Store (and apply to the group's Throttle) a checked group."""
        self.groups[name] = settings
        if name in self._throttles:
            self._throttles[name].configure(settings)
        else:
            self._throttles[name] = Throttle(settings)
        self._store()

    def delete_group(self, name: str) -> None:
        if name not in self.groups:
            raise NotFound(f"no QoS group {name!r} in pool {self.pool.name}")
        del self.groups[name]
        self._throttles.pop(name).configure(QosSettings())   # (waiters, if any, go on)
        self._store()

    def put_defaults(self, settings: QosSettings) -> None:
        self.defaults = settings
        self._store()

    def _store(self) -> None:
        value = {"type": TYPE, "defaults": self.defaults.encode(),
                 "groups": {n: s.encode() for n, s in sorted(self.groups.items())}}
        self._obj_id = self.pool.put_object(value, self._obj_id)


__all__ = ["QosBook"]
