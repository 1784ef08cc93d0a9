"""The protocol core's per-request fast path (issue 27, QD1 latency; nbd/proto.py): in
transmission ``next_event`` goes to the request parser first, a ``Command`` is a tuple, and a
structured read reply's chunk header and offset are packed in one call. Each must give the
same events and the same bytes as the general path (P1-P3 unchanged): requests cut at every
byte, a refused write's payload being skipped (P1) right before a valid request, and read
replies compared with headers packed field by field here."""

from __future__ import annotations

import random
import struct

import pytest

from nbd import proto
from nbd.proto import ServerConnection
from tests.unit.test_nbd_proto import Catalog, feed, handshake, request


def _events(conn: ServerConnection, data: bytes, cut: int) -> list[object]:
    """Feed ``data`` in pieces of ``cut`` bytes, collecting every event."""
    out: list[object] = []
    for i in range(0, len(data), cut):
        conn.receive_data(data[i:i + cut])
        while (ev := conn.next_event()) is not proto.NEED_DATA:
            out.append(ev)
    return out


@pytest.mark.parametrize("cut", [1, 3, 27, 28, 29, 100, 4096, 1 << 20])
def test_a_refused_write_is_skipped_before_the_next_request_is_parsed(cut: int) -> None:
    """P1 with the fast path: the payload of a refused write (read-only export) is skipped,
    never parsed as a header, however the bytes are cut; then the read behind it is a
    Command and the write's error reply comes before anything else."""
    conn = ServerConnection(Catalog())
    handshake(conn, structured=False, meta=False, export="tank/ro")
    payload = struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, 99, 0, 512) * 20
    data = (request(proto.CMD_WRITE, 9, 0, len(payload), data=payload)
            + request(proto.CMD_READ, 10, 4096, 512) + request(proto.CMD_FLUSH, 11))
    assert _events(conn, data, cut) == [proto.Command(10, proto.CMD_READ, 0, 4096, 512),
                                        proto.Command(11, proto.CMD_FLUSH, 0, 0, 0)]
    out = conn.data_to_send()
    assert out == struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, proto.NBD_EPERM, 9)


def test_many_requests_cut_anywhere_give_the_same_commands() -> None:
    """A random stream of reads, writes (small and DIRECT_PAYLOAD-sized), flushes and bad
    requests, cut at random: the same commands, with their payloads byte for byte, and
    the same error replies as when fed one byte at a time."""
    rng = random.Random(27)
    data = b""
    for cookie in range(1, 200):
        kind = rng.choice(["read", "write", "big", "flush", "bad"])
        off = rng.randrange(0, 1 << 19, 512)
        if kind == "read":
            data += request(proto.CMD_READ, cookie, off, 4096)
        elif kind == "write":
            data += request(proto.CMD_WRITE, cookie, off, 4096, data=rng.randbytes(4096))
        elif kind == "big":
            n = proto.DIRECT_PAYLOAD + 512
            data += request(proto.CMD_WRITE, cookie, off, n, data=rng.randbytes(n))
        elif kind == "flush":
            data += request(proto.CMD_FLUSH, cookie)
        else:
            data += request(proto.CMD_READ, cookie, (1 << 20) - 100, 512)   # past the end
    one = ServerConnection(Catalog())
    handshake(one)
    want = feed(one, data)
    want_out = one.data_to_send()
    for _ in range(4):
        conn = ServerConnection(Catalog())
        handshake(conn)
        got: list[object] = []
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 5, 28, 29, 500, 4124, 70000])
            conn.receive_data(data[pos:pos + n])
            pos += n
            while (ev := conn.next_event()) is not proto.NEED_DATA:
                got.append(ev)
        assert [(c.cookie, c.kind, c.offset, c.length, bytes(c.data)) for c in got
                if isinstance(c, proto.Command)] == \
            [(c.cookie, c.kind, c.offset, c.length, bytes(c.data)) for c in want
             if isinstance(c, proto.Command)]
        assert conn.data_to_send() == want_out
    assert sum(isinstance(e, proto.Command) for e in want) > 100
    assert want_out     # the bad requests were answered


def test_a_command_is_immutable_and_compares_by_value() -> None:
    cmd = proto.Command(1, proto.CMD_READ, 0, 4096, 512)
    with pytest.raises(AttributeError):
        cmd.offset = 0      # type: ignore[misc]
    assert cmd == proto.Command(1, proto.CMD_READ, 0, 4096, 512, b"")
    assert cmd.name == "READ" and proto.Command(2, 42, 0, 0, 0).name == "42"


def test_structured_read_reply_is_byte_exact() -> None:
    """The data chunks' header and offset (packed in one call) against headers packed
    field by field: data, a hole, data; the last chunk carries DONE."""
    conn = ServerConnection(Catalog())
    handshake(conn)
    cmd = proto.Command(0x1122334455667788, proto.CMD_READ, 0, 65536, 3 * 4096)
    a, b = bytes(range(256)) * 16, bytes(reversed(range(256))) * 16
    raw = b"".join(conn.reply_read(cmd, [(65536, 4096, [a[:1000], a[1000:]]),
                                         (69632, 4096, None), (73728, 4096, [b])]))
    magic = proto.STRUCTURED_REPLY_MAGIC
    want = (struct.pack(">IHHQI", magic, 0, proto.REPLY_TYPE_OFFSET_DATA, cmd.cookie, 4104)
            + struct.pack(">Q", 65536) + a
            + struct.pack(">IHHQI", magic, 0, proto.REPLY_TYPE_OFFSET_HOLE, cmd.cookie, 12)
            + struct.pack(">QI", 69632, 4096)
            + struct.pack(">IHHQI", magic, proto.REPLY_FLAG_DONE,
                          proto.REPLY_TYPE_OFFSET_DATA, cmd.cookie, 4104)
            + struct.pack(">Q", 73728) + b)
    assert raw == want
