"""Records and fragments: how one logical block is stored (docs/FORMAT.md, "Fragments").

A block is lz4-compressed when that saves at least 1/8 (else stored raw), giving the *stored
payload*. The payload is cut into k equal chunks (zero-padded), zfec adds m parity chunks,
and each chunk becomes a fragment: a 32-byte header and the chunk, padded to whole sectors.
Fragment i of a record goes to extent i of its segment, all at the same column offset, so a
record is always a full stripe: parity is never read-modified-written.

Fragment header (little-endian):
    0  u64  xxh3-64 of bytes [8, 32 + chunk_len)  -- covers the rest of the header and the chunk
    8  4s   magic b"SDFG"
    12 u8   fragment index   13 u8 k   14 u8 m   15 u8 flags (bit 0: lz4)
    16 u32  stored payload length
    20 u32  reserved (0)
    24 u64  xxh3-64 of the whole stored payload (the record hash; also in the block map)

The record hash in the header ties a fragment to the map entry that points at it, so a stale
fragment from an earlier life of the extent never passes for live data (invariant 4).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lz4.block
import xxhash
import zfec

from pool import parity
from pool.layout import SECTOR

HEADER = struct.Struct("<Q4sBBBBIIQ")
HEADER_SIZE = HEADER.size  # 32
_PREFIX = struct.Struct("<4sBBBBII")  # the header after its checksum, up to the record hash
# (gap, n) -> n headers that far apart (check_column)
_HEADS: dict[tuple[int, int], struct.Struct] = {}
MAGIC = b"SDFG"
FLAG_LZ4 = 1

_xxh3 = xxhash.xxh3_64_intdigest
_xxh3_stream = xxhash.xxh3_64
_decoders: dict[tuple[int, int], zfec.Decoder] = {}


def chunk_length(plen: int, k: int) -> int:
    return -(-plen // k)


def fragment_units(plen: int, k: int) -> int:
    """Sectors one fragment of a record with a ``plen``-byte payload occupies."""
    return -(-(HEADER_SIZE + chunk_length(plen, k)) // SECTOR)


def worst_case_units(block_size: int, k: int) -> int:
    return fragment_units(block_size, k)


Buffer = bytes | bytearray | memoryview
_PAD = bytes(SECTOR)
_PADS: dict[int, memoryview] = {}
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class EncodedRecord:
    plen: int
    flags: int
    rhash: int
    units: int
    # k + m fragments, each units * SECTOR bytes as the buffers to write back to back
    # (its header, its chunk and zero padding: the chunk is not copied into a frame)
    pieces: list[list[Buffer]]

    @property
    def fragments(self) -> list[bytes]:
        """Each fragment as one buffer."""
        return [b"".join(p) for p in self.pieces]


def compress(data: Buffer) -> tuple[Buffer, int]:
    """The stored payload for ``data`` and its flags: lz4 if it saves at least 1/8."""
    packed = lz4.block.compress(data, store_size=False)
    if len(packed) <= len(data) - len(data) // 8:
        return packed, FLAG_LZ4
    return data, 0


def encode(data: Buffer, k: int, m: int, compressible: bool) -> EncodedRecord:
    payload, flags = compress(data) if compressible else (data, 0)
    return stripe(payload, flags, k, m)


def encode_all(datas: Sequence[Buffer], k: int, m: int,
               compressible: Sequence[bool]) -> list[EncodedRecord]:
    """``encode`` of each block (lz4 tried where ``compressible`` says), the parity of
    the whole batch computed in one go (``parity.parity_many``): what the write path
    runs in a worker thread for each batch it encodes (pool.writer)."""
    packed = [compress(d) if c else (d, 0) for d, c in zip(datas, compressible, strict=True)]
    if k == 1 or m == 0 or len(packed) < 2:
        return [stripe(p, f, k, m) for p, f in packed]
    views = [_stripe_view(p, k) for p, _f in packed]
    parities = parity.parity_many(views, k, m)
    return [_stripe(p, f, k, m, v, par)
            for (p, f), v, par in zip(packed, views, parities, strict=True)]


def stripe(payload: Buffer, flags: int, k: int, m: int) -> EncodedRecord:
    """Cut a stored payload into k data + m parity fragments, each with its header."""
    if k == 1:
        return _stripe(payload, flags, k, m, memoryview(payload), ())
    view = _stripe_view(payload, k)
    return _stripe(payload, flags, k, m, view, parity.parity_of(view, k, m))


def _stripe_view(payload: Buffer, k: int) -> memoryview:
    """The payload as k chunks of one length back to back: itself, or a zero-padded copy
    (a payload shorter than (k - 1) chunks leaves more than one short, even empty,
    chunk)."""
    view = memoryview(payload)
    whole = k * chunk_length(len(view), k)
    return view if len(view) == whole else memoryview(_padded(view, whole))


def _stripe(payload: Buffer, flags: int, k: int, m: int, view: memoryview,
            par: Sequence[Buffer]) -> EncodedRecord:
    """``stripe`` given the payload's chunks back to back (``view``) and their parity."""
    plen = len(payload)
    rhash = _xxh3(payload)
    clen = chunk_length(plen, k)
    units = -(-(HEADER_SIZE + clen) // SECTOR)
    if k == 1:
        chunks: list[Buffer] = [payload] * (1 + m)
    else:
        chunks = [view[i * clen:(i + 1) * clen] for i in range(k)]
        chunks += par
    # _pieces for each fragment, inline: only the index and the record hash differ
    # between the headers of records of one shape, so the rest is made once per shape.
    rh = _U64.pack(rhash)
    pad = units * SECTOR - HEADER_SIZE - clen
    pad_view = _pad_view(pad)
    stream = _xxh3_stream
    pack = _U64.pack
    pieces: list[list[Buffer]] = []
    for prefix, chunk in zip(_prefixes(k, m, flags, plen), chunks, strict=True):
        tail = prefix + rh
        h = stream(tail)
        h.update(chunk)
        head = pack(h.intdigest()) + tail
        pieces.append([head, chunk, pad_view] if pad else [head, chunk])
    return EncodedRecord(plen, flags, rhash, units, pieces)


_PREFIXES: dict[tuple[int, int, int, int], tuple[bytes, ...]] = {}


def _prefixes(k: int, m: int, flags: int, plen: int) -> tuple[bytes, ...]:
    """The header prefixes (after the checksum, up to the record hash) of the k + m
    fragments of a record of this shape."""
    key = (k, m, flags, plen)
    got = _PREFIXES.get(key)
    if got is None:
        got = tuple(_PREFIX.pack(MAGIC, i, k, m, flags, plen, 0) for i in range(k + m))
        if len(_PREFIXES) < 4096:          # compressed payloads come in many lengths
            _PREFIXES[key] = got
    return got


def _pad_view(n: int) -> memoryview:
    """``n`` zero bytes (shared, read-only) to pad a fragment to its sectors."""
    view = _PADS.get(n)
    if view is None:
        view = _PADS[n] = memoryview(_PAD)[:n]
    return view


def _padded(view: memoryview, size: int) -> bytearray:
    """A copy of ``view`` zero-padded to ``size`` bytes."""
    out = bytearray(size)
    out[:len(view)] = view
    return out


def _data_chunks(view: memoryview, k: int, clen: int) -> list[Buffer]:
    """The k data chunks of a payload, each ``clen`` long: views of it when it fills them
    exactly (a whole block stored raw: no copy), else zero-padded copies."""
    if len(view) == k * clen:
        return [view[i * clen:(i + 1) * clen] for i in range(k)]
    return [bytes(view[i * clen:(i + 1) * clen]).ljust(clen, b"\0") for i in range(k)]


def _pieces(chunk: Buffer, index: int, k: int, m: int, flags: int, plen: int,
            rhash: int, size: int) -> list[Buffer]:
    """Fragment ``index`` as stored, in pieces: its header (with its own checksum), the
    chunk itself and the zeros that pad it to ``size``."""
    tail = HEADER.pack(0, MAGIC, index, k, m, flags, plen, 0, rhash)[8:]
    h = xxhash.xxh3_64(tail)
    h.update(chunk)
    pad = size - HEADER_SIZE - len(chunk)
    out: list[Buffer] = [struct.pack("<Q", h.intdigest()) + tail, chunk]
    if pad:
        out.append(memoryview(_PAD)[:pad])
    return out


def _frame(chunk: Buffer, index: int, k: int, m: int, flags: int, plen: int,
           rhash: int, size: int) -> bytearray:
    """Fragment ``index`` as stored, as one buffer."""
    return bytearray(b"".join(_pieces(chunk, index, k, m, flags, plen, rhash, size)))


def one_fragment(payload: bytes | memoryview, flags: int, k: int, m: int, index: int,
                 rhash: int) -> bytearray:
    """Only fragment ``index`` of the record whose stored payload (of hash ``rhash``,
    already verified) is ``payload``: what a rebuild writes, without encoding the rest."""
    plen = len(payload)
    clen = chunk_length(plen, k)
    size = -(-(HEADER_SIZE + clen) // SECTOR) * SECTOR
    view = memoryview(payload)
    if k == 1:
        chunk: Buffer = view
    elif index < k:
        chunk = bytes(view[index * clen:(index + 1) * clen]).ljust(clen, b"\0")
    else:
        chunk = parity.parity(_data_chunks(view, k, clen), k, m)[index - k]
    return _frame(chunk, index, k, m, flags, plen, rhash, size)


def check_fragment(frag: bytes | memoryview, index: int, k: int, m: int, plen: int,
                   rhash: int) -> memoryview | None:
    """The chunk carried by ``frag`` if it verifies as fragment ``index`` of this record."""
    view = memoryview(frag)
    if len(view) < HEADER_SIZE:
        return None
    fhash, magic, idx, fk, fm, _flags, fplen, _res, frhash = HEADER.unpack_from(view, 0)
    clen = chunk_length(plen, k)
    end = HEADER_SIZE + clen
    if (magic != MAGIC or idx != index or fk != k or fm != m or fplen != plen
            or frhash != rhash or len(view) < end):
        return None
    if _xxh3(view[8:end]) != fhash:
        return None
    return view[HEADER_SIZE:end]


def check_column(between: memoryview, gap: int, chunks: Sequence[memoryview], index: int,
                 k: int, m: int, plen: int, rhashes: Sequence[int],
                 tails: Sequence[memoryview] | None = None) -> bool:
    """``check_fragment`` of fragment ``index`` of several records stored raw (payloads
    of ``plen`` bytes, record hashes ``rhashes``) that were read in pieces: the chunks (all
    of one length) in ``chunks``, their headers ``gap`` bytes apart in ``between``.
    ``tails``: each header after its checksum (``between[8 + i * gap:32 + i * gap]``),
    if the caller keeps them made."""
    n = len(chunks)
    if (n != len(rhashes) or len(between) != gap * n or gap < HEADER_SIZE
            or (n and len(chunks[0]) != chunk_length(plen, k))):
        return False
    # All n headers in one unpack: (checksum, the fixed part, record hash) per fragment,
    # so the fixed parts and the record hashes are compared as two tuples, and only the
    # checksums are computed one by one.
    layout = _HEADS.get((gap, n))
    if layout is None:
        layout = struct.Struct("<" + f"Q16sQ{gap - HEADER_SIZE}x" * n)
        if len(_HEADS) < 256:
            _HEADS[(gap, n)] = layout
    fields = layout.unpack(between)
    if (fields[1::3] != (_PREFIX.pack(MAGIC, index, k, m, 0, plen, 0),) * n
            or fields[2::3] != tuple(rhashes)):
        return False
    if tails is None:
        tails = [between[at:at + HEADER_SIZE - 8] for at in range(8, n * gap, gap)]
    # One hash state of this thread's, reset for each fragment (no state made per chunk).
    h = _hasher()
    reset, update, digest = h.reset, h.update, h.intdigest
    for tail, chunk, fhash in zip(tails, chunks, fields[0::3], strict=True):
        reset()
        update(tail)
        update(chunk)
        if digest() != fhash:
            return False
    return True


_ONE_HEAD = struct.Struct("<Q16sQ")    # checksum, the fixed part, the record hash


def check_one(head: memoryview, chunk: memoryview, index: int, k: int, m: int,
              plen: int, rhash: int) -> bool:
    """``check_column`` of a single fragment (a one-record run: a small read's block),
    its header in ``head`` (HEADER_SIZE bytes) and its chunk read elsewhere, with none of
    the per-column set-up that pays off over many records: the same checks, the fixed
    part compared with the cached prefix of its shape."""
    if len(head) != HEADER_SIZE or len(chunk) != chunk_length(plen, k) or index >= k + m:
        return False
    fhash, fixed, frh = _ONE_HEAD.unpack(head)
    if frh != rhash or fixed != _prefixes(k, m, 0, plen)[index]:
        return False
    h = _hasher()
    h.reset()
    h.update(head[8:])
    h.update(chunk)
    return bool(h.intdigest() == fhash)


_local = threading.local()


def _hasher() -> xxhash.xxh3_64:
    """An xxh3-64 state of this thread's own (callers reset it before use)."""
    h: xxhash.xxh3_64 | None = getattr(_local, "h", None)
    if h is None:
        h = _local.h = _xxh3_stream()
    return h


def reassemble(chunks: dict[int, memoryview], k: int, m: int,
               plen: int) -> bytes | memoryview:
    """The stored payload from any k verified chunks (index -> chunk)."""
    if k == 1:
        return next(iter(chunks.values()))[:plen]
    if all(i in chunks for i in range(k)):
        return b"".join(chunks[i] for i in range(k))[:plen]
    nums = tuple(sorted(chunks))[:k]
    dec = _decoders.get((k, m))
    if dec is None:
        dec = _decoders[(k, m)] = zfec.Decoder(k, k + m)
    parts = dec.decode(tuple(bytes(chunks[i]) for i in nums), nums)
    return b"".join(parts)[:plen]


def payload_ok(payload: bytes | memoryview, rhash: int) -> bool:
    return _xxh3(payload) == rhash


def _lz4_decompress_safe() -> Callable[..., int] | None:
    """liblz4's ``LZ4_decompress_safe(src, dst, srcSize, dstCapacity)`` (None without
    the library). python-lz4's block API only returns new bytes objects; this one writes
    where it is told, and never reads or writes past the sizes it is given."""
    name = ctypes.util.find_library("lz4") or "liblz4.so.1"
    try:
        fn = ctypes.CDLL(name).LZ4_decompress_safe
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_decompress_safe = _lz4_decompress_safe()


def expand_into(payload: bytes | memoryview, flags: int, dest: memoryview) -> bool:
    """Write the logical block of this stored payload into ``dest`` (writable, the
    block's size): lz4 decompressed straight into it (no block of its own, no copy),
    a raw payload copied. False if it is not exactly ``len(dest)`` bytes (``dest`` then
    holds anything)."""
    n = len(dest)
    if not flags & FLAG_LZ4:
        if len(payload) != n:
            return False
        dest[:] = payload
        return True
    fn = _decompress_safe
    if fn is None or dest.readonly or not dest.c_contiguous:
        try:
            out = lz4.block.decompress(payload, uncompressed_size=n)
        except lz4.block.LZ4BlockError:
            return False
        if len(out) != n:
            return False
        dest[:] = out
        return True
    src: bytes | ctypes.Array[ctypes.c_char]
    if isinstance(payload, memoryview) and not payload.readonly and payload.c_contiguous:
        src = (ctypes.c_char * len(payload)).from_buffer(payload)
    else:
        src = bytes(payload)
    out_buf = (ctypes.c_char * n).from_buffer(dest)
    got = fn(src if isinstance(src, bytes) else ctypes.addressof(src),
             ctypes.addressof(out_buf), len(payload), n)
    return bool(got == n)


def pin(buf: bytearray | memoryview) -> ctypes.c_char:
    """A ctypes view of the first byte of writable ``buf``: while it lives, ``buf`` can
    neither move nor be resized (it holds an export), so ``address(pin)`` stays valid."""
    return ctypes.c_char.from_buffer(buf)


def address(pinned: ctypes.c_char) -> int:
    return ctypes.addressof(pinned)


def lz4_into(src: memoryview, src_addr: int, dest: memoryview) -> bool:
    """Decompress the lz4 block ``src`` (verified; lying at address ``src_addr``, of
    memory that cannot move meanwhile, as ``pin`` makes) straight into ``dest`` (writable):
    whether it came out exactly ``len(dest)`` bytes (else ``dest`` holds anything).
    liblz4 never reads or writes past the sizes it is given."""
    n = len(dest)
    fn = _decompress_safe
    if fn is None or dest.readonly or not dest.c_contiguous or not n:
        return expand_into(src, FLAG_LZ4, dest)
    return bool(fn(src_addr, ctypes.addressof(ctypes.c_char.from_buffer(dest)), len(src),
                   n) == n)


def expand(payload: bytes | memoryview, flags: int, block_size: int) -> bytes | memoryview:
    """The logical block from its stored payload (``block_size`` -1: keep it stored)."""
    if block_size < 0:
        return bytes(payload)
    if flags & FLAG_LZ4:
        out: bytes = lz4.block.decompress(payload, uncompressed_size=block_size)
        return out
    return payload
