"""A pyfuse3 file system with nothing behind it, for benchmarks/fuse: the ceiling of any
pyfuse3 export on this machine.

One file, ``MOUNT/file`` (1 GiB), opened with direct_io like storaged's volume files;
reads answer at once with zeros from a constant buffer and writes are answered at once
and dropped. What fio measures on it is pyfuse3's own request loop (trio tasks, a lock, a
wait for /dev/fuse to be readable, the reply) and the kernel's FUSE path: no pyfuse3 file
system can go faster, so its ratio to qemu-storage-daemon bounds storaged's.

    .venv/bin/python -m benchmarks.nullfuse MOUNTPOINT     (SIGTERM unmounts)
"""

from __future__ import annotations

import errno
import functools
import signal
import stat
import sys

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

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
        elif inode == FILE_INODE:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = SIZE
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
        return _zeros(max(0, min(size, SIZE - off)))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    tune_process()                  # as the daemon runs
    options = set(pyfuse3.default_options)
    options.add("fsname=storaged-bench-null")
    pyfuse3.init(NullFS(), args[0], options)

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
