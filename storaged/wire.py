"""What both ends of the control socket share (the protocol is described in
storaged/control.py): the default socket path, stream framing and socket buffers. The
standard library only, so that storagectl (storaged/ctl/) loads it without the daemon.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Protocol

DEFAULT_SOCKET = "/run/storaged/control.sock"
MAX_FRAME = 16 << 20            # largest stream frame either side accepts
SOCKET_BUFFER = 4 << 20         # socket buffers of a framed stream
FRAME_HEAD = struct.Struct(">I")
Buffer = bytes | bytearray | memoryview


class _Settable(Protocol):
    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


def widen(sock: _Settable) -> None:
    """Room for a few MiB of stream in the socket (capped by net.core.wmem_max): the
    sending side stays that far ahead without waiting for the receiver to wake up."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
