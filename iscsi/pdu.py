"""iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment of every opcode, AHS, the
data segment with its padding, and the optional CRC32C header and data digests.

Pure code: ``encode`` turns a PDU value into bytes, ``PDUReader`` turns a byte stream (fed
in any pieces, one byte at a time if need be) into PDU values. Input that cannot be framed
or decoded raises ``ProtocolError``, which carries the Reject reason the target answers
with and whether the connection can go on afterwards.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import crc32c as _crc32c

BHS_LEN: Final = 48
RESERVED_TAG: Final = 0xFFFFFFFF
DEFAULT_MAX_RECV: Final = 8192          # MaxRecvDataSegmentLength before/while logging in

# Initiator opcodes
OP_NOP_OUT: Final = 0x00
OP_SCSI_CMD: Final = 0x01
OP_TASK_MGMT_REQ: Final = 0x02
OP_LOGIN_REQ: Final = 0x03
OP_TEXT_REQ: Final = 0x04
OP_DATA_OUT: Final = 0x05
OP_LOGOUT_REQ: Final = 0x06
OP_SNACK: Final = 0x10
# Target opcodes
OP_NOP_IN: Final = 0x20
OP_SCSI_RSP: Final = 0x21
OP_TASK_MGMT_RSP: Final = 0x22
OP_LOGIN_RSP: Final = 0x23
OP_TEXT_RSP: Final = 0x24
OP_DATA_IN: Final = 0x25
OP_LOGOUT_RSP: Final = 0x26
OP_R2T: Final = 0x31
OP_ASYNC: Final = 0x32
OP_REJECT: Final = 0x3F

# Reject reasons (RFC 7143 §11.17.1)
REJECT_DATA_DIGEST: Final = 0x02
REJECT_SNACK: Final = 0x03
REJECT_PROTOCOL_ERROR: Final = 0x04
REJECT_NOT_SUPPORTED: Final = 0x05
REJECT_IMMEDIATE: Final = 0x06
REJECT_TASK_IN_PROGRESS: Final = 0x07
REJECT_INVALID_DATA_ACK: Final = 0x08
REJECT_INVALID_FIELD: Final = 0x09
REJECT_OUT_OF_RESOURCES: Final = 0x0A
REJECT_WAITING_FOR_LOGOUT: Final = 0x0C


class ProtocolError(Exception):
    """The initiator broke the protocol. ``reason`` is the Reject reason to answer with,
    ``header`` the offending BHS (sent back in the Reject), ``fatal`` whether the
    connection must close afterwards (framing can no longer be trusted)."""

    def __init__(self, message: str, *, reason: int = REJECT_PROTOCOL_ERROR,
                 header: bytes = b"", fatal: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.header = header
        self.fatal = fatal


Payload = bytes | bytearray | memoryview


def crc32c(data: Payload, value: int = 0) -> int:
    return int(_crc32c.crc32c(data, value))


def pad4(n: int) -> int:
    return -n % 4


@dataclass(slots=True, kw_only=True)
class PDU:
    """One PDU. Subclasses describe their BHS by LAYOUT (field, byte offset, struct format),
    BITS (bool fields in byte 1) and FIELDS1 (small integers in byte 1: shift, mask).

    Each class's layout is compiled once, at import (``_compile``), into a struct for the
    whole BHS and two functions written for that class (as ``dataclasses`` writes
    ``__init__``), so a header is encoded or decoded in one call, without loops over the
    layout: these run for every PDU of every command.
    """

    OPCODE: ClassVar[int] = -1
    B1_FIXED: ClassVar[int] = 0
    LAYOUT: ClassVar[tuple[tuple[str, int, str], ...]] = ()
    BITS: ClassVar[tuple[tuple[str, int], ...]] = ()
    FIELDS1: ClassVar[tuple[tuple[str, int, int], ...]] = ()
    _PACK: ClassVar[Callable[[PDU], bytes]]
    _UNPACK: ClassVar[Callable[..., PDU]]   # (buffer, ahs, data, pos=0): BHS at pos

    immediate: bool = False
    ahs: bytes = b""
    data: Payload = b""

    def bhs(self) -> bytes:
        return type(self)._PACK(self)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes = b"", data: Payload = b"") -> PDU:
        return cls._UNPACK(bhs, ahs, data)

    @property
    def name(self) -> str:
        return type(self).__name__


def _compile(cls: type[PDU]) -> None:
    """``cls._PACK`` (PDU -> 48-byte BHS) and ``cls._UNPACK`` (BHS, AHS, data -> PDU).

    The struct covers byte 0 (opcode, I bit), byte 1 (BITS, FIELDS1), the LAYOUT fields
    before byte 4, bytes 4-7 as one u32 (TotalAHSLength << 24 | DataSegmentLength) and
    the other fields, in offset order with pad bytes between.
    """
    fields = sorted(cls.LAYOUT, key=lambda f: f[1])
    early = [f for f in fields if f[1] < 4]
    late = [f for f in fields if f[1] >= 8]
    if len(early) + len(late) != len(fields):
        raise TypeError(f"{cls.__name__}: a LAYOUT field overlaps bytes 4-7 (lengths)")
    items = [(0, "B"), (1, "B"), *((off, fmt) for _n, off, fmt in early), (4, "I"),
             *((off, fmt) for _n, off, fmt in late)]
    fmt, pos = ">", 0
    for off, f in items:
        if off < pos:
            raise TypeError(f"{cls.__name__}: LAYOUT fields overlap at byte {off}")
        fmt += "x" * (off - pos) + f
        pos = off + struct.calcsize(">" + f)
    layout = struct.Struct(fmt + "x" * (BHS_LEN - pos))
    if layout.size != BHS_LEN:
        raise TypeError(f"{cls.__name__}: the BHS layout is {layout.size} bytes")
    known = {f.name for f in dataclasses.fields(cls)}
    for name in [n for n, _m in cls.BITS] + [n for n, _s, _m in cls.FIELDS1] + \
            [n for n, _o, _f in fields]:
        if not name.isidentifier() or name not in known:
            raise TypeError(f"{cls.__name__}: {name!r} is not a field")
    b1 = " | ".join([str(cls.B1_FIXED)]
                    + [f"({mask} if p.{n} else 0)" for n, mask in cls.BITS]
                    + [f"((p.{n} & {mask}) << {shift})" for n, shift, mask in cls.FIELDS1])
    pack_args = ", ".join([f"{cls.OPCODE} | (64 if p.immediate else 0)", b1,
                           *(f"p.{n}" for n, _o, _f in early),
                           "len(p.ahs) << 22 | len(p.data)",
                           *(f"p.{n}" for n, _o, _f in late)])
    targets = ", ".join(["b0", "b1", *(n for n, _o, _f in early), "_lengths",
                         *(n for n, _o, _f in late)])
    # unpack fills a new instance field by field (cheaper than a call with a keyword per
    # field); every field of the class must come from the BHS, the AHS or the data.
    sets = ["immediate = bool(b0 & 64)", "ahs = ahs", "data = data",
            *(f"{n} = bool(b1 & {mask})" for n, mask in cls.BITS),
            *(f"{n} = (b1 >> {shift}) & {mask}" for n, shift, mask in cls.FIELDS1),
            *(f"{n} = {n}" for n, _o, _f in fields)]
    if len(sets) != len(known):
        raise TypeError(f"{cls.__name__}: a field is neither in the BHS nor AHS/data")
    body = "".join(f"    p.{line}\n" for line in sets)
    source = (f"def pack(p):\n    return _pack({pack_args})\n"
              f"def unpack(bhs, ahs, data, pos=0):\n"
              f"    {targets}, = _unpack(bhs, pos)\n"
              f"    p = _new(cls)\n{body}    return p\n")
    namespace: dict[str, Any] = {"_pack": layout.pack, "_unpack": layout.unpack_from,
                                 "_new": object.__new__, "cls": cls}
    exec(compile(source, f"<iscsi.pdu {cls.__name__}>", "exec"), namespace)
    cls._PACK = staticmethod(namespace["pack"])
    cls._UNPACK = staticmethod(namespace["unpack"])


# ---- initiator PDUs -----------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class NopOut(PDU):
    OPCODE = OP_NOP_OUT
    B1_FIXED = 0x80
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("ttt", 20, "I"), ("cmdsn", 24, "I"),
              ("exp_statsn", 28, "I"))
    lun: int = 0
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0


@dataclass(slots=True, kw_only=True)
class ScsiCommand(PDU):
    OPCODE = OP_SCSI_CMD
    BITS = (("final", 0x80), ("read", 0x40), ("write", 0x20))
    FIELDS1 = (("attr", 0, 0x07),)
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("edtl", 20, "I"), ("cmdsn", 24, "I"),
              ("exp_statsn", 28, "I"), ("cdb16", 32, "16s"))
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 1
    lun: int = 0
    itt: int = 0
    edtl: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    cdb16: bytes = bytes(16)

    @property
    def cdb(self) -> bytes:
        """The CDB: the BHS's 16 bytes plus an Extended CDB AHS (type 1) if present."""
        ahs = self.ahs
        while len(ahs) >= 4:
            length = int.from_bytes(ahs[0:2], "big")
            if ahs[2] == 1:
                return self.cdb16 + ahs[4:3 + length]
            ahs = ahs[4 + length + pad4(length):]
        return self.cdb16


@dataclass(slots=True, kw_only=True)
class TaskMgmtRequest(PDU):
    OPCODE = OP_TASK_MGMT_REQ
    B1_FIXED = 0x80
    FIELDS1 = (("function", 0, 0x7F),)
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("rtt", 20, "I"), ("cmdsn", 24, "I"),
              ("exp_statsn", 28, "I"), ("ref_cmdsn", 32, "I"), ("exp_datasn", 36, "I"))
    function: int = 0
    lun: int = 0
    itt: int = 0
    rtt: int = RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0
    ref_cmdsn: int = 0
    exp_datasn: int = 0


@dataclass(slots=True, kw_only=True)
class LoginRequest(PDU):
    OPCODE = OP_LOGIN_REQ
    BITS = (("transit", 0x80), ("cont", 0x40))
    FIELDS1 = (("csg", 2, 0x03), ("nsg", 0, 0x03))
    LAYOUT = (("version_max", 2, "B"), ("version_min", 3, "B"), ("isid", 8, "6s"),
              ("tsih", 14, "H"), ("itt", 16, "I"), ("cid", 20, "H"), ("cmdsn", 24, "I"),
              ("exp_statsn", 28, "I"))
    immediate: bool = True
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0


@dataclass(slots=True, kw_only=True)
class TextRequest(PDU):
    OPCODE = OP_TEXT_REQ
    BITS = (("final", 0x80), ("cont", 0x40))
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("ttt", 20, "I"), ("cmdsn", 24, "I"),
              ("exp_statsn", 28, "I"))
    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0


@dataclass(slots=True, kw_only=True)
class DataOut(PDU):
    OPCODE = OP_DATA_OUT
    BITS = (("final", 0x80),)
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("ttt", 20, "I"), ("exp_statsn", 28, "I"),
              ("datasn", 36, "I"), ("offset", 40, "I"))
    final: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    exp_statsn: int = 0
    datasn: int = 0
    offset: int = 0


@dataclass(slots=True, kw_only=True)
class LogoutRequest(PDU):
    OPCODE = OP_LOGOUT_REQ
    B1_FIXED = 0x80
    FIELDS1 = (("reason", 0, 0x7F),)
    LAYOUT = (("itt", 16, "I"), ("cid", 20, "H"), ("cmdsn", 24, "I"),
              ("exp_statsn", 28, "I"))
    reason: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0


@dataclass(slots=True, kw_only=True)
class Snack(PDU):
    OPCODE = OP_SNACK
    B1_FIXED = 0x80
    FIELDS1 = (("type", 0, 0x0F),)
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("ttt", 20, "I"), ("exp_statsn", 28, "I"),
              ("begrun", 40, "I"), ("runlength", 44, "I"))
    type: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    exp_statsn: int = 0
    begrun: int = 0
    runlength: int = 0


# ---- target PDUs --------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class NopIn(PDU):
    OPCODE = OP_NOP_IN
    B1_FIXED = 0x80
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("ttt", 20, "I"), ("statsn", 24, "I"),
              ("exp_cmdsn", 28, "I"), ("max_cmdsn", 32, "I"))
    lun: int = 0
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0


@dataclass(slots=True, kw_only=True)
class ScsiResponse(PDU):
    OPCODE = OP_SCSI_RSP
    B1_FIXED = 0x80
    BITS = (("bidi_overflow", 0x10), ("bidi_underflow", 0x08), ("overflow", 0x04),
            ("underflow", 0x02))
    LAYOUT = (("response", 2, "B"), ("status", 3, "B"), ("itt", 16, "I"),
              ("snack_tag", 20, "I"), ("statsn", 24, "I"), ("exp_cmdsn", 28, "I"),
              ("max_cmdsn", 32, "I"), ("exp_datasn", 36, "I"), ("bidi_residual", 40, "I"),
              ("residual", 44, "I"))
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    overflow: bool = False
    underflow: bool = False
    response: int = 0
    status: int = 0
    itt: int = 0
    snack_tag: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    exp_datasn: int = 0
    bidi_residual: int = 0
    residual: int = 0


@dataclass(slots=True, kw_only=True)
class TaskMgmtResponse(PDU):
    OPCODE = OP_TASK_MGMT_RSP
    B1_FIXED = 0x80
    LAYOUT = (("response", 2, "B"), ("itt", 16, "I"), ("statsn", 24, "I"),
              ("exp_cmdsn", 28, "I"), ("max_cmdsn", 32, "I"))
    response: int = 0
    itt: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0


@dataclass(slots=True, kw_only=True)
class LoginResponse(PDU):
    OPCODE = OP_LOGIN_RSP
    BITS = (("transit", 0x80), ("cont", 0x40))
    FIELDS1 = (("csg", 2, 0x03), ("nsg", 0, 0x03))
    LAYOUT = (("version_max", 2, "B"), ("version_active", 3, "B"), ("isid", 8, "6s"),
              ("tsih", 14, "H"), ("itt", 16, "I"), ("statsn", 24, "I"),
              ("exp_cmdsn", 28, "I"), ("max_cmdsn", 32, "I"), ("status_class", 36, "B"),
              ("status_detail", 37, "B"))
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    itt: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0


@dataclass(slots=True, kw_only=True)
class TextResponse(PDU):
    OPCODE = OP_TEXT_RSP
    BITS = (("final", 0x80), ("cont", 0x40))
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("ttt", 20, "I"), ("statsn", 24, "I"),
              ("exp_cmdsn", 28, "I"), ("max_cmdsn", 32, "I"))
    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0


@dataclass(slots=True, kw_only=True)
class DataIn(PDU):
    OPCODE = OP_DATA_IN
    BITS = (("final", 0x80), ("ack", 0x40), ("overflow", 0x04), ("underflow", 0x02),
            ("has_status", 0x01))
    LAYOUT = (("status", 3, "B"), ("lun", 8, "Q"), ("itt", 16, "I"), ("ttt", 20, "I"),
              ("statsn", 24, "I"), ("exp_cmdsn", 28, "I"), ("max_cmdsn", 32, "I"),
              ("datasn", 36, "I"), ("offset", 40, "I"), ("residual", 44, "I"))
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    has_status: bool = False
    status: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    datasn: int = 0
    offset: int = 0
    residual: int = 0


@dataclass(slots=True, kw_only=True)
class LogoutResponse(PDU):
    OPCODE = OP_LOGOUT_RSP
    B1_FIXED = 0x80
    LAYOUT = (("response", 2, "B"), ("itt", 16, "I"), ("statsn", 24, "I"),
              ("exp_cmdsn", 28, "I"), ("max_cmdsn", 32, "I"), ("time2wait", 40, "H"),
              ("time2retain", 42, "H"))
    response: int = 0
    itt: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0


@dataclass(slots=True, kw_only=True)
class R2T(PDU):
    OPCODE = OP_R2T
    B1_FIXED = 0x80
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("ttt", 20, "I"), ("statsn", 24, "I"),
              ("exp_cmdsn", 28, "I"), ("max_cmdsn", 32, "I"), ("r2tsn", 36, "I"),
              ("offset", 40, "I"), ("length", 44, "I"))
    lun: int = 0
    itt: int = 0
    ttt: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    r2tsn: int = 0
    offset: int = 0
    length: int = 0


@dataclass(slots=True, kw_only=True)
class AsyncMessage(PDU):
    OPCODE = OP_ASYNC
    B1_FIXED = 0x80
    LAYOUT = (("lun", 8, "Q"), ("itt", 16, "I"), ("statsn", 24, "I"), ("exp_cmdsn", 28, "I"),
              ("max_cmdsn", 32, "I"), ("event", 36, "B"), ("vcode", 37, "B"),
              ("param1", 38, "H"), ("param2", 40, "H"), ("param3", 42, "H"))
    lun: int = 0
    itt: int = RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    event: int = 0
    vcode: int = 0
    param1: int = 0
    param2: int = 0
    param3: int = 0


@dataclass(slots=True, kw_only=True)
class Reject(PDU):
    OPCODE = OP_REJECT
    B1_FIXED = 0x80
    LAYOUT = (("reason", 2, "B"), ("itt", 16, "I"), ("statsn", 24, "I"),
              ("exp_cmdsn", 28, "I"), ("max_cmdsn", 32, "I"), ("datasn", 36, "I"))
    reason: int = 0
    itt: int = RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    datasn: int = 0


PDU_TYPES: Final[dict[int, type[PDU]]] = {cls.OPCODE: cls for cls in (
    NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut, LogoutRequest,
    Snack, NopIn, ScsiResponse, TaskMgmtResponse, LoginResponse, TextResponse, DataIn,
    LogoutResponse, R2T, AsyncMessage, Reject)}
INITIATOR_OPCODES: Final = frozenset((OP_NOP_OUT, OP_SCSI_CMD, OP_TASK_MGMT_REQ, OP_LOGIN_REQ,
                                      OP_TEXT_REQ, OP_DATA_OUT, OP_LOGOUT_REQ, OP_SNACK))
TARGET_OPCODES: Final = frozenset(PDU_TYPES) - INITIATOR_OPCODES
for _cls in PDU_TYPES.values():
    _compile(_cls)


def encode(pdu: PDU, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
    """The PDU on the wire: BHS, AHS, header digest, data, padding, data digest."""
    return b"".join(encode_pieces(pdu, header_digest=header_digest, data_digest=data_digest))


_PADS: Final = (b"", b"\0", b"\0\0", b"\0\0\0")
_LENGTHS: Final = struct.Struct(">I")     # bytes 4-7: TotalAHSLength, DataSegmentLength


def encode_pieces(pdu: PDU, *, header_digest: bool = False,
                  data_digest: bool = False) -> list[Payload]:
    """``encode`` as buffers to send back to back: the data segment is not copied."""
    data, ahs = pdu.data, pdu.ahs
    if ahs and (len(ahs) % 4 or len(ahs) > 255 * 4):
        raise ValueError("AHS must be a multiple of 4 bytes, at most 1020")
    if len(data) >= 1 << 24:
        raise ValueError("data segment longer than 16 MiB")
    head = pdu.bhs() + ahs if ahs else pdu.bhs()
    if header_digest:
        head += crc32c(head).to_bytes(4, "little")
    if not data:
        return [head]
    pad = _PADS[-len(data) % 4]
    parts: list[Payload] = [head, data]
    if pad:
        parts.append(pad)
    if data_digest:
        parts.append(crc32c(pad, crc32c(data)).to_bytes(4, "little"))
    return parts


# The two answers nearly every command gets, packed straight from their fields: a read's
# only Data-In, carrying its GOOD status (F and S bits; LUN, DataSN, offset and residual
# zero), and a SCSI Response with GOOD status and nothing else. Byte for byte what
# ``encode_pieces`` makes of the same DataIn / ScsiResponse (tests/unit/test_iscsi_proto.py)
# without building the PDU value first: these run once per command.
_DATA_IN_STATUS: Final = struct.Struct(">BBxBI8xIIIII12x")
_GOOD_RESPONSE: Final = struct.Struct(">BBxBI8xI4xIII12x")


def data_in_with_status(itt: int, statsn: int, exp_cmdsn: int, max_cmdsn: int,
                        data: Payload, *, header_digest: bool = False,
                        data_digest: bool = False) -> list[Payload]:
    """``encode_pieces(DataIn(final=True, has_status=True, status=GOOD, ...))``."""
    n = len(data)
    if not 0 < n < 1 << 24:
        raise ValueError("a Data-In segment is 1 byte to 16 MiB")
    head = _DATA_IN_STATUS.pack(OP_DATA_IN, 0x81, 0, n, itt, RESERVED_TAG, statsn,
                                exp_cmdsn, max_cmdsn)
    if header_digest:
        head += crc32c(head).to_bytes(4, "little")
    pad = _PADS[-n % 4]
    parts: list[Payload] = [head, data, pad] if pad else [head, data]
    if data_digest:
        parts.append(crc32c(pad, crc32c(data)).to_bytes(4, "little"))
    return parts


_DATA_IN: Final = struct.Struct(">BBxBIQIIIIIIII")
DATA_IN_FINAL: Final = 0x80
DATA_IN_OVERFLOW: Final = 0x04
DATA_IN_UNDERFLOW: Final = 0x02
DATA_IN_STATUS: Final = 0x01


def data_in_gathered(flags: int, status: int, lun: int, itt: int, statsn: int,
                     exp_cmdsn: int, max_cmdsn: int, datasn: int, offset: int,
                     residual: int, data: Sequence[Payload], size: int, *,
                     header_digest: bool = False,
                     data_digest: bool = False) -> list[Payload]:
    """``encode_pieces(DataIn(...))`` whose data segment is ``data`` sent back to back
    (``size`` bytes in all, byte-format buffers): one PDU of several buffers, none
    copied, so that a segment may gather several of a read's blocks. ``flags`` are the
    DATA_IN_* bits."""
    if not 0 < size < 1 << 24:
        raise ValueError("a Data-In segment is 1 byte to 16 MiB")
    head = _DATA_IN.pack(OP_DATA_IN, flags, status, size, lun, itt, RESERVED_TAG, statsn,
                         exp_cmdsn, max_cmdsn, datasn, offset, residual)
    if header_digest:
        head += crc32c(head).to_bytes(4, "little")
    pad = _PADS[-size % 4]
    parts: list[Payload] = [head, *data, pad] if pad else [head, *data]
    if data_digest:
        crc = 0
        for piece in data:
            crc = crc32c(piece, crc)
        parts.append(crc32c(pad, crc).to_bytes(4, "little"))
    return parts


def good_response(itt: int, statsn: int, exp_cmdsn: int, max_cmdsn: int, *,
                  header_digest: bool = False) -> bytes:
    """``encode(ScsiResponse(status=GOOD, ...))``."""
    head = _GOOD_RESPONSE.pack(OP_SCSI_RSP, 0x80, 0, 0, itt, statsn, exp_cmdsn, max_cmdsn)
    if header_digest:
        head += crc32c(head).to_bytes(4, "little")
    return head


def decode(bhs: bytes, ahs: bytes = b"", data: Payload = b"") -> PDU:
    """A PDU from its parts (``bhs`` exactly 48 bytes); unknown opcodes raise."""
    if len(bhs) != BHS_LEN:
        raise ProtocolError("BHS must be 48 bytes", header=bytes(bhs))
    cls = PDU_TYPES.get(bhs[0] & 0x3F)
    if cls is None:
        raise ProtocolError(f"unknown opcode {bhs[0] & 0x3F:#04x}",
                            reason=REJECT_NOT_SUPPORTED, header=bytes(bhs), fatal=False)
    return cls.from_bhs(bytes(bhs), bytes(ahs), bytes(data))


RECV_ROOM: Final = 256 * 1024   # free room the reader's buffer offers a receive


class PDUReader:
    """Frames a byte stream into PDUs. Digests and the longest data segment accepted are
    settings that change when login completes.

    The stream is kept in one buffer that is reused, never shrunk: bytes ``[_start,
    _end)`` are received and not yet framed. The transport receives straight into its
    free room (``room`` / ``received``: one copy, by the kernel, into memory already
    mapped), or hands bytes to ``receive_data``. A buffer that grows with each receive
    and shrinks as PDUs are taken from its front is reallocated again and again, and
    fresh memory costs a page fault per 4 KiB to fill; this one only moves the tail of a
    partial PDU to the front when the room runs short, and grows (to a new buffer) only
    when a PDU is longer than the room."""

    def __init__(self, *, max_data: int = DEFAULT_MAX_RECV, opcodes: frozenset[int]
                 = INITIATOR_OPCODES) -> None:
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False
        self.opcodes = opcodes
        self._buf = bytearray()
        self._start = 0
        self._end = 0
        self._skip = 0          # bytes of a refused data segment still to discard

    def room(self, want: int = RECV_ROOM) -> memoryview:
        """Free room at the end of the buffer, at least ``want`` bytes, for the transport
        to receive into; then call ``received`` with the count. (The buffer is replaced,
        never resized, so a view handed out earlier never blocks it.)"""
        buf, start, end = self._buf, self._start, self._end
        if start == end:
            start = end = self._start = self._end = 0
        if len(buf) - end < want:
            held = end - start
            if held + want > len(buf):
                # (a new buffer: the bytes held, then room for what is wanted, and more,
                # so that a partial PDU is moved to the front seldom)
                new = bytearray(max(2 * len(buf), 4 * want, held + want))
                with memoryview(buf) as old:
                    new[:held] = old[start:end]
                self._buf = buf = new
            elif held:
                with memoryview(buf) as view:
                    view[:held] = view[start:end]        # (a memmove)
            self._start, self._end = 0, held
            end = held
        return memoryview(buf)[end:]

    def received(self, n: int) -> None:
        """``n`` bytes were written at the start of the last ``room``."""
        if n < 0 or self._end + n > len(self._buf):
            raise ValueError("received more than the room offered")
        self._end += n

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n:
            with self.room(n) as view:
                view[:n] = data
            self._end += n

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def next_pdu(self) -> PDU | None:
        """The next whole PDU, or None if more bytes are needed."""
        buf, start = self._buf, self._start
        if self._end - start < BHS_LEN or self._skip or self.header_digest \
                or self.data_digest or buf[start + 4]:
            return self._next_general()
        # The common case, without digests or AHS: one unpack straight from the buffer.
        dlen = _LENGTHS.unpack_from(buf, start + 4)[0] & 0xFFFFFF
        total = BHS_LEN + dlen + (-dlen & 3)
        if dlen > self.max_data or self._end - start < total:
            return self._next_general()
        cls = PDU_TYPES.get(buf[start] & 0x3F)
        if cls is None or cls.OPCODE not in self.opcodes:
            return self._next_general()
        if dlen:
            with memoryview(buf) as view:
                data = bytes(view[start + BHS_LEN:start + BHS_LEN + dlen])
        else:
            data = b""
        pdu = cls._UNPACK(buf, b"", data, start)
        self._start = start + total
        return pdu

    def _next_general(self) -> PDU | None:
        buf = self._buf
        if self._skip:
            n = min(self._skip, self._end - self._start)
            self._start += n
            self._skip -= n
            if self._skip:
                return None
        start = self._start
        have = self._end - start
        if have < BHS_LEN:
            return None
        ahs_len = buf[start + 4] * 4
        dlen = int.from_bytes(buf[start + 5:start + 8], "big")
        hd = 4 if self.header_digest else 0
        head_end = BHS_LEN + ahs_len
        if have < head_end + hd:
            return None
        bhs = bytes(buf[start:start + BHS_LEN])
        with memoryview(buf) as whole, whole[start:self._end] as view:
            if hd:
                want = int.from_bytes(view[head_end:head_end + 4], "little")
                if crc32c(view[:head_end]) != want:
                    # The header cannot be trusted, so neither can the framing after it.
                    raise ProtocolError("header digest error", header=bhs)
            opcode = bhs[0] & 0x3F
            if dlen > self.max_data:
                raise ProtocolError(f"data segment of {dlen} bytes is longer than the "
                                    f"negotiated {self.max_data}", header=bhs)
            dd = 4 if self.data_digest and dlen else 0
            total = head_end + hd + dlen + pad4(dlen) + dd
            if have < total:
                return None
            ahs = bytes(view[BHS_LEN:head_end]) if ahs_len else b""
            dstart = head_end + hd
            # one copy of the data segment, out of the buffer
            good = not dd or crc32c(view[dstart:dstart + dlen + pad4(dlen)]) == \
                int.from_bytes(view[total - 4:total], "little")
            data = bytes(view[dstart:dstart + dlen]) if good and dlen else b""
        self._start = start + total
        if not good:
            raise ProtocolError("data digest error", reason=REJECT_DATA_DIGEST, header=bhs,
                                fatal=opcode == OP_DATA_OUT)
        if opcode not in self.opcodes:
            raise ProtocolError(f"opcode {opcode:#04x} is not sent by this side",
                                reason=REJECT_NOT_SUPPORTED, header=bhs, fatal=False)
        return decode(bhs, ahs, data)


# ---- text key=value segments (RFC 7143 §6) ---------------------------------------------
MAX_KEY_LEN: Final = 63
MAX_VALUE_LEN: Final = 8192


def parse_text(segment: Payload) -> list[tuple[str, str]]:
    """``key=value`` pairs, each NUL-terminated; raises ProtocolError on bad framing."""
    data = bytes(segment)
    out: list[tuple[str, str]] = []
    if not data:
        return out
    if data[-1:] != b"\0":
        data += b"\0"
    for item in data[:-1].split(b"\0"):
        if not item:
            continue       # tolerate padding NULs some initiators add
        key, sep, value = item.partition(b"=")
        if not sep or not key or len(key) > MAX_KEY_LEN or len(value) > MAX_VALUE_LEN:
            raise ProtocolError(f"malformed text key {item[:80]!r}", fatal=False)
        try:
            out.append((key.decode("utf-8"), value.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise ProtocolError(f"text key is not UTF-8: {item[:80]!r}", fatal=False) from e
    return out


def format_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
