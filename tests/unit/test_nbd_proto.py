"""The pure NBD core, without sockets: bytes in (one at a time), events and bytes out.

Checks the fixed-newstyle handshake, option replies, meta contexts, TLS policy, request
validation (invariant 9: bad requests are answered with the spec's error and never reach
the volume) and reply encoding.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence

import pytest

from nbd import proto
from nbd.proto import ExportInfo, ServerConnection, TLSMode

EXPORTS = [ExportInfo("tank/vol", 1 << 20, False, "a volume", 1, 65536, 1 << 25),
           ExportInfo("tank/ro", 1 << 20, True)]


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return next((e for e in EXPORTS if e.name == name), None)

    def exports(self) -> Sequence[ExportInfo]:
        return EXPORTS

    def bitmaps(self, name: str) -> Sequence[str]:
        return ["s1", "s2"] if name == "tank/vol" else []


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", proto.IHAVEOPT, opt, len(data)) + data


def name_data(name: str, infos: Sequence[int] = ()) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: Sequence[str]) -> bytes:
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def request(kind: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", proto.REQUEST_MAGIC, flags, kind, cookie, offset,
                       length) + data


def feed(conn: ServerConnection, data: bytes) -> list[object]:
    """Feed one byte at a time, collecting every event."""
    events: list[object] = []
    for i in range(len(data)):
        conn.receive_data(data[i:i + 1])
        while True:
            ev = conn.next_event()
            if ev is proto.NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, (proto.Transmission, proto.Disconnect, proto.StartTLS)):
                break
    return events


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Parse option replies: (option, type, data)."""
    out = []
    pos = 0
    while pos < len(raw):
        magic, opt, rtype, n = struct.unpack_from(">QIII", raw, pos)
        assert magic == proto.REPLY_MAGIC
        out.append((opt, rtype, raw[pos + 20:pos + 20 + n]))
        pos += 20 + n
    return out


def handshake(conn: ServerConnection, *, structured: bool = True,
              meta: bool = True, export: str = "tank/vol") -> proto.Transmission:
    greeting = conn.data_to_send()
    assert greeting == struct.pack(">QQH", proto.NBDMAGIC, proto.IHAVEOPT, 3)
    data = struct.pack(">I", 3)
    if structured:
        data += option(proto.OPT_STRUCTURED_REPLY)
    if meta:
        data += option(proto.OPT_SET_META_CONTEXT, meta_data(export, ["base:allocation"]))
    data += option(proto.OPT_GO, name_data(export, [proto.INFO_BLOCK_SIZE]))
    events = feed(conn, data)
    assert len(events) == 1 and isinstance(events[0], proto.Transmission)
    conn.data_to_send()
    return events[0]


def test_go_with_structured_replies_and_meta_context_byte_by_byte() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    data = (struct.pack(">I", 3) + option(proto.OPT_STRUCTURED_REPLY)
            + option(proto.OPT_SET_META_CONTEXT, meta_data("tank/vol", ["base:allocation"]))
            + option(proto.OPT_GO, name_data("tank/vol", [proto.INFO_NAME])))
    events = feed(conn, data)
    assert events == [proto.Transmission(EXPORTS[0], True, True)]
    reps = replies(conn.data_to_send())
    assert reps[0] == (proto.OPT_STRUCTURED_REPLY, proto.REP_ACK, b"")
    assert reps[1][:2] == (proto.OPT_SET_META_CONTEXT, proto.REP_META_CONTEXT)
    assert reps[1][2] == struct.pack(">I", proto.META_CONTEXT_ID) + b"base:allocation"
    info = {struct.unpack(">H", d[:2])[0]: d[2:] for o, t, d in reps if t == proto.REP_INFO}
    size, flags = struct.unpack(">QH", info[proto.INFO_EXPORT])
    assert size == 1 << 20
    assert flags & proto.TF_CAN_MULTI_CONN and flags & proto.TF_SEND_FLUSH
    assert flags & proto.TF_SEND_FUA and flags & proto.TF_SEND_TRIM
    assert not flags & proto.TF_READ_ONLY
    assert info[proto.INFO_NAME] == b"tank/vol"
    assert struct.unpack(">III", info[proto.INFO_BLOCK_SIZE]) == (1, 65536, 1 << 25)
    assert reps[-1] == (proto.OPT_GO, proto.REP_ACK, b"")


def test_list_unknown_option_and_unknown_export() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    events = feed(conn, struct.pack(">I", 1) + option(99, b"junk") + option(proto.OPT_LIST)
                  + option(proto.OPT_GO, name_data("nope")))
    assert events == []
    reps = replies(conn.data_to_send())
    assert reps[0][:2] == (99, proto.REP_ERR_UNSUP)
    servers = [d for o, t, d in reps if t == proto.REP_SERVER]
    assert [d[4:4 + struct.unpack(">I", d[:4])[0]] for d in servers] == [b"tank/vol",
                                                                          b"tank/ro"]
    assert reps[3][:2] == (proto.OPT_LIST, proto.REP_ACK)
    assert reps[4][:2] == (proto.OPT_GO, proto.REP_ERR_UNKNOWN)
    assert conn.phase is proto.Phase.OPTIONS


def test_export_name_without_zeroes_and_abort() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    events = feed(conn, struct.pack(">I", 1) + option(proto.OPT_EXPORT_NAME, b"tank/ro"))
    assert isinstance(events[0], proto.Transmission) and events[0].export.read_only
    out = conn.data_to_send()
    assert len(out) == 10 + 124
    size, flags = struct.unpack(">QH", out[:10])
    assert size == 1 << 20 and flags & proto.TF_READ_ONLY
    conn2 = ServerConnection(Catalog())
    conn2.data_to_send()
    assert feed(conn2, struct.pack(">I", 3) + option(proto.OPT_ABORT)) == [
        proto.Disconnect("client sent NBD_OPT_ABORT")]


@pytest.mark.parametrize("bad", [
    struct.pack(">I", 0),                               # not fixed newstyle
    struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0),   # bad option magic
    struct.pack(">I", 3) + struct.pack(">QII", proto.IHAVEOPT, 7, 1 << 20),  # oversized
    struct.pack(">I", 3) + option(proto.OPT_EXPORT_NAME, b"missing"),
])
def test_fatal_handshake_errors(bad: bytes) -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    with pytest.raises(proto.RemoteProtocolError):
        feed(conn, bad)
    assert conn.phase is proto.Phase.CLOSED


def test_truncated_handshake_is_an_error_not_a_hang() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    feed(conn, struct.pack(">I", 3) + option(proto.OPT_GO, name_data("tank/vol"))[:9])
    conn.receive_data(b"")
    with pytest.raises(proto.RemoteProtocolError, match="middle of the handshake"):
        conn.next_event()


def test_tls_require_refuses_options_until_starttls() -> None:
    conn = ServerConnection(Catalog(), tls=TLSMode.REQUIRE)
    conn.data_to_send()
    events = feed(conn, struct.pack(">I", 3) + option(proto.OPT_LIST)
                  + option(proto.OPT_STARTTLS))
    assert events == [proto.StartTLS()]
    reps = replies(conn.data_to_send())
    assert reps[0][:2] == (proto.OPT_LIST, proto.REP_ERR_TLS_REQD)
    assert reps[1][:2] == (proto.OPT_STARTTLS, proto.REP_ACK)
    conn.tls_started()
    assert handshake_after_tls(conn).export.name == "tank/vol"


def handshake_after_tls(conn: ServerConnection) -> proto.Transmission:
    events = feed(conn, option(proto.OPT_GO, name_data("tank/vol")))
    assert isinstance(events[0], proto.Transmission)
    return events[0]


def test_starttls_refused_when_tls_off() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    assert feed(conn, struct.pack(">I", 3) + option(proto.OPT_STARTTLS)) == []
    assert replies(conn.data_to_send())[0][:2] == (proto.OPT_STARTTLS, proto.REP_ERR_POLICY)


def test_fua_is_accepted_on_every_command() -> None:
    """proto.md: with SEND_FUA negotiated the server MUST accept FUA on all commands."""
    conn = ServerConnection(Catalog())
    handshake(conn)
    fua = proto.CMD_FLAG_FUA
    events = feed(conn, request(proto.CMD_READ, 1, 0, 512, fua)
                  + request(proto.CMD_FLUSH, 2, flags=fua)
                  + request(proto.CMD_CACHE, 3, 0, 512, fua)
                  + request(proto.CMD_BLOCK_STATUS, 4, 0, 512, fua))
    assert [e.cookie for e in events if isinstance(e, proto.Command)] == [1, 2, 3, 4]
    assert conn.data_to_send() == b""


def test_commands_parse_byte_by_byte() -> None:
    conn = ServerConnection(Catalog())
    handshake(conn)
    data = (request(proto.CMD_WRITE, 1, 4096, 5, proto.CMD_FLAG_FUA, b"hello")
            + request(proto.CMD_READ, 2, 0, 512) + request(proto.CMD_FLUSH, 3)
            + request(proto.CMD_BLOCK_STATUS, 4, 0, 65536, proto.CMD_FLAG_REQ_ONE)
            + request(proto.CMD_DISC, 5))
    events = feed(conn, data)
    assert events == [
        proto.Command(1, proto.CMD_WRITE, proto.CMD_FLAG_FUA, 4096, 5, b"hello"),
        proto.Command(2, proto.CMD_READ, 0, 0, 512),
        proto.Command(3, proto.CMD_FLUSH, 0, 0, 0),
        proto.Command(4, proto.CMD_BLOCK_STATUS, proto.CMD_FLAG_REQ_ONE, 0, 65536),
        proto.Disconnect("client sent NBD_CMD_DISC"),
    ]
    assert conn.data_to_send() == b""


def _error_chunk(raw: bytes) -> tuple[int, int]:
    magic, flags, rtype, cookie, _n = struct.unpack_from(">IHHQI", raw)
    assert magic == proto.STRUCTURED_REPLY_MAGIC and flags & proto.REPLY_FLAG_DONE
    assert rtype == proto.REPLY_TYPE_ERROR
    (code,) = struct.unpack_from(">I", raw, 20)
    return cookie, code


@pytest.mark.parametrize(("req", "code"), [
    (request(proto.CMD_READ, 7, (1 << 20) - 100, 512), proto.NBD_EINVAL),   # past the end
    (request(42, 7), proto.NBD_EINVAL),                                     # unknown command
    (request(proto.CMD_READ, 7, 0, 512, flags=proto.CMD_FLAG_NO_HOLE), proto.NBD_EINVAL),
    (request(proto.CMD_READ, 7, 0, (1 << 25) + 1), proto.NBD_EOVERFLOW),
    (request(proto.CMD_FLUSH, 7, 5, 0), proto.NBD_EINVAL),
    (request(proto.CMD_WRITE, 7, (1 << 20) - 2, 4, data=b"abcd"), proto.NBD_ENOSPC),
    (request(proto.CMD_WRITE_ZEROES, 7, (1 << 20) - 2, 4), proto.NBD_ENOSPC),
    (request(proto.CMD_TRIM, 7, (1 << 20) - 2, 4), proto.NBD_EINVAL),
])
def test_invalid_requests_are_answered_and_never_reach_the_volume(req: bytes,
                                                                  code: int) -> None:
    conn = ServerConnection(Catalog())
    handshake(conn)
    assert feed(conn, req + request(proto.CMD_FLUSH, 8)) == [
        proto.Command(8, proto.CMD_FLUSH, 0, 0, 0)]
    assert _error_chunk(conn.data_to_send()) == (7, code)


def test_read_only_export_refuses_writes_with_eperm_simple_reply() -> None:
    conn = ServerConnection(Catalog())
    handshake(conn, structured=False, meta=False, export="tank/ro")
    assert feed(conn, request(proto.CMD_WRITE, 9, 0, 3, data=b"abc")
                + request(proto.CMD_TRIM, 10, 0, 512)) == []
    out = conn.data_to_send()
    assert struct.unpack(">IIQ", out[:16]) == (proto.SIMPLE_REPLY_MAGIC, proto.NBD_EPERM, 9)
    assert struct.unpack(">IIQ", out[16:]) == (proto.SIMPLE_REPLY_MAGIC, proto.NBD_EPERM, 10)


def test_block_status_needs_meta_context() -> None:
    conn = ServerConnection(Catalog())
    handshake(conn, meta=False)
    assert feed(conn, request(proto.CMD_BLOCK_STATUS, 3, 0, 4096)) == []
    assert _error_chunk(conn.data_to_send()) == (3, proto.NBD_EINVAL)


def test_huge_write_claim_disconnects_after_an_error() -> None:
    conn = ServerConnection(Catalog())
    handshake(conn)
    with pytest.raises(proto.RemoteProtocolError):
        feed(conn, request(proto.CMD_WRITE, 11, 0, 1 << 30))
    assert _error_chunk(conn.data_to_send()) == (11, proto.NBD_EINVAL)


def test_read_replies_structured_holes_and_df() -> None:
    conn = ServerConnection(Catalog())
    handshake(conn)
    cmd = proto.Command(5, proto.CMD_READ, 0, 4096, 8192)
    parts = conn.reply_read(cmd, [(4096, 4096, [b"x" * 4096]), (8192, 4096, None)])
    raw = b"".join(parts)
    _magic, flags, rtype, cookie, n = struct.unpack_from(">IHHQI", raw)
    assert (rtype, flags, cookie, n) == (proto.REPLY_TYPE_OFFSET_DATA, 0, 5, 8 + 4096)
    assert struct.unpack_from(">Q", raw, 20)[0] == 4096
    second = raw[28 + 4096:]
    _magic, flags, rtype, cookie, n = struct.unpack_from(">IHHQI", second)
    assert (rtype, flags, n) == (proto.REPLY_TYPE_OFFSET_HOLE, proto.REPLY_FLAG_DONE, 12)
    assert struct.unpack_from(">QI", second, 20) == (8192, 4096)
    df = proto.Command(6, proto.CMD_READ, proto.CMD_FLAG_DF, 4096, 8192)
    # A run's data comes as several buffers (one per block): sent back to back.
    raw = b"".join(conn.reply_read(df, [(4096, 4096, [b"x" * 4000, b"y" * 96]),
                                        (8192, 4096, None)]))
    assert len(raw) == 20 + 8 + 8192 and raw.endswith(bytes(4096))
    assert raw[28:28 + 4096] == b"x" * 4000 + b"y" * 96


def test_error_mapping() -> None:

    assert proto.nbd_error(errno.ENOSPC) == proto.NBD_ENOSPC
    assert proto.nbd_error(errno.EROFS) == proto.NBD_EPERM
    assert proto.nbd_error(errno.EIO) == proto.NBD_EIO
    assert proto.nbd_error(errno.EBADMSG) == proto.NBD_EIO


def test_dirty_bitmap_contexts_are_listed_selected_and_answered_in_order() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    data = (struct.pack(">I", 3) + option(proto.OPT_STRUCTURED_REPLY)
            + option(proto.OPT_LIST_META_CONTEXT, meta_data("tank/vol", []))
            + option(proto.OPT_LIST_META_CONTEXT, meta_data("tank/vol", ["qemu:"]))
            + option(proto.OPT_SET_META_CONTEXT, meta_data(
                "tank/vol", ["qemu:dirty-bitmap:s2", "qemu:dirty-bitmap:nope",
                             "base:allocation"]))
            + option(proto.OPT_GO, name_data("tank/vol")))
    events = feed(conn, data)
    assert len(events) == 1 and isinstance(events[0], proto.Transmission)
    ctx = [(o, struct.unpack(">I", d[:4])[0], d[4:].decode())
           for o, t, d in replies(conn.data_to_send()) if t == proto.REP_META_CONTEXT]
    listed = proto.OPT_LIST_META_CONTEXT
    assert ctx == [(listed, 0, "base:allocation"), (listed, 0, "qemu:dirty-bitmap:s1"),
                   (listed, 0, "qemu:dirty-bitmap:s2"),
                   (listed, 0, "qemu:dirty-bitmap:s1"), (listed, 0, "qemu:dirty-bitmap:s2"),
                   (proto.OPT_SET_META_CONTEXT, 1, "qemu:dirty-bitmap:s2"),
                   (proto.OPT_SET_META_CONTEXT, 2, "base:allocation")]
    assert conn.contexts == [(1, "qemu:dirty-bitmap:s2"), (2, "base:allocation")]
    cmd = proto.Command(7, proto.CMD_BLOCK_STATUS, 0, 0, 8192)
    raw = conn.reply_block_status(cmd, [(1, [(4096, 1), (4096, 0)]), (2, [(8192, 0)])])
    _m, flags, rtype, cookie, n = struct.unpack_from(">IHHQI", raw)
    assert (flags, rtype, cookie, n) == (0, proto.REPLY_TYPE_BLOCK_STATUS, 7, 20)
    assert struct.unpack_from(">IIIII", raw, 20) == (1, 4096, 1, 4096, 0)
    _m, flags, rtype, cookie, n = struct.unpack_from(">IHHQI", raw, 40)
    assert (flags, n) == (proto.REPLY_FLAG_DONE, 12)
    assert struct.unpack_from(">III", raw, 60) == (2, 8192, 0)
    assert len(raw) == 72


def test_a_large_write_is_received_into_its_own_buffer_however_it_arrives() -> None:
    """Writes of DIRECT_PAYLOAD bytes or more: the payload goes into one buffer, whether
    it comes through receive_data (any split) or receive_buffer/received_into; the
    requests around it are parsed as usual; a connection closed mid-payload is an error."""
    payload = bytes(range(256)) * 400                       # 102400 bytes
    wire = (request(proto.CMD_WRITE, 1, 4096, len(payload), data=payload)
            + request(proto.CMD_FLUSH, 2))
    for split in (1, 7, 4096, 65536, len(wire)):
        conn = ServerConnection(Catalog())
        handshake(conn)
        events: list[object] = []
        for i in range(0, len(wire), split):
            conn.receive_data(wire[i:i + split])
            while (ev := conn.next_event()) is not proto.NEED_DATA:
                events.append(ev)
        assert [(e.kind, e.offset, bytes(e.data)) for e in events
                if isinstance(e, proto.Command)] == [(proto.CMD_WRITE, 4096, payload),
                                                     (proto.CMD_FLUSH, 0, b"")], split
    conn = ServerConnection(Catalog())
    handshake(conn)
    conn.receive_data(wire[:28 + 1000])
    assert conn.next_event() is proto.NEED_DATA
    buf = conn.receive_buffer()
    assert buf is not None and len(buf) == len(payload) - 1000
    buf[:5000] = payload[1000:6000]
    conn.received_into(5000)
    assert conn.next_event() is proto.NEED_DATA
    conn.receive_data(wire[6028:])
    ev = conn.next_event()
    assert isinstance(ev, proto.Command) and bytes(ev.data) == payload
    assert conn.receive_buffer() is None
    cut = ServerConnection(Catalog())
    handshake(cut)
    cut.receive_data(wire[:28 + 70000])
    assert cut.next_event() is proto.NEED_DATA
    cut.received_into(0)                                    # the client went away
    with pytest.raises(proto.RemoteProtocolError, match="middle of a request"):
        cut.next_event()
