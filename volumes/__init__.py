"""Thin volumes on a pool: the Volume API that the frontends use.

Frontends import from here only (never from ``pool``): the volume classes, the error root
and its subclasses, and the pool handle they are given by the daemon.
"""

from pool.errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    MediumError,
    NoSpace,
    NotFound,
    ReadOnly,
    StorageError,
)
from volumes.manager import VolumeManager, check_volume_name
from volumes.volume import DEFAULT_BLOCK, Extent, Volume, VolumeStatistics

__all__ = [
    "DEFAULT_BLOCK",
    "AlreadyExists",
    "Busy",
    "Extent",
    "InvalidArgument",
    "MediumError",
    "NoSpace",
    "NotFound",
    "ReadOnly",
    "StorageError",
    "Volume",
    "VolumeManager",
    "VolumeStatistics",
    "check_volume_name",
]
