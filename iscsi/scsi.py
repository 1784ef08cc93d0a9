"""The SCSI block device (SPC-4 / SBC-3) on top of the Volume API.

``LogicalUnit.plan(cdb)`` decodes and validates a CDB without touching the volume: it
returns either a finished ``Result`` (a refusal, with its exact sense) or a ``Plan`` that
says how many bytes of Data-Out the command needs and how to run it. ``Plan.run(data)``
awaits Volume calls and returns a ``Result`` (status, Data-In bytes, sense). Every refusal
is CHECK CONDITION with the sense key and ASC/ASCQ of the standard; storage errors are
translated in one place (``sense_for``).

The logical block size on the wire is 512 bytes; the volume's block size is reported as
the physical block size, the optimal transfer granularity and the unmap granularity.
The volume has a volatile write cache (DESIGN §4): WCE=1 in the caching mode page, FUA
writes and SYNCHRONIZE CACHE flush it.

No trio here: atomicity of COMPARE AND WRITE comes from a ``Gate`` the transport provides
(writes hold it shared, COMPARE AND WRITE exclusive).
"""

from __future__ import annotations

import errno
import hashlib
import struct
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Final, Protocol

from iscsi import reservations as pr
from iscsi.reservations import Nexus, Reservations, ReservationStore
from volumes import StorageError, Volume

LBA_SIZE: Final = 512
MAX_TRANSFER_BLOCKS: Final = 8192            # 4 MiB per READ/WRITE
MAX_WRITE_SAME_BLOCKS: Final = 32768         # 16 MiB per WRITE SAME
MAX_UNMAP_BLOCKS: Final = 1 << 20            # 512 MiB per UNMAP
MAX_UNMAP_DESCRIPTORS: Final = 256
MAX_COMPARE_AND_WRITE: Final = 128           # blocks
WRITE_SAME_CHUNK: Final = 1 << 20
VENDOR: Final = b"STORAGED"
PRODUCT: Final = b"VOLUME"
REVISION: Final = b"0001"

# Status codes
GOOD: Final = 0x00
CHECK_CONDITION: Final = 0x02
CONDITION_MET: Final = 0x04
RESERVATION_CONFLICT: Final = 0x18
TASK_ABORTED: Final = 0x40

# Sense keys
NO_SENSE: Final = 0x0
NOT_READY: Final = 0x2
MEDIUM_ERROR: Final = 0x3
HARDWARE_ERROR: Final = 0x4
ILLEGAL_REQUEST: Final = 0x5
UNIT_ATTENTION: Final = 0x6
DATA_PROTECT: Final = 0x7
ABORTED_COMMAND: Final = 0xB
MISCOMPARE: Final = 0xE
SENSE_KEY_NAMES: Final = {
    NO_SENSE: "no_sense", NOT_READY: "not_ready", MEDIUM_ERROR: "medium_error",
    HARDWARE_ERROR: "hardware_error", ILLEGAL_REQUEST: "illegal_request",
    UNIT_ATTENTION: "unit_attention", DATA_PROTECT: "data_protect",
    ABORTED_COMMAND: "aborted_command", MISCOMPARE: "miscompare"}

# Opcodes
TEST_UNIT_READY: Final = 0x00
REQUEST_SENSE: Final = 0x03
READ_6: Final = 0x08
WRITE_6: Final = 0x0A
INQUIRY: Final = 0x12
MODE_SELECT_6: Final = 0x15
MODE_SENSE_6: Final = 0x1A
START_STOP_UNIT: Final = 0x1B
PREVENT_ALLOW: Final = 0x1E
READ_CAPACITY_10: Final = 0x25
READ_10: Final = 0x28
WRITE_10: Final = 0x2A
WRITE_VERIFY_10: Final = 0x2E
VERIFY_10: Final = 0x2F
PRE_FETCH_10: Final = 0x34
SYNCHRONIZE_CACHE_10: Final = 0x35
WRITE_SAME_10: Final = 0x41
UNMAP: Final = 0x42
MODE_SELECT_10: Final = 0x55
PERSISTENT_RESERVE_IN: Final = 0x5E
PERSISTENT_RESERVE_OUT: Final = 0x5F
MODE_SENSE_10: Final = 0x5A
READ_16: Final = 0x88
COMPARE_AND_WRITE: Final = 0x89
WRITE_16: Final = 0x8A
WRITE_VERIFY_16: Final = 0x8E
VERIFY_16: Final = 0x8F
PRE_FETCH_16: Final = 0x90
SYNCHRONIZE_CACHE_16: Final = 0x91
WRITE_SAME_16: Final = 0x93
SERVICE_ACTION_IN_16: Final = 0x9E
REPORT_LUNS: Final = 0xA0
MAINTENANCE_IN: Final = 0xA3
READ_12: Final = 0xA8
WRITE_12: Final = 0xAA
WRITE_VERIFY_12: Final = 0xAE
VERIFY_12: Final = 0xAF
SA_READ_CAPACITY_16: Final = 0x10
SA_GET_LBA_STATUS: Final = 0x12
SA_REPORT_OPCODES: Final = 0x0C
SA_REPORT_TMFS: Final = 0x0D


@dataclass(frozen=True, slots=True)
class Sense:
    key: int
    asc: int
    ascq: int
    information: int | None = None        # e.g. the offset of a miscompare
    field_pointer: int | None = None      # byte of the CDB/parameter list at fault
    in_cdb: bool = True

    def fixed(self) -> bytes:
        """Fixed-format sense data (SPC-4 §4.5.3), 18 bytes."""
        b = bytearray(18)
        b[0] = 0x70 | (0x80 if self.information is not None else 0)
        b[2] = self.key
        if self.information is not None:
            b[3:7] = (self.information & 0xFFFFFFFF).to_bytes(4, "big")
        b[7] = 10
        b[12], b[13] = self.asc, self.ascq
        if self.field_pointer is not None:
            b[15] = 0x80 | (0x40 if self.in_cdb else 0)
            b[16:18] = self.field_pointer.to_bytes(2, "big")
        return bytes(b)


INVALID_OPCODE: Final = Sense(ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE: Final = Sense(ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB: Final = Sense(ILLEGAL_REQUEST, 0x24, 0x00)
INVALID_FIELD_IN_PARAMETERS: Final = Sense(ILLEGAL_REQUEST, 0x26, 0x00)
PARAMETER_LIST_LENGTH: Final = Sense(ILLEGAL_REQUEST, 0x1A, 0x00)
LU_NOT_SUPPORTED: Final = Sense(ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_FIELD_IN_IU: Final = Sense(ILLEGAL_REQUEST, 0x0E, 0x03)
SAVING_NOT_SUPPORTED: Final = Sense(ILLEGAL_REQUEST, 0x39, 0x00)
WRITE_PROTECTED: Final = Sense(DATA_PROTECT, 0x27, 0x00)
SPACE_ALLOCATION_FAILED: Final = Sense(DATA_PROTECT, 0x27, 0x07)
UNRECOVERED_READ_ERROR: Final = Sense(MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR: Final = Sense(MEDIUM_ERROR, 0x0C, 0x00)
NOT_READY_MEDIUM_ABSENT: Final = Sense(NOT_READY, 0x3A, 0x00)
INTERNAL_FAILURE: Final = Sense(HARDWARE_ERROR, 0x44, 0x00)
DATA_PHASE_ERROR: Final = Sense(ABORTED_COMMAND, 0x4B, 0x00)
INVALID_RELEASE: Final = Sense(ILLEGAL_REQUEST, 0x26, 0x04)


@dataclass(slots=True)
class Result:
    """What a command ended with. (Not frozen: one is built per command, and a frozen
    dataclass pays an ``object.__setattr__`` per field. Never changed once built.)"""

    status: int = GOOD
    data: bytes = b""
    sense: Sense | None = None
    # A read's data as the volume's buffers back to back, instead of ``data``: Data-In
    # PDUs carry them as they are, never joined into one copy.
    parts: tuple[bytes | memoryview, ...] = ()

    @property
    def size(self) -> int:
        parts = self.parts
        if not parts:
            return len(self.data)
        return len(parts[0]) if len(parts) == 1 else sum(map(len, parts))


def check(sense: Sense, field_pointer: int | None = None) -> Result:
    if field_pointer is not None:
        sense = Sense(sense.key, sense.asc, sense.ascq, sense.information, field_pointer,
                      sense.in_cdb)
    return Result(CHECK_CONDITION, b"", sense)


OK: Final = Result()


def sense_for(e: StorageError, *, write: bool) -> Sense:
    """The one translation of storage errors into sense data."""
    if e.errno == errno.ENOSPC:
        return SPACE_ALLOCATION_FAILED
    if e.errno == errno.EROFS:
        return WRITE_PROTECTED
    if e.errno == errno.EINVAL:
        return LBA_OUT_OF_RANGE
    if e.errno == errno.ENOENT:
        return NOT_READY_MEDIUM_ABSENT
    if e.errno == errno.EIO:
        return WRITE_ERROR if write else UNRECOVERED_READ_ERROR
    return INTERNAL_FAILURE


class Gate(Protocol):
    """Shared/exclusive access to one logical unit (provided by the transport)."""

    def shared(self) -> AbstractAsyncContextManager[None]: ...

    def exclusive(self) -> AbstractAsyncContextManager[None]: ...

    def free(self) -> bool:
        """No exclusive holder and none waiting: a command completed at once, without an
        await, needs no share of the gate."""
        ...


@dataclass(slots=True)
class Plan:
    """A validated command: ``data_out`` bytes to collect, then ``run(data)``. (Not
    frozen, as Result.)"""

    name: str
    data_out: int
    run: Callable[[bytes], Awaitable[Result]]
    write: bool = False          # changes the volume (held shared against COMPARE AND WRITE)
    # The result at once, given the Data-Out, when it needs no waiting (a read of buffered
    # or cached blocks, a write the volume buffers at once), else None: the transport then
    # runs ``run`` in a task.
    quick: Callable[[bytes], Result | None] | None = None


class _Refused(Exception):
    def __init__(self, result: Result) -> None:
        self.result = result


def _refuse(sense: Sense, field_pointer: int | None = None) -> _Refused:
    return _Refused(check(sense, field_pointer))


def _alloc(data: bytes, length: int) -> Result:
    return Result(GOOD, data[:length])


@dataclass(frozen=True, slots=True)
class _Command:
    opcode: int
    service_action: int | None
    cdb_len: int
    usage: bytes                   # CDB usage data for REPORT SUPPORTED OPERATION CODES
    name: str


def _usage(opcode: int, *mask: int) -> bytes:
    return bytes([opcode, *mask])


SUPPORTED: Final[tuple[_Command, ...]] = (
    _Command(TEST_UNIT_READY, None, 6, _usage(0, 0, 0, 0, 0, 0x07), "TEST_UNIT_READY"),
    _Command(REQUEST_SENSE, None, 6, _usage(3, 0x01, 0, 0, 0xFF, 0x07), "REQUEST_SENSE"),
    _Command(READ_6, None, 6, _usage(8, 0x1F, 0xFF, 0xFF, 0xFF, 0x07), "READ"),
    _Command(WRITE_6, None, 6, _usage(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07), "WRITE"),
    _Command(INQUIRY, None, 6, _usage(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07), "INQUIRY"),
    _Command(MODE_SELECT_6, None, 6, _usage(0x15, 0x11, 0, 0, 0xFF, 0x07), "MODE_SELECT"),
    _Command(MODE_SENSE_6, None, 6, _usage(0x1A, 0x08, 0xFF, 0, 0xFF, 0x07), "MODE_SENSE"),
    _Command(START_STOP_UNIT, None, 6, _usage(0x1B, 0x01, 0, 0x0F, 0xF7, 0x07),
             "START_STOP_UNIT"),
    _Command(PREVENT_ALLOW, None, 6, _usage(0x1E, 0, 0, 0, 0x03, 0x07), "PREVENT_ALLOW"),
    _Command(READ_CAPACITY_10, None, 10, _usage(0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01,
                                                 0x07), "READ_CAPACITY"),
    _Command(READ_10, None, 10, _usage(0x28, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF,
                                        0x07), "READ"),
    _Command(WRITE_10, None, 10, _usage(0x2A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF,
                                         0xFF, 0x07), "WRITE"),
    _Command(WRITE_VERIFY_10, None, 10, _usage(0x2E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F,
                                                0xFF, 0xFF, 0x07), "WRITE_AND_VERIFY"),
    _Command(VERIFY_10, None, 10, _usage(0x2F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF,
                                          0xFF, 0x07), "VERIFY"),
    _Command(PRE_FETCH_10, None, 10, _usage(0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF,
                                             0xFF, 0x07), "PRE_FETCH"),
    _Command(SYNCHRONIZE_CACHE_10, None, 10, _usage(0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F,
                                                     0xFF, 0xFF, 0x07), "SYNCHRONIZE_CACHE"),
    _Command(WRITE_SAME_10, None, 10, _usage(0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF,
                                              0xFF, 0x07), "WRITE_SAME"),
    _Command(UNMAP, None, 10, _usage(0x42, 0, 0, 0, 0, 0, 0x3F, 0xFF, 0xFF, 0x07), "UNMAP"),
    _Command(MODE_SELECT_10, None, 10, _usage(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07),
             "MODE_SELECT"),
    *(_Command(PERSISTENT_RESERVE_IN, sa, 10,
               _usage(PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07),
               "PERSISTENT_RESERVE_IN") for sa in range(4)),
    *(_Command(PERSISTENT_RESERVE_OUT, sa, 10,
               _usage(PERSISTENT_RESERVE_OUT, sa, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07),
               "PERSISTENT_RESERVE_OUT") for sa in range(7)),
    _Command(MODE_SENSE_10, None, 10, _usage(0x5A, 0x18, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF,
                                              0x07), "MODE_SENSE"),
    _Command(READ_16, None, 16, _usage(0x88, 0x18, *[0xFF] * 12, 0x3F, 0x07), "READ"),
    _Command(COMPARE_AND_WRITE, None, 16, _usage(0x89, 0x18, *[0xFF] * 8, 0, 0, 0, 0xFF,
                                                  0x3F, 0x07), "COMPARE_AND_WRITE"),
    _Command(WRITE_16, None, 16, _usage(0x8A, 0x18, *[0xFF] * 12, 0x3F, 0x07), "WRITE"),
    _Command(WRITE_VERIFY_16, None, 16, _usage(0x8E, 0x12, *[0xFF] * 12, 0x3F, 0x07),
             "WRITE_AND_VERIFY"),
    _Command(VERIFY_16, None, 16, _usage(0x8F, 0x16, *[0xFF] * 12, 0x3F, 0x07), "VERIFY"),
    _Command(PRE_FETCH_16, None, 16, _usage(0x90, 0x02, *[0xFF] * 12, 0x3F, 0x07),
             "PRE_FETCH"),
    _Command(SYNCHRONIZE_CACHE_16, None, 16, _usage(0x91, 0x02, *[0xFF] * 12, 0x3F, 0x07),
             "SYNCHRONIZE_CACHE"),
    _Command(WRITE_SAME_16, None, 16, _usage(0x93, 0x09, *[0xFF] * 12, 0x3F, 0x07),
             "WRITE_SAME"),
    _Command(SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16, 16,
             _usage(0x9E, 0x10, *[0] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07), "READ_CAPACITY"),
    _Command(SERVICE_ACTION_IN_16, SA_GET_LBA_STATUS, 16,
             _usage(0x9E, 0x12, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
             "GET_LBA_STATUS"),
    _Command(REPORT_LUNS, None, 12, _usage(0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
                                            0, 0x07), "REPORT_LUNS"),
    _Command(MAINTENANCE_IN, SA_REPORT_OPCODES, 12,
             _usage(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
             "REPORT_SUPPORTED_OPCODES"),
    _Command(MAINTENANCE_IN, SA_REPORT_TMFS, 12,
             _usage(0xA3, 0x0D, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
             "REPORT_SUPPORTED_TMFS"),
    _Command(READ_12, None, 12, _usage(0xA8, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                                        0xFF, 0x3F, 0x07), "READ"),
    _Command(WRITE_12, None, 12, _usage(0xAA, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                                         0xFF, 0xFF, 0x3F, 0x07), "WRITE"),
    _Command(WRITE_VERIFY_12, None, 12, _usage(0xAE, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                                                0xFF, 0xFF, 0xFF, 0x3F, 0x07),
             "WRITE_AND_VERIFY"),
    _Command(VERIFY_12, None, 12, _usage(0xAF, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                                          0xFF, 0xFF, 0x3F, 0x07), "VERIFY"),
)
_BY_OPCODE: Final = {(c.opcode, c.service_action): c for c in SUPPORTED}
_CDB_LEN: Final = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}     # by opcode group


_WITH_SA: Final = frozenset((SERVICE_ACTION_IN_16, MAINTENANCE_IN, PERSISTENT_RESERVE_IN,
                             PERSISTENT_RESERVE_OUT))
# Commands by what persistent reservations do to them (SPC-4 table 62, SBC-3 table 13):
# ALWAYS never conflicts, READS conflict only under Exclusive Access types, and every
# other command (writes, UNMAP, SYNCHRONIZE CACHE, MODE SELECT, ...) conflicts under all.
_PR_ALWAYS: Final = frozenset((TEST_UNIT_READY, REQUEST_SENSE, INQUIRY, READ_CAPACITY_10,
                               REPORT_LUNS, MAINTENANCE_IN, PERSISTENT_RESERVE_IN,
                               PERSISTENT_RESERVE_OUT))
_PR_READS: Final = frozenset((READ_6, READ_10, READ_12, READ_16, VERIFY_10, VERIFY_12,
                              VERIFY_16, PRE_FETCH_10, PRE_FETCH_16, MODE_SENSE_6,
                              MODE_SENSE_10))


def pr_class(cdb: bytes) -> str:
    op = cdb[0]
    if op in _PR_ALWAYS:
        return pr.ALWAYS
    if op == SERVICE_ACTION_IN_16:
        return pr.ALWAYS if cdb[1] & 0x1F == SA_READ_CAPACITY_16 else pr.READS
    if op == PREVENT_ALLOW and not cdb[4] & 0x03:
        return pr.ALWAYS
    return pr.READS if op in _PR_READS else pr.WRITES


def cdb_length(opcode: int) -> int:
    return _CDB_LEN.get(opcode >> 5, 6)


def command_name(cdb: bytes) -> str:
    if not cdb:
        return "EMPTY"
    sa = cdb[1] & 0x1F if len(cdb) > 1 and cdb[0] in _WITH_SA else None
    cmd = _BY_OPCODE.get((cdb[0], sa))
    return cmd.name if cmd is not None else "UNSUPPORTED"


@dataclass
class LogicalUnit:
    """One volume as a SCSI direct-access block device (shared by all sessions)."""

    volume: Volume
    gate: Gate
    serial: str
    target_name: str
    target_port: int = 1
    # Mode parameters an initiator may change (D_SENSE in the control page).
    d_sense: bool = False
    # Persistent reservations, kept by ``store`` under ``unit_key`` (if any).
    store: ReservationStore | None = None
    unit_key: str = ""
    reservations: Reservations = field(default_factory=Reservations)
    _naa: bytes = field(default=b"", init=False)

    def __post_init__(self) -> None:
        # NAA 6 (IEEE registered extended): stable per volume, from its serial.
        digest = hashlib.sha256(self.serial.encode()).digest()
        # OUI-like company id 0x001405 (locally chosen), then 100 bits of the hash.
        self._naa = bytes([0x60 | 0x00, 0x14, 0x05 << 4 | digest[0] >> 4]) + digest[1:14]
        if self.store is not None:
            saved = self.store.load_reservations(self.unit_key)
            if saved is not None:
                self.reservations = Reservations.from_json(saved)

    # ---- geometry -------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return self.volume.size // LBA_SIZE

    @property
    def read_only(self) -> bool:
        return self.volume.read_only

    @property
    def granularity(self) -> int:
        return max(self.volume.block_size // LBA_SIZE, 1)

    def _range(self, lba: int, count: int) -> None:
        if lba + count > self.blocks or lba >= 1 << 64:
            raise _Refused(check(LBA_OUT_OF_RANGE))

    # ---- entry point -----------------------------------------------------------------
    def plan(self, cdb: bytes, nexus: Nexus | None = None) -> Plan | Result:
        """``nexus``: the I_T nexus the command came from (None: an anonymous one)."""
        if not cdb:
            return check(INVALID_OPCODE)
        op = cdb[0]
        need = cdb_length(op)
        if len(cdb) < need:
            return check(INVALID_FIELD_IN_CDB)
        handler = _HANDLERS.get(op)
        if handler is None:
            return check(INVALID_OPCODE, 0)
        if cdb[need - 1] & 0x04:       # NACA in the control byte: ACA is not supported
            return check(INVALID_FIELD_IN_CDB, need - 1)
        if self.reservations.reserved and self.reservations.conflicts(nexus, pr_class(cdb)):
            return Result(RESERVATION_CONFLICT)
        if op == PERSISTENT_RESERVE_OUT:
            return self._prout(cdb[:need], nexus or Nexus("", bytes(6)))
        try:
            return handler(self, cdb[:need])
        except _Refused as r:
            return r.result

    # ---- helpers ---------------------------------------------------------------------
    def _done(self, name: str, result: Result) -> Plan:
        async def run(_data: bytes) -> Result:
            return result
        return Plan(name, 0, run)

    async def _guard(self, write: bool, coro: Callable[[], Awaitable[Result]]) -> Result:
        try:
            return await coro()
        except StorageError as e:
            return check(sense_for(e, write=write))

    def _write_protect(self) -> None:
        if self.read_only:
            raise _Refused(check(WRITE_PROTECTED))

    # ---- commands without data -------------------------------------------------------
    def _test_unit_ready(self, cdb: bytes) -> Plan:
        return self._done("TEST_UNIT_READY", OK)

    def _start_stop(self, cdb: bytes) -> Plan:
        if cdb[4] & 0xF0 not in (0, 0x10, 0x30):     # power conditions we do not have
            raise _refuse(INVALID_FIELD_IN_CDB, 4)
        return self._done("START_STOP_UNIT", OK)

    def _prevent_allow(self, cdb: bytes) -> Plan:
        if cdb[4] & 0x03 == 0x03:
            raise _refuse(INVALID_FIELD_IN_CDB, 4)
        return self._done("PREVENT_ALLOW", OK)

    def _request_sense(self, cdb: bytes) -> Plan:
        length = cdb[4]
        if cdb[1] & 0x01:
            # Descriptor format: no pending sense, so a header alone.
            return self._done("REQUEST_SENSE", _alloc(bytes([0x72, 0, 0, 0, 0, 0, 0, 0]),
                                                      length))
        return self._done("REQUEST_SENSE", _alloc(Sense(NO_SENSE, 0, 0).fixed(), length))

    # ---- INQUIRY ---------------------------------------------------------------------
    def _inquiry(self, cdb: bytes) -> Plan:
        evpd, page = cdb[1] & 0x01, cdb[2]
        length = int.from_bytes(cdb[3:5], "big")
        if cdb[1] & 0xFE:
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        if not evpd:
            if page:
                raise _refuse(INVALID_FIELD_IN_CDB, 2)
            return self._done("INQUIRY", _alloc(self.standard_inquiry(), length))
        pages: dict[int, Callable[[], bytes]] = {
            0x00: self._vpd_supported, 0x80: self._vpd_serial, 0x83: self._vpd_ids,
            0xB0: self._vpd_block_limits, 0xB1: self._vpd_characteristics,
            0xB2: self._vpd_provisioning}
        if page not in pages:
            raise _refuse(INVALID_FIELD_IN_CDB, 2)
        return self._done("INQUIRY", _alloc(pages[page](), length))

    def standard_inquiry(self) -> bytes:
        b = bytearray(96)
        b[0] = 0x00                       # connected direct-access block device
        b[2] = 0x06                       # SPC-4
        b[3] = 0x12                       # HiSup, response data format 2
        b[4] = len(b) - 5
        b[5] = 0x00
        b[7] = 0x02                       # CmdQue
        b[8:16] = VENDOR.ljust(8)
        b[16:32] = PRODUCT.ljust(16)
        b[32:36] = REVISION.ljust(4)
        # Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
        for i, v in enumerate((0x00A0, 0x0960, 0x0460, 0x04C0)):
            b[58 + 2 * i:60 + 2 * i] = v.to_bytes(2, "big")
        return bytes(b)

    @staticmethod
    def _vpd(page: int, body: bytes) -> bytes:
        return bytes([0x00, page]) + len(body).to_bytes(2, "big") + body

    def _vpd_supported(self) -> bytes:
        return self._vpd(0x00, bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]))

    def _vpd_serial(self) -> bytes:
        return self._vpd(0x80, self.serial.encode()[:252])

    def _vpd_ids(self) -> bytes:
        def designator(code_set: int, assoc_type: int, body: bytes, proto: int = 0,
                       piv: bool = False) -> bytes:
            return bytes([proto << 4 | code_set, (0x80 if piv else 0) | assoc_type, 0,
                          len(body)]) + body
        vendor_id = VENDOR.ljust(8) + self.serial.encode()[:200]
        name = self.target_name.encode() + b",t,0x0001"
        name += bytes(-len(name) % 4 or 4)
        body = (designator(1, 0x03, self._naa)                       # NAA, LU
                + designator(2, 0x01, vendor_id)                      # T10 vendor id, LU
                + designator(1, 0x14, self.target_port.to_bytes(4, "big"), 5, True)
                + designator(3, 0x18, name, 5, True))                 # SCSI name, port
        return self._vpd(0x83, body)

    def _vpd_block_limits(self) -> bytes:
        b = bytearray(0x3C)
        b[0] = 0x01                                           # WSNZ
        b[1] = MAX_COMPARE_AND_WRITE
        struct.pack_into(">H", b, 2, self.granularity)        # optimal granularity
        struct.pack_into(">I", b, 4, MAX_TRANSFER_BLOCKS)
        struct.pack_into(">I", b, 8, max(self.granularity, 128))
        struct.pack_into(">I", b, 12, 0)                      # max pre-fetch length
        struct.pack_into(">I", b, 16, MAX_UNMAP_BLOCKS)
        struct.pack_into(">I", b, 20, MAX_UNMAP_DESCRIPTORS)
        struct.pack_into(">I", b, 24, self.granularity)
        struct.pack_into(">I", b, 28, 0x80000000)            # UGAVALID, alignment 0
        struct.pack_into(">Q", b, 32, MAX_WRITE_SAME_BLOCKS)
        return self._vpd(0xB0, bytes(b))

    def _vpd_characteristics(self) -> bytes:
        b = bytearray(0x3C)
        struct.pack_into(">H", b, 0, 1)                       # non-rotating medium
        return self._vpd(0xB1, bytes(b))

    def _vpd_provisioning(self) -> bytes:
        # LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read as zeros); thin provisioned.
        return self._vpd(0xB2, bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0]))

    # ---- capacity --------------------------------------------------------------------
    def _read_capacity_10(self, cdb: bytes) -> Plan:
        if not cdb[8] & 0x01 and any(cdb[2:6]):
            raise _refuse(INVALID_FIELD_IN_CDB, 2)
        last = min(self.blocks - 1, 0xFFFFFFFF)
        return self._done("READ_CAPACITY", Result(GOOD, struct.pack(">II", last, LBA_SIZE)))

    def _read_capacity_16(self, cdb: bytes) -> Plan:
        length = int.from_bytes(cdb[10:14], "big")
        b = bytearray(32)
        struct.pack_into(">QI", b, 0, self.blocks - 1, LBA_SIZE)
        # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0: the volume's block size is
        # announced as the optimal transfer and unmap granularity (VPD B0) instead, as
        # GET LBA STATUS reports 512-byte extents (see docs/iscsi.md).
        b[14] = 0x80 | 0x40              # LBPME, LBPRZ; lowest aligned LBA 0
        return self._done("READ_CAPACITY", _alloc(bytes(b), length))

    # ---- READ / WRITE ----------------------------------------------------------------
    @staticmethod
    def _rw_fields(cdb: bytes) -> tuple[int, int]:
        op = cdb[0]
        if op in (READ_6, WRITE_6):
            lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF
            return lba, cdb[4] or 256
        if op >> 5 == 1:                  # 10-byte
            return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
        if op >> 5 == 5:                  # 12-byte
            return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[6:10], "big")
        return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")

    def _read(self, cdb: bytes) -> Plan:
        lba, count = self._rw_fields(cdb)
        if cdb[0] != READ_6 and cdb[1] & 0xE0:            # RDPROTECT: no protection info
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        if count > MAX_TRANSFER_BLOCKS:
            raise _refuse(INVALID_FIELD_IN_CDB, 7)
        self._range(lba, count)

        async def run(_data: bytes) -> Result:
            if not count:
                return OK
            return await self._guard(False, lambda: self._read_data(lba, count))

        def quick(_data: bytes) -> Result | None:
            if not count:
                return OK
            try:
                parts = self.volume.read_vectored_nowait(lba * LBA_SIZE, count * LBA_SIZE)
            except StorageError:
                return None                 # run() answers with the right sense
            if parts is None:
                return None
            return Result(GOOD, b"", None, tuple(parts))
        return Plan("READ", 0, run, quick=quick)

    async def _read_data(self, lba: int, count: int) -> Result:
        parts = await self.volume.read_vectored(lba * LBA_SIZE, count * LBA_SIZE)
        return Result(GOOD, parts=tuple(parts))

    def _write(self, cdb: bytes) -> Plan:
        lba, count = self._rw_fields(cdb)
        op = cdb[0]
        if op != WRITE_6 and cdb[1] & 0xE0:               # WRPROTECT
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        if count > MAX_TRANSFER_BLOCKS:
            raise _refuse(INVALID_FIELD_IN_CDB, 7)
        self._range(lba, count)
        self._write_protect()
        fua = op != WRITE_6 and bool(cdb[1] & 0x08)
        name = "WRITE_AND_VERIFY" if op in (WRITE_VERIFY_10, WRITE_VERIFY_12,
                                            WRITE_VERIFY_16) else "WRITE"

        async def run(data: bytes) -> Result:
            if not data:
                return OK

            async def go() -> Result:
                async with self.gate.shared():
                    await self.volume.write(lba * LBA_SIZE, data, fua=fua)
                return OK
            return await self._guard(True, go)

        def quick(data: bytes) -> Result | None:
            if not data:
                return OK
            if fua or not self.gate.free():
                return None
            try:
                return OK if self.volume.write_nowait(lba * LBA_SIZE, data) else None
            except StorageError:
                return None                 # run() answers with the right sense
        return Plan(name, count * LBA_SIZE, run, write=True, quick=quick)

    def _verify(self, cdb: bytes) -> Plan:
        lba, count = self._rw_fields(cdb)
        if cdb[1] & 0xE0:                                  # VRPROTECT
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk == 2:
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        if count > MAX_TRANSFER_BLOCKS:
            raise _refuse(INVALID_FIELD_IN_CDB, 7)
        self._range(lba, count)
        want = 0 if not bytchk or not count else (LBA_SIZE if bytchk == 3
                                                   else count * LBA_SIZE)

        async def run(data: bytes) -> Result:
            if not count:
                return OK

            async def go() -> Result:
                have = await self.volume.read(lba * LBA_SIZE, count * LBA_SIZE)
                if not bytchk:
                    return OK
                expect = data * count if bytchk == 3 else data
                if have != expect:
                    at = next(i for i in range(len(have)) if have[i] != expect[i])
                    return check(Sense(MISCOMPARE, 0x1D, 0x00, information=at))
                return OK
            return await self._guard(False, go)
        return Plan("VERIFY", want, run)

    def _compare_and_write(self, cdb: bytes) -> Plan:
        lba = int.from_bytes(cdb[2:10], "big")
        count = cdb[13]
        if cdb[1] & 0xE0:
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        if count > MAX_COMPARE_AND_WRITE:
            raise _refuse(INVALID_FIELD_IN_CDB, 13)
        self._range(lba, count)
        self._write_protect()
        fua = bool(cdb[1] & 0x08)
        n = count * LBA_SIZE

        async def run(data: bytes) -> Result:
            if not count:
                return OK

            async def go() -> Result:
                async with self.gate.exclusive():
                    have = await self.volume.read(lba * LBA_SIZE, n)
                    if have != data[:n]:
                        at = next(i for i in range(n) if have[i] != data[i])
                        return check(Sense(MISCOMPARE, 0x1D, 0x00, information=at))
                    await self.volume.write(lba * LBA_SIZE, data[n:], fua=fua)
                return OK
            return await self._guard(True, go)
        return Plan("COMPARE_AND_WRITE", 2 * n, run, write=True)

    def _pre_fetch(self, cdb: bytes) -> Plan:
        if cdb[0] == PRE_FETCH_10:
            lba, count = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
        else:
            lba, count = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
        self._range(lba, count)
        return self._done("PRE_FETCH", OK)

    def _sync_cache(self, cdb: bytes) -> Plan:
        if cdb[0] == SYNCHRONIZE_CACHE_10:
            lba, count = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
        else:
            lba, count = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
        self._range(lba, count)

        async def run(_data: bytes) -> Result:
            async def go() -> Result:
                await self.volume.flush()
                return OK
            return await self._guard(True, go)
        return Plan("SYNCHRONIZE_CACHE", 0, run)

    # ---- thin provisioning -----------------------------------------------------------
    def _write_same(self, cdb: bytes) -> Plan:
        sixteen = cdb[0] == WRITE_SAME_16
        if sixteen:
            lba, count = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
        else:
            lba, count = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
        flags = cdb[1]
        unmap = bool(flags & 0x08)
        ndob = sixteen and bool(flags & 0x01)
        if flags & 0xE0 or flags & 0x10 or (not sixteen and flags & 0x01):
            raise _refuse(INVALID_FIELD_IN_CDB, 1)        # WRPROTECT, ANCHOR, reserved
        if flags & 0x06:                                  # obsolete PBDATA/LBDATA
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        if count == 0:                                    # WSNZ=1
            raise _refuse(INVALID_FIELD_IN_CDB, 10 if sixteen else 7)
        if count > MAX_WRITE_SAME_BLOCKS:
            raise _refuse(INVALID_FIELD_IN_CDB, 10 if sixteen else 7)
        self._range(lba, count)
        self._write_protect()
        offset, length = lba * LBA_SIZE, count * LBA_SIZE

        async def run(data: bytes) -> Result:
            block = bytes(LBA_SIZE) if ndob else data

            async def go() -> Result:
                async with self.gate.shared():
                    if block == bytes(LBA_SIZE):
                        await self.volume.write_zeroes(offset, length, punch=unmap)
                    else:
                        chunk = block * (WRITE_SAME_CHUNK // LBA_SIZE)
                        pos = offset
                        while pos < offset + length:
                            n = min(len(chunk), offset + length - pos)
                            await self.volume.write(pos, chunk[:n])
                            pos += n
                return OK
            return await self._guard(True, go)
        return Plan("WRITE_SAME", 0 if ndob else LBA_SIZE, run, write=True)

    def _unmap(self, cdb: bytes) -> Plan:
        if cdb[1] & 0x01:                                 # ANCHOR
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        length = int.from_bytes(cdb[7:9], "big")
        self._write_protect()

        async def run(data: bytes) -> Result:
            if length == 0:
                return OK
            if length < 8:
                return check(PARAMETER_LIST_LENGTH)
            desc_len = int.from_bytes(data[2:4], "big")
            body = data[8:8 + min(desc_len, length - 8)]
            if len(body) // 16 > MAX_UNMAP_DESCRIPTORS:
                return check(INVALID_FIELD_IN_PARAMETERS)
            ranges = []
            total = 0
            for i in range(0, len(body) - len(body) % 16, 16):
                lba, n = struct.unpack_from(">QI", body, i)
                if lba + n > self.blocks:
                    return check(LBA_OUT_OF_RANGE)
                total += n
                ranges.append((lba, n))
            if total > MAX_UNMAP_BLOCKS:
                return check(INVALID_FIELD_IN_PARAMETERS)

            async def go() -> Result:
                async with self.gate.shared():
                    for lba, n in ranges:
                        if n:
                            await self.volume.trim(lba * LBA_SIZE, n * LBA_SIZE)
                return OK
            return await self._guard(True, go)
        return Plan("UNMAP", length, run, write=True)

    def _get_lba_status(self, cdb: bytes) -> Plan:
        lba = int.from_bytes(cdb[2:10], "big")
        length = int.from_bytes(cdb[10:14], "big")
        if lba >= self.blocks:
            raise _refuse(LBA_OUT_OF_RANGE)

        async def run(_data: bytes) -> Result:
            async def go() -> Result:
                room = max((length - 8) // 16, 1)
                span = min(self.blocks - lba, 1 << 20) * LBA_SIZE
                extents = await self.volume.allocation(lba * LBA_SIZE, span)
                out = bytearray()
                for e in extents[:room]:
                    out += struct.pack(">QIB3x", e.offset // LBA_SIZE, e.length // LBA_SIZE,
                                       0 if e.allocated else 1)
                head = struct.pack(">I4x", len(out) + 4)
                return _alloc(head + bytes(out), length)
            return await self._guard(False, go)
        return Plan("GET_LBA_STATUS", 0, run)

    # ---- mode pages ------------------------------------------------------------------
    def _mode_pages(self, pc: int) -> dict[int, bytes]:
        changeable = pc == 1
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 0x12
        if not changeable:
            caching[2] = 0x04                           # WCE: volatile write cache
        control = bytearray(12)
        control[0], control[1] = 0x0A, 0x0A
        if changeable:
            control[2] = 0x04                           # D_SENSE may be changed
        else:
            control[2] = 0x04 if self.d_sense and pc == 0 else 0
            control[3] = 0x10                           # QAM: unrestricted reordering
            control[8:10] = b"\xff\xff"                 # busy timeout: unlimited
        exceptions = bytearray(12)
        exceptions[0], exceptions[1] = 0x1C, 0x0A
        return {0x08: bytes(caching), 0x0A: bytes(control), 0x1C: bytes(exceptions)}

    def _mode_sense(self, cdb: bytes) -> Plan:
        six = cdb[0] == MODE_SENSE_6
        dbd = bool(cdb[1] & 0x08)
        llbaa = not six and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        length = cdb[4] if six else int.from_bytes(cdb[7:9], "big")
        if pc == 3:
            raise _refuse(SAVING_NOT_SUPPORTED)
        pages = self._mode_pages(pc)
        if page == 0x3F and subpage in (0x00, 0xFF):
            body = b"".join(pages[k] for k in sorted(pages))
        elif page in pages and subpage == 0:
            body = pages[page]
        else:
            raise _refuse(INVALID_FIELD_IN_CDB, 2 if subpage == 0 else 3)
        if dbd:
            blockdesc = b""
        elif llbaa:
            blockdesc = struct.pack(">Q4xI", self.blocks, LBA_SIZE)
        else:
            blockdesc = struct.pack(">II", min(self.blocks, 0xFFFFFFFF), LBA_SIZE)
        device_specific = (0x80 if self.read_only else 0) | 0x10       # WP, DPOFUA
        if six:
            head = bytes([len(blockdesc) + len(body) + 3, 0, device_specific,
                          len(blockdesc)])
        else:
            head = struct.pack(">HBBBBH", len(blockdesc) + len(body) + 6, 0, device_specific,
                               0x01 if llbaa and blockdesc else 0, 0, len(blockdesc))
        return self._done("MODE_SENSE", _alloc(head + blockdesc + body, length))

    def _mode_select(self, cdb: bytes) -> Plan:
        six = cdb[0] == MODE_SELECT_6
        length = cdb[4] if six else int.from_bytes(cdb[7:9], "big")
        if cdb[1] & 0x01:                              # SP: saving is not supported
            raise _refuse(SAVING_NOT_SUPPORTED)
        hlen = 4 if six else 8

        async def run(data: bytes) -> Result:
            if length == 0:
                return OK
            if len(data) < hlen:
                return check(PARAMETER_LIST_LENGTH)
            bdl = data[3] if six else int.from_bytes(data[6:8], "big")
            pos = hlen + bdl
            current = self._mode_pages(0)
            changeable = self._mode_pages(1)
            d_sense = self.d_sense
            while pos + 2 <= len(data):
                page = data[pos] & 0x3F
                plen = data[pos + 1] + 2
                given = data[pos:pos + plen]
                if page not in current or len(given) != len(current[page]):
                    return check(INVALID_FIELD_IN_PARAMETERS)
                mask = changeable[page]
                for i in range(2, plen):
                    if (given[i] ^ current[page][i]) & ~mask[i] & 0xFF:
                        return check(INVALID_FIELD_IN_PARAMETERS)
                if page == 0x0A:
                    d_sense = bool(given[2] & 0x04)
                pos += plen
            self.d_sense = d_sense
            return OK
        return Plan("MODE_SELECT", length, run)

    # ---- persistent reservations -----------------------------------------------------
    def _prin(self, cdb: bytes) -> Plan:
        action, length = cdb[1] & 0x1F, int.from_bytes(cdb[7:9], "big")
        if self.reservations.prin(action) is None:
            raise _refuse(INVALID_FIELD_IN_CDB, 1)

        async def run(_data: bytes) -> Result:
            return _alloc(self.reservations.prin(action) or b"", length)
        return Plan("PERSISTENT_RESERVE_IN", 0, run)

    def _prout(self, cdb: bytes, nexus: Nexus) -> Plan | Result:
        action, scope, rtype = cdb[1] & 0x1F, cdb[2] >> 4, cdb[2] & 0x0F
        length = int.from_bytes(cdb[5:9], "big")
        if length > 4096:
            return check(PARAMETER_LIST_LENGTH)

        async def run(data: bytes) -> Result:
            before = self.reservations.to_json()
            answer = self.reservations.prout(nexus, action, scope, rtype, bytes(data))
            if answer == pr.GOOD and self.store is not None and (
                    self.reservations.to_json() != before):
                await self.store.save_reservations(self.unit_key,
                                                     self.reservations.to_json())
            return _PROUT_ANSWERS[answer]
        return Plan("PERSISTENT_RESERVE_OUT", length, run)

    # ---- reporting -------------------------------------------------------------------
    def _report_luns(self, cdb: bytes) -> Plan:
        length = int.from_bytes(cdb[6:10], "big")
        if length < 16:
            raise _refuse(INVALID_FIELD_IN_CDB, 6)
        if cdb[2] not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
            raise _refuse(INVALID_FIELD_IN_CDB, 2)
        lun0 = cdb[2] in (0x00, 0x02, 0x11)
        data = struct.pack(">I4x", 8 if lun0 else 0) + (bytes(8) if lun0 else b"")
        return self._done("REPORT_LUNS", _alloc(data, length))

    def _service_action_in(self, cdb: bytes) -> Plan:
        sa = cdb[1] & 0x1F
        if sa == SA_READ_CAPACITY_16:
            return self._read_capacity_16(cdb)
        if sa == SA_GET_LBA_STATUS:
            return self._get_lba_status(cdb)
        raise _refuse(INVALID_FIELD_IN_CDB, 1)

    def _maintenance_in(self, cdb: bytes) -> Plan:
        sa = cdb[1] & 0x1F
        length = int.from_bytes(cdb[6:10], "big")
        if sa == SA_REPORT_TMFS:
            # ABORT TASK, ABORT TASK SET, LOGICAL UNIT RESET, TARGET RESET
            data = bytes([0x80 | 0x40 | 0x08 | 0x02, 0, 0, 0])
            return self._done("REPORT_SUPPORTED_TMFS", _alloc(data, length))
        if sa != SA_REPORT_OPCODES:
            raise _refuse(INVALID_FIELD_IN_CDB, 1)
        options = cdb[2] & 0x07
        rctd = bool(cdb[2] & 0x80)
        timeouts = struct.pack(">HxBII", 10, 0, 0, 0) if rctd else b""
        if options == 0:
            out = bytearray()
            for c in SUPPORTED:
                flags = (0x01 if c.service_action is not None else 0) | (0x02 if rctd else 0)
                out += struct.pack(">BxHxBH", c.opcode, c.service_action or 0, flags,
                                   c.cdb_len) + timeouts
            data = struct.pack(">I", len(out)) + bytes(out)
            return self._done("REPORT_SUPPORTED_OPCODES", _alloc(data, length))
        if options not in (1, 2, 3):
            raise _refuse(INVALID_FIELD_IN_CDB, 2)
        op, sa_req = cdb[3], int.from_bytes(cdb[4:6], "big")
        has_sa = {c.opcode for c in SUPPORTED if c.service_action is not None}
        if options == 1 and op in has_sa:
            raise _refuse(INVALID_FIELD_IN_CDB, 2)
        if options == 2 and op not in has_sa and op in {c.opcode for c in SUPPORTED}:
            raise _refuse(INVALID_FIELD_IN_CDB, 2)
        found = _BY_OPCODE.get((op, sa_req if op in has_sa else None))
        if found is None:
            data = bytes([0, 0x01, 0, 0])                 # not supported
        else:
            data = (bytes([0, (0x80 if rctd else 0) | 0x03])
                    + len(found.usage).to_bytes(2, "big") + found.usage + timeouts)
        return self._done("REPORT_SUPPORTED_OPCODES", _alloc(data, length))



_LU = LogicalUnit
_HANDLERS: Final[dict[int, Callable[[LogicalUnit, bytes], Plan]]] = {
    TEST_UNIT_READY: _LU._test_unit_ready, REQUEST_SENSE: _LU._request_sense,
    READ_6: _LU._read, READ_10: _LU._read, READ_12: _LU._read, READ_16: _LU._read,
    WRITE_6: _LU._write, WRITE_10: _LU._write, WRITE_12: _LU._write, WRITE_16: _LU._write,
    WRITE_VERIFY_10: _LU._write, WRITE_VERIFY_12: _LU._write, WRITE_VERIFY_16: _LU._write,
    VERIFY_10: _LU._verify, VERIFY_12: _LU._verify, VERIFY_16: _LU._verify,
    INQUIRY: _LU._inquiry, MODE_SENSE_6: _LU._mode_sense, MODE_SENSE_10: _LU._mode_sense,
    MODE_SELECT_6: _LU._mode_select, MODE_SELECT_10: _LU._mode_select,
    START_STOP_UNIT: _LU._start_stop, PREVENT_ALLOW: _LU._prevent_allow,
    READ_CAPACITY_10: _LU._read_capacity_10, SERVICE_ACTION_IN_16: _LU._service_action_in,
    PRE_FETCH_10: _LU._pre_fetch, PRE_FETCH_16: _LU._pre_fetch,
    SYNCHRONIZE_CACHE_10: _LU._sync_cache, SYNCHRONIZE_CACHE_16: _LU._sync_cache,
    WRITE_SAME_10: _LU._write_same, WRITE_SAME_16: _LU._write_same, UNMAP: _LU._unmap,
    COMPARE_AND_WRITE: _LU._compare_and_write, REPORT_LUNS: _LU._report_luns,
    MAINTENANCE_IN: _LU._maintenance_in, PERSISTENT_RESERVE_IN: _LU._prin,
    PERSISTENT_RESERVE_OUT: _LU._prin,        # (not used: plan() sends it to _prout)
}
_PROUT_ANSWERS: Final[dict[str, Result]] = {
    pr.GOOD: OK, pr.CONFLICT: Result(RESERVATION_CONFLICT),
    pr.BAD_FIELD_CDB: check(INVALID_FIELD_IN_CDB), pr.BAD_LENGTH: check(PARAMETER_LIST_LENGTH),
    pr.BAD_FIELD_PARAMETERS: check(INVALID_FIELD_IN_PARAMETERS),
    pr.BAD_RELEASE: check(INVALID_RELEASE),
}

def no_such_lun(cdb: bytes) -> Result:
    """The answer for a LUN other than 0: INQUIRY says nothing is connected there,
    REPORT LUNS works, everything else is refused."""
    if cdb[:1] == bytes([INQUIRY]) and len(cdb) >= 6 and not cdb[1] & 0x01:
        data = bytearray(36)
        data[0] = 0x7F
        data[2], data[3], data[4] = 0x06, 0x12, 31
        return _alloc(bytes(data), int.from_bytes(cdb[3:5], "big"))
    return check(LU_NOT_SUPPORTED)
