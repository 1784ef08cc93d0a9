"""The one error root of storaged's storage layers.

Every error carries an errno hint so that each frontend has exactly one place that turns it
into its wire form (an NBD error code, SCSI sense data, a FUSEError).
"""

from __future__ import annotations

import errno


class StorageError(Exception):
    """Root of every error the storage layers raise on purpose."""

    errno: int = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(StorageError):
    """A caller passed something that can never work (bad offset, size, name...)."""

    errno = errno.EINVAL


class NotFound(StorageError):
    errno = errno.ENOENT


class AlreadyExists(StorageError):
    errno = errno.EEXIST


class NoSpace(StorageError):
    """The pool (or its metadata area) cannot hold what was asked for."""

    errno = errno.ENOSPC


class ReadOnly(StorageError):
    errno = errno.EROFS


class Busy(StorageError):
    errno = errno.EBUSY


class MediumError(StorageError):
    """Data could not be read correctly: too many fragments bad or missing.

    Raised instead of ever returning bytes that did not verify (invariant 4).
    """

    errno = errno.EIO


class DeviceError(StorageError):
    """A device failed an I/O, was not found, or is not what it claims to be."""

    errno = errno.EIO


class DeviceBusy(DeviceError):
    """A device is held exclusively by someone else (another pool, another daemon)."""

    errno = errno.EBUSY


class DeviceHung(DeviceError):
    """A write or sync did not complete within the write deadline; the call may still
    land later (its thread could not be stopped)."""


class ImportFailed(StorageError):
    """A pool could not be imported from the devices given; nothing was changed."""

    errno = errno.ENXIO


class PoolFailed(StorageError):
    """The pool hit an ambiguous metadata write failure and refuses further I/O.

    Like SQLite's ERROR state: after a failed commit we cannot know what is on disk, so the
    only safe way forward is to close and re-import (which recovers the last committed state).
    """

    errno = errno.EIO
