"""Large READs over a real TCP connection (iscsi/server.py ``_Wire``): pipelined 1 MiB
reads come back byte for byte, each as four 256 KiB Data-In PDUs (gathered from the
volume's 64 KiB blocks, iscsi/session.py ``_segments``), the last with the status; and the
connection's socket does not keep trio's 16 KiB TCP_NOTSENT_LOWAT, which made the kernel
take a 1 MiB answer two or three 64 KiB segments per ``sendmsg``."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import trio

from iscsi import pdu as P
from tests.kit.iscsiharness import Served, served_pool
from tests.kit.iscsiraw import DEFAULT_KEYS, RawInitiator, read10

MiB = 1 << 20
SECTOR = 512


def pipelined_reads(srv: Served, starts: list[int], *, rcvbuf: int = 0,
                    pause: float = 0.0) -> dict[int, list[P.DataIn]]:
    """All READ(10)s sent before any answer is read; the Data-In PDUs by ITT. With
    ``rcvbuf``, the initiator's receive buffer is that small, and with ``pause`` it waits
    that long before each PDU it takes."""
    with RawInitiator(srv.host, srv.port, timeout=20 if pause else 10) as s:
        if rcvbuf:
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        resp = s.login(srv.iqn(), DEFAULT_KEYS)
        assert (resp.status_class, resp.status_detail) == (0, 0)
        itts = [s.command(read10(start // SECTOR, MiB // SECTOR), read=MiB).itt
                for start in starts]
        got: dict[int, list[P.DataIn]] = {itt: [] for itt in itts}
        done = 0
        while done < len(itts):
            if pause:
                time.sleep(pause)
            p = s.recv()
            assert isinstance(p, P.DataIn), p
            got[p.itt].append(p)
            done += p.has_status
        return got


async def test_pipelined_1m_reads_are_exact_in_four_pdus_each(tmp_path: Path) -> None:
    async with served_pool(tmp_path, {"vol": 16 * MiB}) as srv:
        vol = srv.vm.get("vol")
        data = os.urandom(16 * MiB)
        await vol.write(0, data)
        await vol.flush()
        starts = [0, 5 * MiB + 4096, 3 * MiB, 15 * MiB]
        got = await trio.to_thread.run_sync(pipelined_reads, srv, starts)
        for start, pdus in zip(starts, got.values(), strict=True):
            assert [len(p.data) for p in pdus] == [256 * 1024] * 4
            assert [p.datasn for p in pdus] == [0, 1, 2, 3]
            assert [p.offset for p in pdus] == [0, 1 << 18, 2 << 18, 3 << 18]
            assert [p.has_status for p in pdus] == [False, False, False, True]
            assert b"".join(bytes(p.data) for p in pdus) == data[start:start + MiB]
        # The session's socket: no TCP_NOTSENT_LOWAT of its own (the kernel's default).
        clients = list(srv.server._clients)
        with RawInitiator(srv.host, srv.port) as s:
            await trio.to_thread.run_sync(s.login, srv.iqn(), DEFAULT_KEYS)
            (client,) = [c for c in srv.server._clients if c not in clients]
            lowat = client.wire.sock.getsockopt(socket.IPPROTO_TCP,
                                                socket.TCP_NOTSENT_LOWAT)
            assert lowat == 0
            assert await vol.read(0, 16 * MiB) == data          # nothing changed


def one_read(srv: Served, start: int) -> bytes:
    with RawInitiator(srv.host, srv.port, initiator="iqn.2026-01.org.test:other",
                      isid=b"\x80\0\0\0\0\2", timeout=10) as s:
        s.login(srv.iqn(), DEFAULT_KEYS)
        reply = s.scsi(read10(start // SECTOR, MiB // SECTOR), read=MiB)
        assert reply.status == 0
        return reply.data


async def test_a_peer_that_stops_reading_stalls_only_itself(tmp_path: Path) -> None:
    """An initiator that asks for 12 MiB and reads none of it leaves its writer waiting
    for room in trio (``_Wire.send_all``: ``wait_writable``), never the event loop:
    another initiator is served meanwhile, and closing the stalled one ends its
    connection."""
    async with served_pool(tmp_path, {"vol": 16 * MiB}) as srv:
        vol = srv.vm.get("vol")
        data = os.urandom(16 * MiB)
        await vol.write(0, data)
        await vol.flush()
        stalled = RawInitiator(srv.host, srv.port, timeout=10)
        try:
            stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            await trio.to_thread.run_sync(stalled.login, srv.iqn(), DEFAULT_KEYS)
            for i in range(12):
                stalled.command(read10(i * MiB // SECTOR, MiB // SECTOR), read=MiB)
            (client,) = srv.server._clients
            with trio.fail_after(10):
                while not client._send_lock.locked():  # noqa: ASYNC110  (polling state)
                    await trio.sleep(0.01)
            await trio.sleep(0.3)
            # The writer still waits for room (the answers are not all taken), in trio.
            # (What it has taken from the queue is no longer counted as queued, so
            # queued_data may be 0 by now: the held lock is what shows it is sending.)
            assert client._send_lock.locked()
            assert await trio.to_thread.run_sync(one_read, srv, 3 * MiB) == \
                data[3 * MiB:4 * MiB]
        finally:
            stalled.close()
        with trio.fail_after(10):
            while client in srv.server._clients:  # noqa: ASYNC110  (a set, not an event)
                await trio.sleep(0.01)
        assert await trio.to_thread.run_sync(one_read, srv, 0) == data[:MiB]


def slow_pipelined_reads(srv: Served, starts: list[int]) -> dict[int, list[P.DataIn]]:
    """``pipelined_reads`` by an initiator with a small receive buffer that takes its
    answers slowly, so that the target's sockets fill and its sends end part way."""
    return pipelined_reads(srv, starts, rcvbuf=32 * 1024, pause=0.002)


async def test_answers_sent_part_way_by_the_read_loop_keep_their_order(
        tmp_path: Path) -> None:
    """The read loop sends a large answer at once (``_Client._send_at_once``); what a full
    socket does not take (``_rest``) goes out before every answer queued after it, by the
    writer: sixteen pipelined 1 MiB reads to a slow initiator come back whole, each PDU
    in order, byte for byte."""
    async with served_pool(tmp_path, {"vol": 16 * MiB}) as srv:
        vol = srv.vm.get("vol")
        data = os.urandom(16 * MiB)
        await vol.write(0, data)
        await vol.flush()
        starts = [(i * 7 % 16) * MiB for i in range(16)]
        got = await trio.to_thread.run_sync(slow_pipelined_reads, srv, starts)
        for start, pdus in zip(starts, got.values(), strict=True):
            assert [p.datasn for p in pdus] == [0, 1, 2, 3]
            assert [p.offset for p in pdus] == [0, 1 << 18, 2 << 18, 3 << 18]
            assert b"".join(bytes(p.data) for p in pdus) == data[start:start + MiB]
