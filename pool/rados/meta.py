"""A pool's metadata on RADOS: superblock, journal and checkpoint blobs (DESIGN invariants
2-4; the RADOS counterpart of pool/metastore.py).

Objects, all named with the pool uuid as prefix so several storaged pools share one RADOS
pool:

- ``<uuid>.header``: the ownership lock and owner record (pool/rados/owner.py), and
  - its data: the superblock (magic, JSON, xxh3): generation, the txg of the checkpoint,
    and the checkpoint's blobs by reference (object name, stored length, xxh3);
  - omap ``gen``: the superblock's generation (16 digits), compared on every superblock
    write;
  - omap ``j.<txg as 16 hex digits>``: one journal entry each, value = xxh3 (8 bytes,
    little-endian) of the payload, then the payload.
- ``<uuid>.<kind>.<generation>.<i>``: checkpoint blobs (lz4), written whole by write_full
  under the generation of the superblock that will reference them.

A RADOS write op on one object is atomic (all of its sub-ops or none), which is what the
commit protocol builds on.

Invariants:

1. Every write to the header is one write op that carries the owner's lock assertion, so
   it lands whole or not at all, and only while this client owns the pool.
2. Journal commit: the entry is one omap key set in one op; a txg is acknowledged only
   after that op returned. Replay reads entries after the checkpoint's txg in txg order
   and stops at the first gap or the first entry whose xxh3 fails: a lost entry is as if
   never written.
3. Checkpoint: the new blobs are written (objects no committed superblock references),
   then one op on the header compares ``gen`` with the generation it replaces, writes the
   new superblock, sets ``gen`` and removes the journal entries the checkpoint covers.
   Blobs that only the old superblock referenced are deleted after that op returned. So a
   crash at any point leaves either the old superblock with its journal, or the new one;
   committed blobs are never rewritten (invariant 3 of DESIGN) because new ones carry the
   new generation in their name.
4. Everything read is verified: the superblock by its xxh3, each blob by the xxh3 its
   reference holds, each journal entry by its own; a mismatch is an error, never data.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import lz4.block
import trio
import xxhash

from pool.errors import MediumError, NotFound, StorageError
from pool.rados.conn import Connection
from pool.rados.owner import OwnershipLock

SB_MAGIC = b"SDRSUP01"
DESTROY_MAGIC = b"SDRDEST1"    # a destroy's tombstone (pool/rados/destroy.py), then the name
GEN_KEY = "gen"
JOURNAL_PREFIX = "j."
_xxh3 = xxhash.xxh3_64_intdigest
READ_CHUNK = 4 << 20
JOURNAL_PAGE = 256          # omap entries read per call
PARALLEL_BLOBS = 8          # blob objects read or written at once


def journal_key(txg: int) -> str:
    return f"{JOURNAL_PREFIX}{txg:016x}"


def _gen(n: int) -> bytes:
    return f"{n:016d}".encode()


class Destroying(StorageError):
    """The header holds a destroy's tombstone: the pool is half-destroyed, never valid."""


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A checkpoint blob: its object, the stored (compressed) length, xxh3 of those bytes."""

    oid: str
    length: int
    hash: int

    def to_json(self) -> list[object]:
        return [self.oid, self.length, self.hash]


@dataclass(frozen=True, slots=True)
class RadosSuperblock:
    pool_uuid: str
    generation: int
    txg: int
    blobs: dict[str, list[BlobRef]] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = json.dumps({"pool_uuid": self.pool_uuid, "generation": self.generation,
                           "txg": self.txg,
                           "blobs": {k: [r.to_json() for r in v]
                                     for k, v in sorted(self.blobs.items())}},
                          sort_keys=True).encode()
        raw = SB_MAGIC + body
        return raw + struct.pack("<Q", _xxh3(raw))

    @staticmethod
    def decode(raw: bytes) -> RadosSuperblock:
        """The superblock; StorageError if it is damaged (invariant 4), ``Destroying`` if
        a destroy began (pool/rados/destroy.py invariant 2)."""
        if raw[:8] == DESTROY_MAGIC:
            name = raw[8:].decode(errors="replace")
            raise Destroying(f"pool {name} was being destroyed when that stopped: run "
                             f"`storagectl pool destroy {name} --rados <its RADOS pool>` "
                             f"to finish")
        if len(raw) < 16 or raw[:8] != SB_MAGIC:
            raise StorageError("the pool header holds no storaged superblock")
        if struct.unpack("<Q", raw[-8:])[0] != _xxh3(raw[:-8]):
            raise StorageError("the pool header's superblock checksum does not match")
        d = json.loads(raw[8:-8])
        return RadosSuperblock(
            d["pool_uuid"], int(d["generation"]), int(d["txg"]),
            {k: [BlobRef(str(o), int(n), int(h)) for o, n, h in v]
             for k, v in d["blobs"].items()})

    def refs(self) -> set[str]:
        return {r.oid for v in self.blobs.values() for r in v}


class RadosMeta:
    """The metadata of pool ``pool_uuid``, written only while ``lock`` is held."""

    def __init__(self, conn: Connection, lock: OwnershipLock, pool_uuid: str) -> None:
        self.conn = conn
        self.lock = lock
        self.pool_uuid = pool_uuid
        self.oid = lock.oid

    # ---- superblock ---------------------------------------------------------------------
    async def read_superblock(self) -> RadosSuperblock:
        """The committed superblock (invariant 4); NotFound if the pool has none."""
        io = self.conn.ioctx

        def read() -> bytes:
            size, _mtime = io.stat(self.oid)
            return bytes(io.read(self.oid, max(size, 1))) if size else b""
        raw = await self.conn.run("read", f"read superblock {self.oid}", read)
        if not raw:
            raise NotFound(f"storaged pool {self.pool_uuid} has no superblock in RADOS pool "
                           f"{self.conn.pool}")
        if raw[:8] == DESTROY_MAGIC:
            name = raw[8:].decode(errors="replace")
            raise Destroying(f"pool {name} was being destroyed when that stopped: run "
                             f"`storagectl pool destroy {name} --rados {self.conn.pool}` "
                             f"to finish")
        sb = RadosSuperblock.decode(raw)
        if sb.pool_uuid != self.pool_uuid:
            raise StorageError(f"{self.oid} holds the superblock of pool {sb.pool_uuid}")
        return sb

    async def format(self, sb: RadosSuperblock) -> None:
        """The first superblock of a new pool (generation 0), on a header that has none;
        the caller holds the lock, so nobody else can write one meanwhile."""
        if sb.generation != 0:
            raise StorageError("a new pool's superblock has generation 0")
        try:
            await self.read_superblock()
        except NotFound:
            pass
        else:
            raise StorageError(f"{self.oid} already holds a superblock")
        await self._write_header(sb, None, None)

    async def commit_checkpoint(self, old: RadosSuperblock, new: RadosSuperblock) -> None:
        """Replace ``old`` by ``new`` in one op (invariant 3), then delete the blobs only
        ``old`` referenced. ``new.generation`` must be ``old.generation + 1``."""
        if new.generation != old.generation + 1 or new.txg < old.txg:
            raise StorageError(f"checkpoint generation {new.generation} (txg {new.txg}) does "
                               f"not follow {old.generation} (txg {old.txg})")
        await self.flip(old, new)
        await self.delete_blobs(sorted(old.refs() - new.refs()))

    async def flip(self, old: RadosSuperblock, new: RadosSuperblock) -> None:
        """``commit_checkpoint`` without the deletes: the one guarded header op; the
        caller deletes the blobs only ``old`` referenced (an orphan if it never does)."""
        if new.generation != old.generation + 1 or new.txg < old.txg:
            raise StorageError(f"checkpoint generation {new.generation} (txg {new.txg}) does "
                               f"not follow {old.generation} (txg {old.txg})")
        await self._write_header(new, old.generation, new.txg)

    async def _write_header(self, sb: RadosSuperblock, expect_gen: int | None,
                            drop_through: int | None) -> None:
        """One guarded op (invariant 1): compare ``gen`` with ``expect_gen``, write ``sb``,
        set ``gen``, remove the journal entries up to txg ``drop_through``."""
        io = self.conn.ioctx
        rados = self.conn.rados

        def write() -> None:
            op = io.create_write_op()
            try:
                self.lock.guard(op)
                if expect_gen is not None:
                    op.omap_cmp(GEN_KEY, _gen(expect_gen).decode(),
                                rados.LIBRADOS_CMPXATTR_OP_EQ)
                op.write_full(sb.encode())
                io.set_omap(op, (GEN_KEY,), (_gen(sb.generation),))
                if drop_through is not None:       # [begin, end): entries <= drop_through
                    io.remove_omap_range2(op, journal_key(0), journal_key(drop_through + 1))
                io.operate_write_op(op, self.oid)
            finally:
                io.release_write_op(op)
        await self.conn.run("write", f"write superblock {sb.generation} of {self.oid}", write)

    # ---- checkpoint blobs ---------------------------------------------------------------
    def blob_oid(self, kind: str, generation: int, i: int) -> str:
        return f"{self.pool_uuid}.{kind}.{generation}.{i}"

    async def write_blobs(self, kind: str, generation: int, blobs: Sequence[bytes],
                          first: int = 0) -> list[BlobRef]:
        """Write each blob (lz4) as object ``<uuid>.<kind>.<generation>.<first + i>``;
        ``generation``: of the superblock that will reference them (invariant 3)."""
        refs: list[BlobRef | None] = [None] * len(blobs)
        limit = trio.Semaphore(PARALLEL_BLOBS)

        async def one(i: int) -> None:
            async with limit:
                stored = lz4.block.compress(blobs[i])
                oid = self.blob_oid(kind, generation, first + i)
                await self.conn.run("write", f"write blob {oid}", self.conn.ioctx.write_full,
                                    oid, stored)
                refs[i] = BlobRef(oid, len(stored), _xxh3(stored))
        async with trio.open_nursery() as nursery:
            for i in range(len(blobs)):
                nursery.start_soon(one, i)
        return [r for r in refs if r is not None]

    async def read_blob(self, ref: BlobRef) -> bytes:
        """The blob, verified (invariant 4): MediumError if missing or damaged."""
        io = self.conn.ioctx
        try:
            stored = await self.conn.run("read", f"read blob {ref.oid}", io.read, ref.oid,
                                         ref.length + 1)
        except NotFound as e:
            raise MediumError(f"metadata blob {ref.oid} is missing") from e
        stored = bytes(stored)
        if len(stored) != ref.length or _xxh3(stored) != ref.hash:
            raise MediumError(f"metadata blob {ref.oid} does not match its checksum")
        out: bytes = lz4.block.decompress(stored)
        return out

    async def read_blobs(self, refs: Sequence[BlobRef]) -> list[bytes]:
        out: list[bytes] = [b""] * len(refs)
        limit = trio.Semaphore(PARALLEL_BLOBS)

        async def one(i: int) -> None:
            async with limit:
                out[i] = await self.read_blob(refs[i])
        async with trio.open_nursery() as nursery:
            for i in range(len(refs)):
                nursery.start_soon(one, i)
        return out

    async def delete_blobs(self, oids: Sequence[str]) -> None:
        rados = self.conn.rados

        def rm(oid: str) -> None:
            with contextlib.suppress(rados.ObjectNotFound):
                self.conn.ioctx.remove_object(oid)
        for oid in oids:
            await self.conn.run("write", f"delete blob {oid}", rm, oid)

    async def orphans(self, sb: RadosSuperblock, kinds: Sequence[str]) -> list[str]:
        """Blob objects of ``kinds`` of this pool that ``sb`` does not reference: left by a
        crash between writing a checkpoint's blobs and its commit, or before the old ones
        were deleted. Lists the whole RADOS pool: for import and the checker only."""
        keep = sb.refs()
        prefixes = tuple(f"{self.pool_uuid}.{k}." for k in kinds)

        def scan() -> list[str]:
            return sorted(str(o.key) for o in self.conn.ioctx.list_objects()
                          if str(o.key).startswith(prefixes) and o.key not in keep)
        return await self.conn.run("read", f"list objects of pool {self.pool_uuid}", scan)

    # ---- journal ------------------------------------------------------------------------
    async def append(self, txg: int, payload: bytes) -> None:
        """Commit journal entry ``txg`` (invariant 2): durable when this returns."""
        io = self.conn.ioctx
        value = struct.pack("<Q", _xxh3(payload)) + payload

        def write() -> None:
            op = io.create_write_op()
            try:
                self.lock.guard(op)
                io.set_omap(op, (journal_key(txg),), (value,))
                io.operate_write_op(op, self.oid)
            finally:
                io.release_write_op(op)
        await self.conn.run("write", f"append journal entry {txg} to {self.oid}", write)

    async def journal_checks(self, after_txg: int) -> list[tuple[int, bool]]:
        """Every journal entry after ``after_txg`` (gaps and all): its txg and whether
        its xxh3 matches (the scrub's view; replay stops at the first bad one)."""
        out: list[tuple[int, bool]] = []
        start = journal_key(after_txg)
        while True:
            batch = await self.conn.run("read", f"read journal of {self.oid}",
                                        self._journal_page, start)
            for key, value in batch:
                payload = value[8:]
                out.append((int(key[len(JOURNAL_PREFIX):], 16), len(value) >= 8 and
                            struct.unpack("<Q", value[:8])[0] == _xxh3(payload)))
            if len(batch) < JOURNAL_PAGE:
                return out
            start = batch[-1][0]

    def _journal_page(self, start_after: str) -> list[tuple[str, bytes]]:
        with self.conn.rados.ReadOpCtx() as op:
            it, _ret = self.conn.ioctx.get_omap_vals(op, start_after, JOURNAL_PREFIX,
                                                     JOURNAL_PAGE)
            self.conn.ioctx.operate_read_op(op, self.oid)
            return [(str(k), bytes(v)) for k, v in it]

    async def read_journal(self, after_txg: int) -> list[tuple[int, bytes]]:
        """Entries after ``after_txg``, in order, up to the first gap or damaged entry."""
        io = self.conn.ioctx
        rados = self.conn.rados

        def page(start_after: str) -> list[tuple[str, bytes]]:
            with rados.ReadOpCtx() as op:
                it, _ret = io.get_omap_vals(op, start_after, JOURNAL_PREFIX, JOURNAL_PAGE)
                io.operate_read_op(op, self.oid)
                return [(str(k), bytes(v)) for k, v in it]

        out: list[tuple[int, bytes]] = []
        want = after_txg + 1
        start = journal_key(after_txg)
        while True:
            batch = await self.conn.run("read", f"read journal of {self.oid}", page, start)
            for key, value in batch:
                txg = int(key[len(JOURNAL_PREFIX):], 16)
                if txg != want or len(value) < 8:
                    return out
                payload = value[8:]
                if struct.unpack("<Q", value[:8])[0] != _xxh3(payload):
                    return out
                out.append((txg, payload))
                want += 1
            if len(batch) < JOURNAL_PAGE:
                return out
            start = batch[-1][0]
