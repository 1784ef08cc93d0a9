"""The pure SCSI decoder (iscsi/cdb.py) fed CDB bytes, without sockets or a volume: what it
decodes, and for every refusal the exact sense bytes (cdb invariants 1-3)."""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from iscsi import cdb as C
from iscsi.reservations import Reservations
from volumes import Capabilities

BLOCKS = 2048                      # 1 MiB of 512-byte blocks
Make = Callable[[int, int], bytes]


@dataclass
class Unit:
    """The state decoding reads (``cdb.UnitState``), as plain values."""

    blocks: int = BLOCKS
    read_only: bool = False
    granularity: int = 8
    d_sense: bool = False
    serial: str = "0123456789abcdef"
    target_name: str = "iqn.2026-11.org.storaged:tank:vol"
    target_port: int = 1
    naa: bytes = bytes(16)
    reservations: Reservations = field(default_factory=Reservations)

    @property
    def caps(self) -> Capabilities:
        """A volume's capabilities with this unit's read-only flag and granularity."""
        bs = self.granularity * C.LBA_SIZE
        return Capabilities(
            read_only=self.read_only, volatile_cache=True, can_flush=True, can_fua=True,
            can_trim=not self.read_only, can_zero=not self.read_only,
            can_fast_zero=not self.read_only, can_cache=True, can_extents=True,
            can_multi_conn=True, thin=True, zeroes_unmapped=True, rotational=False,
            minimum_block=1, preferred_block=bs, maximum_block=None, unmap_granularity=bs)


def read10(lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", C.READ_10, flags, lba, 0, count, 0)


def write10(lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", C.WRITE_10, flags, lba, 0, count, 0)


def read16(lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", C.READ_16, flags, lba, count, 0, 0)


def write16(lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", C.WRITE_16, flags, lba, count, 0, 0)


def refused(got: object, sense: C.Sense, field_pointer: int | None = None) -> bytes:
    """Assert ``got`` is CHECK CONDITION with ``sense`` (and the field pointer); return
    the fixed-format sense bytes for further checks."""
    assert isinstance(got, C.Result), got
    assert got.status == C.CHECK_CONDITION
    assert got.sense is not None
    assert (got.sense.key, got.sense.asc, got.sense.ascq) == (sense.key, sense.asc,
                                                              sense.ascq)
    assert got.sense.field_pointer == field_pointer
    return got.sense.fixed()


def decode(cdb: bytes, unit: Unit | None = None) -> C.Op | C.Result:
    unit = unit or Unit()
    before = copy.deepcopy(unit)
    got = C.decode(unit, cdb)
    assert unit == before                 # cdb invariant 1: decoding changes nothing
    return got


# ---- READ / WRITE (10) and (16): bounds -------------------------------------------------
@pytest.mark.parametrize("make", [read10, read16])
def test_read_within_bounds_decodes_lba_and_count(make: Make) -> None:
    assert decode(make(0, 8)) == C.Read(0, 8)
    got = decode(make(BLOCKS - 8, 8))            # ends exactly on the last block
    assert got == C.Read(BLOCKS - 8, 8)
    assert isinstance(got, C.Read) and got.data_out == 0
    assert decode(make(BLOCKS, 0)) == C.Read(BLOCKS, 0)     # empty, at the end: allowed


@pytest.mark.parametrize("make", [read10, read16, write10, write16])
def test_one_block_past_the_end_is_lba_out_of_range(make: Make) -> None:
    sense = refused(decode(make(BLOCKS - 7, 8)), C.LBA_OUT_OF_RANGE)
    assert sense[2] == C.ILLEGAL_REQUEST and sense[12:14] == b"\x21\x00"
    refused(decode(make(BLOCKS, 1)), C.LBA_OUT_OF_RANGE)


def test_largest_sixteen_byte_lba_does_not_wrap_around() -> None:
    # (lba + count is computed without 64-bit overflow: the last LBA plus 2 is past the
    # end, not block 1.)
    refused(decode(read16((1 << 64) - 1, 2)), C.LBA_OUT_OF_RANGE)
    refused(decode(write16((1 << 64) - 1, 1)), C.LBA_OUT_OF_RANGE)


@pytest.mark.parametrize("make", [read10, read16, write10, write16])
def test_transfer_over_the_limit_points_at_the_length_field(make: Make) -> None:
    refused(decode(make(0, C.MAX_TRANSFER_BLOCKS + 1), Unit(blocks=1 << 20)),
            C.INVALID_FIELD_IN_CDB, 7)


def test_write_decodes_fua_and_its_data_out() -> None:
    got = decode(write16(16, 4, flags=0x08))
    assert got == C.Write("WRITE", 16, 4, True)
    assert isinstance(got, C.Write) and got.data_out == 4 * C.LBA_SIZE
    assert decode(write10(16, 4)) == C.Write("WRITE", 16, 4, False)


def test_protection_information_is_refused_with_the_flags_byte() -> None:
    refused(decode(read10(0, 1, flags=0x20)), C.INVALID_FIELD_IN_CDB, 1)
    refused(decode(write16(0, 1, flags=0x20)), C.INVALID_FIELD_IN_CDB, 1)


def test_write_to_a_read_only_unit_is_data_protect() -> None:
    sense = refused(decode(write10(0, 1), Unit(read_only=True)), C.WRITE_PROTECTED)
    assert sense[2] == C.DATA_PROTECT and sense[12:14] == b"\x27\x00"
    assert decode(read10(0, 1), Unit(read_only=True)) == C.Read(0, 1)


# ---- UNMAP: the CDB and the parameter list ---------------------------------------------
def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB5xHB", C.UNMAP, 0x01 if anchor else 0, length, 0)


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def test_unmap_cdb_decodes_the_parameter_list_length() -> None:
    got = decode(unmap_cdb(40))
    assert got == C.Unmap(40) and isinstance(got, C.Unmap) and got.data_out == 40
    refused(decode(unmap_cdb(40, anchor=True)), C.INVALID_FIELD_IN_CDB, 1)
    refused(decode(unmap_cdb(40), Unit(read_only=True)), C.WRITE_PROTECTED)


def test_unmap_parameter_list_gives_exact_ranges() -> None:
    data = unmap_list((0, 8), (100, 0), (BLOCKS - 16, 16))
    assert C.unmap_ranges(data, len(data), BLOCKS) == [(0, 8), (100, 0), (BLOCKS - 16, 16)]
    # A trailing partial descriptor is ignored; an empty list unmaps nothing.
    assert C.unmap_ranges(data + bytes(10), len(data) + 10, BLOCKS) == [
        (0, 8), (100, 0), (BLOCKS - 16, 16)]
    assert C.unmap_ranges(b"", 0, BLOCKS) == []


def test_unmap_parameter_list_refusals() -> None:
    refused(C.unmap_ranges(bytes(4), 4, BLOCKS), C.PARAMETER_LIST_LENGTH)
    past = unmap_list((0, 8), (BLOCKS - 15, 16))
    refused(C.unmap_ranges(past, len(past), BLOCKS), C.LBA_OUT_OF_RANGE)
    many = unmap_list(*[(i, 1) for i in range(C.MAX_UNMAP_DESCRIPTORS + 1)])
    refused(C.unmap_ranges(many, len(many), BLOCKS), C.INVALID_FIELD_IN_PARAMETERS)
    big = 4 * C.MAX_UNMAP_BLOCKS
    too_much = unmap_list((0, C.MAX_UNMAP_BLOCKS), (C.MAX_UNMAP_BLOCKS, 1))
    refused(C.unmap_ranges(too_much, len(too_much), big), C.INVALID_FIELD_IN_PARAMETERS)
    exactly = unmap_list((0, C.MAX_UNMAP_BLOCKS - 1), (C.MAX_UNMAP_BLOCKS, 1))
    assert C.unmap_ranges(exactly, len(exactly), big) == [
        (0, C.MAX_UNMAP_BLOCKS - 1), (C.MAX_UNMAP_BLOCKS, 1)]


# ---- what is not a command we know -----------------------------------------------------
def test_invalid_opcode_is_illegal_request_pointing_at_byte_0() -> None:
    sense = refused(decode(bytes([0x02, 0, 0, 0, 0, 0])), C.INVALID_OPCODE, 0)
    assert sense == bytes([0x70, 0, C.ILLEGAL_REQUEST, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0,
                           0, 0xC0, 0, 0])
    refused(decode(b""), C.INVALID_OPCODE)


def test_short_cdb_and_naca_are_invalid_fields() -> None:
    refused(decode(read10(0, 1)[:9]), C.INVALID_FIELD_IN_CDB)
    naca = read10(0, 1)[:9] + b"\x04"
    refused(decode(naca), C.INVALID_FIELD_IN_CDB, 9)


# ---- answers from the unit's state alone -----------------------------------------------
def test_read_capacity_and_mode_select_of_d_sense() -> None:
    got = decode(bytes([C.READ_CAPACITY_10]) + bytes(9))
    assert isinstance(got, C.Answer)
    assert got.result.data == struct.pack(">II", BLOCKS - 1, C.LBA_SIZE)
    # MODE SELECT(6) of the control page: D_SENSE may change, nothing else.
    op = decode(bytes([C.MODE_SELECT_6, 0x10, 0, 0, 16, 0]))
    assert op == C.ModeSelect(True, 16)
    assert isinstance(op, C.ModeSelect)
    control = bytearray(C.mode_pages(0, False)[0x0A])
    control[2] |= 0x04
    assert C.mode_select(op, bytes(4) + bytes(control), False) is True
    control[3] ^= 0x10                                    # QAM is not changeable
    refused(C.mode_select(op, bytes(4) + bytes(control), False),
            C.INVALID_FIELD_IN_PARAMETERS)
