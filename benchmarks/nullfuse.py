"""A pyfuse3 file system with nothing behind it, for benchmarks/fuse: the ceiling of any
pyfuse3 export on this machine.

One file, ``MOUNT/file`` (1 GiB), opened with direct_io like storaged's volume files;
reads answer at once with zeros from a constant buffer and writes are answered at once
and dropped. What fio measures on it is pyfuse3's own request loop (trio tasks, a lock, a
wait for /dev/fuse to be readable, the reply) and the kernel's FUSE path: no pyfuse3 file
system can go faster, so its ratio to qemu-storage-daemon bounds storaged's.

``--memory`` (a second process) keeps the file's bytes: its content is one in-process
buffer of the file's size, filled with random bytes (``os.urandom`` of 1 MiB, repeated)
before it mounts, so every page is allocated and touched before anything is measured.
A read answers a read-only memoryview of the buffer at the offset (no copy; pyfuse3
copies it into its reply as soon as the handler returns, and no handler awaits), a
write copies its payload into the buffer at the offset: the least any file system that
serves real bytes must do. On 4 KiB random I/O over a large region that alone costs
the cache lines and TLB entries the constant buffer never misses, so this mode is the
ceiling of a file system that keeps data, beside the null one. The buffer is the file's
size, ``--size`` bytes (1 GiB unless given): benchmarks/fuse gives it 512 MiB, the region
its fio runs use, which this 24 GiB machine holds easily (1 GiB would do as well).

    .venv/bin/python -m benchmarks.nullfuse [--memory] [--size BYTES] MOUNTPOINT
        (SIGTERM unmounts)
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import stat
import sys
from typing import cast

import pyfuse3
import trio

from storaged.tuning import tune_process

SIZE = 1 << 30
FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"file"


@functools.cache
def _zeros(n: int) -> bytes:
    """n zero bytes, made once per size (fio asks for a few sizes only)."""
    return bytes(n)


class NullFS(pyfuse3.Operations):
    """The smallest file system fio can run on."""

    def __init__(self, size: int = SIZE) -> None:
        super().__init__()
        self.size = size

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
        elif inode == FILE_INODE:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_ino = inode
        a.entry_timeout = a.attr_timeout = 300
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == NAME:
            return self._attr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return _zeros(max(0, min(size, self.size - off)))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None


FILL = 1 << 20      # the random pattern the memory mode's buffer repeats


def random_buffer(size: int) -> bytearray:
    """``size`` bytes of ``os.urandom(FILL)`` repeated: every page written once, so the
    measurement finds it allocated."""
    buf = bytearray(size)
    pattern = os.urandom(FILL)
    for off in range(0, size, FILL):
        n = min(FILL, size - off)
        buf[off:off + n] = pattern[:n]
    return buf


class MemoryFS(NullFS):
    """The null file system that keeps its file's bytes in one buffer (``--memory``)."""

    def __init__(self, size: int = SIZE) -> None:
        super().__init__(size)
        self.data = random_buffer(size)
        self.view = memoryview(self.data).toreadonly()

    async def read(self, fh: int, off: int, size: int) -> bytes:
        # pyfuse3 takes any contiguous buffer; its stub says bytes. A slice stops at the
        # end of the buffer by itself.
        return cast(bytes, self.view[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        n = max(0, min(len(buf), self.size - off))
        if n == 0 and buf:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.data[off:off + n] = memoryview(buf)[:n]
        return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.nullfuse",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--memory", action="store_true",
                    help="keep the file's bytes in memory (reads answer a view of them)")
    ap.add_argument("--size", type=int, default=SIZE,
                    help=f"the file's size in bytes (default {SIZE})")
    args = ap.parse_args(argv)
    if args.size <= 0:
        ap.error("--size must be positive")
    tune_process()                  # as the daemon runs (before the buffer is allocated)
    fs = MemoryFS(args.size) if args.memory else NullFS(args.size)
    options = set(pyfuse3.default_options)
    options.add("fsname=storaged-bench-memory" if args.memory else "fsname=storaged-bench-null")
    pyfuse3.init(fs, args.mountpoint, options)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _sig in signals:
                    pyfuse3.terminate()
                    break
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
