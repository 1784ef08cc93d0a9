"""READ's Data-In as a view of the block (iscsi/scsi.py ``_ReadPlan.quick``, through
``Volume.read_vectored_nowait(view=True)``): the 4 KiB slice is not copied out of a pool
block or out of a buffered block that is a view of immutable bytes, and what is queued for
the initiator is still what it receives after a write to the same block runs before the
send (pool/reader.py invariant 5: nothing writes a buffer a view of which is alive; DESIGN
invariant 3: a record never changes where it lies). A buffered block a partial write
changes in place (a bytearray) is copied.

The session core and a real volume in a pool of files, no sockets (the server sends the
queued pieces as they are, iscsi/server.py ``_views``): the initiator's side is the PDU
reader decoding the bytes the target would send."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import trio

from iscsi import cdb as C
from iscsi import pdu as P
from iscsi.pdu import Payload
from iscsi.server import SharedExclusive
from iscsi.session import Connection, Execute, LoggedIn
from iscsi.targets import TargetCatalog
from pool import FileDevice, Pool
from volumes import Volume, VolumeManager

MiB = 1 << 20
BASE = "iqn.2026-11.org.storaged"
TARGET = f"{BASE}:p:v"
BS = 4096


def command(itt: int, cmdsn: int, *, lba: int, write: bytes = b"") -> bytes:
    op = C.WRITE_10 if write else C.READ_10
    cdb = struct.pack(">BBIBHB", op, 0, lba, 0, BS // C.LBA_SIZE, 0) + bytes(6)
    return P.encode(P.ScsiCommand(final=True, read=not write, write=bool(write), itt=itt,
                                  edtl=BS, cmdsn=cmdsn, cdb16=cdb, data=write))


def login(conn: Connection) -> None:
    pairs = [("InitiatorName", "iqn.2026-11.x:i"), ("TargetName", TARGET),
             ("SessionType", "Normal"), ("MaxRecvDataSegmentLength", "262144"),
             ("InitialR2T", "No"), ("ImmediateData", "Yes")]
    conn.receive_data(P.encode(P.LoginRequest(
        transit=True, csg=1, nsg=3, isid=b"\x80\0\0\0\0\1", itt=1, cmdsn=1,
        data=P.format_text(pairs))))
    assert isinstance(conn.next_event(), LoggedIn)
    conn.pieces_to_send()


def received(pieces: list[P.Payload]) -> dict[int, bytes]:
    """What the initiator decodes from the bytes sent: Data-In data by ITT (each with its
    GOOD status in the same PDU)."""
    reader = P.PDUReader(opcodes=P.TARGET_OPCODES, max_data=1 << 20)
    reader.receive_data(b"".join(pieces))
    got: dict[int, bytes] = {}
    while (p := reader.next_pdu()) is not None:
        if isinstance(p, P.DataIn):
            assert p.has_status and p.status == C.GOOD
            got[p.itt] = bytes(p.data)
    return got


async def setup(where: Path) -> tuple[Pool, Volume, Connection]:
    devs = [FileDevice(str(where / f"d{i}"), create_size=256 * MiB) for i in range(2)]
    pool = await Pool.create("p", devs, profile="plain", extent_size=4 * MiB)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 4 * MiB, compression=False)
    cat = TargetCatalog({"p": vm}, SharedExclusive, base_iqn=BASE)
    conn = Connection(cat, new_tsih=lambda: 1, unit=cat.unit, portal="127.0.0.1:3260")
    login(conn)
    return pool, vol, conn


def read_then_write(conn: Connection, new: bytes) -> Payload:
    """The initiator pipelines a READ of block 0's second 4 KiB (ITT 10) and a WRITE of
    it: both run, as the server's read loop runs them, before anything is sent. The
    READ's queued data piece."""
    cmdsn = conn.exp_cmdsn
    conn.receive_data(command(10, cmdsn, lba=8) + command(11, cmdsn + 1, lba=8, write=new))
    queued: Payload = b""
    for _ in range(2):
        ev = conn.next_event()
        assert type(ev) is Execute and ev.task.plan is not None
        quick = ev.task.plan.quick
        assert quick is not None
        result = quick(ev.task.payload())
        assert result is not None                # both answered at once
        if ev.task.itt == 10:
            (queued,) = result.parts
        conn.complete(ev.task, result)
    return queued


def test_a_write_after_the_read_is_queued_does_not_change_the_bytes_sent(
        tmp_path: Path) -> None:
    async def main() -> None:
        pool, vol, conn = await setup(tmp_path)
        try:
            old = os.urandom(vol.block_size)
            await vol.write(0, old)
            await vol.flush()
            assert await vol.read(0, vol.block_size) == old   # (now in the pool, cached)
            new = os.urandom(BS)
            piece = read_then_write(conn, new)
            # The path under test: a read-only view of the whole record read from the
            # pool (nothing copied).
            assert isinstance(piece, memoryview) and piece.readonly
            assert len(piece.obj) >= vol.block_size         # type: ignore[arg-type]
            # The write reaches the pool (a new record) and its block is read back into
            # the record cache, all before the queued answers go out.
            await vol.flush()
            assert await vol.read(BS, BS) == new
            got = received(conn.pieces_to_send())
            assert got[10] == old[BS:2 * BS]                 # the bytes read, as read
            assert await vol.read(0, 2 * BS) == old[:BS] + new
        finally:
            await pool.close()
    trio.run(main)


def test_a_buffered_block_is_sent_as_a_view_of_its_bytes_or_else_copied(
        tmp_path: Path) -> None:
    async def main() -> None:
        pool, vol, conn = await setup(tmp_path)
        try:
            # A full-block write of bytes: buffered as a view of them (immutable).
            old = os.urandom(vol.block_size)
            await vol.write(0, old)
            new = os.urandom(BS)
            piece = read_then_write(conn, new)
            assert isinstance(piece, memoryview) and type(piece.obj) is bytes
            got = received(conn.pieces_to_send())
            assert got[10] == old[BS:2 * BS]
            # Now block 0 is a bytearray in the buffer (the partial write made it one):
            # the next read copies, and the next partial write, changing that bytearray
            # in place, does not change what was queued.
            newer = os.urandom(BS)
            piece = read_then_write(conn, newer)
            assert not isinstance(piece, memoryview)
            await vol.write(BS, os.urandom(BS))             # (once more, in place)
            got = received(conn.pieces_to_send())
            assert got[10] == new
            await vol.write(BS, newer)
            await vol.flush()
            assert await vol.read(0, 2 * BS) == old[:BS] + newer
        finally:
            await pool.close()
    trio.run(main)
