"""The control API client used by storagectl (the protocol is described in
storaged/control.py, the framing both ends share in storaged/wire.py): plain blocking
sockets and the standard library only, so that the CLI starts without loading the daemon.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Any

from storaged.wire import DEFAULT_SOCKET, widen


def default_socket() -> str:
    return os.environ.get("STORAGED_SOCKET", DEFAULT_SOCKET)


def call(path: str, method: str, params: dict[str, Any], on_progress: Any = None, *,
         fd: int | None = None) -> Any:
    """Blocking client used by storagectl; raises ControlError / ConnectionError. With
    ``fd``, the descriptor goes along with the request (volume.send writes the stream
    into it, volume.receive reads the stream from it)."""
    s = _connect(path, method, params, fd)
    try:
        r = _Reader(s)
        while "progress" in (msg := _answer(r)):
            if on_progress is not None:
                on_progress(msg["progress"])
        return msg["result"]
    finally:
        s.close()


def _connect(path: str, method: str, params: dict[str, Any],
             fd: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        widen(s)
        if fd is None:
            s.sendall(json.dumps({"method": method, "params": params}).encode() + b"\n")
        else:
            line = json.dumps({"method": method, "params": {**params, "fd": True}}).encode()
            # The descriptor travels with the first byte; the rest follows as it goes.
            sent = socket.send_fds(s, [line + b"\n"], [fd])
            s.sendall((line + b"\n")[sent:])
    except BaseException:
        s.close()
        raise
    return s


class _Reader:
    """Reply lines from a blocking socket."""

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


def _answer(r: _Reader) -> Any:
    """The next line of a reply (progress or result), or raise its error."""
    msg = json.loads(r.line())
    if "error" in msg:
        raise ControlError(msg["error"]["message"], msg["error"].get("kind", ""))
    return msg


class ControlError(Exception):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


__all__: Sequence[str] = ["ControlError", "call"]
