"""The pool's metadata state and the operations that change it.

Every change to the state is an ``Op`` applied through ``PoolState.apply``; the same ops,
in the same order, are what the journal records, so replay after a crash runs exactly the
code that made the change (docs/FORMAT.md, "Journal").

Block maps are kept as fixed pages of packed 24-byte entries; a page is the unit the
checkpoint writes, so a checkpoint writes only the pages that changed since the last one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pool.codec import fragment_units
from pool.errors import StorageError

ENTRY = struct.Struct("<IIIIQ")  # segment id, offset (sectors), payload length, flags, rhash
ENTRY_SIZE = ENTRY.size  # 24
PAGE_ENTRIES = 1024
PAGE_BYTES = PAGE_ENTRIES * ENTRY_SIZE
HOLE = bytes(ENTRY_SIZE)

OP_MAP_SET = 1
OP_MAP_CLEAR = 2
OP_JSON = 3
_MAP_SET = struct.Struct("<BIQ")
_MAP_CLEAR = struct.Struct("<BIQQ")
_JSON_HDR = struct.Struct("<BI")


@dataclass(frozen=True, slots=True)
class RecordRef:
    """Where a block's record lives: a decoded map entry."""

    segment: int
    offset: int  # sectors from the start of each of the segment's extents
    plen: int
    flags: int
    rhash: int

    @staticmethod
    def unpack(raw: bytes) -> RecordRef:
        return RecordRef(*ENTRY.unpack(raw))

    def pack(self) -> bytes:
        return ENTRY.pack(self.segment, self.offset, self.plen, self.flags, self.rhash)


class BlockMap:
    """A sparse array: block index -> packed record entry, in pages of PAGE_ENTRIES."""

    __slots__ = ("counts", "dirty", "pages")

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.counts: dict[int, int] = {}
        self.dirty: set[int] = set()

    def get(self, block: int) -> bytes | None:
        page = self.pages.get(block // PAGE_ENTRIES)
        if page is None:
            return None
        o = (block % PAGE_ENTRIES) * ENTRY_SIZE
        raw = bytes(page[o:o + ENTRY_SIZE])
        return None if raw == HOLE else raw

    def get_range(self, start: int, count: int) -> list[bytes | None]:
        """Entries of ``count`` consecutive blocks from ``start`` (None for holes)."""
        out: list[bytes | None] = []
        block, end = start, start + count
        while block < end:
            pidx, slot = divmod(block, PAGE_ENTRIES)
            n = min(PAGE_ENTRIES - slot, end - block)
            page = self.pages.get(pidx)
            if page is None:
                out.extend([None] * n)
            else:
                raw = bytes(page[slot * ENTRY_SIZE:(slot + n) * ENTRY_SIZE])
                for o in range(0, n * ENTRY_SIZE, ENTRY_SIZE):
                    e = raw[o:o + ENTRY_SIZE]
                    out.append(None if e == HOLE else e)
            block += n
        return out

    def set(self, block: int, entry: bytes) -> bytes | None:
        """Store ``entry`` (HOLE to unmap); return the entry it replaced, if any."""
        pidx, slot = divmod(block, PAGE_ENTRIES)
        page = self.pages.get(pidx)
        if page is None:
            if entry == HOLE:
                return None
            page = self.pages[pidx] = bytearray(PAGE_BYTES)
            self.counts[pidx] = 0
        o = slot * ENTRY_SIZE
        old = bytes(page[o:o + ENTRY_SIZE])
        if old == entry:
            return None if old == HOLE else old
        page[o:o + ENTRY_SIZE] = entry
        self.dirty.add(pidx)
        if old == HOLE:
            self.counts[pidx] += 1
            return None
        if entry == HOLE:
            self.counts[pidx] -= 1
            if self.counts[pidx] == 0:
                del self.pages[pidx]
                del self.counts[pidx]
        return old

    def mapped(self) -> int:
        return sum(self.counts.values())

    def items(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(block, entry) for mapped blocks in [start, end), in block order."""
        for pidx in sorted(self.pages):
            base = pidx * PAGE_ENTRIES
            if end is not None and base >= end:
                break
            if base + PAGE_ENTRIES <= start:
                continue
            page = self.pages[pidx]
            lo = max(start - base, 0)
            hi = PAGE_ENTRIES if end is None else min(end - base, PAGE_ENTRIES)
            for slot in range(lo, hi):
                o = slot * ENTRY_SIZE
                raw = bytes(page[o:o + ENTRY_SIZE])
                if raw != HOLE:
                    yield base + slot, raw

    def load_page(self, pidx: int, raw: bytes) -> None:
        if len(raw) != PAGE_BYTES:
            raise StorageError(f"map page {pidx} has {len(raw)} bytes, expected {PAGE_BYTES}")
        page = bytearray(raw)
        count = sum(1 for o in range(0, PAGE_BYTES, ENTRY_SIZE)
                    if page[o:o + ENTRY_SIZE] != HOLE)
        if count:
            self.pages[pidx] = page
            self.counts[pidx] = count


@dataclass(slots=True)
class Segment:
    id: int
    k: int
    m: int
    extents: tuple[tuple[int, int], ...]  # (member index, extent number), k + m of them
    birth: int
    fill: int = 0   # sectors used in each extent
    live: int = 0   # sectors held by live records in each extent

    def to_json(self) -> list[Any]:
        return [self.id, self.k, self.m, self.birth, self.fill, self.live,
                [x for e in self.extents for x in e]]

    @staticmethod
    def from_json(v: list[Any]) -> Segment:
        flat = v[6]
        ext = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        return Segment(v[0], v[1], v[2], ext, v[3], v[4], v[5])


@dataclass(slots=True)
class MemberInfo:
    uuid: str
    index: int
    size: int
    n_extents: int
    state: str = "online"  # online | missing

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "index": self.index, "size": self.size,
                "n_extents": self.n_extents, "state": self.state}


Op = bytes  # an encoded operation; see encode_* below


def op_map_set(map_id: int, block: int, entry: bytes) -> Op:
    return _MAP_SET.pack(OP_MAP_SET, map_id, block) + entry


def op_map_clear(map_id: int, start: int, count: int) -> Op:
    return _MAP_CLEAR.pack(OP_MAP_CLEAR, map_id, start, count)


def op_json(**fields: Any) -> Op:
    body = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    return _JSON_HDR.pack(OP_JSON, len(body)) + body


def iter_ops(payload: bytes) -> Iterator[Op]:
    """Split a journal entry's payload back into ops; raise on anything malformed."""
    view = memoryview(payload)
    pos = 0
    while pos < len(view):
        code = view[pos]
        if code == OP_MAP_SET:
            n = _MAP_SET.size + ENTRY_SIZE
        elif code == OP_MAP_CLEAR:
            n = _MAP_CLEAR.size
        elif code == OP_JSON:
            n = _JSON_HDR.size + _JSON_HDR.unpack_from(view, pos)[1]
        else:
            raise StorageError(f"unknown journal op {code} at byte {pos}")
        if pos + n > len(view):
            raise StorageError("journal entry ends inside an op")
        yield bytes(view[pos:pos + n])
        pos += n


@dataclass
class PoolState:
    """Everything a pool's metadata says. Changed only through ``apply``."""

    uuid: str
    name: str
    extent_size: int
    profile: str
    members: list[MemberInfo]
    segments: dict[int, Segment] = field(default_factory=dict)
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)
    maps: dict[int, BlockMap] = field(default_factory=dict)
    next_id: int = 1
    txg: int = 0
    generation: int = 0
    # Segments whose live count reached zero during apply (the runtime decides what to do).
    emptied: set[int] = field(default_factory=set)
    # Pages of deleted maps, for the checkpoint to free.
    dropped_maps: set[int] = field(default_factory=set)

    # ---- applying operations -------------------------------------------------------------
    def apply(self, op: Op) -> None:
        code = op[0]
        if code == OP_MAP_SET:
            _, map_id, block = _MAP_SET.unpack_from(op, 0)
            self._map_set(map_id, block, op[_MAP_SET.size:])
        elif code == OP_MAP_CLEAR:
            _, map_id, start, count = _MAP_CLEAR.unpack(op)
            bmap = self.maps[map_id]
            for block, _raw in list(bmap.items(start, start + count)):
                self._map_set(map_id, block, HOLE)
        elif code == OP_JSON:
            d = json.loads(op[_JSON_HDR.size:])
            getattr(self, "_op_" + d.pop("op"))(**d)
        else:
            raise StorageError(f"unknown op code {code}")

    def _map_set(self, map_id: int, block: int, entry: bytes) -> None:
        old = self.maps[map_id].set(block, entry)
        if old is not None:
            seg_id, _off, plen, _fl, _h = ENTRY.unpack(old)
            seg = self.segments[seg_id]
            seg.live -= fragment_units(plen, seg.k)
            if seg.live == 0:
                self.emptied.add(seg_id)
        if entry != HOLE:
            seg_id, _off, plen, _fl, _h = ENTRY.unpack(entry)
            seg = self.segments[seg_id]
            seg.live += fragment_units(plen, seg.k)
            self.emptied.discard(seg_id)

    def _op_seg_new(self, id: int, k: int, m: int, extents: list[list[int]],
                    birth: int) -> None:
        self.segments[id] = Segment(id, k, m, tuple((a, b) for a, b in extents), birth)
        self.next_id = max(self.next_id, id + 1)

    def _op_seg_fill(self, id: int, fill: int) -> None:
        self.segments[id].fill = fill

    def _op_seg_free(self, id: int) -> None:
        seg = self.segments.pop(id)
        if seg.live:
            raise StorageError(f"segment {id} freed with {seg.live} live sectors")
        self.emptied.discard(id)

    def _op_map_new(self, id: int) -> None:
        self.maps[id] = BlockMap()
        self.next_id = max(self.next_id, id + 1)

    def _op_map_del(self, id: int) -> None:
        bmap = self.maps[id]
        for block, _raw in list(bmap.items()):
            self._map_set(id, block, HOLE)
        del self.maps[id]
        self.dropped_maps.add(id)

    def _op_obj_put(self, id: int, value: dict[str, Any]) -> None:
        self.objects[id] = value
        self.next_id = max(self.next_id, id + 1)

    def _op_obj_del(self, id: int) -> None:
        del self.objects[id]

    def _op_member_add(self, uuid: str, index: int, size: int, n_extents: int) -> None:
        self.members.append(MemberInfo(uuid, index, size, n_extents))

    def _op_member_state(self, index: int, state: str) -> None:
        self.members[index].state = state

    # ---- checkpoint serialisation ---------------------------------------------------------
    def to_json(self) -> bytes:
        return json.dumps({
            "uuid": self.uuid, "name": self.name, "extent_size": self.extent_size,
            "profile": self.profile, "members": [m.to_json() for m in self.members],
            "segments": [s.to_json() for s in self.segments.values()],
            "objects": {str(k): v for k, v in self.objects.items()},
            "maps": sorted(self.maps), "next_id": self.next_id, "txg": self.txg,
            "generation": self.generation,
        }, separators=(",", ":")).encode()

    @staticmethod
    def from_json(raw: bytes) -> PoolState:
        d = json.loads(raw)
        st = PoolState(d["uuid"], d["name"], d["extent_size"], d["profile"],
                       [MemberInfo(**m) for m in d["members"]])
        st.segments = {v[0]: Segment.from_json(v) for v in d["segments"]}
        st.objects = {int(k): v for k, v in d["objects"].items()}
        st.maps = {i: BlockMap() for i in d["maps"]}
        st.next_id, st.txg, st.generation = d["next_id"], d["txg"], d["generation"]
        return st
