"""Reverse lookups over a pool's map forest, for the maintenance engines (rebuild, scrub):
which live map entries lie in a segment, and which volumes reference a record. Pure
functions of the pool's state (no I/O, nothing changed); a scan of every leaf, since there
is no reverse index yet. This module owns no state, hence no invariants of its own."""

from __future__ import annotations

from pool.state import ENTRY, PoolState


def segment_records(state: PoolState, seg_id: int, start: int = 0) -> list[bytes]:
    """The distinct live map entries in segment ``seg_id`` at sector >= ``start``, in
    offset order (a scan of every leaf: there is no reverse index yet)."""
    found: set[bytes] = set()
    size = ENTRY.size
    for node in state.forest.nodes.values():
        data = node.data
        if not isinstance(data, bytearray):
            continue
        for pos, (seg, off, *_rest) in enumerate(ENTRY.iter_unpack(data)):
            if seg == seg_id and off >= start:
                found.add(bytes(data[pos * size:(pos + 1) * size]))
    return sorted(found, key=lambda r: ENTRY.unpack_from(r)[1])


def locate(state: PoolState, entry: bytes) -> list[str]:
    """Which volumes/snapshots and byte offsets reference a record (for reports)."""
    names: dict[int, tuple[str, int]] = {}
    objs = state.objects
    for obj in objs.values():
        if "map" in obj:
            name = str(obj.get("name", "?"))
            if obj.get("type") == "snapshot":
                vol = objs.get(int(obj.get("volume", -1)), {})
                name = f"{vol.get('name', '?')}@{name}"
            names[int(obj["map"])] = (name, int(obj.get("block_size", 0)))
    out = []
    forest = state.forest
    for map_id in forest.roots:
        for block, raw in forest.items(map_id):
            if raw == entry:
                name, bs = names.get(map_id, (f"map {map_id}", 0))
                out.append(f"{name} offset {block * bs}" if bs else
                           f"{name} block {block}")
    return out

