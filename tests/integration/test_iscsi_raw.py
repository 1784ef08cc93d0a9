"""The iSCSI target against raw sockets: bad input gets its RFC 7143 / T10 answer and the
server keeps serving; two initiators at once; an initiator killed in the middle of a
Data-Out sequence leaves the others served and the volume consistent."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from iscsi import pdu as P
from tests.kit.iscsiharness import Served, served_pool
from tests.kit.iscsiraw import DEFAULT_KEYS, RawInitiator, read10, write10

pytestmark = pytest.mark.slow
T = TypeVar("T")
BLOCK = 512


async def blocking(fn: Callable[[], T]) -> T:
    """Run a blocking raw-socket client off the event loop the target runs on."""
    return await trio.to_thread.run_sync(fn)


def session(srv: Served, name: str = "raw", isid: int = 1,
            keys: tuple[tuple[str, str], ...] = DEFAULT_KEYS) -> RawInitiator:
    s = RawInitiator(srv.host, srv.port, initiator=f"iqn.2026-01.org.test:{name}",
                     isid=bytes([0x80, 0, 0, 0, 0, isid]), timeout=5)
    resp = s.login(srv.iqn(), keys)
    assert (resp.status_class, resp.status_detail) == (0, 0)
    return s


def still_serving(srv: Served) -> None:
    with session(srv, "probe", 99) as s:
        assert s.scsi(bytes(6)).status == 0                 # TEST UNIT READY


def bad_input(srv: Served) -> None:
    tur = bytes(6)
    # An opcode initiators do not send (here: R2T's) -> Reject "command not supported";
    # the connection goes on.
    with session(srv) as s:
        s.send(P.R2T(itt=7, ttt=1))
        rej = s.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.REJECT_NOT_SUPPORTED
        assert rej.data[0] & 0x3F == P.OP_R2T
        assert s.scsi(tur).status == 0
    # A data segment longer than our MaxRecvDataSegmentLength (256 KiB) -> Reject
    # "protocol error", and the connection is closed (its framing cannot be trusted).
    with session(srv) as s:
        bhs = bytearray(P.ScsiCommand(write=True, itt=9, edtl=1 << 20, cmdsn=s.cmdsn,
                                      cdb16=write10(0, 2048).ljust(16, b"\0")).bhs())
        bhs[5:8] = (512 * 1024).to_bytes(3, "big")
        s.send_raw(bytes(bhs))
        rej = s.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.REJECT_PROTOCOL_ERROR
        assert s.closed()
    # Digests on: a bad data digest on immediate data -> Reject "data digest error",
    # nothing written, the connection goes on; a bad header digest closes it.
    digests = (("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"),
               ("ImmediateData", "Yes"), ("InitialR2T", "No"), *DEFAULT_KEYS[4:])
    with session(srv, keys=digests) as s:
        assert s.header_digest and s.data_digest
        cmd = P.ScsiCommand(write=True, itt=11, edtl=BLOCK, cmdsn=s.cmdsn,
                            exp_statsn=s.exp_statsn, cdb16=write10(5, 1).ljust(16, b"\0"),
                            data=b"\xee" * BLOCK)
        wire = bytearray(P.encode(cmd, header_digest=True, data_digest=True))
        wire[-1] ^= 0xFF
        s.send_raw(bytes(wire))
        rej = s.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.REJECT_DATA_DIGEST
        assert s.scsi(read10(5, 1), read=BLOCK).data == bytes(BLOCK)
        wire = bytearray(P.encode(P.NopOut(itt=12, cmdsn=s.cmdsn), header_digest=True))
        wire[P.BHS_LEN] ^= 0xFF
        s.send_raw(bytes(wire))
        assert s.closed()
    # A CmdSN outside the window is ignored (RFC 7143 §4.2.2.1): no answer, nothing run;
    # the next command in sequence is answered.
    with session(srv) as s:
        s.command(write10(6, 1), data_out=b"\x11" * BLOCK, cmdsn=s.cmdsn + 5000)
        reply = s.scsi(tur)
        assert reply.status == 0
        assert s.scsi(read10(6, 1), read=BLOCK).data == bytes(BLOCK)
    # A Login Request in the full feature phase -> Reject "protocol error"; goes on.
    with session(srv) as s:
        s.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=s.isid, itt=20,
                              cmdsn=s.cmdsn, data=P.format_text([("InitiatorName", "x")])))
        rej = s.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.REJECT_PROTOCOL_ERROR
        assert s.scsi(tur).status == 0
    # A transfer larger than the block limits (VPD B0: 8192 blocks) -> CHECK CONDITION,
    # ILLEGAL REQUEST / INVALID FIELD IN CDB; no data moves.
    with session(srv) as s:
        big = s.scsi(read10(0, 8193), read=8193 * BLOCK)
        assert big.status == 2 and big.sense_key == (0x5, 0x24, 0x00) and not big.data
        big = s.scsi(write10(0, 8193), data_out=bytes(8193 * BLOCK))
        assert big.status == 2 and big.sense_key == (0x5, 0x24, 0x00)
    still_serving(srv)


async def test_bad_input_gets_its_answer_and_the_server_stays_up(tmp_path: Path) -> None:
    async with served_pool(tmp_path / "pool", {"vol": 16 << 20},
                           device_size=256 << 20) as srv:
        await blocking(lambda: bad_input(srv))
        assert srv.server.stats.protocol_errors >= 5


def writer(srv: Served, name: str, isid: int, first_block: int, pattern: bytes,
           rounds: int) -> None:
    """One initiator writing its own region in 64 KiB commands, then reading it back."""
    with session(srv, name, isid) as s:
        chunk = pattern * (65536 // len(pattern))
        for r in range(rounds):
            lba = first_block + (r % 16) * 128
            assert s.scsi(write10(lba, 128), data_out=chunk).status == 0
        for r in range(16):
            lba = first_block + r * 128
            assert s.scsi(read10(lba, 128), read=65536).data == chunk


def killed_mid_data_out(srv: Served) -> None:
    """Start a 1 MiB WRITE, send part of the solicited data, and vanish (RST)."""
    s = session(srv, "victim", 7)
    cmd = s.command(write10(8192, 2048), data_out=b"\x77" * (1 << 20))
    r2t = s.recv()
    assert isinstance(r2t, P.R2T) and r2t.itt == cmd.itt
    # One valid PDU (the target takes at most 256 KiB a PDU: a larger one is a protocol
    # error it drops the connection for, which could beat this send to it).
    part = min(r2t.length // 2, 256 << 10)
    s.send(P.DataOut(itt=cmd.itt, ttt=r2t.ttt, offset=r2t.offset, data=b"\x77" * part))
    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


async def test_two_initiators_and_one_killed_mid_data_out(tmp_path: Path) -> None:
    async with served_pool(tmp_path / "pool", {"vol": 16 << 20},
                           device_size=256 << 20) as srv:
        before = os.urandom(BLOCK) * 2048
        await blocking(lambda: _fill(srv, 8192, before))
        async with trio.open_nursery() as n:
            n.start_soon(blocking, lambda: writer(srv, "one", 1, 0, b"\x01\x02", 64))
            n.start_soon(blocking, lambda: writer(srv, "two", 2, 4096, b"\x03\x04", 64))
            n.start_soon(blocking, lambda: killed_mid_data_out(srv))
        # The killed initiator's WRITE never ran: its blocks hold what they held.
        await blocking(lambda: _check(srv, 8192, before))
        await blocking(lambda: still_serving(srv))
        with trio.fail_after(10):
            while srv.server.stats.sessions:   # noqa: ASYNC110 (polling a counter)
                await trio.sleep(0.05)


def _fill(srv: Served, lba: int, data: bytes) -> None:
    with session(srv, "filler", 5) as s:
        assert s.scsi(write10(lba, len(data) // BLOCK), data_out=data).status == 0


def _check(srv: Served, lba: int, data: bytes) -> None:
    with session(srv, "checker", 6) as s:
        assert s.scsi(read10(lba, len(data) // BLOCK), read=len(data)).data == data


def laggard(srv: Served, done: threading.Event) -> None:
    """Queue 32 MiB of READ answers and never read one, until ``done``."""
    s = session(srv, "laggard", 3)
    try:
        for _ in range(32):
            s.command(read10(0, 2048), read=1 << 20)
        assert done.wait(60), "the other initiator was not served"
    finally:
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


async def test_an_initiator_that_never_reads_holds_up_only_itself(tmp_path: Path) -> None:
    """Answers the initiator does not take in fill the socket, then the target stops
    reading its commands (backpressure); the other sessions are served all the while, and
    the laggard's reset ends only its own connection."""
    async with served_pool(tmp_path / "pool", {"vol": 16 << 20},
                           device_size=256 << 20) as srv:
        await blocking(lambda: _fill(srv, 0, os.urandom(1 << 20)))
        done = threading.Event()
        async with trio.open_nursery() as n:
            n.start_soon(blocking, lambda: laggard(srv, done))
            while not srv.server.stats.commands.get("READ"):  # noqa: ASYNC110
                await trio.sleep(0.02)          # (the laggard's reads are being answered)
            try:
                await blocking(lambda: writer(srv, "one", 1, 4096, b"\x05\x06", 64))
            finally:
                done.set()
        await blocking(lambda: still_serving(srv))


async def test_connection_limit_and_login_timeout(tmp_path: Path) -> None:
    """iscsi/server: with max_connections = 2, a third connection is closed at once; a
    connection that never logs in is closed after login_timeout; a logged-in session is
    kept, and a new one is served once there is room."""
    async with served_pool(tmp_path / "pool", {"vol": 16 << 20}, device_size=256 << 20,
                           max_connections=2, login_timeout=1.0) as srv:
        def scenario() -> None:
            with session(srv, "kept", 1) as kept, \
                    socket.create_connection((srv.host, srv.port), timeout=10) as mute:
                with socket.create_connection((srv.host, srv.port), timeout=10) as extra:
                    assert extra.recv(1) == b""                 # closed at once
                start = time.monotonic()
                assert mute.recv(1) == b""                      # closed: never logged in
                assert 0.9 <= time.monotonic() - start < 5
                assert kept.scsi(bytes(6)).status == 0          # TEST UNIT READY
            still_serving(srv)
        await blocking(scenario)
        assert srv.server.stats.refused == 1 and srv.server.stats.login_timeouts == 1
