"""The write pipeline of ``pool.writer.RecordWriter.write_blocks`` (writer invariant 5):
worker threads encode batch N+1 while batch N is placed, written and mapped; on real file
devices (an ec:4+2 pool of six sparse files), faults injected by a device wrapper.

"Writer invariant N" is pool/writer.py's numbered list; DESIGN's are cited as "DESIGN N"."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio

from pool import Pool, codec, writer
from pool.checker import check
from pool.device import Device
from pool.errors import MediumError
from pool.faults import FaultyDevice
from pool.profile import Profile
from tests.conftest import DiskSet
from tests.kit.poolkit import fail_stores_after
from volumes import VolumeManager

BS = 64 << 10
EXT = 1 << 20
STEP = 4                     # blocks per pipeline batch in these tests
N = 10 * STEP - 1            # ten batches, the last one short


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of STEP blocks, so a few hundred KiB go through many pipeline stages."""
    monkeypatch.setattr(writer, "PIPELINE_BYTES", STEP * BS)
    monkeypatch.setattr(writer, "PIPELINE_MIN", 1)


def blocks_of(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(BS) for _ in range(n)]


def spy(pool: Pool) -> list[tuple[str, int, float]]:
    """Record (stage, first byte of the batch's first block, time) as each encode and
    store of ``pool.writer`` starts and ends (the instance's own methods, wrapped)."""
    events: list[tuple[str, int, float]] = []
    w = pool.writer
    encode, store = w.encode, w.store

    async def encode_spy(datas: list[codec.Buffer], prof: Profile,
                         compress: list[bool]) -> list[codec.EncodedRecord]:
        tag = bytes(datas[0][:1])[0]
        events.append(("encode+", tag, trio.current_time()))
        out = await encode(datas, prof, compress)
        events.append(("encode-", tag, trio.current_time()))
        return out

    async def store_spy(prof: Profile, encoded: Sequence[codec.EncodedRecord]) -> list[bytes]:
        events.append(("store+", len(encoded), trio.current_time()))
        out = await store(prof, encoded)
        events.append(("store-", len(encoded), trio.current_time()))
        return out
    w.encode = encode_spy            # type: ignore[method-assign]
    w.store = store_spy              # type: ignore[method-assign]
    return events


async def _pool(ds: DiskSet, devices: list[Device] | None = None) -> Pool:
    return await Pool.create("p", devices if devices is not None else ds.create(),
                             profile="ec:4+2", extent_size=EXT)


async def test_pipeline_overlaps_and_reads_back_exactly(disks: Callable[..., DiskSet]) -> None:
    """Writer invariant 5: encoding the next batch starts before the store of the one
    before it returns, never more than PIPELINE_AHEAD + 1 batches are encoded ahead of
    the store, and the batches are stored in order; invariant 2 and DESIGN 1: every block
    (holes among them) reads back byte-exact, also after the pool is closed and opened."""
    ds = disks(6)
    pool = await _pool(ds)
    try:
        vol = await VolumeManager(pool).create("v", N * BS, block_size=BS)
        data = blocks_of(1, N)
        for i in range(N):                 # first byte = block number: tags the batches
            data[i] = bytes([i]) + data[i][1:]
        for i in (5, 17, N - 1):           # all-zero blocks become holes (DESIGN 6)
            data[i] = bytes(BS)
        events = spy(pool)
        await vol.write(0, b"".join(data))
        await vol.flush()
        encodes = [t for kind, t, _ in events if kind == "encode+"]
        stores = [n for kind, n, _ in events if kind == "store+"]
        datas = [i for i in range(N) if any(data[i])]
        assert encodes == [datas[j] for j in range(0, len(datas), STEP)]   # in order
        assert sum(stores) == len(datas) and len(stores) == len(encodes) > 2
        # Batch 2's encoding starts before batch 1's store returns: they overlap.
        first_store_end = next(t for kind, _n, t in events if kind == "store-")
        second_encode = [t for kind, _n, t in events if kind == "encode+"][1]
        assert second_encode < first_store_end
        ahead = 0
        for kind, _n, _t in events:
            ahead += {"encode+": 1, "store-": -1}.get(kind, 0)
            assert ahead <= writer.PIPELINE_AHEAD + 2    # one in the channel, one encoding,
        assert await vol.read(0, N * BS) == b"".join(data)   # one being stored
        assert vol.statistics().mapped_bytes == len(datas) * BS
    finally:
        await pool.close()
    pool = await Pool.open(ds.open())
    try:
        assert await VolumeManager(pool).get("v").read(0, N * BS) == b"".join(data)
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()


async def test_store_failure_stops_the_pipeline(disks: Callable[..., DiskSet]) -> None:
    """Writer invariants 4 and 5: when the column writes of the third batch fail on more
    devices than ec:4+2 can lose, the write fails with MediumError (itself, not a group),
    the two batches stored before it stay mapped, no later batch is written or mapped
    (those blocks still read as their old content: DESIGN 9, a failed write changes
    nothing of them), and no segment stays pinned."""
    ds = disks(6)
    faulty = [FaultyDevice(d, seed=i) for i, d in enumerate(ds.create())]
    pool = await _pool(ds, list(faulty))
    try:
        pool.member_health.threshold = 10 ** 6     # count the failures, fault nobody
        vol = await VolumeManager(pool).create("v", N * BS, block_size=BS)
        old = blocks_of(2, N)
        await vol.write(0, b"".join(old))
        await vol.flush()
        new = blocks_of(3, N)
        undo = fail_stores_after(pool, faulty, 2)
        map_id = vol._buf.map_id
        with pytest.raises(MediumError):
            await pool.write_blocks(map_id, Profile(4, 2), False, list(enumerate(new)))
        assert undo() == 3                         # the fourth batch was never stored
        assert not pool.pins._counts
        got = await vol.read(0, N * BS)
        want = b"".join(new[:2 * STEP] + old[2 * STEP:])
        assert got == want
        await vol.flush()
    finally:
        await pool.close()
    pool = await Pool.open(ds.open())
    try:
        assert await VolumeManager(pool).get("v").read(0, N * BS) == want
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()


async def test_encoder_failure_is_raised_as_itself(disks: Callable[..., DiskSet],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Writer invariant 5: an error in the encoding stage stops the pipeline and comes out
    as itself; the batches before it stay mapped, none after it is stored."""
    ds = disks(6)
    pool = await _pool(ds)
    try:
        vol = await VolumeManager(pool).create("v", N * BS, block_size=BS)
        old = blocks_of(4, N)
        await vol.write(0, b"".join(old))
        await vol.flush()
        calls = 0
        encode = pool.writer.encode

        async def encode_then_fail(*args: Any) -> list[codec.EncodedRecord]:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise MemoryError("injected: no memory for the third batch")
            return await encode(*args)
        monkeypatch.setattr(pool.writer, "encode", encode_then_fail)
        new = blocks_of(5, N)
        with pytest.raises(MemoryError):
            await pool.write_blocks(vol._buf.map_id, Profile(4, 2), False,
                                    list(enumerate(new)))
        assert not pool.pins._counts
        assert await vol.read(0, N * BS) == b"".join(new[:2 * STEP] + old[2 * STEP:])
    finally:
        await pool.close()



@pytest.mark.parametrize(("k", "m"), [(4, 2), (2, 1), (1, 1), (1, 0), (3, 0), (6, 3)])
def test_batch_encoding_is_byte_exact(k: int, m: int) -> None:
    """``codec.encode_all`` (the batch's parity in one ISA-L buffer, headers from cached
    prefixes) gives exactly the fragments ``codec.encode`` gives one record at a time:
    full blocks, lz4-compressed and short payloads (zero-padded chunks, empty ones),
    and each fragment verifies as itself (DESIGN 4; parity invariant 1)."""
    rng = random.Random(k * 10 + m)
    text = b"".join(b"line %d of a log that compresses\n" % i for i in range(4000))
    datas: list[codec.Buffer] = [rng.randbytes(BS), memoryview(rng.randbytes(BS)),
                                 text[:BS], bytearray(rng.randbytes(BS)), b"x",
                                 rng.randbytes(100), rng.randbytes(4096 + 7), b""]
    tries = [False, False, True, True, False, True, False, False]
    batch = codec.encode_all(datas, k, m, tries)
    assert batch[2].flags == codec.FLAG_LZ4                 # the text was compressed
    for d, c, got in zip(datas, tries, batch, strict=True):
        want = codec.encode(d, k, m, c)
        assert (got.plen, got.flags, got.rhash, got.units) == (
            want.plen, want.flags, want.rhash, want.units)
        assert got.fragments == want.fragments
        for i, frag in enumerate(got.fragments):
            chunk = codec.check_fragment(frag, i, k, m, got.plen, got.rhash)
            assert chunk is not None
            assert len(frag) == got.units * 512
