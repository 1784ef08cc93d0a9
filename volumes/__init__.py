"""Thin volumes on a pool: the Volume API that the frontends use.

Frontends import from here only (never from ``pool``): the volume classes, the error root
and its subclasses, and the pool handle they are given by the daemon. The volume classes
are imported on first use (storagectl needs only the errors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from pool.lazy import lazy_attributes
from volumes.capabilities import Capabilities

if TYPE_CHECKING:
    from volumes.manager import VolumeManager, check_volume_name
    from volumes.openers import Opener, Openers
    from volumes.volume import DEFAULT_BLOCK, Extent, Volume, VolumeStatistics

_LAZY = {"VolumeManager": "volumes.manager", "check_volume_name": "volumes.manager",
         "Opener": "volumes.openers", "Openers": "volumes.openers",
         "DEFAULT_BLOCK": "volumes.volume", "Extent": "volumes.volume",
         "Volume": "volumes.volume", "VolumeStatistics": "volumes.volume"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "DEFAULT_BLOCK",
    "AlreadyExists",
    "Busy",
    "Capabilities",
    "Extent",
    "InvalidArgument",
    "MediumError",
    "NoSpace",
    "NotFound",
    "Opener",
    "Openers",
    "ReadOnly",
    "StorageError",
    "Volume",
    "VolumeManager",
    "VolumeStatistics",
    "check_volume_name",
]
