"""One iSCSI connection, login to logout, as a state machine (RFC 7143; no I/O, no trio).

Feed bytes with ``receive_data``; pull events with ``next_event`` until it returns None
(more bytes needed); send ``data_to_send()`` after every event and every completion.
Login, text negotiation, NOP, R2T/Data-Out collection, task management bookkeeping and
Data-In/status building all happen inside; the transport sees only:

- ``LoggedIn``: the login finished (the transport reinstates older sessions of the same
  initiator and ISID, and attaches the logical unit);
- ``Execute``: a SCSI command with all its Data-Out, to run concurrently; the transport
  calls ``complete(task, result)`` when it finishes;
- ``Close``: after sending what is pending, close the connection.

CmdSN flow control: commands are taken in CmdSN order; a command outside
[ExpCmdSN, MaxCmdSN] is dropped (RFC 7143 §4.2.2.1). MaxCmdSN = ExpCmdSN - 1 + ``window``
minus the commands still running, so a busy session shrinks the initiator's window
(backpressure) and a finished command opens it again.

Error recovery level 0: a PDU that breaks framing, a wrong DataSN or offset, or a header
digest error ends the connection (with a Reject first where the RFC asks for one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from iscsi import cdb as C
from iscsi import pdu as P
from iscsi.login import Login, LoginResult, SessionParams, TargetDirectory
from iscsi.pdu import ProtocolError
from iscsi.reservations import Nexus

log = logging.getLogger(__name__)

WINDOW: Final = 32                     # commands in flight per session
MAX_HELD: Final = 64                   # commands held waiting for a CmdSN gap to fill

# Task management functions and responses (RFC 7143 §11.5, §11.6)
TMF_ABORT_TASK: Final = 1
TMF_ABORT_TASK_SET: Final = 2
TMF_CLEAR_ACA: Final = 3
TMF_CLEAR_TASK_SET: Final = 4
TMF_LUN_RESET: Final = 5
TMF_TARGET_WARM_RESET: Final = 6
TMF_TARGET_COLD_RESET: Final = 7
TMF_TASK_REASSIGN: Final = 8
TMF_COMPLETE: Final = 0
TMF_NO_TASK: Final = 1
TMF_NO_LUN: Final = 2
TMF_REASSIGN_UNSUPPORTED: Final = 4
TMF_NOT_SUPPORTED: Final = 5

ASYNC_LOGOUT_REQUEST: Final = 1


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982, 32 bits): a < b."""
    return a != b and ((a < b and b - a < 1 << 31) or (a > b and a - b > 1 << 31))


def sn_add(a: int, n: int) -> int:
    return (a + n) & 0xFFFFFFFF


def decode_lun(raw: int) -> int | None:
    """LUN number from the 8-byte LUN field (peripheral or flat addressing), None if
    it uses a form we do not serve."""
    top = raw >> 48
    method = top >> 14
    if method in (0, 1) and raw & 0xFFFFFFFFFFFF == 0:
        return top & 0x3FFF
    return None


def _segments(parts: Sequence[P.Payload], seg: int, burst: int
              ) -> Iterator[tuple[int, list[P.Payload], int, bool]]:
    """The Data-In segments of ``parts`` sent back to back: (offset, buffers, length,
    whether it ends a burst). A segment is as long as it may be -- ``seg`` bytes (the
    initiator's MaxRecvDataSegmentLength), never across a burst boundary -- and gathers
    the parts it covers, whole or as views, never copied: a 1 MiB read of 64 KiB blocks
    is four 256 KiB Data-In PDUs, not sixteen (each PDU is a header the initiator reads
    and a wake-up of its receive loop; libiscsi reads one PDU per two syscalls)."""
    pos = 0                        # offset of the segment being gathered
    bufs: list[P.Payload] = []
    filled = 0
    room = min(seg, burst)
    for part in parts:
        size = part.nbytes if type(part) is memoryview else len(part)
        if filled + size <= room:              # (the common case: a whole part)
            bufs.append(part)
            filled += size
            if filled < room:
                continue
            pos += filled
            yield pos - filled, bufs, filled, pos % burst == 0
            bufs, filled = [], 0
            room = min(seg, burst - pos % burst)
            continue
        view = memoryview(part).cast("B")
        start = 0
        while start < size:
            n = min(room - filled, size - start)
            bufs.append(view[start:start + n])
            filled += n
            start += n
            if filled == room:
                pos += filled
                yield pos - filled, bufs, filled, pos % burst == 0
                bufs, filled = [], 0
                room = min(seg, burst - pos % burst)
    if filled:
        yield pos, bufs, filled, (pos + filled) % burst == 0


@dataclass(frozen=True, slots=True)
class LoggedIn:
    result: LoginResult


@dataclass(eq=False, slots=True)
class Task:
    """A SCSI command from command PDU to status."""

    itt: int
    lun: int
    cdb: bytes
    edtl: int
    read: bool
    plan: C.Plan | None = None
    data: bytes = b""              # immediate data as received
    more: list[P.Payload] | None = None   # Data-Out segments, in order
    received: int = 0
    unsolicited_end: int = 0       # Data-Out up to here needs no R2T
    unsolicited_open: bool = False
    next_datasn: int = 0
    next_r2t_offset: int = 0
    r2tsn: int = 0
    r2ts: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # ttt -> off, len, sn
    aborted: bool = False
    running: bool = False
    want: int = 0                  # Data-Out bytes the command uses
    overflow: bool = False         # residual of a write whose EDTL differs from its CDB
    underflow: bool = False
    residual: int = 0

    def payload(self) -> bytes:
        """The Data-Out the command runs with (extra unsolicited bytes cut off): the
        immediate data and the Data-Out segments joined once, at the end (one copy into
        one buffer of the final size; growing a buffer per segment copied the data
        again at every reallocation and once more to cut it)."""
        data, more = self.data, self.more
        if more:
            data = b"".join((data, *more)) if data else b"".join(more)
            self.more = None
            self.data = data
        if len(data) == self.want:
            return data
        with memoryview(data) as view:
            return bytes(view[:self.want])


@dataclass(slots=True)
class Execute:
    """(Not frozen, as ``cdb.Result``: one is made per command, and a frozen dataclass
    pays an ``object.__setattr__`` per field. Never changed once made.)"""

    task: Task


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


Event = LoggedIn | Execute | Close


@dataclass
class _PendingTMF:
    itt: int
    response: int
    waiting: set[Task]
    close_after: bool = False


class Connection:
    def __init__(self, directory: TargetDirectory, *, new_tsih: Callable[[], int],
                 unit: Callable[[str], C.Unit | None],
                 portal: str, portal_group_tag: int = 1) -> None:
        self.directory = directory
        self.unit_for = unit
        self.portal = portal
        self.portal_group_tag = portal_group_tag
        self.login = Login(directory, new_tsih, portal_group_tag=portal_group_tag)
        self.reader = P.PDUReader()
        self.params = SessionParams()
        self.result: LoginResult | None = None
        self.unit: C.Unit | None = None
        self.nexus: Nexus | None = None          # the I_T nexus, for reservations
        self.statsn = 0
        self.exp_cmdsn = 0
        self.closed = False
        self.logged_out = False
        self.tasks: dict[int, Task] = {}
        self.running = 0
        self._out: list[P.Payload] = []
        self.queued_data = 0          # bytes of data segments in _out
        self._events: list[Event] = []
        self._held: dict[int, P.PDU] = {}
        self._discard: set[int] = set()          # ITTs whose late Data-Out is dropped
        self._next_ttt = 1
        self._tmfs: list[_PendingTMF] = []
        self._logout: tuple[P.LogoutRequest, set[Task]] | None = None
        self._text: tuple[int, bytes] | None = None  # (ttt, rest) of a long text answer
        self._ping: int | None = None
        self.stats: dict[str, int] = {}
        self._header_digest = False       # as negotiated, once logged in
        self._data_digest = False

    # ---- I/O side ----------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self.reader.receive_data(data)

    def data_to_send(self) -> bytes:
        return b"".join(self.pieces_to_send())

    def pieces_to_send(self) -> list[P.Payload]:
        """``data_to_send`` as buffers to send back to back (data segments not copied)."""
        out = self._out
        self._out = []
        self.queued_data = 0
        return out

    @property
    def full_feature(self) -> bool:
        return self.result is not None

    @property
    def max_cmdsn(self) -> int:
        return sn_add(self.exp_cmdsn, WINDOW - 1 - min(self.running, WINDOW - 1))

    def next_event(self) -> Event | None:
        events = self._events                     # (never replaced)
        while not events and not self.closed:
            try:
                p = self.reader.next_pdu()
            except ProtocolError as e:
                self._protocol_error(e)
                continue
            if p is None:
                return None
            try:
                self._dispatch(p)
            except ProtocolError as e:
                if not e.header:
                    e.header = p.bhs()
                self._protocol_error(e)
        if events:
            return events.pop(0)
        return None

    def _send(self, p: P.PDU) -> None:
        self.queued_data += len(p.data)
        self._out += P.encode_pieces(p, header_digest=self._header_digest,
                                     data_digest=self._data_digest)

    def _stat(self) -> int:
        sn = self.statsn
        self.statsn = sn_add(sn, 1)
        return sn

    def _protocol_error(self, e: ProtocolError) -> None:
        log.info("iSCSI: protocol error from initiator: %s", e)
        self.stats["protocol_errors"] = self.stats.get("protocol_errors", 0) + 1
        if self.full_feature and e.header:
            self._reject(e.reason, e.header)
        if e.fatal or not self.full_feature:
            self._close(str(e))

    def _reject(self, reason: int, header: bytes) -> None:
        self._send(P.Reject(reason=reason, statsn=self._stat(), exp_cmdsn=self.exp_cmdsn,
                            max_cmdsn=self.max_cmdsn, data=header[:P.BHS_LEN]))

    def _close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._events.append(Close(reason))

    # ---- dispatch ----------------------------------------------------------------------
    def _dispatch(self, p: P.PDU) -> None:
        if type(p) is P.ScsiCommand and p.cmdsn == self.exp_cmdsn and not p.immediate \
                and not self._held and self.result is not None:
            # The common case, first: the next command in order, nothing held.
            self.exp_cmdsn = (p.cmdsn + 1) & 0xFFFFFFFF     # (sn_add)
            self._scsi(p)
            return
        if not self.full_feature:
            if not isinstance(p, P.LoginRequest):
                raise ProtocolError(f"{p.name} before login completed")
            self._login(p)
            return
        if isinstance(p, P.DataOut):
            self._data_out(p)
            return
        if isinstance(p, P.LoginRequest):
            raise ProtocolError("Login Request in full feature phase", fatal=False)
        if isinstance(p, P.Snack):
            raise ProtocolError("SNACK needs ErrorRecoveryLevel > 0",
                                reason=P.REJECT_SNACK, fatal=False)
        if isinstance(p, P.NopOut) and p.itt == P.RESERVED_TAG:
            self._nop_answer(p)   # an answer to our ping: no CmdSN of its own
            return
        if not isinstance(p, (P.ScsiCommand, P.NopOut, P.TaskMgmtRequest, P.TextRequest,
                              P.LogoutRequest)):
            raise ProtocolError(f"{p.name} is not sent by initiators",
                                reason=P.REJECT_NOT_SUPPORTED, fatal=False)
        cmdsn: int = p.cmdsn
        if p.immediate:
            self._command(p)
            return
        if cmdsn == self.exp_cmdsn:
            self.exp_cmdsn = sn_add(cmdsn, 1)
            self._command(p)
            while self.exp_cmdsn in self._held:
                held = self._held.pop(self.exp_cmdsn)
                self.exp_cmdsn = sn_add(self.exp_cmdsn, 1)
                self._command(held)
        elif sn_lt(self.exp_cmdsn, cmdsn) and not sn_lt(self.max_cmdsn, cmdsn) \
                and len(self._held) < MAX_HELD:
            self._held[cmdsn] = p
        else:
            # Outside the window: silently ignored (RFC 7143 §4.2.2.1).
            log.debug("iSCSI: dropping CmdSN %d outside [%d, %d]", cmdsn, self.exp_cmdsn,
                      self.max_cmdsn)
            if isinstance(p, P.ScsiCommand):
                self._discard.add(p.itt)

    def _command(self, p: P.PDU) -> None:
        if isinstance(p, P.ScsiCommand):
            self._scsi(p)
        elif isinstance(p, P.NopOut):
            self._nop(p)
        elif isinstance(p, P.TaskMgmtRequest):
            self._tmf(p)
        elif isinstance(p, P.TextRequest):
            self._text_request(p)
        elif isinstance(p, P.LogoutRequest):
            self._logout_request(p)

    # ---- login -------------------------------------------------------------------------
    def _login(self, req: P.LoginRequest) -> None:
        rsp = self.login.handle(req)
        self._out.append(P.encode(rsp))
        if self.login.failed is not None:
            log.info("iSCSI login refused (status %#06x): %s", self.login.failed.status,
                     self.login.failed)
            self._close(f"login failed: {self.login.failed}")
            return
        result = self.login.result
        if result is None:
            return
        self.result = result
        self.params = result.params
        self.statsn = self.login.statsn
        self.exp_cmdsn = result.cmdsn
        self.reader.max_data = result.params.max_recv_data
        self.reader.header_digest = result.params.header_digest
        self.reader.data_digest = result.params.data_digest
        # (digests start with the first PDU after the final Login Response)
        self._header_digest = result.params.header_digest
        self._data_digest = result.params.data_digest
        if result.target is not None:
            self.nexus = Nexus(result.initiator.lower(), result.isid)
            self.unit = self.unit_for(result.target)
            if self.unit is None:          # removed while logging in
                self._close("target went away during login")
                return
        self._events.append(LoggedIn(result))

    # ---- NOP ---------------------------------------------------------------------------
    def _nop(self, p: P.NopOut) -> None:
        if len(p.data) > self.params.max_send_data:
            raise ProtocolError("NOP-Out ping data longer than we may send back",
                                reason=P.REJECT_INVALID_FIELD, fatal=False)
        self._send(P.NopIn(lun=p.lun, itt=p.itt, ttt=P.RESERVED_TAG, statsn=self._stat(),
                           exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn, data=p.data))

    def _nop_answer(self, p: P.NopOut) -> None:
        if p.ttt == P.RESERVED_TAG:
            raise ProtocolError("NOP-Out with neither ITT nor TTT", fatal=False,
                                reason=P.REJECT_INVALID_FIELD)
        if p.ttt == self._ping:
            self._ping = None

    def ping(self) -> bool:
        """Send a NOP-In that asks for an answer; False if the last one is unanswered."""
        if not self.full_feature or self.closed:
            return True
        if self._ping is not None:
            return False
        self._ping = self._ttt()
        self._send(P.NopIn(lun=0, itt=P.RESERVED_TAG, ttt=self._ping, statsn=self.statsn,
                           exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn))
        return True

    def _ttt(self) -> int:
        t = self._next_ttt
        self._next_ttt = self._next_ttt % 0xFFFFFFFE + 1
        return t

    # ---- SCSI commands -----------------------------------------------------------------
    def _scsi(self, cmd: P.ScsiCommand) -> None:
        unit = self.unit
        if unit is None:
            raise ProtocolError("SCSI command in a discovery session", fatal=False)
        itt = cmd.itt
        if itt in self.tasks or itt == P.RESERVED_TAG:
            raise ProtocolError(f"ITT {itt:#x} is already in use",
                                reason=P.REJECT_TASK_IN_PROGRESS, fatal=False)
        params = self.params
        immediate = cmd.data
        if immediate:
            if not params.immediate_data:
                raise ProtocolError("immediate data was not negotiated")
            if len(immediate) > min(params.first_burst_length, cmd.edtl):
                raise ProtocolError("immediate data longer than FirstBurstLength or EDTL")
        if not cmd.final and params.initial_r2t:
            raise ProtocolError("unsolicited Data-Out announced but InitialR2T=Yes")
        cdb = cmd.cdb
        task = Task(itt, cmd.lun, cdb, cmd.edtl, cmd.read)
        if self._discard:
            self._discard.discard(itt)
        planned: C.Plan | C.Result
        if cmd.lun == 0 or decode_lun(cmd.lun) == 0:
            planned = unit.plan(cdb, self.nexus)
        else:
            planned = C.no_such_lun(cdb) if cdb[:1] != bytes([C.REPORT_LUNS]) \
                else unit.plan(cdb, self.nexus)
        if isinstance(planned, C.Result):
            self._absorb_and_answer(cmd, task, planned)
            return
        spdtl = planned.data_out
        edtl = cmd.edtl if cmd.write else 0
        want = spdtl
        if spdtl != edtl:
            residual = abs(spdtl - edtl)
            if planned.name in ("WRITE", "WRITE_AND_VERIFY") and (
                    edtl > spdtl or edtl % C.LBA_SIZE == 0):
                # FCP-4 (as libiscsi tests it): run the command normally, but with no
                # data beyond the iSCSI expected transfer length; report the residual.
                want = min(spdtl, edtl)
                task.overflow, task.underflow = spdtl > edtl, spdtl < edtl
                task.residual = residual
            elif spdtl == 0 and not planned.write:
                want = 0     # Data-Out for a command that takes none: absorbed, unused
            else:
                # The command's own transfer length disagrees with the iSCSI one:
                # refuse, changing nothing.
                sense = C.INVALID_FIELD_IN_IU if planned.name in (
                    "WRITE", "WRITE_AND_VERIFY") else C.INVALID_FIELD_IN_CDB
                self._absorb_and_answer(cmd, task, C.check(sense),
                                        overflow=spdtl > edtl, underflow=spdtl < edtl,
                                        residual=residual)
                return
        task.plan = planned
        task.want = want
        self.tasks[itt] = task
        if immediate:
            task.data = bytes(immediate)
            task.received = task.next_r2t_offset = len(immediate)
        if not cmd.final:
            task.unsolicited_open = True
            task.unsolicited_end = min(self.params.first_burst_length, cmd.edtl)
        elif task.received >= want:
            # All its Data-Out is here (nearly every command): ``_progress`` would start
            # it at once.
            task.running = True
            self.running += 1
            self._events.append(Execute(task))
            return
        self._progress(task)

    def _absorb_and_answer(self, cmd: P.ScsiCommand, task: Task, result: C.Result, *,
                           overflow: bool = False, underflow: bool = False,
                           residual: int = 0) -> None:
        if not cmd.final:
            self._discard_data(cmd.itt)
        self._respond(task, result, overflow=overflow, underflow=underflow,
                      residual=residual)

    def _progress(self, task: Task) -> None:
        """Start the task if all its data is here, else solicit what is missing."""
        total = task.want
        if task.unsolicited_open:
            return            # R2Ts start after the unsolicited burst ends
        if task.received >= total:
            self._start(task)
            return
        while (len(task.r2ts) < self.params.max_outstanding_r2t
               and task.next_r2t_offset < total):
            length = min(self.params.max_burst_length, total - task.next_r2t_offset)
            ttt = self._ttt()
            task.r2ts[ttt] = (task.next_r2t_offset, length, 0)
            self._send(P.R2T(lun=task.lun, itt=task.itt, ttt=ttt, statsn=self.statsn,
                             exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn,
                             r2tsn=task.r2tsn, offset=task.next_r2t_offset, length=length))
            task.r2tsn += 1
            task.next_r2t_offset += length

    def _data_out(self, p: P.DataOut) -> None:
        task = self.tasks.get(p.itt)
        if task is None or task.plan is None or task.running:
            if p.itt in self._discard:
                return
            raise ProtocolError(f"Data-Out for unknown task {p.itt:#x}",
                                reason=P.REJECT_INVALID_FIELD, fatal=False)
        try:
            self._accept_data(task, p)
        except ProtocolError as e:
            # ERL 0: the task cannot complete. Reject the PDU, end the task with CHECK
            # CONDITION and drop the rest of its Data-Out; the connection goes on.
            log.info("iSCSI: %s", e)
            self.stats["protocol_errors"] = self.stats.get("protocol_errors", 0) + 1
            self._reject(P.REJECT_PROTOCOL_ERROR, p.bhs())
            self.tasks.pop(task.itt, None)
            self._discard_data(task.itt)
            self._respond(task, C.check(C.DATA_PHASE_ERROR))
            return
        self._progress(task)

    def _discard_data(self, itt: int) -> None:
        self._discard.add(itt)
        if len(self._discard) > 1024:
            self._discard.pop()

    def _accept_data(self, task: Task, p: P.DataOut) -> None:
        end = p.offset + len(p.data)
        if p.ttt == P.RESERVED_TAG:
            if not task.unsolicited_open:
                raise ProtocolError("unsolicited Data-Out not expected")
            if p.datasn != task.next_datasn or p.offset != task.received \
                    or end > task.unsolicited_end:
                raise ProtocolError(f"unsolicited Data-Out DataSN {p.datasn} / offset "
                                    f"{p.offset} not expected (DataSN {task.next_datasn}, "
                                    f"offset {task.received}) or beyond FirstBurstLength")
            task.next_datasn += 1
            if p.final:
                task.unsolicited_open = False
                task.next_r2t_offset = end
        else:
            r2t = task.r2ts.get(p.ttt)
            if r2t is None:
                raise ProtocolError(f"Data-Out with unknown TTT {p.ttt:#x}")
            off, length, datasn = r2t
            if p.datasn != datasn or p.offset != task.received or end > off + length:
                raise ProtocolError(f"Data-Out DataSN {p.datasn} / offset {p.offset} "
                                    f"not expected (DataSN {datasn}, offset "
                                    f"{task.received})")
            if p.final:
                if end != off + length:
                    raise ProtocolError("R2T sequence ended short")
                del task.r2ts[p.ttt]
            else:
                task.r2ts[p.ttt] = (off, length, datasn + 1)
        if end > task.edtl:
            raise ProtocolError("Data-Out beyond the expected transfer length")
        if task.more is None:
            task.more = [p.data]
        else:
            task.more.append(p.data)
        task.received = end

    def _start(self, task: Task) -> None:
        task.running = True
        self.running += 1
        self._events.append(Execute(task))     # (``tasks`` holds it since ``_scsi``)

    def complete(self, task: Task, result: C.Result) -> None:
        """A task finished: send its Data-In and status (unless it was aborted)."""
        self.running -= 1
        self.tasks.pop(task.itt, None)
        if not task.aborted and not self.closed:
            self._respond(task, result)
        for tmf in list(self._tmfs) if self._tmfs else ():
            tmf.waiting.discard(task)
            if not tmf.waiting:
                self._tmfs.remove(tmf)
                self._tmf_response(tmf)
        if self._logout is not None:
            req, waiting = self._logout
            waiting.discard(task)
            if not waiting:
                self._logout = None
                self._logout_response(req)

    def _respond(self, task: Task, result: C.Result, *, overflow: bool | None = None,
                 underflow: bool = False, residual: int = 0) -> None:
        parts: tuple[P.Payload, ...] = result.parts or ((result.data,) if result.data
                                                        else ())
        size = result.size
        if overflow is None and result.sense is None and not task.residual \
                and result.status == C.GOOD:
            # The common cases, first: a read answered in full in one Data-In with its
            # status, or a command without Data-In that went well. (StatSN and MaxCmdSN
            # as ``_stat`` and ``max_cmdsn`` compute them, inline.)
            sn = self.statsn
            exp = self.exp_cmdsn
            running = self.running
            max_cmdsn = (exp + WINDOW - 1 - (running if running < WINDOW - 1
                                             else WINDOW - 1)) & 0xFFFFFFFF
            if size and len(parts) == 1 and task.read and size == task.edtl \
                    and size <= self.params.max_send_data \
                    and size <= self.params.max_burst_length:
                self.statsn = (sn + 1) & 0xFFFFFFFF
                self.queued_data += size
                self._out += P.data_in_with_status(
                    task.itt, sn, exp, max_cmdsn, parts[0],
                    header_digest=self._header_digest, data_digest=self._data_digest)
                return
            if not size and not (task.read and task.edtl):
                self.statsn = (sn + 1) & 0xFFFFFFFF
                self._out.append(P.good_response(task.itt, sn, exp, max_cmdsn,
                                                 header_digest=self._header_digest))
                return
        if overflow is None:
            overflow, underflow, residual = task.overflow, task.underflow, task.residual
        if result.sense is not None:
            key = C.SENSE_KEY_NAMES.get(result.sense.key, "other")
            self.stats["sense_" + key] = self.stats.get("sense_" + key, 0) + 1
        if size and not task.read:
            # The initiator expects no Data-In (R bit clear): send none, say so.
            overflow, underflow, residual = True, False, size
            parts, size = (), 0
        elif size or (task.read and task.edtl and result.status == C.GOOD):
            if size > task.edtl:
                overflow, underflow, residual = True, False, size - task.edtl
                parts, size = (b"".join(parts)[:task.edtl],), task.edtl
            elif size < task.edtl:
                overflow, underflow, residual = False, True, task.edtl - size
        with_status = bool(result.status in (C.GOOD, C.CONDITION_MET) and size
                           and result.sense is None)
        datasn = 0
        if size and result.status in (C.GOOD, C.CONDITION_MET):
            params = self.params
            hd, dd = self._header_digest, self._data_digest
            out = self._out
            self.queued_data += size
            for pos, bufs, n, end_of_burst in _segments(parts, params.max_send_data,
                                                        params.max_burst_length):
                if pos + n == size and with_status:
                    flags = P.DATA_IN_FINAL | P.DATA_IN_STATUS \
                        | (P.DATA_IN_OVERFLOW if overflow else 0) \
                        | (P.DATA_IN_UNDERFLOW if underflow else 0)
                    out += P.data_in_gathered(
                        flags, result.status, 0, task.itt, self._stat(), self.exp_cmdsn,
                        self.max_cmdsn, datasn, pos, residual, bufs, n,
                        header_digest=hd, data_digest=dd)
                else:
                    flags = P.DATA_IN_FINAL if end_of_burst or pos + n == size else 0
                    out += P.data_in_gathered(
                        flags, 0, task.lun, task.itt, self.statsn, self.exp_cmdsn,
                        self.max_cmdsn, datasn, pos, 0, bufs, n,
                        header_digest=hd, data_digest=dd)
                datasn += 1
            if with_status:
                return
        sense = result.sense.fixed() if result.sense is not None else b""
        body = (len(sense).to_bytes(2, "big") + sense) if sense else b""
        self._send(P.ScsiResponse(
            overflow=overflow, underflow=underflow, residual=residual, response=0,
            status=result.status, itt=task.itt, statsn=self._stat(),
            exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn, exp_datasn=datasn,
            data=body))

    # ---- task management ---------------------------------------------------------------
    def _tmf(self, p: P.TaskMgmtRequest) -> None:
        fn = p.function
        if fn in (TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET) \
                and decode_lun(p.lun) != 0:
            self._tmf_response(_PendingTMF(p.itt, TMF_NO_LUN, set()))
            return
        if fn == TMF_ABORT_TASK:
            task = self.tasks.get(p.rtt)
            if task is None:
                # Never received, or already answered: nothing left to abort.
                not_yet = not sn_lt(p.ref_cmdsn, self.exp_cmdsn)
                self._tmf_response(_PendingTMF(p.itt, TMF_COMPLETE if not_yet
                                               else TMF_NO_TASK, set()))
                return
            affected = [task]
        elif fn in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET,
                    TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET):
            affected = list(self.tasks.values())
            if fn in (TMF_LUN_RESET, TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET) \
                    and self.unit is not None:
                self.unit.d_sense = False
        elif fn == TMF_TASK_REASSIGN:
            self._tmf_response(_PendingTMF(p.itt, TMF_REASSIGN_UNSUPPORTED, set()))
            return
        else:
            self._tmf_response(_PendingTMF(p.itt, TMF_NOT_SUPPORTED, set()))
            return
        waiting: set[Task] = set()
        for task in affected:
            task.aborted = True
            if task.running:
                waiting.add(task)
            else:                       # still collecting Data-Out: forget it now
                self.tasks.pop(task.itt, None)
                self._discard_data(task.itt)
        pending = _PendingTMF(p.itt, TMF_COMPLETE, waiting,
                              close_after=fn == TMF_TARGET_COLD_RESET)
        if waiting:
            self._tmfs.append(pending)
        else:
            self._tmf_response(pending)

    def _tmf_response(self, tmf: _PendingTMF) -> None:
        self._send(P.TaskMgmtResponse(response=tmf.response, itt=tmf.itt,
                                      statsn=self._stat(), exp_cmdsn=self.exp_cmdsn,
                                      max_cmdsn=self.max_cmdsn))
        if tmf.close_after:
            self._close("target cold reset")

    # ---- text --------------------------------------------------------------------------
    def _text_request(self, p: P.TextRequest) -> None:
        if p.ttt != P.RESERVED_TAG:
            if self._text is None or self._text[0] != p.ttt:
                raise ProtocolError("Text Request continues an unknown exchange",
                                    reason=P.REJECT_INVALID_FIELD, fatal=False)
            self._send_text(p, self._text[1])
            return
        if p.cont or not p.final:
            raise ProtocolError("multi-PDU Text Requests are not supported",
                                reason=P.REJECT_NOT_SUPPORTED, fatal=False)
        answers: list[tuple[str, str]] = []
        for key, value in P.parse_text(p.data):
            if key == "SendTargets":
                answers += self.send_targets(value)
            else:
                answers.append((key, "NotUnderstood"))
        self._send_text(p, P.format_text(answers))

    def send_targets(self, value: str) -> list[tuple[str, str]]:
        assert self.result is not None
        initiator = self.result.initiator
        if value == "All":
            if self.result.target is not None:
                names: Sequence[str] = [self.result.target]
            else:
                names = self.directory.visible(initiator)
        elif value == "" and self.result.target is not None:
            names = [self.result.target]
        else:
            names = [n for n in self.directory.visible(initiator) if n == value]
        out: list[tuple[str, str]] = []
        for name in names:
            out += [("TargetName", name),
                    ("TargetAddress", f"{self.portal},{self.portal_group_tag}")]
        return out

    def _send_text(self, p: P.TextRequest, body: bytes) -> None:
        limit = self.params.max_send_data
        now, rest = body[:limit], body[limit:]
        ttt = P.RESERVED_TAG
        if rest:
            ttt = self._ttt()
            self._text = (ttt, rest)
        else:
            self._text = None
        self._send(P.TextResponse(final=not rest, cont=bool(rest), lun=p.lun, itt=p.itt,
                                  ttt=ttt, statsn=self._stat(), exp_cmdsn=self.exp_cmdsn,
                                  max_cmdsn=self.max_cmdsn, data=now))

    # ---- logout and shutdown -----------------------------------------------------------
    def _logout_request(self, p: P.LogoutRequest) -> None:
        running = {t for t in self.tasks.values() if t.running}
        for task in list(self.tasks.values()):
            if not task.running:
                self.tasks.pop(task.itt, None)
        self.logged_out = True
        if running:
            self._logout = (p, running)
        else:
            self._logout_response(p)

    def _logout_response(self, p: P.LogoutRequest) -> None:
        assert self.result is not None
        response = 0
        if p.reason == 2:
            response = 2             # connection recovery is not supported
        elif p.reason == 1 and p.cid != self.result.cid:
            response = 1             # CID not found
        self._send(P.LogoutResponse(response=response, itt=p.itt, statsn=self._stat(),
                                    exp_cmdsn=self.exp_cmdsn, max_cmdsn=self.max_cmdsn))
        self._close("logged out")

    def request_logout(self, seconds: int) -> None:
        """Ask the initiator to log out within ``seconds`` (the daemon is stopping)."""
        if self.full_feature and not self.closed:
            self._send(P.AsyncMessage(lun=0, statsn=self.statsn, exp_cmdsn=self.exp_cmdsn,
                                      max_cmdsn=self.max_cmdsn, event=ASYNC_LOGOUT_REQUEST,
                                      param3=seconds))
