"""The pool's metadata state and the operations that change it.

Every change to the state is an ``Op`` applied through ``PoolState.apply``; the same ops,
in the same order, are what the journal records, so replay after a crash runs exactly the
code that made the change (docs/FORMAT.md, "Journal").

Block maps are copy-on-write radix trees of shared, reference-counted nodes
(``pool.maps``); a node is the unit the checkpoint writes, so a checkpoint writes only the
nodes that changed since the last one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pool.codec import fragment_units
from pool.errors import StorageError
from pool.maps import MapForest

ENTRY = struct.Struct("<IIIIQ")  # segment id, offset (sectors), payload length, flags, rhash
ENTRY_SIZE = ENTRY.size  # 24
_SEG_PLEN = struct.Struct("<I4xI")  # an entry's segment id and payload length
HOLE = bytes(ENTRY_SIZE)

OP_MAP_SET = 1
OP_MAP_CLEAR = 2
OP_JSON = 3
OP_RELOCATE = 4
_MAP_SET = struct.Struct("<BIQ")
_RELOCATE = struct.Struct("<BQH")  # node id, slot; then the old and the new entry
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
    state: str = "online"  # online | missing | faulted | offline | removed
    last_gen: int = 0      # when away: the pool generation it was last part of
    # Segment id -> first sector from which this member's fragments may be missing or
    # stale (written while it was away, or a replacement not yet rebuilt). Empty when the
    # member holds every fragment it should; the rebuild works these off.
    marks: dict[int, int] = field(default_factory=dict)
    # The path its device was last seen at (created, added, replaced, imported, onlined):
    # how status and the admin name a member that is missing or faulted.
    path: str = ""

    @property
    def away(self) -> bool:
        return self.state in AWAY

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uuid": self.uuid, "index": self.index, "size": self.size,
                               "n_extents": self.n_extents, "state": self.state,
                               "last_gen": self.last_gen}
        if self.marks:
            out["marks"] = [[s, f] for s, f in sorted(self.marks.items())]
        if self.path:
            out["path"] = self.path
        return out

    @staticmethod
    def from_json(d: dict[str, Any]) -> MemberInfo:
        return MemberInfo(d["uuid"], d["index"], d["size"], d["n_extents"],
                          d.get("state", "online"), d.get("last_gen", 0),
                          {int(s): int(f) for s, f in d.get("marks", [])},
                          str(d.get("path", "")))


# Member states in which the pool does not use the device (it is not read or written).
AWAY = ("missing", "faulted", "offline")


Op = bytes  # an encoded operation; see encode_* below


def op_map_set(map_id: int, block: int, entry: bytes) -> Op:
    return _MAP_SET.pack(OP_MAP_SET, map_id, block) + entry


def op_map_clear(map_id: int, start: int, count: int) -> Op:
    return _MAP_CLEAR.pack(OP_MAP_CLEAR, map_id, start, count)


def op_relocate(node: int, slot: int, old: bytes, new: bytes) -> Op:
    return _RELOCATE.pack(OP_RELOCATE, node, slot) + old + new


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
        elif code == OP_RELOCATE:
            n = _RELOCATE.size + 2 * ENTRY_SIZE
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
    next_id: int = 1
    txg: int = 0
    generation: int = 0
    # Segments whose live count reached zero during apply (the runtime decides what to do).
    emptied: set[int] = field(default_factory=set)
    # Long-running maintenance state that must survive a restart (e.g. "scrub").
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Changes with every member op (state, marks, replace, clean, add): what a segment's
    # column handles depend on (its members' devices change only beside such an op), so
    # a store's cache of them is stale once this moved (pool.store invariant 7). Not
    # metadata: a runtime counter, not saved and not compared.
    members_epoch: int = field(default=0, compare=False)
    forest: MapForest = field(init=False)

    def __post_init__(self) -> None:
        self.forest = MapForest(self._take_id, self._account, self._account_many)

    def _take_id(self) -> int:
        nid = self.next_id
        self.next_id += 1
        return nid

    def _account(self, entry: bytes, delta: int) -> None:
        seg_id, _off, plen, _fl, _h = ENTRY.unpack(entry)
        seg = self.segments[seg_id]
        seg.live += delta * fragment_units(plen, seg.k)
        if seg.live == 0:
            self.emptied.add(seg_id)
        else:
            self.emptied.discard(seg_id)

    def _account_many(self, gone: Sequence[bytes | bytearray], came: Sequence[bytes]) -> None:
        """``_account(e, -1)`` for each entry of ``gone`` and ``_account(e, 1)`` for each
        of ``came``, with the same result: each segment's live count moves by the sum, and
        whether it is emptied follows from where it ends (as it does after each call)."""
        # How many entries of each (segment, payload length) came or went, then their
        # fragments' sectors per segment.
        counts: dict[tuple[int, int], int] = {}
        get = counts.get
        unpack = _SEG_PLEN.unpack_from
        for sign, entries in ((-1, gone), (1, came)):
            for e in entries:
                key = unpack(e)
                counts[key] = get(key, 0) + sign
        segments = self.segments
        delta: dict[int, int] = {}
        for (seg_id, plen), n in counts.items():
            delta[seg_id] = delta.get(seg_id, 0) + n * fragment_units(plen, segments[seg_id].k)
        for seg_id, d in delta.items():
            seg = segments[seg_id]
            seg.live += d
            if seg.live == 0:
                self.emptied.add(seg_id)
            else:
                self.emptied.discard(seg_id)

    @property
    def maps(self) -> dict[int, int]:
        """Map id -> root node id, for every map."""
        return self.forest.roots

    # ---- applying operations -------------------------------------------------------------
    def apply(self, op: Op) -> None:
        code = op[0]
        if code == OP_MAP_SET:
            _, map_id, block = _MAP_SET.unpack_from(op, 0)
            self._map_set(map_id, block, op[_MAP_SET.size:])
        elif code == OP_MAP_CLEAR:
            _, map_id, start, count = _MAP_CLEAR.unpack(op)
            for block, _raw in list(self.forest.items(map_id, start, start + count)):
                self.forest.set(map_id, block, HOLE)
        elif code == OP_RELOCATE:
            _, node, slot = _RELOCATE.unpack_from(op, 0)
            o = _RELOCATE.size
            self.forest.relocate(node, slot, op[o:o + ENTRY_SIZE],
                                 op[o + ENTRY_SIZE:o + 2 * ENTRY_SIZE])
        elif code == OP_JSON:
            d = json.loads(op[_JSON_HDR.size:])
            getattr(self, "_op_" + d.pop("op"))(**d)
        else:
            raise StorageError(f"unknown op code {code}")

    def _map_set(self, map_id: int, block: int, entry: bytes) -> None:
        self.forest.set(map_id, block, entry)

    def apply_map_sets(self, map_id: int, blocks: Sequence[int],
                       entries: Sequence[bytes]) -> None:
        """``apply(op_map_set(map_id, block, entry))`` for each pair in turn, with the same
        result (``MapForest.set_many``): a writeback's map updates in one call."""
        self.forest.set_many(map_id, blocks, entries)

    def _op_seg_new(self, id: int, k: int, m: int, extents: list[list[int]],
                    birth: int) -> None:
        self.segments[id] = Segment(id, k, m, tuple((a, b) for a, b in extents), birth)
        self.next_id = max(self.next_id, id + 1)
        for idx, _e in extents:
            # A degraded segment: the member is away, its column is written by a rebuild.
            # (A pool on RADOS has no members: its one failure domain is the RADOS pool.)
            if idx < len(self.members) and self.members[idx].away:
                self.members[idx].marks[id] = 0

    def _op_seg_fill(self, id: int, fill: int) -> None:
        self.segments[id].fill = fill

    def _op_seg_free(self, id: int) -> None:
        seg = self.segments.pop(id)
        if seg.live:
            raise StorageError(f"segment {id} freed with {seg.live} live sectors")
        self.emptied.discard(id)
        for idx, _e in seg.extents:
            if idx < len(self.members):
                self.members[idx].marks.pop(id, None)

    def _op_map_new(self, id: int) -> None:
        self.forest.create(id)
        self.next_id = max(self.next_id, id + 1)

    def _op_map_clone(self, id: int, src: int) -> None:
        self.forest.clone(src, id)
        self.next_id = max(self.next_id, id + 1)

    def _op_map_del(self, id: int) -> None:
        self.forest.drop(id)

    def _op_obj_put(self, id: int, value: dict[str, Any]) -> None:
        self.objects[id] = value
        self.next_id = max(self.next_id, id + 1)

    def _op_obj_del(self, id: int) -> None:
        del self.objects[id]

    def _op_member_add(self, uuid: str, index: int, size: int, n_extents: int,
                       path: str = "") -> None:
        self.members.append(MemberInfo(uuid, index, size, n_extents, path=path))
        self.members_epoch += 1

    def _op_member_path(self, index: int, path: str) -> None:
        """Member ``index``'s device was seen at ``path`` (imported or brought back from
        another path)."""
        self.members[index].path = path

    def _op_member_state(self, index: int, state: str, last_gen: int = 0,
                         marks: list[list[int]] | None = None) -> None:
        mi = self.members[index]
        mi.state = state
        if state in AWAY:
            mi.last_gen = last_gen
        for seg, fill in marks or ():
            if seg in self.segments:
                mi.marks[seg] = min(fill, mi.marks.get(seg, fill))
        self.members_epoch += 1

    def _op_member_replace(self, index: int, uuid: str, size: int, n_extents: int,
                           path: str = "") -> None:
        """A new device takes member ``index``'s place: every fragment it should hold is
        to be rebuilt."""
        mi = self.members[index]
        mi.uuid, mi.size, mi.n_extents, mi.state = uuid, size, n_extents, "online"
        mi.path = path or mi.path
        mi.marks = {s.id: 0 for s in self.segments.values()
                    if any(i == index for i, _e in s.extents)}
        self.members_epoch += 1

    def _op_member_clean(self, index: int, seg: int) -> None:
        """Member ``index`` holds every fragment of segment ``seg`` again (rebuilt; what
        was written after the rebuild looked went to the member directly)."""
        self.members[index].marks.pop(seg, None)
        self.members_epoch += 1

    def _op_task(self, name: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.tasks.pop(name, None)
        else:
            self.tasks[name] = value

    # ---- checkpoint serialisation ---------------------------------------------------------
    def to_json(self) -> bytes:
        return json.dumps({
            "uuid": self.uuid, "name": self.name, "extent_size": self.extent_size,
            "profile": self.profile, "members": [m.to_json() for m in self.members],
            "segments": [s.to_json() for s in self.segments.values()],
            "objects": {str(k): v for k, v in self.objects.items()},
            "maps": {str(k): v for k, v in sorted(self.forest.roots.items())},
            "next_id": self.next_id, "txg": self.txg,
            "generation": self.generation, "tasks": self.tasks,
        }, separators=(",", ":")).encode()

    @staticmethod
    def from_json(raw: bytes) -> PoolState:
        d = json.loads(raw)
        st = PoolState(d["uuid"], d["name"], d["extent_size"], d["profile"],
                       [MemberInfo.from_json(m) for m in d["members"]])
        st.segments = {v[0]: Segment.from_json(v) for v in d["segments"]}
        st.objects = {int(k): v for k, v in d["objects"].items()}
        st.forest.roots = {int(k): v for k, v in d["maps"].items()}
        st.next_id, st.txg, st.generation = d["next_id"], d["txg"], d["generation"]
        st.tasks = d.get("tasks", {})
        return st
