"""Creating a pool on a RADOS pool and importing one from it (``Pool.create_rados`` /
``Pool.open_rados`` delegate here; pool/importer.py is the member-device counterpart).

Invariants (DESIGN numbers in brackets):

1. Refusals change nothing: a profile other than ``plain``, a bad name or extent size,
   a name the RADOS pool already holds (AlreadyExists), a RADOS pool without a stated
   capacity, a name it does not hold (NotFound), a pool another live daemon owns
   (PoolOwned): each is raised before anything is written under the RADOS pool [9, 10].
2. Nothing of a pool is written before its ownership lock is taken (owner invariant 1);
   a takeover fences the previous owner first (owner invariant 3) [10].
3. An import takes the committed superblock and replays only whole journal entries after
   it, in txg order (meta invariant 2), then deletes the segment objects the state does
   not reference (``RadosStore.sweep``) and checkpoints [1, 2].
4. A create names the pool in the directory only after its first checkpoint is
   committed: a crash before leaves objects under an unnamed uuid, never a named pool
   without a superblock (backend invariant 3). Naming is atomic (backend invariant 4):
   a create that lost a race for its name deletes every object it wrote, then raises
   AlreadyExists.
5. On any failure after the connection opened, the lock (if taken) is released and the
   connection closed: a failed create/open leaves no client behind.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from pool import labels
from pool import owner as owners
from pool.errors import AlreadyExists, ImportFailed, InvalidArgument, StorageError
from pool.layout import MAX_EXTENT, MIN_EXTENT, Layout, new_uuid
from pool.maps import Node
from pool.metastore import MetaStore
from pool.profile import Profile
from pool.rados import destroy as destroying
from pool.rados.backend import (
    OBJECT_KINDS,
    NodeRef,
    RadosCommitMeta,
    RadosParts,
    directory,
    lookup,
    name_pool,
    read_checkpoint,
)
from pool.rados.conn import Connection
from pool.rados.meta import RadosMeta, RadosSuperblock
from pool.rados.owner import OwnershipLock
from pool.rados.store import RadosStore, refuse_profile
from pool.rados.target import RadosTarget
from pool.state import PoolState, iter_ops
from pool.tuning import PoolTuning

if TYPE_CHECKING:
    from pool.pool import Pool

log = logging.getLogger(__name__)

# A pool on RADOS has no metadata area; Pool still carries a Layout for its extent size
# (the segment object's capacity) and an empty MetaStore (no member holds metadata).
_NO_AREA = 256 * 1024


def layout_for(extent_size: int) -> Layout:
    if extent_size & (extent_size - 1) or not MIN_EXTENT <= extent_size <= MAX_EXTENT:
        raise InvalidArgument(
            f"extent size must be a power of two between {MIN_EXTENT // 1024}K and "
            f"{MAX_EXTENT // (1 << 20)}M, got {extent_size}")
    return Layout(extent_size, _NO_AREA, _NO_AREA)


async def connect(target: RadosTarget) -> Connection:
    return await Connection.open(target.pool, target.conf, target.client)


async def create(cls: type[Pool], name: str, target: RadosTarget, *, profile: str,
                 extent_size: int, claim: owners.Claim,
                 tuning: PoolTuning | None) -> Pool:
    """``Pool.create_rados`` (invariants 1, 2, 4, 5)."""
    labels.check_name(name)
    prof = Profile.parse(profile)
    refuse_profile(prof, target.pool)
    layout = layout_for(extent_size)
    conn = await connect(target)
    lock: OwnershipLock | None = None
    try:
        if name in await directory(conn):
            raise AlreadyExists(f"RADOS pool {target.pool} already holds a storaged pool "
                                f"named {name!r}")
        pool_uuid = new_uuid()
        state = PoolState(pool_uuid, name, extent_size, str(prof), [])
        lock = OwnershipLock(conn, pool_uuid, claim.owner)
        meta = RadosMeta(conn, lock, pool_uuid)
        sb = RadosSuperblock(pool_uuid, 0, 0)
        pool = _build(cls, state, layout, target, conn, lock, meta, sb, tuning)
        store = pool.store
        assert isinstance(store, RadosStore)
        await store.start()                   # reads only: refuses a pool without room
        await lock.acquire(create=True)
        await meta.format(sb)
        await pool.txn.checkpoint()
        try:
            await name_pool(conn, name, pool_uuid)
        except AlreadyExists:             # another create took the name meanwhile
            log.info("pool %s (%s): another create named it first; deleting what this "
                     "one wrote", name, pool_uuid)
            with trio.CancelScope(shield=True):
                await purge(conn, lock, pool_uuid)
            raise
    except BaseException:
        await _abandon(conn, lock)
        raise
    log.info("created pool %s (%s) on RADOS pool %s, extent size %d", name, pool_uuid,
             target.pool, extent_size)
    return pool


class Phases:
    """Where an import's time goes (logged with it: the takeover budget, issue 24)."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.parts: list[tuple[str, float]] = []

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.parts.append((name, now - self.last))
        self.last = now

    def render(self) -> str:
        return (f"{self.last - self.start:.2f} s ("
                + ", ".join(f"{n} {s:.2f}" for n, s in self.parts) + ")")


async def open_pool(cls: type[Pool], target: RadosTarget, name: str, *, takeover: bool,
                    claim: owners.Claim, tuning: PoolTuning | None) -> Pool:
    """``Pool.open_rados`` (invariants 1-3, 5)."""
    phase = Phases()
    conn = await connect(target)
    phase("connect")
    lock: OwnershipLock | None = None
    try:
        pool_uuid = await lookup(conn, name)
        lock = OwnershipLock(conn, pool_uuid, claim.owner)
        meta = RadosMeta(conn, lock, pool_uuid)
        phase("lookup")
        await lock.acquire(takeover=takeover)
        phase("lock" + (" (fencing)" if lock.fenced_others else ""))
        sb = await meta.read_superblock()
        state_blob, nodes, sizes, blobs = await read_checkpoint(meta, sb)
        phase("checkpoint")
        state = PoolState.from_json(state_blob)
        if state.uuid != pool_uuid or state.members:
            raise ImportFailed(f"{lock.oid}: its checkpoint is not of a storaged pool on "
                               f"RADOS (uuid {state.uuid})")
        for nid, blob in blobs.items():
            try:
                state.forest.nodes[nid] = Node.deserialize(blob)
            except ValueError as e:
                raise ImportFailed(f"pool {name}: map node {nid} is unreadable: {e}") from e
        state.forest.recount()
        replayed = await meta.read_journal(sb.txg)
        phase("journal")
        pool = _build(cls, state, layout_for(state.extent_size), target, conn, lock, meta,
                      sb, tuning, nodes, sizes)
        for txg, payload in replayed:
            for op in iter_ops(payload):
                pool.state.apply(op)
            pool.state.txg = txg
        phase("replay")
        store = pool.store
        assert isinstance(store, RadosStore)
        await store.start()
        phase("store start")
        pool.reap()
        await store.sweep()
        phase("sweep")
        await pool.txn.checkpoint()
        phase("checkpoint write")
        assert pool.rados is not None
        stale = await meta.orphans(pool.rados.commit.sb, OBJECT_KINDS)
        await meta.delete_blobs(stale)
        phase("orphans")
    except BaseException:
        await _abandon(conn, lock)
        raise
    log.info("imported pool %s (%s) from RADOS pool %s: generation %d, txg %d, %d journal "
             "entries replayed%s in %s", name, pool_uuid, target.pool, state.generation,
             state.txg, len(replayed), " (taken over)" if lock.fenced_others else "",
             phase.render())
    return pool


def _build(cls: type[Pool], state: PoolState, layout: Layout, target: RadosTarget,
           conn: Connection, lock: OwnershipLock, meta: RadosMeta, sb: RadosSuperblock,
           tuning: PoolTuning | None, nodes: dict[int, NodeRef] | None = None,
           sizes: dict[tuple[int, int], int] | None = None) -> Pool:
    dl = (tuning or PoolTuning()).deadlines()
    commit = RadosCommitMeta(meta, sb, state.forest, nodes, sizes)
    return cls(state, layout, [], MetaStore(layout, [], state.uuid, dl), None, tuning,
               rados=RadosParts(target, conn, lock, meta, commit))


async def _abandon(conn: Connection, lock: OwnershipLock | None) -> None:
    """Invariant 5: release what a failed create/open took."""
    with trio.CancelScope(shield=True):
        if lock is not None and lock.held:
            try:
                await lock.release()
            except StorageError as e:
                log.warning("releasing %s after a failed import: %s", lock.oid, e.message)
        await conn.close()


async def purge(conn: Connection, lock: OwnershipLock, pool_uuid: str) -> None:
    """Delete every object of an unnamed pool this client created and holds (invariant
    4); a failure leaves orphans (an unnamed uuid), never a named pool."""
    try:
        await destroying.delete_objects(conn, await destroying.pool_objects(conn, pool_uuid))
        await destroying.drop_header(conn, lock)
    except StorageError as e:
        log.warning("pool %s lost the race for its name; deleting its objects: %s",
                    pool_uuid, e.message)


async def destroy(pool: Pool, progress: destroying.Progress | None) -> None:
    """``Pool.destroy`` on RADOS, with the runner stopped and the lock held
    (pool/rados/destroy.py)."""
    r = pool.rados
    assert r is not None
    n = await destroying.destroy(r.conn, r.lock, pool.name, pool.uuid, progress)
    log.info("destroyed pool %s (%s) in RADOS pool %s: %d objects", pool.name, pool.uuid,
             r.target.pool, n)


async def destroy_named(target: RadosTarget, name: str, *, claim: owners.Claim,
                        progress: destroying.Progress | None = None) -> None:
    """Finish the interrupted destroy of pool ``name`` (destroy invariant 3); PoolOwned
    while another live daemon holds it, refused if the pool is whole."""
    conn = await connect(target)
    try:
        n = await destroying.destroy_named(
            conn, lambda u: OwnershipLock(conn, u, claim.owner), name, progress)
    finally:
        with trio.CancelScope(shield=True):
            await conn.close()
    log.info("finished destroying pool %s in RADOS pool %s: %d objects", name, target.pool,
             n)
