"""Block maps as copy-on-write radix trees that snapshots and clones share.

Every map (a volume, a snapshot, a clone) is a root node of a three-level tree:

    root (interior, 1024 child ids)  ->  mid (interior, 1024 child ids)  ->  leaf
    leaf = 1024 entries of 24 bytes (segment, sector offset, payload length, flags, rhash)

so one map addresses 2^30 blocks. Nodes are shared between maps and carry a reference count
(how many parents -- or map roots -- point at them). Counts are *lazy*, as in dm-thin and
btrfs: cloning a map increments only its root's count (O(1)); a node is copied the first
time a write reaches it while it is shared, and only then do its children (or, for a leaf,
its records) gain a reference. A snapshot therefore costs metadata in proportion to what
later changes, never to the volume's size (invariant 7).

Record accounting: a segment's ``live`` count is the sum, over every distinct leaf node, of
the sectors its entries reference. Copying a leaf adds its entries once more; freeing a leaf
removes them. A segment whose live count reaches zero holds nothing any map can reach.

All methods are deterministic (node ids come from a counter the caller persists), so the
journal can replay them exactly.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence

FANOUT = 1024
ENTRY_SIZE = 24
LEAF_BYTES = FANOUT * ENTRY_SIZE
HOLE = bytes(ENTRY_SIZE)
MAX_BLOCKS = FANOUT ** 3
_EMPTY_INTERIOR = bytes(FANOUT * 8)


class Node:
    __slots__ = ("count", "data", "refs")

    def __init__(self, data: bytearray | array[int], refs: int = 1, count: int = 0) -> None:
        self.data = data
        self.refs = refs
        self.count = count  # leaves: mapped entries; interiors: unused

    @property
    def leaf(self) -> bool:
        return isinstance(self.data, bytearray)

    def serialize(self) -> bytes:
        if isinstance(self.data, bytearray):
            return b"L" + bytes(self.data)
        return b"I" + self.data.tobytes()

    @staticmethod
    def deserialize(raw: bytes) -> Node:
        if raw[:1] == b"L" and len(raw) == 1 + LEAF_BYTES:
            data = bytearray(raw[1:])
            count = sum(1 for o in range(0, LEAF_BYTES, ENTRY_SIZE)
                        if data[o:o + ENTRY_SIZE] != HOLE)
            return Node(data, 0, count)
        if raw[:1] == b"I" and len(raw) == 1 + FANOUT * 8:
            a = array("Q")
            a.frombytes(raw[1:])
            return Node(a, 0)
        raise ValueError(f"not a map node ({len(raw)} bytes, tag {raw[:1]!r})")


def _entry(leaf: Node, o: int) -> bytearray:
    """The entry at byte ``o`` of a leaf, as a copy."""
    data = leaf.data
    assert isinstance(data, bytearray)
    return data[o:o + ENTRY_SIZE]


# ``account`` of many entries at once: those a map no longer references (-1 each), then
# those it now does (+1 each).
AccountMany = Callable[[Sequence[bytes | bytearray], Sequence[bytes]], None]


class MapForest:
    """All nodes of all maps of a pool. ``account(entry, delta)`` is called whenever a
    leaf gains (+1) or loses (-1) a reference to the record ``entry`` describes."""

    def __init__(self, next_id: Callable[[], int],
                 account: Callable[[bytes, int], None],
                 account_many: AccountMany | None = None) -> None:
        self.nodes: dict[int, Node] = {}
        self.roots: dict[int, int] = {}      # map id -> root node id (0: empty map)
        self.dirty: set[int] = set()         # nodes created/changed since the checkpoint
        self.freed: set[int] = set()         # nodes freed since the checkpoint
        self._next_id = next_id
        self._account = account
        # ``account`` of every entry of ``gone`` (-1) and of ``came`` (+1), as one call
        # (``set_many``); by default one ``account`` call each.
        self._account_many = account_many or self._each

    def _each(self, gone: Sequence[bytes | bytearray], came: Sequence[bytes]) -> None:
        for e in gone:
            self._account(bytes(e), -1)
        for e in came:
            self._account(e, 1)

    # ---- maps -----------------------------------------------------------------------------
    def create(self, map_id: int) -> None:
        self.roots[map_id] = 0

    def clone(self, src: int, dst: int) -> None:
        """Map ``dst`` becomes a copy of ``src`` sharing every node (O(1))."""
        root = self.roots[src]
        if root:
            self.nodes[root].refs += 1
        self.roots[dst] = root

    def drop(self, map_id: int) -> None:
        """Delete a map, releasing every node (and record reference) only it held."""
        root = self.roots.pop(map_id)
        if root:
            self._decref(root)

    # ---- node plumbing --------------------------------------------------------------------
    def _new(self, leaf: bool) -> int:
        nid = self._next_id()
        self.nodes[nid] = Node(bytearray(LEAF_BYTES) if leaf else array("Q", _EMPTY_INTERIOR))
        self.dirty.add(nid)
        return nid

    def _copy(self, nid: int) -> int:
        """A private copy of shared node ``nid`` (its children/records gain a reference)."""
        old = self.nodes[nid]
        new_id = self._next_id()
        if isinstance(old.data, bytearray):
            data: bytearray | array[int] = bytearray(old.data)
            for o in range(0, LEAF_BYTES, ENTRY_SIZE):
                e = bytes(old.data[o:o + ENTRY_SIZE])
                if e != HOLE:
                    self._account(e, 1)
        else:
            data = array("Q", old.data)
            for child in old.data:
                if child:
                    self.nodes[child].refs += 1
        self.nodes[new_id] = Node(data, 1, old.count)
        old.refs -= 1
        self.dirty.add(new_id)
        return new_id

    def _decref(self, nid: int) -> None:
        node = self.nodes[nid]
        node.refs -= 1
        if node.refs:
            return
        del self.nodes[nid]
        self.dirty.discard(nid)
        self.freed.add(nid)
        if isinstance(node.data, bytearray):
            for o in range(0, LEAF_BYTES, ENTRY_SIZE):
                e = bytes(node.data[o:o + ENTRY_SIZE])
                if e != HOLE:
                    self._account(e, -1)
        else:
            for child in node.data:
                if child:
                    self._decref(child)

    def _writable_root(self, map_id: int) -> int:
        root = self.roots[map_id]
        if not root:
            root = self.roots[map_id] = self._new(False)
        elif self.nodes[root].refs > 1:
            root = self.roots[map_id] = self._copy(root)
        return root

    def _writable_child(self, parent_id: int, idx: int, leaf: bool) -> int:
        parent = self.nodes[parent_id].data
        assert isinstance(parent, array)
        child = parent[idx]
        if not child:
            child = self._new(leaf)
        elif self.nodes[child].refs > 1:
            child = self._copy(child)
        else:
            return child
        parent[idx] = child
        self.dirty.add(parent_id)
        return child

    # ---- entries --------------------------------------------------------------------------
    def _leaf(self, map_id: int, block: int) -> Node | None:
        nid = self.roots.get(map_id, 0)
        for shift in (20, 10):
            if not nid:
                return None
            data = self.nodes[nid].data
            assert isinstance(data, array)
            nid = data[(block >> shift) & (FANOUT - 1)]
        return self.nodes[nid] if nid else None

    def get(self, map_id: int, block: int) -> bytes | None:
        leaf = self._leaf(map_id, block)
        if leaf is None:
            return None
        o = (block & (FANOUT - 1)) * ENTRY_SIZE
        raw = bytes(leaf.data[o:o + ENTRY_SIZE])
        return None if raw == HOLE else raw

    def get_range(self, map_id: int, start: int, count: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for n, raw in self.leaf_spans(map_id, start, count):
            if raw is None:
                out.extend([None] * n)
            else:
                for o in range(0, n * ENTRY_SIZE, ENTRY_SIZE):
                    e = raw[o:o + ENTRY_SIZE]
                    out.append(None if e == HOLE else e)
        return out

    def leaf_spans(self, map_id: int, start: int, count: int
                   ) -> list[tuple[int, bytes | None]]:
        """The entries of ``count`` blocks from ``start``, one piece per leaf they lie in:
        (how many, their entries back to back, or None where there is no leaf: holes).
        A hole inside a leaf is an entry of zeros (HOLE)."""
        out: list[tuple[int, bytes | None]] = []
        block, end = start, start + count
        while block < end:
            slot = block & (FANOUT - 1)
            n = min(FANOUT - slot, end - block)
            leaf = self._leaf(map_id, block)
            out.append((n, None if leaf is None else
                        bytes(leaf.data[slot * ENTRY_SIZE:(slot + n) * ENTRY_SIZE])))
            block += n
        return out

    def set(self, map_id: int, block: int, entry: bytes) -> None:
        """Point ``block`` at ``entry`` (HOLE unmaps), copying shared nodes on the way."""
        if not 0 <= block < MAX_BLOCKS:
            raise ValueError(f"block {block} is outside a map")
        o = (block & (FANOUT - 1)) * ENTRY_SIZE
        leaf = self._leaf(map_id, block)
        if leaf is None:
            if entry == HOLE:
                return
            old = HOLE
        else:
            old = bytes(leaf.data[o:o + ENTRY_SIZE])
            if old == entry:
                return
        mid, leaf_id = self._writable_path(map_id, block)
        node = self.nodes[leaf_id]
        assert isinstance(node.data, bytearray)
        node.data[o:o + ENTRY_SIZE] = entry
        self.dirty.add(leaf_id)
        if old != HOLE:
            self._account(old, -1)
            node.count -= 1
        if entry != HOLE:
            self._account(entry, 1)
            node.count += 1
        if node.count == 0:
            self._drop_leaf(mid, block)

    def _writable_path(self, map_id: int, block: int) -> tuple[int, int]:
        """The ids of the mid node and leaf ``block`` lies in, made private to the map on
        the way down (shared ones copied, missing ones made)."""
        root = self._writable_root(map_id)
        mid = self._writable_child(root, (block >> 20) & (FANOUT - 1), False)
        return mid, self._writable_child(mid, (block >> 10) & (FANOUT - 1), True)

    def _drop_leaf(self, mid: int, block: int) -> None:
        """An emptied private leaf goes away, so trimmed space takes no metadata either."""
        mid_data = self.nodes[mid].data
        assert isinstance(mid_data, array)
        slot = (block >> 10) & (FANOUT - 1)
        leaf_id = mid_data[slot]
        mid_data[slot] = 0
        self.dirty.add(mid)
        self._decref(leaf_id)

    def set_many(self, map_id: int, blocks: Sequence[int], entries: Sequence[bytes]) -> None:
        """``set(map_id, block, entry)`` for each pair in turn, with exactly its result:
        the same entries, node ids (copies and new nodes are made at the same items, in the
        same order, so a journal replayed op by op rebuilds the same tree), dirty and freed
        nodes and record accounting. What a writeback of many blocks saves: the walk from
        the root and the copy-on-write checks are done once per leaf the blocks fall in
        (while that leaf stays the same node), and the records' accounting is handed over
        in one call (``account_many``) instead of two per block."""
        if len(blocks) != len(entries):
            raise ValueError("set_many: as many entries as blocks")
        for block in blocks:
            if not 0 <= block < MAX_BLOCKS:
                raise ValueError(f"block {block} is outside a map")
        gone: list[bytes | bytearray] = []
        came: list[bytes] = []
        key = -1                      # the leaf (block >> 10) the cached nodes below are for
        node: Node | None = None      # that leaf, once writable (this call copied or made it)
        mid = 0
        seen: Node | None = None      # that leaf as it was read, before any change to it
        try:
            for block, entry in zip(blocks, entries, strict=True):
                o = (block & (FANOUT - 1)) * ENTRY_SIZE
                if block >> 10 != key:
                    key = block >> 10
                    node = None
                    seen = self._leaf(map_id, block)
                # (A slice of a leaf's bytearray is a copy of its own.)
                old: bytes | bytearray
                if node is not None:
                    old = _entry(node, o)
                    if old == entry:
                        continue
                else:
                    if seen is None:
                        if entry == HOLE:
                            continue
                        old = HOLE
                    else:
                        old = _entry(seen, o)
                        if old == entry:
                            continue
                    # The first change to this leaf: what ``set`` does, from the root.
                    mid, leaf_id = self._writable_path(map_id, block)
                    node = self.nodes[leaf_id]
                    self.dirty.add(leaf_id)
                data = node.data
                assert isinstance(data, bytearray)
                data[o:o + ENTRY_SIZE] = entry
                if old != HOLE:
                    gone.append(old)
                    node.count -= 1
                if entry != HOLE:
                    came.append(entry)
                    node.count += 1
                if node.count == 0:
                    # As in ``set``; a later block of the same leaf finds none and makes a
                    # new one.
                    self._drop_leaf(mid, block)
                    node = seen = None
        finally:
            if gone or came:
                self._account_many(gone, came)

    def relocate(self, nid: int, slot: int, old: bytes, new: bytes) -> bool:
        """Repoint one entry of leaf ``nid`` from record ``old`` to its copy ``new``, in
        place (every map sharing the leaf sees the same record at its new home). Does
        nothing if the leaf is gone or the entry changed since (a newer write won)."""
        node = self.nodes.get(nid)
        if node is None or not isinstance(node.data, bytearray):
            return False
        o = slot * ENTRY_SIZE
        if node.data[o:o + ENTRY_SIZE] != old:
            return False
        node.data[o:o + ENTRY_SIZE] = new
        self.dirty.add(nid)
        self._account(old, -1)
        self._account(new, 1)
        return True

    def items(self, map_id: int, start: int = 0,
              end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(block, entry) of mapped blocks in [start, end), in order."""
        stop = MAX_BLOCKS if end is None else min(end, MAX_BLOCKS)
        root = self.roots.get(map_id, 0)
        if not root or start >= stop:
            return
        rdata = self.nodes[root].data
        assert isinstance(rdata, array)
        for i0 in range(start >> 20, ((stop - 1) >> 20) + 1):
            mid = rdata[i0]
            if not mid:
                continue
            mdata = self.nodes[mid].data
            assert isinstance(mdata, array)
            base0 = i0 << 20
            lo1 = max(start - base0, 0) >> 10
            hi1 = min((stop - 1 - base0) >> 10, FANOUT - 1)
            for i1 in range(lo1, hi1 + 1):
                leaf = mdata[i1]
                if not leaf:
                    continue
                ldata = self.nodes[leaf].data
                base = base0 + (i1 << 10)
                for slot in range(max(start - base, 0), min(stop - base, FANOUT)):
                    o = slot * ENTRY_SIZE
                    e = bytes(ldata[o:o + ENTRY_SIZE])
                    if e != HOLE:
                        yield base + slot, e

    def diff(self, a: int, b: int) -> Iterator[int]:
        """Blocks whose entries differ between maps a and b; shared subtrees are skipped,
        so the cost is proportional to what changed (changed-block tracking)."""
        yield from self._diff(self.roots.get(a, 0), self.roots.get(b, 0), 0, 0)

    def _diff(self, x: int, y: int, level: int, base: int) -> Iterator[int]:
        if x == y:
            return
        if level == 2:
            xd = self.nodes[x].data if x else None
            yd = self.nodes[y].data if y else None
            for slot in range(FANOUT):
                o = slot * ENTRY_SIZE
                ex = bytes(xd[o:o + ENTRY_SIZE]) if xd is not None else HOLE
                ey = bytes(yd[o:o + ENTRY_SIZE]) if yd is not None else HOLE
                if ex != ey:
                    yield base + slot
            return
        xd = self.nodes[x].data if x else None
        yd = self.nodes[y].data if y else None
        shift = 20 if level == 0 else 10
        for i in range(FANOUT):
            cx = xd[i] if xd is not None else 0
            cy = yd[i] if yd is not None else 0
            if cx != cy:
                yield from self._diff(int(cx), int(cy), level + 1, base + (i << shift))

    def mapped(self, map_id: int) -> int:
        """How many blocks the map points at: the leaves' counts (no entry is read)."""
        root = self.roots.get(map_id, 0)
        if not root:
            return 0
        rdata = self.nodes[root].data
        assert isinstance(rdata, array)
        n = 0
        for mid in rdata:
            if mid:
                mdata = self.nodes[mid].data
                assert isinstance(mdata, array)
                n += sum(self.nodes[leaf].count for leaf in mdata if leaf)
        return n

    def exclusive_leaves(self, map_id: int) -> Iterator[tuple[int, Node]]:
        """(first block, leaf) for leaves reachable only through ``map_id``: the nodes
        on their whole path have a single reference."""
        stack = [(self.roots.get(map_id, 0), 0, 0)]
        while stack:
            nid, level, base = stack.pop()
            if not nid or self.nodes[nid].refs != 1:
                continue
            node = self.nodes[nid]
            if isinstance(node.data, array):
                shift = 20 if level == 0 else 10
                stack.extend((int(c), level + 1, base + (i << shift))
                             for i, c in enumerate(node.data) if c)
            else:
                yield base, node

    # ---- loading --------------------------------------------------------------------------
    def recount(self) -> None:
        """Recompute reference counts from the trees (after loading nodes)."""
        for node in self.nodes.values():
            node.refs = 0
        for root in self.roots.values():
            if root:
                self.nodes[root].refs += 1
        for node in self.nodes.values():
            if isinstance(node.data, array):
                for child in node.data:
                    if child:
                        self.nodes[child].refs += 1
