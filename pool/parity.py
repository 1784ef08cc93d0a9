"""The parity chunks of a stripe: Intel's ISA-L erasure code (``libisal.so.2``, through
ctypes) where it is installed, else zfec; the same bytes either way (docs/FORMAT.md,
"Fragments").

zfec's systematic Reed-Solomon code makes each parity chunk a fixed linear combination, over
GF(2^8) with the polynomial 0x11d, of the k data chunks. ISA-L computes exactly such
combinations with the coefficients it is given, in SIMD (about 15x zfec's byte-at-a-time
table loop on the development VM). So the coefficients are read off zfec itself (the parity
of the unit vectors) and handed to ISA-L: the code on disk stays zfec's.

Invariants this module owns:

1. ``parity(chunks, k, m)`` returns exactly what ``zfec.Encoder(k, k + m).encode(chunks,
   (k, ..., k + m - 1))`` returns, byte for byte, whichever library computes it.
2. ISA-L is used for a (k, m) only after it reproduced zfec's parity of a random stripe of
   that (k, m) (checked once per process and (k, m)); a library that is missing, fails to
   load or disagrees leaves zfec in charge.
3. The input buffers are held (``PyObject_GetBuffer``) for the whole ISA-L call, which runs
   without the GIL (a ctypes ``CDLL`` call) and writes only into the new parity buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Sequence

import zfec

Buffer = bytes | bytearray | memoryview

_zfec: dict[tuple[int, int], zfec.Encoder] = {}
# (k, m) -> ISA-L's expanded tables for zfec's coefficients, or None: use zfec
_tables: dict[tuple[int, int], ctypes.Array[ctypes.c_ubyte] | None] = {}
_lock = threading.Lock()


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PyBUF_SIMPLE = 0


def _load_isal() -> ctypes.CDLL | None:
    if os.environ.get("STORAGED_NO_ISAL"):
        return None
    for name in (ctypes.util.find_library("isal"), "libisal.so.2"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            init, encode = lib.ec_init_tables, lib.ec_encode_data
        except (OSError, AttributeError):
            continue
        init.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        init.restype = None
        encode.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p]
        encode.restype = None
        return lib
    return None


_isal = _load_isal()


def library() -> str:
    """Which library computes parity: "isa-l" or "zfec"."""
    return "isa-l" if _isal is not None else "zfec"


def zfec_parity(chunks: Sequence[Buffer], k: int, m: int) -> list[bytes]:
    enc = _zfec.get((k, m))
    if enc is None:
        enc = _zfec[(k, m)] = zfec.Encoder(k, k + m)
    out: list[bytes] = enc.encode(tuple(chunks), tuple(range(k, k + m)))
    return out


def _tables_for(k: int, m: int) -> ctypes.Array[ctypes.c_ubyte] | None:
    try:
        return _tables[(k, m)]
    except KeyError:
        pass
    with _lock:
        if (k, m) not in _tables:
            _tables[(k, m)] = _make_tables(k, m)
        return _tables[(k, m)]


def _make_tables(k: int, m: int) -> ctypes.Array[ctypes.c_ubyte] | None:
    if _isal is None or not 1 < k <= 255 or not 0 < m <= 255 - k:
        return None
    coef = (ctypes.c_ubyte * (m * k))()
    for j in range(k):          # parity of the j-th unit vector: column j of the code
        unit = [b"\1" if i == j else b"\0" for i in range(k)]
        for r, p in enumerate(zfec_parity(unit, k, m)):
            coef[r * k + j] = p[0]
    tables = (ctypes.c_ubyte * (32 * k * m))()
    _isal.ec_init_tables(k, m, coef, tables)
    # Invariant 2: the tables must give zfec's parity before they are trusted.
    sample = [os.urandom(1000 + 37 * k) for _ in range(k)]
    got = _encode(tables, sample, k, m)
    if got is None or [bytes(p) for p in got] != zfec_parity(sample, k, m):
        return None
    return tables


def _encode(tables: ctypes.Array[ctypes.c_ubyte], chunks: Sequence[Buffer], k: int,
            m: int) -> list[memoryview] | None:
    """ISA-L's parity of ``chunks`` (k buffers of one length), or None if one of them
    cannot be held as contiguous bytes."""
    clen = len(chunks[0])
    views = [_PyBuffer() for _ in range(k)]
    held = 0
    try:
        src = (ctypes.c_void_p * k)()
        for i, chunk in enumerate(chunks):
            if len(chunk) != clen or _get_buffer(chunk, views[i], _PyBUF_SIMPLE) != 0:
                return None
            held += 1
            src[i] = views[i].buf
        return _run(tables, src, k, m, clen)
    finally:
        for i in range(held):
            _release_buffer(views[i])


def _run(tables: ctypes.Array[ctypes.c_ubyte], src: ctypes.Array[ctypes.c_void_p], k: int,
         m: int, clen: int) -> list[memoryview]:
    """ISA-L's encode of the k chunks ``src`` points at into a new buffer: its m parity
    chunks (invariant 3: the caller holds the sources)."""
    out = bytearray(m * clen)
    whole = memoryview(out)
    if clen:
        assert _isal is not None
        base = ctypes.addressof(ctypes.c_char.from_buffer(out))
        dst = (ctypes.c_void_p * m)(*range(base, base + m * clen, clen))
        _isal.ec_encode_data(clen, k, m, tables, src, dst)
    return [whole[r * clen:(r + 1) * clen] for r in range(m)]


def parity_of(payload: Buffer, k: int, m: int) -> Sequence[Buffer]:
    """``parity`` of a payload of exactly k chunks, back to back (one contiguous buffer:
    a whole block stored raw, or a zero-padded copy): held once for all of its chunks."""
    clen = len(payload) // k
    tables = _tables_for(k, m) if m else None
    if tables is not None and clen and clen * k == len(payload):
        view = _PyBuffer()
        try:
            _get_buffer(payload, view, _PyBUF_SIMPLE)
        except (BufferError, TypeError):
            pass
        else:
            try:
                base = view.buf or 0
                src = (ctypes.c_void_p * k)(*range(base, base + k * clen, clen))
                return _run(tables, src, k, m, clen)
            finally:
                _release_buffer(view)
    mv = memoryview(payload)
    return parity([mv[i * clen:(i + 1) * clen] for i in range(k)], k, m)


def parity_many(payloads: Sequence[Buffer], k: int, m: int) -> list[Sequence[Buffer]]:
    """``parity_of`` of each payload: with ISA-L, one new buffer holds the parity of all
    of them and the pointer arrays are made once, so each payload costs one ISA-L call
    (the write path encodes a batch of records at a time: pool.codec.encode_all)."""
    tables = _tables_for(k, m) if m else None
    if tables is None or _isal is None or len(payloads) < 2:
        return [parity_of(p, k, m) for p in payloads]
    out = bytearray(sum(len(p) // k for p in payloads) * m)
    whole = memoryview(out)
    base = ctypes.addressof(ctypes.c_char.from_buffer(out)) if out else 0
    src = (ctypes.c_void_p * k)()
    dst = (ctypes.c_void_p * m)()
    encode = _isal.ec_encode_data
    view = _PyBuffer()
    results: list[Sequence[Buffer]] = []
    at = 0
    for payload in payloads:
        clen = len(payload) // k
        if not clen or clen * k != len(payload):
            results.append(parity_of(payload, k, m))
            continue
        try:
            _get_buffer(payload, view, _PyBUF_SIMPLE)
        except (BufferError, TypeError):
            results.append(parity_of(payload, k, m))
            continue
        try:                                # invariant 3: held for the call
            first = view.buf or 0
            for i in range(k):
                src[i] = first + i * clen
            for r in range(m):
                dst[r] = base + at + r * clen
            encode(clen, k, m, tables, src, dst)
        finally:
            _release_buffer(view)
        results.append([whole[at + r * clen:at + (r + 1) * clen] for r in range(m)])
        at += m * clen
    return results


def parity(chunks: Sequence[Buffer], k: int, m: int) -> Sequence[Buffer]:
    """The m parity chunks of ``chunks`` (k buffers of one length), as zfec makes them
    (invariant 1)."""
    if m == 0:
        return []
    tables = _tables_for(k, m)
    if tables is not None:
        try:
            got = _encode(tables, chunks, k, m)
        except (BufferError, TypeError):
            got = None
        if got is not None:
            return got
    return zfec_parity(chunks, k, m)
