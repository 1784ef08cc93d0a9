"""What a ``Pool`` on RADOS is made of (``RadosParts``), its metadata seam
(``RadosCommitMeta``: pool.metaseam's ``CommitMeta`` on ``RadosMeta``), and the directory
of the storaged pools in one RADOS pool (issue 24; docs/INTERNALS.md "RADOS backend").

Checkpoint blobs (``RadosMeta`` objects ``<uuid>.<kind>.<gen>.<i>``), by kind:

- ``state``: the PoolState JSON (as on devices);
- ``index``: JSON ``{"packs": [[gen, i, bytes], ...], "nodes": [[nid, gen, i, offset,
  length, xxh3], ...]}``: where each map node of the checkpoint is;
- ``pages``: packs, the serialized map nodes a checkpoint wrote, back to back (one object
  per PACK_BYTES). A node lives in the pack of the checkpoint that last wrote it; the
  superblock references every pack that still holds a live node. A pack whose live bytes
  fell below half of what it holds is compacted: its live nodes are written again into
  the new pack, so the packs hold at most about twice the live map.

Invariants:

1. A checkpoint is planned without an await (``plan_checkpoint``): the nodes it writes,
   including the ones compaction moves, are serialized from the state the Transaction
   captured, never from a later one.
2. New blobs carry the new generation in their names, so they never overwrite a blob a
   committed superblock references (DESIGN 3); the flip is RadosMeta's one guarded header
   op (meta invariants 1, 3); the blobs only the old superblock referenced are deleted
   after it, and a delete that fails leaves an orphan the checker lists, never damage.
3. The directory (object ``storaged.pools``, omap pool name -> pool uuid) names a pool
   only once its first checkpoint is committed, and is read before anything is written
   (create: a name taken is AlreadyExists; open: a name missing is NotFound).
4. Entering a name is one op with an omap compare (the name must be absent) and removing
   one compares the uuid: two creates racing for a name cannot both land, and a destroy
   never removes another pool's entry.
5. The metadata scrub (``scrub``) reads every object the committed superblock references
   and the journal after it and verifies each checksum; damage is repaired only from the
   verified state in memory, by a checkpoint that rewrites everything under a new
   generation (invariant 2), never by patching a committed object.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from pool.errors import AlreadyExists, MediumError, NotFound, StorageError
from pool.metastore import Loc
from pool.rados.conn import Connection
from pool.rados.meta import BlobRef, RadosMeta, RadosSuperblock
from pool.rados.owner import OwnershipLock
from pool.rados.store import RadosStore
from pool.rados.target import RadosTarget
from pool.state import PoolState
from pool.store import StoreHooks

if TYPE_CHECKING:
    from pool.maps import MapForest

log = logging.getLogger(__name__)

DIRECTORY = "storaged.pools"
PACK_BYTES = 4 << 20          # serialized map nodes per pack object
JOURNAL_ENTRIES = 512         # journal entries between checkpoints
JOURNAL_BYTES = 32 << 20      # journal payload between checkpoints
JOURNAL_ENTRY = 4 << 20       # a bigger commit is a checkpoint (omap values stay small)
_xxh3 = xxhash.xxh3_64_intdigest


@dataclass(frozen=True, slots=True)
class NodeRef:
    """Where a checkpoint put a map node: pack (generation, i), offset, length, xxh3."""

    gen: int
    i: int
    offset: int
    length: int
    hash: int


@dataclass(slots=True)
class RadosPlan:
    generation: int
    txg: int
    state_blob: bytes
    packs: list[bytes]                       # the new packs' contents
    nodes: dict[int, NodeRef]                # the new index
    sizes: dict[tuple[int, int], int]        # bytes each live pack holds
    new: RadosSuperblock | None = None


class RadosCommitMeta:
    """``pool.metaseam.CommitMeta`` on RADOS objects (module docstring)."""

    def __init__(self, meta: RadosMeta, sb: RadosSuperblock, forest: MapForest,
                 nodes: dict[int, NodeRef] | None = None,
                 sizes: dict[tuple[int, int], int] | None = None) -> None:
        self.meta = meta
        self.sb = sb
        self.forest = forest
        self.nodes: dict[int, NodeRef] = nodes or {}
        self.sizes: dict[tuple[int, int], int] = sizes or {}
        self.generation = sb.generation
        self.journal_entries = 0
        self.journal_bytes = 0
        self.rewrite_all = False      # the next checkpoint rewrites every node (scrub repair)
        # No member devices: nothing for the device scrub and checker to read.
        self.page_locs: dict[int, Loc] = {}
        self.meta_locs: tuple[Loc, ...] = ()

    # ---- journal ------------------------------------------------------------------------
    def journal_fits(self, payload_len: int) -> bool:
        return (self.journal_entries < JOURNAL_ENTRIES and payload_len <= JOURNAL_ENTRY
                and self.journal_bytes + payload_len <= JOURNAL_BYTES)

    async def append(self, txg: int, payload: bytes) -> None:
        await self.meta.append(txg, payload)
        self.journal_entries += 1
        self.journal_bytes += len(payload)

    # ---- checkpoints (invariants 1, 2) ---------------------------------------------------
    def plan_checkpoint(self, generation: int, txg: int, state_blob: bytes,
                        pages: Sequence[tuple[int, bytes]],
                        dropped: Collection[int]) -> RadosPlan:
        nodes = dict(self.nodes)
        for nid in dropped:
            nodes.pop(nid, None)
        writing = dict(pages)
        for nid in writing:
            nodes.pop(nid, None)
        live: dict[tuple[int, int], int] = {}
        for ref in nodes.values():
            live[(ref.gen, ref.i)] = live.get((ref.gen, ref.i), 0) + ref.length
        sparse = {p for p, held in self.sizes.items()
                  if self.rewrite_all or live.get(p, 0) * 2 < held}
        for nid, ref in list(nodes.items()):
            if (ref.gen, ref.i) in sparse:
                del nodes[nid]
                if nid in self.forest.nodes:
                    writing[nid] = self.forest.nodes[nid].serialize()
        sizes = {p: n for p, n in self.sizes.items() if p not in sparse and live.get(p)}
        packs: list[bytearray] = []
        for nid in sorted(writing):
            blob = writing[nid]
            if not packs or len(packs[-1]) + len(blob) > PACK_BYTES:
                packs.append(bytearray())
            nodes[nid] = NodeRef(generation, len(packs) - 1, len(packs[-1]), len(blob),
                                 _xxh3(blob))
            packs[-1] += blob
        for i, pack in enumerate(packs):
            sizes[(generation, i)] = len(pack)
        return RadosPlan(generation, txg, state_blob, [bytes(p) for p in packs], nodes,
                         sizes)

    async def write_checkpoint(self, plan: object) -> None:
        assert isinstance(plan, RadosPlan)
        m, gen = self.meta, plan.generation
        index = json.dumps({
            "packs": [[g, i, n] for (g, i), n in sorted(plan.sizes.items())],
            "nodes": [[nid, r.gen, r.i, r.offset, r.length, r.hash]
                      for nid, r in sorted(plan.nodes.items())]},
            separators=(",", ":")).encode()
        new_packs = await m.write_blobs("pages", gen, plan.packs)
        old_packs = {r.oid: r for r in self.sb.blobs.get("pages", [])}
        packs = [old_packs[m.blob_oid("pages", g, i)] for g, i in sorted(plan.sizes)
                 if g != gen]
        state_ref, index_ref = await m.write_blobs("meta", gen, [plan.state_blob, index])
        plan.new = RadosSuperblock(m.pool_uuid, gen, plan.txg,
                                   {"state": [state_ref], "index": [index_ref],
                                    "pages": packs + new_packs})

    async def flip(self, plan: object) -> None:
        assert isinstance(plan, RadosPlan) and plan.new is not None
        await self.meta.flip(self.sb, plan.new)
        old, self.sb = self.sb, plan.new
        try:
            await self.meta.delete_blobs(sorted(old.refs() - plan.new.refs()))
        except StorageError as e:     # invariant 2: orphans, listed by the checker
            log.warning("pool %s: deleting the previous checkpoint's objects: %s",
                        self.meta.pool_uuid, e.message)

    def flipped(self, plan: object) -> None:
        assert isinstance(plan, RadosPlan)
        self.rewrite_all = False
        self.nodes = plan.nodes
        self.sizes = plan.sizes
        self.generation = plan.generation
        self.journal_entries = self.journal_bytes = 0

    def page_ids(self) -> Collection[int]:
        return self.nodes.keys()

    def used(self, pending_nodes: int) -> float:
        return 0.0        # objects: no metadata area to fill

    # ---- scrub (invariant 5) ------------------------------------------------------------
    async def verify(self) -> tuple[int, list[str]]:
        """Read back every metadata object of the committed checkpoint and verify it:
        the superblock (its xxh3, and that it is the one this pool committed), each blob
        (stored xxh3), each map node in its pack, the journal entries after the
        checkpoint (each one's xxh3). (how many were checked, one line per damage)."""
        m, sb = self.meta, self.sb
        bad: list[str] = []
        checked = 1
        try:
            if await m.read_superblock() != sb:
                bad.append(f"{m.oid}: its superblock is not the one this pool committed")
        except StorageError as e:
            bad.append(f"{m.oid}: {e.message}")
        packs: dict[tuple[int, int], bytes] = {}
        for kind, refs in sorted(sb.blobs.items()):
            for ref in refs:
                checked += 1
                try:
                    raw = await m.read_blob(ref)
                except StorageError as e:
                    bad.append(e.message)
                    continue
                if kind == "pages":
                    _k, g, i = ref.oid.rsplit(".", 2)
                    packs[(int(g), int(i))] = raw
        for nid, r in sorted(self.nodes.items()):
            blob = packs.get((r.gen, r.i))
            if blob is not None:      # a missing pack is named above
                checked += 1
                if _xxh3(blob[r.offset:r.offset + r.length]) != r.hash:
                    bad.append(f"map node {nid} in {m.blob_oid('pages', r.gen, r.i)} does "
                               f"not match its checksum")
        for txg, ok in await m.journal_checks(sb.txg):
            checked += 1
            if not ok:
                bad.append(f"{m.oid}: journal entry {txg} does not match its checksum")
        return checked, bad

    async def scrub(self, checkpoint: Callable[[], Awaitable[None]]) -> tuple[int, int, int]:
        """Scrub of the metadata on RADOS (``pool.scrub.scrub_metadata``'s counterpart):
        verify (``verify``); if anything is damaged, repair it from the verified state in
        memory with a checkpoint that rewrites every node, the state, the index and the
        superblock under a new generation (the damaged objects are deleted after its flip,
        and the journal entries it covers with it), then verify again. (checked, bad,
        repaired); each damage is logged."""
        checked, bad = await self.verify()
        if not bad:
            return checked, 0, 0
        for line in bad:
            log.error("pool %s: metadata scrub: %s", self.meta.pool_uuid, line)
        self.rewrite_all = True
        try:
            await checkpoint()
        except StorageError as e:
            log.error("pool %s: metadata scrub could not rewrite the checkpoint: %s",
                      self.meta.pool_uuid, e.message)
            return checked, len(bad), 0
        finally:
            self.rewrite_all = False
        _c, still = await self.verify()
        for line in still:
            log.error("pool %s: metadata scrub, after the rewrite: %s", self.meta.pool_uuid,
                      line)
        return checked, len(bad), max(0, len(bad) - len(still))

    # ---- reading a checkpoint (open, checker) ---------------------------------------------
    @staticmethod
    def parse_index(raw: bytes) -> tuple[dict[int, NodeRef], dict[tuple[int, int], int]]:
        d = json.loads(raw)
        nodes = {int(n[0]): NodeRef(*(int(x) for x in n[1:])) for n in d["nodes"]}
        sizes = {(int(g), int(i)): int(n) for g, i, n in d["packs"]}
        return nodes, sizes


# The object kinds RadosCommitMeta writes (blob_oid's <kind>): "meta" holds the state and
# the index, "pages" the packs.
OBJECT_KINDS = ("meta", "pages")


async def read_checkpoint(meta: RadosMeta, sb: RadosSuperblock
                          ) -> tuple[bytes, dict[int, NodeRef], dict[tuple[int, int], int],
                                     dict[int, bytes]]:
    """The committed checkpoint: the state blob, the node index, the pack sizes and every
    map node's bytes, each verified (meta invariant 4; MediumError if not)."""
    try:
        (state_ref,), (index_ref,) = sb.blobs["state"], sb.blobs["index"]
    except (KeyError, ValueError) as e:
        raise StorageError(f"storaged pool {sb.pool_uuid}: its superblock names no "
                           f"checkpoint") from e
    state_blob, index = await meta.read_blobs([state_ref, index_ref])
    nodes, sizes = RadosCommitMeta.parse_index(index)
    packs = {r.oid: r for r in sb.blobs.get("pages", [])}
    want = sorted({(r.gen, r.i) for r in nodes.values()})
    refs: list[BlobRef] = []
    for g, i in want:
        oid = meta.blob_oid("pages", g, i)
        if oid not in packs:
            raise MediumError(f"map node pack {oid} is not in the superblock")
        refs.append(packs[oid])
    raw = dict(zip(want, await meta.read_blobs(refs), strict=True))
    out: dict[int, bytes] = {}
    for nid, r in nodes.items():
        blob = raw[(r.gen, r.i)][r.offset:r.offset + r.length]
        if len(blob) != r.length or _xxh3(blob) != r.hash:
            raise MediumError(f"map node {nid} in pack {meta.blob_oid('pages', r.gen, r.i)} "
                              f"does not match its checksum")
        out[nid] = blob
    return state_blob, nodes, sizes, out


@dataclass
class RadosParts:
    """A pool on RADOS, as ``Pool.__init__`` takes it: where it is, the connection, the
    ownership lock, the metadata objects and their commit seam."""

    target: RadosTarget
    conn: Connection
    lock: OwnershipLock
    meta: RadosMeta
    commit: RadosCommitMeta

    def make_store(self, state: PoolState, hooks: StoreHooks) -> RadosStore:
        """The pool's store (started by the importer before anything is written)."""
        return RadosStore(self.conn, state, hooks, first_number=0)


# ---- the directory of storaged pools in a RADOS pool (invariant 3) -------------------------
async def directory(conn: Connection) -> dict[str, str]:
    """Pool name -> pool uuid of every storaged pool in ``conn``'s RADOS pool."""
    io, rados = conn.ioctx, conn.rados

    def read() -> dict[str, str]:
        out: dict[str, str] = {}
        start = ""
        while True:
            with rados.ReadOpCtx() as op:
                it, _ret = io.get_omap_vals(op, start, "", 1024)
                io.operate_read_op(op, DIRECTORY)
                batch = [(str(k), bytes(v).decode()) for k, v in it]
            out.update(batch)
            if len(batch) < 1024:
                return out
            start = batch[-1][0]
    try:
        return await conn.run("read", f"read {DIRECTORY}", read)
    except NotFound:
        return {}


async def lookup(conn: Connection, name: str) -> str:
    """The uuid of pool ``name``; NotFound naming the RADOS pool."""
    found = (await directory(conn)).get(name)
    if found is None:
        raise NotFound(f"RADOS pool {conn.pool} holds no storaged pool named {name!r}")
    return found


async def name_pool(conn: Connection, name: str, pool_uuid: str) -> None:
    """Enter ``name`` -> ``pool_uuid`` in the directory (creating the object) in one op
    whose omap compare asserts the name is absent (invariant 4): of two creates racing for
    one name exactly one lands; the other gets AlreadyExists and nothing of it changed."""
    io, rados = conn.ioctx, conn.rados

    def write() -> bool:
        op = io.create_write_op()
        try:
            op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)     # omap_cmp needs the object
            op.omap_cmp(name, "", rados.LIBRADOS_CMPXATTR_OP_EQ)   # absent reads as ""
            io.set_omap(op, (name,), (pool_uuid.encode(),))
            io.operate_write_op(op, DIRECTORY)
            return True
        except rados.OSError as e:
            if e.errno == errno.ECANCELED:               # the compare failed: name taken
                return False
            raise
        finally:
            io.release_write_op(op)
    if not await conn.run("write", f"name pool {name} in {DIRECTORY}", write):
        raise AlreadyExists(f"RADOS pool {conn.pool} already holds a storaged pool named "
                            f"{name!r}")


async def unname_pool(conn: Connection, name: str, pool_uuid: str) -> bool:
    """Remove ``name`` from the directory if it still names ``pool_uuid`` (one op, omap
    compare guard: never another pool's entry); whether it was removed."""
    io, rados = conn.ioctx, conn.rados

    def write() -> bool:
        op = io.create_write_op()
        try:
            op.omap_cmp(name, pool_uuid, rados.LIBRADOS_CMPXATTR_OP_EQ)
            io.remove_omap_keys(op, (name,))
            io.operate_write_op(op, DIRECTORY)
            return True
        except (rados.OSError, rados.ObjectNotFound) as e:
            if e.errno in (errno.ECANCELED, errno.ENOENT):
                return False
            raise
        finally:
            io.release_write_op(op)
    return await conn.run("write", f"remove pool {name} from {DIRECTORY}", write)
