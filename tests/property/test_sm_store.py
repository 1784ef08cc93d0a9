"""A hypothesis state machine for the segment allocator: ``LocalStore`` (pool.store)
driven through its ``SegmentStore`` Protocol alone, on small real file devices, against a
dict model (issue 23).

Rules allocate a segment of a random profile, write a run of records into one, free one,
report a commit durable covering the first n pending frees, begin a read (``read_hold``),
end one (twice, sometimes), and reclaim. The model knows which (member, extent) is free,
which segment holds which, what frees are pending (in free order), which are releasable
and since which commit, and which reads are in flight and after how many commits they
began. Its release rule is the specification: an extent freed by commit c comes back once
every read in flight began after commit c was durable.

Checked after every step ("store invariant N" is pool.store's numbered list):
- every live placement has k + m columns on distinct members (store invariant 1);
- the store's free extents are exactly the model's: nothing a segment holds is free, and
  nothing allocated was not free (store invariant 2, DESIGN 3);
- freed space comes back only after its commit is durable and the older reads have ended,
  never before (store invariant 3): same check, since the model releases no earlier;
- every live segment's written records read back byte-exact through its column handles.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import trio
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from pool import codec, records
from pool.deadlines import Deadlines
from pool.device import Device, FileDevice
from pool.errors import NoSpace
from pool.layout import Layout
from pool.state import MemberInfo, PoolState, Segment
from pool.store import LocalStore, Reclaim, SegmentStore
from tests.kit.releasemodel import ReleaseModel
from tests.kit.trioportal import TrioPortal

EXT = 1 << 20
N_DEV = 4
BS = 4096
PROFILES = [(1, 0), (1, 1), (2, 1), (2, 2), (3, 1)]
Key = tuple[int, int]                 # (member, extent)


class _Hooks:
    """The pool's side of ``StoreHooks``: nothing here may fault or fail."""

    closed = False
    stopped = False

    def fault(self, index: int, why: str, *, state: str = "faulted",
              full: bool = False) -> None:
        raise AssertionError(f"member {index} faulted: {why}")

    def count_error(self, index: int, kind: str, why: str = "") -> None:
        raise AssertionError(f"member {index}: {kind} error {why}")

    def count(self, counter: str, n: int) -> None:
        pass


class StoreMachine(ReleaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="sm-store-")
        layout = Layout.choose(64 << 20, EXT, None)
        size = layout.data_offset + 2 * EXT + 2 * layout.extent_size
        self.devices: list[Device | None] = [
            FileDevice(os.path.join(self.tmp, f"d{i}"), create_size=size)
            for i in range(N_DEV)]
        n = layout.n_extents(size)
        self.state = PoolState("pool-uuid", "sm", EXT, "ec:2+1",
                               [MemberInfo(f"u{i}", i, size, n) for i in range(N_DEV)])
        self.local = LocalStore(self.state, layout, self.devices, Deadlines(), _Hooks(),
                                discard_freed=False)
        self.local.free_extents = [set(range(n)) for _ in range(N_DEV)]
        self.store: SegmentStore = self.local
        self.portal = TrioPortal()
        # The model.
        self.free: set[Key] = {(i, e) for i in range(N_DEV) for e in range(n)}
        self.segs: dict[int, Segment] = {}                    # live segments
        self.data: dict[int, list[tuple[int, bytes, codec.EncodedRecord]]] = {}
        self.init_release_model()      # pending frees, commits, reads (tests.kit)

    def released(self, unit: Key) -> None:
        self.free.add(unit)

    # ---- rules --------------------------------------------------------------------------

    @rule(prof=st.sampled_from(PROFILES))
    def allocate(self, prof: tuple[int, int]) -> None:
        k, m = prof
        members_free = {i for i, _e in self.free}
        try:
            placement = self.store.allocate(k, m)
        except NoSpace:
            event("allocation refused")
            assert len(members_free) < k + m      # refused only when truly no room
            return
        assert len(placement) == k + m
        assert len({i for i, _e in placement}) == k + m          # store invariant 1
        assert set(placement) <= self.free, "allocated space that is not free"  # inv. 2
        self.free -= set(placement)
        seg = Segment(self.state.next_id, k, m, placement, 0)
        self.state.segments[seg.id] = seg
        self.state.next_id += 1
        self.segs[seg.id] = seg
        self.data[seg.id] = []

    @precondition(lambda self: self.segs)
    @rule(pick=st.integers(0, 1 << 16), n=st.integers(1, 3), seed=st.integers(0, 1 << 16))
    def write_run(self, pick: int, n: int, seed: int) -> None:
        seg = self.segs[sorted(self.segs)[pick % len(self.segs)]]
        have = self.data[seg.id]
        off = have[-1][0] + have[-1][2].units if have else 0
        datas = [seed.to_bytes(4, "little") + bytes([j]) + os.urandom(BS - 5)
                 for j in range(n)]
        recs = [codec.encode(d, seg.k, seg.m, False) for d in datas]
        out = self.portal.run(self.store.write, [(seg, off, recs)])
        assert out.failed == frozenset()
        assert out.written == {i for i, _e in seg.extents}
        self.portal.run(self.store.sync, sorted(out.written))
        for d, r in zip(datas, recs, strict=True):
            have.append((off, d, r))
            off += r.units

    @precondition(lambda self: self.segs)
    @rule(pick=st.integers(0, 1 << 16))
    def free_segment(self, pick: int) -> None:
        sid = sorted(self.segs)[pick % len(self.segs)]
        seg = self.segs.pop(sid)
        del self.data[sid]
        del self.state.segments[sid]
        self.store.free(seg.extents)
        self.pending.extend(seg.extents)

    @rule()
    def reclaim(self) -> None:
        async def call() -> Reclaim | None:
            with trio.move_on_after(0.01):
                return await self.store.reclaim()
            return None
        got = self.portal.run(call)
        if self.releasable:
            assert got is None, "reclaim returned while older reads hold freed space"
            event("reclaim waits for older reads")
        else:
            assert got is (Reclaim.COMMIT if self.pending else Reclaim.NOTHING)

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def free_as_model(self) -> None:
        got = {(i, e) for i, f in enumerate(self.local.free_extents) for e in f}
        assert got == self.free, (sorted(got - self.free), sorted(self.free - got))
        held = [key for seg in self.segs.values() for key in seg.extents]
        assert len(held) == len(set(held)) and not set(held) & got     # invariants 1, 2
        for seg in self.segs.values():
            assert len({i for i, _e in seg.extents}) == seg.k + seg.m  # invariant 1

    @invariant()
    def reads_back(self) -> None:
        for sid, have in self.data.items():
            if not have:
                continue
            seg = self.segs[sid]
            cols = self.store.columns(seg)
            plans = [records.RecordPlan(n, sid, off, r.units, seg.k, seg.m, r.plen, r.flags,
                                        r.rhash, cols)
                     for n, (off, _d, r) in enumerate(have)]
            got = records.read_records(plans, BS, Deadlines())
            assert not got.failures and got.degraded == 0
            for n, (_off, d, _r) in enumerate(have):
                assert bytes(got.payloads[n]) == d, f"segment {sid} record {n}"

    def teardown(self) -> None:
        try:
            for d in self.devices:
                if d is not None:
                    d.close()
        finally:
            self.portal.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_store_machine = StoreMachine.TestCase
