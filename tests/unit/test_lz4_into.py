"""``codec.lz4_into``: an lz4 block decompressed straight into a caller's buffer (the
page-cached read of compressed records, issue 27) writes exactly that buffer and nothing
around it, and says when the block does not come out exactly its size -- including for
input that is not lz4 at all (liblz4's safe decoder: bounded by the sizes it is given)."""

from __future__ import annotations

import os
import random

import lz4.block
import pytest

from benchmarks.engine import _lz4_decompress, compressible
from pool import codec

BS = 64 * 1024
PAD = 4096


def _packed(data: bytes) -> tuple[memoryview, int, object]:
    src = bytearray(lz4.block.compress(data, store_size=False))
    pin = codec.pin(src)
    return memoryview(src), codec.address(pin), pin


def _room(size: int) -> tuple[bytearray, memoryview]:
    """A buffer with ``size`` bytes in the middle of sentinel bytes; that middle."""
    buf = bytearray(b"\x5a" * (PAD + size + PAD))
    return buf, memoryview(buf)[PAD:PAD + size]


def _sentinels_intact(buf: bytearray, size: int) -> bool:
    return buf[:PAD] == b"\x5a" * PAD and buf[PAD + size:] == b"\x5a" * PAD


def test_a_block_comes_out_exact_and_nothing_around_it_is_written() -> None:
    data = compressible(BS)
    src, at, _pin = _packed(data)
    buf, dest = _room(BS)
    assert codec.lz4_into(src, at, dest)
    assert bytes(dest) == data and _sentinels_intact(buf, BS)


@pytest.mark.parametrize("size", [BS - 1, BS // 2, BS + 1, 2 * BS])
def test_a_buffer_of_another_size_is_refused_and_nothing_past_it_written(size: int) -> None:
    src, at, _pin = _packed(compressible(BS))
    buf, dest = _room(size)
    assert not codec.lz4_into(src, at, dest)
    assert _sentinels_intact(buf, size)


@pytest.mark.parametrize("seed", range(8))
def test_input_that_is_not_lz4_is_refused_without_writing_past_the_buffer(seed: int) -> None:
    rng = random.Random(seed)
    good = bytearray(lz4.block.compress(compressible(BS, seed), store_size=False))
    for _ in range(4):                              # damaged lz4, or random bytes
        good[rng.randrange(len(good))] ^= 1 << rng.randrange(8)
    for raw in (good, bytearray(os.urandom(rng.randrange(1, 5000)))):
        pin = codec.pin(raw)
        buf, dest = _room(BS)
        codec.lz4_into(memoryview(raw), codec.address(pin), dest)   # True only if exact
        assert _sentinels_intact(buf, BS)
        del pin


def test_the_engine_benchmark_ceiling_decompresses_into_its_buffer() -> None:
    """benchmarks/engine.py's lz4 ceiling uses the same call and checks its output."""
    assert _lz4_decompress(8 * BS, compressible(BS)) > 0
