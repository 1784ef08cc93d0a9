"""The pool layer: devices, labels, extents, segments, the record store and the metadata
journal. See docs/FORMAT.md for the on-disk format and docs/INTERNALS.md for how it works.

The devices (``pool.device``) and the pool itself (``pool.pool``) are imported on first
use, so that light users of the package (storagectl needs only the errors) start without
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pool.errors import StorageError
from pool.lazy import lazy_attributes

if TYPE_CHECKING:
    from pool.device import Device, FileDevice, MemoryDevice
    from pool.devio import close_devices
    from pool.pool import Pool
    from pool.profile import Profile
    from pool.status import MemberStatus, PoolStatistics

_LAZY = {"Device": "pool.device", "FileDevice": "pool.device", "MemoryDevice": "pool.device",
         "MemberStatus": "pool.status", "Pool": "pool.pool", "PoolStatistics": "pool.status",
         "Profile": "pool.profile", "close_devices": "pool.devio"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = ["Device", "FileDevice", "MemberStatus", "MemoryDevice", "Pool", "PoolStatistics",
           "Profile", "StorageError", "close_devices"]
