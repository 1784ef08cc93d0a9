"""A hypothesis state machine for the segment allocator and space accounting (DESIGN
invariants 6 and 8; pool.pool invariant 3).

A real Pool (three small files, ec:2+1) holds one volume of incompressible blocks; the model
is block -> bytes plus the bytes reserved by hand. Rules reserve and unreserve space
directly on the pool (reservations beyond what is available must be refused with NoSpace
and change nothing), write one block (refused with NoSpace only while hand reservations
hold the space, and then nothing changes), trim (free) blocks, run the cleaner, commit,
and re-import. The pool is small enough that reservations and writes reach the full-pool
boundary.

Checked after every step:
- the volume reads byte-exact as its model, refused writes included (invariant 8: a
  refusal comes before anything changes);
- reserved_bytes is the hand reservations plus what buffered writes hold, and exactly the
  hand reservations once everything is written back;
- extents are conserved: those held by segments plus the free ones never exceed the
  members' capacity, and equal it once freed extents are released;
- after a flush, live_bytes is exactly (written non-zero blocks) x (one block record's
  k + m fragments) (invariant 6: space is consumed only by written data; a trim or an
  overwrite leaves nothing live behind), and record_space agrees.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pool import FileDevice, Pool, codec
from pool.errors import NoSpace
from pool.layout import SECTOR
from tests.kit.trioportal import TrioPortal, tear_down
from volumes import VolumeManager

BS = 64 << 10
BLOCKS = 48
NDEV = 3
K, M = 2, 1
RECORD = codec.fragment_units(BS, K) * SECTOR * (K + M)   # one stored block


def _block(seed: int) -> bytes:
    """Incompressible enough to be stored at full size, and different per seed."""
    return seed.to_bytes(4, "little") + os.urandom(BS - 4)


class SpaceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="sm-space-")
        self.paths = [os.path.join(self.tmp, f"d{i}") for i in range(NDEV)]
        self.portal = TrioPortal()
        self.pool: Pool = self.portal.run(self._create)
        self.vm = VolumeManager(self.pool)
        self.portal.run(self._make)
        self.blocks: dict[int, bytes] = {}
        self.reserved = 0

    async def _create(self) -> Pool:
        return await Pool.create("sp", [FileDevice(p, create_size=6 << 20)
                                        for p in self.paths],
                                 profile=f"ec:{K}+{M}", extent_size=256 << 10,
                                 meta_size=1 << 20)

    async def _make(self) -> None:
        await self.vm.create("v", BLOCKS * BS, block_size=BS, compression=False)

    # ---- rules --------------------------------------------------------------------------

    @rule(mib=st.integers(1, 12))
    def reserve(self, mib: int) -> None:
        before = self.pool.statistics().reserved_bytes
        try:
            self.pool.reserve(mib << 20)
        except NoSpace:
            event("reservation refused")
            assert self.pool.statistics().reserved_bytes == before   # nothing changed
            return
        self.reserved += mib << 20

    @rule()
    def reserve_until_full(self) -> None:
        """Reserve 256 KiB at a time until refused: the pool is then at its boundary, and
        the next write must make room or be refused."""
        while True:
            try:
                self.pool.reserve(256 << 10)
            except NoSpace:
                break
            self.reserved += 256 << 10

    @rule(mib=st.integers(1, 12))
    def unreserve(self, mib: int) -> None:
        n = min(mib << 20, self.reserved)
        self.pool.unreserve(n)
        self.reserved -= n

    @rule(b=st.integers(0, BLOCKS - 1), seed=st.integers(0, 1 << 16))
    def write(self, b: int, seed: int) -> None:
        data = _block(seed)
        try:
            self.portal.run(self.vm.get("v").write, b * BS, data)
        except NoSpace:
            # Only hand reservations may leave a write no room (the volume itself is
            # far smaller than the pool); the invariant proves nothing changed.
            event("write refused")
            assert self.reserved > 0
            return
        self.blocks[b] = data

    @rule(b=st.integers(0, BLOCKS - 1), n=st.integers(1, 8))
    def trim(self, b: int, n: int) -> None:
        n = min(n, BLOCKS - b)
        self.portal.run(self.vm.get("v").trim, b * BS, n * BS)
        for i in range(b, b + n):
            self.blocks.pop(i, None)

    @rule()
    def flush(self) -> None:
        self.portal.run(self.vm.get("v").flush)
        self._exact_live()

    @rule(threshold=st.sampled_from([0.5, 1.0]))
    def clean(self, threshold: float) -> None:
        self.portal.run(self._clean, threshold)
        self._exact_live()

    async def _clean(self, threshold: float) -> None:
        await self.vm.get("v").flush()
        await self.pool.clean(max_segments=8, threshold=threshold)
        await self.pool.commit()

    @rule()
    def reimport(self) -> None:
        self.portal.run(self._reimport)
        self.reserved = 0          # reservations are promises of one import, not stored
        self._exact_live()

    async def _reimport(self) -> None:
        await self.pool.close()
        self.pool = await Pool.open([FileDevice(p) for p in self.paths])
        self.vm = VolumeManager(self.pool)
        # Imported again: every extent is either a segment's or free (pool invariant 3's
        # frees are all committed now).
        st_ = self.pool.statistics()
        assert st_.allocated_bytes + st_.free_bytes == st_.capacity_bytes

    def _exact_live(self) -> None:
        """After a flush: the exact live bytes of the model's blocks (invariant 6)."""
        st_ = self.pool.statistics()
        assert st_.reserved_bytes == self.reserved
        assert st_.live_bytes == len(self.blocks) * RECORD, (st_.live_bytes, len(self.blocks))
        assert self.pool.record_space() == (len(self.blocks) * RECORD, 0)

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def reads_as_model(self) -> None:
        got = self.portal.run(self.vm.get("v").read, 0, BLOCKS * BS)
        for b in range(BLOCKS):
            assert got[b * BS:(b + 1) * BS] == self.blocks.get(b, bytes(BS)), f"block {b}"

    @invariant()
    def reservations_add_up(self) -> None:
        assert self.pool.statistics().reserved_bytes >= self.reserved

    @invariant()
    def extents_conserved(self) -> None:
        st_ = self.pool.statistics()
        assert st_.allocated_bytes + st_.free_bytes <= st_.capacity_bytes

    def teardown(self) -> None:
        tear_down(self.portal, self.pool, self.tmp)



SpaceMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_space_machine = SpaceMachine.TestCase
