"""Destroying a storaged pool on RADOS (``storagectl pool destroy``; issue 24), and purging
the objects of a create that lost its name (backend invariant 4).

A storaged pool is its objects under ``<uuid>.`` (header, checkpoint blobs, segment
objects) and its entry in the directory object. Destroy, holding the pool's ownership
lock throughout:

1. *mark*: one guarded op on the header replaces the superblock by a tombstone
   (``DESTROY_MAGIC``, the pool's name) and clears its omap (generation, journal);
2. *delete* every other object under the prefix (segments, blobs), ``PARALLEL`` at once,
   reporting progress;
3. *drop the header* (one op: the lock assertion, then remove: the lock goes with it);
4. *unname*: remove the directory entry, guarded by the uuid (backend invariant 4).

Invariants:

1. Nothing is deleted before the lock is held by this client and the tombstone written:
   a pool another live daemon owns is refused (PoolOwned) with nothing changed (owner
   invariant 2), and a pool whose header still holds a superblock is destroyed only
   through its open Pool (the daemon checked it has no volumes).
2. A half-destroyed pool never imports: from step 1 on, its header holds the tombstone
   (``RadosMeta.read_superblock`` raises ``Destroying``) or is gone (NotFound), so no
   import can see a pool with missing objects.
3. The directory entry goes last, so an interrupted destroy is found again by name and
   ``destroy_named`` finishes it (same steps; each is idempotent): killed at any point,
   a second destroy leaves no object of the pool and no entry.
4. Other storaged pools in the same RADOS pool are untouched: only objects whose name
   starts with ``<uuid>.`` and the entry naming this uuid are removed.

Cost: librados' Python binding lists objects only for the whole RADOS pool (no prefix or
filter), so a destroy, like ``sweep`` and the orphan scans, reads every object name of the
RADOS pool once (measured: 30k objects in 0.23-0.67 s, one OSD, load 12; so 1-2 s per
100k). Namespaces would bound it but change where existing pools keep their objects; the
layout is kept (docs/INTERNALS.md, "Listing cost").
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pool.errors import NotFound, StorageError
from pool.rados.backend import lookup, unname_pool
from pool.rados.conn import Connection
from pool.rados.meta import DESTROY_MAGIC
from pool.rados.owner import Holder, OwnershipLock, PoolOwned, header_oid

log = logging.getLogger(__name__)

PARALLEL = 8                 # objects deleted at once
Progress = Callable[[int, int], Awaitable[None]]    # (deleted, total)


async def pool_objects(conn: Connection, pool_uuid: str) -> list[str]:
    """Every object of pool ``pool_uuid`` but its header (lists the whole RADOS pool)."""
    prefix, header = f"{pool_uuid}.", header_oid(pool_uuid)

    def scan() -> list[str]:
        return sorted(k for k in (str(o.key) for o in conn.ioctx.list_objects())
                      if k.startswith(prefix) and k != header)
    return await conn.run("read", f"list the objects of pool {pool_uuid}", scan)


async def delete_objects(conn: Connection, oids: list[str],
                         progress: Progress | None = None) -> None:
    """Delete ``oids`` (absent ones are fine), ``PARALLEL`` at once; ``progress(done,
    total)`` after each."""
    rados = conn.rados
    done = 0
    todo = iter(oids)

    def rm(oid: str) -> None:
        with contextlib.suppress(rados.ObjectNotFound):
            conn.ioctx.remove_object(oid)

    async def worker() -> None:
        nonlocal done
        for oid in todo:                   # shared: each object taken by one worker
            await conn.run("write", f"delete {oid}", rm, oid)
            done += 1
            if progress is not None:
                await progress(done, len(oids))
    async with trio.open_nursery() as nursery:
        for _ in range(min(PARALLEL, len(oids))):
            nursery.start_soon(worker)


async def _guarded(conn: Connection, lock: OwnershipLock, what: str,
                   build: Callable[[Any], None]) -> None:
    """One write op on the header carrying the lock assertion (owner invariant 1)."""
    io = conn.ioctx

    def write() -> None:
        op = io.create_write_op()
        try:
            lock.guard(op)
            build(op)
            io.operate_write_op(op, lock.oid)
        finally:
            io.release_write_op(op)
    await conn.run("write", f"{what} {lock.oid}", write)


async def drop_header(conn: Connection, lock: OwnershipLock) -> None:
    """Remove the header in one op with the lock assertion: the lock goes with it."""
    await _guarded(conn, lock, "remove", lambda op: op.remove())
    lock.held = False


async def mark(conn: Connection, lock: OwnershipLock, name: str) -> None:
    """Step 1: the tombstone (invariant 2)."""
    io = conn.ioctx

    def build(op: Any) -> None:
        op.write_full(DESTROY_MAGIC + name.encode())
        io.clear_omap(op)
    await _guarded(conn, lock, "mark destroying", build)


async def destroy(conn: Connection, lock: OwnershipLock, name: str, pool_uuid: str,
                  progress: Progress | None = None) -> int:
    """Steps 1-4 with the lock held (invariants 1-4); how many objects were deleted."""
    if not lock.held:
        raise StorageError(f"destroying pool {name}: its lock {lock.oid} is not held")
    await mark(conn, lock, name)
    oids = await pool_objects(conn, pool_uuid)
    log.info("destroying pool %s (%s): %d objects in RADOS pool %s", name, pool_uuid,
             len(oids), conn.pool)
    await delete_objects(conn, oids, progress)
    await drop_header(conn, lock)
    await unname_pool(conn, name, pool_uuid)
    return len(oids) + 1


async def destroy_named(conn: Connection, lock_for: Callable[[str], OwnershipLock],
                        name: str, progress: Progress | None = None) -> int:
    """Finish an interrupted destroy of pool ``name`` (invariant 3): its header holds the
    tombstone, or is already gone. A header that still holds a superblock is refused
    with nothing written (PoolOwned naming the holder if a daemon holds it; otherwise
    the pool is destroyed through its open Pool: invariant 1); so is a half-destroyed
    pool another live daemon holds (PoolOwned: owner invariant 2)."""
    pool_uuid = await lookup(conn, name)
    lock = lock_for(pool_uuid)
    try:
        head = bytes(await conn.run("read", f"read {lock.oid}", conn.ioctx.read, lock.oid,
                                    len(DESTROY_MAGIC)))
    except NotFound:                       # step 3 done: the rest has no lock to take
        oids = await pool_objects(conn, pool_uuid)
        await delete_objects(conn, oids, progress)
        await unname_pool(conn, name, pool_uuid)
        return len(oids)
    if head and head != DESTROY_MAGIC:
        holders = [Holder.from_json(lk.description) for lk in await lock.lockers()
                   if lk.expiration == 0 or lk.expiration > time.time()]
        if holders:
            who = "; ".join(h.describe() if h else "an unknown client" for h in holders)
            raise PoolOwned(f"pool {name} is owned by {who}: destroy it there")
        raise StorageError(
            f"pool {name} on RADOS pool {conn.pool} is not imported here: import it "
            f"(storagectl pool import {name} --rados {conn.pool}), delete its volumes, "
            f"then destroy it")
    await lock.acquire()
    try:
        return await destroy(conn, lock, name, pool_uuid, progress)
    finally:
        if lock.held:
            with trio.CancelScope(shield=True):
                await lock.release()
