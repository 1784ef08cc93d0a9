"""The SegmentStore seam (pool.store) on its own: LocalStore driven through the Protocol
alone, on real file devices, with no Pool -- what a second backend must also pass.

"Store invariant N" is pool.store's numbered list; DESIGN's are cited as "DESIGN N"."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import trio

from pool import codec, records
from pool.deadlines import Deadlines
from pool.device import Device, FileDevice
from pool.errors import NoSpace
from pool.layout import Layout
from pool.profile import Profile
from pool.state import MemberInfo, PoolState, Segment, op_json
from pool.store import Column, LocalStore, Reclaim, SegmentStore

EXT = 1 << 20
N_DEV = 4
BS = 64 * 1024


class Hooks:
    """The pool's side of ``StoreHooks``, recording what the store reports."""

    def __init__(self) -> None:
        self.faults: list[tuple[int, str]] = []
        self.errors: list[tuple[int, str]] = []
        self.counts: dict[str, int] = {}
        self.closed = False
        self.stopped = False

    def fault(self, index: int, why: str, *, state: str = "faulted",
              full: bool = False) -> None:
        self.faults.append((index, why))

    def count_error(self, index: int, kind: str, why: str = "") -> None:
        self.errors.append((index, kind))

    def count(self, counter: str, n: int) -> None:
        self.counts[counter] = self.counts.get(counter, 0) + n


def _store(tmp_path: Path, extents: int = 3, *, discard: bool = True
           ) -> tuple[LocalStore, list[Device | None], Hooks, PoolState]:
    layout = Layout.choose(64 << 20, EXT, None)
    size = layout.data_offset + extents * EXT + 2 * layout.extent_size
    devices: list[Device | None] = [
        FileDevice(str(tmp_path / f"d{i}"), create_size=size) for i in range(N_DEV)]
    n = layout.n_extents(size)
    members = [MemberInfo(f"u{i}", i, size, n) for i in range(N_DEV)]
    state = PoolState("pool-uuid", "tank", EXT, "ec:2+1", members)
    hooks = Hooks()
    store = LocalStore(state, layout, devices, Deadlines(), hooks, discard_freed=discard)
    store.free_extents = [set(range(n)) for _ in members]
    return store, devices, hooks, state


def _segment(state: PoolState, placement: tuple[tuple[int, int], ...], k: int,
             m: int) -> Segment:
    seg = Segment(state.next_id, k, m, placement, 0)
    state.segments[seg.id] = seg
    state.next_id += 1
    return seg


def _plans(seg: Segment, cols: tuple[Column, ...], offs: list[int],
           recs: list[codec.EncodedRecord]) -> list[records.RecordPlan]:
    return [records.RecordPlan(n, seg.id, off, rec.units, seg.k, seg.m, rec.plen, rec.flags,
                               rec.rhash, cols)
            for n, (off, rec) in enumerate(zip(offs, recs, strict=True))]


async def test_a_stripe_round_trip_through_the_protocol(tmp_path: Path) -> None:
    """Store invariants 1, 5, 6 (DESIGN 1, 4, 5): a segment placed on k + m distinct
    members, a run of records written and synced, read back byte-exact through the
    column handles; with one column lost, read back degraded, still byte-exact."""
    local, devices, hooks, state = _store(tmp_path)
    store: SegmentStore = local
    prof = Profile(2, 1)
    placement = store.allocate(prof.k, prof.m)
    assert len({d for d, _e in placement}) == prof.width          # invariant 1
    seg = _segment(state, placement, prof.k, prof.m)
    datas = [os.urandom(BS) for _ in range(5)]
    recs = [codec.encode(d, prof.k, prof.m, False) for d in datas]
    offs = [sum(r.units for r in recs[:i]) for i in range(len(recs))]
    out = await store.write([(seg, 0, recs[:3]), (seg, offs[3], recs[3:])])
    assert out.failed == frozenset() and out.written == {d for d, _e in placement}
    await store.sync(sorted(out.written))
    assert not hooks.faults and not hooks.errors

    got = records.read_records(_plans(seg, store.columns(seg), offs, recs), BS, Deadlines())
    assert [bytes(got.payloads[i]) for i in range(5)] == datas
    assert got.degraded == 0 and not got.failures

    # Lose one column (its member goes away, as Pool.fault does: the device, then the
    # member op; no call tells the store): reads go on degraded (store invariant 7).
    lost = placement[0][0]
    devices[lost] = None
    state.apply(op_json(op="member_state", index=lost, state="faulted"))
    cols = store.columns(seg)
    assert cols[0].reader is None and cols[0].name == f"member {lost} (missing)"
    got = records.read_records(_plans(seg, cols, offs, recs), BS, Deadlines())
    assert [bytes(got.payloads[i]) for i in range(5)] == datas
    assert got.degraded == 5 and not got.failures
    assert store.health()[lost].present is False


async def test_freed_space_waits_for_the_commit_and_older_reads(tmp_path: Path) -> None:
    """Store invariants 2, 3 (DESIGN 3; space rule S5): a freed segment's space is not
    handed out before its freeing commit is durable, nor while a read begun before that
    commit is in flight; then it is, and allocation never hands out space twice."""
    local, _devices, _hooks, _state = _store(tmp_path, extents=1, discard=False)
    store: SegmentStore = local
    prof = Profile(2, 1)
    before = store.room(prof).free_bytes
    taken = [store.allocate(prof.k, prof.m) for _ in range(len(local.free_extents[0]))]
    flat = [x for p in taken for x in p]
    assert len(set(flat)) == len(flat)                          # invariant 2: never twice
    assert store.room(prof).free_bytes < before
    while True:
        try:
            flat.extend(store.allocate(prof.k, prof.m))
        except NoSpace as e:
            assert "no room for a new ec:2+1 segment" in e.message
            break
    assert len(set(flat)) == len(flat)
    assert store.room(prof).free_bytes == 0
    left = {(i, e) for i, f in enumerate(local.free_extents) for e in f}
    assert await store.reclaim() is Reclaim.NOTHING
    reader = store.read_hold()               # a read that may still see the segment
    store.free(taken[0])
    assert await store.reclaim() is Reclaim.COMMIT   # the caller's next step: a commit
    with pytest.raises(NoSpace):
        store.allocate(prof.k, prof.m)       # not durable yet
    store.durable(len(taken[0]))
    with pytest.raises(NoSpace):
        store.allocate(prof.k, prof.m)       # durable, but an older read is in flight
    late = store.read_hold()                 # begun after the commit: does not hold it
    with trio.move_on_after(0.05) as waited:
        await store.reclaim()                # waits for the older read
    assert waited.cancelled_caught
    reader.release()
    reader.release()                         # a second release changes nothing:
    assert sum(local.readers.values()) == 1  # the late read still counts
    assert await store.reclaim() is Reclaim.NOTHING
    got = set(store.allocate(prof.k, prof.m))
    assert got & set(taken[0]) and got <= set(taken[0]) | left
    late.release()
    assert not local.readers


async def test_released_space_is_discarded_unless_taken_again_first(tmp_path: Path) -> None:
    """Store invariant 4 (DESIGN 6): released extents are discarded (their bytes read
    as zeros, the device file holds no blocks there), counted once; an extent taken again
    before its discard is not discarded under its new data."""
    local, devices, hooks, state = _store(tmp_path, extents=2)
    store: SegmentStore = local
    prof = Profile(2, 1)
    a = store.allocate(prof.k, prof.m)
    b = store.allocate(prof.k, prof.m)
    seg_a, seg_b = _segment(state, a, 2, 1), _segment(state, b, 2, 1)
    data = os.urandom(BS)
    rec = codec.encode(data, 2, 1, False)
    for seg in (seg_a, seg_b):
        await store.write([(seg, 0, [rec])])
    await store.sync()
    store.free(a)
    store.free(b)
    store.durable(len(a) + len(b))
    again = store.allocate(prof.k, prof.m)            # reused before its discard
    seg_c = _segment(state, again, 2, 1)
    await store.run(settle=True)
    discarded = {x for x in (*a, *b)} - set(again)
    assert hooks.counts["discarded_extents"] == len(discarded) == 3
    for idx, ext in discarded:
        dev = devices[idx]
        assert dev is not None
        assert dev.pread(local.layout.extent_offset(ext), EXT) == bytes(EXT)
    # The reused extents kept what they held; a new write into them reads back.
    got = records.read_records(_plans(seg_c, store.columns(seg_c), [0], [rec]), BS,
                               Deadlines())
    assert bytes(got.payloads[0]) == data
    await store.run(settle=True)
    assert hooks.counts["discarded_extents"] == 3                 # once per release


async def test_a_failed_column_write_is_reported_and_counted(tmp_path: Path) -> None:
    """Store invariant 5 (DESIGN 5): a member whose write fails is reported in the
    outcome and its error counted against it; the other columns land."""
    local, devices, hooks, state = _store(tmp_path)
    store: SegmentStore = local
    placement = store.allocate(2, 1)
    seg = _segment(state, placement, 2, 1)
    bad = placement[1][0]
    dev = devices[bad]
    assert dev is not None
    dev.close()                                  # every call on it now fails
    rec = codec.encode(os.urandom(BS), 2, 1, False)
    out = await store.write([(seg, 0, [rec])])
    assert out.failed == {bad}
    assert out.written == {d for d, _e in placement} - {bad}
    assert hooks.errors == [(bad, "write")]


async def test_room_and_capacity_in_full_stripes(tmp_path: Path) -> None:
    """What space accounting asks the store: full stripes of k + m distinct members."""
    local, devices, _hooks, _state = _store(tmp_path, extents=2)
    store: SegmentStore = local
    n = len(local.free_extents[0])
    room = store.room(Profile(2, 1))
    assert room.capacity_bytes == (N_DEV * n // 3) * 3 * EXT
    assert (room.with_room, room.present, room.missing) == (N_DEV, N_DEV, 0)
    assert store.room(None).free_bytes == N_DEV * n * EXT
    assert store.room(Profile(1, 3)).free_bytes == n * 4 * EXT
    devices[0] = None
    assert store.room(Profile(2, 1)).missing == 1
    # Away members still take up to m columns of a degraded stripe, no more.
    assert store.room(Profile(2, 1)).free_bytes == 3 * (4 * n // 3) * EXT
    assert store.room(Profile(3, 0)).free_bytes == 3 * n * EXT


async def test_a_read_outcome_goes_back_through_write_fragments(tmp_path: Path) -> None:
    """Store invariant 5 (DESIGN 4, 5): the errors a read met travel back with its repairs
    (``write_fragments(repairs, errors=)``, no separate call): counted against the member
    they came from (a name no member has is ignored), and the rebuilt fragment is written
    in place, read back byte-exact from that member; errors without repairs write
    nothing."""
    local, _devices, hooks, state = _store(tmp_path)
    store: SegmentStore = local
    placement = store.allocate(2, 1)
    seg = _segment(state, placement, 2, 1)
    data = os.urandom(BS)
    rec = codec.encode(data, 2, 1, False)
    await store.write([(seg, 0, [rec])])
    await store.sync()
    cols = store.columns(seg)
    bad = cols[1]
    assert bad.reader is not None
    good = bytes(bad.reader.pread(bad.base, 4096))
    bad.reader.pwrite(bad.base, bytes(b ^ 0xFF for b in good[:16]))    # rot one fragment
    got = records.read_records(_plans(seg, cols, [0], [rec]), BS, Deadlines())
    assert bytes(got.payloads[0]) == data and got.degraded == 1
    assert got.device_errors == {(bad.name, "checksum"): 1} and got.repairs
    errors = got.device_errors + Counter({("no-such-column", "read"): 3})
    done, touched = await store.write_fragments(got.repairs, errors=errors, foreground=True)
    assert done == len(got.repairs) and touched == {placement[1][0]}
    assert hooks.errors == [(placement[1][0], "checksum")]
    assert bytes(bad.reader.pread(bad.base, 4096)) == good           # repaired in place
    again = records.read_records(_plans(seg, cols, [0], [rec]), BS, Deadlines())
    assert bytes(again.payloads[0]) == data and again.degraded == 0 and not again.repairs

    before = bytes(bad.reader.pread(bad.base, 4096))
    assert await store.write_fragments((), errors=got.device_errors) == (0, frozenset())
    assert hooks.errors == [(placement[1][0], "checksum")] * 2
    assert bytes(bad.reader.pread(bad.base, 4096)) == before and not hooks.faults


async def test_column_handles_follow_member_ops_without_being_told(tmp_path: Path) -> None:
    """Store invariant 7 (DESIGN 5): handles are cached (the same tuple while nothing
    changed: no work per read) and never outlive a member op -- a member going away, a
    segment marked for a rebuild, the mark cleared, the member back; and the cache does
    not keep freed segments' handles beyond a bound."""
    local, devices, _hooks, state = _store(tmp_path)
    store: SegmentStore = local
    placement = store.allocate(2, 1)
    seg = _segment(state, placement, 2, 1)
    member = placement[1][0]
    dev = devices[member]
    cols = store.columns(seg)
    assert store.columns(seg) is cols and cols[1].reader is dev
    state.apply(op_json(op="member_state", index=member, state="online",
                        marks=[[seg.id, 0]]))                         # marked for a rebuild
    assert store.columns(seg)[1].reader is None
    assert store.columns(seg, rebuilding=1)[1].reader is dev          # the rebuild writes it
    state.apply(op_json(op="member_clean", index=member, seg=seg.id))
    assert store.columns(seg)[1].reader is dev
    devices[member] = None                                            # as Members.fault
    state.apply(op_json(op="member_state", index=member, state="faulted"))
    assert store.columns(seg)[1].reader is None
    devices[member] = dev                                             # as Members.online
    state.apply(op_json(op="member_state", index=member, state="online"))
    assert store.columns(seg)[1].reader is dev
    for n in range(200):                                  # handles of segments long freed
        store.columns(Segment(10_000 + n, 2, 1, placement, 0))
    assert len(local.column_cache) <= 2 * len(state.segments) + 65
