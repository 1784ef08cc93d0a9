"""``MapForest.set_many`` / ``PoolState.apply_map_sets`` (one call for a writeback's map
updates, issue 27) against ``apply(op_map_set(...))`` one block at a time: two pool states
driven in lockstep by a hypothesis state machine must stay identical in everything.

Why it must be exact (pool.maps: "all methods are deterministic ... so the journal can
replay them exactly"; pool.txn invariant 3): the journal holds one op per block and is
replayed one op at a time, so the batched call has to leave the very tree that replay
rebuilds -- the same node ids, made at the same points (a copy of a shared node, a new
leaf after an emptied one went away), the same dirty and freed sets -- and the same record
accounting (segments' live sectors, which segments are emptied: what the cleaner frees).

Rules: create, clone and drop maps (clones share nodes, so batches hit copy-on-write at
every level), checkpoint (dirty and freed start afresh, so a node a batch changes must be
marked dirty by the batch itself), and set a batch of blocks -- records of segments with
different k and payload lengths, holes, the same block twice, whole leaves emptied and
refilled -- over blocks at the end of one leaf, the start of the next and in a second mid
node.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pool.maps import FANOUT
from pool.state import ENTRY, HOLE, PoolState, op_json, op_map_set

BLOCKS = [FANOUT - 3 + i for i in range(6)] + [(1 << 20) + i for i in range(3)]
# (segment, k, payload length): fragment sizes differ by k and by length (lz4 records)
SEGMENTS = [(1, 1, 65536), (2, 4, 65536), (3, 4, 20000), (4, 1, 700)]
MAX_MAPS = 4


def _state() -> PoolState:
    st_ = PoolState("uuid", "tank", 1 << 24, "ec:4+2", [])
    for seg_id, k, _plen in SEGMENTS:
        st_.apply(op_json(op="seg_new", id=seg_id, k=k, m=2 if k > 1 else 0,
                          extents=[], birth=0))
    st_.next_id = 100
    return st_


def _entry(n: int) -> bytes:
    seg_id, _k, plen = SEGMENTS[n % len(SEGMENTS)]
    return ENTRY.pack(seg_id, n, plen, 0, n * 7919)


def _snapshot(s: PoolState) -> object:
    f = s.forest
    nodes = {nid: (bytes(n.data) if isinstance(n.data, bytearray) else n.data.tobytes(),
                   n.refs, n.count) for nid, n in f.nodes.items()}
    return (nodes, dict(f.roots), set(f.dirty), set(f.freed), s.next_id,
            {i: seg.live for i, seg in s.segments.items()}, set(s.emptied))


class Lockstep(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.one = _state()       # one op per block, as the journal replays them
        self.many = _state()      # apply_map_sets
        self.maps: list[int] = []
        self.ids = itertools.count(1)
        self._create()

    def _both(self, op: bytes) -> None:
        self.one.apply(op)
        self.many.apply(op)

    def _create(self) -> None:
        m = next(self.ids)
        self._both(op_json(op="map_new", id=m))
        self.maps.append(m)

    @precondition(lambda self: len(self.maps) < MAX_MAPS)
    @rule()
    def create(self) -> None:
        self._create()

    @precondition(lambda self: len(self.maps) < MAX_MAPS)
    @rule(src=st.integers(0, 99))
    def clone(self, src: int) -> None:
        m = next(self.ids)
        self._both(op_json(op="map_clone", id=m, src=self.maps[src % len(self.maps)]))
        self.maps.append(m)

    @precondition(lambda self: len(self.maps) > 1)
    @rule(which=st.integers(0, 99))
    def drop(self, which: int) -> None:
        m = self.maps.pop(which % len(self.maps))
        self._both(op_json(op="map_del", id=m))

    @rule(which=st.integers(0, 99),
          items=st.lists(st.tuples(st.sampled_from(BLOCKS),
                                   st.one_of(st.none(), st.integers(0, 11))),
                         min_size=1, max_size=24))
    def set_batch(self, which: int, items: list[tuple[int, int | None]]) -> None:
        m = self.maps[which % len(self.maps)]
        blocks = [b for b, _e in items]
        entries = [HOLE if e is None else _entry(e) for _b, e in items]
        for b, e in zip(blocks, entries, strict=True):
            self.one.apply(op_map_set(m, b, e))
        self.many.apply_map_sets(m, blocks, entries)

    @rule()
    def checkpoint(self) -> None:
        """What a checkpoint does to the forest: the dirty and freed nodes are written or
        released, so from here on only what the next ops touch is dirty again."""
        for s in (self.one, self.many):
            s.forest.dirty.clear()
            s.forest.freed.clear()

    @rule(which=st.integers(0, 99), block=st.sampled_from(BLOCKS))
    def empty_leaf_then_refill(self, which: int, block: int) -> None:
        """Every block of a leaf the rules use cleared, then one set again, in one batch:
        the leaf goes away in the middle of the batch and a new one is made."""
        m = self.maps[which % len(self.maps)]
        same = [b for b in BLOCKS if b >> 10 == block >> 10]
        blocks = [*same, block]
        entries = [HOLE] * len(same) + [_entry(3)]
        for b, e in zip(blocks, entries, strict=True):
            self.one.apply(op_map_set(m, b, e))
        self.many.apply_map_sets(m, blocks, entries)

    @invariant()
    def identical(self) -> None:
        assert _snapshot(self.many) == _snapshot(self.one)
        for m in self.maps:
            for b in BLOCKS:
                assert self.many.forest.get(m, b) == self.one.forest.get(m, b)


Lockstep.TestCase.settings = settings(max_examples=150, stateful_step_count=30,
                                      deadline=None)
TestLockstep = Lockstep.TestCase


def test_set_many_refuses_bad_input_and_changes_nothing() -> None:
    s = _state()
    s.apply(op_json(op="map_new", id=1))
    s.apply_map_sets(1, [5], [_entry(0)])
    before = _snapshot(s)
    with pytest.raises(ValueError, match="outside a map"):
        s.apply_map_sets(1, [6, FANOUT ** 3], [_entry(1), _entry(2)])
    with pytest.raises(ValueError, match="as many entries"):
        s.apply_map_sets(1, [6, 7], [_entry(1)])
    assert _snapshot(s) == before
