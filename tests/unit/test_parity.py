"""pool.parity: ISA-L's parity is zfec's, byte for byte (pool/parity.py invariants 1-3;
DESIGN 2: a record is k data + m parity fragments that any k of rebuild)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import zfec
from hypothesis import given, settings
from hypothesis import strategies as st

from pool import codec, parity

PROFILES = [(2, 1), (3, 2), (4, 2), (5, 3), (8, 2), (10, 4)]


def _zfec(chunks: list[bytes], k: int, m: int) -> list[bytes]:
    out: list[bytes] = zfec.Encoder(k, k + m).encode(tuple(chunks), tuple(range(k, k + m)))
    return out


@pytest.fixture
def isal() -> Iterator[None]:
    if parity.library() != "isa-l":
        pytest.skip("libisal.so.2 is not installed (Makefile DEBS: libisal2)")
    yield


@pytest.mark.parametrize(("k", "m"), PROFILES)
def test_parity_is_zfecs_for_every_buffer_kind(isal: None, k: int, m: int) -> None:
    """Invariant 1, through ISA-L: bytes, bytearrays, read-only and writable views (the
    chunks of a payload are views of it) all give zfec's bytes; lengths odd and even."""
    rng = random.Random(k * 100 + m)
    for clen in (1, 7, 512, 4096 + 3, 16384):
        raw = [rng.randbytes(clen) for _ in range(k)]
        want = _zfec(raw, k, m)
        whole = bytearray(b"".join(raw))
        kinds: list[list[parity.Buffer]] = [
            list(raw), [bytearray(c) for c in raw],
            [memoryview(b"".join(raw))[i * clen:(i + 1) * clen] for i in range(k)],
            [memoryview(whole)[i * clen:(i + 1) * clen] for i in range(k)]]
        for chunks in kinds:
            got = parity.parity(chunks, k, m)
            assert [bytes(p) for p in got] == want, (clen, type(chunks[0]))
        assert whole == b"".join(raw)            # the input is never written


def test_tables_that_disagree_with_zfec_are_never_used(isal: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 2: a library whose parity differs from zfec's (here ISA-L with its encode
    replaced by one that writes nothing) fails the self-check, and zfec computes the
    parity: the stored code never changes with the library."""

    class Broken:
        def __init__(self, real: Any) -> None:
            self.ec_init_tables = real.ec_init_tables

        def ec_encode_data(self, *args: object) -> None:
            return None

    monkeypatch.setattr(parity, "_isal", Broken(parity._isal))
    monkeypatch.setattr(parity, "_tables", {})
    assert parity._tables_for(4, 2) is None
    chunks = [random.Random(i).randbytes(4096) for i in range(4)]
    assert [bytes(p) for p in parity.parity(chunks, 4, 2)] == _zfec(chunks, 4, 2)


@pytest.mark.parametrize(("k", "m"), [(4, 2), (3, 2), (8, 2)])
def test_stripes_are_the_same_with_either_library(k: int, m: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole records (headers, checksums, padding; raw and short payloads) are the same
    bytes whichever library computed the parity, so pools written with one read and
    rebuild with the other; and any k fragments give the payload back."""
    rng = random.Random(k + m)
    payloads = [rng.randbytes(n) for n in (65536, 65536 - 13, 4096, 1, 40000)]
    first = [codec.stripe(p, 0, k, m).fragments for p in payloads]
    monkeypatch.setattr(parity, "_tables", {})
    monkeypatch.setattr(parity, "_isal", None)
    assert parity.library() == "zfec"
    assert [codec.stripe(p, 0, k, m).fragments for p in payloads] == first
    for payload, frags in zip(payloads, first, strict=True):
        plen = len(payload)
        chunks = {}
        for i in range(m, k + m):           # the last k: parity has to take part
            chunk = codec.check_fragment(frags[i], i, k, m, plen, codec.stripe(
                payload, 0, k, m).rhash)
            assert chunk is not None
            chunks[i] = chunk
        assert bytes(codec.reassemble(chunks, k, m, plen)) == payload


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 12), m=st.integers(1, 4), clen=st.integers(0, 3000),
       seed=st.integers(0, 2**32 - 1))
def test_parity_is_zfecs_for_any_profile_and_length(k: int, m: int, clen: int,
                                                    seed: int) -> None:
    """Invariant 1 for arbitrary (k, m) and chunk lengths (empty chunks too), through
    whichever library this machine has, and through ``parity_of`` on one payload."""
    rng = random.Random(seed)
    raw = [rng.randbytes(clen) for _ in range(k)]
    want = _zfec(raw, k, m)
    assert [bytes(p) for p in parity.parity(raw, k, m)] == want
    assert [bytes(p) for p in parity.parity_of(b"".join(raw), k, m)] == want
