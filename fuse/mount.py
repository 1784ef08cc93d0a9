"""The mount's life: clear a stale mount, mount, serve inside the daemon's nursery, and on
stop answer what is in flight, flush every volume and unmount.

pyfuse3 allows one mount per process and runs its request loop as trio tasks
(``pyfuse3.main``), so the daemon owns the mount and serves it next to NBD. A daemon that
died (kill -9, crash) leaves its mount behind: any access then fails with ENOTCONN. We find
that from /proc/self/mountinfo plus one stat (in a thread, with a timeout, because a mount
whose server hangs would block it) and clear it with ``fusermount3 -u -z`` before mounting.
"""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
import trio

from fuse.fs import VolumeFS
from volumes import StorageError

log = logging.getLogger(__name__)
FSNAME = "storaged"
STAT_TIMEOUT = 5.0
# The kernel lets a FUSE connection have 12 background (async direct I/O, readahead)
# requests in flight by default; queue-depth clients (fio iodepth=16, qemu aio) want more.
MAX_BACKGROUND = 64


class MountError(StorageError):
    """The mount point cannot be used (busy with another file system, not a directory)."""

    errno = errno.EBUSY


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(path: str) -> tuple[str, str] | None:
    """(fstype, major:minor) of the mount whose mount point is ``path``, or None. Read from
    /proc/self/mountinfo, which never touches the mounted file system itself."""
    want = os.path.realpath(path) if os.path.exists(path) else os.path.abspath(path)
    found: tuple[str, str] | None = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _sep, right = line.partition(" - ")
                parts = left.split()
                if len(parts) >= 5 and _unescape(parts[4]) == want:
                    found = (right.split()[0], parts[2])   # the last one is on top
    except OSError:
        return None
    return found


def _probe(path: str) -> int:
    """0 if ``path`` answers a stat, else the errno."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


async def clear_stale_mount(path: str) -> None:
    """Unmount what a dead storaged left at ``path``; refuse a live mount of anything."""
    entry = await trio.to_thread.run_sync(mount_entry, path)
    if entry is None:
        return
    fstype, _dev = entry
    code = errno.ETIMEDOUT
    with trio.move_on_after(STAT_TIMEOUT):
        code = await trio.to_thread.run_sync(_probe, path, abandon_on_cancel=True)
    if fstype.startswith("fuse") and code in (errno.ENOTCONN, errno.ECONNABORTED,
                                              errno.ETIMEDOUT):
        log.warning("fuse: %s is a stale mount (%s) left by a daemon that died; "
                    "unmounting it", path, os.strerror(code))
        for argv in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
            try:
                r = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                           check=False)
            except OSError:
                continue
            if r.returncode == 0 and await trio.to_thread.run_sync(mount_entry, path) is None:
                return
        raise MountError(f"{path} holds a stale FUSE mount that could not be unmounted; "
                         f"run `fusermount3 -u -z {path}` as root")
    raise MountError(f"{path} is already a mount point ({fstype}"
                     f"{'' if code == 0 else ', ' + os.strerror(code)}); is another storaged "
                     f"serving it? Unmount it or choose another fuse.mount")


def check_mountpoint(path: str) -> None:
    """Refuse, before the daemon imports any pool, a ``fuse.mount`` that cannot be mounted
    on: a path that is not a directory, one that cannot be created (under a file, or in a
    directory we may not write), or a mount point that another (non-FUSE) file system
    holds. Blocking (stat, /proc/self/mountinfo); never touches a FUSE mount there, which
    may hang: ``serve`` judges those (stale: unmounted; live: refused)."""
    where = os.path.abspath(path)
    probe = where
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is not a directory" if probe == where else f"is under {probe}, not a directory"
        raise MountError(f"fuse.mount {path} {what}")
    if probe != where and not os.access(probe, os.W_OK | os.X_OK):
        raise MountError(f"fuse.mount {path} does not exist and cannot be created: "
                         f"{probe} is not writable")
    entry = mount_entry(where)
    if entry is not None and not entry[0].startswith("fuse"):
        raise MountError(f"fuse.mount {path} is already a mount point ({entry[0]}); "
                         f"unmount it or choose another fuse.mount")


def raise_max_background(dev: str) -> None:
    """Let the kernel keep MAX_BACKGROUND async requests in flight on the FUSE connection
    ``dev`` (major:minor), where fusectl is mounted and we may write it."""
    minor = dev.partition(":")[2]
    try:
        with open(f"/sys/fs/fuse/connections/{minor}/max_background", "w") as f:
            f.write(str(MAX_BACKGROUND))
    except OSError as e:   # not root, or no fusectl: the kernel default stays
        log.debug("fuse: could not raise max_background: %s", e)


class FuseMount:
    """Serves ``fs`` at ``mountpoint`` for as long as ``serve`` runs."""

    def __init__(self, fs: VolumeFS, mountpoint: str, *, allow_other: bool = False) -> None:
        self.fs = fs
        self.mountpoint = os.path.abspath(mountpoint)
        self.allow_other = allow_other
        self._running = False
        self._closed = trio.Event()

    def options(self) -> set[str]:
        opts = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}"}
        if self.allow_other:
            opts.add("allow_other")
        return opts

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        await clear_stale_mount(self.mountpoint)
        try:
            await trio.Path(self.mountpoint).mkdir(parents=True, exist_ok=True)
            # mount(2) only: the kernel's INIT request waits for pyfuse3.main below.
            pyfuse3.init(self.fs, self.mountpoint, self.options())
        except (OSError, RuntimeError) as e:
            # One line for the operator (startup D3), not a traceback.
            raise MountError(f"fuse.mount {self.mountpoint}: cannot mount: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        self._running = True
        unmount = True
        try:
            log.info("fuse: volumes mounted at %s", self.mountpoint)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._main)
                await self.fs.initialized.wait()
                entry = await trio.to_thread.run_sync(mount_entry, self.mountpoint)
                if entry is not None:
                    await trio.to_thread.run_sync(raise_max_background, entry[1])
                task_status.started(self.mountpoint)
            if self._running:   # the loop ended without stop(): unmounted from outside
                log.warning("fuse: %s was unmounted from outside", self.mountpoint)
                unmount = False
        finally:
            self._running = False
            with trio.CancelScope(shield=True):
                await self.fs.flush_all()
            pyfuse3.close(unmount=unmount)   # umount2(MNT_DETACH), then close /dev/fuse
            self._closed.set()
            log.info("fuse: %s unmounted", self.mountpoint)

    async def _main(self) -> None:
        try:
            await pyfuse3.main()
        except Exception:
            # Handlers never raise (fuse.fs.edge); this is the session itself failing.
            # NBD goes on serving; the mount is closed by serve().
            log.exception("fuse: the FUSE session failed; closing the mount")
        finally:
            self.fs.initialized.set()   # never leave serve() waiting for an INIT

    async def stop(self, grace: float = 30.0) -> None:
        """Take no new requests, let those in flight finish (up to ``grace`` seconds),
        flush every volume and unmount."""
        if not self._running:
            return
        self._running = False
        pyfuse3.terminate()
        with trio.move_on_after(grace):
            await self._closed.wait()
