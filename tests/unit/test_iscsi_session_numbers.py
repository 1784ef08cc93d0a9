"""The session's short ways for a SCSI command (iscsi/session.py: ``_scsi`` starts a command
whose data is all in at once; ``_respond`` packs a GOOD Data-In or SCSI Response with
StatSN and MaxCmdSN computed inline) number their answers exactly as the general way does:
StatSN one more per status, ExpCmdSN the next command expected, MaxCmdSN = ExpCmdSN - 1 +
WINDOW minus the commands still running (session docstring: CmdSN flow control), whatever
order commands finish in, mixed with answers of the general way (R2T, a residual, a
CHECK CONDITION). The core alone, no sockets: the initiator's side is a PDU reader."""

from __future__ import annotations

import os
import random
import struct

from iscsi import cdb as C
from iscsi import pdu as P
from iscsi.login import SessionParams
from iscsi.reservations import Nexus
from iscsi.session import WINDOW, Connection, Execute, LoggedIn, Task
from tests.unit.test_iscsi_proto import INITIATOR, TARGET, Directory, login_req, responses

BLOCK = 4096
DISK = os.urandom(64 * BLOCK)


class Unit:
    """A ``cdb.Unit`` over ``DISK``: READ (10) of whole 4 KiB blocks, WRITE (10), and
    anything else refused; plans answer at once (``quick``) as the volume's would."""

    d_sense = False

    def plan(self, cdb: bytes, nexus: Nexus | None = None) -> C.Plan | C.Result:
        op = cdb[0]
        lba, count = struct.unpack_from(">2xIxH", cdb)
        if op == C.READ_10:
            data = DISK[lba * 512:(lba + count) * 512]

            async def run(_d: bytes) -> C.Result:
                return C.Result(C.GOOD, parts=(data,))
            return C.Plan("READ", 0, run, quick=lambda _d: C.Result(C.GOOD, parts=(data,)))
        if op == C.WRITE_10:
            async def run_w(_d: bytes) -> C.Result:
                return C.OK
            return C.Plan("WRITE", count * 512, run_w, write=True, quick=lambda _d: C.OK)
        return C.check(C.INVALID_OPCODE, 0)


def logged_in() -> Connection:
    conn = Connection(Directory(), new_tsih=lambda: 1, unit=lambda _t: Unit(),
                      portal="127.0.0.1:3260")
    conn.receive_data(P.encode(login_req([
        ("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
        ("InitialR2T", "No"), ("ImmediateData", "Yes"),
        ("MaxRecvDataSegmentLength", "262144")])))
    assert isinstance(conn.next_event(), LoggedIn)
    conn.pieces_to_send()
    return conn


def read10(itt: int, cmdsn: int, block: int, blocks: int = 1, edtl: int | None = None
           ) -> bytes:
    cdb = struct.pack(">BBIBHB", C.READ_10, 0, block * 8, 0, blocks * 8, 0) + bytes(6)
    return P.encode(P.ScsiCommand(final=True, read=True, itt=itt, cmdsn=cmdsn,
                                  edtl=blocks * BLOCK if edtl is None else edtl,
                                  cdb16=cdb))


def write10(itt: int, cmdsn: int, block: int, immediate: bool) -> bytes:
    cdb = struct.pack(">BBIBHB", C.WRITE_10, 0, block * 8, 0, 8, 0) + bytes(6)
    return P.encode(P.ScsiCommand(final=True, write=True, itt=itt, cmdsn=cmdsn, edtl=BLOCK,
                                  cdb16=cdb, data=os.urandom(BLOCK) if immediate else b""))


def test_statsn_and_max_cmdsn_of_the_short_ways_whatever_order_commands_finish() -> None:
    rng = random.Random(26)
    for _trial in range(20):
        conn = logged_in()
        statsn = conn.statsn
        cmdsn = conn.exp_cmdsn
        n = rng.randrange(1, WINDOW)
        raw = []
        kinds: dict[int, str] = {}
        for i in range(n):
            itt = 100 + i
            kind = rng.choice(["read", "read", "write", "r2t", "residual", "refused"])
            kinds[itt] = kind
            if kind == "read":
                raw.append(read10(itt, cmdsn + i, rng.randrange(64)))
            elif kind == "residual":            # EDTL longer than the CDB's: underflow
                raw.append(read10(itt, cmdsn + i, rng.randrange(63), edtl=2 * BLOCK))
            elif kind == "refused":
                raw.append(P.encode(P.ScsiCommand(final=True, itt=itt, cmdsn=cmdsn + i,
                                                  cdb16=bytes([0xFF]) + bytes(15))))
            else:
                raw.append(write10(itt, cmdsn + i, rng.randrange(64), kind == "write"))
        conn.receive_data(b"".join(raw))
        running: list[Task] = []
        while (ev := conn.next_event()) is not None:
            assert type(ev) is Execute
            running.append(ev.task)
        # R2Ts (StatSN not advanced) and the refusals' statuses are out already (each with
        # the ExpCmdSN of when it was sent).
        expect_statsn = statsn
        exp_cmdsn = (cmdsn + n) & 0xFFFFFFFF
        for p in responses(conn):
            if isinstance(p, P.R2T):
                assert p.statsn == expect_statsn
                data = os.urandom(p.length)
                conn.receive_data(P.encode(P.DataOut(final=True, itt=p.itt, ttt=p.ttt,
                                                     offset=p.offset, data=data)))
                ev = conn.next_event()
                assert type(ev) is Execute
                running.append(ev.task)
            else:
                assert isinstance(p, P.ScsiResponse) and kinds[p.itt] == "refused"
                assert p.status == C.CHECK_CONDITION
                assert p.statsn == expect_statsn
                expect_statsn += 1
        assert sorted(t.itt for t in running) == sorted(
            itt for itt, k in kinds.items() if k != "refused")
        rng.shuffle(running)
        while running:
            task = running.pop()
            assert task.plan is not None and task.plan.quick is not None
            result = task.plan.quick(task.payload())
            assert result is not None
            conn.complete(task, result)
            (p,) = responses(conn)
            assert isinstance(p, P.DataIn | P.ScsiResponse)
            still = len(running)
            assert p.statsn == expect_statsn
            assert p.exp_cmdsn == exp_cmdsn
            assert p.max_cmdsn == (exp_cmdsn + WINDOW - 1 - still) & 0xFFFFFFFF
            assert p.max_cmdsn == conn.max_cmdsn
            expect_statsn += 1
            kind = kinds[task.itt]
            if kind in ("read", "residual"):
                assert isinstance(p, P.DataIn) and p.has_status and p.status == C.GOOD
                lba = struct.unpack_from(">2xI", task.cdb)[0]
                assert p.data == DISK[lba * 512:lba * 512 + BLOCK]
                assert p.underflow == (kind == "residual")
                assert p.residual == (BLOCK if kind == "residual" else 0)
            else:
                assert isinstance(p, P.ScsiResponse) and p.status == C.GOOD
                assert not p.data and not p.residual
        assert conn.statsn == expect_statsn
        assert conn.max_cmdsn == (exp_cmdsn + WINDOW - 1) & 0xFFFFFFFF


def test_numbers_wrap_around_at_32_bits() -> None:
    conn = logged_in()
    conn.statsn = 0xFFFFFFFF
    conn.exp_cmdsn = 0xFFFFFFF0
    conn.receive_data(read10(5, 0xFFFFFFF0, 3))
    ev = conn.next_event()
    assert type(ev) is Execute and ev.task.plan is not None
    assert ev.task.plan.quick is not None
    result = ev.task.plan.quick(b"")
    assert result is not None
    conn.complete(ev.task, result)
    (p,) = responses(conn)
    assert isinstance(p, P.DataIn) and p.statsn == 0xFFFFFFFF
    assert p.exp_cmdsn == 0xFFFFFFF1
    assert p.max_cmdsn == (0xFFFFFFF1 + WINDOW - 1) & 0xFFFFFFFF
    assert conn.statsn == 0 and conn.exp_cmdsn == 0xFFFFFFF1
    assert SessionParams().max_send_data >= BLOCK    # (one Data-In, the short way)
