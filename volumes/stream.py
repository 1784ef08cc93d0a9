"""The send/receive stream format (docs/STREAM.md): encoder and an incremental parser.

Pure code: no I/O, no trio. ``encode_*`` build the bytes of each part; ``StreamParser`` is
fed bytes as they arrive and yields parsed parts, refusing anything malformed with a
``StreamError`` that says what is wrong and where.

Layout::

    header  "STGDSTRM" | version u32 | n u32 | n bytes of JSON | xxh3-64 of all before  (BE)
    record  kind u8 | seq u64 | offset u64 | length u32 | flags u8 | n u32 | n bytes
            | xxh3-64(seed = stream seed) of the record's header and payload
    end     a record of kind END whose payload is: records u64 | sum u64 | bytes u64

Every record's hash covers its sequence number, so a record dropped, repeated or moved is
refused; the seed is taken from the header, so a record of another stream is refused. The
end record states how many records this stream carried and the sum (mod 2**64) of their
hashes: a stream cut short, or spliced, is refused there.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

import lz4.block
import xxhash

from pool.errors import InvalidArgument

Buffer = bytes | bytearray | memoryview
MAGIC = b"STGDSTRM"
VERSION = 1
CHUNK = 1 << 20                   # logical bytes per data record at most
MAX_HOLE = CHUNK * 1024          # a hole record (no payload) covers at most this
MAX_HEADER = 1 << 20
_PRE = struct.Struct(">8sII")
_REC = struct.Struct(">BQQIBI")   # kind, seq, offset, length, flags, payload length
_HASH = struct.Struct(">Q")
_END = struct.Struct(">QQQ")
DATA, HOLE, END = 1, 2, 3
FLAG_LZ4 = 1
# A raw record whose every block the sending volume had stored raw after lz4 failed on it
# (a volume that compresses tries each block when it is written): a hint that lets the
# receiving volume skip trying again. Receivers that do not know it ignore it.
FLAG_INCOMPRESSIBLE = 2
_MASK = (1 << 64) - 1


class StreamError(InvalidArgument):
    """The stream is malformed, corrupted, cut short or of a newer format."""


def _h(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    return xxhash.xxh3_64_intdigest(data, seed)


def stream_seed(header: dict[str, Any]) -> int:
    """The seed of every record hash: the stream's identity (what it sends, from what)."""
    ident = json.dumps([header["snapshot"]["uuid"],
                        header["base"]["uuid"] if header.get("base") else None,
                        header["chunk"], VERSION]).encode()
    return _h(ident)


def encode_header(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True).encode()
    head = _PRE.pack(MAGIC, VERSION, len(body)) + body
    return head + _HASH.pack(_h(head))


@dataclass
class Summer:
    """Counts records and sums their hashes, for the end record."""

    seed: int
    records: int = 0
    total: int = 0
    nbytes: int = 0

    def add(self, digest: int, length: int) -> None:
        self.records += 1
        self.total = (self.total + digest) & _MASK
        self.nbytes += length

    def merge(self, other: Summer) -> None:
        """Fold in the records counted by ``other`` (the sum does not depend on order)."""
        self.records += other.records
        self.total = (self.total + other.total) & _MASK
        self.nbytes += other.nbytes


def encode_record(kind: int, seq: int, offset: int, length: int, payload: Buffer,
                  summer: Summer, flags: int = 0) -> list[Buffer]:
    """A record as the buffers to write back to back (its head, the payload as it is, its
    hash): a large payload is never copied into a joined record."""
    head = _REC.pack(kind, seq, offset, length, flags, len(payload))
    digest = xxhash.xxh3_64(head, summer.seed)
    digest.update(payload)
    d = digest.intdigest()
    if kind != END:
        summer.add(d, length if kind == DATA else 0)
    return [head, payload, _HASH.pack(d)]


def encode_data(seq: int, offset: int, data: Buffer, summer: Summer,
                try_lz4: bool = True) -> list[Buffer]:
    """A data record: lz4 when it saves at least 1/8, else raw. Without ``try_lz4`` (every
    block is known not to compress) raw, marked FLAG_INCOMPRESSIBLE."""
    if not try_lz4:
        return encode_record(DATA, seq, offset, len(data), data, summer,
                             FLAG_INCOMPRESSIBLE)
    packed = lz4.block.compress(data, store_size=False)
    if len(packed) <= len(data) - len(data) // 8:
        return encode_record(DATA, seq, offset, len(data), packed, summer, FLAG_LZ4)
    return encode_record(DATA, seq, offset, len(data), data, summer)


def encode_end(seq: int, summer: Summer) -> list[Buffer]:
    return encode_record(END, seq, 0, 0, _END.pack(summer.records, summer.total,
                                                   summer.nbytes), summer)


@dataclass(frozen=True)
class Header:
    fields: dict[str, Any]
    seed: int


@dataclass(frozen=True)
class Record:
    kind: int                     # DATA or HOLE
    seq: int
    offset: int
    length: int
    # DATA: the logical bytes (decompressed). A view into the bytes fed to the parser
    # when the record was sent uncompressed (no copy): fed bytes must not change after.
    data: bytes | memoryview | None
    incompressible: bool = False  # FLAG_INCOMPRESSIBLE: each block was tried with lz4


@dataclass(frozen=True)
class End:
    records: int


NEED_DATA = object()


class StreamParser:
    """Feed bytes with ``feed``; ``next()`` returns a Header, Record, End or NEED_DATA.

    Fed bytes are kept as they came (a queue of views, not one growing buffer) and records
    are cut out of them without copying; only a part that straddles two feeds is joined."""

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._avail = 0               # bytes fed and not yet taken
        self._pos = 0                 # stream offset of the first byte not taken
        self.header: Header | None = None
        self._summer: Summer | None = None
        self._next_seq = 0
        self.ended = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.ended and data:
            raise StreamError(f"{len(data)} bytes after the end of the stream")
        if len(data):
            self._chunks.append(memoryview(data).cast("B"))
            self._avail += len(data)

    def _peek(self, n: int) -> memoryview:
        """The next ``n`` bytes (``n`` <= ``_avail``) as one contiguous view."""
        first = self._chunks[0]
        if len(first) >= n:
            return first[:n]
        joined = bytearray(n)
        pos = 0
        while pos < n:
            c = self._chunks.popleft()
            take = min(len(c), n - pos)
            joined[pos:pos + take] = c[:take]
            pos += take
            if take < len(c):
                self._chunks.appendleft(c[take:])
        view = memoryview(joined)
        self._chunks.appendleft(view)
        return view

    def _take(self, n: int) -> memoryview:
        out = self._peek(n)
        if len(self._chunks[0]) == n:
            self._chunks.popleft()
        else:
            self._chunks[0] = self._chunks[0][n:]
        self._avail -= n
        self._pos += n
        return out

    def next(self) -> Header | Record | End | object:
        if self.ended:
            return NEED_DATA
        if self.header is None:
            return self._header()
        return self._record()

    def _header(self) -> Header | object:
        if self._avail < _PRE.size:
            if self._avail and not MAGIC.startswith(bytes(self._peek(min(8, self._avail)))):
                raise StreamError("not a storaged stream (bad magic)")
            return NEED_DATA
        magic, version, n = _PRE.unpack_from(self._peek(_PRE.size))
        if magic != MAGIC:
            raise StreamError("not a storaged stream (bad magic)")
        if n > MAX_HEADER:
            raise StreamError(f"stream header of {n} bytes is implausibly large")
        if self._avail < _PRE.size + n + _HASH.size:
            return NEED_DATA
        raw = self._take(_PRE.size + n)
        (want,) = _HASH.unpack(self._take(_HASH.size))
        if _h(raw) != want:
            raise StreamError("the stream header is corrupted (checksum mismatch)")
        # The first 16 bytes keep this layout in every version, so the version is read
        # only once the checksum shows it is what the sender wrote.
        if version > VERSION:
            raise StreamError(f"the stream is format version {version}; this storaged reads "
                              f"version {VERSION} and older: upgrade the receiving side")
        try:
            fields = json.loads(bytes(raw[_PRE.size:]))
            if not isinstance(fields, dict):
                raise ValueError("not an object")
            seed = stream_seed(fields)
            resume = fields.get("resume")
            self._next_seq = int(resume["seq"]) if resume else 0
        except (ValueError, KeyError, TypeError) as e:
            raise StreamError(f"the stream header is malformed: {e}") from None
        self.header = Header(fields, seed)
        self._summer = Summer(seed)
        return self.header

    def _record(self) -> Record | End | object:
        if self._avail < _REC.size:
            return NEED_DATA
        kind, seq, offset, length, flags, n = _REC.unpack_from(self._peek(_REC.size))
        at = self._pos
        if kind not in (DATA, HOLE, END):
            raise StreamError(f"unknown record kind {kind} at stream offset {at}")
        if n > 2 * CHUNK + 4096 or length > MAX_HOLE:
            raise StreamError(f"record at stream offset {at} is implausibly large")
        if self._avail < _REC.size + n + _HASH.size:
            return NEED_DATA
        assert self._summer is not None
        head = self._take(_REC.size)
        payload = self._take(n)
        (want,) = _HASH.unpack(self._take(_HASH.size))
        digest = xxhash.xxh3_64(head, self._summer.seed)
        digest.update(payload)
        d = digest.intdigest()
        if d != want:
            raise StreamError(f"record {seq} at stream offset {at} is corrupted (checksum "
                              f"mismatch)")
        if seq != self._next_seq:
            raise StreamError(f"record {seq} at stream offset {at} is out of order (expected "
                              f"record {self._next_seq}): the stream was cut or spliced")
        self._next_seq += 1
        if kind == END:
            if n != _END.size:
                raise StreamError("malformed end record")
            records, total, _nbytes = _END.unpack(payload)
            if (records, total) != (self._summer.records, self._summer.total):
                raise StreamError(f"the stream ends after {self._summer.records} records but "
                                  f"says it carried {records}: records are missing")
            self.ended = True
            if self._avail:
                raise StreamError(f"{self._avail} bytes after the end of the stream")
            return End(records)
        self._summer.add(d, length if kind == DATA else 0)
        if kind == HOLE:
            return Record(HOLE, seq, offset, length, None)
        if flags & FLAG_LZ4:
            try:
                data = lz4.block.decompress(payload, uncompressed_size=length)
            except lz4.block.LZ4BlockError:
                raise StreamError(f"record {seq} does not decompress") from None
        else:
            data = payload
        if len(data) != length:
            raise StreamError(f"record {seq} carries {len(data)} bytes, says {length}")
        return Record(DATA, seq, offset, length, data,
                      incompressible=flags & (FLAG_LZ4 | FLAG_INCOMPRESSIBLE)
                      == FLAG_INCOMPRESSIBLE)

    @property
    def next_seq(self) -> int:
        return self._next_seq
