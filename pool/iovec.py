"""General helpers for vectored, back-to-back I/O on plain file descriptors: how many
buffers one call takes (``IOV_MAX``), what is left after a short write or send
(``advance``), and write-behind for a file written in long runs (``WriteBehind``).

Used by the devices (``pool.device``), the portable image writer (``volumes.portable``),
the control socket (``storaged.control``) and the benchmarks. A low module: it imports
nothing from the pool (an import-linter contract keeps it from importing ``pool.pool``).

Invariants this module owns:

1. ``advance(views, n)`` returns exactly the bytes of ``views`` after the first ``n``,
   in order, without copying (slices of the same memory).
2. ``WriteBehind`` is only ever an optimisation, never relied on for durability: its
   ``sync`` is a real fdatasync, and an error of a background sync since the last ``sync``
   is raised by the next ``sync``, exactly once (the kernel reports a write-back error to
   one fsync only).
3. At most one background sync per ``WriteBehind`` runs at a time; ``join`` waits for it
   (call it before closing the descriptor).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

IOV_MAX = 1024                   # buffers one vectored read or write takes (Linux UIO_MAXIOV)
_SYNC_FILE_RANGE_WRITE = 2
# Write-behind. The kernel lets GiBs of written pages pile up in RAM before it writes them
# out, and a disk with a volatile cache (most, and virtual disks) holds more until a
# cache flush: left alone, all of it is paid for at the next flush. So a device
# - asks the kernel to start writing out every WRITE_BEHIND bytes written (sync_file_range
#   SYNC_FILE_RANGE_WRITE: starts the I/O, waits for nothing), and
# - runs an fdatasync in a background thread every SYNC_BEHIND bytes written (one at a
#   time), which also flushes the disk's cache.
# Long writes then keep the disk busy while they go on, and the flush at the end of them
# has little left to do. Neither is relied on for durability: ``sync`` still syncs, and an
# error of a background sync is reported by the next ``sync`` (the kernel reports a
# write-back error to one fsync only).
WRITE_BEHIND = 8 << 20
SYNC_BEHIND = 32 << 20


def advance(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` (written or sent back to back) after ``n`` bytes of them
    went out: a short write or send continues from there."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


class WriteBehind:
    """Write-behind for one open file (see WRITE_BEHIND): ``wrote`` after each write,
    ``sync`` to make everything written durable, ``join`` before closing the file."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._behind = 0                       # bytes written since the last kick
        self._lo = self._hi = 0                # the range they fall in
        self._unsynced = 0                     # bytes written since the last sync started
        self._syncer: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, lo: int, hi: int) -> None:
        with self._lock:
            n = hi - lo
            self._unsynced += n
            syncer = None
            if self._unsynced >= SYNC_BEHIND and self._syncer is None:
                self._unsynced = 0
                syncer = self._syncer = threading.Thread(
                    target=self._sync_behind, daemon=True, name="storaged-sync-behind")
            if self._behind:
                lo, hi = min(lo, self._lo), max(hi, self._hi)
            self._behind += n
            kick = self._behind >= WRITE_BEHIND
            if kick:
                self._behind = 0
            else:
                self._lo, self._hi = lo, hi
        if kick:
            _sync_file_range(self._fd, lo, hi - lo, _SYNC_FILE_RANGE_WRITE)
        if syncer is not None:
            syncer.start()

    def _sync_behind(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            with self._lock:
                self._error = e
        finally:
            with self._lock:
                self._syncer = None

    def sync(self) -> None:
        """fdatasync; raises OSError, also for a failed background sync since the last."""
        with self._lock:
            self._unsynced = 0
        os.fdatasync(self._fd)
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background sync; whether none is running any more."""
        syncer = self._syncer
        if syncer is not None:
            syncer.join(timeout)
            return not syncer.is_alive()
        return True


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    """Start write-out of a range (advisory: errors are left to the next fdatasync)."""
    fn = _libc.sync_file_range
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn(fd, offset, length, flags)
