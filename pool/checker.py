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

On a pool on RADOS (no members) the member and blob checks are the RADOS ones
(``check_rados``): the superblock, every checkpoint blob and map node verified, the
objects under the pool's prefix that nothing references listed (orphans); segment
checks skip member ranges (a segment is one object of the RADOS pool), and ``deep``
reads every record through the store's column objects.

One function per check (check_members, check_blobs, check_segments, check_map_nodes,
scan_records, check_live_counts, check_objects, read_fragments), each returning the
problems it found; check() runs them in that order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import trio

from pool import codec
from pool.errors import ImportFailed, StorageError
from pool.labels import label_copies, read_label
from pool.layout import SECTOR
from pool.metastore import MetaStore
from pool.pool import Pool
from pool.rados.backend import OBJECT_KINDS, read_checkpoint
from pool.rados.store import RadosStore
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
    """Check ``pool`` (commits first, so that what is checked is what is on disk): each
    check below in turn, the blocking ones (they read the members) in a thread."""
    await pool.commit()
    st = pool.state
    if pool.rados is not None:
        problems = await check_rados(pool)
    else:
        problems = await _metadata_problems(pool)
        if problems:
            # The pool served meanwhile: a commit may have moved what the threads read
            # (a superblock mid-write, a checkpoint blob rewritten in a freed place).
            # What is wrong stays wrong with commits held off; a race does not.
            async with pool.txn.lock:
                problems = await _metadata_problems(pool)
    problems += check_segments(pool)
    problems += check_map_nodes(pool)
    scan = scan_records(pool, keep=deep)
    problems += scan.problems
    problems += check_live_counts(pool, scan.live)
    problems += check_objects(pool)
    checked = bad = 0
    if deep:
        # The reads run in a thread while the pool serves: the segments they read are
        # pinned meanwhile, so the cleaner neither moves nor frees them under the check
        # (pins invariant 1) and a record overwritten meanwhile still reads as it was.
        pinned = {ENTRY.unpack_from(raw)[0] for _n, _s, raw in scan.entries}
        for seg_id in pinned:
            pool.pins.pin(seg_id)
        try:
            checked, bad, msgs = await trio.to_thread.run_sync(read_fragments, pool,
                                                               scan.entries)
        finally:
            for seg_id in pinned:
                pool.pins.unpin(seg_id, reap=False)
            pool.reap()
        problems += msgs
    return CheckReport(st.name, tuple(problems), len(st.segments), scan.records, checked, bad)


async def _metadata_problems(pool: Pool) -> list[str]:
    """check_members and check_blobs, in a thread (they read the members)."""
    problems = await trio.to_thread.run_sync(check_members, pool)
    return problems + await trio.to_thread.run_sync(check_blobs, pool)


def check_members(pool: Pool) -> list[str]:
    """Every present member's labels (both copies, naming the right member) and its newest
    superblock; an absent member makes the pool degraded. Blocking."""
    st = pool.state
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
            read_label(dev, pool.deadlines)
        except ImportFailed as e:
            out.append(e.message)
        sbs = MetaStore.read_superblocks(dev, st.uuid, pool.deadlines)
        newest = max((sb.generation for sb in sbs), default=-1)
        if newest < st.generation:
            out.append(f"{dev.path}: newest superblock is generation {newest}, the pool "
                       f"is at {st.generation}")
    return out


def check_blobs(pool: Pool) -> list[str]:
    """Every copy of every checkpointed map node, on every present member, passes its
    checksum. Blocking."""
    out = []
    paths = [d.path for d in pool.meta.present()]
    nodes = sorted(pool.txn.page_locs.items())
    copies = pool.meta.blob_copies([loc for _nid, loc in nodes])
    for (nid, loc), oks in zip(nodes, copies, strict=True):
        for path, ok in zip(paths, oks, strict=True):
            if not ok:
                out.append(f"{path}: copy of map node {nid} (metadata units "
                           f"{loc.unit}-{loc.unit + loc.units - 1}) fails its checksum")
    return out


def check_segments(pool: Pool) -> list[str]:
    """Every segment: k + m extents, in range, on distinct members, not shared with
    another segment, not also free; its fill within the extent."""
    st = pool.state
    out = []
    cap = pool.layout.extent_size // SECTOR
    owner: dict[tuple[int, int], int] = {}
    for seg in st.segments.values():
        if len(seg.extents) != seg.k + seg.m:
            out.append(f"segment {seg.id} has {len(seg.extents)} extents, its profile "
                       f"needs {seg.k + seg.m}")
        devs = [i for i, _ in seg.extents]
        if len(set(devs)) != len(devs):
            out.append(f"segment {seg.id} puts two fragments on one member ({devs})")
        if pool.rados is not None:
            for idx, n in seg.extents:
                if idx != 0 or (idx, n) in owner:
                    out.append(f"segment {seg.id} has object ({idx}, {n}), which is not "
                               f"its own object of the RADOS pool")
                owner[(idx, n)] = seg.id
            if not 0 <= seg.fill <= cap:
                out.append(f"segment {seg.id} fill {seg.fill} is outside 0..{cap} sectors")
            continue
        for idx, ext in seg.extents:
            if idx >= len(st.members) or not 0 <= ext < st.members[idx].n_extents:
                out.append(f"segment {seg.id} uses extent {ext} of member {idx}, which "
                           f"does not exist")
            if (idx, ext) in owner:
                out.append(f"extent {ext} of member {idx} belongs to segments "
                           f"{owner[(idx, ext)]} and {seg.id}")
            owner[(idx, ext)] = seg.id
            if pool.store.is_free(idx, ext):
                out.append(f"extent {ext} of member {idx} is in segment {seg.id} and "
                           f"also on the free list")
        if not 0 <= seg.fill <= cap:
            out.append(f"segment {seg.id} fill {seg.fill} is outside 0..{cap} sectors")
    return out


def check_map_nodes(pool: Pool) -> list[str]:
    """The map forest: roots and children exist, every node is reachable and its
    reference count is what the trees hold, every clean node has a checkpoint location."""
    forest = pool.state.forest
    out = []
    refs: Counter[int] = Counter()
    for map_id, root in forest.roots.items():
        if root:
            if root not in forest.nodes:
                out.append(f"map {map_id} has root node {root}, which does not exist")
                continue
            refs[root] += 1
    for nid, node in forest.nodes.items():
        if not node.leaf:
            for child in node.data:
                if child:
                    if child not in forest.nodes:
                        out.append(f"map node {nid} points to node {child}, which does "
                                   f"not exist")
                    refs[child] += 1
    for nid, node in forest.nodes.items():
        if refs[nid] == 0:
            out.append(f"map node {nid} is not reachable from any map (leaked)")
        elif refs[nid] != node.refs:
            out.append(f"map node {nid} has reference count {node.refs}, the trees "
                       f"reference it {refs[nid]} times")
    if not set(pool.txn.meta.page_ids()) >= forest.nodes.keys() - forest.dirty:
        out.append("some map nodes have no checkpoint location")
    return out


@dataclass(frozen=True, slots=True)
class RecordScan:
    """What one pass over the map entries found (scan_records)."""
    problems: list[str]
    records: int                                  # map entries that are not holes
    live: Counter[int]                            # segment id -> sectors the maps reference
    entries: list[tuple[int, int, bytes]]         # (node id, slot, entry), if kept


def scan_records(pool: Pool, *, keep: bool = False) -> RecordScan:
    """Every map entry points into an existing segment, inside its fill; counts the
    sectors each segment holds for the maps, and with ``keep`` lists the entries whose
    segment exists (what a deep check reads)."""
    st = pool.state
    out: list[str] = []
    live: Counter[int] = Counter()
    n_records = 0
    entries: list[tuple[int, int, bytes]] = []
    for nid, node in st.forest.nodes.items():
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
                out.append(f"map node {nid} slot {slot} points to segment {seg_id}, "
                           f"which does not exist")
                continue
            units = codec.fragment_units(plen, target.k)
            if plen <= 0 or off + units > target.fill:
                out.append(f"map node {nid} slot {slot} points past the written part of "
                           f"segment {seg_id} (sectors {off}+{units}, fill {target.fill})")
            live[seg_id] += units
            if keep:
                entries.append((nid, slot, raw))
    return RecordScan(out, n_records, live, entries)


def check_live_counts(pool: Pool, live: Counter[int]) -> list[str]:
    """Each segment's live count equals the sectors the maps reference in it."""
    return [f"segment {seg.id} says {seg.live} live sectors, the maps reference "
            f"{live[seg.id]}"
            for seg in pool.state.segments.values() if live[seg.id] != seg.live]


def check_objects(pool: Pool) -> list[str]:
    """Every volume-like object's map exists, and each map belongs to exactly one
    object (none orphaned)."""
    st = pool.state
    out = []
    referenced = [o["map"] for o in st.objects.values() if "map" in o]
    for obj_id, obj in st.objects.items():
        if "map" in obj and obj["map"] not in st.maps:
            out.append(f"{obj.get('type', 'object')} {obj.get('name', obj_id)} refers to "
                       f"map {obj['map']}, which does not exist")
    for map_id in st.maps:
        n = referenced.count(map_id)
        if n != 1:
            out.append(f"map {map_id} is referenced by {n} objects (expected 1)")
    return out


async def check_rados(pool: Pool) -> list[str]:
    """A pool on RADOS: its committed superblock and every checkpoint blob and map node
    verified (meta invariant 4), the checkpoint naming the map nodes the pool holds, and
    the objects under the pool's prefix that nothing references (orphans: a crash
    between writing and committing, or before a delete)."""
    assert pool.rados is not None
    parts = pool.rados
    out: list[str] = []
    try:
        sb = await parts.meta.read_superblock()
        _state, nodes, _sizes, _blobs = await read_checkpoint(parts.meta, sb)
    except StorageError as e:
        return [f"RADOS pool {parts.conn.pool}: {e.message}"]
    if sb.generation != pool.txn.sb_gen:
        out.append(f"{parts.lock.oid}: superblock generation {sb.generation}, the pool "
                   f"is at {pool.txn.sb_gen}")
    if nodes.keys() != set(pool.txn.meta.page_ids()):
        out.append(f"{parts.lock.oid}: the checkpoint's node index differs from the pool's")
    for oid in await parts.meta.orphans(sb, OBJECT_KINDS):
        out.append(f"RADOS pool {parts.conn.pool}: object {oid} is an orphan (no "
                   f"checkpoint references it)")
    store = pool.store
    assert isinstance(store, RadosStore)
    for oid in await store.orphans():
        out.append(f"RADOS pool {parts.conn.pool}: object {oid} is an orphan (no segment "
                   f"uses it)")
    return out


def read_fragments(pool: Pool,
                 entries: list[tuple[int, int, bytes]]) -> tuple[int, int, list[str]]:
    """Deep: read every fragment of every record in ``entries`` through the store's
    column handles (the member devices, or a RADOS segment's object), skipping columns
    that are away or await a rebuild, and verify it. Returns (fragments read, bad,
    problems). Blocking."""
    st = pool.state
    c = b = 0
    out = []
    for map_id, block, raw in entries:
        seg_id, off, plen, _fl, rhash = ENTRY.unpack(raw)
        seg = st.segments[seg_id]
        units = codec.fragment_units(plen, seg.k)
        for i, col in enumerate(pool.store.columns(seg)):
            if col.reader is None:
                continue
            c += 1
            try:
                frag = col.reader.pread(col.base + off * SECTOR, units * SECTOR)
            except StorageError as e:
                frag = b""
                out.append(f"{col.name}: {e.message}")
            if codec.check_fragment(frag, i, seg.k, seg.m, plen, rhash) is None:
                b += 1
                out.append(f"{col.name}: fragment {i} of the record in map node "
                           f"{map_id} slot {block} (segment {seg_id}) fails "
                           f"verification")
    return c, b, out
