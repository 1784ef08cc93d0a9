"""RadosStore (pool/rados/store.py) driven through the SegmentStore Protocol alone, against
a real one-node Ceph cluster, as tests/unit/test_store.py drives LocalStore on files: what a
second backend must pass.

"RadosStore invariant N" is pool/rados/store.py's list; "Store N" is pool.store's;
DESIGN's are cited as "DESIGN N"."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pool import codec, records
from pool.deadlines import Deadlines
from pool.errors import InvalidArgument, NoSpace
from pool.profile import Profile
from pool.rados.conn import Connection, Fenced
from pool.rados.owner import OwnershipLock
from pool.rados.segments import RadosSegments
from pool.rados.store import RadosStore
from pool.state import PoolState, Segment
from pool.store import Column, Reclaim, SegmentStore
from tests.kit.cephkit import TEST_POOL, Cluster, why_not
from tests.kit.releasemodel import ReleaseModel
from tests.kit.trioportal import TrioPortal
from tests.rados.radoskit import connect, new_uuid, owner, snapshot

SEG = 4 << 20            # the pool's extent size: one segment object's capacity
BS = 64 * 1024
QUOTA = 1 << 30


async def _quota(conn: Connection, max_bytes: int) -> None:
    """The test pool's quota: no mgr runs, so it is the capacity RadosStore knows."""
    await conn.mon_command({"prefix": "osd pool set-quota", "pool": TEST_POOL,
                            "field": "max_bytes", "val": str(max_bytes)})


class Hooks:
    """The pool's side of ``StoreHooks``, recording what the store reports."""

    def __init__(self) -> None:
        self.faults: list[tuple[int, str]] = []
        self.errors: list[tuple[int, str]] = []
        self.counts: dict[str, int] = {}
        self.closed = False
        self.stopped = False
        self.counted = trio.Event()

    def fault(self, index: int, why: str, *, state: str = "faulted",
              full: bool = False) -> None:
        self.faults.append((index, why))

    def count_error(self, index: int, kind: str, why: str = "") -> None:
        self.errors.append((index, kind))

    def count(self, counter: str, n: int) -> None:
        self.counts[counter] = self.counts.get(counter, 0) + n
        self.counted.set()


def _state(profile: str = "plain") -> PoolState:
    return PoolState(new_uuid(), "tank", SEG, profile, [])


async def _store(conn: Connection, profile: str = "plain"
                 ) -> tuple[RadosStore, Hooks, PoolState]:
    await _quota(conn, QUOTA)
    state, hooks = _state(profile), Hooks()
    return await RadosStore.open(conn, state, hooks), hooks, state


def _segment(state: PoolState, placement: tuple[tuple[int, int], ...]) -> Segment:
    seg = Segment(state.next_id, 1, 0, placement, 0)
    state.segments[seg.id] = seg
    state.next_id += 1
    return seg


def _plans(seg: Segment, cols: tuple[Column, ...], offs: list[int],
           recs: list[codec.EncodedRecord]) -> list[records.RecordPlan]:
    return [records.RecordPlan(n, seg.id, off, rec.units, seg.k, seg.m, rec.plen, rec.flags,
                               rec.rhash, cols)
            for n, (off, rec) in enumerate(zip(offs, recs, strict=True))]


async def _write(store: SegmentStore, seg: Segment, datas: list[bytes]
                 ) -> tuple[list[codec.EncodedRecord], list[int]]:
    recs = [codec.encode(d, 1, 0, True) for d in datas]
    offs = [sum(r.units for r in recs[:i]) for i in range(len(recs))]
    half = len(recs) // 2
    out = await store.write([(seg, 0, recs[:half]), (seg, offs[half], recs[half:])])
    assert out.written == {0} and out.failed == frozenset()
    await store.sync(sorted(out.written))
    return recs, offs


def _exists(conn: Connection, oid: str) -> bool:
    try:
        conn.ioctx.stat(oid)
    except conn.rados.ObjectNotFound:
        return False
    return True


async def test_a_segment_round_trip_through_the_protocol(ceph: Cluster) -> None:
    """RadosStore invariants 2, 4 (Store 2, 5, 6; DESIGN 1, 4): a plain segment is one
    object under the pool's uuid, written in two runs at once (each at its offset),
    read back byte-exact through the column readers; compressed and
    incompressible records alike; numbers are never handed out twice."""
    conn = await connect(ceph)
    rs, hooks, state = await _store(conn)
    store: SegmentStore = rs
    placement = store.allocate(1, 0)
    assert placement[0][0] == 0
    seg = _segment(state, placement)
    datas = [os.urandom(BS // 2) * 2, os.urandom(BS), bytes(BS), os.urandom(BS),
             b"x" * BS]
    recs, offs = await _write(store, seg, datas)
    cols = store.columns(seg)
    oid = f"{state.uuid}.seg.{placement[0][1]:016x}.0"
    assert [c.name for c in cols] == [oid] and cols[0].base == 0
    assert _exists(conn, oid)
    got = await trio.to_thread.run_sync(
        records.read_records, _plans(seg, cols, offs, recs), BS, Deadlines())
    assert not got.failures, got.failures
    assert [bytes(got.payloads[i]) for i in range(len(datas))] == datas
    assert not got.failures and not hooks.errors and not hooks.faults
    # The object holds exactly the runs written, back to back.
    size, _mtime = conn.ioctx.stat(oid)
    assert size == sum(r.units for r in recs) * 512
    more = [store.allocate(1, 0) for _ in range(20)]
    numbers = [p[0][1] for p in [placement, *more]]
    assert len(set(numbers)) == len(numbers)                    # invariant 2
    # A second store on the same pool state (a reopen) starts above what exists.
    again = await RadosStore.open(conn, state, Hooks())
    assert again.allocate(1, 0)[0][1] > placement[0][1]
    assert [h.present for h in store.health()] == [True]
    assert store.health()[0].name == f"rados:{TEST_POOL} (HEALTH_OK)" or \
        store.health()[0].name.startswith(f"rados:{TEST_POOL} (HEALTH_")
    await conn.close()


async def test_redundant_profiles_are_refused_and_change_nothing(ceph: Cluster) -> None:
    """RadosStore invariant 1 (Store 1): ec: and mirror: are refused with a message that
    says redundancy is the RADOS pool's, by open and by allocate; nothing is written,
    no number is taken. A RADOS pool without quota (and no mgr) is refused too."""
    conn = await connect(ceph)
    for profile in ("ec:2+1", "mirror:2"):
        state = _state(profile)
        before = snapshot(conn, state.uuid)
        with pytest.raises(InvalidArgument, match="redundancy is the RADOS pool's"):
            await RadosStore.open(conn, state, Hooks())
        assert snapshot(conn, state.uuid) == before == {}
    rs, _hooks, state = await _store(conn)
    held, nxt = set(rs.held), rs._next
    for k, m in ((2, 1), (1, 1), (4, 2)):
        with pytest.raises(InvalidArgument, match=f"RADOS pool {TEST_POOL}: redundancy"):
            rs.allocate(k, m)
    assert rs.held == held and rs._next == nxt
    assert snapshot(conn, state.uuid) == {}
    # No quota and no mgr: nobody states the capacity, so the store is refused.
    await _quota(conn, 0)
    try:
        with pytest.raises(InvalidArgument, match="no quota"):
            await RadosStore.open(conn, _state(), Hooks())
    finally:
        await _quota(conn, QUOTA)
    await conn.close()


async def test_room_is_the_quota(ceph: Cluster) -> None:
    """room/free_bytes come from the RADOS pool's quota (read by a mon command); a store
    that has handed out all of it raises NoSpace, and a deleted segment gives room back."""
    conn = await connect(ceph)
    rs, _hooks, _state = await _store(conn)
    store: SegmentStore = rs
    out = await conn.mon_command({"prefix": "osd pool ls", "detail": "detail",
                                  "format": "json"})
    assert [p["quota_max_bytes"] for p in json.loads(out) if p["pool_name"] == TEST_POOL] \
        == [QUOTA]
    plain = Profile(1, 0)
    assert store.room(plain).capacity_bytes == QUOTA
    assert store.room(plain).free_bytes == QUOTA
    taken = [store.allocate(1, 0) for _ in range(QUOTA // SEG)]
    assert store.room(plain).free_bytes == 0 and store.room(plain).with_room == 0
    with pytest.raises(NoSpace, match="no room for a new segment"):
        store.allocate(1, 0)
    store.free(taken[0])
    store.durable(1)
    await store.run(settle=True)
    assert store.room(plain).free_bytes == SEG
    assert store.allocate(1, 0)[0][1] not in {p[0][1] for p in taken}   # invariant 2
    await conn.close()


async def test_freed_objects_go_after_the_commit_and_older_reads(ceph: Cluster) -> None:
    """RadosStore invariant 3 (Store 3; DESIGN 3): a freed segment's object stays while
    its free is not durable, and while a read begun before the freeing commit is in
    flight (a read begun after does not hold it back); then reclaim deletes it, and the
    column still reads byte-exact until then."""
    conn = await connect(ceph)
    rs, hooks, state = await _store(conn)
    store: SegmentStore = rs
    seg = _segment(state, store.allocate(1, 0))
    datas = [os.urandom(BS) for _ in range(4)]
    recs, offs = await _write(store, seg, datas)
    oid = store.columns(seg)[0].name
    old = store.read_hold()                    # a read that may still reach the segment
    store.free(seg.extents)
    assert await store.reclaim() is Reclaim.COMMIT   # nothing durable: a commit would do
    await store.run(settle=True)
    assert _exists(conn, oid)                  # not durable yet
    store.durable(1)
    await store.run(settle=True)
    assert _exists(conn, oid)                  # durable, but an older read is in flight
    got = await trio.to_thread.run_sync(
        records.read_records, _plans(seg, store.columns(seg), offs, recs), BS, Deadlines())
    assert not got.failures, got.failures
    assert [bytes(got.payloads[i]) for i in range(4)] == datas
    late = store.read_hold()                   # begun after the commit: does not hold it
    async with trio.open_nursery() as nursery:
        async def reclaim() -> None:
            while await store.reclaim() is Reclaim.WAITED:
                pass
        nursery.start_soon(reclaim)
        await trio.sleep(0.2)
        assert _exists(conn, oid)              # reclaim waits for the older read
        old.release()
    assert not _exists(conn, oid)
    late.release()
    assert hooks.counts.get("discarded_extents") == 1 and not hooks.errors
    await conn.close()


async def test_run_deletes_released_objects_in_the_background(ceph: Cluster) -> None:
    """The store's background task (owned by a nursery) deletes released objects as they
    come, and returns when the pool closes."""
    conn = await connect(ceph)
    rs, hooks, state = await _store(conn)
    seg = _segment(state, rs.allocate(1, 0))
    await _write(rs, seg, [os.urandom(BS)])
    oid = rs.columns(seg)[0].name
    async with trio.open_nursery() as nursery:
        await nursery.start(rs.run)
        rs.free(seg.extents)
        rs.durable(1)
        with trio.fail_after(10):
            await hooks.counted.wait()
        assert not _exists(conn, oid)
        hooks.closed = True
        rs.wake()
    assert hooks.counts.get("discarded_extents") == 1
    await conn.close()


async def test_a_fenced_store_cannot_write(ceph: Cluster) -> None:
    """RadosStore invariant 5 (DESIGN 10): after another daemon's takeover blocklists
    this client, the store reports it once through hooks.fault, and write, sync,
    allocate and deletes fail with Fenced; the object keeps the bytes written before."""
    a, b = await connect(ceph), await connect(ceph)
    rs, hooks, state = await _store(a)
    await OwnershipLock(a, state.uuid, owner("a")).acquire(create=True)
    seg = _segment(state, rs.allocate(1, 0))
    recs, _offs = await _write(rs, seg, [os.urandom(BS) for _ in range(2)])
    oid = rs.columns(seg)[0].name
    before = bytes(b.ioctx.read(oid, 1 << 20))
    lb = OwnershipLock(b, state.uuid, owner("b"))
    await lb.acquire(takeover=True)
    more = [codec.encode(os.urandom(BS), 1, 0, False)]
    end = sum(r.units for r in recs)
    with pytest.raises(Fenced, match="blocklisted"):
        await rs.write([(seg, end, more)])
    assert len(hooks.faults) == 1 and hooks.faults[0][0] == 0
    assert "blocklisted" in hooks.faults[0][1]
    with pytest.raises(Fenced):
        await rs.write([(seg, 0, more)])
    with pytest.raises(Fenced):
        await rs.sync()
    with pytest.raises(Fenced):
        rs.allocate(1, 0)
    rs.free(seg.extents)
    rs.durable(1)
    with pytest.raises(Fenced):
        await rs.run(settle=True)
    assert [h.present for h in rs.health()] == [False]
    assert len(hooks.faults) == 1
    assert bytes(b.ioctx.read(oid, 1 << 20)) == before
    await lb.release()
    await a.close()
    await b.close()


async def test_sweep_deletes_only_unreferenced_objects(ceph: Cluster) -> None:
    """RadosStore invariant 2 and the open's sweep: objects a crash left under the
    pool's prefix (freed but not deleted, written but never committed) are deleted; the
    segments the state references and other pools' objects stay; new numbers start
    above every object found, so none is written over."""
    conn = await connect(ceph)
    state, other = _state(), _state()
    kept = _segment(state, ((0, 3),))
    for ps, n in ((state, 3), (state, 5), (state, 9), (other, 5)):
        await RadosSegments(conn, ps.uuid).write_at(n, 0, 0, os.urandom(4096))
    before_other = snapshot(conn, other.uuid)
    kept_bytes = snapshot(conn, state.uuid)[f"{state.uuid}.seg.{3:016x}.0"]
    await _quota(conn, QUOTA)
    rs = await RadosStore.open(conn, state, Hooks())
    assert rs.allocate(1, 0)[0][1] == 10
    assert await rs.sweep() == 2
    assert await rs.sweep() == 0
    now = snapshot(conn, state.uuid)
    assert now == {f"{state.uuid}.seg.{3:016x}.0": kept_bytes}
    assert snapshot(conn, other.uuid) == before_other
    assert kept.extents == ((0, 3),)
    await conn.close()


async def test_a_refused_write_is_counted_and_changes_nothing(ceph: Cluster) -> None:
    """RadosStore invariant 4 (Store 5): a write the OSD refuses (past
    osd_max_object_size: EFBIG, a real refusal, not a mock) comes back in ``failed``,
    is counted against domain 0, and writes nothing; the store goes on serving."""
    conn = await connect(ceph)
    rs, hooks, state = await _store(conn)
    seg = _segment(state, rs.allocate(1, 0))
    rec = codec.encode(os.urandom(BS), 1, 0, False)
    out = await rs.write([(seg, (256 << 20) // 512, [rec])])
    assert out.failed == {0} and out.written == frozenset()
    assert hooks.errors == [(0, "write")] and not hooks.faults
    assert snapshot(conn, state.uuid) == {}
    recs, offs = await _write(rs, seg, [os.urandom(BS) for _ in range(2)])
    got = await trio.to_thread.run_sync(
        records.read_records, _plans(seg, rs.columns(seg), offs, recs), BS, Deadlines())
    assert not got.failures and len(got.payloads) == 2
    await conn.close()


@pytest.mark.slow
async def test_room_from_the_cluster_when_a_mgr_reports(tmp_path: Path) -> None:
    """With a mgr, the cluster's free raw space divided by the pool's size bounds the
    room, and a RADOS pool without a quota is accepted (its room is the cluster's)."""
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    c = await trio.to_thread.run_sync(partial(Cluster.start, tmp_path / "c", mgr=True))
    try:
        conn = await Connection.open(TEST_POOL, conf=str(c.conf))
        with trio.fail_after(60):           # the mgr reports some seconds after its start
            while not (u := await conn.usage()).known:  # noqa: ASYNC110 (polls the mgr)
                await trio.sleep(0.5)
        rs = await RadosStore.open(conn, _state(), Hooks())    # no quota: still accepted
        assert rs.quota_bytes == 0
        cap = rs.capacity()
        assert 0 < cap <= u.avail_bytes and cap % SEG == 0        # the pool's size is 1
        assert cap > u.avail_bytes - 64 * SEG                     # (others' writes aside)
        assert rs.room(Profile(1, 0)).capacity_bytes == cap
        await _quota(conn, 64 * SEG)                              # the smaller bound wins
        await rs.refresh()
        assert rs.capacity() == 64 * SEG
        await conn.close()
    finally:
        await trio.to_thread.run_sync(c.stop)


# ==== a hypothesis state machine against a dict model (issue 24: "hypothesis model tests
# run against a RADOS-backed store as well as files") ====================================

CAP = 6                  # segments the machine's quota holds (so NoSpace is exercised)


class RadosStoreMachine(ReleaseModel):
    """RadosStore driven through the SegmentStore Protocol alone, on the real cluster,
    against a model of numbers: which were handed out, which hold records, which frees are
    pending, durable (and since which commit) or released, which reads are in flight, and
    which objects were deleted. The model's release rule is the specification of
    RadosStore invariant 3 (Store 3): a freed object goes only once its freeing commit is
    durable and every read begun before that commit has ended.

    Checked after every step: the objects under the pool's prefix are exactly the written
    numbers not yet deleted (so nothing pending, or held back by a read, was deleted:
    invariant 3); the store's held set is what the model holds; numbers only grow
    (invariant 2); every live segment reads back byte-exact through its column."""

    cluster: Cluster

    def __init__(self) -> None:
        super().__init__()
        self.portal = TrioPortal()
        self.conn = self.portal.run(connect, self.cluster)
        self.portal.run(_quota, self.conn, CAP * SEG)
        self.state = _state()
        self.hooks = Hooks()
        self.store: RadosStore = self.portal.run(RadosStore.open, self.conn, self.state,
                                                 self.hooks)
        self.handed: list[int] = []
        self.segs: dict[int, Segment] = {}
        self.data: dict[int, list[tuple[int, bytes, codec.EncodedRecord]]] = {}
        self.written: set[int] = set()
        self.init_release_model()      # pending frees, commits, reads (tests.kit)
        self.releasing: set[int] = set()                  # released, not yet deleted
        self.deleted: set[int] = set()

    def released(self, unit: int) -> None:
        self.releasing.add(unit)

    def _deleted_now(self) -> None:
        """What the store deletes when it deletes (reclaim, settle): every released
        number."""
        self.deleted |= self.releasing
        self.releasing = set()

    @rule()
    def allocate(self) -> None:
        held = set(self.handed) - self.deleted
        try:
            placement = self.store.allocate(1, 0)
        except NoSpace:
            assert len(held) + 1 > CAP, "refused with room left"
            event("allocation refused")
            return
        assert len(held) + 1 <= CAP, "allocated beyond the quota"
        ((domain, n),) = placement
        assert domain == 0 and all(n > h for h in self.handed)      # invariant 2
        self.handed.append(n)
        seg = _segment(self.state, placement)
        self.segs[seg.id] = seg
        self.data[seg.id] = []

    @rule(prof=st.sampled_from([(2, 1), (1, 1), (4, 2), (1, 2)]))
    def allocate_redundant(self, prof: tuple[int, int]) -> None:
        held, nxt = set(self.store.held), self.store._next
        with pytest.raises(InvalidArgument, match="redundancy is the RADOS pool's"):
            self.store.allocate(*prof)
        assert self.store.held == held and self.store._next == nxt  # invariant 1

    @precondition(lambda self: self.segs)
    @rule(pick=st.integers(0, 1 << 16), n=st.integers(1, 3), seed=st.integers(0, 1 << 16),
          compress=st.booleans())
    def write_run(self, pick: int, n: int, seed: int, compress: bool) -> None:
        seg = self.segs[sorted(self.segs)[pick % len(self.segs)]]
        have = self.data[seg.id]
        off = have[-1][0] + have[-1][2].units if have else 0
        if (off + n * (BS // 512 + 1)) * 512 > SEG:
            return
        datas = [seed.to_bytes(4, "little") + bytes([j]) * (BS - 4) if compress
                 else seed.to_bytes(4, "little") + os.urandom(BS - 4) for j in range(n)]
        recs = [codec.encode(d, 1, 0, compress) for d in datas]
        out = self.portal.run(self.store.write, [(seg, off, recs)])
        assert out.written == {0} and out.failed == frozenset()    # invariant 4
        self.written.add(seg.extents[0][1])
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
        self.pending.extend(n for _d, n in seg.extents)

    @rule()
    def reclaim(self) -> None:
        async def call() -> Reclaim | None:
            with trio.move_on_after(0.5):
                return await self.store.reclaim()
            return None
        got = self.portal.run(call)
        self._deleted_now()
        if self.releasable:
            assert got is None, "reclaim returned while older reads hold freed objects"
            event("reclaim waits for older reads")
        else:
            assert got is (Reclaim.COMMIT if self.pending else Reclaim.NOTHING)

    @rule()
    def settle(self) -> None:
        self.portal.run(partial(self.store.run, settle=True))
        self._deleted_now()

    @invariant()
    def objects_as_model(self) -> None:
        prefix = f"{self.state.uuid}.seg."
        got = {int(o.key[len(prefix):].split(".")[0], 16)
               for o in self.conn.ioctx.list_objects() if o.key.startswith(prefix)}
        want = self.written - self.deleted
        assert got == want, (sorted(got - want), sorted(want - got))
        assert self.store.held == set(self.handed) - self.deleted
        assert not self.hooks.errors and not self.hooks.faults

    @invariant()
    def reads_back(self) -> None:
        for sid, have in self.data.items():
            if not have:
                continue
            seg = self.segs[sid]
            cols = self.store.columns(seg)
            plans = [records.RecordPlan(n, sid, off, r.units, 1, 0, r.plen, r.flags, r.rhash,
                                        cols)
                     for n, (off, _d, r) in enumerate(have)]
            got = records.read_records(plans, BS, Deadlines())
            assert not got.failures, got.failures
            for n, (_off, d, _r) in enumerate(have):
                assert bytes(got.payloads[n]) == d, f"segment {sid} record {n}"

    def teardown(self) -> None:
        try:
            holds = [token for _seen, token in self.holds.values()]
            self.holds.clear()

            async def release_all() -> None:
                for token in holds:
                    token.release()
            self.portal.run(release_all)
            self.model_release()
            # Leave nothing behind in the shared RADOS pool, and its usual quota.
            while self.segs:
                self.free_segment(0)
            self.durable(len(self.pending))
            self.settle()
            self.portal.run(_quota, self.conn, QUOTA)
            self.portal.run(self.conn.close)
        finally:
            self.portal.close()


def test_rados_store_machine(ceph: Cluster) -> None:
    """RadosStore invariants 1-4 (Store 1-3; DESIGN 3) as a hypothesis state machine on
    the real cluster: failures shrink to short programs of Protocol calls."""
    RadosStoreMachine.cluster = ceph
    run_state_machine_as_test(RadosStoreMachine, settings=settings(
        max_examples=15, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
