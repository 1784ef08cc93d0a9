"""The pool checker (fsck): verifies all metadata and references, and says in plain words
what is wrong.

It checks, against the pool's committed metadata:
- every present member's labels (both copies) and its newest superblock;
- every checkpoint blob, on every present member (each copy's checksum);
- every segment: extents in range, on distinct members, not shared with another segment,
  not also in the free lists, fill within the extent, live count equal to what the maps hold;
- every map entry: points into an existing segment, inside its fill;
- every volume-like object's map exists, and no map is orphaned;
- with ``deep``: reads every fragment of every record (all k + m) and verifies it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import trio

from pool import codec
from pool.errors import DeviceError, ImportFailed
from pool.layout import SECTOR
from pool.metastore import MetaStore
from pool.pool import Pool, _read_label, label_copies
from pool.state import ENTRY, HOLE


@dataclass(frozen=True, slots=True)
class CheckReport:
    pool: str
    problems: tuple[str, ...]
    segments: int
    records: int
    fragments_checked: int
    fragments_bad: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        head = (f"pool {self.pool}: {self.segments} segments, {self.records} records"
                + (f", {self.fragments_checked} fragments read" if self.fragments_checked
                   else ""))
        if self.ok:
            return head + ": no problems found"
        return "\n".join([head + f": {len(self.problems)} problem(s)",
                          *("  - " + p for p in self.problems)])


async def check(pool: Pool, *, deep: bool = False) -> CheckReport:
    """Check ``pool`` (commits first, so that what is checked is what is on disk)."""
    await pool.commit()
    problems: list[str] = []
    st = pool.state
    # ---- members, labels and superblocks (blocking: in a thread) ---------------------------
    def members() -> list[str]:
        out = []
        for mi in st.members:
            dev = pool.devices[mi.index]
            if mi.state == "removed":
                continue
            if dev is None:
                out.append(f"member {mi.index} ({mi.uuid}) is {pool.member_state(mi.index)}: "
                           f"the pool is degraded")
                continue
            for where, lab in label_copies(dev, pool.deadlines, mi.size):
                if isinstance(lab, str):
                    out.append(f"{dev.path}: {where} label is bad: {lab}")
                    continue
                if lab.device_uuid != mi.uuid or lab.index != mi.index:
                    out.append(f"{dev.path}: {where} label names member {lab.index} "
                               f"({lab.device_uuid}), metadata says {mi.index} ({mi.uuid})")
            try:
                _read_label(dev, pool.deadlines)
            except ImportFailed as e:
                out.append(e.message)
            sbs = MetaStore.read_superblocks(dev, st.uuid, pool.deadlines)
            newest = max((sb.generation for sb in sbs), default=-1)
            if newest < st.generation:
                out.append(f"{dev.path}: newest superblock is generation {newest}, the pool "
                           f"is at {st.generation}")
        return out
    problems += await trio.to_thread.run_sync(members)

    # ---- checkpoint blobs --------------------------------------------------------------------
    def blobs() -> list[str]:
        out = []
        paths = [d.path for d in pool.meta.present()]
        nodes = sorted(pool._page_locs.items())
        copies = pool.meta.blob_copies([loc for _nid, loc in nodes])
        for (nid, loc), oks in zip(nodes, copies, strict=True):
            for path, ok in zip(paths, oks, strict=True):
                if not ok:
                    out.append(f"{path}: copy of map node {nid} (metadata units "
                               f"{loc.unit}-{loc.unit + loc.units - 1}) fails its checksum")
        return out
    problems += await trio.to_thread.run_sync(blobs)

    # ---- segments and extents -----------------------------------------------------------------
    cap = pool.layout.extent_size // SECTOR
    owner: dict[tuple[int, int], int] = {}
    for seg in st.segments.values():
        if len(seg.extents) != seg.k + seg.m:
            problems.append(f"segment {seg.id} has {len(seg.extents)} extents, its profile "
                            f"needs {seg.k + seg.m}")
        devs = [i for i, _ in seg.extents]
        if len(set(devs)) != len(devs):
            problems.append(f"segment {seg.id} puts two fragments on one member ({devs})")
        for idx, ext in seg.extents:
            if idx >= len(st.members) or not 0 <= ext < st.members[idx].n_extents:
                problems.append(f"segment {seg.id} uses extent {ext} of member {idx}, which "
                                f"does not exist")
            if (idx, ext) in owner:
                problems.append(f"extent {ext} of member {idx} belongs to segments "
                                f"{owner[(idx, ext)]} and {seg.id}")
            owner[(idx, ext)] = seg.id
            if idx < len(pool._free) and ext in pool._free[idx]:
                problems.append(f"extent {ext} of member {idx} is in segment {seg.id} and "
                                f"also on the free list")
        if not 0 <= seg.fill <= cap:
            problems.append(f"segment {seg.id} fill {seg.fill} is outside 0..{cap} sectors")

    # ---- maps, nodes and references --------------------------------------------------------
    forest = st.forest
    refs: Counter[int] = Counter()
    for map_id, root in forest.roots.items():
        if root:
            if root not in forest.nodes:
                problems.append(f"map {map_id} has root node {root}, which does not exist")
                continue
            refs[root] += 1
    for nid, node in forest.nodes.items():
        if not node.leaf:
            for child in node.data:
                if child:
                    if child not in forest.nodes:
                        problems.append(f"map node {nid} points to node {child}, which does "
                                        f"not exist")
                    refs[child] += 1
    for nid, node in forest.nodes.items():
        if refs[nid] == 0:
            problems.append(f"map node {nid} is not reachable from any map (leaked)")
        elif refs[nid] != node.refs:
            problems.append(f"map node {nid} has reference count {node.refs}, the trees "
                            f"reference it {refs[nid]} times")
    if not pool._page_locs.keys() >= forest.nodes.keys() - forest.dirty:
        problems.append("some map nodes have no checkpoint location")
    live: Counter[int] = Counter()
    n_records = 0
    records_to_read: list[tuple[int, int, bytes]] = []
    for nid, node in forest.nodes.items():
        if not isinstance(node.data, bytearray):
            continue
        for slot in range(len(node.data) // ENTRY.size):
            raw = bytes(node.data[slot * ENTRY.size:(slot + 1) * ENTRY.size])
            if raw == HOLE:
                continue
            n_records += 1
            seg_id, off, plen, _flags, _rh = ENTRY.unpack(raw)
            target = st.segments.get(seg_id)
            if target is None:
                problems.append(f"map node {nid} slot {slot} points to segment {seg_id}, "
                                f"which does not exist")
                continue
            units = codec.fragment_units(plen, target.k)
            if plen <= 0 or off + units > target.fill:
                problems.append(f"map node {nid} slot {slot} points past the written part of "
                                f"segment {seg_id} (sectors {off}+{units}, fill {target.fill})")
            live[seg_id] += units
            if deep:
                records_to_read.append((nid, slot, raw))
    for seg in st.segments.values():
        if live[seg.id] != seg.live:
            problems.append(f"segment {seg.id} says {seg.live} live sectors, the maps "
                            f"reference {live[seg.id]}")
    referenced = [o["map"] for o in st.objects.values() if "map" in o]
    for obj_id, obj in st.objects.items():
        if "map" in obj and obj["map"] not in st.maps:
            problems.append(f"{obj.get('type', 'object')} {obj.get('name', obj_id)} refers to "
                            f"map {obj['map']}, which does not exist")
    for map_id in st.maps:
        n = referenced.count(map_id)
        if n != 1:
            problems.append(f"map {map_id} is referenced by {n} objects (expected 1)")

    # ---- deep: every fragment of every record ------------------------------------------------
    checked = bad = 0
    if deep:
        def read_all() -> tuple[int, int, list[str]]:
            c = b = 0
            out = []
            for map_id, block, raw in records_to_read:
                seg_id, off, plen, _fl, rhash = ENTRY.unpack(raw)
                seg = st.segments[seg_id]
                units = codec.fragment_units(plen, seg.k)
                for i, (idx, ext) in enumerate(seg.extents):
                    dev = pool.devices[idx]
                    if dev is None:
                        continue
                    c += 1
                    try:
                        frag = dev.pread(pool.layout.extent_offset(ext) + off * SECTOR,
                                         units * SECTOR)
                    except DeviceError as e:
                        frag = b""
                        out.append(f"{dev.path}: {e.message}")
                    if codec.check_fragment(frag, i, seg.k, seg.m, plen, rhash) is None:
                        b += 1
                        out.append(f"{dev.path}: fragment {i} of the record in map node "
                                   f"{map_id} slot {block} (segment {seg_id}) fails "
                                   f"verification")
            return c, b, out
        checked, bad, msgs = await trio.to_thread.run_sync(read_all)
        problems += msgs
    return CheckReport(st.name, tuple(problems), len(st.segments), n_records, checked, bad)
