"""The pure iSCSI core without sockets: PDU codec byte by byte, login negotiation and
CHAP, and the session state machine fed raw PDUs (invariant 9: bad input gets its RFC
answer and nothing else)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi import pdu as P
from iscsi.login import (
    AUTH_FAILED,
    AUTHORIZATION_FAILED,
    NOT_FOUND,
    Credentials,
    Login,
    TargetPolicy,
    negotiate_key,
)
from iscsi.session import Close, Connection, LoggedIn, _segments

TARGET = "iqn.2026-11.org.storaged:tank:vol"
INITIATOR = "iqn.2026-01.org.example:host"


class Directory:
    def __init__(self, policy: TargetPolicy | None = None) -> None:
        self.p = policy or TargetPolicy()

    def policy(self, target: str) -> TargetPolicy | None:
        return self.p if target == TARGET else None

    def visible(self, initiator: str) -> list[str]:
        return [TARGET] if self.p.permits(initiator) else []


def feed_bytewise(reader: P.PDUReader, data: bytes) -> list[P.PDU]:
    out: list[P.PDU] = []
    for b in data:
        reader.receive_data(bytes([b]))
        p = reader.next_pdu()
        if p is not None:
            out.append(p)
    return out


# ---- PDU codec ---------------------------------------------------------------------------
def test_scsi_command_bhs_layout() -> None:
    cmd = P.ScsiCommand(read=True, itt=0x11223344, edtl=4096, cmdsn=7, exp_statsn=9,
                        cdb16=bytes([0x28]) + bytes(15))
    b = P.encode(cmd)
    assert len(b) == 48
    assert b[0] == 0x01 and b[1] == 0xC1            # opcode; F, R, ATTR simple
    assert b[16:20] == bytes.fromhex("11223344")
    assert int.from_bytes(b[20:24], "big") == 4096
    assert b[32] == 0x28


def test_every_opcode_round_trips_byte_at_a_time() -> None:
    for cls in P.PDU_TYPES.values():
        p = cls(data=b"hello")        # 5 bytes: 3 of padding on the wire
        wire = P.encode(p)
        assert len(wire) == 48 + 8
        r = P.PDUReader(opcodes=frozenset(P.PDU_TYPES))
        assert feed_bytewise(r, wire) == [p]


def test_digests_are_crc32c_and_checked() -> None:
    assert P.crc32c(b"123456789") == 0xE3069283
    p = P.NopOut(itt=1, data=b"ping")
    wire = P.encode(p, header_digest=True, data_digest=True)
    assert len(wire) == 48 + 4 + 4 + 4
    r = P.PDUReader()
    r.header_digest = r.data_digest = True
    assert feed_bytewise(r, wire) == [p]
    bad = bytearray(wire)
    bad[53] ^= 1                                       # a data byte
    r.receive_data(bytes(bad))
    with pytest.raises(P.ProtocolError) as e:
        r.next_pdu()
    assert e.value.reason == P.REJECT_DATA_DIGEST and not e.value.fatal
    bad = bytearray(wire)
    bad[3] ^= 1                                        # a header byte
    r.receive_data(bytes(bad))
    with pytest.raises(P.ProtocolError) as e:
        r.next_pdu()
    assert e.value.fatal


_U32 = st.integers(0, 2**32 - 1)


@settings(max_examples=200, deadline=None)
@given(_U32, _U32, _U32, _U32, st.binary(min_size=1, max_size=70), st.booleans(),
       st.booleans())
def test_fast_answers_are_byte_identical_to_the_general_encoder(
        itt: int, statsn: int, exp_cmdsn: int, max_cmdsn: int, data: bytes, hd: bool,
        dd: bool) -> None:
    """The packed-at-once Data-In with status and GOOD SCSI Response (one per command)
    are exactly what encode_pieces makes of the same PDU values, digests and padding
    included, and read back as those values."""
    din = P.DataIn(final=True, has_status=True, status=0, itt=itt, statsn=statsn,
                   exp_cmdsn=exp_cmdsn, max_cmdsn=max_cmdsn, data=data)
    fast = P.data_in_with_status(itt, statsn, exp_cmdsn, max_cmdsn, data,
                                 header_digest=hd, data_digest=dd)
    general = P.encode_pieces(din, header_digest=hd, data_digest=dd)
    assert [bytes(x) for x in fast] == [bytes(x) for x in general]
    rsp = P.ScsiResponse(status=0, itt=itt, statsn=statsn, exp_cmdsn=exp_cmdsn,
                         max_cmdsn=max_cmdsn)
    good = P.good_response(itt, statsn, exp_cmdsn, max_cmdsn, header_digest=hd)
    assert good == P.encode(rsp, header_digest=hd)
    r = P.PDUReader(opcodes=P.TARGET_OPCODES)
    r.header_digest, r.data_digest = hd, dd
    r.receive_data(b"".join(bytes(x) for x in fast) + good)
    assert r.next_pdu() == din
    assert r.next_pdu() == rsp
    with pytest.raises(ValueError):
        P.data_in_with_status(itt, statsn, exp_cmdsn, max_cmdsn, b"")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 3, 4096, 300_000]), st.booleans()),
                min_size=1, max_size=6),
       st.lists(st.integers(1, 320_000), min_size=1, max_size=8), st.booleans())
def test_reader_buffer_reused_across_receives_frames_exactly(
        shapes: list[tuple[int, bool]], chunks: list[int], digests: bool) -> None:
    """The reader's one reused buffer (received into through ``room``): any split of the
    stream into receives -- PDUs cut anywhere, a PDU longer than the room (the buffer
    grows), a partial tail moved to the front -- gives back exactly the PDUs sent, in
    order, as byte-wise feeding does (invariant 9)."""
    pdus: list[P.PDU] = []
    for i, (n, cmd) in enumerate(shapes):
        data = bytes([i % 251]) * n
        pdus.append(P.ScsiCommand(write=True, itt=i, edtl=n, cmdsn=i, data=data) if cmd
                    else P.DataOut(final=True, itt=i, offset=i, data=data))
    wire = b"".join(P.encode(p, header_digest=digests, data_digest=digests) for p in pdus)
    r = P.PDUReader(max_data=1 << 20)
    r.header_digest = r.data_digest = digests
    got: list[P.PDU] = []
    pos, k = 0, 0
    while pos < len(wire):
        want = chunks[k % len(chunks)]
        k += 1
        with r.room(min(want, 4096) if k % 3 else want) as room:
            n = min(len(room), want, len(wire) - pos)
            room[:n] = wire[pos:pos + n]
        r.received(n)
        pos += n
        while (p := r.next_pdu()) is not None:
            got.append(p)
    assert got == pdus
    assert r.buffered == 0
    with pytest.raises(ValueError):
        r.received(len(r.room()) + 1)


def test_data_segment_longer_than_negotiated_is_refused() -> None:
    r = P.PDUReader(max_data=512)
    r.receive_data(P.encode(P.NopOut(data=bytes(1024))))
    with pytest.raises(P.ProtocolError):
        r.next_pdu()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_reader_fuzz_raises_only_protocol_errors(data: bytes) -> None:
    r = P.PDUReader()
    r.receive_data(data)
    for _ in range(10):
        try:
            if r.next_pdu() is None:
                break
        except P.ProtocolError:
            break


# ---- login -------------------------------------------------------------------------------
def login_req(pairs: list[tuple[str, str]], *, csg: int = 1, nsg: int = 3,
              transit: bool = True, isid: bytes = b"\x80\0\0\0\0\1") -> P.LoginRequest:
    return P.LoginRequest(transit=transit, csg=csg, nsg=nsg, isid=isid, itt=1, cmdsn=1,
                          data=P.format_text(pairs))


def new_login(policy: TargetPolicy | None = None) -> Login:
    return Login(Directory(policy), lambda: 5, random=lambda n: bytes(range(1, n + 1)))


def test_operational_negotiation_result_functions() -> None:
    lg = new_login()
    rsp = lg.handle(login_req([
        ("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
        ("MaxBurstLength", "16776192"), ("FirstBurstLength", "1024"),
        ("ImmediateData", "Yes"), ("InitialR2T", "No"), ("HeaderDigest", "CRC32C,None"),
        ("DataDigest", "None"), ("ErrorRecoveryLevel", "2"), ("DefaultTime2Wait", "0"),
        ("MaxRecvDataSegmentLength", "65536"), ("X-com.example.Foo", "1"),
        ("MaxOutstandingR2T", "zero")]))
    keys = dict(P.parse_text(rsp.data))
    assert rsp.status_class == 0 and rsp.transit and rsp.tsih == 5
    assert keys["MaxBurstLength"] == str(1024 * 1024)        # min
    assert keys["FirstBurstLength"] == "1024"
    assert keys["InitialR2T"] == "No"                        # OR with our No
    assert keys["HeaderDigest"] == "CRC32C"
    assert keys["ErrorRecoveryLevel"] == "0"
    assert keys["DefaultTime2Wait"] == "2"                   # max
    assert keys["X-com.example.Foo"] == "NotUnderstood"
    assert keys["MaxOutstandingR2T"] == "Reject"
    assert keys["TargetPortalGroupTag"] == "1"
    assert lg.result is not None
    p = lg.result.params
    assert p.header_digest and not p.data_digest and p.max_send_data == 65536
    assert negotiate_key("DataPDUInOrder", "No") == ("Yes", True)


@pytest.mark.parametrize(("target", "status"), [("iqn.2026-11.org.storaged:nope", NOT_FOUND),
                                                (TARGET, AUTHORIZATION_FAILED)])
def test_login_refusals(target: str, status: int) -> None:
    lg = new_login(TargetPolicy(allow=("iqn.2026-01.org.example:other",)))
    rsp = lg.handle(login_req([("InitiatorName", INITIATOR), ("TargetName", target)]))
    assert (rsp.status_class << 8 | rsp.status_detail) == status and lg.failed


def chap_login(policy: TargetPolicy, secret: bytes, mutual: bool) -> tuple[Login, P.LoginResponse]:
    lg = new_login(policy)
    r1 = lg.handle(login_req([("InitiatorName", INITIATOR), ("TargetName", TARGET),
                              ("AuthMethod", "CHAP,None")], csg=0, nsg=1))
    assert dict(P.parse_text(r1.data))["AuthMethod"] == "CHAP" and not r1.transit
    r2 = lg.handle(login_req([("CHAP_A", "7,5")], csg=0, nsg=1, transit=False))
    k = dict(P.parse_text(r2.data))
    ident, chal = int(k["CHAP_I"]), bytes.fromhex(k["CHAP_C"][2:])
    answer = hashlib.md5(bytes([ident]) + secret + chal).hexdigest()
    pairs = [("CHAP_N", "alice"), ("CHAP_R", "0x" + answer)]
    if mutual:
        pairs += [("CHAP_I", "9"), ("CHAP_C", "0x" + "ab" * 16)]
    return lg, lg.handle(login_req(pairs, csg=0, nsg=1))


def test_chap_one_way_and_mutual() -> None:
    one = TargetPolicy(chap=Credentials("alice", b"alice-secret1"))
    lg, rsp = chap_login(one, b"alice-secret1", mutual=False)
    assert rsp.status_class == 0 and rsp.transit and rsp.nsg == 1
    _lg, rsp = chap_login(one, b"wrong-secret", mutual=False)
    assert (rsp.status_class << 8 | rsp.status_detail) == AUTH_FAILED
    both = TargetPolicy(chap=Credentials("alice", b"alice-secret1"),
                        mutual=Credentials("target", b"target-secret"))
    _lg, rsp = chap_login(both, b"alice-secret1", mutual=True)
    k = dict(P.parse_text(rsp.data))
    assert k["CHAP_N"] == "target"
    assert k["CHAP_R"] == "0x" + hashlib.md5(bytes([9]) + b"target-secret"
                                             + bytes.fromhex("ab" * 16)).hexdigest()
    assert "alice-secret1" not in repr(both) and "target-secret" not in repr(both)
    # Skipping security on a CHAP target is an authentication failure.
    lg = new_login(one)
    rsp = lg.handle(login_req([("InitiatorName", INITIATOR), ("TargetName", TARGET)]))
    assert (rsp.status_class << 8 | rsp.status_detail) == AUTH_FAILED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=20).filter(lambda s: "=" not in s
                                                                   and "\0" not in s),
                          st.text(max_size=30).filter(lambda s: "\0" not in s)),
                max_size=8),
       st.integers(0, 3), st.integers(0, 3), st.booleans())
def test_login_fuzz_never_raises(pairs: list[tuple[str, str]], csg: int, nsg: int,
                                 transit: bool) -> None:
    lg = new_login()
    rsp = lg.handle(login_req([("InitiatorName", INITIATOR), *pairs], csg=csg, nsg=nsg,
                              transit=transit))
    assert isinstance(rsp, P.LoginResponse)


# ---- session -----------------------------------------------------------------------------
def logged_in() -> tuple[Connection, list[P.PDU]]:
    conn = Connection(Directory(), new_tsih=lambda: 1, unit=lambda _t: None,
                      portal="127.0.0.1:3260")
    conn.receive_data(P.encode(login_req([("InitiatorName", INITIATOR),
                                          ("SessionType", "Discovery")])))
    ev = conn.next_event()
    assert isinstance(ev, LoggedIn)
    return conn, responses(conn)


def responses(conn: Connection) -> list[P.PDU]:
    r = P.PDUReader(opcodes=P.TARGET_OPCODES, max_data=1 << 20)
    r.receive_data(conn.data_to_send())
    out = []
    while (p := r.next_pdu()) is not None:
        out.append(p)
    return out


def test_discovery_send_targets_and_cmdsn_window() -> None:
    conn, _ = logged_in()
    conn.receive_data(P.encode(P.TextRequest(itt=2, cmdsn=1,
                                             data=P.format_text([("SendTargets", "All")]))))
    assert conn.next_event() is None
    (rsp,) = responses(conn)
    assert isinstance(rsp, P.TextResponse)
    assert P.parse_text(rsp.data) == [("TargetName", TARGET),
                                      ("TargetAddress", "127.0.0.1:3260,1")]
    # A command outside [ExpCmdSN, MaxCmdSN] is silently ignored.
    conn.receive_data(P.encode(P.NopOut(itt=3, cmdsn=rsp.max_cmdsn + 1)))
    assert conn.next_event() is None and responses(conn) == []
    conn.receive_data(P.encode(P.NopOut(itt=4, cmdsn=2, data=b"abc")))
    conn.next_event()
    (nop,) = responses(conn)
    assert isinstance(nop, P.NopIn) and nop.itt == 4 and nop.data == b"abc"


def test_bad_pdus_in_full_feature_phase_are_rejected() -> None:
    conn, _ = logged_in()
    # A Login Request in full feature phase, and a SCSI command in a discovery session.
    conn.receive_data(P.encode(login_req([("InitiatorName", INITIATOR)])))
    conn.receive_data(P.encode(P.ScsiCommand(itt=9, cmdsn=1)))
    assert conn.next_event() is None
    rejects = responses(conn)
    assert [type(p) for p in rejects] == [P.Reject, P.Reject]
    assert rejects[0].data[:1] == bytes([0x43])      # the offending header comes back
    # An opcode initiators never send.
    conn.receive_data(P.encode(P.NopIn()))
    assert conn.next_event() is None
    (rej,) = responses(conn)
    assert isinstance(rej, P.Reject) and rej.reason == P.REJECT_NOT_SUPPORTED
    # Garbage framing ends the connection.
    conn.receive_data(P.encode(P.NopOut(itt=1, cmdsn=2, data=bytes(300000))))
    assert isinstance(conn.next_event(), Close)


def test_logout() -> None:
    conn, _ = logged_in()
    conn.receive_data(P.encode(P.LogoutRequest(itt=7, cmdsn=1)))
    assert isinstance(conn.next_event(), Close)
    (rsp,) = responses(conn)
    assert isinstance(rsp, P.LogoutResponse) and rsp.response == 0 and rsp.itt == 7


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=8), st.integers(1, 3000),
       st.integers(1, 6000))
@settings(max_examples=200, deadline=None)
def test_data_in_segments_cover_the_parts_exactly(sizes: list[int], seg: int,
                                                  burst: int) -> None:
    """Data-In segments of a read's buffers: back to back, each at most seg bytes and
    inside one burst, F (end of burst) exactly at burst boundaries, and as long as that
    allows (a segment shorter than seg ends a burst or the data: fewest PDUs), gathering
    the parts (whole, or views of them: nothing copied)."""
    parts = [bytes([i]) * n for i, n in enumerate(sizes)]
    total = sum(sizes)
    pos = 0
    out = bytearray()
    for off, bufs, n, end_of_burst in _segments(parts, seg, burst):
        assert off == pos and 0 < n <= seg and n == sum(len(b) for b in bufs)
        assert off // burst == (off + n - 1) // burst
        assert end_of_burst == ((off + n) % burst == 0)
        assert n == seg or end_of_burst or off + n == total
        for b in bufs:
            assert any(b is p or (isinstance(b, memoryview) and b.obj is p)
                       for p in parts)
            out += b
        pos += n
    assert bytes(out) == b"".join(parts)
