"""The NBD protocol, server side, as a pure state machine (no I/O, no trio; like h11).

Feed bytes with ``receive_data``; pull events with ``next_event`` until it returns
``NEED_DATA``; send what ``data_to_send`` returns after each event. The handshake (fixed
newstyle, NetworkBlockDevice/nbd doc/proto.md) is answered entirely inside, from the export
``Catalog`` it is given; the transport only sees:

- ``StartTLS``: send pending bytes, run the TLS handshake, call ``tls_started``;
- ``Transmission``: an export was selected with NBD_OPT_GO / NBD_OPT_EXPORT_NAME;
- ``Command``: a request, already validated (bad requests are answered here, with the
  spec's error, and never reach the transport);
- ``Disconnect``: NBD_OPT_ABORT or NBD_CMD_DISC; close after sending pending bytes.

A peer that breaks framing (wrong magic, truncated handshake, a write payload too large to
skip) raises ``RemoteProtocolError``: send pending bytes and drop the connection.

Memory (issue 20 item 6). Invariants of the receiving side:
P1. A WRITE header is validated (length against the advertised maximum, range, flags,
    read-only) before any memory is set aside for its payload; a refused write's payload is
    skipped without being stored, and its error reply is queued once the payload is past.
P2. A payload of DIRECT_PAYLOAD bytes or more that has not arrived whole with its header
    gets its buffer only when the transport asks for it (``receive_buffer``, or
    ``receive_data`` with payload bytes): ``payload_wanted`` says how large it will be, so
    the transport can account for the memory first. A peer that sends a header and no
    payload costs no buffer.
P3. Apart from the payload buffers, the connection holds at most one option
    (MAX_OPTION_DATA), one partial request header and what one receive brought.

Replies to commands are built by ``reply_*`` methods, which return bytes.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, Protocol

# ---- handshake constants (proto.md "Values") --------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ---- transmission constants ---------------------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
                 CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
                 CMD_BLOCK_STATUS: "BLOCK_STATUS"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
# Which command flags each command may carry. FUA is valid on every command once
# SEND_FUA is advertised (proto.md: the server MUST accept it, even by ignoring it).
ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF, CMD_WRITE: CMD_FLAG_FUA, CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA, CMD_TRIM: CMD_FLAG_FUA, CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0                   # qemu:dirty-bitmap: the block changed

# NBD error values (proto.md "Error values")
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO, errno.ENXIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL, errno.ENOENT: NBD_EINVAL, errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC, errno.EOVERFLOW: NBD_EOVERFLOW, errno.EFBIG: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP, errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

META_BASE_ALLOCATION = "base:allocation"
META_DIRTY_BITMAP = "qemu:dirty-bitmap:"   # + a snapshot: blocks changed since it
META_CONTEXT_ID = 1                        # the first context a client selects
MAX_OPTION_DATA = 64 * 1024        # no option we understand needs more
MAX_STRING = 4096                  # proto.md: strings MUST be no longer than 4096 bytes
MAX_PAYLOAD = 32 * 1024 * 1024     # advertised maximum payload
HARD_PAYLOAD_LIMIT = 64 * 1024 * 1024  # a write claiming more is treated as an attack
DIRECT_PAYLOAD = 64 * 1024         # writes this large are received into their own buffer

_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
REQUEST_SIZE = _REQUEST.size     # a request header's bytes
_SIMPLE = struct.Struct(">IIQ")
Data = bytes | memoryview        # what a reply is sent as (payloads are not joined)
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_AT = struct.Struct(">IHHQIQ")   # a chunk header and the offset that follows it


def nbd_error(code: int) -> int:
    """The NBD error value for an errno (EIO for anything unknown)."""
    return _ERRNO_TO_NBD.get(code, NBD_EIO)


class RemoteProtocolError(Exception):
    """The client broke the protocol so that the connection cannot go on."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD
    # What the export offers (the catalog copies them from the volume's capabilities);
    # the flags below are computed from these, never restated.
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    rotational: bool = False

    @property
    def transmission_flags(self) -> int:
        # DF is ours, not the export's: structured replies are a protocol feature.
        flags = TF_HAS_FLAGS | TF_SEND_DF
        writable = not self.read_only          # a read-only export offers no write command
        for offered, flag in ((self.read_only, TF_READ_ONLY),
                              (self.can_flush, TF_SEND_FLUSH),
                              (self.can_fua, TF_SEND_FUA),
                              (self.rotational, TF_ROTATIONAL),
                              (self.can_multi_conn, TF_CAN_MULTI_CONN),
                              (self.can_cache, TF_SEND_CACHE),
                              (writable and self.can_trim, TF_SEND_TRIM),
                              (writable and self.can_zero, TF_SEND_WRITE_ZEROES),
                              (writable and self.can_zero and self.can_fast_zero,
                               TF_SEND_FAST_ZERO)):
            if offered:
                flags |= flag
        return flags


class Catalog(Protocol):
    """What the handshake needs to know about exports (pure lookups, no I/O)."""

    def lookup(self, name: str) -> ExportInfo | None: ...

    def exports(self) -> Sequence[ExportInfo]: ...

    def bitmaps(self, name: str) -> Sequence[str]:
        """Snapshots whose changes an export can report (qemu:dirty-bitmap:NAME)."""
        ...


class TLSMode(Enum):
    OFF = "off"          # STARTTLS refused
    ON = "on"            # STARTTLS offered; plain clients allowed
    REQUIRE = "require"  # everything but STARTTLS/ABORT refused until TLS is up


@dataclass(frozen=True, slots=True)
class StartTLS:
    pass


@dataclass(frozen=True, slots=True)
class Transmission:
    export: ExportInfo
    structured: bool
    meta_context: bool


class Command(NamedTuple):
    """A validated request. A tuple, not a frozen dataclass: one is made per request, and
    a tuple is built in C (0.2 against 0.8 us), immutable all the same."""
    cookie: int
    kind: int
    flags: int
    offset: int
    length: int
    data: bytes | bytearray = b""

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.kind, str(self.kind))


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: str


Event = StartTLS | Transmission | Command | Disconnect


class Phase(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS_PENDING = "tls-pending"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ServerConnection:
    """One client connection's protocol state (server side)."""

    def __init__(self, catalog: Catalog, *, tls: TLSMode = TLSMode.OFF) -> None:
        self.catalog = catalog
        self.tls_mode = tls
        self.tls_active = False
        self.phase = Phase.CLIENT_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        self._meta_for: str | None = None    # export name the meta contexts were set for
        self._contexts: list[str] = []       # selected meta contexts; id = index + 1
        self._in = bytearray()
        self._out = bytearray()
        self._skip = 0                       # payload bytes of a refused write to discard
        self._skip_reply = b""               # its error reply, queued once they are past
        # A large write's payload is received straight into its own buffer (no copies
        # through _in): the header waits in _pending until the buffer is full.
        self._payload: bytearray | None = None
        self._payload_have = 0
        self._payload_len = 0                # of the payload in progress (0: none)
        self._pending: tuple[int, int, int, int, int] | None = None
        self._eof = False
        self._out += struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    # ---- bytes in and out ---------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
        elif self._pending is not None and self._payload is None:
            self._allocate_payload()
        rest: bytes | bytearray | memoryview = data
        if self._payload is not None:
            take = min(len(data), len(self._payload) - self._payload_have)
            self._payload[self._payload_have:self._payload_have + take] = (
                memoryview(data)[:take])
            self._payload_have += take
            rest = memoryview(data)[take:]
        self._in += rest

    def receive_buffer(self) -> memoryview | None:
        """Where the transport may receive the next bytes directly (``received_into``
        then says how many arrived): the rest of a large write's payload, else None."""
        if self._pending is not None and self._payload is None:
            self._allocate_payload()
        if self._payload is None:
            return None
        return memoryview(self._payload)[self._payload_have:]

    @property
    def payload_wanted(self) -> int:
        """Bytes of the write payload whose header is in and whose buffer is not yet
        allocated (0: none): the transport accounts for them before it receives (P2)."""
        return self._payload_len if self._payload is None else 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (outside of a payload buffer)."""
        return len(self._in)

    @property
    def in_request(self) -> bool:
        """Part of a request (header, payload, or a refused payload being skipped) has
        arrived and the rest has not: the transport times out a peer that stalls here."""
        return self.phase is Phase.TRANSMISSION and bool(
            self._in or self._skip or self._pending is not None)

    def _allocate_payload(self) -> None:
        """Give the pending write its own buffer; the payload bytes that came with the
        header move into it (P2)."""
        length = self._payload_len
        have = min(len(self._in), length)
        self._payload = bytearray(length)
        self._payload[:have] = memoryview(self._in)[:have]
        del self._in[:have]
        self._payload_have = have

    def received_into(self, n: int) -> None:
        if n == 0:
            self._eof = True
        self._payload_have += n

    @property
    def has_output(self) -> bool:
        """Bytes are waiting for ``data_to_send``."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        if self.phase is not Phase.TLS_PENDING:
            raise RuntimeError("tls_started outside of a STARTTLS exchange")
        self.tls_active = True
        self.phase = Phase.OPTIONS
        # Per proto.md, everything negotiated before STARTTLS is forgotten.
        self.structured = False
        self._meta_for = None
        self._contexts = []

    @property
    def meta_context(self) -> bool:
        return self.export is not None and self._meta_for == self.export.name

    @property
    def contexts(self) -> list[tuple[int, str]]:
        """(id, name) of each meta context BLOCK_STATUS answers for."""
        if not self.meta_context:
            return []
        return [(i + 1, c) for i, c in enumerate(self._contexts)]

    def _match_contexts(self, name: str, queries: list[str], listing: bool) -> list[str]:
        bitmaps = [META_DIRTY_BITMAP + b for b in self.catalog.bitmaps(name)]
        if listing and not queries:
            return [META_BASE_ALLOCATION, *bitmaps]
        out: list[str] = []
        for q in queries:
            if q == META_BASE_ALLOCATION or (listing and q == "base:"):
                found = [META_BASE_ALLOCATION]
            elif listing and q in ("qemu:", META_DIRTY_BITMAP):
                found = bitmaps
            else:
                found = [q] if q in bitmaps else []
            out += [c for c in found if c not in out]
        return out

    # ---- the event pump -----------------------------------------------------------------
    def next_event(self) -> Event | _NeedData:
        if self.phase is Phase.TRANSMISSION and not self._skip:
            # The request loop's own case first (no refused payload being skipped): what
            # the loop below does for it, without its checks of the other phases.
            ev = self._request()
            if ev is not None:
                return ev
        while True:
            if self.phase is Phase.CLOSED:
                raise RemoteProtocolError("connection already closed")
            if self.phase is Phase.TLS_PENDING:
                return NEED_DATA
            if self._skip:
                n = min(self._skip, len(self._in))
                del self._in[:n]
                self._skip -= n
                if self._skip:
                    return self._need()
                self._out += self._skip_reply
                self._skip_reply = b""
            if self.phase is Phase.CLIENT_FLAGS:
                if len(self._in) < 4:
                    return self._need()
                (flags,) = struct.unpack_from(">I", self._in)
                del self._in[:4]
                if flags & ~CLIENT_FLAGS_KNOWN or not flags & FLAG_FIXED_NEWSTYLE:
                    self.phase = Phase.CLOSED
                    raise RemoteProtocolError(f"unsupported client flags {flags:#x}")
                self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
                self.phase = Phase.OPTIONS
                continue
            if self.phase is Phase.OPTIONS:
                ev = self._option()
            else:
                ev = self._request()
            if ev is None:
                continue
            return ev

    def _need(self) -> _NeedData | Disconnect:
        if self._eof:
            phase, self.phase = self.phase, Phase.CLOSED
            if not self._in and not self._skip and self._pending is None and phase in (
                    Phase.TRANSMISSION, Phase.OPTIONS):
                return Disconnect("client closed the connection")
            where = "a request" if phase is Phase.TRANSMISSION else "the handshake"
            raise RemoteProtocolError(f"client closed the connection in the middle of {where}")
        return NEED_DATA

    # ---- handshake ----------------------------------------------------------------------
    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out += _OPT_REPLY.pack(REPLY_MAGIC, option, rtype, len(data)) + data

    def _error(self, option: int, rtype: int, message: str) -> None:
        self._reply(option, rtype, message.encode()[:MAX_STRING])

    def _option(self) -> Event | _NeedData | None:
        if len(self._in) < _OPT_HDR.size:
            return self._need()
        magic, option, length = _OPT_HDR.unpack_from(self._in)
        if magic != IHAVEOPT:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            # Refuse without reading megabytes of junk: reply, then hard disconnect.
            self._error(option, REP_ERR_TOO_BIG,
                        f"option data of {length} bytes is too large")
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(f"option {option} with {length} bytes of data")
        if len(self._in) < _OPT_HDR.size + length:
            return self._need()
        data = bytes(self._in[_OPT_HDR.size:_OPT_HDR.size + length])
        del self._in[:_OPT_HDR.size + length]
        return self._handle_option(option, data)

    def _tls_blocked(self, option: int) -> bool:
        if self.tls_mode is TLSMode.REQUIRE and not self.tls_active and option not in (
                OPT_STARTTLS, OPT_ABORT):
            if option == OPT_EXPORT_NAME:
                self.phase = Phase.CLOSED
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME before TLS in require mode")
            self._error(option, REP_ERR_TLS_REQD, "this server requires TLS (STARTTLS)")
            return True
        return False

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if self._tls_blocked(option):
            return None
        if option == OPT_ABORT:
            self._reply(option, REP_ACK)
            self.phase = Phase.CLOSED
            return Disconnect("client sent NBD_OPT_ABORT")
        if option == OPT_STARTTLS:
            if data:
                self._error(option, REP_ERR_INVALID, "STARTTLS takes no data")
            elif self.tls_mode is TLSMode.OFF:
                self._error(option, REP_ERR_POLICY, "TLS is not configured on this server")
            elif self.tls_active:
                self._error(option, REP_ERR_INVALID, "TLS is already active")
            else:
                self._reply(option, REP_ACK)
                self.phase = Phase.TLS_PENDING
                return StartTLS()
            return None
        if option == OPT_LIST:
            if data:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for exp in self.catalog.exports():
                name = exp.name.encode()
                self._reply(option, REP_SERVER, struct.pack(">I", len(name)) + name
                            + exp.description.encode())
            self._reply(option, REP_ACK)
            return None
        if option == OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(option, REP_ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply(option, REP_ACK)
            return None
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_option(option, data)
            return None
        if option in (OPT_INFO, OPT_GO):
            return self._info_or_go(option, data)
        if option == OPT_EXPORT_NAME:
            found = self.catalog.lookup(data.decode(errors="replace"))
            if found is None:
                self.phase = Phase.CLOSED
                raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME for unknown export "
                                          f"{data[:100]!r}")
            self._out += struct.pack(">QH", found.size, found.transmission_flags)
            if not self.no_zeroes:
                self._out += bytes(124)
            return self._begin(found)
        self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _parse_name(self, data: bytes, pos: int = 0) -> tuple[str, int] | None:
        if len(data) < pos + 4:
            return None
        (n,) = struct.unpack_from(">I", data, pos)
        if n > MAX_STRING or len(data) < pos + 4 + n:
            return None
        try:
            return data[pos + 4:pos + 4 + n].decode(), pos + 4 + n
        except UnicodeDecodeError:
            return None

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        parsed = self._parse_name(data)
        if parsed is None or len(data) < parsed[1] + 2:
            self._error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
            return None
        name, pos = parsed
        (nreq,) = struct.unpack_from(">H", data, pos)
        if len(data) != pos + 2 + 2 * nreq:
            self._error(option, REP_ERR_INVALID, "NBD_OPT_INFO/GO request count mismatch")
            return None
        requests = struct.unpack_from(f">{nreq}H", data, pos + 2)
        exp = self.catalog.lookup(name)
        if exp is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        self._reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, exp.size,
                                                  exp.transmission_flags))
        if INFO_NAME in requests:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in requests and exp.description:
            self._reply(option, REP_INFO,
                        struct.pack(">H", INFO_DESCRIPTION) + exp.description.encode())
        # Block sizes are sent even when not asked for (proto.md allows it): they are hints
        # our server tolerates any alignment (minimum 1).
        self._reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, exp.min_block,
                                                  exp.preferred_block, exp.max_block))
        self._reply(option, REP_ACK)
        if option == OPT_INFO:
            return None
        return self._begin(exp)

    def _begin(self, exp: ExportInfo) -> Transmission:
        self.export = exp
        self.phase = Phase.TRANSMISSION
        return Transmission(exp, self.structured, self.meta_context)

    def _meta_option(self, option: int, data: bytes) -> None:
        if not self.structured:
            self._error(option, REP_ERR_INVALID, "negotiate structured replies first")
            return
        parsed = self._parse_name(data)
        if parsed is None or len(data) < parsed[1] + 4:
            self._error(option, REP_ERR_INVALID, "malformed meta context request")
            return
        name, pos = parsed
        (nq,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(nq):
            q = self._parse_name(data, pos)
            if q is None:
                self._error(option, REP_ERR_INVALID, "malformed meta context query")
                return
            queries.append(q[0])
            pos = q[1]
        if pos != len(data):
            self._error(option, REP_ERR_INVALID, "trailing bytes after meta context queries")
            return
        if self.catalog.lookup(name) is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        listing = option == OPT_LIST_META_CONTEXT
        found = self._match_contexts(name, queries, listing)
        if not listing:
            self._contexts = found
            self._meta_for = name if found else None
        for i, ctx in enumerate(found):
            # Listed contexts get id 0: only a SET selects them and gives real ids.
            self._reply(option, REP_META_CONTEXT,
                        struct.pack(">I", 0 if listing else i + 1) + ctx.encode())
        self._reply(option, REP_ACK)

    # ---- transmission ---------------------------------------------------------------------
    def _request(self) -> Event | _NeedData | None:
        if self._pending is not None:
            if self._payload is None or self._payload_have < len(self._payload):
                return self._need()
            flags, kind, cookie, offset, length = self._pending
            data: bytes | bytearray = self._payload
            self._payload, self._pending, self._payload_have = None, None, 0
            self._payload_len = 0
            return Command(cookie, kind, flags, offset, length, data)
        if len(self._in) < _REQUEST.size:
            return self._need()
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(self._in)
        if magic != REQUEST_MAGIC:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        exp = self.export
        assert exp is not None
        if kind != CMD_WRITE:
            del self._in[:_REQUEST.size]
            return self._checked(flags, kind, cookie, offset, length, b"")
        # P1: the header is judged before any memory is set aside for its payload.
        why = self._invalid(exp, kind, flags, offset, length)
        if why is not None:
            code, message = why
            if length > HARD_PAYLOAD_LIMIT:
                self._out += self._error_reply(cookie, code, message)
                self.phase = Phase.CLOSED
                raise RemoteProtocolError(f"write claims {length} bytes")
            # Skip the payload unread, then answer (the client may still be sending it).
            del self._in[:_REQUEST.size]
            self._skip = length
            self._skip_reply = self._error_reply(cookie, code, message)
            return None
        if len(self._in) >= _REQUEST.size + length:
            data = bytes(memoryview(self._in)[_REQUEST.size:_REQUEST.size + length])
            del self._in[:_REQUEST.size + length]
            return Command(cookie, kind, flags, offset, length, data)
        if length < DIRECT_PAYLOAD:
            return self._need()
        # P2: a large payload gets its own buffer when the transport asks for it.
        del self._in[:_REQUEST.size]
        self._pending = (flags, kind, cookie, offset, length)
        self._payload_len = length
        return self._need()

    def _checked(self, flags: int, kind: int, cookie: int, offset: int, length: int,
                 data: bytes | bytearray) -> Event | None:
        exp = self.export
        assert exp is not None
        why = self._invalid(exp, kind, flags, offset, length)
        if why is not None:
            code, message = why
            self._out += self._error_reply(cookie, code, message)
            return None
        if kind == CMD_DISC:
            self.phase = Phase.CLOSED
            return Disconnect("client sent NBD_CMD_DISC")
        return Command(cookie, kind, flags, offset, length, data)

    def _invalid(self, exp: ExportInfo, kind: int, flags: int, offset: int,
                 length: int) -> tuple[int, str] | None:
        allowed = ALLOWED_FLAGS.get(kind)
        if allowed is None:
            return NBD_EINVAL, f"unknown command {kind}"
        if flags & ~allowed:
            return NBD_EINVAL, f"flags {flags:#x} are not valid for {COMMAND_NAMES[kind]}"
        if kind in (CMD_DISC, CMD_FLUSH):
            if offset or length:
                return NBD_EINVAL, f"{COMMAND_NAMES[kind]} takes no offset or length"
            return None
        if exp.read_only and kind in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return NBD_EPERM, f"export {exp.name!r} is read-only"
        if flags & CMD_FLAG_DF and not self.structured:
            return NBD_EINVAL, "DF requires structured replies"
        if kind == CMD_BLOCK_STATUS and not self.meta_context:
            return NBD_EINVAL, "BLOCK_STATUS without a negotiated meta context"
        if kind in (CMD_READ, CMD_WRITE) and length > exp.max_block:
            # proto.md allows EOVERFLOW only for reads; an oversized write is EINVAL.
            code = NBD_EOVERFLOW if kind == CMD_READ else NBD_EINVAL
            return code, (f"{COMMAND_NAMES[kind]} of {length} bytes exceeds the maximum "
                          f"payload {exp.max_block}")
        if offset + length > exp.size:
            # proto.md: writes reaching past the end SHOULD get ENOSPC; others EINVAL.
            code = NBD_ENOSPC if kind in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
            return code, f"request {offset}+{length} is beyond the export size {exp.size}"
        if kind == CMD_READ and length == 0:
            return NBD_EINVAL, "zero-length read"
        return None

    # ---- replies --------------------------------------------------------------------------
    def _error_reply(self, cookie: int, code: int, message: str) -> bytes:
        if self.structured:
            msg = message.encode()[:MAX_STRING]
            payload = struct.pack(">IH", code, len(msg)) + msg
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                               cookie, len(payload)) + payload
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, code, cookie)

    def reply_error(self, cmd: Command, code: int, message: str = "") -> bytes:
        """An error reply (``code`` is an NBD error value; see ``nbd_error``)."""
        return self._error_reply(cmd.cookie, code, message)

    def reply_ok(self, cmd: Command) -> bytes:
        if self.structured:
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE,
                               cmd.cookie, 0)
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cmd.cookie)

    def reply_read(self, cmd: Command,
                   pieces: Sequence[tuple[int, int, Sequence[Data] | None]]) -> list[Data]:
        """The reply to a READ: ``pieces`` are (offset, length, data as buffers back to
        back, or None for a hole) covering the request in order. Returns buffers to send
        in order (no copy of data)."""
        if not self.structured or cmd.flags & CMD_FLAG_DF:
            parts: list[Data] = [(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cmd.cookie)
                                  if not self.structured else
                                  _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                              REPLY_TYPE_OFFSET_DATA, cmd.cookie,
                                              8 + cmd.length)
                                  + struct.pack(">Q", cmd.offset))]
            for _o, n, d in pieces:
                parts += d if d is not None else [bytes(n)]
            return parts
        out: list[Data] = []
        last = len(pieces) - 1
        for i, (off, n, d) in enumerate(pieces):
            flags = REPLY_FLAG_DONE if i == last else 0
            if d is None:
                out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE,
                                       cmd.cookie, 12) + struct.pack(">QI", off, n))
            else:
                out.append(_CHUNK_AT.pack(STRUCTURED_REPLY_MAGIC, flags,
                                          REPLY_TYPE_OFFSET_DATA, cmd.cookie, 8 + n, off))
                out += d
        return out

    def reply_block_status(self, cmd: Command,
                           per_context: Sequence[tuple[int, Sequence[tuple[int, int]]]]
                           ) -> bytes:
        """One chunk per selected context: (context id, [(length, state flags) runs from
        the request offset, in order]); the last chunk carries the DONE flag."""
        out = []
        for i, (ctx, extents) in enumerate(per_context):
            runs = extents[:1] if cmd.flags & CMD_FLAG_REQ_ONE else extents
            body = struct.pack(">I", ctx) + b"".join(struct.pack(">II", n, f)
                                                      for n, f in runs)
            flags = REPLY_FLAG_DONE if i == len(per_context) - 1 else 0
            out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_BLOCK_STATUS,
                                   cmd.cookie, len(body)) + body)
        return b"".join(out)
