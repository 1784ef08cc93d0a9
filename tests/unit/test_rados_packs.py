"""The RADOS checkpoint's packs of map nodes (pool/rados/backend.py, ``RadosCommitMeta.
plan_checkpoint``): pure planning, no cluster. "backend invariant N" is that module's."""

from __future__ import annotations

from typing import Any, cast

from pool.maps import LEAF_BYTES, MapForest, Node
from pool.rados.backend import NodeRef, RadosCommitMeta
from pool.rados.meta import RadosMeta, RadosSuperblock


def _forest(nids: list[int]) -> MapForest:
    forest = MapForest(lambda: 0, lambda _e, _d: None)
    for nid in nids:
        forest.nodes[nid] = Node(bytearray(bytes([nid % 251]) * LEAF_BYTES))
    return forest


def _seam(forest: MapForest, packs: dict[tuple[int, int], list[int]]) -> RadosCommitMeta:
    """A seam whose committed checkpoint holds ``packs`` (pack -> its node ids)."""
    nodes: dict[int, NodeRef] = {}
    sizes: dict[tuple[int, int], int] = {}
    for (g, i), nids in packs.items():
        off = 0
        for nid in nids:
            n = len(forest.nodes[nid].serialize())
            nodes[nid] = NodeRef(g, i, off, n, 0)
            off += n
        sizes[(g, i)] = off
    sb = RadosSuperblock("u", 3, 10)
    return RadosCommitMeta(cast(RadosMeta, cast(Any, None)), sb, forest, nodes, sizes)


def test_a_sparse_pack_is_compacted_and_a_dense_one_kept() -> None:
    """Backend invariant 1: a pack whose live bytes fell under half is dropped and its
    live nodes are written again, serialized now, into the new pack; a pack at least half
    live stays as it is; dropped and rewritten nodes leave their old places; a pack with
    nothing live is dropped."""
    forest = _forest([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    seam = _seam(forest, {(1, 0): [1, 2, 3, 4], (2, 0): [5, 6, 7, 8], (3, 0): [9]})
    # Pack (1, 0): 1-3 freed, 4 live -> sparse. Pack (2, 0): 5 freed -> 3/4 live, kept.
    # Pack (3, 0): 9 rewritten (dirty) -> nothing live there.
    for nid in (1, 2, 3, 5):
        del forest.nodes[nid]
    dirty = [(9, forest.nodes[9].serialize()), (11, Node(bytearray(LEAF_BYTES)).serialize())]
    plan = seam.plan_checkpoint(4, 11, b"{}", dirty, [1, 2, 3, 5])
    assert set(plan.nodes) == {4, 6, 7, 8, 9, 11}
    assert {n: (r.gen, r.i) for n, r in plan.nodes.items()} == {
        4: (4, 0), 9: (4, 0), 11: (4, 0), 6: (2, 0), 7: (2, 0), 8: (2, 0)}
    assert set(plan.sizes) == {(2, 0), (4, 0)}
    assert plan.sizes[(2, 0)] == seam.sizes[(2, 0)]
    pack = plan.packs[0]
    for nid in (4, 9):
        r = plan.nodes[nid]
        assert pack[r.offset:r.offset + r.length] == forest.nodes[nid].serialize()
    assert plan.sizes[(4, 0)] == len(pack) == sum(plan.nodes[n].length for n in (4, 9, 11))
    # Planning changed nothing committed (the seam's state moves only at ``flipped``).
    assert set(seam.nodes) == {1, 2, 3, 4, 5, 6, 7, 8, 9}
