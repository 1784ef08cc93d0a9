"""Hostile NBD peers against a real server on loopback (issue 20 item 6): timeouts, the
payload memory budget and the connection limit.

Cites nbd/proto P1-P2, nbd/server S1-S4, nbd/limits B1-B2 and DESIGN invariant 9 (bad
input changes nothing, and everybody else is still served: a ``Bystander`` runs
throughout every test).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import trio

from nbd import proto
from nbd.proto import ServerConnection
from tests.kit.nbdharness import (
    POOL,
    Bystander,
    PeerClosed,
    RawClient,
    Served,
    request,
    served_pool,
    wait_idle,
)
from tests.unit.test_nbd_proto import Catalog, handshake

KiB = 1024
MiB = 1024 * 1024
VOL = f"{POOL}/vol"
TIMEOUT = 0.5


@asynccontextmanager
async def arena(tmp_path: Path, **limits: Any) -> AsyncIterator[tuple[Served, Bystander]]:
    limits.setdefault("handshake_timeout", TIMEOUT)
    limits.setdefault("payload_timeout", TIMEOUT)
    async with served_pool(tmp_path, {"vol": 64 * MiB, "side": 4 * MiB},
                           limits=limits) as srv:
        bystander = Bystander(srv.port)
        async with bystander.running():
            yield srv, bystander
            await wait_idle(srv.server, leave=1)
        # B2: every reservation was given back.
        assert srv.server.memory.used == 0 and srv.server.stats.memory == 0


async def closed_by_server(c: RawClient, within: float) -> bytes:
    """The server closes the connection on its own within ``within`` seconds."""
    start = trio.current_time()
    rest = await c.read_to_eof(seconds=within)
    await c.aclose()
    assert trio.current_time() - start < within
    return rest


def test_a_write_header_sets_nothing_aside_until_its_payload_is_asked_for() -> None:
    """P1/P2 in the pure core: a valid large write's header costs no buffer until the
    transport asks for one; an invalid one is refused without a buffer, after its payload
    is skipped; one over the hard limit ends the connection."""
    conn = ServerConnection(Catalog())
    handshake(conn)
    conn.receive_data(request(proto.CMD_WRITE, 1, 0, 512 * KiB))
    assert conn.next_event() is proto.NEED_DATA
    assert conn.payload_wanted == 512 * KiB and conn.in_request
    buf = conn.receive_buffer()
    assert buf is not None and len(buf) == 512 * KiB and conn.payload_wanted == 0
    # Past the end of the 1 MiB export: ENOSPC, answered once the payload is skipped.
    bad = ServerConnection(Catalog())
    handshake(bad)
    bad.receive_data(request(proto.CMD_WRITE, 2, 768 * KiB, 512 * KiB))
    assert bad.next_event() is proto.NEED_DATA
    assert bad.payload_wanted == 0 and bad.receive_buffer() is None and bad.in_request
    assert bad.data_to_send() == b""
    bad.receive_data(bytes(512 * KiB) + request(proto.CMD_FLUSH, 3))
    ev = bad.next_event()
    assert isinstance(ev, proto.Command) and ev.cookie == 3
    magic, _flags, rtype, cookie, _n = struct.unpack_from(">IHHQI", bad.data_to_send())
    assert (magic, rtype, cookie) == (proto.STRUCTURED_REPLY_MAGIC,
                                      proto.REPLY_TYPE_ERROR, 2)
    assert not bad.in_request


async def test_stalled_handshakes_and_requests_are_dropped_idle_ones_kept(
        tmp_path: Path) -> None:
    """S2: a handshake not finished, a request header cut short, a write header without
    its payload, a payload cut short, and a refused write whose payload never comes are
    each dropped after the timeout, with nothing written; a connection idle between
    requests is kept and still served."""
    async with arena(tmp_path) as (srv, _b):
        idle = await RawClient.open(srv.port, VOL)
        silent = await RawClient.connect(srv.port)
        await silent.greeting()
        mid_option = await RawClient.connect(srv.port)
        await mid_option.start()
        await mid_option.send(struct.pack(">QI", proto.IHAVEOPT, proto.OPT_GO))
        half_header = await RawClient.open(srv.port, VOL)
        await half_header.send(request(proto.CMD_READ, 1, 0, 4096)[:13])
        no_payload = await RawClient.open(srv.port, VOL)
        await no_payload.send(request(proto.CMD_WRITE, 2, 0, 1 * MiB))
        half_payload = await RawClient.open(srv.port, VOL)
        await half_payload.send(request(proto.CMD_WRITE, 3, 1 * MiB, 1 * MiB,
                                        b"\x11" * (512 * KiB)))
        refused = await RawClient.open(srv.port, VOL)       # over the maximum: skipped
        await refused.send(request(proto.CMD_WRITE, 4, 0, 40 * MiB, b"\x22" * 4096))
        await trio.sleep(TIMEOUT / 5)
        # P2/S1: the header without payload holds nothing; the half-sent payload holds
        # its 1 MiB; the refused one is skipped, unstored.
        assert srv.server.stats.memory <= 1 * MiB
        for c in (silent, mid_option, half_header, no_payload, half_payload, refused):
            assert await closed_by_server(c, 5 * TIMEOUT + 2) == b""
        assert srv.server.stats.timeouts == 6
        await trio.sleep(2 * TIMEOUT)
        r = await idle.write(0, b"\x33" * 4096, cookie=9)
        assert r.error == 0
        r = await idle.read(0, 8192, cookie=10)
        assert r.error == 0 and r.data == b"\x33" * 4096 + bytes(4096)
        assert await srv.vm.get("vol").read(1 * MiB, 1 * MiB) == bytes(1 * MiB)
        await idle.disconnect()
        await idle.aclose()


async def test_payload_memory_waits_for_the_budget_and_nothing_fails(tmp_path: Path) -> None:
    """S1/B1: three connections each start a 32 MiB write against a 64 MiB server budget:
    two buffers are set aside, the third waits (no memory, no error), and once the first
    two are done all three writes complete and read back byte-exact."""
    n = 32 * MiB
    async with arena(tmp_path, memory=64 * MiB, connection_memory=32 * MiB,
                     payload_timeout=30.0) as (srv, _b):
        clients = [await RawClient.open(srv.port, VOL) for _ in range(3)]
        payloads = [bytes([0x40 + i]) * n for i in range(3)]
        for i, c in enumerate(clients):
            c.track(proto.CMD_WRITE, 100 + i, 0, n)
            await c.send(request(proto.CMD_WRITE, 100 + i, 0, n)[:28] + payloads[i][:4096])
        with trio.fail_after(10):
            while srv.server.memory.statistics().waits == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert srv.server.stats.memory == 64 * MiB
        assert srv.server.memory.statistics().peak <= 64 * MiB
        results = []
        async with trio.open_nursery() as nursery:
            for i, c in enumerate(clients):
                async def finish(c: RawClient = c, i: int = i) -> None:
                    await c.stream.send_all(payloads[i][4096:])
                    results.append((i, await c.reply(seconds=30)))
                nursery.start_soon(finish)
        assert sorted(i for i, r in results if r.error == 0) == [0, 1, 2]
        last = [i for i, _r in results][-1]
        assert await srv.vm.get("vol").read(0, n) == payloads[last]
        for c in clients:
            await c.disconnect()
            await c.aclose()
    assert srv.server.memory.statistics().peak <= 64 * MiB


async def test_connections_over_the_limit_are_closed_at_once(tmp_path: Path) -> None:
    """S3: with max_connections = 3 (the bystander is one), a fourth connection is closed
    before the greeting; once one leaves, a new one is served."""
    async with arena(tmp_path, max_connections=3, handshake_timeout=30.0) as (srv, _b):
        a = await RawClient.open(srv.port, VOL)
        b = await RawClient.open(srv.port, VOL)
        extra = await RawClient.connect(srv.port)
        assert await closed_by_server(extra, 5) == b""
        assert srv.server.stats.refused == 1
        await a.disconnect()
        await a.aclose()
        await wait_idle(srv.server, leave=2)
        c = await RawClient.open(srv.port, VOL)
        r = await c.write(0, b"\x44" * 4096, cookie=5)
        assert r.error == 0
        for x in (b, c):
            await x.disconnect()
            await x.aclose()


async def test_an_unexpected_error_answers_eio_and_the_connection_goes_on(
        tmp_path: Path) -> None:
    """S4: a bug met by one request (a flush raising a non-storage error, injected) is an
    EIO reply to that request; the same connection and everybody else go on."""
    async with arena(tmp_path) as (srv, _b):
        vol = srv.vm.get("vol")

        async def broken_flush() -> None:
            raise RuntimeError("injected")
        original = vol.flush
        vol.flush = broken_flush  # type: ignore[method-assign]
        try:
            c = await RawClient.open(srv.port, VOL)
            r = await c.cmd(proto.CMD_FLUSH, 7)
            assert r.error == proto.NBD_EIO
        finally:
            vol.flush = original  # type: ignore[method-assign]
        r = await c.write(0, b"\x55" * 4096, cookie=8)
        assert r.error == 0
        r = await c.cmd(proto.CMD_FLUSH, 9)
        assert r.error == 0
        await c.disconnect()
        with trio.fail_after(5), suppress(PeerClosed):
            await c.read_to_eof()
        await c.aclose()
