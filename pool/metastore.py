"""Metadata on disk: superblock ring, journal ring and checkpoint page area.

All of it is mirrored on every present member at the same offsets, and every piece carries
an xxh3 checksum, so any one intact copy is enough (invariants 2, 4 and 5).

Commit protocol (invariant 2; docs/FORMAT.md has the details):
- journal commit: data devices synced -> entry (txg, ops) appended at the journal head on
  every member -> every member synced. Replay stops at the first entry whose checksum fails
  or whose txg is not the next one, so a torn entry is as if never written.
- checkpoint: data synced -> changed pages and the state blob written into *free* units of
  the page area -> synced -> superblock (gen + 1) written into the next ring slot -> synced.
  Units that the previous checkpoint used and this one no longer does are freed only after
  the new superblock is durable, so the last committed state is never overwritten
  (invariant 3). The journal restarts at offset 0 after every checkpoint.

Everything here blocks: the pool calls it from worker threads.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import lz4.block
import xxhash

from pool.deadlines import Deadlines
from pool.device import Device
from pool.errors import DeviceError, NoSpace, StorageError
from pool.layout import PAGE_UNIT, SB_OFFSET, SB_SLOT_SIZE, SB_SLOTS, SECTOR, Layout
from pool.records import pread_within, writes_within

SB_MAGIC = b"SDSUPER1"
JOURNAL_MAGIC = b"SDJRNL01"
_JHDR = struct.Struct("<8sQQIIQ")  # magic, pool tag, txg, payload len, reserved, xxh3
# One entry of a checkpoint's page index blob: map node id, unit, units, length, xxh3.
PAGE_INDEX = struct.Struct("<QIIIQ")
_xxh3 = xxhash.xxh3_64_intdigest
BLOB_WINDOW = 4 << 20   # bytes of the page area read at once when many blobs are read
BLOB_GAP = 64 << 10     # unused bytes such a read may span between two blobs


@dataclass(frozen=True, slots=True)
class Loc:
    """A blob in the page area: first unit, units, stored length, xxh3 of stored bytes."""

    unit: int
    units: int
    length: int
    hash: int

    def to_json(self) -> list[int]:
        return [self.unit, self.units, self.length, self.hash]


@dataclass(frozen=True, slots=True)
class Superblock:
    pool_uuid: str
    generation: int
    txg: int
    state: Loc
    index: Loc

    def encode(self) -> bytes:
        body = json.dumps({"pool_uuid": self.pool_uuid, "generation": self.generation,
                           "txg": self.txg, "state": self.state.to_json(),
                           "index": self.index.to_json()}).encode()
        raw = SB_MAGIC + body + bytes(SB_SLOT_SIZE - 16 - len(body))
        return raw + struct.pack("<Q", _xxh3(raw))

    @staticmethod
    def decode(raw: bytes) -> Superblock | None:
        if raw[:8] != SB_MAGIC or struct.unpack("<Q", raw[-8:])[0] != _xxh3(raw[:-8]):
            return None
        d = json.loads(raw[8:-8].rstrip(b"\0"))
        return Superblock(d["pool_uuid"], d["generation"], d["txg"], Loc(*d["state"]),
                          Loc(*d["index"]))


def pool_tag(pool_uuid: str) -> int:
    """A 64-bit tag of the pool UUID, stamped on journal entries."""
    return _xxh3(pool_uuid.encode())


class MetaStore:
    """Reads and writes the mirrored metadata of one pool.

    ``devices`` is indexed by member index; ``None`` marks a member that is not present.
    ``deadlines``: the pool's (deadlines invariant 1), read at each device call.
    """

    def __init__(self, layout: Layout, devices: Sequence[Device | None], pool_uuid: str,
                 deadlines: Deadlines):
        self.layout = layout
        self.deadlines = deadlines
        self.devices = list(devices)
        self.pool_uuid = pool_uuid
        self.tag = pool_tag(pool_uuid)
        self.n_units = layout.pages_size // PAGE_UNIT
        self.bitmap = bytearray(self.n_units)  # 1 = unit in use by the committed checkpoint
        self.journal_head = 0
        self._search_from = 0
        self.failed: dict[int, DeviceError] = {}  # member -> its failed metadata write

    def present(self) -> list[Device]:
        return [d for d in self.devices if d is not None]

    # ---- mirrored raw I/O ---------------------------------------------------------------
    def _write_all(self, offset: int, data: bytes) -> None:
        """Write on every present member, in parallel. A member whose write fails or
        does not finish within the write deadline (``self.deadlines.write``) is noted in
        ``failed`` (the pool faults it: its copy of the metadata is behind); only when no
        member took the write is it an error."""
        which = [i for i, dev in enumerate(self.devices)
                 if dev is not None and i not in self.failed]
        errors = writes_within(
            [(d, partial(d.pwrite, offset, data))
             for d in (self.devices[i] for i in which) if d is not None], "metadata write",
            self.deadlines)
        last: DeviceError | None = None
        for i, err in zip(which, errors, strict=True):
            if err is not None:
                self.failed[i] = err
                last = err
        if len(which) == sum(1 for e in errors if e is not None):
            raise last or DeviceError("no member is present to take the metadata")

    def _read_any(self, offset: int, length: int,
                  valid: Callable[[bytes], bool]) -> bytes | None:
        for dev in self.present():
            try:
                raw = pread_within(dev, offset, length, self.deadlines)
            except DeviceError:
                continue
            if valid(raw):
                return raw
        return None

    # ---- superblocks --------------------------------------------------------------------
    @staticmethod
    def read_superblocks(dev: Device, pool_uuid: str, dl: Deadlines) -> list[Superblock]:
        raw = pread_within(dev, SB_OFFSET, SB_SLOTS * SB_SLOT_SIZE, dl)
        out = []
        for i in range(SB_SLOTS):
            sb = Superblock.decode(raw[i * SB_SLOT_SIZE:(i + 1) * SB_SLOT_SIZE])
            if sb is not None and sb.pool_uuid == pool_uuid:
                out.append(sb)
        return out

    def write_superblock(self, sb: Superblock) -> None:
        slot = sb.generation % SB_SLOTS
        self._write_all(SB_OFFSET + slot * SB_SLOT_SIZE, sb.encode())

    # ---- page area ----------------------------------------------------------------------
    def mark_used(self, loc: Loc) -> None:
        if loc.unit + loc.units > self.n_units:
            raise StorageError(f"metadata blob at unit {loc.unit} runs past the page area")
        self.bitmap[loc.unit:loc.unit + loc.units] = b"\1" * loc.units

    def release(self, loc: Loc) -> None:
        self.bitmap[loc.unit:loc.unit + loc.units] = bytes(loc.units)
        self._search_from = min(self._search_from, loc.unit)

    def _alloc(self, units: int, taken: bytearray) -> int:
        want = bytes(units)
        pos = taken.find(want, self._search_from)
        if pos < 0:
            pos = taken.find(want)
        if pos < 0:
            raise NoSpace("the metadata area is full; the pool needs a bigger metadata area "
                          "or fewer snapshots/volumes")
        taken[pos:pos + units] = b"\1" * units
        self._search_from = pos + units
        return pos

    def write_blobs(self, blobs: Sequence[bytes], taken: bytearray) -> list[Loc]:
        """Write each blob (lz4-compressed) into units free in ``taken`` (updated)."""
        locs = []
        for blob in blobs:
            stored = lz4.block.compress(blob)
            units = -(-len(stored) // PAGE_UNIT)
            unit = self._alloc(units, taken)
            padded = stored + bytes(units * PAGE_UNIT - len(stored))
            self._write_all(self.layout.pages_offset + unit * PAGE_UNIT, padded)
            locs.append(Loc(unit, units, len(stored), _xxh3(stored)))
        return locs

    def read_blob(self, loc: Loc) -> bytes:
        raw = self._read_any(self.layout.pages_offset + loc.unit * PAGE_UNIT,
                             loc.units * PAGE_UNIT,
                             lambda r: _xxh3(r[:loc.length]) == loc.hash)
        if raw is None:
            raise StorageError(f"metadata blob at unit {loc.unit} has no intact copy on any "
                               f"present device")
        out: bytes = lz4.block.decompress(raw[:loc.length])
        return out

    def _windows(self, locs: Sequence[Loc]) -> list[tuple[int, int, list[int]]]:
        """``locs`` (their indices) grouped into spans of the page area of up to BLOB_WINDOW
        bytes each (a bigger blob alone), without gaps over BLOB_GAP bytes: (first unit,
        end unit, indices)."""
        order = sorted(range(len(locs)), key=lambda i: locs[i].unit)
        out: list[tuple[int, int, list[int]]] = []
        for i in order:
            loc = locs[i]
            if (out and (loc.unit + loc.units - out[-1][0]) * PAGE_UNIT <= BLOB_WINDOW
                    and (loc.unit - out[-1][1]) * PAGE_UNIT <= BLOB_GAP):
                start, end, idx = out[-1]
                idx.append(i)
                out[-1] = (start, max(end, loc.unit + loc.units), idx)
            else:
                out.append((loc.unit, loc.unit + loc.units, [i]))
        return out

    def _read_window(self, dev: Device, start: int, end: int) -> memoryview:
        return memoryview(pread_within(dev, self.layout.pages_offset + start * PAGE_UNIT,
                                       (end - start) * PAGE_UNIT, self.deadlines))

    @staticmethod
    def _intact(window: memoryview, start: int, loc: Loc) -> memoryview | None:
        at = (loc.unit - start) * PAGE_UNIT
        stored = window[at:at + loc.length]
        return stored if _xxh3(stored) == loc.hash else None

    def read_blobs(self, locs: Sequence[Loc]) -> list[bytes]:
        """``read_blob`` of each of ``locs``, the page area read in windows (one read, and
        one deadline, per window rather than per blob) from the first present member that
        answers. A blob its window does not hold intact is read from any copy."""
        out: list[bytes] = [b""] * len(locs)
        devices = self.present()
        for start, end, idx in self._windows(locs):
            window: memoryview | None = None
            while devices and window is None:
                try:
                    window = self._read_window(devices[0], start, end)
                except DeviceError:
                    devices = devices[1:]       # the next windows from another member
            for k in idx:
                stored = self._intact(window, start, locs[k]) if window is not None else None
                out[k] = (lz4.block.decompress(stored) if stored is not None
                          else self.read_blob(locs[k]))
        return out

    def blob_copies(self, locs: Sequence[Loc]) -> list[list[bool]]:
        """For the checker: for each of ``locs``, which present devices hold an intact
        copy of it (read in windows, as ``read_blobs``)."""
        devices = self.present()
        out = [[False] * len(devices) for _ in locs]
        for d, dev in enumerate(devices):
            for start, end, idx in self._windows(locs):
                try:
                    window = self._read_window(dev, start, end)
                except DeviceError:
                    continue
                for k in idx:
                    out[k][d] = self._intact(window, start, locs[k]) is not None
        return out

    def repair_blobs(self, locs: Sequence[Loc]) -> tuple[int, int, int, list[int]]:
        """Scrub: verify every member's copy of each blob and rewrite bad copies from a
        good one. Returns (copies checked, bad, rewritten, members with a bad copy)."""
        checked = bad = fixed = 0
        members: list[int] = []
        for loc in locs:
            off = self.layout.pages_offset + loc.unit * PAGE_UNIT
            size = loc.units * PAGE_UNIT
            good: bytes | None = None
            wrong: list[int] = []
            for i, dev in enumerate(self.devices):
                if dev is None:
                    continue
                checked += 1
                try:
                    raw = pread_within(dev, off, size, self.deadlines)
                except DeviceError:
                    wrong.append(i)
                    continue
                if _xxh3(raw[:loc.length]) == loc.hash:
                    good = good or raw
                else:
                    wrong.append(i)
            bad += len(wrong)
            members += wrong
            if good is None:
                continue
            for i in wrong:
                dev = self.devices[i]
                if dev is None:
                    continue
                try:
                    dev.pwrite(off, good)
                    fixed += 1
                except DeviceError:
                    continue
        return checked, bad, fixed, members

    def copy_used_units(self, dst: Device) -> None:
        """Copy every unit the committed checkpoint uses onto a new member."""
        src = self.present()[0]
        unit = 0
        while unit < self.n_units:
            start = self.bitmap.find(b"\1", unit)
            if start < 0:
                break
            end = self.bitmap.find(b"\0", start)
            end = self.n_units if end < 0 else end
            for a in range(start, end, 256):
                b = min(end, a + 256)
                off = self.layout.pages_offset + a * PAGE_UNIT
                data = self._read_any(off, (b - a) * PAGE_UNIT, lambda r: True)
                if data is None:
                    raise DeviceError(f"cannot read metadata units {a}-{b} from {src.path}")
                dst.pwrite(off, data)
            unit = end

    # ---- journal ------------------------------------------------------------------------
    def entry_size(self, payload_len: int) -> int:
        return -(-(_JHDR.size + payload_len) // SECTOR) * SECTOR

    def journal_room(self, payload_len: int) -> bool:
        return self.journal_head + self.entry_size(payload_len) <= self.layout.journal_size

    def append(self, txg: int, payload: bytes) -> None:
        """Write one journal entry at the head on every present member (no sync)."""
        size = self.entry_size(len(payload))
        if self.journal_head + size > self.layout.journal_size:
            raise StorageError("journal entry does not fit; a checkpoint was due")
        hdr = _JHDR.pack(JOURNAL_MAGIC, self.tag, txg, len(payload), 0, 0)
        h = xxhash.xxh3_64(hdr[:-8])
        h.update(payload)
        raw = hdr[:-8] + struct.pack("<Q", h.intdigest()) + payload
        raw += bytes(size - len(raw))
        self._write_all(self.layout.journal_offset + self.journal_head, raw)
        self.journal_head += size

    def read_journal(self, after_txg: int) -> list[tuple[int, bytes]]:
        """Entries after checkpoint txg ``after_txg``, up to the first gap or torn entry."""
        size = self.layout.journal_size
        devices = self.present()
        windows: dict[int, tuple[int, bytes]] = {}   # device -> (start, bytes)

        def window(i: int, pos: int) -> tuple[int, bytes] | None:
            """A slice of device i's journal holding pos (read in steps of 4 MiB)."""
            cur = windows.get(i)
            if cur is None or not cur[0] <= pos < cur[0] + len(cur[1]) - _JHDR.size:
                try:
                    n = min(4 << 20, size - pos)
                    cur = (pos, pread_within(devices[i], self.layout.journal_offset + pos, n,
                                             self.deadlines))
                except DeviceError:
                    return None
                windows[i] = cur
            return cur

        out: list[tuple[int, bytes]] = []
        pos, want = 0, after_txg + 1
        while pos + _JHDR.size <= size:
            found = None
            for i in range(len(devices)):
                w = window(i, pos)
                if w is None:
                    continue
                start, img = w
                _m, _t, _x, plen, _r, _d = _JHDR.unpack_from(img, pos - start)
                if pos - start + _JHDR.size + plen > len(img) and pos + _JHDR.size + plen <= size:
                    # A big entry runs past the window: read it whole.
                    try:
                        img = pread_within(devices[i], self.layout.journal_offset + pos,
                                               _JHDR.size + plen, self.deadlines)
                        start = pos
                    except DeviceError:
                        continue
                entry = self._parse_entry(img, pos - start, want)
                if entry is not None:
                    found = entry
                    break
            if found is None:
                break
            out.append((want, found))
            pos += self.entry_size(len(found))
            want += 1
        self.journal_head = pos
        return out

    def _parse_entry(self, img: bytes, pos: int, want: int) -> bytes | None:
        magic, tag, txg, plen, _r, digest = _JHDR.unpack_from(img, pos)
        if magic != JOURNAL_MAGIC or tag != self.tag or txg != want:
            return None
        end = pos + _JHDR.size + plen
        if end > len(img):
            return None
        h = xxhash.xxh3_64(img[pos:pos + _JHDR.size - 8])
        h.update(img[pos + _JHDR.size:end])
        if h.intdigest() != digest:
            return None
        return img[pos + _JHDR.size:end]

    def sync_all(self) -> None:
        for dev in self.present():
            dev.sync()
