"""Who owns a pool on RADOS: an exclusive lock on the pool's header object, renewed, with
blocklist fencing for a takeover (DESIGN invariant 10, the way RBD's exclusive-lock works).

The header object ``<pool uuid>.header`` carries:
- the cls_lock lock ``storaged`` (exclusive, cookie = the daemon instance, a duration that
  the owner renews every ``interval``; description = the owner as JSON);
- the xattr ``storaged.owner``: the same JSON (host, host id, daemon instance, pid, the
  client's address and id), written once the lock is held, removed on a clean release. It
  outlives a lock that expired while its owner hung, so the next owner still knows whom to
  fence.

Invariants:

1. Nothing is written under the pool's prefix before ``acquire`` returned; after it, every
   metadata write on the header carries ``guard`` (cls_lock assert_locked) so it fails
   whole unless this client still holds the lock.
2. ``acquire`` takes the lock only when it is free or expired, when the holder is an earlier
   run of this same daemon (same host id and instance: the state directory admits one
   daemon, so that run is dead), or when the operator asked for a takeover. Any other
   holder: ``PoolOwned`` naming it, and nothing was written.
3. Fence before take: the client that holds the lock, or that the owner record names, is
   blocklisted (``osd blocklist add`` of its address) and this client waits for the OSD
   map that carries the blocklist before breaking the lock or writing; so an old owner
   that wakes up cannot write anything (its ops fail with ESHUTDOWN).
4. Lost is final: when a renewal fails for good (the lock is gone or someone else's, the
   client is fenced, or it could not be renewed within the lock's duration), ``lost`` holds
   why, the connection is fenced (no call reaches librados any more) and ``on_lost`` is
   called once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio

from pool.errors import Busy, NotFound, StorageError
from pool.owner import Owner
from pool.rados import clslock
from pool.rados.conn import Connection, Fenced

log = logging.getLogger(__name__)

LOCK_NAME = "storaged"
OWNER_XATTR = "storaged.owner"
DEFAULT_DURATION = 30.0     # seconds a lock lives without renewal
DEFAULT_INTERVAL = 5.0      # seconds between renewals


def header_oid(pool_uuid: str) -> str:
    return f"{pool_uuid}.header"


class PoolOwned(Busy):
    """The pool is held by another live daemon (invariant 2)."""


@dataclass(frozen=True, slots=True)
class Holder:
    """An owner as recorded in the lock description and the owner xattr."""

    host: str
    host_id: str
    instance: str
    pid: int
    addr: str           # the librados client's address: what a takeover blocklists
    client_id: int      # client.<id>: what break_lock names

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return Holder(str(d["host"]), str(d["host_id"]), str(d["instance"]),
                          int(d["pid"]), str(d["addr"]), int(d["client_id"]))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        return (f"host {self.host} (id {self.host_id}), pid {self.pid}, daemon "
                f"{self.instance}, RADOS client.{self.client_id} at {self.addr}")


class OwnershipLock:
    """The ownership of one storaged pool (``pool_uuid``) through connection ``conn``."""

    def __init__(self, conn: Connection, pool_uuid: str, me: Owner,
                 duration: float = DEFAULT_DURATION, interval: float = DEFAULT_INTERVAL,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.conn = conn
        self.oid = header_oid(pool_uuid)
        self.me = Holder(me.host, me.host_id, me.instance, me.pid, conn.addrs,
                         conn.client_id)
        self.cookie = me.instance
        self.duration = duration
        self.interval = interval
        self.on_lost = on_lost
        self.held = False
        self.lost: str | None = None
        self.fenced_others: list[Holder] = []
        self._renewed = 0.0
        conn.watch_fenced(self._lose)

    # ---- reading who holds it -------------------------------------------------------
    async def lockers(self) -> list[clslock.Locker]:
        """The current holders of the lock (expired ones included until someone locks)."""
        def get() -> list[clslock.Locker]:
            _ret, out = self.conn.ioctx.execute(self.oid, "lock", "get_info",
                                                clslock.get_info_op(LOCK_NAME), length=65536)
            return clslock.parse_get_info(bytes(out))[0]
        try:
            return await self.conn.run("lock", f"list lockers of {self.oid}", get)
        except NotFound:
            return []

    async def recorded_owner(self) -> Holder | None:
        """The owner the header's owner xattr names, if any."""
        rados = self.conn.rados

        def get() -> bytes | None:
            try:
                return bytes(self.conn.ioctx.get_xattr(self.oid, OWNER_XATTR))
            except (rados.NoData, rados.ObjectNotFound):
                return None
        raw = await self.conn.run("read", f"read owner record of {self.oid}", get)
        return Holder.from_json(raw.decode(errors="replace")) if raw else None

    # ---- taking it ----------------------------------------------------------------------
    async def acquire(self, *, takeover: bool = False, create: bool = False) -> None:
        """Take the lock (invariants 2 and 3). ``create``: the header may not exist yet
        (pool creation); otherwise a missing header is NotFound and nothing is written."""
        if not create:
            await self.conn.run("read", f"stat {self.oid}", self.conn.ioctx.stat, self.oid)
        for _attempt in range(3):
            try:
                await self._lock(0)
                break
            except Busy:
                pass
            holders = await self.lockers()
            if not holders:
                continue                    # released between our try and the listing
            for locker in holders:
                holder = Holder.from_json(locker.description)
                earlier_self = holder is not None and (
                    holder.host_id, holder.instance) == (self.me.host_id, self.me.instance)
                if not (takeover or earlier_self):
                    who = (holder.describe() if holder is not None
                           else f"RADOS client.{locker.client_id} ({locker.description!r})")
                    raise PoolOwned(f"pool {self.oid.removesuffix('.header')} is owned by "
                                    f"{who}; import with --takeover to fence it and take "
                                    f"the pool over")
                await self._fence(holder, locker.client_id)
                await self.conn.run(
                    "lock", f"break the lock of client.{locker.client_id} on {self.oid}",
                    self.conn.ioctx.execute, self.oid, "lock", "break_lock",
                    clslock.break_lock_op(LOCK_NAME, locker.client_id, locker.cookie))
        else:
            raise PoolOwned(f"could not take the lock on {self.oid}: other daemons keep "
                            f"taking it")
        # A lock that expired while its owner hung: fence the owner the record names.
        previous = await self.recorded_owner()
        if previous is not None and previous.addr != self.me.addr:
            await self._fence(previous, previous.client_id)
        await self._write_record()
        self.held = True
        log.info("took pool header %s (%s)", self.oid,
                 "takeover" if self.fenced_others else "free")

    async def _lock(self, flags: int) -> None:
        await self.conn.run("lock", f"lock {self.oid}", self.conn.ioctx.lock_exclusive,
                            self.oid, LOCK_NAME, self.cookie, self.me.to_json(),
                            int(self.duration), flags)
        self._renewed = time.monotonic()

    async def _fence(self, holder: Holder | None, client_id: int) -> None:
        """Blocklist ``holder``'s client and wait for the OSD map that says so
        (invariant 3). A holder without a readable address cannot be fenced: refuse."""
        if holder is None:
            raise StorageError(f"the lock on {self.oid} is held by client.{client_id}, "
                               f"which did not record its address: cannot fence it")
        if holder.addr == self.me.addr or any(h.addr == holder.addr
                                               for h in self.fenced_others):
            return
        log.warning("fencing the previous owner of %s: %s", self.oid, holder.describe())
        t0 = time.monotonic()
        await self.conn.mon_command({"prefix": "osd blocklist", "blocklistop": "add",
                                     "addr": holder.addr})
        t1 = time.monotonic()
        await self.conn.run("command", "wait for the latest OSD map",
                            self.conn.cluster.wait_for_latest_osdmap)
        log.info("fenced %s in %.2f s (blocklist %.2f s, OSD map %.2f s)", holder.addr,
                 time.monotonic() - t0, t1 - t0, time.monotonic() - t1)
        self.fenced_others.append(holder)

    async def _write_record(self) -> None:
        def write() -> None:
            op = self.conn.ioctx.create_write_op()
            try:
                self.guard(op)
                op.set_xattr(OWNER_XATTR, self.me.to_json().encode())
                self.conn.ioctx.operate_write_op(op, self.oid)
            finally:
                self.conn.ioctx.release_write_op(op)
        await self.conn.run("write", f"write owner record of {self.oid}", write)

    def guard(self, op: Any) -> None:
        """Make write op ``op`` on the header fail whole unless we hold the lock."""
        op.execute("lock", "assert_locked", clslock.assert_locked_op(LOCK_NAME, self.cookie))

    # ---- keeping it ---------------------------------------------------------------------
    async def renew(self) -> None:
        """One renewal; a definitive failure loses the lock (invariant 4)."""
        if self.lost is not None:
            raise Fenced(f"renew {self.oid}: {self.lost}")
        try:
            await self._lock(clslock.LOCK_FLAG_MUST_RENEW)
        except Fenced:
            raise                           # _lose already ran through the watcher
        except (NotFound, Busy) as e:
            self._lose(f"the lock on {self.oid} was taken by another daemon ({e.message})")
            raise Fenced(f"renew {self.oid}: {self.lost}") from e
        except StorageError as e:
            late = time.monotonic() - self._renewed
            if late >= self.duration:
                self._lose(f"the lock on {self.oid} could not be renewed for {late:.0f} s "
                           f"(last error: {e.message})")
                raise Fenced(f"renew {self.oid}: {self.lost}") from e
            log.warning("renewing the lock on %s failed, will retry: %s", self.oid, e)

    def due(self) -> bool:
        """Whether half the lock's duration passed since it was last taken or renewed
        (a writer renews first: the pool may have run without its renewal task)."""
        return time.monotonic() - self._renewed > self.duration / 2

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Renew every ``interval`` until the lock is lost (then return) or cancelled."""
        task_status.started()
        while self.lost is None:
            await trio.sleep(self.interval)
            try:
                await self.renew()
            except Fenced:
                return

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        self.held = False
        log.error("lost ownership of %s: %s", self.oid, reason)
        if self.conn.fenced is None:
            self.conn.fence(reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    async def release(self) -> None:
        """Clean release: remove the owner record, then unlock (so the next owner has
        no one to fence)."""
        if not self.held:
            return

        def rm() -> None:
            op = self.conn.ioctx.create_write_op()
            try:
                self.guard(op)
                op.rm_xattr(OWNER_XATTR)
                self.conn.ioctx.operate_write_op(op, self.oid)
            finally:
                self.conn.ioctx.release_write_op(op)
            self.conn.ioctx.unlock(self.oid, LOCK_NAME, self.cookie)
        await self.conn.run("lock", f"release {self.oid}", rm)
        self.held = False

