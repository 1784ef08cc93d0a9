"""The short way of READ and WRITE (10)/(16) through decoding (iscsi/cdb.py ``decode_rw``,
taken by iscsi/scsi.py ``LogicalUnit.plan`` before ``decode``): it accepts only what
``decode`` accepts, with the same fields, and leaves every refusal to ``decode`` (cdb
invariants 1-3: the exact sense of a refusal), so a unit plans every CDB as before. Then
on a real volume: what WRITE (16) and WRITE (10) plans write, READ (16) and READ (10)
plans read back byte for byte at the LBAs asked for."""

from __future__ import annotations

import copy
import os
import random
import struct
from pathlib import Path

import trio

from iscsi import cdb as C
from iscsi.reservations import Nexus
from iscsi.scsi import LogicalUnit
from iscsi.server import SharedExclusive
from pool import FileDevice, Pool
from tests.unit.test_iscsi_cdb import BLOCKS, Unit
from volumes import VolumeManager

MiB = 1 << 20
OPS = (C.READ_10, C.READ_16, C.WRITE_10, C.WRITE_16)


def random_cdb(rng: random.Random) -> bytes:
    """A READ/WRITE (10)/(16) near the unit's end and the transfer limit, with random
    flags and control bytes (protection fields, FUA, NACA), sometimes cut short."""
    op = rng.choice(OPS)
    lba = rng.choice([0, 1, BLOCKS - 8, BLOCKS - 1, BLOCKS, rng.randrange(BLOCKS),
                      (1 << 32) - 1])
    count = rng.choice([0, 1, 8, 256, C.MAX_TRANSFER_BLOCKS, C.MAX_TRANSFER_BLOCKS + 1,
                        rng.randrange(1 << 16)])
    flags = rng.choice([0, 0x08, 0x10, 0x20, 0x40, 0x80, 0x02, rng.randrange(256)])
    control = rng.choice([0, 0, 0x04, rng.randrange(256)])
    if op in (C.READ_10, C.WRITE_10):
        cdb = struct.pack(">BBIBHB", op, flags, lba, 0, count & 0xFFFF, control)
    else:
        cdb = struct.pack(">BBQIBB", op, flags, lba, count, 0, control)
    if rng.random() < 0.05:
        cdb = cdb[:rng.randrange(1, len(cdb))]
    return cdb


def test_the_short_way_accepts_only_what_decode_accepts_with_the_same_fields() -> None:
    rng = random.Random(27)
    reserved = Unit()
    nexus = Nexus("iqn.2026-11.x:a", bytes(6))
    reserved.reservations.prout(nexus, 0, 0, 0, bytes(8) + (1).to_bytes(8, "big")
                                + bytes(8))                          # REGISTER key 1
    reserved.reservations.prout(nexus, 1, 0, 1, (1).to_bytes(8, "big") + bytes(16))
    assert reserved.reservations.reserved
    units = [Unit(), Unit(read_only=True), reserved]
    taken = 0
    for _ in range(20_000):
        unit = rng.choice(units)
        cdb = random_cdb(rng)
        before = copy.deepcopy(unit)
        fast = C.decode_rw(unit, cdb)
        assert unit == before                              # (cdb invariant 1)
        slow = C.decode(unit, cdb, nexus)
        if unit is not reserved:
            # Without a reservation the short way takes exactly what decode accepts.
            assert (fast is None) == isinstance(slow, C.Result), (cdb.hex(), slow)
        if fast is None:
            continue             # (decode answers: a refusal, or a unit with a reservation)
        taken += 1
        write, lba, count, fua = fast
        assert unit is not reserved
        if write:
            assert slow == C.Write("WRITE", lba, count, fua), cdb.hex()
        else:
            assert slow == C.Read(lba, count), cdb.hex()
    assert taken > 500                    # (the generator does reach the short way)


def test_plans_read_back_what_plans_wrote_at_the_lbas_of_each_cdb_size(
        tmp_path: Path) -> None:
    async def main() -> None:
        devs = [FileDevice(str(tmp_path / f"d{i}"), create_size=256 * MiB) for i in range(2)]
        pool = await Pool.create("p", devs, profile="plain", extent_size=4 * MiB)
        blocks = 4 * MiB // C.LBA_SIZE
        vol = await VolumeManager(pool).create("v", blocks * C.LBA_SIZE)
        unit = LogicalUnit(vol, SharedExclusive(), "serial", "iqn.2026-11.x:p:v")
        try:
            image = bytearray(blocks * C.LBA_SIZE)
            for i, (op, lba, count, flags) in enumerate([
                    (C.WRITE_16, blocks - 24, 24, 0x08), (C.WRITE_10, 3, 17, 0),
                    (C.WRITE_16, 4096 + 5, 8, 0), (C.WRITE_10, 4096, 7, 0x08)]):
                data = os.urandom(count * C.LBA_SIZE)
                cdb = (struct.pack(">BBIBHB", op, flags, lba, 0, count, 0)
                       if op == C.WRITE_10 else
                       struct.pack(">BBQIBB", op, flags, lba, count, 0, 0))
                plan = unit.plan(cdb)
                assert isinstance(plan, C.Plan) and plan.write, (i, plan)
                assert plan.data_out == len(data)
                # FUA goes the awaited way (durable when answered); the others may be
                # taken at once.
                quick = plan.quick(data) if plan.quick is not None else None
                if flags & 0x08:
                    assert quick is None
                got = quick if quick is not None else await plan.run(data)
                assert got.status == C.GOOD
                image[lba * C.LBA_SIZE:(lba + count) * C.LBA_SIZE] = data
            await vol.flush()
            for op, lba, count in [(C.READ_16, blocks - 24, 24), (C.READ_10, 0, 64),
                                   (C.READ_16, 4090, 24), (C.READ_10, 4097, 1),
                                   (C.READ_16, blocks - 1, 1)]:
                cdb = (struct.pack(">BBIBHB", op, 0, lba, 0, count, 0) if op == C.READ_10
                       else struct.pack(">BBQIBB", op, 0, lba, count, 0, 0))
                plan = unit.plan(cdb)
                assert isinstance(plan, C.Plan) and not plan.write
                want = bytes(image[lba * C.LBA_SIZE:(lba + count) * C.LBA_SIZE])
                result = await plan.run(b"")
                assert b"".join(result.parts) == want, (op, lba, count)
                quick = plan.quick(b"") if plan.quick is not None else None
                if quick is not None:
                    assert b"".join(quick.parts) == want, (op, lba, count)
            # A refusal still comes from decode, with its sense: past the end.
            past = unit.plan(struct.pack(">BBQIBB", C.READ_16, 0, blocks - 1, 2, 0, 0))
            assert isinstance(past, C.Result) and past.sense is not None
            assert (past.sense.asc, past.sense.ascq) == (0x21, 0)
        finally:
            await pool.close()
    trio.run(main)
