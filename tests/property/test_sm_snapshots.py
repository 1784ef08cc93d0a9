"""A hypothesis state machine for block maps, snapshots and clones (DESIGN invariants 6
and 7; volumes.manager's rules on clones, rollback and deletion).

The machine drives a real Pool (three small files, ec:2+1) through a VolumeManager and keeps
a dict model: volume name -> its bytes, (volume, snapshot) -> the bytes it froze, clone ->
the snapshot it came from. Rules write and trim ranges, snapshot, clone, roll back, delete
snapshots and volumes (the refusals the manager must give, with nothing changed), flush,
commit + close + re-import, and delete everything. Unlike test_snapshots' seeded program,
a failure shrinks to a short list of these steps.

Checked:
- after every step, every volume and every snapshot reads byte-exact as its model
  (invariant 7: a snapshot holds exactly what was acknowledged before it; copy-on-write
  sharing never leaks a write into a sibling);
- after a flush or a re-import, exact accounting: the bytes unique to each volume and
  snapshot plus the shared bytes equal the distinct live record bytes (invariant 6);
- when everything is deleted, no live data and no map node remains (invariant 6), and the
  checker finds the pool consistent.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pool import FileDevice, Pool
from pool.checker import check
from pool.errors import Busy
from tests.kit.trioportal import TrioPortal, tear_down
from volumes import VolumeManager

BS = 4096
SIZE = 8 * BS
NDEV = 3


def _pattern(seed: int, n: int) -> bytes:
    """Bytes that differ by position, so a misplaced block or offset shows."""
    return bytes((seed + i * 7) % 251 + 1 for i in range(n))


async def _space_is_exact(pool: Pool, vm: VolumeManager) -> None:
    for name in vm.names():
        await vm.get(name).flush()
    used, shared = pool.record_space()
    unique = sum(vm.get(n).statistics().unique_bytes for n in vm.names())
    unique += sum(vm.snapshot_info(n, s)["unique_bytes"] for n in vm.names()
                  for s in vm.snapshot_names(n))
    assert unique + shared == used, f"unique {unique} + shared {shared} != used {used}"


class SnapshotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="sm-snap-")
        self.paths = [os.path.join(self.tmp, f"d{i}") for i in range(NDEV)]
        self.portal = TrioPortal()
        self.pool: Pool = self.portal.run(self._create)
        self.vm = VolumeManager(self.pool)
        self.portal.run(self._make, "v")
        self.vols: dict[str, bytearray] = {"v": bytearray(SIZE)}
        self.snaps: dict[tuple[str, str], bytes] = {}
        self.origin: dict[str, tuple[str, str]] = {}
        self.counter = 0

    async def _create(self) -> Pool:
        return await Pool.create("sm", [FileDevice(p, create_size=24 << 20)
                                        for p in self.paths],
                                 profile="ec:2+1", extent_size=256 << 10, meta_size=2 << 20)

    async def _make(self, name: str) -> None:
        await self.vm.create(name, SIZE, block_size=BS)

    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _vol(self, i: int) -> str:
        return sorted(self.vols)[i % len(self.vols)]

    def _snap(self, i: int) -> tuple[str, str]:
        return sorted(self.snaps)[i % len(self.snaps)]

    def _cloned(self, key: tuple[str, str]) -> bool:
        return key in self.origin.values()

    # ---- rules --------------------------------------------------------------------------

    @rule(i=st.integers(0, 7), off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * BS + 1),
          seed=st.integers(0, 250))
    def write(self, i: int, off: int, n: int, seed: int) -> None:
        name = self._vol(i)
        n = min(n, SIZE - off)
        data = _pattern(seed, n)
        self.portal.run(self.vm.get(name).write, off, data)
        self.vols[name][off:off + n] = data

    @rule(i=st.integers(0, 7), blk=st.integers(0, SIZE // BS - 1), nblk=st.integers(1, 3))
    def trim(self, i: int, blk: int, nblk: int) -> None:
        name = self._vol(i)
        off, n = blk * BS, min(nblk * BS, SIZE - blk * BS)
        self.portal.run(self.vm.get(name).trim, off, n)
        self.vols[name][off:off + n] = bytes(n)

    @rule(i=st.integers(0, 7))
    def snapshot(self, i: int) -> None:
        name, snap = self._vol(i), self._name("s")
        self.portal.run(self.vm.snapshot, name, snap)
        self.snaps[(name, snap)] = bytes(self.vols[name])

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 7))
    def clone(self, i: int) -> None:
        key = self._snap(i)
        clone = self._name("c")
        self.portal.run(self.vm.clone, *key, clone)
        event("clone of a snapshot its volume has moved away from"
              if key[0] in self.vols and bytes(self.vols[key[0]]) != self.snaps[key]
              else "clone of a snapshot equal to its volume")
        self.vols[clone] = bytearray(self.snaps[key])
        self.origin[clone] = key

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 7))
    def rollback(self, i: int) -> None:
        vol, snap = self._snap(i)
        self.portal.run(self.vm.rollback, vol, snap)
        self.vols[vol] = bytearray(self.snaps[(vol, snap)])

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 7))
    def delete_snapshot(self, i: int) -> None:
        key = self._snap(i)
        if self._cloned(key):
            # Refused while clones exist; the invariant check after the step proves
            # nothing changed.
            with pytest.raises(Busy, match="has clones"):
                self.portal.run(self.vm.delete_snapshot, *key)
            return
        self.portal.run(self.vm.delete_snapshot, *key)
        del self.snaps[key]

    @precondition(lambda self: len(self.vols) > 1)
    @rule(i=st.integers(0, 7))
    def delete_volume(self, i: int) -> None:
        victim = self._vol(i)
        if any(o[0] == victim for o in self.origin.values()):
            with pytest.raises(Busy):
                self.portal.run(self._delete, victim)
            return
        self.portal.run(self._delete, victim)
        del self.vols[victim]
        self.origin.pop(victim, None)
        for key in [k for k in self.snaps if k[0] == victim]:
            del self.snaps[key]

    async def _delete(self, name: str) -> None:
        await self.vm.delete(name, recursive=True)

    @rule()
    def flush_and_account(self) -> None:
        self.portal.run(_space_is_exact, self.pool, self.vm)

    @rule()
    def reimport(self) -> None:
        """Commit, close and import again: the model must survive (the close writes the
        buffered data back)."""
        self.portal.run(self._reimport)
        self.portal.run(_space_is_exact, self.pool, self.vm)

    async def _reimport(self) -> None:
        await self.pool.commit()
        await self.pool.close()
        self.pool = await Pool.open([FileDevice(p) for p in self.paths])
        self.vm = VolumeManager(self.pool)

    @rule()
    def delete_everything(self) -> None:
        """Clones first (newest first), then every volume with its snapshots: no live data
        and no map node may remain (invariant 6); then start again with an empty 'v'."""
        self.portal.run(self._delete_everything)
        self.vols, self.snaps, self.origin = {"v": bytearray(SIZE)}, {}, {}
        self.portal.run(self._make, "v")

    async def _delete_everything(self) -> None:
        for clone in sorted(self.origin, key=lambda c: -int(c[1:])):
            await self.vm.delete(clone, recursive=True)
        for name in self.vm.names():
            await self.vm.delete(name, recursive=True)
        await self.pool.commit()
        assert self.pool.statistics().live_bytes == 0
        assert self.pool.record_space() == (0, 0)
        assert not self.pool.state.forest.nodes, "map nodes leaked"
        report = await check(self.pool)
        assert report.ok, report.render()

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def everything_reads_as_its_model(self) -> None:
        self.portal.run(self._verify)

    async def _verify(self) -> None:
        assert sorted(self.vm.names()) == sorted(self.vols)
        for name, model in self.vols.items():
            assert await self.vm.get(name).read(0, SIZE) == bytes(model), name
        for (vol, snap), content in self.snaps.items():
            view = self.vm.snapshot_volume(vol, snap)
            assert await view.read(0, SIZE) == content, f"{vol}@{snap}"

    def teardown(self) -> None:
        tear_down(self.portal, self.pool, self.tmp)


SnapshotMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_snapshot_machine = SnapshotMachine.TestCase
