"""A hypothesis state machine for the block maps (pool.maps ``MapForest``: copy-on-write
radix trees shared by snapshots and clones) against a dict-of-dicts model (issue 23).

Rules create a map, set a block (a fresh record, or a record another block holds, so
records are shared), clear a range of blocks, clone a map, delete one, and diff two. The
blocks span two leaves and two mid nodes, so clears cross a leaf boundary and copies
reach every level. The model is map id -> {block: entry}.

Checked after every step (pool.maps' docstring rules; DESIGN invariant 7, a snapshot costs
metadata only for what later changes):
- every live map reads as its model (``get``, ``get_range``, ``items``), and ``mapped``
  counts its entries;
- node reference counts are exactly the number of roots and parents pointing at each
  node, and no node is kept that no map reaches (freed trees are released);
- record accounting: each record's count is the number of distinct reachable leaves'
  entries pointing at it -- so it is positive exactly when some model map holds the
  record, never more than the model's references to it, and zero (no leak) otherwise;
- ``diff(a, b)`` is exactly the blocks whose model entries differ.
"""

from __future__ import annotations

import itertools
from array import array
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pool.maps import ENTRY_SIZE, FANOUT, HOLE, LEAF_BYTES, MapForest

# Blocks at the end of leaf 0, the start of leaf 1, and in the second mid node.
BLOCKS = ([FANOUT - 3 + i for i in range(6)] + [(1 << 20) + i for i in range(3)])
MAX_MAPS = 5


def _entry(n: int) -> bytes:
    return n.to_bytes(8, "little") + bytes([1]) * (ENTRY_SIZE - 8)


class MapsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        ids = itertools.count(1)
        self.accounted: Counter[bytes] = Counter()
        self.forest = MapForest(lambda: next(ids), self._account)
        self.model: dict[int, dict[int, bytes]] = {}
        self.next_map = 1
        self.next_entry = 1
        self._create()
        self._create()       # two maps from the start: diffs and shares need no setup

    def _account(self, entry: bytes, delta: int) -> None:
        self.accounted[entry] += delta
        assert self.accounted[entry] >= 0, "a record's count went negative"

    def _create(self) -> None:
        self.forest.create(self.next_map)
        self.model[self.next_map] = {}
        self.next_map += 1

    def _pick(self, n: int) -> int:
        return sorted(self.model)[n % len(self.model)]

    # ---- rules --------------------------------------------------------------------------

    @precondition(lambda self: len(self.model) < MAX_MAPS)
    @rule()
    def create(self) -> None:
        self._create()

    @precondition(lambda self: self.model)
    @rule(m=st.integers(0, 99), block=st.sampled_from(BLOCKS),
          share=st.one_of(st.none(), st.integers(0, 99)))
    def set(self, m: int, block: int, share: int | None) -> None:
        """A fresh record, or (``share``) one some map already holds (a copied block)."""
        mid = self._pick(m)
        held = sorted({e for mm in self.model.values() for e in mm.values()})
        if share is not None and held:
            entry = held[share % len(held)]
        else:
            entry = _entry(self.next_entry)
            self.next_entry += 1
        self.forest.set(mid, block, entry)
        self.model[mid][block] = entry

    @precondition(lambda self: self.model)
    @rule(m=st.integers(0, 99), start=st.sampled_from(BLOCKS), n=st.integers(1, 6))
    def clear(self, m: int, start: int, n: int) -> None:
        mid = self._pick(m)
        for b in range(start, start + n):
            self.forest.set(mid, b, HOLE)
            self.model[mid].pop(b, None)

    @precondition(lambda self: self.model and len(self.model) < MAX_MAPS)
    @rule(m=st.integers(0, 99))
    def clone(self, m: int) -> None:
        src = self._pick(m)
        self.forest.clone(src, self.next_map)
        self.model[self.next_map] = dict(self.model[src])
        self.next_map += 1

    @precondition(lambda self: len(self.model) > 1)
    @rule(m=st.integers(0, 99))
    def delete(self, m: int) -> None:
        mid = self._pick(m)
        self.forest.drop(mid)
        del self.model[mid]

    @precondition(lambda self: self.model)
    @rule(a=st.integers(0, 99), b=st.integers(0, 99))
    def diff(self, a: int, b: int) -> None:
        ma, mb = self._pick(a), self._pick(b)
        want = {blk for blk in set(self.model[ma]) | set(self.model[mb])
                if self.model[ma].get(blk) != self.model[mb].get(blk)}
        got = list(self.forest.diff(ma, mb))
        assert len(got) == len(set(got)) and set(got) == want, (sorted(got), sorted(want))

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def maps_as_model(self) -> None:
        f = self.forest
        assert set(f.roots) == set(self.model)
        for mid, want in self.model.items():
            assert dict(f.items(mid)) == want, mid
            assert f.mapped(mid) == len(want)
            for b in BLOCKS:
                assert f.get(mid, b) == want.get(b)
            lo = BLOCKS[0]
            got = f.get_range(mid, lo, FANOUT)
            assert got == [want.get(b) for b in range(lo, lo + FANOUT)]

    @invariant()
    def reference_counts(self) -> None:
        f = self.forest
        refs: Counter[int] = Counter()
        for root in f.roots.values():
            if root:
                refs[root] += 1
        seen: set[int] = set()
        stack = [r for r in f.roots.values() if r]
        leaves: list[int] = []
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            data = f.nodes[nid].data
            if isinstance(data, array):
                for c in data:
                    if c:
                        refs[int(c)] += 1
                        stack.append(int(c))
            else:
                leaves.append(nid)
        assert set(f.nodes) == seen, f"unreachable nodes kept: {sorted(set(f.nodes) - seen)}"
        for nid, node in f.nodes.items():
            assert node.refs == refs[nid], (nid, node.refs, refs[nid])
        # Records: one reference per entry of each distinct reachable leaf.
        per_leaf: Counter[bytes] = Counter()
        for nid in leaves:
            data = f.nodes[nid].data
            entries = [bytes(data[o:o + ENTRY_SIZE]) for o in range(0, LEAF_BYTES, ENTRY_SIZE)]
            live = [e for e in entries if e != HOLE]
            assert f.nodes[nid].count == len(live) > 0     # an empty leaf goes away
            per_leaf.update(live)
        assert +self.accounted == per_leaf
        uses = Counter(e for mm in self.model.values() for e in mm.values())
        assert set(per_leaf) == set(uses), "a record held by no map is still counted"
        for e, n in per_leaf.items():
            assert n <= uses[e]


MapsMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                         deadline=None)
test_maps_machine = MapsMachine.TestCase
