"""Send/receive streams on the engine: full and incremental round trips between pools of
different profiles, refusal of wrong bases, truncated and corrupted streams (the pool is
left exactly as it was), and resume of an interrupted receive."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import xxhash

from pool import Pool
from pool.errors import StorageError
from pool.faults import FaultyDevice
from tests.conftest import DiskSet
from volumes import VolumeManager, portable, stream

MiB = 1 << 20
BS = 64 << 10
VOL = 8 * MiB
Disks = Callable[..., DiskSet]


async def _stream(vm: VolumeManager, vol: str, snap: str, base: str | None = None,
                  resume: int = 0) -> bytes:
    _h, chunks = await portable.send(vm, vol, snap, base, resume)
    async with chunks as it:
        return b"".join([b"".join(pieces) async for pieces in it])


async def _receive(vm: VolumeManager, target: str, data: bytes, *, piece: int = 300_000,
                   **kw: Any) -> portable.Receiver:
    rx = portable.Receiver(vm, target, **kw)

    async def source() -> AsyncIterator[bytes]:
        for i in range(0, len(data), piece):
            yield data[i:i + piece]
    await rx.run(source())
    if rx.done is None:
        raise AssertionError("stream applied but not finished")
    return rx


def _state(pool: Pool) -> tuple[Any, ...]:
    """What a refused receive must not change."""
    return (repr(sorted(pool.objects().items())), sorted(pool.state.maps))


async def _pools(disks: Disks) -> tuple[Pool, Pool]:
    a = await Pool.create("src", disks(1, prefix="a").create(), extent_size=MiB)
    b = await Pool.create("dst", disks(3, prefix="b").create(), profile="ec:2+1",
                          extent_size=MiB)
    return a, b


async def _random_snapshot(va: VolumeManager, seed: int) -> None:
    """Volume 'disk' of VOL random bytes (from ``seed``) with snapshot 's1'."""
    vol = await va.create("disk", VOL, compression=False)
    await vol.write(0, random.Random(seed).randbytes(VOL))
    await vol.flush()
    await va.snapshot("disk", "s1")


async def _mapped(vm: VolumeManager, name: str) -> list[int]:
    vol = vm.get(name)
    return vm.pool.mapped_blocks(vol.map_id, 0, -(-vol.size // vol.block_size))


async def test_full_round_trip_into_another_profile_keeps_bytes_and_holes(
        disks: Disks) -> None:
    a, b = await _pools(disks)
    try:
        va, vb = VolumeManager(a), VolumeManager(b)
        vol = await va.create("disk", VOL, compression=True)
        rng = random.Random(1)
        # Random data, compressible text, an unaligned tail, and holes between.
        await vol.write(0, rng.randbytes(MiB + 4096))
        await vol.write(3 * MiB, b"storaged send stream " * 20000)
        await vol.write(VOL - 5000, rng.randbytes(5000))
        await va.snapshot("disk", "s1")
        await vol.write(0, bytes(MiB))            # after the snapshot: not in the stream
        data = await _stream(va, "disk", "s1")
        rx = await _receive(vb, "copy", data)
        assert rx.done is not None and rx.done["snapshot"] == "s1"
        want = await va.snapshot_volume("disk", "s1").read(0, VOL)
        assert await vb.get("copy").read(0, VOL) == want
        assert await vb.snapshot_volume("copy", "s1").read(0, VOL) == want
        assert str(vb.get("copy").profile) == "ec:2+1"
        snap_map = va.snapshot_record("disk", "s1")[1].map
        assert await _mapped(vb, "copy") == a.mapped_blocks(snap_map, 0, VOL // BS)
        written = MiB + 4096 + len(b"storaged send stream ") * 20000 + 5000
        assert len(data) < written        # holes are not sent; text compresses
        # The snapshot keeps its identity across pools (the base of later increments).
        assert (va.snapshot_record("disk", "s1")[1].uuid
                == vb.snapshot_record("copy", "s1")[1].uuid)
        # A second full receive onto the same name is refused and changes nothing.
        before = _state(b)
        with pytest.raises(StorageError, match="already exists"):
            await _receive(vb, "copy", data)
        assert _state(b) == before
    finally:
        await a.close()
        await b.close()
    b = await Pool.open(disks(3, prefix="b").open())
    try:
        assert await VolumeManager(b).get("copy").read(0, VOL) == want
    finally:
        await b.close()


@pytest.mark.parametrize("compression", [True, False])
async def test_a_send_compresses_what_compresses(disks: Disks, compression: bool) -> None:
    """A chunk of text goes out lz4-compressed and a chunk of random bytes raw, whether
    the volume compresses its records or not. A volume that compresses has already tried
    lz4 on every block: where all of a chunk's blocks are stored raw, the send does not
    try again (``may_compress``), but a chunk still in the write buffer, or of a volume
    that stores everything raw, is tried."""
    a, b = await _pools(disks)
    try:
        va = VolumeManager(a)
        vol = await va.create("disk", VOL, compression=compression)
        rng = random.Random(2)
        await vol.write(0, rng.randbytes(MiB))
        await vol.write(MiB, b"storaged send stream " * 50000)
        await vol.write(2 * MiB, rng.randbytes(MiB))
        assert vol.may_compress(2 * MiB, MiB)         # buffered: not known yet
        await vol.flush()
        assert vol.may_compress(MiB, MiB)             # stored compressed (or untested)
        assert vol.may_compress(0, MiB) is not compression
        await va.snapshot("disk", "s1")
        data = await _stream(va, "disk", "s1")
        assert 2 * MiB < len(data) < 2 * MiB + MiB // 8   # the text shrank, random did not
        parser = stream.StreamParser()
        parser.feed(data)
        marked = []
        while not isinstance(ev := parser.next(), stream.End):
            if isinstance(ev, stream.Record) and ev.incompressible:
                marked.append(ev.offset)
        # Records whose every block was tried when written say so (FLAG_INCOMPRESSIBLE).
        assert marked == ([0, 2 * MiB] if compression else [])
        rx = await _receive(VolumeManager(b), "copy", data)
        assert rx.done is not None
        want = await va.snapshot_volume("disk", "s1").read(0, 3 * MiB)
        copy = VolumeManager(b).get("copy")
        assert await copy.read(0, 3 * MiB) == want
        # The copy compresses as its source did: the text, not the random bytes.
        assert b.any_compressed(copy.map_id, MiB // BS, MiB // BS) is compression
        assert not b.any_compressed(copy.map_id, 0, MiB // BS)
    finally:
        await a.close()
        await b.close()


async def test_a_write_that_says_it_does_not_compress_is_not_tried(disks: Disks) -> None:
    """``write(compressible=False)`` (what a receive does with a record its sender marked
    FLAG_INCOMPRESSIBLE) makes writeback store those whole blocks without trying lz4,
    until another write changes them; other blocks are tried as usual."""
    a, _b = await _pools(disks)
    try:
        vol = await VolumeManager(a).create("disk", VOL, compression=True)
        text = b"storaged send stream " * 4000           # compresses well
        blocks = [text[:BS]] * 4
        await vol.write(0, b"".join(blocks[:3]), compressible=False)   # blocks 0..2
        await vol.write(BS + 100, b"x" * 10)             # block 1 changed since
        await vol.write(3 * BS, blocks[3])               # block 3: an ordinary write
        await vol.flush()
        got = [a.any_compressed(vol.map_id, b, 1) for b in range(4)]
        assert got == [False, True, False, True]
        assert await vol.read(0, 4 * BS) == (text[:BS] + text[:100] + b"x" * 10
                                             + text[110:BS] + text[:BS] * 2)
    finally:
        await a.close()
        await _b.close()


async def test_incremental_chain_applies_in_order_and_refuses_a_wrong_base(
        disks: Disks) -> None:
    a, b = await _pools(disks)
    try:
        va, vb = VolumeManager(a), VolumeManager(b)
        vol = await va.create("disk", VOL, compression=False)
        rng = random.Random(2)
        await vol.write(0, rng.randbytes(VOL))
        await va.snapshot("disk", "s1")
        await vol.write(2 * MiB, rng.randbytes(BS))          # one block changed
        await vol.trim(5 * MiB, MiB)                          # a MiB punched out
        await va.snapshot("disk", "s2")
        await vol.write(7 * MiB + 100, rng.randbytes(3000))   # a partial block
        await va.snapshot("disk", "s3")
        full = await _stream(va, "disk", "s1")
        inc12 = await _stream(va, "disk", "s2", "s1")
        inc23 = await _stream(va, "disk", "s3", "s2")
        assert len(inc12) < 2 * BS + 4096 and len(inc23) < BS + 4096 < len(full) // 50

        # Onto the wrong base (nothing received yet, then s1 missing): refused, unchanged.
        before = _state(b)
        with pytest.raises(StorageError, match="no volume 'copy'"):
            await _receive(vb, "copy", inc12)
        assert _state(b) == before
        await _receive(vb, "copy", full)
        before = _state(b)
        with pytest.raises(StorageError, match="applies onto @s2"):
            await _receive(vb, "copy", inc23)
        assert _state(b) == before
        for inc, snap in ((inc12, "s2"), (inc23, "s3")):
            await _receive(vb, "copy", inc)
            want = await va.snapshot_volume("disk", snap).read(0, VOL)
            assert await vb.get("copy").read(0, VOL) == want, snap
            assert await vb.snapshot_volume("copy", snap).read(0, VOL) == want
        snap_map = va.snapshot_record("disk", "s3")[1].map
        assert await _mapped(vb, "copy") == a.mapped_blocks(snap_map, 0, VOL // BS)
        assert vb.snapshot_names("copy") == ["s1", "s2", "s3"]

        # A volume written after its latest snapshot takes an incremental only by force.
        await va.snapshot("disk", "s4")
        inc34 = await _stream(va, "disk", "s4", "s3")
        await vb.get("copy").write(0, b"local change" * 100)
        before = _state(b)
        with pytest.raises(StorageError, match="was written after @s3"):
            await _receive(vb, "copy", inc34)
        await _receive(vb, "copy", inc34, force=True)
        assert await vb.get("copy").read(0, VOL) == await va.snapshot_volume(
            "disk", "s4").read(0, VOL)
    finally:
        await a.close()
        await b.close()


async def test_truncated_corrupted_or_newer_streams_are_refused_and_change_nothing(
        disks: Disks) -> None:
    a, b = await _pools(disks)
    try:
        va, vb = VolumeManager(a), VolumeManager(b)
        vol = await va.create("disk", 4 * MiB, compression=False)
        await vol.write(0, random.Random(3).randbytes(3 * MiB))
        await va.snapshot("disk", "s1")
        data = await _stream(va, "disk", "s1")
        before = _state(b)
        rng = random.Random(4)
        cuts = sorted({0, 1, 7, 8, 20, len(data) - 1, len(data) - 8,
                       *rng.sample(range(len(data)), 12)})
        for cut in cuts:
            rx = portable.Receiver(vb, "copy")
            await rx.feed(data[:cut])
            assert rx.done is None
            msg = await rx.abort("the stream ended early", interrupted=True)
            assert "nothing was kept" in msg
            assert _state(b) == before, cut
        for pos in [*sorted(rng.sample(range(len(data)), 16)), 9, len(data) - 3]:
            bad = bytearray(data)
            bad[pos] ^= 0x40
            rx = portable.Receiver(vb, "copy")
            with pytest.raises(StorageError, match=r"corrupted|out of order|malformed|"
                               r"implausibly|unknown record|bad magic|missing|decompress"):
                await rx.feed(bytes(bad))
            await rx.abort("bad stream", interrupted=False)
            assert _state(b) == before, pos
        n = int.from_bytes(data[12:16], "big")
        head = bytearray(data[:16 + n])
        head[8:12] = (stream.VERSION + 1).to_bytes(4, "big")
        newer = bytes(head) + xxhash.xxh3_64_digest(bytes(head)) + data[24 + n:]
        with pytest.raises(StorageError, match="format version 2"):
            await portable.Receiver(vb, "copy").feed(bytes(newer))
        assert _state(b) == before
        # Bytes after the end record, and a record of another stream spliced in, too.
        with pytest.raises(StorageError, match="after the end"):
            await portable.Receiver(vb, "x").feed(data + b"\0")
        await portable.abort_receive(vb, "x") if portable.receive_state(vb, "x") else None
    finally:
        await a.close()
        await b.close()


async def test_an_interrupted_resumable_receive_resumes_where_it_stopped(
        disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(portable, "CHECKPOINT", MiB)
    a, b = await _pools(disks)
    try:
        va, vb = VolumeManager(a), VolumeManager(b)
        await _random_snapshot(va, 5)
        data = await _stream(va, "disk", "s1")
        rx = portable.Receiver(vb, "copy", resumable=True)
        await rx.feed(data[:len(data) * 6 // 10])
        msg = await rx.abort("connection lost", interrupted=True)
        kept = portable.receive_state(vb, "copy")
        assert kept is not None and 0 < kept["seq"] < 8 and f"--resume {kept['seq']}" in msg
        assert "copy" not in vb.names()                   # no half volume is visible
        # A new receive without --resume is refused; a fresh pool object sees the same.
        with pytest.raises(StorageError, match="continue it with --resume"):
            await portable.Receiver(vb, "copy").feed(data)
        await b.close()
        b = await Pool.open(disks(3, prefix="b").open())
        vb = VolumeManager(b)
        assert portable.receive_state(vb, "copy") == kept
        rest = await _stream(va, "disk", "s1", resume=kept["seq"])
        assert len(rest) < len(data) - kept["seq"] * MiB + 4096
        rx = await _receive(vb, "copy", rest, resume=True)
        assert rx.applied_bytes == VOL - kept["seq"] * MiB
        assert await vb.get("copy").read(0, VOL) == await va.snapshot_volume(
            "disk", "s1").read(0, VOL)
        assert portable.receive_state(vb, "copy") is None
    finally:
        await a.close()
        await b.close()


async def test_a_send_that_cannot_read_a_record_fails_with_that_error(
        disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records are read ahead of the reader, concurrently: an unreadable one ends the
    stream with its own storage error (not a group of them), before any byte of the
    record or the end record goes out."""
    monkeypatch.setattr(portable, "SEND_AHEAD", 2)
    dev = FaultyDevice(disks(1, prefix="f").create()[0], seed=1)
    a = await Pool.create("src", [dev], extent_size=MiB)
    try:
        va = VolumeManager(a)
        await _random_snapshot(va, 6)
        got: list[bytes] = []
        _h, chunks = await portable.send(va, "disk", "s1")
        with pytest.raises(StorageError) as err:
            async with chunks as it:
                async for pieces in it:
                    got.append(b"".join(pieces))
                    if len(got) == 3:
                        dev.read_error_rate = 1.0     # the disk dies mid-send
        assert not isinstance(err.value, BaseExceptionGroup)
        sent = b"".join(got)
        assert 2 * MiB < len(sent) < VOL
        # What did go out is a stream prefix that a receiver refuses as cut short.
        b = await Pool.create("dst", disks(1, prefix="g").create(), extent_size=MiB)
        try:
            rx = portable.Receiver(VolumeManager(b), "copy")
            await rx.feed(sent)
            assert rx.done is None
            await rx.abort("cut", interrupted=False)
        finally:
            await b.close()
    finally:
        await a.close()


async def test_a_source_that_fails_mid_stream_fails_the_receive_with_its_error(
        disks: Disks) -> None:
    """The receive reads its source a piece ahead in a task of its own: an error of the
    source comes out of run() as itself and nothing of the stream is kept."""
    a, b = await _pools(disks)
    try:
        va, vb = VolumeManager(a), VolumeManager(b)
        await _random_snapshot(va, 7)
        data = await _stream(va, "disk", "s1")
        before = _state(b)

        async def source() -> AsyncIterator[bytes]:
            yield data[:len(data) // 2]
            raise stream.StreamError("the connection broke")
        rx = portable.Receiver(vb, "copy")
        with pytest.raises(stream.StreamError, match="connection broke"):
            await rx.run(source())
        await rx.abort("broke", interrupted=False)
        assert _state(b) == before
        assert "copy" not in vb.names()
    finally:
        await a.close()
        await b.close()
