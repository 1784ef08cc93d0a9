"""SCSI commands as data (SPC-4 / SBC-3): decode and validate CDBs, no I/O.

``decode(unit, cdb, nexus)`` turns a CDB into either a finished ``Result`` (a refusal with
its exact sense, or an answer that needs no volume: INQUIRY and its VPD pages, MODE SENSE,
READ CAPACITY, REPORT LUNS, ...) or an ``Op`` that says what to do with the volume and how
many bytes of Data-Out it needs. ``iscsi.scsi`` runs an ``Op`` against a Volume; the
parameter lists that arrive as Data-Out (UNMAP, MODE SELECT) are parsed here too.

Like ``iscsi.pdu`` this module is pure: no trio, no volumes, nothing of the project but
``iscsi.reservations`` (the import contract in pyproject.toml holds it to that).

Invariants (tests cite them as "cdb invariant N"):
1. ``decode`` reads only the CDB and the unit's geometry, capabilities, mode and
   reservation state; it never changes them and never touches the volume.
2. Every refusal is CHECK CONDITION with the sense key and ASC/ASCQ of the standard (and
   the field pointer where the CDB names a byte at fault); a reservation conflict is
   RESERVATION CONFLICT with no sense.
3. An ``Op`` that addresses blocks has ``lba + count <= unit.blocks``, ``count`` within
   the limits announced in VPD B0, and, if it writes, a unit that is not read-only.
4. Storage errors become sense in one place, ``sense_for_errno``.

The logical block size on the wire is 512 bytes; the volume's block size is reported as
the optimal transfer granularity and the unmap granularity.
What the unit announces about itself is derived from its capabilities (``unit.caps``, the
volume's ``Volume.capabilities()``), never restated here: write protection (WP in the mode
sense header, refusals of writes), a volatile write cache (WCE in the caching mode page;
FUA writes and SYNCHRONIZE CACHE flush it), DPOFUA, thin provisioning (LBPME, VPD B2),
unmapped blocks reading as zeros (LBPRZ), the granularities of VPD B0 and the rotation
rate of VPD B1.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol

from iscsi import reservations as pr
from iscsi.reservations import Nexus, Reservations

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



def sense_for_errno(err: int, *, write: bool) -> Sense:
    """The one translation of storage errors (by errno) into sense data."""
    if err == errno.ENOSPC:
        return SPACE_ALLOCATION_FAILED
    if err == errno.EROFS:
        return WRITE_PROTECTED
    if err == errno.EINVAL:
        return LBA_OUT_OF_RANGE
    if err == errno.ENOENT:
        return NOT_READY_MEDIUM_ABSENT
    if err == errno.EIO:
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


class UnitCapabilities(Protocol):
    """What the unit's volume offers (``volumes.Capabilities`` has these fields)."""

    @property
    def read_only(self) -> bool: ...
    @property
    def volatile_cache(self) -> bool: ...
    @property
    def can_fua(self) -> bool: ...
    @property
    def thin(self) -> bool: ...
    @property
    def zeroes_unmapped(self) -> bool: ...
    @property
    def rotational(self) -> bool: ...
    @property
    def preferred_block(self) -> int: ...
    @property
    def unmap_granularity(self) -> int: ...


def lbas(nbytes: int) -> int:
    """A granularity in bytes as a count of 512-byte logical blocks (at least one)."""
    return max(nbytes // LBA_SIZE, 1)


class UnitState(Protocol):
    """What decoding needs to know about a logical unit (``iscsi.scsi.LogicalUnit``)."""

    @property
    def blocks(self) -> int: ...
    @property
    def caps(self) -> UnitCapabilities: ...
    @property
    def read_only(self) -> bool:
        """``caps.read_only``, without building the whole capabilities (every WRITE asks)."""
        ...
    @property
    def d_sense(self) -> bool: ...
    @property
    def serial(self) -> str: ...
    @property
    def target_name(self) -> str: ...
    @property
    def target_port(self) -> int: ...
    @property
    def naa(self) -> bytes: ...
    @property
    def reservations(self) -> Reservations: ...


class Unit(Protocol):
    """A logical unit as the session sees it: plans commands, holds the mode state."""

    d_sense: bool

    def plan(self, cdb: bytes, nexus: Nexus | None = None) -> Plan | Result: ...


class Extent(Protocol):
    """One extent of GET LBA STATUS, in bytes (``volumes.Extent``)."""

    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def allocated(self) -> bool: ...


# ---- decoded commands ------------------------------------------------------------------
# (Not frozen, as Result: one is built per command and never changed.)

@dataclass(slots=True)
class Answer:
    """Answered from the CDB and the unit's state alone."""

    name: str
    result: Result
    data_out: ClassVar[int] = 0


@dataclass(slots=True)
class Read:
    lba: int
    count: int
    name: ClassVar[str] = "READ"
    data_out: ClassVar[int] = 0


@dataclass(slots=True)
class Write:
    name: str                  # WRITE or WRITE_AND_VERIFY
    lba: int
    count: int
    fua: bool

    @property
    def data_out(self) -> int:
        return self.count * LBA_SIZE


@dataclass(slots=True)
class Verify:
    lba: int
    count: int
    bytchk: int                # 0: medium only, 1: compare all blocks, 3: one block for all
    name: ClassVar[str] = "VERIFY"

    @property
    def data_out(self) -> int:
        if not self.bytchk or not self.count:
            return 0
        return LBA_SIZE if self.bytchk == 3 else self.count * LBA_SIZE


@dataclass(slots=True)
class CompareAndWrite:
    lba: int
    count: int
    fua: bool
    name: ClassVar[str] = "COMPARE_AND_WRITE"

    @property
    def data_out(self) -> int:
        return 2 * self.count * LBA_SIZE


@dataclass(slots=True)
class SyncCache:
    lba: int
    count: int
    name: ClassVar[str] = "SYNCHRONIZE_CACHE"
    data_out: ClassVar[int] = 0


@dataclass(slots=True)
class WriteSame:
    lba: int
    count: int
    unmap: bool
    ndob: bool                 # no Data-Out: the block is zeros
    name: ClassVar[str] = "WRITE_SAME"

    @property
    def data_out(self) -> int:
        return 0 if self.ndob else LBA_SIZE


@dataclass(slots=True)
class Unmap:
    length: int                # of the parameter list, all of it Data-Out
    name: ClassVar[str] = "UNMAP"

    @property
    def data_out(self) -> int:
        return self.length


@dataclass(slots=True)
class GetLbaStatus:
    lba: int
    length: int                # allocation length
    name: ClassVar[str] = "GET_LBA_STATUS"
    data_out: ClassVar[int] = 0


@dataclass(slots=True)
class ModeSelect:
    six: bool
    length: int
    name: ClassVar[str] = "MODE_SELECT"

    @property
    def data_out(self) -> int:
        return self.length


@dataclass(slots=True)
class PrIn:
    action: int
    length: int
    name: ClassVar[str] = "PERSISTENT_RESERVE_IN"
    data_out: ClassVar[int] = 0


@dataclass(slots=True)
class PrOut:
    nexus: Nexus
    action: int
    scope: int
    rtype: int
    length: int
    name: ClassVar[str] = "PERSISTENT_RESERVE_OUT"

    @property
    def data_out(self) -> int:
        return self.length


Op = (Answer | Read | Write | Verify | CompareAndWrite | SyncCache | WriteSame | Unmap
      | GetLbaStatus | ModeSelect | PrIn | PrOut)


# ---- entry point -----------------------------------------------------------------------
def decode(unit: UnitState, cdb: bytes, nexus: Nexus | None = None) -> Op | Result:
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
    reservations = unit.reservations
    if reservations.reserved and reservations.conflicts(nexus, pr_class(cdb)):
        return Result(RESERVATION_CONFLICT)
    if op == PERSISTENT_RESERVE_OUT:
        return _prout(cdb[:need], nexus or Nexus("", bytes(6)))
    try:
        return handler(unit, cdb[:need])
    except _Refused as r:
        return r.result


# ---- helpers ---------------------------------------------------------------------------
def _range(unit: UnitState, lba: int, count: int) -> None:
    if lba + count > unit.blocks or lba >= 1 << 64:
        raise _Refused(check(LBA_OUT_OF_RANGE))


def _write_protect(unit: UnitState) -> None:
    if unit.read_only:
        raise _Refused(check(WRITE_PROTECTED))


# ---- commands without data -------------------------------------------------------------
def _test_unit_ready(unit: UnitState, cdb: bytes) -> Op:
    return Answer("TEST_UNIT_READY", OK)


def _start_stop(unit: UnitState, cdb: bytes) -> Op:
    if cdb[4] & 0xF0 not in (0, 0x10, 0x30):     # power conditions we do not have
        raise _refuse(INVALID_FIELD_IN_CDB, 4)
    return Answer("START_STOP_UNIT", OK)


def _prevent_allow(unit: UnitState, cdb: bytes) -> Op:
    if cdb[4] & 0x03 == 0x03:
        raise _refuse(INVALID_FIELD_IN_CDB, 4)
    return Answer("PREVENT_ALLOW", OK)


def _request_sense(unit: UnitState, cdb: bytes) -> Op:
    length = cdb[4]
    if cdb[1] & 0x01:
        # Descriptor format: no pending sense, so a header alone.
        return Answer("REQUEST_SENSE", _alloc(bytes([0x72, 0, 0, 0, 0, 0, 0, 0]), length))
    return Answer("REQUEST_SENSE", _alloc(Sense(NO_SENSE, 0, 0).fixed(), length))


# ---- INQUIRY ---------------------------------------------------------------------------
def _inquiry(unit: UnitState, cdb: bytes) -> Op:
    evpd, page = cdb[1] & 0x01, cdb[2]
    length = int.from_bytes(cdb[3:5], "big")
    if cdb[1] & 0xFE:
        raise _refuse(INVALID_FIELD_IN_CDB, 1)
    if not evpd:
        if page:
            raise _refuse(INVALID_FIELD_IN_CDB, 2)
        return Answer("INQUIRY", _alloc(standard_inquiry(), length))
    vpd = _VPD_PAGES.get(page)
    if vpd is None:
        raise _refuse(INVALID_FIELD_IN_CDB, 2)
    return Answer("INQUIRY", _alloc(vpd(unit), length))


def standard_inquiry() -> bytes:
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


def _vpd(page: int, body: bytes) -> bytes:
    return bytes([0x00, page]) + len(body).to_bytes(2, "big") + body


def _vpd_supported(unit: UnitState) -> bytes:
    return _vpd(0x00, bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]))


def _vpd_serial(unit: UnitState) -> bytes:
    return _vpd(0x80, unit.serial.encode()[:252])


def _vpd_ids(unit: UnitState) -> bytes:
    def designator(code_set: int, assoc_type: int, body: bytes, proto: int = 0,
                   piv: bool = False) -> bytes:
        return bytes([proto << 4 | code_set, (0x80 if piv else 0) | assoc_type, 0,
                      len(body)]) + body
    vendor_id = VENDOR.ljust(8) + unit.serial.encode()[:200]
    name = unit.target_name.encode() + b",t,0x0001"
    name += bytes(-len(name) % 4 or 4)
    body = (designator(1, 0x03, unit.naa)                         # NAA, LU
            + designator(2, 0x01, vendor_id)                      # T10 vendor id, LU
            + designator(1, 0x14, unit.target_port.to_bytes(4, "big"), 5, True)
            + designator(3, 0x18, name, 5, True))                 # SCSI name, port
    return _vpd(0x83, body)


def _vpd_block_limits(unit: UnitState) -> bytes:
    granularity = lbas(unit.caps.preferred_block)
    b = bytearray(0x3C)
    b[0] = 0x01                                           # WSNZ
    b[1] = MAX_COMPARE_AND_WRITE
    struct.pack_into(">H", b, 2, granularity)             # optimal granularity
    struct.pack_into(">I", b, 4, MAX_TRANSFER_BLOCKS)
    struct.pack_into(">I", b, 8, max(granularity, 128))
    struct.pack_into(">I", b, 12, 0)                      # max pre-fetch length
    struct.pack_into(">I", b, 16, MAX_UNMAP_BLOCKS)
    struct.pack_into(">I", b, 20, MAX_UNMAP_DESCRIPTORS)
    struct.pack_into(">I", b, 24, lbas(unit.caps.unmap_granularity))
    struct.pack_into(">I", b, 28, 0x80000000)            # UGAVALID, alignment 0
    struct.pack_into(">Q", b, 32, MAX_WRITE_SAME_BLOCKS)
    return _vpd(0xB0, bytes(b))


def _vpd_characteristics(unit: UnitState) -> bytes:
    b = bytearray(0x3C)
    if not unit.caps.rotational:
        struct.pack_into(">H", b, 0, 1)                   # non-rotating medium
    return _vpd(0xB1, bytes(b))


def _vpd_provisioning(unit: UnitState) -> bytes:
    # LBPU, LBPWS, LBPWS10 (UNMAP, WRITE SAME with UNMAP: a write-protected unit has the
    # commands and refuses them), LBPRZ; provisioning type thin.
    caps = unit.caps
    flags = (0x80 | 0x40 | 0x20 if caps.thin else 0) | (0x04 if caps.zeroes_unmapped else 0)
    return _vpd(0xB2, bytes([0, flags, 0x02 if caps.thin else 0, 0]))


_VPD_PAGES: Final[dict[int, Callable[[UnitState], bytes]]] = {
    0x00: _vpd_supported, 0x80: _vpd_serial, 0x83: _vpd_ids, 0xB0: _vpd_block_limits,
    0xB1: _vpd_characteristics, 0xB2: _vpd_provisioning}


# ---- capacity --------------------------------------------------------------------------
def _read_capacity_10(unit: UnitState, cdb: bytes) -> Op:
    if not cdb[8] & 0x01 and any(cdb[2:6]):
        raise _refuse(INVALID_FIELD_IN_CDB, 2)
    last = min(unit.blocks - 1, 0xFFFFFFFF)
    return Answer("READ_CAPACITY", Result(GOOD, struct.pack(">II", last, LBA_SIZE)))


def _read_capacity_16(unit: UnitState, cdb: bytes) -> Op:
    length = int.from_bytes(cdb[10:14], "big")
    b = bytearray(32)
    struct.pack_into(">QI", b, 0, unit.blocks - 1, LBA_SIZE)
    # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0: the volume's block size is
    # announced as the optimal transfer and unmap granularity (VPD B0) instead, as
    # GET LBA STATUS reports 512-byte extents (see docs/iscsi.md).
    b[14] = (0x80 if unit.caps.thin else 0) | (0x40 if unit.caps.zeroes_unmapped else 0)
    # LBPME, LBPRZ; lowest aligned LBA 0
    return Answer("READ_CAPACITY", _alloc(bytes(b), length))


# ---- READ / WRITE ----------------------------------------------------------------------
# LBA and transfer length of the 10-, 12- and 16-byte CDBs (one unpack: every READ and
# WRITE goes through here).
_RW10: Final = struct.Struct(">2xIxH")
_RW12: Final = struct.Struct(">2xII")
_RW16: Final = struct.Struct(">2xQI")


def _rw_fields(cdb: bytes) -> tuple[int, int]:
    group = cdb[0] >> 5
    if group == 1:                    # 10-byte
        lba, count = _RW10.unpack_from(cdb)
    elif group == 4:                  # 16-byte
        lba, count = _RW16.unpack_from(cdb)
    elif group == 5:                  # 12-byte
        lba, count = _RW12.unpack_from(cdb)
    else:                             # READ (6), WRITE (6)
        lba, count = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF, cdb[4] or 256
    return lba, count


_FAST_RW: Final = {READ_10: (10, False), READ_16: (16, False), WRITE_10: (10, True),
                   WRITE_16: (16, True)}


def decode_rw(unit: UnitState, cdb: bytes) -> tuple[bool, int, int, bool] | None:
    """(write, lba, count, fua) of a READ (10)/(16) or WRITE (10)/(16) that ``decode``
    accepts as a ``Read`` or ``Write`` of the same fields; None for every other CDB and
    for one ``decode`` would refuse or must look at more closely (reservations held, a
    protection field set, out of range, NACA, write-protected): ``decode`` answers those.
    Nearly every command of a session comes here, in one call without the op value."""
    fast = _FAST_RW.get(cdb[0]) if cdb else None
    if fast is None:
        return None
    need, write = fast
    if len(cdb) < need or cdb[need - 1] & 0x04 or cdb[1] & 0xE0 \
            or unit.reservations.reserved:
        return None
    lba, count = (_RW10 if need == 10 else _RW16).unpack_from(cdb)
    if count > MAX_TRANSFER_BLOCKS or lba + count > unit.blocks \
            or (write and unit.read_only):
        return None
    return write, lba, count, write and bool(cdb[1] & 0x08)


def _read(unit: UnitState, cdb: bytes) -> Op:
    lba, count = _rw_fields(cdb)
    if cdb[0] != READ_6 and cdb[1] & 0xE0:            # RDPROTECT: no protection info
        raise _refuse(INVALID_FIELD_IN_CDB, 1)
    if count > MAX_TRANSFER_BLOCKS:
        raise _refuse(INVALID_FIELD_IN_CDB, 7)
    _range(unit, lba, count)
    return Read(lba, count)


def _write(unit: UnitState, cdb: bytes) -> Op:
    lba, count = _rw_fields(cdb)
    op = cdb[0]
    if op != WRITE_6 and cdb[1] & 0xE0:               # WRPROTECT
        raise _refuse(INVALID_FIELD_IN_CDB, 1)
    if count > MAX_TRANSFER_BLOCKS:
        raise _refuse(INVALID_FIELD_IN_CDB, 7)
    _range(unit, lba, count)
    _write_protect(unit)
    fua = op != WRITE_6 and bool(cdb[1] & 0x08)
    name = "WRITE_AND_VERIFY" if op in (WRITE_VERIFY_10, WRITE_VERIFY_12,
                                        WRITE_VERIFY_16) else "WRITE"
    return Write(name, lba, count, fua)


def _verify(unit: UnitState, cdb: bytes) -> Op:
    lba, count = _rw_fields(cdb)
    if cdb[1] & 0xE0:                                  # VRPROTECT
        raise _refuse(INVALID_FIELD_IN_CDB, 1)
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk == 2:
        raise _refuse(INVALID_FIELD_IN_CDB, 1)
    if count > MAX_TRANSFER_BLOCKS:
        raise _refuse(INVALID_FIELD_IN_CDB, 7)
    _range(unit, lba, count)
    return Verify(lba, count, bytchk)


def miscompare(have: bytes, expect: bytes) -> Result | None:
    """CHECK CONDITION with the offset of the first differing byte, or None if equal."""
    if have == expect:
        return None
    at = next(i for i in range(len(have)) if have[i] != expect[i])
    return check(Sense(MISCOMPARE, 0x1D, 0x00, information=at))


def _compare_and_write(unit: UnitState, cdb: bytes) -> Op:
    lba = int.from_bytes(cdb[2:10], "big")
    count = cdb[13]
    if cdb[1] & 0xE0:
        raise _refuse(INVALID_FIELD_IN_CDB, 1)
    if count > MAX_COMPARE_AND_WRITE:
        raise _refuse(INVALID_FIELD_IN_CDB, 13)
    _range(unit, lba, count)
    _write_protect(unit)
    return CompareAndWrite(lba, count, bool(cdb[1] & 0x08))


def _pre_fetch(unit: UnitState, cdb: bytes) -> Op:
    if cdb[0] == PRE_FETCH_10:
        lba, count = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
    else:
        lba, count = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
    _range(unit, lba, count)
    return Answer("PRE_FETCH", OK)


def _sync_cache(unit: UnitState, cdb: bytes) -> Op:
    if cdb[0] == SYNCHRONIZE_CACHE_10:
        lba, count = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
    else:
        lba, count = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
    _range(unit, lba, count)
    return SyncCache(lba, count)


# ---- thin provisioning -----------------------------------------------------------------
def _write_same(unit: UnitState, cdb: bytes) -> Op:
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
    _range(unit, lba, count)
    _write_protect(unit)
    return WriteSame(lba, count, unmap, ndob)


def _unmap(unit: UnitState, cdb: bytes) -> Op:
    if cdb[1] & 0x01:                                 # ANCHOR
        raise _refuse(INVALID_FIELD_IN_CDB, 1)
    length = int.from_bytes(cdb[7:9], "big")
    _write_protect(unit)
    return Unmap(length)


def unmap_ranges(data: bytes, length: int, blocks: int) -> list[tuple[int, int]] | Result:
    """The UNMAP parameter list (``length`` bytes announced, ``data`` received) as
    (lba, count) ranges within ``blocks``, or the refusal."""
    if length == 0:
        return []
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
        if lba + n > blocks:
            return check(LBA_OUT_OF_RANGE)
        total += n
        ranges.append((lba, n))
    if total > MAX_UNMAP_BLOCKS:
        return check(INVALID_FIELD_IN_PARAMETERS)
    return ranges


def _get_lba_status(unit: UnitState, cdb: bytes) -> Op:
    lba = int.from_bytes(cdb[2:10], "big")
    length = int.from_bytes(cdb[10:14], "big")
    if lba >= unit.blocks:
        raise _refuse(LBA_OUT_OF_RANGE)
    return GetLbaStatus(lba, length)


def lba_status_span(blocks: int, op: GetLbaStatus) -> tuple[int, int]:
    """The byte range whose allocation GET LBA STATUS reports."""
    return op.lba * LBA_SIZE, min(blocks - op.lba, 1 << 20) * LBA_SIZE


def lba_status(extents: Sequence[Extent], op: GetLbaStatus) -> Result:
    room = max((op.length - 8) // 16, 1)
    out = bytearray()
    for e in extents[:room]:
        out += struct.pack(">QIB3x", e.offset // LBA_SIZE, e.length // LBA_SIZE,
                           0 if e.allocated else 1)
    head = struct.pack(">I4x", len(out) + 4)
    return _alloc(head + bytes(out), op.length)


# ---- mode pages ------------------------------------------------------------------------
def mode_pages(pc: int, d_sense: bool, *, wce: bool = True) -> dict[int, bytes]:
    changeable = pc == 1
    caching = bytearray(20)
    caching[0], caching[1] = 0x08, 0x12
    if not changeable and wce:
        caching[2] = 0x04                           # WCE: volatile write cache
    control = bytearray(12)
    control[0], control[1] = 0x0A, 0x0A
    if changeable:
        control[2] = 0x04                           # D_SENSE may be changed
    else:
        control[2] = 0x04 if d_sense and pc == 0 else 0
        control[3] = 0x10                           # QAM: unrestricted reordering
        control[8:10] = b"\xff\xff"                 # busy timeout: unlimited
    exceptions = bytearray(12)
    exceptions[0], exceptions[1] = 0x1C, 0x0A
    return {0x08: bytes(caching), 0x0A: bytes(control), 0x1C: bytes(exceptions)}


def _mode_sense(unit: UnitState, cdb: bytes) -> Op:
    six = cdb[0] == MODE_SENSE_6
    dbd = bool(cdb[1] & 0x08)
    llbaa = not six and bool(cdb[1] & 0x10)
    pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    length = cdb[4] if six else int.from_bytes(cdb[7:9], "big")
    if pc == 3:
        raise _refuse(SAVING_NOT_SUPPORTED)
    caps = unit.caps
    pages = mode_pages(pc, unit.d_sense, wce=caps.volatile_cache)
    if page == 0x3F and subpage in (0x00, 0xFF):
        body = b"".join(pages[k] for k in sorted(pages))
    elif page in pages and subpage == 0:
        body = pages[page]
    else:
        raise _refuse(INVALID_FIELD_IN_CDB, 2 if subpage == 0 else 3)
    blocks = unit.blocks
    if dbd:
        blockdesc = b""
    elif llbaa:
        blockdesc = struct.pack(">Q4xI", blocks, LBA_SIZE)
    else:
        blockdesc = struct.pack(">II", min(blocks, 0xFFFFFFFF), LBA_SIZE)
    device_specific = (0x80 if caps.read_only else 0) | (0x10 if caps.can_fua else 0)
    if six:
        head = bytes([len(blockdesc) + len(body) + 3, 0, device_specific, len(blockdesc)])
    else:
        head = struct.pack(">HBBBBH", len(blockdesc) + len(body) + 6, 0, device_specific,
                           0x01 if llbaa and blockdesc else 0, 0, len(blockdesc))
    return Answer("MODE_SENSE", _alloc(head + blockdesc + body, length))


def _mode_select(unit: UnitState, cdb: bytes) -> Op:
    six = cdb[0] == MODE_SELECT_6
    length = cdb[4] if six else int.from_bytes(cdb[7:9], "big")
    if cdb[1] & 0x01:                              # SP: saving is not supported
        raise _refuse(SAVING_NOT_SUPPORTED)
    return ModeSelect(six, length)


def mode_select(op: ModeSelect, data: bytes, d_sense: bool, *,
                wce: bool = True) -> bool | Result:
    """The MODE SELECT parameter list applied to the mode state: the new D_SENSE, or the
    refusal (then nothing changes)."""
    if op.length == 0:
        return d_sense
    hlen = 4 if op.six else 8
    if len(data) < hlen:
        return check(PARAMETER_LIST_LENGTH)
    bdl = data[3] if op.six else int.from_bytes(data[6:8], "big")
    pos = hlen + bdl
    current = mode_pages(0, d_sense, wce=wce)
    changeable = mode_pages(1, d_sense, wce=wce)
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
    return d_sense


# ---- persistent reservations -----------------------------------------------------------
def _prin(unit: UnitState, cdb: bytes) -> Op:
    action, length = cdb[1] & 0x1F, int.from_bytes(cdb[7:9], "big")
    if unit.reservations.prin(action) is None:
        raise _refuse(INVALID_FIELD_IN_CDB, 1)
    return PrIn(action, length)


def prin(reservations: Reservations, op: PrIn) -> Result:
    return _alloc(reservations.prin(op.action) or b"", op.length)


def _prout(cdb: bytes, nexus: Nexus) -> Op | Result:
    action, scope, rtype = cdb[1] & 0x1F, cdb[2] >> 4, cdb[2] & 0x0F
    length = int.from_bytes(cdb[5:9], "big")
    if length > 4096:
        return check(PARAMETER_LIST_LENGTH)
    return PrOut(nexus, action, scope, rtype, length)


# ---- reporting -------------------------------------------------------------------------
def _report_luns(unit: UnitState, cdb: bytes) -> Op:
    length = int.from_bytes(cdb[6:10], "big")
    if length < 16:
        raise _refuse(INVALID_FIELD_IN_CDB, 6)
    if cdb[2] not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
        raise _refuse(INVALID_FIELD_IN_CDB, 2)
    lun0 = cdb[2] in (0x00, 0x02, 0x11)
    data = struct.pack(">I4x", 8 if lun0 else 0) + (bytes(8) if lun0 else b"")
    return Answer("REPORT_LUNS", _alloc(data, length))


def _service_action_in(unit: UnitState, cdb: bytes) -> Op:
    sa = cdb[1] & 0x1F
    if sa == SA_READ_CAPACITY_16:
        return _read_capacity_16(unit, cdb)
    if sa == SA_GET_LBA_STATUS:
        return _get_lba_status(unit, cdb)
    raise _refuse(INVALID_FIELD_IN_CDB, 1)


def _maintenance_in(unit: UnitState, cdb: bytes) -> Op:
    sa = cdb[1] & 0x1F
    length = int.from_bytes(cdb[6:10], "big")
    if sa == SA_REPORT_TMFS:
        # ABORT TASK, ABORT TASK SET, LOGICAL UNIT RESET, TARGET RESET
        data = bytes([0x80 | 0x40 | 0x08 | 0x02, 0, 0, 0])
        return Answer("REPORT_SUPPORTED_TMFS", _alloc(data, length))
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
        return Answer("REPORT_SUPPORTED_OPCODES", _alloc(data, length))
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
    return Answer("REPORT_SUPPORTED_OPCODES", _alloc(data, length))


_HANDLERS: Final[dict[int, Callable[[UnitState, bytes], Op]]] = {
    TEST_UNIT_READY: _test_unit_ready, REQUEST_SENSE: _request_sense,
    READ_6: _read, READ_10: _read, READ_12: _read, READ_16: _read,
    WRITE_6: _write, WRITE_10: _write, WRITE_12: _write, WRITE_16: _write,
    WRITE_VERIFY_10: _write, WRITE_VERIFY_12: _write, WRITE_VERIFY_16: _write,
    VERIFY_10: _verify, VERIFY_12: _verify, VERIFY_16: _verify,
    INQUIRY: _inquiry, MODE_SENSE_6: _mode_sense, MODE_SENSE_10: _mode_sense,
    MODE_SELECT_6: _mode_select, MODE_SELECT_10: _mode_select,
    START_STOP_UNIT: _start_stop, PREVENT_ALLOW: _prevent_allow,
    READ_CAPACITY_10: _read_capacity_10, SERVICE_ACTION_IN_16: _service_action_in,
    PRE_FETCH_10: _pre_fetch, PRE_FETCH_16: _pre_fetch,
    SYNCHRONIZE_CACHE_10: _sync_cache, SYNCHRONIZE_CACHE_16: _sync_cache,
    WRITE_SAME_10: _write_same, WRITE_SAME_16: _write_same, UNMAP: _unmap,
    COMPARE_AND_WRITE: _compare_and_write, REPORT_LUNS: _report_luns,
    MAINTENANCE_IN: _maintenance_in, PERSISTENT_RESERVE_IN: _prin,
    PERSISTENT_RESERVE_OUT: _prin,        # (not used: decode() sends it to _prout)
}
PROUT_ANSWERS: Final[dict[str, Result]] = {
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
