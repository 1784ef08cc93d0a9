"""The FUSE file system: every volume a regular file, every snapshot a read-only one.

Namespace (names match the NBD export names)::

    MOUNT/                          one directory per imported pool
    MOUNT/POOL/VOLUME               read-write, st_size = volume size
    MOUNT/POOL/.snapshots/VOL@SNAP  read-only (EROFS on any change)

Every file is opened with FOPEN_DIRECT_IO, so the kernel keeps no page cache for it: each
read and write becomes a FUSE request that reaches the one ``Volume`` object that NBD uses
too. Data written over NBD is therefore seen at once through the mount and the other way
round, with no invalidation protocol that could be missed (NBD cannot tell us when to
invalidate, and pyfuse3 offers only inode-wide invalidation). The cost is that reads are
never served from the kernel's cache; the volume's own write buffer and the pool's record
cache sit right behind us instead.

Namespace changes are the control API's operations on the same ``VolumeManager``: a file
that gets a size is ``volume create``, truncate is ``volume resize``, unlink is ``volume
delete``. A created file has no size yet and a volume cannot be empty, so it is a
zero-length *placeholder* (in memory only, not a volume) until it is given a size or its
first write; truncating a volume to 0 deletes the volume and leaves such a placeholder
(which remembers block size, profile and compression for the volume it becomes).

Open handles are the mount's clients of a volume (volumes/openers.py): while a volume or
snapshot file has handles open, one opener ("FUSE: N open handles") is registered with it,
so `volume delete`/`rename`/`snapshot rollback` through the control API are refused
(EBUSY) while a program has the file open; with --force the handles are revoked (their
next request answers EBADF) and the file is gone from the mount.

pyfuse3 treats any exception other than ``FUSEError`` as fatal to the mount, so every
handler goes through ``edge``: storage errors answer their errno, anything else is logged
and answered EIO.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from volumes import (
    DEFAULT_BLOCK,
    AlreadyExists,
    Busy,
    Opener,
    Openers,
    ReadOnly,
    StorageError,
    Volume,
    VolumeManager,
    check_volume_name,
)

log = logging.getLogger(__name__)

SNAPSHOT_DIR = ".snapshots"
SECTOR = 512
STATFS_BLOCK = 4096
NAME_MAX = 255
MAX_REPLY = 1 << 20          # libfuse's largest request (its buffer: 256 pages)
Kind = Literal["root", "pool", "snapdir", "volume", "snapshot", "placeholder"]
P = ParamSpec("P")
R = TypeVar("R")


def to_errno(exc: BaseException) -> int:
    """The one translation of errors below us into an errno for the kernel."""
    return exc.errno if isinstance(exc, StorageError) else errno.EIO


def edge(fn: Callable[Concatenate[VolumeFS, P], Awaitable[R]]
         ) -> Callable[Concatenate[VolumeFS, P], Coroutine[Any, Any, R]]:
    """Run a handler so that nothing but ``FUSEError`` leaves it (no request can take the
    mount down): storage errors keep their errno, anything unexpected is logged with its
    traceback and answered EIO."""

    async def handler(self: VolumeFS, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise _answer(fn.__name__, e) from None
    handler.__name__ = handler.__qualname__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


def _answer(op: str, exc: Exception) -> pyfuse3.FUSEError:
    """The ``FUSEError`` a handler answers for ``exc`` (see ``edge``), logged."""
    if isinstance(exc, StorageError):
        log.debug("fuse %s: %s", op, exc.message)
    else:
        log.error("fuse %s failed unexpectedly; answering EIO", op, exc_info=exc)
    return pyfuse3.FUSEError(to_errno(exc))


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@dataclass(frozen=True, slots=True)
class FuseOptions:
    """Owner and permissions of everything in the mount (chmod/chown are refused: the
    daemon's configuration decides them)."""

    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    mode: int = 0o600            # volume files; snapshots get the read bits of this
    allow_other: bool = False    # let users other than the daemon's see the mount


@dataclass(frozen=True, slots=True)
class Node:
    """What an inode stands for. ``name`` is the volume (or ``VOL@SNAP``) name."""

    kind: Kind
    pool: str = ""
    name: str = ""


@dataclass(slots=True)
class Placeholder:
    """A zero-length file that becomes a volume once it has a size."""

    block_size: int = DEFAULT_BLOCK
    profile: str | None = None       # None: the pool's default profile
    compression: bool = True


@dataclass(slots=True)
class Handle:
    """An open file. ``volume`` is what its reads and writes go to, once resolved: the
    snapshot's view (fixed), or the volume its inode named when a request last resolved
    it; the fast paths use it while it is not ``deleted`` (invariant 1 of VolumeFS)."""

    ino: int
    writable: bool
    sync: bool                       # opened O_SYNC/O_DSYNC: every write is FUA
    snapshot: Volume | None = None   # the read-only view, for snapshot files
    volume: Volume | None = None


@dataclass(slots=True)
class Times:
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Inodes:
    """Stable inode numbers for nodes. A node keeps its number for the life of the mount
    (numbers are never reused, so the kernel can never confuse two files)."""

    def __init__(self) -> None:
        self._by_node: dict[Node, int] = {Node("root"): pyfuse3.ROOT_INODE}
        self._by_ino: dict[int, Node] = {pyfuse3.ROOT_INODE: Node("root")}
        self._next = pyfuse3.ROOT_INODE + 1

    def ino(self, node: Node) -> int:
        n = self._by_node.get(node)
        if n is None:
            n = self._by_node[node] = self._next
            self._by_ino[n] = node
            self._next += 1
        return n

    def node(self, ino: int) -> Node:
        node = self._by_ino.get(ino)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def rekey(self, old: Node, new: Node) -> None:
        n = self._by_node.pop(old, None)
        if n is not None:
            self._by_node.pop(new, None)
            self._by_node[new] = n
            self._by_ino[n] = new


def _decode(name: bytes) -> str:
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        raise _fail(errno.ENOENT) from None


def _round_up(n: int) -> int:
    return -(-n // SECTOR) * SECTOR


class VolumeFS(pyfuse3.Operations):
    """pyfuse3 operations over the daemon's volume managers (pool name -> manager).

    Invariants (tests cite them as "VolumeFS invariant N"):

    1. A handle's ``volume``, while not ``deleted``, is the volume its inode names: a
       volume keeps its object for its life (resize, rollback and receives change it in
       place; a rename through the mount rekeys the inode), and whatever replaces the
       volume behind a name deletes the old object first (delete, truncate to 0, a forced
       receive) or revokes the handle (a forced rename, rollback or export). So ``read``
       and ``write`` use it without resolving the inode, and resolve again (``_live``)
       only when it is None or deleted: every answer is the one the full lookup gives.
    2. What ``read`` answers is not changed by any later request: a copy, a view of
       bytes nothing changes (a checked record, a hole, a block the write buffer keeps
       as the writer's immutable bytes), or the scratch buffer, which only a read that
       does not wait fills. pyfuse3 copies the answer into its reply as soon as the
       handler returns, so views cost no copy and never race a write.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False   # direct_io everywhere: no kernel page cache at all

    def __init__(self, managers: Mapping[str, VolumeManager],
                 options: FuseOptions | None = None) -> None:
        super().__init__()
        self.managers = managers
        self.options = options or FuseOptions()
        self.inodes = Inodes()
        self.placeholders: dict[tuple[str, str], Placeholder] = {}
        self.handles: dict[int, Handle] = {}
        # inode -> the openers it is registered with and its opener (while it has handles)
        self._openers: dict[int, tuple[Openers, Opener]] = {}
        self._revoked: set[int] = set()   # handles revoked by force, until released
        self._next_fh = 1
        self._times: dict[int, Times] = {}
        self._started_ns = time.time_ns()
        # Serialises namespace changes (create, resize, delete) made through the mount.
        self._namespace = trio.Lock()
        # The buffer large reads are answered in when they need no wait (see ``read``).
        self._scratch = bytearray(MAX_REPLY)
        self.initialized = trio.Event()   # set when the kernel's INIT has been answered

    def init(self) -> None:
        self.initialized.set()

    # ---- resolving --------------------------------------------------------------------------
    def _manager(self, pool: str) -> VolumeManager:
        vm = self.managers.get(pool)
        if vm is None:
            raise _fail(errno.ENOENT)
        return vm

    def _live(self, node: Node) -> Node:
        """``node`` if it still exists (volumes and snapshots can change behind our back,
        through the control API), with volume/placeholder resolved; else ENOENT."""
        if node.kind == "root":
            return node
        vm = self._manager(node.pool)
        if node.kind in ("pool", "snapdir"):
            return node
        if node.kind in ("volume", "placeholder"):
            if vm.has(node.name):
                return node if node.kind == "volume" else Node("volume", node.pool, node.name)
            if (node.pool, node.name) in self.placeholders:
                return Node("placeholder", node.pool, node.name)
            raise _fail(errno.ENOENT)
        vol, _at, snap = node.name.partition("@")
        if vm.has_snapshot(vol, snap):
            return node
        raise _fail(errno.ENOENT)

    def _ino(self, node: Node) -> int:
        # Volumes and placeholders share an inode: a placeholder becomes its volume.
        if node.kind == "placeholder":
            node = Node("volume", node.pool, node.name)
        return self.inodes.ino(node)

    def _volume(self, node: Node) -> Volume:
        return self._manager(node.pool).get(node.name)

    def _children(self, node: Node) -> list[Node]:
        if node.kind == "root":
            return [Node("pool", p) for p in sorted(self.managers)]
        vm = self._manager(node.pool)
        if node.kind == "pool":
            names = set(vm.names())
            out = [Node("snapdir", node.pool)]
            pending = {n for p, n in self.placeholders if p == node.pool} - names
            out += [Node("volume", node.pool, n) for n in sorted(names)]
            out += [Node("placeholder", node.pool, n) for n in sorted(pending)]
            return out
        if node.kind == "snapdir":
            return [Node("snapshot", node.pool, f"{v}@{s}") for v in vm.names()
                    for s in vm.snapshot_names(v)]
        raise _fail(errno.ENOTDIR)

    def _child(self, parent: Node, name: str) -> Node:
        if parent.kind == "root":
            if name in self.managers:
                return Node("pool", name)
            raise _fail(errno.ENOENT)
        if parent.kind == "pool":
            if name == SNAPSHOT_DIR:
                return Node("snapdir", parent.pool)
            return self._live(Node("volume", parent.pool, name))
        if parent.kind == "snapdir":
            if "@" not in name:
                raise _fail(errno.ENOENT)
            return self._live(Node("snapshot", parent.pool, name))
        raise _fail(errno.ENOTDIR)

    # ---- attributes -------------------------------------------------------------------------
    def _times_of(self, ino: int) -> Times:
        t = self._times.get(ino)
        if t is None:
            t = self._times[ino] = Times(self._started_ns, self._started_ns, self._started_ns)
        return t

    def _touch(self, ino: int, *, data: bool = True) -> None:
        now = time.time_ns()
        t = self._times_of(ino)
        if data:
            t.mtime_ns = now
        t.ctime_ns = now

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        ino = self._ino(node)
        a.st_ino = ino
        a.generation = 0
        # No kernel caching of names or attributes: volumes are created, resized and
        # deleted through the control API too, and must show up here at once.
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_uid = self.options.uid
        a.st_gid = self.options.gid
        t = self._times_of(ino)
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = t.atime_ns, t.mtime_ns, t.ctime_ns
        a.st_blksize = STATFS_BLOCK
        if node.kind in ("root", "pool", "snapdir"):
            writable = node.kind == "pool"
            a.st_mode = stat.S_IFDIR | (0o755 if writable else 0o555)
            a.st_nlink = 2
            a.st_size = 0
            a.st_blocks = 0
            return a
        a.st_nlink = 1
        if node.kind == "placeholder":
            a.st_mode = stat.S_IFREG | self.options.mode
            a.st_size = a.st_blocks = 0
            return a
        if node.kind == "volume":
            vol = self._volume(node)
        else:
            vname, _at, snap = node.name.partition("@")
            vol = self._manager(node.pool).snapshot_volume(vname, snap)
        # Mode and I/O size from what the volume offers (a snapshot view is read-only).
        caps = vol.capabilities()
        a.st_mode = stat.S_IFREG | (self.options.mode & (0o444 if caps.read_only else 0o7777))
        a.st_size = vol.size
        a.st_blksize = caps.preferred_block
        # du and ls -s show thin usage: the bytes of blocks that hold data. (Asked for on
        # every lookup and getattr, so counted from the map's leaves, not by a walk.)
        a.st_blocks = -(-vol.mapped_bytes() // 512)
        return a

    @edge
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(self._live(self.inodes.node(inode)))

    @edge
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        parent = self._live(self.inodes.node(parent_inode))
        return self._attr(self._child(parent, _decode(name)))

    @edge
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._live(self.inodes.node(inode))
        if fields.update_mode or fields.update_uid or fields.update_gid:
            # Owner and mode come from the daemon's configuration (fuse.uid/gid/mode).
            raise _fail(errno.EPERM)
        if node.kind in ("snapshot", "snapdir"):
            raise _fail(errno.EROFS)
        if node.kind in ("root", "pool") and fields.update_size:
            raise _fail(errno.EISDIR)
        if fields.update_size:
            node = await self._truncate(node, attr.st_size, keep=fh)
            self._touch(inode)
        t = self._times_of(inode)
        if fields.update_atime:
            t.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            t.mtime_ns = attr.st_mtime_ns
        if fields.update_atime or fields.update_mtime:
            self._touch(inode, data=False)
        return self._attr(node)

    async def _truncate(self, node: Node, size: int, *, keep: int | None,
                        grow_only: bool = False) -> Node:
        """Give a volume file a new size: create, resize or (size 0) delete, as the
        control API would. Returns the node as it is afterwards. With ``grow_only`` a
        volume that is already at least ``size`` is left alone (concurrent writes past the
        end must never shrink what another one grew)."""
        if size < 0:
            raise _fail(errno.EINVAL)
        ino = self._ino(node)
        try:
            return await self._resize(node, size, keep=keep, grow_only=grow_only)
        finally:
            self._track(ino)   # a placeholder became a volume, or a volume a placeholder

    async def _resize(self, node: Node, size: int, *, keep: int | None,
                      grow_only: bool) -> Node:
        async with self._namespace:
            node = self._live(node)
            vm = self._manager(node.pool)
            if grow_only and node.kind == "volume" and vm.get(node.name).size >= size:
                return node
            if node.kind == "placeholder":
                if size == 0:
                    return node
                ph = self.placeholders[(node.pool, node.name)]
                await vm.create(node.name, size, block_size=ph.block_size,
                                profile=ph.profile, compression=ph.compression)
                del self.placeholders[(node.pool, node.name)]
                return Node("volume", node.pool, node.name)
            vol = vm.get(node.name)
            if size == vol.size:
                return node
            if size == 0:
                # A file truncated to nothing: the volume goes (as `volume delete`, which
                # refuses while snapshots exist) and a placeholder with its settings stays.
                self._refuse_if_open(node, keep=keep)
                ph = Placeholder(vol.block_size, str(vol.profile), vol.compression)
                await vm.delete(node.name, ignore=self._own(node))
                self.placeholders[(node.pool, node.name)] = ph
                return Node("placeholder", node.pool, node.name)
            # A truncate is as explicit as `volume resize --allow-shrink`.
            await vm.resize(node.name, size, allow_shrink=True)
            return node

    def _refuse_if_open(self, node: Node, *, keep: int | None = None) -> None:
        ino = self._ino(node)
        others = [fh for fh, h in self.handles.items() if h.ino == ino and fh != keep]
        if others:
            raise Busy(f"{node.pool}/{node.name} is open through the FUSE mount")

    def _own(self, node: Node) -> Sequence[Opener]:
        """This mount's opener of ``node`` (a change made through the mount keeps its
        handles working, so they do not make the volume busy for it)."""
        mine = self._openers.get(self._ino(node))
        return (mine[1],) if mine is not None else ()

    def _track(self, ino: int) -> None:
        """Keep the opener of ``ino`` in step with its handles: registered with the
        volume's (or snapshot's) openers while it has any, naming how many (openers
        invariant 1)."""
        handles = [h for h in self.handles.values() if h.ino == ino]
        target: Openers | None = None
        if handles and handles[0].snapshot is not None:
            target = handles[0].snapshot.openers
        elif handles:
            try:
                node = self._live(self.inodes.node(ino))
                if node.kind == "volume":
                    target = self._volume(node).openers
            except (pyfuse3.FUSEError, StorageError):
                target = None
        mine = self._openers.get(ino)
        if mine is not None and mine[0] is not target:
            mine[0].remove(mine[1])
            del self._openers[ino]
            mine = None
        if target is None:
            return
        if mine is None:
            opener = target.add(Opener("FUSE", "", partial(self._revoke, ino)))
            mine = self._openers[ino] = (target, opener)
        n = len(handles)
        mine[1].client = f"{n} open handle{'s' if n != 1 else ''}"

    async def _revoke(self, ino: int) -> None:
        """Forced off (its volume is deleted, renamed or rolled back by force): the
        handles of ``ino`` are dropped; the kernel's next request on them answers EBADF."""
        gone = [fh for fh, h in self.handles.items() if h.ino == ino]
        for fh in gone:
            del self.handles[fh]
        self._revoked.update(gone)
        log.info("fuse: revoked %d open handle(s) of inode %d (forced)", len(gone), ino)
        self._track(ino)
        await trio.lowlevel.checkpoint()

    # ---- directories ------------------------------------------------------------------------
    @edge
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._live(self.inodes.node(inode))
        if node.kind not in ("root", "pool", "snapdir"):
            raise _fail(errno.ENOTDIR)
        return inode

    @edge
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self._children(self._live(self.inodes.node(fh)))
        for i in range(start_id, len(children)):
            child = children[i]
            name = child.name if child.kind in ("volume", "placeholder", "snapshot") else (
                SNAPSHOT_DIR if child.kind == "snapdir" else child.pool)
            try:
                attr = self._attr(child)
            except (StorageError, pyfuse3.FUSEError):
                continue   # went away while listing
            if not pyfuse3.readdir_reply(token, name.encode(), attr, i + 1):
                break

    @edge
    async def releasedir(self, fh: int) -> None:
        return None

    @edge
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # pyfuse3 does not say which directory was asked about, so this is the sum of
        # every pool (with one pool, exactly that pool).
        size = free = files = 0
        for name in list(self.managers):
            vm = self.managers[name]
            st = vm.pool.statistics()
            size += st.capacity_bytes
            free += st.free_bytes
            files += len(vm.names())
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = STATFS_BLOCK
        s.f_blocks = size // STATFS_BLOCK
        s.f_bfree = s.f_bavail = free // STATFS_BLOCK
        s.f_files = files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = NAME_MAX
        return s

    # ---- namespace changes ------------------------------------------------------------------
    def _pool_dir(self, parent_inode: int) -> Node:
        parent = self._live(self.inodes.node(parent_inode))
        if parent.kind == "snapdir":
            raise _fail(errno.EROFS)
        if parent.kind != "pool":
            # The root holds pools, which are made with `storagectl pool create`.
            raise _fail(errno.EPERM)
        return parent

    @edge
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._pool_dir(parent_inode)
        vname = _decode(name)
        if not stat.S_ISREG(mode):
            raise _fail(errno.EPERM)
        check_volume_name(vname)
        async with self._namespace:
            vm = self._manager(parent.pool)
            if vm.has(vname) or (parent.pool, vname) in self.placeholders:
                raise AlreadyExists(f"{parent.pool}/{vname} exists")
            self.placeholders[(parent.pool, vname)] = Placeholder()
        node = Node("placeholder", parent.pool, vname)
        self._touch(self._ino(node))
        log.info("fuse: created %s/%s (a placeholder until it has a size)", parent.pool,
                 vname)
        return self._open_handle(node, flags), self._attr(node)

    @edge
    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        parent = self._pool_dir(parent_inode)
        node = self._child(parent, _decode(name))
        if node.kind == "snapdir":
            raise _fail(errno.EISDIR)
        async with self._namespace:
            node = self._live(node)
            self._refuse_if_open(node)
            if node.kind == "placeholder":
                del self.placeholders[(node.pool, node.name)]
            else:
                await self._manager(node.pool).delete(node.name)

    @edge
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_parent = self._pool_dir(parent_inode_old)
        new_parent = self._pool_dir(parent_inode_new)
        if old_parent.pool != new_parent.pool:
            raise _fail(errno.EXDEV)   # a volume lives in its pool
        old, new = _decode(name_old), _decode(name_new)
        check_volume_name(new)
        async with self._namespace:
            node = self._live(self._child(old_parent, old))
            if old == new:
                return
            vm = self._manager(node.pool)
            if vm.has(new):
                raise _fail(errno.EOPNOTSUPP)   # replacing a volume would delete it
            if flags & pyfuse3.RENAME_EXCHANGE:
                raise _fail(errno.EINVAL)
            if node.kind != "placeholder":
                # The same operation as `storagectl volume rename`.
                if flags & pyfuse3.RENAME_NOREPLACE and (node.pool, new) in self.placeholders:
                    raise _fail(errno.EEXIST)
                self.placeholders.pop((node.pool, new), None)
                await vm.rename(old, new, ignore=self._own(node))
                self.inodes.rekey(Node("volume", node.pool, old),
                                  Node("volume", node.pool, new))
                return
            if flags & pyfuse3.RENAME_NOREPLACE and (node.pool, new) in self.placeholders:
                raise _fail(errno.EEXIST)
            if flags & pyfuse3.RENAME_EXCHANGE:
                raise _fail(errno.EINVAL)
            self.placeholders[(node.pool, new)] = self.placeholders.pop((node.pool, old))
            self.inodes.rekey(Node("volume", node.pool, old), Node("volume", node.pool, new))

    # Directories, links, special files and xattrs have no meaning here.
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes,
                    ctx: pyfuse3.RequestContext) -> None:
        raise _fail(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    @edge
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise _fail(errno.ENOTSUP)

    @edge
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise _fail(pyfuse3.ENOATTR)

    @edge
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    @edge
    async def removexattr(self, inode: int, name: bytes,
                          ctx: pyfuse3.RequestContext) -> None:
        raise _fail(pyfuse3.ENOATTR)

    # ---- files ------------------------------------------------------------------------------
    def _open_handle(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        snap: Volume | None = None
        if node.kind == "snapshot":
            if writable:
                raise ReadOnly(f"snapshot {node.pool}/{node.name} is read-only")
            vname, _at, sname = node.name.partition("@")
            snap = self._manager(node.pool).snapshot_volume(vname, sname)
        elif node.kind not in ("volume", "placeholder"):
            raise _fail(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        ino = self._ino(node)
        self.handles[fh] = Handle(ino, writable, bool(flags & (os.O_SYNC | os.O_DSYNC)), snap,
                                  snap)
        self._track(ino)
        # FOPEN_DIRECT_IO: no page cache, so FUSE and NBD always see the same bytes.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @edge
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        node = self._live(self.inodes.node(inode))
        if flags & os.O_TRUNC and node.kind == "snapshot":
            raise _fail(errno.EROFS)
        fi = self._open_handle(node, flags)
        if flags & os.O_TRUNC and node.kind == "volume":
            try:
                await self._truncate(node, 0, keep=fi.fh)
            except BaseException:
                del self.handles[fi.fh]
                self._track(inode)
                raise
            self._touch(inode)
        return fi

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise _fail(errno.EBADF)
        return h

    # The request paths. ``read`` and ``write`` answer what needs no wait at once, on the
    # handle's volume (invariant 1), with the errors ``edge`` gives but without its extra
    # coroutine; everything else takes the full path (``_read``, ``_write``).
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles.get(fh)
        vol = h.volume if h is not None else None
        if vol is not None and not vol.deleted and off >= 0 and 0 < size <= vol.size - off:
            try:
                if size <= vol.block_size:
                    # A record-cache hit in one call (the commonest 4 KiB random read).
                    hit = vol.read_cached_nowait(off, size)
                    if hit is not None:
                        return hit  # type: ignore[return-value]  # any contiguous buffer
                    # Cached, buffered or a hole. Within one block that is one part, and
                    # a view of an immutable block rather than a copy (a block a write
                    # patches in place comes copied): like the scratch buffer below, it
                    # is copied into pyfuse3's reply as soon as this coroutine returns.
                    parts = vol.read_vectored_nowait(off, size, view=True)
                    if parts is not None:
                        return cast(bytes, parts[0]) if len(parts) == 1 else b"".join(parts)
                elif size <= MAX_REPLY:
                    # Whole blocks read straight into the scratch buffer, not joined.
                    # Sharing it is safe: pyfuse3 copies the answer into its reply as
                    # soon as this coroutine returns, and nothing here waits between
                    # filling it and returning.
                    view = memoryview(self._scratch)[:size]
                    if vol.readinto_nowait(off, view):
                        # pyfuse3 takes any contiguous buffer; its stub says bytes.
                        return cast(bytes, view)
            except Exception as e:
                raise _answer("read", e) from None
        return await self._read(fh, off, size)

    @edge
    async def _read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.snapshot is not None:
            vol = h.snapshot
        else:
            node = self._live(self.inodes.node(h.ino))
            if node.kind == "placeholder":
                return b""
            vol = h.volume = self._volume(node)
        if off >= vol.size or size <= 0:
            return b""
        size = min(size, vol.size - off)
        # Cached blocks are answered without a wait.
        parts = vol.read_vectored_nowait(off, size)
        if parts is None:
            return await vol.read(off, size)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles.get(fh)
        vol = h.volume if h is not None else None
        if vol is not None and h is not None and h.writable and not h.sync \
                and not vol.deleted and off >= 0 and 0 < len(buf) <= vol.size - off:
            try:
                # A write that needs no wait (blocks whole, buffered or cached).
                done = vol.write_nowait(off, buf)
            except Exception as e:
                raise _answer("write", e) from None
            if done:
                t = self._times.get(h.ino)
                if t is None:
                    self._touch(h.ino)
                else:   # _touch, one call less per write
                    t.mtime_ns = t.ctime_ns = time.time_ns()
                return len(buf)
        return await self._write(fh, off, buf)

    @edge
    async def _write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if h.snapshot is not None or not h.writable:
            raise _fail(errno.EROFS if h.snapshot is not None else errno.EBADF)
        if not buf:
            return 0
        node = self._live(self.inodes.node(h.ino))
        end = off + len(buf)
        if node.kind == "placeholder" or end > self._volume(node).size:
            # Writing past the end grows the volume (sizes are whole 512-byte sectors).
            node = await self._truncate(node, _round_up(end), keep=fh, grow_only=True)
        vol = h.volume = self._volume(node)
        # A write that needs no wait (blocks whole, buffered or cached) is taken at once.
        if h.sync or not vol.write_nowait(off, buf):
            await vol.write(off, buf, fua=h.sync)
        self._touch(h.ino)
        return len(buf)

    @edge
    async def flush(self, fh: int) -> None:
        # close(2): nothing to do. Durability is fsync's job (a disk's cache, DESIGN §4).
        # A handle revoked by force closes without an error.
        if fh not in self._revoked:
            self._handle(fh)

    @edge
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if h.snapshot is not None:
            return
        node = self._live(self.inodes.node(h.ino))
        if node.kind == "volume":
            await self._volume(node).flush()

    @edge
    async def release(self, fh: int) -> None:
        self._revoked.discard(fh)
        h = self.handles.pop(fh, None)
        if h is not None:
            self._track(h.ino)

    # ---- the daemon's side ------------------------------------------------------------------
    async def flush_all(self) -> None:
        """Make every write made through the mount durable (before unmounting)."""
        for name in list(self.managers):
            try:
                await self.managers[name].flush_all()
            except StorageError as e:
                log.error("fuse: flushing pool %s failed: %s", name, e.message)


__all__ = ["FuseOptions", "VolumeFS", "edge", "to_errno"]
