"""Bad input over real sockets: the NBD protocol spoken by hand (NetworkBlockDevice/nbd
doc/proto.md) against a real server.

Invariant 9: a peer that breaks the protocol gets the spec's error (or, where the framing is
lost, a closed connection) and changes nothing. Every test runs with a ``Bystander``: a
second, well-behaved client on its own connection that keeps writing and reading back its
own data the whole time and must still be served correctly afterwards; and every test ends
with every abusive connection's handler finished (nothing left hanging in the server).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from nbd import proto
from tests.kit.nbdharness import (
    OPT_HDR,
    POOL,
    Bystander,
    PeerClosed,
    RawClient,
    Served,
    request,
    served_pool,
    wait_idle,
)

KiB = 1024
MiB = 1024 * 1024
VOL = f"{POOL}/vol"
VOL_SIZE = 16 * MiB
RO = f"{POOL}/ro"
RO_DATA = bytes(range(256)) * 16      # 4 KiB at offset 0 of the read-only export


@asynccontextmanager
async def arena(tmp_path: Path) -> AsyncIterator[tuple[Served, Bystander]]:
    """A served pool (vol 16 MiB, side 4 MiB for the bystander, ro 1 MiB read-only), with
    the bystander running throughout."""
    async with served_pool(tmp_path, {"vol": VOL_SIZE, "side": 4 * MiB,
                                      "ro": 1 * MiB}) as srv:
        ro = srv.vm.get("ro")
        await ro.write(0, RO_DATA)
        await ro.flush()
        ro.read_only = True
        bystander = Bystander(srv.port)
        async with bystander.running():
            yield srv, bystander
            # Only the bystander's connection may be left: every other handler finished.
            await wait_idle(srv.server, leave=1)


async def expect_closed(c: RawClient) -> None:
    """The server closed the connection without sending anything more."""
    rest = await c.read_to_eof()
    assert rest == b"", f"expected a bare close, got {rest[:64]!r}"
    await c.aclose()


async def still_works(srv: Served, c: RawClient, cookie: int = 0xC0FFEE) -> None:
    """The connection still serves a write and a read-back correctly."""
    block = struct.pack(">Q", cookie) * 512
    r = await c.write(8 * MiB, block, cookie=cookie)
    assert r.error == 0, f"write after bad input failed: {r}"
    r = await c.read(8 * MiB, len(block), cookie=cookie + 1)
    assert r.error == 0 and r.data == block, f"read after bad input: {r.error}"


# ---- handshake ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [0xDEADBEEF, int.from_bytes(b"GARB", "big"),
                                   proto.FLAG_FIXED_NEWSTYLE | 1 << 7],
                         ids=["0xdeadbeef", "GARB", "unknown-bit-7"])
async def test_unknown_client_flags_close_the_connection(tmp_path: Path, flags: int) -> None:
    async with arena(tmp_path) as (srv, _b):
        before = srv.server.stats.protocol_errors
        c = await RawClient.connect(srv.port)
        await c.greeting()
        await c.send(struct.pack(">I", flags))
        await expect_closed(c)
        assert srv.server.stats.protocol_errors == before + 1


async def test_bad_option_magic_closes_the_connection(tmp_path: Path) -> None:
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.connect(srv.port)
        await c.start()
        await c.send(OPT_HDR.pack(proto.IHAVEOPT ^ 1, proto.OPT_LIST, 0))
        await expect_closed(c)


async def test_unknown_option_is_unsupported_and_the_session_goes_on(tmp_path: Path) -> None:
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.connect(srv.port)
        await c.start()
        for option, data in [(99, b""), (0x7FFFFFFF, b"x" * 1000), (4, b"")]:
            (r,) = await c.option(option, data)
            assert (r.option, r.rtype) == (option, proto.REP_ERR_UNSUP), r
        # The option data was skipped exactly: the next option parses.
        assert sorted(await c.list_exports()) == [f"{POOL}/ro", f"{POOL}/side", VOL]
        assert (await c.go(VOL))[-1].rtype == proto.REP_ACK
        await still_works(srv, c)
        await c.disconnect()
        await expect_closed(c)


async def test_oversized_option_data_is_too_big_then_closed(tmp_path: Path) -> None:
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.connect(srv.port)
        await c.start()
        await c.send(OPT_HDR.pack(proto.IHAVEOPT, proto.OPT_GO, 1 * MiB))  # data never sent
        r = await c.option_reply()
        assert (r.option, r.rtype) == (proto.OPT_GO, proto.REP_ERR_TOO_BIG), r
        await expect_closed(c)


async def test_go_for_an_unknown_export_is_unknown(tmp_path: Path) -> None:
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.connect(srv.port)
        await c.start()
        for name in ["tank/nope", "nope", "other/vol", "tank/", "/vol", "", "tank/vol/x",
                     "tank/vol@snap"]:
            for option in (proto.OPT_INFO, proto.OPT_GO):
                (r,) = await c.option(option, RawClient.go_data(name))
                assert (r.option, r.rtype) == (option, proto.REP_ERR_UNKNOWN), (name, r)
        assert (await c.go(VOL))[-1].rtype == proto.REP_ACK
        await still_works(srv, c)
        await c.disconnect()
        await expect_closed(c)

        # NBD_OPT_EXPORT_NAME has no error reply: the server must close.
        c = await RawClient.connect(srv.port)
        await c.start()
        await c.send_option(proto.OPT_EXPORT_NAME, b"tank/nope")
        await expect_closed(c)


@pytest.mark.parametrize("cut", ["greeting-only", "half-flags", "half-option-header",
                                 "option-data-cut", "half-request", "write-payload-cut"])
async def test_truncated_handshake_or_request_is_cleaned_up(tmp_path: Path, cut: str) -> None:
    async with arena(tmp_path) as (srv, _b):
        before = srv.server.stats.protocol_errors
        c = await RawClient.connect(srv.port)
        if cut in ("half-request", "write-payload-cut"):
            await c.start()
            assert (await c.go(VOL))[-1].rtype == proto.REP_ACK
            if cut == "half-request":
                await c.send(request(proto.CMD_READ, 1, 0, 512)[:13])
            else:
                await c.send(request(proto.CMD_WRITE, 1, 0, 4096, b"\xaa" * 1000))
        else:
            await c.greeting()
            if cut == "half-flags":
                await c.send(b"\x00\x00")
            elif cut == "half-option-header":
                await c.send(struct.pack(">I", proto.FLAG_FIXED_NEWSTYLE) + b"IHAVEOPT")
            elif cut == "option-data-cut":
                await c.send(struct.pack(">I", proto.FLAG_FIXED_NEWSTYLE)
                             + OPT_HDR.pack(proto.IHAVEOPT, proto.OPT_GO, 100) + b"\0" * 10)
        await c.aclose()
        await wait_idle(srv.server, leave=1)
        if cut != "greeting-only":
            assert srv.server.stats.protocol_errors == before + 1
        # The cut write changed nothing.
        assert await srv.vm.get("vol").read(0, 4096) == bytes(4096)


# ---- transmission ---------------------------------------------------------------------------
async def test_write_claiming_1gib_then_closing(tmp_path: Path) -> None:
    """A write header claiming 1 GiB: the server must not wait for (or buffer) a GiB; it
    may refuse it with an error or hang up (proto.md: a payload deemed a denial of service
    MAY be hard-disconnected). Either way the connection ends and nothing is written."""
    async with arena(tmp_path) as (srv, _b):
        # (a) header + 64 KiB of the payload, then the client closes its side.
        c = await RawClient.open(srv.port, VOL)
        await c.send(request(proto.CMD_WRITE, 7, 0, 1 << 30, b"\xab" * (64 * KiB)))
        await c.stream.send_eof()
        await check_refused_then_closed(c, 7)
        # (b) header only; the client stays connected: the server ends it on its own.
        c = await RawClient.open(srv.port, VOL)
        await c.send(request(proto.CMD_WRITE, 8, 0, 1 << 30))
        await check_refused_then_closed(c, 8)
        await wait_idle(srv.server, leave=1)
        assert await srv.vm.get("vol").read(0, 128 * KiB) == bytes(128 * KiB)


async def check_refused_then_closed(c: RawClient, cookie: int) -> None:
    rest = await c.read_to_eof()
    if rest:
        magic, flags, rtype, got, n = struct.unpack_from(">IHHQI", rest)
        assert magic == proto.STRUCTURED_REPLY_MAGIC and got == cookie, rest[:40]
        assert rtype == proto.REPLY_TYPE_ERROR and flags & proto.REPLY_FLAG_DONE, rest[:40]
        (err,) = struct.unpack_from(">I", rest, 20)
        assert err != 0
        assert len(rest) == 20 + n, "anything after the error reply"
    await c.aclose()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
async def test_read_or_trim_past_the_end_is_einval(tmp_path: Path, structured: bool) -> None:
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, VOL, structured=structured)
        assert c.size == VOL_SIZE
        cookie = 100
        for kind, off, n in [(proto.CMD_READ, VOL_SIZE - 512, 1024),
                             (proto.CMD_READ, VOL_SIZE, 1),
                             (proto.CMD_READ, 1 << 63, 512),
                             (proto.CMD_READ, (1 << 64) - 512, 1024),   # wraps around 2^64
                             (proto.CMD_TRIM, VOL_SIZE - 64 * KiB, 128 * KiB),
                             (proto.CMD_TRIM, (1 << 64) - 4096, 8192),
                             (proto.CMD_CACHE, VOL_SIZE, 4096)]:
            cookie += 1
            r = await c.cmd(kind, cookie, off, n)
            assert r.error == proto.NBD_EINVAL, (kind, off, n, r)
            assert r.structured == structured
            if structured:
                assert r.chunk_types == [proto.REPLY_TYPE_ERROR], r
        r = await c.read(VOL_SIZE - 512, 512, cookie=999)       # the very end is fine
        assert r.error == 0 and r.data == bytes(512)
        await still_works(srv, c)
        await c.disconnect()
        await expect_closed(c)


async def test_write_past_the_end_is_enospc(tmp_path: Path) -> None:
    """proto.md "Error values": the server SHOULD return NBD_ENOSPC for a write request
    including sectors beyond the size of the device (as qemu-nbd and nbdkit do); the part
    inside the export is not written either."""
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, VOL)
        r = await c.write(VOL_SIZE - 512, b"\xcc" * 1024, cookie=1)
        assert r.error == proto.NBD_ENOSPC, r
        r = await c.write(VOL_SIZE + 4096, b"\xcc" * 512, cookie=2)
        assert r.error == proto.NBD_ENOSPC, r
        assert await srv.vm.get("vol").read(VOL_SIZE - 512, 512) == bytes(512)
        await still_works(srv, c)
        await c.disconnect()
        await expect_closed(c)


async def test_write_over_the_maximum_payload_is_einval_not_eoverflow(tmp_path: Path) -> None:
    """A WRITE larger than the advertised maximum payload (32 MiB) but under the server's
    hard limit, payload sent in full: proto.md "Error values": "The server SHOULD NOT
    return NBD_EOVERFLOW except as documented in response to NBD_CMD_READ when
    NBD_CMD_FLAG_DF is supported, or when a command without payload requests a length
    larger than an advertised maximum payload length" - a WRITE has a payload. Allowed:
    EINVAL (session goes on) or a hard disconnect (sizes over 2^25 MAY be deemed an
    attack). Nothing is written either way."""
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, VOL)
        n = 32 * MiB + 4096
        c.track(proto.CMD_WRITE, 1, 0, n)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(c.stream.send_all,
                                   request(proto.CMD_WRITE, 1, 0, n, b"\x77" * n))
                try:
                    r = await c.reply(seconds=60)
                except PeerClosed:
                    r = None                     # hard disconnect: allowed
                    nursery.cancel_scope.cancel()
        if r is not None:
            assert r.error == proto.NBD_EINVAL, r
            await still_works(srv, c)
            await c.disconnect()
        await c.aclose()
        assert await srv.vm.get("vol").read(0, 4096) == bytes(4096)


async def test_unknown_command_is_einval(tmp_path: Path) -> None:
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, VOL)
        for i, kind in enumerate([8, 9, 12, 0x1234, 0xFFFF]):
            r = await c.cmd(kind, 50 + i, 0, 0)
            assert r.error == proto.NBD_EINVAL, (kind, r)
        await still_works(srv, c)
        await c.disconnect()
        await expect_closed(c)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
async def test_unknown_or_misplaced_flags_are_einval(tmp_path: Path, structured: bool) -> None:
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, VOL, structured=structured)
        cases: list[tuple[int, int, int, bytes]] = [
            (proto.CMD_READ, 1 << 7, 512, b""),
            (proto.CMD_READ, 1 << 15, 512, b""),
            (proto.CMD_READ, proto.CMD_FLAG_NO_HOLE, 512, b""),
            # A write with a flag it may not carry: its payload must still be skipped.
            (proto.CMD_WRITE, proto.CMD_FLAG_NO_HOLE, 4096, b"\xdd" * 4096),
            (proto.CMD_WRITE, 1 << 9, 4096, b"\xdd" * 4096),
            (proto.CMD_TRIM, proto.CMD_FLAG_DF, 4096, b""),
            (proto.CMD_FLUSH, 1 << 6, 0, b""),
            (proto.CMD_BLOCK_STATUS, 0, 4096, b""),     # no meta context negotiated
        ]
        if not structured:
            cases.append((proto.CMD_READ, proto.CMD_FLAG_DF, 512, b""))   # DF needs SR
        for i, (kind, flags, n, data) in enumerate(cases):
            r = await c.cmd(kind, 200 + i, 0, n, data, flags)
            assert r.error == proto.NBD_EINVAL, (kind, hex(flags), r)
        assert await srv.vm.get("vol").read(0, 4096) == bytes(4096)
        await still_works(srv, c)
        await c.disconnect()
        await expect_closed(c)


async def test_fua_is_accepted_on_every_command(tmp_path: Path) -> None:
    """proto.md "Command flags": NBD_CMD_FLAG_FUA "is valid for all commands, provided
    NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST accept all
    commands with this bit set (even by ignoring the bit)"; existing clients set it on
    reads and flushes."""
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, VOL, meta=True)
        assert c.tflags & proto.TF_SEND_FUA
        fua = proto.CMD_FLAG_FUA
        data = b"\x42" * 4096
        assert (await c.cmd(proto.CMD_WRITE, 1, 0, data=data, flags=fua)).error == 0
        for i, (kind, flags, off, n) in enumerate([
                (proto.CMD_READ, fua, 0, 4096),
                (proto.CMD_READ, fua | proto.CMD_FLAG_DF, 0, 4096),
                (proto.CMD_FLUSH, fua, 0, 0),
                (proto.CMD_CACHE, fua, 0, 4096),
                (proto.CMD_BLOCK_STATUS, fua, 0, 4096),
                (proto.CMD_BLOCK_STATUS, fua | proto.CMD_FLAG_REQ_ONE, 0, 4096),
                (proto.CMD_TRIM, fua, 64 * KiB, 64 * KiB),
                (proto.CMD_WRITE_ZEROES, fua, 128 * KiB, 64 * KiB)]):
            r = await c.cmd(kind, 10 + i, off, n, flags=flags)
            assert r.error == 0, (proto.COMMAND_NAMES[kind], hex(flags), r)
            if kind == proto.CMD_READ:
                assert r.data == data
        await c.disconnect()
        await expect_closed(c)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
async def test_writes_to_a_read_only_export_are_eperm(tmp_path: Path, structured: bool) -> None:
    """A read-only export (stand-in for snapshot exports until snapshots land): WRITE,
    TRIM and WRITE_ZEROES get EPERM (proto.md "Error values"), the write payload is
    skipped, reads still work and nothing changed."""
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, RO, structured=structured)
        assert c.tflags & proto.TF_READ_ONLY
        for i, (kind, flags, n, data) in enumerate([
                (proto.CMD_WRITE, 0, 4096, b"\xee" * 4096),
                (proto.CMD_WRITE, proto.CMD_FLAG_FUA, 512, b"\xee" * 512),
                (proto.CMD_TRIM, 0, 4096, b""),
                (proto.CMD_WRITE_ZEROES, 0, 4096, b""),
                (proto.CMD_WRITE_ZEROES, proto.CMD_FLAG_NO_HOLE, 4096, b"")]):
            r = await c.cmd(kind, 300 + i, 0, n, data, flags)
            assert r.error == proto.NBD_EPERM, (kind, r)
        r = await c.read(0, 4096, cookie=399)
        assert r.error == 0 and r.data == RO_DATA
        assert (await c.cmd(proto.CMD_FLUSH, 400)).error == 0
        await c.disconnect()
        await expect_closed(c)
        assert await srv.vm.get("ro").read(0, 4096) == RO_DATA


async def test_structured_reads_send_holes_and_honour_df(tmp_path: Path) -> None:
    """Positive control for the reply parser: a read over data and a hole comes back as
    OFFSET_DATA + OFFSET_HOLE chunks; with DF, as exactly one OFFSET_DATA chunk."""
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, VOL, meta=True)
        data = bytes(range(256)) * 256
        assert (await c.write(0, data, cookie=1)).error == 0
        r = await c.read(0, 256 * KiB, cookie=2)
        assert r.error == 0 and r.data == data + bytes(192 * KiB)
        assert proto.REPLY_TYPE_OFFSET_HOLE in r.chunk_types, r.chunk_types
        r = await c.cmd(proto.CMD_READ, 3, 0, 256 * KiB, flags=proto.CMD_FLAG_DF)
        assert r.error == 0 and r.data == data + bytes(192 * KiB)
        content = [t for t in r.chunk_types if t != proto.REPLY_TYPE_NONE]
        assert content == [proto.REPLY_TYPE_OFFSET_DATA], r.chunk_types
        r = await c.cmd(proto.CMD_BLOCK_STATUS, 4, 0, 256 * KiB)
        assert r.error == 0
        assert r.extents == [(64 * KiB, 0), (192 * KiB, proto.STATE_HOLE | proto.STATE_ZERO)]
        await c.disconnect()
        await expect_closed(c)


# ---- volume -------------------------------------------------------------------------------
N_BURST = 10_000


async def test_ten_thousand_pipelined_requests(tmp_path: Path) -> None:
    """10,000 writes in one burst, then 10,000 reads in one burst (the client reads replies
    while it sends, as a real client must): every cookie is answered exactly once, every
    read returns what its write wrote."""
    async with arena(tmp_path) as (srv, bystander):
        c = await RawClient.open(srv.port, VOL)

        def content(i: int) -> bytes:
            return struct.pack(">I", i) * 128          # 512 bytes

        for phase in ("write", "read"):
            parts = []
            for i in range(N_BURST):
                if phase == "write":
                    parts.append(c.encode(proto.CMD_WRITE, i, i * 512, data=content(i)))
                else:
                    parts.append(c.encode(proto.CMD_READ, N_BURST + i, i * 512, 512))
            burst = b"".join(parts)
            seen: set[int] = set()
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(c.stream.send_all, burst)
                    for _ in range(N_BURST):
                        r = await c.reply()
                        assert r.cookie not in seen, f"cookie {r.cookie} answered twice"
                        seen.add(r.cookie)
                        assert r.error == 0, r
                        if phase == "read":
                            assert r.data == content(r.cookie - N_BURST), r.cookie
            base = 0 if phase == "write" else N_BURST
            assert seen == set(range(base, base + N_BURST))
        assert bystander.cycles > 0
        vol = srv.vm.get("vol")
        assert await vol.read(0, N_BURST * 512) == b"".join(content(i) for i in range(N_BURST))
        await c.disconnect()
        await expect_closed(c)


async def test_disconnect_after_a_pipeline_answers_everything_first(tmp_path: Path) -> None:
    """NBD_CMD_DISC behind 200 pipelined writes: proto.md says the server MUST handle all
    outstanding requests before closing; every write is answered, then the close."""
    async with arena(tmp_path) as (srv, _b):
        c = await RawClient.open(srv.port, VOL)
        burst = b"".join(c.encode(proto.CMD_WRITE, i, i * 4096, data=bytes([i % 256]) * 4096)
                         for i in range(200))
        await c.send(burst + request(proto.CMD_DISC, 9999))
        got = {(await c.reply()).cookie for _ in range(200)}
        assert got == set(range(200))
        await expect_closed(c)
        vol = srv.vm.get("vol")
        assert await vol.read(199 * 4096, 4096) == bytes([199]) * 4096


async def test_a_client_that_never_reads_replies_stalls_only_itself(tmp_path: Path) -> None:
    """10,000 pipelined 64 KiB reads and never a reply read: the server applies
    backpressure to that connection only; the bystander goes on; closing ends it all."""
    async with arena(tmp_path) as (srv, bystander):
        c = await RawClient.open(srv.port, VOL)
        burst = b"".join(request(proto.CMD_READ, i, (i * 64 * KiB) % VOL_SIZE, 64 * KiB)
                         for i in range(N_BURST))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.stream.send_all, burst)   # blocks once buffers are full
            await trio.sleep(0.3)
            seen = bystander.cycles
            await trio.sleep(0.5)
            assert bystander.cycles > seen + 5, "the bystander stalled too"
            nursery.cancel_scope.cancel()
        await c.aclose()
        await wait_idle(srv.server, leave=1, seconds=60)
