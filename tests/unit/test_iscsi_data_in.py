"""A large READ's Data-In (iscsi/session.py ``_segments``, iscsi/pdu.py
``data_in_gathered``): each Data-In PDU is as long as the initiator's
MaxRecvDataSegmentLength and the burst allow, gathering several of the volume's blocks
(views, no copy) behind one header, so a 1 MiB read of 64 KiB blocks to an initiator that
takes 256 KiB segments (libiscsi's default) is four PDUs, not sixteen -- each PDU costs
the initiator a header read and a wake-up. The last carries the GOOD status (S bit, phase
collapse), the others none; every burst ends with F.

The session core and a real volume in a pool of files, no sockets; the initiator's side is
the PDU reader decoding (and, with digests, checking) the bytes the target would send.
Byte-exact read-back of random data (DESIGN invariant 4: what is read is what was
written)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from iscsi import cdb as C
from iscsi import pdu as P
from iscsi.server import SharedExclusive
from iscsi.session import Connection, Execute, LoggedIn
from iscsi.targets import TargetCatalog
from pool import FileDevice, Pool
from volumes import VolumeManager

KiB = 1024
MiB = 1 << 20
BASE = "iqn.2026-11.org.storaged"
TARGET = f"{BASE}:p:v"


def login(conn: Connection, segment: int, burst: int, digest: str) -> None:
    pairs = [("InitiatorName", "iqn.2026-11.x:i"), ("TargetName", TARGET),
             ("SessionType", "Normal"), ("MaxRecvDataSegmentLength", str(segment)),
             ("MaxBurstLength", str(burst)), ("HeaderDigest", digest),
             ("DataDigest", digest), ("InitialR2T", "No"), ("ImmediateData", "Yes")]
    conn.receive_data(P.encode(P.LoginRequest(
        transit=True, csg=1, nsg=3, isid=b"\x80\0\0\0\0\1", itt=1, cmdsn=1,
        data=P.format_text(pairs))))
    assert isinstance(conn.next_event(), LoggedIn)
    conn.pieces_to_send()


def read_command(itt: int, cmdsn: int, lba: int, blocks: int, edtl: int, *,
                 digest: bool) -> bytes:
    cdb = struct.pack(">BBIBHB", C.READ_10, 0, lba, 0, blocks, 0) + bytes(6)
    return P.encode(P.ScsiCommand(final=True, read=True, itt=itt, edtl=edtl, cmdsn=cmdsn,
                                  cdb16=cdb), header_digest=digest)


def decode_all(pieces: list[P.Payload], digest: bool) -> list[P.PDU]:
    reader = P.PDUReader(opcodes=P.TARGET_OPCODES, max_data=16 * MiB)
    reader.header_digest = reader.data_digest = digest     # checked: a bad CRC raises
    reader.receive_data(b"".join(pieces))
    out = []
    while (p := reader.next_pdu()) is not None:
        out.append(p)
    assert not reader.buffered
    return out


async def run_read(conn: Connection, lba: int, blocks: int, edtl: int,
                   digest: bool) -> list[P.PDU]:
    conn.receive_data(read_command(5, conn.exp_cmdsn, lba, blocks, edtl, digest=digest))
    ev = conn.next_event()
    assert type(ev) is Execute and ev.task.plan is not None
    result = await ev.task.plan.run(ev.task.payload())
    conn.complete(ev.task, result)
    return decode_all(conn.pieces_to_send(), digest)


@pytest.mark.parametrize(("segment", "burst", "digest", "sizes"), [
    # libiscsi's offer (qemu): 256 KiB segments and bursts: four PDUs for 1 MiB.
    (256 * KiB, 256 * KiB, "None", [256 * KiB] * 4),
    # A segment that is not a multiple of the 64 KiB block (parts split into views),
    # with digests over the gathered buffers.
    (100 * KiB, 1 * MiB, "CRC32C", [100 * KiB] * 10 + [24 * KiB]),
    # Bursts shorter than a segment: F at every 192 KiB, segments never cross one.
    (256 * KiB, 192 * KiB, "None", [192 * KiB] * 5 + [64 * KiB]),
])
def test_a_1m_read_is_sent_in_the_fewest_data_in_pdus(
        tmp_path: Path, segment: int, burst: int, digest: str, sizes: list[int]) -> None:
    async def main() -> None:
        devs = [FileDevice(str(tmp_path / f"d{i}"), create_size=256 * MiB)
                for i in range(2)]
        pool = await Pool.create("p", devs, profile="plain", extent_size=4 * MiB)
        try:
            vm = VolumeManager(pool)
            vol = await vm.create("v", 4 * MiB, compression=False)
            assert vol.block_size == 64 * KiB
            data = os.urandom(2 * MiB)
            await vol.write(0, data)
            await vol.flush()
            cat = TargetCatalog({"p": vm}, SharedExclusive, base_iqn=BASE)
            conn = Connection(cat, new_tsih=lambda: 1, unit=cat.unit,
                              portal="127.0.0.1:3260")
            login(conn, segment, burst, digest)
            start = 512 * KiB + 4 * KiB       # not block-aligned: views at both ends
            lba = start // C.LBA_SIZE
            pdus = await run_read(conn, lba, MiB // C.LBA_SIZE, MiB, digest == "CRC32C")
            assert all(isinstance(p, P.DataIn) for p in pdus)
            assert [len(p.data) for p in pdus] == sizes
            got = bytearray()
            for sn, p in enumerate(pdus):
                assert isinstance(p, P.DataIn)
                last = sn == len(pdus) - 1
                assert p.itt == 5 and p.datasn == sn and p.offset == len(got)
                assert p.final == (last or (p.offset + len(p.data)) % burst == 0)
                assert p.has_status == last and p.status == C.GOOD
                assert not (p.overflow or p.underflow or p.residual)
                got += p.data
            assert bytes(got) == data[start:start + MiB]
            # An EDTL larger than the data: the same PDUs, underflow on the last.
            pdus = await run_read(conn, lba, MiB // C.LBA_SIZE, MiB + 512,
                                  digest == "CRC32C")
            assert [len(p.data) for p in pdus] == sizes
            last_pdu = pdus[-1]
            assert isinstance(last_pdu, P.DataIn) and last_pdu.has_status
            assert last_pdu.underflow and last_pdu.residual == 512
            assert b"".join(bytes(p.data) for p in pdus) == data[start:start + MiB]
        finally:
            await pool.close()
    trio.run(main)


@pytest.mark.parametrize("header_digest", [False, True])
@pytest.mark.parametrize("data_digest", [False, True])
def test_gathered_data_in_is_byte_for_byte_the_encoded_pdu(header_digest: bool,
                                                           data_digest: bool) -> None:
    pieces: list[P.Payload] = [os.urandom(5), memoryview(os.urandom(7000))[3:4003],
                               os.urandom(64 * KiB)]
    joined = b"".join(bytes(p) for p in pieces)
    for flags, status in ((0, 0), (P.DATA_IN_FINAL, 0),
                          (P.DATA_IN_FINAL | P.DATA_IN_STATUS | P.DATA_IN_UNDERFLOW, 2)):
        ref = P.encode(P.DataIn(
            final=bool(flags & P.DATA_IN_FINAL), has_status=bool(flags & P.DATA_IN_STATUS),
            underflow=bool(flags & P.DATA_IN_UNDERFLOW), status=status, lun=3 << 48,
            itt=9, statsn=4, exp_cmdsn=5, max_cmdsn=6, datasn=2, offset=77, residual=8,
            data=joined), header_digest=header_digest, data_digest=data_digest)
        out = P.data_in_gathered(flags, status, 3 << 48, 9, 4, 5, 6, 2, 77, 8, pieces,
                                 len(joined), header_digest=header_digest,
                                 data_digest=data_digest)
        assert b"".join(out) == ref
        assert any(o is pieces[2] for o in out)          # the data is not copied
    with pytest.raises(ValueError):
        P.data_in_gathered(0, 0, 0, 1, 0, 0, 0, 0, 0, 0, [], 0)
