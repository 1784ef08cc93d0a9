"""The READ and WRITE plans (iscsi/scsi.py ``_ReadPlan`` / ``_WritePlan``) and the decoding
of their LBA and transfer length (iscsi/cdb.py ``_rw_fields``), on a real volume in a pool
of files: every CDB size decodes to the right fields, and what a plan writes, through
either of its paths, reads back byte for byte through the other (DESIGN invariant 9 for
the refusals: they change nothing)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from iscsi import cdb as C
from iscsi.scsi import LogicalUnit
from iscsi.server import SharedExclusive
from pool import FileDevice, Pool
from volumes import Volume, VolumeManager

MiB = 1 << 20
BLOCKS = 4 * MiB // C.LBA_SIZE


@pytest.mark.parametrize(("cdb", "lba", "count"), [
    (struct.pack(">BBHBB", C.READ_6, 0x1F, 0xFFFF, 0, 0), 0x1FFFFF, 256),  # 0 means 256
    (struct.pack(">BBHBB", C.READ_6, 0xE0 | 0x01, 0x0203, 7, 0), 0x010203, 7),  # (LUN bits)
    (struct.pack(">BBIBHB", C.READ_10, 0, 0xFFFFFFF0, 0, 0xFFFF, 0), 0xFFFFFFF0, 0xFFFF),
    (struct.pack(">BBIIBB", C.READ_12, 0, 0x12345678, 0x0100, 0, 0), 0x12345678, 0x0100),
    (struct.pack(">BBQIBB", C.READ_16, 0, (1 << 64) - 2, 1, 0, 0), (1 << 64) - 2, 1),
])
def test_every_cdb_size_decodes_lba_and_transfer_length(cdb: bytes, lba: int,
                                                         count: int) -> None:
    assert C._rw_fields(cdb) == (lba, count)
    write = bytes([cdb[0] + 2]) + cdb[1:]        # WRITE (6/10/12/16) = READ + 2
    assert C._rw_fields(write) == (lba, count)


def cdb10(op: int, lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, count, 0)


async def unit_on_a_volume(where: Path) -> tuple[Pool, Volume, LogicalUnit]:
    devs = [FileDevice(str(where / f"d{i}"), create_size=256 * MiB) for i in range(2)]
    pool = await Pool.create("p", devs, profile="plain", extent_size=4 * MiB)
    vol = await VolumeManager(pool).create("v", BLOCKS * C.LBA_SIZE)
    return pool, vol, LogicalUnit(vol, SharedExclusive(), "serial", "iqn.2026-11.x:p:v")


def plan(unit: LogicalUnit, cdb: bytes) -> C.Plan:
    got = unit.plan(cdb)
    assert isinstance(got, C.Plan), got
    return got


@pytest.mark.parametrize("op", [C.READ_12, C.WRITE_12])
def test_twelve_byte_reads_and_writes_decode_and_check_range(tmp_path: Path,
                                                             op: int) -> None:
    async def main() -> None:
        pool, _vol, unit = await unit_on_a_volume(tmp_path)
        try:
            got = C.decode(unit, struct.pack(">BBIIBB", op, 0, BLOCKS - 8, 8, 0, 0))
            assert isinstance(got, (C.Read, C.Write))
            assert (got.lba, got.count) == (BLOCKS - 8, 8)
            past = C.decode(unit, struct.pack(">BBIIBB", op, 0, BLOCKS - 7, 8, 0, 0))
            assert isinstance(past, C.Result) and past.sense is not None
            assert (past.sense.asc, past.sense.ascq) == (0x21, 0)    # LBA out of range
        finally:
            await pool.close()
    trio.run(main)


def test_write_plans_buffer_and_read_plans_read_back_byte_exact(tmp_path: Path) -> None:
    async def main() -> None:
        pool, vol, unit = await unit_on_a_volume(tmp_path)
        try:
            data = os.urandom(64 * 1024)
            w = plan(unit, cdb10(C.WRITE_10, 16, 128))
            assert (w.name, w.data_out, w.write) == ("WRITE", 64 * 1024, True)
            assert w.quick is not None and w.quick(data) is C.OK   # buffered at once
            fua = plan(unit, cdb10(C.WRITE_10, 256, 8, flags=0x08))
            assert fua.quick is not None and fua.quick(data[:4096]) is None  # FUA waits
            assert await fua.run(data[:4096]) is C.OK
            v = plan(unit, cdb10(C.WRITE_VERIFY_10, 512, 8))
            assert (v.name, v.write) == ("WRITE_AND_VERIFY", True)
            assert await v.run(data[4096:8192]) is C.OK

            r = plan(unit, cdb10(C.READ_10, 16, 128))
            assert (r.name, r.data_out, r.write) == ("READ", 0, False)
            assert r.quick is not None
            got = r.quick(b"")
            assert got is not None and got.status == C.GOOD
            assert b"".join(got.parts) == data
            slow = await r.run(b"")
            assert slow.status == C.GOOD and b"".join(slow.parts) == data
            assert await vol.read(256 * C.LBA_SIZE, 4096) == data[:4096]
            assert await vol.read(512 * C.LBA_SIZE, 4096) == data[4096:8192]
            empty = plan(unit, cdb10(C.READ_10, 0, 0))
            assert empty.quick is not None and empty.quick(b"") is C.OK
            assert await empty.run(b"") is C.OK
        finally:
            await pool.close()
    trio.run(main)


def test_a_refused_write_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        pool, vol, unit = await unit_on_a_volume(tmp_path)
        try:
            data = os.urandom(4096)
            assert await plan(unit, cdb10(C.WRITE_10, 0, 8)).run(data) is C.OK
            past = unit.plan(cdb10(C.WRITE_10, BLOCKS - 7, 8))
            assert isinstance(past, C.Result) and past.status == C.CHECK_CONDITION
            protect = unit.plan(cdb10(C.WRITE_10, 0, 8, flags=0x20))   # WRPROTECT
            assert isinstance(protect, C.Result) and protect.status == C.CHECK_CONDITION
            assert await vol.read(0, 4096) == data
            assert await vol.read((BLOCKS - 8) * C.LBA_SIZE, 4096) == bytes(4096)
        finally:
            await pool.close()
    trio.run(main)
