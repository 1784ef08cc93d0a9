"""A tiny blocking iSCSI initiator over a raw socket, built on ``iscsi.pdu``: enough to log
in, run SCSI commands (Data-In, R2T/Data-Out) and to send whatever broken PDU a test
wants. Used by the reservation, bad-input and multi-initiator tests."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from iscsi import pdu as P

DEFAULT_KEYS: tuple[tuple[str, str], ...] = (
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("ImmediateData", "No"),
    ("InitialR2T", "Yes"), ("MaxRecvDataSegmentLength", "262144"),
    ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144"))


@dataclass
class Reply:
    status: int
    data: bytes = b""
    sense: bytes = b""

    @property
    def sense_key(self) -> tuple[int, int, int]:
        """(key, ASC, ASCQ) of fixed-format sense data."""
        s = self.sense
        return (s[2] & 0x0F, s[12], s[13]) if len(s) >= 14 else (0, 0, 0)


@dataclass
class RawInitiator:
    host: str
    port: int
    initiator: str = "iqn.2026-01.org.test:raw"
    isid: bytes = b"\x80\0\0\0\0\1"
    timeout: float = 10.0
    sock: socket.socket = field(init=False)
    reader: P.PDUReader = field(init=False)
    cmdsn: int = 1
    exp_statsn: int = 0
    itt: int = 1
    max_cmdsn: int = 1
    header_digest: bool = False
    data_digest: bool = False

    def __post_init__(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.reader = P.PDUReader(opcodes=P.TARGET_OPCODES, max_data=1 << 24)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawInitiator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- wire --------------------------------------------------------------------------
    def send(self, pdu: P.PDU) -> None:
        self.sock.sendall(P.encode(pdu, header_digest=self.header_digest,
                                   data_digest=self.data_digest))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> P.PDU | None:
        """The next PDU, or None when the target closed the connection."""
        while (p := self.reader.next_pdu()) is None:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.reader.receive_data(data)
        statsn = getattr(p, "statsn", None)
        if isinstance(statsn, int) and not isinstance(p, (P.DataIn, P.R2T)):
            self.exp_statsn = statsn + 1 & 0xFFFFFFFF
        max_cmdsn = getattr(p, "max_cmdsn", None)
        if isinstance(max_cmdsn, int):
            self.max_cmdsn = max_cmdsn
        return p

    def closed(self) -> bool:
        """Whether the target closed the connection (reads until it does or times out)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    # ---- login -------------------------------------------------------------------------
    def login(self, target: str | None, keys: tuple[tuple[str, str], ...] = DEFAULT_KEYS
              ) -> P.LoginResponse:
        pairs = [("InitiatorName", self.initiator)]
        pairs += [("SessionType", "Discovery")] if target is None else [
            ("TargetName", target), ("SessionType", "Normal")]
        self.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=self.isid, itt=0,
                                 cmdsn=self.cmdsn, data=P.format_text(pairs + list(keys))))
        resp = self.recv()
        assert isinstance(resp, P.LoginResponse), resp
        agreed = dict(P.parse_text(resp.data))
        self.header_digest = agreed.get("HeaderDigest") == "CRC32C"
        self.data_digest = agreed.get("DataDigest") == "CRC32C"
        self.reader.header_digest = self.header_digest
        self.reader.data_digest = self.data_digest
        return resp

    # ---- SCSI --------------------------------------------------------------------------
    def command(self, cdb: bytes, *, read: int = 0, data_out: bytes = b"",
                edtl: int | None = None, cmdsn: int | None = None) -> P.ScsiCommand:
        """Send a SCSI Command PDU (no data); returns it."""
        itt, self.itt = self.itt, self.itt + 1
        cmd = P.ScsiCommand(read=bool(read), write=bool(data_out), itt=itt,
                            edtl=edtl if edtl is not None else (read or len(data_out)),
                            cmdsn=self.cmdsn if cmdsn is None else cmdsn,
                            exp_statsn=self.exp_statsn, cdb16=cdb.ljust(16, b"\0"))
        if cmdsn is None:
            self.cmdsn = self.cmdsn + 1 & 0xFFFFFFFF
        self.send(cmd)
        return cmd

    def scsi(self, cdb: bytes, *, read: int = 0, data_out: bytes = b"") -> Reply:
        cmd = self.command(cdb, read=read, data_out=data_out)
        data = bytearray()
        while True:
            p = self.recv()
            assert p is not None, "connection closed during a command"
            if isinstance(p, P.R2T) and p.itt == cmd.itt:
                chunk = data_out[p.offset:p.offset + p.length]
                for n, off in enumerate(range(0, len(chunk), 65536)):
                    piece = chunk[off:off + 65536]
                    self.send(P.DataOut(final=off + 65536 >= len(chunk), itt=cmd.itt,
                                        ttt=p.ttt, exp_statsn=self.exp_statsn, datasn=n,
                                        offset=p.offset + off, data=piece))
            elif isinstance(p, P.DataIn) and p.itt == cmd.itt:
                data[p.offset:p.offset + len(p.data)] = p.data
                if p.has_status:
                    return Reply(p.status, bytes(data))
            elif isinstance(p, P.ScsiResponse) and p.itt == cmd.itt:
                sense = p.data[2:2 + int.from_bytes(p.data[:2], "big")] if p.data else b""
                return Reply(p.status, bytes(data), bytes(sense))
            elif isinstance(p, P.Reject):
                return Reply(-1, bytes(p.data))


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(
        2, "big") + bytes([0])


def write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(
        2, "big") + bytes([0])


def prout(action: int, key: int, sark: int = 0, rtype: int = 0, *,
          aptpl: bool = False) -> tuple[bytes, bytes]:
    """A PERSISTENT RESERVE OUT CDB and its basic parameter list."""
    cdb = bytes([0x5F, action, rtype & 0x0F, 0, 0]) + (24).to_bytes(4, "big") + b"\0"
    params = key.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes(4) + bytes(
        [0x01 if aptpl else 0, 0, 0, 0])
    return cdb, params


def prin(action: int, length: int = 8192) -> bytes:
    return bytes([0x5E, action, 0, 0, 0, 0, 0]) + length.to_bytes(2, "big") + b"\0"
