"""The metadata seam: what a commit (``pool.txn.Transaction``) asks of the place where a
pool's metadata lives, and ``DeviceMeta``, its implementation on the members' metadata
areas (``pool.metastore.MetaStore``). The RADOS one is ``pool.rados.commitmeta``.

A commit is either a journal entry or a checkpoint; the Transaction decides which
(``journal_fits``) and keeps the order of the steps (data synced, metadata written,
members synced, superblock flipped, members synced), so a backend only says how each step
is done:

- ``journal_fits(n)``: may the next commit be a journal entry of ``n`` payload bytes;
- ``append(txg, payload)``: write the entry (durable once the members are synced);
- ``plan_checkpoint(...)``: what a checkpoint writes, decided synchronously (no await), so
  it is exactly the state the Transaction captured;
- ``write_checkpoint(plan)``: write the changed map pages, the state and the page index
  where nothing committed lives;
- ``flip(plan)``: make the new checkpoint the committed one (the superblock);
- ``flipped(plan)``: the flip is durable: the previous checkpoint's space may be reused
  and the journal starts over;
- ``page_locs`` / ``meta_locs``: where the committed checkpoint's blobs are on the member
  devices (scrub and the checker read every copy; empty for a backend without members);
  ``page_ids()``: the map nodes the committed checkpoint holds;
- ``used(pending_nodes)``: the fraction of the metadata space in use, counting
  ``pending_nodes`` map nodes still to be written.

Invariants (DESIGN numbers in brackets):

1. ``DeviceMeta`` writes exactly what the Transaction wrote before the seam existed, at
   the same offsets and in the same order: the on-disk format and the crash suite are
   unchanged [2, 3].
2. Nothing a backend writes before ``flip`` is referenced by the committed state; what
   the previous checkpoint used is reused only after ``flipped`` [3].
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from pool.layout import Layout
from pool.metastore import PAGE_INDEX, Loc, MetaStore, Superblock

_NODE_UNITS = 7      # 4 KiB units of the largest map node blob (a 24 KiB leaf, lz4 framed)
_STATE_UNITS_GUESS = 4


class CheckpointPlan(Protocol):
    """What one checkpoint writes (each backend's own value)."""

    generation: int
    txg: int


class CommitMeta(Protocol):
    """The metadata seam (module docstring)."""

    page_locs: dict[int, Loc]
    meta_locs: tuple[Loc, ...]

    def journal_fits(self, payload_len: int) -> bool: ...

    async def append(self, txg: int, payload: bytes) -> None: ...

    def plan_checkpoint(self, generation: int, txg: int, state_blob: bytes,
                        pages: Sequence[tuple[int, bytes]],
                        dropped: Collection[int]) -> CheckpointPlan: ...

    async def write_checkpoint(self, plan: CheckpointPlan) -> None: ...

    async def flip(self, plan: CheckpointPlan) -> None: ...

    def flipped(self, plan: CheckpointPlan) -> None: ...

    def page_ids(self) -> Collection[int]: ...

    def used(self, pending_nodes: int) -> float: ...


@dataclass(slots=True)
class DevicePlan:
    generation: int
    txg: int
    state_blob: bytes
    page_keys: list[int]
    page_blobs: list[bytes]
    new_locs: dict[int, Loc]
    taken: bytearray
    state_loc: Loc | None = None
    index_loc: Loc | None = None


class DeviceMeta:
    """``CommitMeta`` on the members' metadata areas (``MetaStore``; docs/FORMAT.md)."""

    def __init__(self, meta: MetaStore, layout: Layout, superblock: Superblock | None
                 ) -> None:
        self.meta = meta
        self.layout = layout
        self.page_locs: dict[int, Loc] = {}   # map node id -> where the checkpoint put it
        self.meta_locs: tuple[Loc, ...] = (
            (superblock.state, superblock.index) if superblock else ())
        self.units_used = meta.bitmap.count(1)

    def journal_fits(self, payload_len: int) -> bool:
        return self.meta.journal_room(payload_len) and (
            self.meta.journal_head < self.layout.journal_size // 2)

    async def append(self, txg: int, payload: bytes) -> None:
        await trio.to_thread.run_sync(self.meta.append, txg, payload)

    def plan_checkpoint(self, generation: int, txg: int, state_blob: bytes,
                        pages: Sequence[tuple[int, bytes]],
                        dropped: Collection[int]) -> DevicePlan:
        new_locs = dict(self.page_locs)
        for nid in dropped:
            new_locs.pop(nid, None)
        return DevicePlan(generation, txg, state_blob, [k for k, _ in pages],
                          [b for _, b in pages], new_locs, bytearray(self.meta.bitmap))

    async def write_checkpoint(self, plan: CheckpointPlan) -> None:
        assert isinstance(plan, DevicePlan)
        written = await trio.to_thread.run_sync(self.meta.write_blobs, plan.page_blobs,
                                                plan.taken)
        plan.new_locs.update(zip(plan.page_keys, written, strict=True))
        index = b"".join(PAGE_INDEX.pack(nid, loc.unit, loc.units, loc.length, loc.hash)
                         for nid, loc in sorted(plan.new_locs.items()))
        plan.state_loc, plan.index_loc = await trio.to_thread.run_sync(
            self.meta.write_blobs, [plan.state_blob, index], plan.taken)

    async def flip(self, plan: CheckpointPlan) -> None:
        assert isinstance(plan, DevicePlan)
        assert plan.state_loc is not None and plan.index_loc is not None
        sb = Superblock(self.meta.pool_uuid, plan.generation, plan.txg, plan.state_loc,
                        plan.index_loc)
        await trio.to_thread.run_sync(self.meta.write_superblock, sb)

    def flipped(self, plan: CheckpointPlan) -> None:
        # The new superblock is durable: the old checkpoint's blobs may now be reused.
        assert isinstance(plan, DevicePlan)
        assert plan.state_loc is not None and plan.index_loc is not None
        bitmap = bytearray(self.meta.n_units)
        for loc in (*plan.new_locs.values(), plan.state_loc, plan.index_loc):
            bitmap[loc.unit:loc.unit + loc.units] = b"\1" * loc.units
        self.meta.bitmap = bitmap
        self.units_used = bitmap.count(1)
        self.meta.journal_head = 0
        self.page_locs = plan.new_locs
        self.meta_locs = (plan.state_loc, plan.index_loc)

    def page_ids(self) -> Collection[int]:
        return self.page_locs.keys()

    def used(self, pending_nodes: int) -> float:
        """What the last checkpoint wrote plus, at worst-case size, every map node
        changed since (the next checkpoint writes them beside the old copies)."""
        pending = pending_nodes * _NODE_UNITS + 2 * _STATE_UNITS_GUESS
        return (self.units_used + pending) / self.meta.n_units
