"""The pool's transaction: the ops applied but not yet durable, group commit, the journal
entry or checkpoint that makes them durable, and the pool's OPEN / FAILED / CLOSED state.

Invariants this module owns (DESIGN invariant numbers in brackets):

1. Durability [1]: ``commit`` returns only after every op applied before it was called is
   durable: the members written since the last commit (``dirty``) are synced first, then
   the journal entry or checkpoint describing the ops is written and synced on every
   present member. Concurrent callers share one commit (group commit, one lock); a caller
   whose ops an earlier commit covered returns at once.
2. Atomic metadata [2, 3]: a commit is one journal entry, or one checkpoint: changed map
   pages, the state and the page index written where nothing committed lives (free units
   of the members' metadata area, or new RADOS objects: ``pool.metaseam``) and synced,
   then one superblock flip, synced. The space of the previous checkpoint is reused only
   after the new superblock is durable; the journal restarts after every checkpoint.
3. Ops are applied before they are pending: ``do`` applies an op to the PoolState and
   appends it to the pending list in one step (no await between), so replaying the journal
   runs exactly the changes the pool made. ``do_map_sets`` does the same for a run of
   ``map_set`` ops in one call, with the state applying them one by one would leave. Ops
   applied while a commit awaits belong to the next commit.
4. One way into FAILED: ``fail(reason)``. After a metadata write that may or may not have
   landed, the pool refuses all I/O with PoolFailed (``check_ok``), like SQLite's ERROR
   state: the only safe way on is a re-import. FAILED is entered once; the first reason
   stands.
5. CLOSED is final: ``close`` from OPEN or FAILED (again: nothing happens); a closed pool
   refuses all I/O with StorageError, and ``fail`` no longer changes anything.

State diagram (the function behind each transition)::

            fail(reason)                close()
      OPEN ──────────────▶ FAILED ──────────────▶ CLOSED
        │                                            ▲
        └────────────────── close() ─────────────────┘

Every way into FAILED (each caller of ``fail``):

- ``Transaction.commit`` -> ``_journal_commit``: the data sync, the journal append or the
  sync after it raised; the entry may be on some members and not others
  ("journal commit TXG: ...").
- ``Transaction.checkpoint_locked`` (a checkpoint, also the one every ``commit`` takes
  when the journal is half full): writing or syncing pages, the state, the index or the
  superblock raised, or the page area is full ("checkpoint GEN: ...").
- ``Members.fault`` (``Pool.fault``; pool.members): the last present member went away
  ("no member left (...)").
- ``OwnerKeeper.heartbeat`` (``Pool.heartbeat``; pool.owner, DESIGN invariant 10): another
  daemon took the pool over ("taken over by ...").
- a pool on RADOS (``Pool._rados_fenced``/``_rados_lost``, ``Pool.fault``): its client was
  blocklisted by another daemon's takeover ("fenced: ...") or its lock renewal found the
  lock gone ("lost its RADOS lock: ...").

Both call ``Pool.fail``, which is this ``fail``; nothing else writes the state.

Every way into CLOSED: ``Pool.close`` (export, daemon stop; after the final checkpoint)
and ``Pool.destroy`` (before the labels are wiped).

What a commit needs from the rest of the pool comes in as callbacks (``CommitHooks``), so
this module knows nothing of the Pool.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from pool.errors import DeviceError, NoSpace, PoolFailed, StorageError
from pool.metaseam import CommitMeta
from pool.metastore import Loc
from pool.state import Op, PoolState, op_map_set

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where a pool's transaction is in its state diagram."""

    OPEN = "open"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class CommitHooks:
    """What a commit asks of the rest of the pool."""

    # Before any metadata write: confirm this daemon still owns the pool (DESIGN
    # invariant 10); raises PoolFailed (through ``fail``) if it was taken over.
    confirm_owner: Callable[[], Awaitable[None]]
    # Sync these members (None: every present one). A member whose sync fails is faulted
    # and the commit goes on with the others; raises DeviceError when none is left.
    sync_members: Callable[[Sequence[int] | None], Awaitable[None]]
    # Fault the members whose metadata write failed (MetaStore.failed), after each write.
    absorb_meta_failures: Callable[[], None]
    # The last ops of a commit (the fill of each segment written since the last one).
    seal: Callable[[], None]
    # How many segment frees have been applied so far (those a commit makes durable).
    frees_pending: Callable[[], int]
    # A commit is durable: ("commits" | "checkpoints", how many of the frees pending
    # when it began are now durable, oldest first).
    after_commit: Callable[[str, int], None]


class Transaction:
    """Pending ops, group commit and the OPEN / FAILED / CLOSED state of one pool."""

    def __init__(self, state: PoolState, meta: CommitMeta, sb_gen: int,
                 hooks: CommitHooks) -> None:
        self.state = state
        # Where the journal entries and checkpoints go (pool.metaseam: the members'
        # metadata areas, or RADOS objects).
        self.meta = meta
        self.hooks = hooks
        self.pending: list[Op] = []
        self.applied = 0          # ops applied since the pool was opened
        self.committed = 0        # of those, how many are durable
        self.lock = trio.Lock()   # one commit or checkpoint at a time
        self.dirty: set[int] = set()   # members with data written since the last commit
        self.sb_gen = sb_gen      # generation of the committed checkpoint
        # Plain attributes (read on every I/O); only ``fail`` and ``close`` write them.
        self.failed: str | None = None   # why the pool failed (kept once it is closed)
        self.closed = False

    @property
    def page_locs(self) -> dict[int, Loc]:
        """Map node id -> where the committed checkpoint put it on the members."""
        return self.meta.page_locs

    @page_locs.setter
    def page_locs(self, locs: dict[int, Loc]) -> None:
        self.meta.page_locs = locs

    @property
    def meta_locs(self) -> tuple[Loc, ...]:
        """The committed checkpoint's state and page-index blobs on the members."""
        return self.meta.meta_locs

    # ---- the state machine ---------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        if self.closed:
            return Phase.CLOSED
        return Phase.OPEN if self.failed is None else Phase.FAILED

    def fail(self, reason: str) -> None:
        """OPEN -> FAILED (invariant 4): refuse all I/O from now on. In FAILED the first
        reason stands; in CLOSED nothing changes (invariant 5)."""
        if self.closed or self.failed is not None:
            return
        self.failed = reason
        log.error("pool %s: %s; it refuses all I/O until it is exported and re-imported",
                  self.state.name, reason)

    def close(self) -> None:
        """OPEN or FAILED -> CLOSED (invariant 5)."""
        self.closed = True

    def check_ok(self) -> None:
        """Raise unless the pool is OPEN."""
        if self.closed:
            raise StorageError(f"pool {self.state.name} is closed")
        if self.failed is not None:
            raise PoolFailed(f"pool {self.state.name} stopped after a failed metadata write "
                             f"({self.failed}); export and re-import it")

    def meta_locations(self) -> list[Loc]:
        """Where the last checkpoint's blobs are: map pages, the state and the page index."""
        return [*self.page_locs.values(), *self.meta_locs]

    # ---- ops and commits -----------------------------------------------------------------
    def do(self, op: Op) -> None:
        """Apply ``op`` and make it part of the next commit (invariant 3)."""
        self.state.apply(op)
        self.pending.append(op)
        self.applied += 1

    def do_map_sets(self, map_id: int, blocks: Sequence[int], entries: Sequence[bytes]) -> None:
        """``do(op_map_set(map_id, block, entry))`` for each pair in turn (invariant 3: the
        same ops are pending, in the same order, and the state is what applying them one
        by one gives), applied in one call (``PoolState.apply_map_sets``)."""
        ops = [op_map_set(map_id, b, e) for b, e in zip(blocks, entries, strict=True)]
        self.state.apply_map_sets(map_id, blocks, entries)
        self.pending.extend(ops)
        self.applied += len(ops)

    async def commit(self) -> None:
        """Make everything applied so far durable (invariant 1; group commit: concurrent
        callers share). A journal entry while the journal is less than half full, else a
        checkpoint."""
        target = self.applied
        async with self.lock:
            self.check_ok()
            await self.hooks.confirm_owner()
            if self.committed >= target:
                return
            self.hooks.seal()
            payload_len = sum(len(op) for op in self.pending)
            if self.meta.journal_fits(payload_len):
                await self._journal_commit()
            else:
                await self.checkpoint_locked()

    async def _journal_commit(self) -> None:
        ops, covered, freed_here = self.pending, self.applied, self.hooks.frees_pending()
        self.pending = []
        txg = self.state.txg + 1
        payload = b"".join(ops)
        try:
            await self._sync_data()
            await self.meta.append(txg, payload)
            self.hooks.absorb_meta_failures()
            await self.hooks.sync_members(None)
        except (DeviceError, OSError, StorageError) as e:
            self.fail(f"journal commit {txg}: {e}")
            raise PoolFailed(f"pool {self.state.name}: commit failed: {e}") from e
        self.state.txg = txg
        self._after_commit("commits", covered, freed_here)

    def _after_commit(self, kind: str, covered: int, freed_here: int) -> None:
        """Ops up to ``covered`` are durable; so are the first ``freed_here`` frees."""
        self.committed = covered
        self.hooks.after_commit(kind, freed_here)

    async def _sync_data(self) -> None:
        """Sync the members written since the last commit (before the metadata that
        references what was written: invariant 1)."""
        dirty = sorted(self.dirty)
        self.dirty.clear()
        if dirty:
            await self.hooks.sync_members(dirty)

    async def checkpoint(self) -> None:
        """A checkpoint now (everything applied so far, durable; invariants 1 and 2)."""
        async with self.lock:
            await self.hooks.confirm_owner()
            await self.checkpoint_locked()

    async def checkpoint_locked(self) -> None:
        """``checkpoint`` for a caller that holds ``lock``: write changed pages and a new
        superblock through the metadata seam (pool.metaseam; MetaStore or RadosMeta
        describe each protocol)."""
        self.check_ok()
        st = self.state
        ops_covered = self.applied
        self.pending = []
        # Frees of segments made by ops up to here become reusable after this commit; ops
        # applied while we await belong to the next commit.
        freed_here = self.hooks.frees_pending()
        txg = st.txg + 1
        st.txg = txg
        st.generation = self.sb_gen + 1
        state_blob = st.to_json()
        forest = st.forest
        pages = [(nid, forest.nodes[nid].serialize()) for nid in sorted(forest.dirty)]
        plan = self.meta.plan_checkpoint(st.generation, txg, state_blob, pages,
                                         list(forest.freed))
        forest.freed.clear()
        forest.dirty.clear()
        try:
            await self._sync_data()
            await self.meta.write_checkpoint(plan)
            self.hooks.absorb_meta_failures()
            await self.hooks.sync_members(None)
            await self.meta.flip(plan)
            self.hooks.absorb_meta_failures()
            await self.hooks.sync_members(None)
        except (DeviceError, OSError, NoSpace, StorageError) as e:
            self.fail(f"checkpoint {st.generation}: {e}")
            raise PoolFailed(f"pool {st.name}: checkpoint failed: {e}") from e
        # The new superblock is durable: the old checkpoint's space may now be reused.
        self.meta.flipped(plan)
        self.sb_gen = st.generation
        self._after_commit("checkpoints", ops_covered, freed_here)
