"""The control API client used by storagectl (the protocol is described in
storaged/control.py): plain blocking sockets and the standard library only, so that the
CLI starts without loading the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, Protocol

DEFAULT_SOCKET = "/run/storaged/control.sock"
MAX_FRAME = 16 << 20            # largest stream frame either side accepts
FRAME = 4 << 20                 # frame size storagectl sends a stream in
SOCKET_BUFFER = 4 << 20
FRAME_HEAD = struct.Struct(">I")
Buffer = bytes | bytearray | memoryview


def default_socket() -> str:
    return os.environ.get("STORAGED_SOCKET", DEFAULT_SOCKET)


class _Settable(Protocol):
    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


def widen(sock: _Settable) -> None:
    """Room for a few MiB of stream in the socket (capped by net.core.wmem_max): the
    sending side stays that far ahead without waiting for the receiver to wake up."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


def _send_pieces_blocking(sock: socket.socket, pieces: Sequence[Buffer]) -> None:
    """Send buffers back to back with scatter-gather writes (no joined copy)."""
    views = [memoryview(p).cast("B") for p in pieces]
    while views:
        views = advance(views, sock.sendmsg(views))


def advance(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` after ``n`` bytes were sent."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def call(path: str, method: str, params: dict[str, Any],
         on_progress: Any = None) -> Any:
    """Blocking client used by storagectl; raises ControlError / ConnectionError."""
    s = _connect(path, method, params)
    try:
        r = _Reader(s)
        while "progress" in (msg := _answer(r)):
            if on_progress is not None:
                on_progress(msg["progress"])
        return msg["result"]
    finally:
        s.close()


def _connect(path: str, method: str, params: dict[str, Any]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        widen(s)
        s.sendall(json.dumps({"method": method, "params": params}).encode() + b"\n")
    except BaseException:
        s.close()
        raise
    return s


class _Reader:
    """Reply lines and stream frames from a blocking socket: frames are received straight
    into a caller's buffer (reused from frame to frame), lines through a small buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def line(self) -> bytes:
        while (i := self.buf.find(b"\n")) < 0:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the daemon closed the connection without answering")
            self.buf += data
        out = bytes(self.buf[:i])
        del self.buf[:i + 1]
        return out

    def into(self, view: memoryview) -> None:
        """Fill ``view`` exactly."""
        got = min(len(self.buf), len(view))
        if got:
            view[:got] = self.buf[:got]
            del self.buf[:got]
        while got < len(view):
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("the daemon closed the connection in the middle of "
                                      "the stream")
            got += k


def _answer(r: _Reader) -> Any:
    """The result line of a reply, or raise its error."""
    msg = json.loads(r.line())
    if "error" in msg:
        raise ControlError(msg["error"]["message"], msg["error"].get("kind", ""))
    return msg


def call_send(path: str, params: dict[str, Any], out: Any,
              on_progress: Any = None) -> Any:
    """volume.send: write the stream to the binary file ``out``; returns the result."""
    s = _connect(path, "volume.send", params)
    try:
        r = _Reader(s)
        header = _answer(r)["stream"]
        done = 0
        head = memoryview(bytearray(FRAME_HEAD.size))
        buf = memoryview(bytearray(FRAME))
        while True:
            r.into(head)
            (n,) = FRAME_HEAD.unpack(head)
            if n == 0:
                break
            if n > MAX_FRAME:
                raise ConnectionError(f"the daemon sent a frame of {n} bytes")
            if n > len(buf):
                buf = memoryview(bytearray(n))
            r.into(buf[:n])
            out.write(buf[:n])
            done += n
            if on_progress is not None:
                on_progress(header, done)
        out.flush()
        return _answer(r)["result"]
    finally:
        s.close()


def call_receive(path: str, params: dict[str, Any], src: Any,
                 on_progress: Any = None) -> Any:
    """volume.receive: send the binary file ``src`` as the stream; returns the result."""
    s = _connect(path, "volume.receive", params)
    try:
        r = _Reader(s)
        _answer(r)                          # {"ready": ...}: the parameters are good
        done = 0
        buf = memoryview(bytearray(FRAME))
        try:
            while True:
                n = src.readinto(buf)
                if not n:
                    break
                _send_pieces_blocking(s, (FRAME_HEAD.pack(n), buf[:n]))
                done += n
                if on_progress is not None:
                    on_progress(done)
            s.sendall(FRAME_HEAD.pack(0))
        except (BrokenPipeError, ConnectionResetError):
            pass                            # the daemon refused the stream: read why
        return _answer(r)["result"]
    finally:
        s.close()


class ControlError(Exception):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


__all__: Sequence[str] = ["ControlError", "call", "call_receive", "call_send"]
