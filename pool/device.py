"""Devices: the things a pool is made of.

A device is a fixed-size, byte-addressed store with blocking ``pread``/``pwrite``/``sync``/
``discard``. The pool calls these from worker threads (never from the trio event loop).
Implementations:

- ``FileDevice``: a regular file or a block device (O_CLOEXEC, buffered I/O, fdatasync;
  discard punches a hole in a file or issues BLKDISCARD on a block device).
- ``MemoryDevice``: a RAM disk; the crash suite rebuilds post-crash device images in memory.

Wrappers that record writes or inject faults live in ``pool.faults``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

from pool.errors import DeviceBusy, DeviceError
from pool.iovec import IOV_MAX, WriteBehind, advance

log = logging.getLogger(__name__)

# <linux/fs.h>: _IO(0x12, 119) and _IOR(0x12, 114, size_t)
_BLKDISCARD = 0x1277
_BLKGETSIZE64 = 0x80081272
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# How long ``close`` waits for calls still running in other threads (reads and writes the
# pool gave up on, a background sync) before it leaves the descriptor open.
CLOSE_WAIT = 2.0
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
Buffer = bytes | bytearray | memoryview


class Device(Protocol):
    """What the pool needs of a device. All methods may block; call them from threads."""

    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def preadv_nowait(self, offset: int, buffers: Sequence[bytearray | memoryview]) -> int:
        """Fill ``buffers`` back to back from ``offset`` as far as that can be done without
        blocking (the bytes are in the page cache); how many bytes were read: all of them,
        or fewer (not all cached, or the end of the device; the rest of the buffers may
        then hold anything).

        May be called on the event loop; must never block or raise for "not cached"."""
        ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None: ...

    def sync(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


class FileDevice:
    """A plain file or a block device opened read-write (``read_only``: for looking).

    ``exclusive``: held so that no one else can open it the same way while it is open
    (DESIGN invariant 10): O_EXCL on a block device, an exclusive flock on a file (taken
    without waiting; a second FileDevice of the same file, in this process or another,
    is refused with DeviceBusy)."""

    def __init__(self, path: str, *, create_size: int | None = None,
                 exclusive: bool = False, read_only: bool = False) -> None:
        self._path = os.path.abspath(path)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if create_size is not None:
            flags |= os.O_CREAT
        if exclusive and _is_block_path(self._path):
            flags |= os.O_EXCL       # the kernel's exclusive open of a block device
        try:
            self._fd = os.open(self._path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.EBUSY and exclusive:
                raise DeviceBusy(f"{path} is in use (open exclusively elsewhere)") from e
            raise DeviceError(f"cannot open device {path}: {e.strerror}") from e
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        if not self._is_block and not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise DeviceError(f"{path} is neither a regular file nor a block device")
        if exclusive and not self._is_block:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(self._fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DeviceBusy(f"{path} is in use (locked by another holder)") from e
                raise DeviceError(f"cannot lock device {path}: {e.strerror}") from e
        if create_size is not None and not self._is_block and st.st_size < create_size:
            os.ftruncate(self._fd, create_size)
        # What this device is (pool.identity): the inode, or the block device number.
        self.identity = (("block", st.st_rdev, 0) if self._is_block
                         else ("file", st.st_dev, st.st_ino))
        self._size = self._probe_size()
        self._closed = False
        self._behind = WriteBehind(self._fd)
        # One writer at a time: the kernel serializes buffered writes to a file anyway
        # (ext4 takes the inode lock), but writers waiting there spin on the CPU; here
        # they sleep (measured: 4 threads writing one file used 1.7x the CPU of 1).
        self._wlock = threading.Lock()
        # Blocking calls under way (see close).
        self._inflight = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        with self._idle:
            if self._closed:
                # A late call of a thread the pool gave up on: the number may be reused.
                raise DeviceError(f"{self._path} is closed")
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def _probe_size(self) -> int:
        if self._is_block:
            buf = fcntl.ioctl(self._fd, _BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("<Q", buf)[0])
        return os.fstat(self._fd).st_size

    @property
    def path(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        try:
            with self._in_use():
                data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise DeviceError(f"read of {length} bytes at {offset} on {self._path} failed: "
                              f"{e.strerror}") from e
        if len(data) < length:
            # A file shorter than its label says (truncated) reads short: that is an error,
            # not zeros, or a truncated member would pass for an empty one.
            raise DeviceError(f"short read on {self._path}: {len(data)} of {length} bytes "
                              f"at {offset}")
        return data

    def preadv_nowait(self, offset: int, buffers: Sequence[bytearray | memoryview]) -> int:
        if _RWF_NOWAIT is None:
            return 0
        if len(buffers) <= IOV_MAX:
            try:
                return os.preadv(self._fd, buffers, offset, _RWF_NOWAIT)
            except OSError:
                return 0  # EAGAIN (not cached), EOPNOTSUPP...: the thread path will tell
        done = 0
        for i in range(0, len(buffers), IOV_MAX):
            got = self.preadv_nowait(offset + done, buffers[i:i + IOV_MAX])
            done += got
            if got < sum(map(len, buffers[i:i + IOV_MAX])):
                break
        return done

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        start = offset
        try:
            with self._in_use(), self._wlock:
                while view:
                    n = os.pwrite(self._fd, view, offset)
                    view = view[n:]
                    offset += n
        except OSError as e:
            raise DeviceError(f"write at {offset} on {self._path} failed: {e.strerror}") from e
        self._behind.wrote(start, offset)

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Write buffers back to back from ``offset`` (one syscall per IOV_MAX buffers).
        The buffers go to the kernel as they are; only a short write (rare) makes views
        of what is left, and goes on from there."""
        start = offset
        try:
            with self._in_use(), self._wlock:
                for i in range(0, len(buffers), IOV_MAX):
                    part = buffers[i:i + IOV_MAX]
                    n = os.pwritev(self._fd, part, offset)
                    offset += n
                    if n == sum(map(len, part)):
                        continue
                    views = advance([memoryview(b) for b in part if len(b)], n)
                    while views:
                        n = os.pwritev(self._fd, views[:IOV_MAX], offset)
                        offset += n
                        views = advance(views, n)
        except OSError as e:
            raise DeviceError(f"write at {offset} on {self._path} failed: {e.strerror}") from e
        self._behind.wrote(start, offset)

    def sync(self) -> None:
        try:
            with self._in_use():
                self._behind.sync()
        except OSError as e:
            raise DeviceError(f"fdatasync of {self._path} failed: {e.strerror}") from e

    def discard(self, offset: int, length: int) -> None:
        try:
            with self._in_use():
                if self._is_block:
                    fcntl.ioctl(self._fd, _BLKDISCARD, struct.pack("<QQ", offset, length))
                else:
                    _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                               offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return  # discard is advisory: a device that cannot do it keeps the bytes
            raise DeviceError(f"discard on {self._path} failed: {e.strerror}") from e

    def drop_cache(self, offset: int, length: int) -> None:
        """Drop this host's cached copy of a range, so the next read sees what another
        host wrote to a shared device (owner records). Advisory."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)

    def gone(self) -> bool:
        """Whether the path no longer leads to the file or device we have open (it was
        deleted, or replaced by another): the pool faults such a member."""
        return self.vanished(0) is not None

    def vanished(self, need: int) -> str | None:
        """Why this device can no longer serve as the member it was opened as, or None
        (blocking: a stat, an fstat and for a block device an ioctl): its path leads
        nowhere or to another file or device (deleted, replaced), or it is now shorter
        than ``need`` bytes (truncated, a shrunk LUN)."""
        with self._idle:
            if self._closed:
                return None      # closed by the pool: nothing to say about it
        try:
            with self._in_use():
                mine = os.fstat(self._fd)
                size = self._probe_size()
        except DeviceError:
            return None          # closed meanwhile
        except OSError as e:
            return f"{self._path} cannot be examined any more ({e.strerror})"
        try:
            st = os.stat(self._path)
        except OSError as e:
            return f"{self._path} is gone ({e.strerror})"
        now = (("block", st.st_rdev, 0) if stat.S_ISBLK(st.st_mode)
               else ("file", st.st_dev, st.st_ino))
        if now != self.identity or (not self._is_block and mine.st_nlink == 0):
            return f"{self._path} now leads to another file or device"
        if size < need:
            return f"{self._path} shrank to {size} bytes (the pool uses {need})"
        return None

    def close(self) -> None:
        """Close the descriptor once no call uses it. A call the pool gave up on (a hung
        device) may still be inside the kernel with it: then the descriptor is left open
        (and logged) rather than closed under that call, whose number could be reused by
        the next file opened and receive its late write."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + CLOSE_WAIT
        synced = self._behind.join(CLOSE_WAIT)   # a background sync uses the descriptor
        with self._idle:
            idle = self._idle.wait_for(lambda: not self._inflight,
                                       timeout=max(0.0, deadline - time.monotonic()))
        if not (synced and idle):
            log.warning("%s: a call is still stuck in the device after %g s; its "
                        "descriptor is left open", self._path, CLOSE_WAIT)
            return
        os.close(self._fd)

    def __repr__(self) -> str:
        return f"FileDevice({self._path!r})"


def _is_block_path(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    fn = _libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class MemoryDevice:
    """A RAM disk. Thread-safe; used to rebuild post-crash images quickly."""

    def __init__(self, size: int, *, path: str = "mem", data: bytes | bytearray | None = None):
        self._buf = bytearray(data) if data is not None else bytearray(size)
        if len(self._buf) != size:
            self._buf.extend(bytes(size - len(self._buf)))
        self._path = path
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return len(self._buf)

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > len(self._buf):
            raise DeviceError(f"read beyond end of {self._path}")
        with self._lock:
            return bytes(self._buf[offset:offset + length])

    def preadv_nowait(self, offset: int, buffers: Sequence[bytearray | memoryview]) -> int:
        done = 0
        with self._lock:
            for b in buffers:
                n = min(len(b), len(self._buf) - offset - done)
                if n <= 0 or offset < 0:
                    break
                b[:n] = self._buf[offset + done:offset + done + n]
                done += n
                if n < len(b):
                    break
        return done

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if offset < 0 or offset + n > len(self._buf):
            raise DeviceError(f"write beyond end of {self._path}")
        with self._lock:
            self._buf[offset:offset + n] = data

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.pwrite(offset, b"".join(buffers))

    def sync(self) -> None:
        return None

    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            self._buf[offset:offset + length] = bytes(length)

    def close(self) -> None:
        return None

    def image(self) -> bytes:
        with self._lock:
            return bytes(self._buf)

    def __repr__(self) -> str:
        return f"MemoryDevice({self._path!r})"
