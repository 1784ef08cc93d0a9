"""The pool layer: devices, labels, extents, segments, the record store and the metadata
journal. See docs/FORMAT.md for the on-disk format and docs/INTERNALS.md for how it works."""

from pool.device import Device, FileDevice, MemoryDevice
from pool.errors import StorageError
from pool.pool import MemberStatus, Pool, PoolStatistics, Profile

__all__ = ["Device", "FileDevice", "MemberStatus", "MemoryDevice", "Pool", "PoolStatistics",
           "Profile", "StorageError"]
