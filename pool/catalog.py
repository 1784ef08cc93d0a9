"""The catalog: the volumes layer's metadata in a pool -- objects (JSON records of
volumes, snapshots, tasks) and block maps (copy-on-write trees in the map forest) -- and
the space figures read from the maps.

Invariants this module owns (DESIGN invariant numbers in brackets):

1. Every change is one op through the transaction (``Transaction.do``: applied, then
   journaled by the next commit) [2], made only while the pool is OPEN: a change refused
   (FAILED, CLOSED, a map that does not exist) changes nothing [9].
2. Ids of new objects and maps come from ``PoolState.next_id`` and are never reused.
3. A clone or snapshot map shares every node of its source: O(1), copy-on-write from then
   on [7].
4. Dropping a map or a range of one reaps at once: a segment left without a live record
   is freed by the same commit (space rule S6) [6].
5. Space is counted in device bytes of all of a record's fragments, each record once
   however many maps share it (``record_space``), so usage is exact [6].

Reads of the maps (``is_mapped``, ``mapped_among``, ...) never change anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pool import codec
from pool.errors import StorageError
from pool.layout import SECTOR
from pool.state import ENTRY, HOLE, PoolState, op_json, op_map_clear
from pool.txn import Transaction


class Catalog:
    """Objects and block maps of one pool, over its PoolState and transaction."""

    def __init__(self, state: PoolState, txn: Transaction, reap: Callable[[], None]
                 ) -> None:
        self.state = state
        self.txn = txn
        self._reap = reap      # free segments left without a live record (the pool's)

    # ---- objects -------------------------------------------------------------------------
    def objects(self) -> dict[int, dict[str, Any]]:
        return dict(self.state.objects)

    def put_object(self, value: dict[str, Any], obj_id: int | None = None) -> int:
        self.txn.check_ok()
        if obj_id is None:
            obj_id = self.state.next_id
        self.txn.do(op_json(op="obj_put", id=obj_id, value=value))
        return obj_id

    def delete_object(self, obj_id: int) -> None:
        self.txn.check_ok()
        self.txn.do(op_json(op="obj_del", id=obj_id))

    def set_task(self, name: str, value: dict[str, Any] | None) -> None:
        """Record (None: drop) the progress of maintenance task ``name`` (a scrub's
        cursor), so it resumes there after an import."""
        self.txn.check_ok()
        self.txn.do(op_json(op="task", name=name, value=value))

    # ---- maps ----------------------------------------------------------------------------
    def create_map(self) -> int:
        self.txn.check_ok()
        map_id = self.state.next_id
        self.txn.do(op_json(op="map_new", id=map_id))
        return map_id

    def clone_map(self, src: int) -> int:
        """A new map sharing every node of ``src`` (O(1); copy-on-write from then on)."""
        self.txn.check_ok()
        if src not in self.state.maps:
            raise StorageError(f"map {src} does not exist")
        map_id = self.state.next_id
        self.txn.do(op_json(op="map_clone", id=map_id, src=src))
        return map_id

    def delete_map(self, map_id: int) -> None:
        """Drop a map and every record reference it holds (the space returns at commit)."""
        self.txn.check_ok()
        self.txn.do(op_json(op="map_del", id=map_id))
        self._reap()

    def clear_map_range(self, map_id: int, start: int, count: int) -> None:
        self.txn.check_ok()
        self.txn.do(op_map_clear(map_id, start, count))
        self._reap()

    def diff_maps(self, a: int, b: int) -> list[int]:
        """Blocks whose content differs between two maps (shared subtrees skipped)."""
        return list(self.state.forest.diff(a, b))

    def is_mapped(self, map_id: int, block: int) -> bool:
        return self.state.forest.get(map_id, block) is not None

    def mapped_blocks(self, map_id: int, start: int, end: int) -> list[int]:
        return [b for b, _ in self.state.forest.items(map_id, start, end)]

    def any_compressed(self, map_id: int, start: int, count: int) -> bool:
        """Whether any of ``count`` blocks from ``start`` is stored lz4-compressed."""
        for _n, raw in self.state.forest.leaf_spans(map_id, start, count):
            if raw is not None and any(flags & codec.FLAG_LZ4 for _s, _o, _p, flags, _h
                                       in ENTRY.iter_unpack(raw)):
                return True
        return False

    def mapped_count(self, map_id: int) -> int:
        return self.state.forest.mapped(map_id)

    def mapped_among(self, map_id: int, blocks: Iterable[int]) -> set[int]:
        """Which of ``blocks`` the map points at."""
        forest = self.state.forest
        return {b for b in blocks if forest.get(map_id, b) is not None}

    # ---- space read from the maps (invariant 5) ------------------------------------------
    def record_bytes(self, raw: bytes) -> int:
        """Device bytes of the record a map entry points at (all its fragments)."""
        seg_id, _o, plen, _f, _h = ENTRY.unpack(raw)
        seg = self.state.segments[seg_id]
        return codec.fragment_units(plen, seg.k) * SECTOR * (seg.k + seg.m)

    def stored_bytes(self, map_id: int) -> int:
        """Device bytes (all fragments) of the records a map references."""
        return sum(self.record_bytes(raw) for _b, raw in self.state.forest.items(map_id))

    def exclusive_bytes(self, map_id: int) -> int:
        """Device bytes of records no other map references: what deleting this map frees.

        Records are shared only at the same block index (snapshots, clones and rollbacks
        copy trees; nothing moves a record to another block), so an entry of one of this
        map's private leaves is unique unless another map has the same entry there.
        """
        forest = self.state.forest
        others = [m for m in forest.roots if m != map_id]
        total = 0
        for base, node in forest.exclusive_leaves(map_id):
            assert isinstance(node.data, bytearray)
            for slot in range(len(node.data) // ENTRY.size):
                raw = bytes(node.data[slot * ENTRY.size:(slot + 1) * ENTRY.size])
                if raw != HOLE and all(forest.get(m, base + slot) != raw for m in others):
                    total += self.record_bytes(raw)
        return total

    def record_space(self) -> tuple[int, int]:
        """(bytes of distinct live records, bytes of records more than one map shares):
        the exact physical use by data, each record counted once (invariant 5)."""
        owners: dict[tuple[int, int], tuple[int, set[int]]] = {}
        forest = self.state.forest
        for map_id in forest.roots:
            for _b, raw in forest.items(map_id):
                seg_id, off = ENTRY.unpack_from(raw)[:2]
                _size, maps = owners.setdefault((seg_id, off), (self.record_bytes(raw), set()))
                maps.add(map_id)
        used = sum(size for size, _maps in owners.values())
        shared = sum(size for size, maps in owners.values() if len(maps) > 1)
        return used, shared
