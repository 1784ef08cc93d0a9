"""The control API transport: newline-delimited JSON over a Unix socket.

Request:  {"method": "pool.status", "params": {"name": "tank"}}
Replies:  zero or more {"progress": {...}} lines, then {"result": ...} or
          {"error": {"message": "...", "errno": 2, "kind": "NotFound"}}.

The socket is created mode 0660; a client whose peer credentials are neither root, the
daemon's own user, nor a member of the socket's group is refused.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Sequence
from typing import Any

import trio

from pool.errors import StorageError
from storaged.api import ControlAPI

log = logging.getLogger(__name__)
MAX_REQUEST = 1 << 20


def _peer_allowed(sock: trio.socket.SocketType, sock_gid: int) -> tuple[bool, str]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    who = f"pid {pid} uid {uid}"
    if uid in (0, os.getuid()) or gid == sock_gid:
        return True, who
    try:
        user = pwd.getpwuid(uid).pw_name
        if user in grp.getgrgid(sock_gid).gr_mem:
            return True, who
    except KeyError:
        pass
    return False, who


class ControlServer:
    def __init__(self, api: ControlAPI, path: str) -> None:
        self.api = api
        self.path = path

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        path = trio.Path(self.path)
        await path.parent.mkdir(parents=True, exist_ok=True)
        if await path.exists():
            await path.unlink()  # a stale socket of a dead daemon (the pid lock is ours)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.path)
        await path.chmod(0o660)
        sock.listen(64)
        gid = (await path.stat()).st_gid
        listener = trio.SocketListener(sock)
        log.info("control API on %s", self.path)
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            await self._client(stream, gid)
        try:
            await trio.serve_listeners(handler, [listener])
        finally:
            with trio.CancelScope(shield=True):
                await path.unlink(missing_ok=True)

    async def _client(self, stream: trio.SocketStream, gid: int) -> None:
        ok, who = _peer_allowed(stream.socket, gid)
        if not ok:
            log.warning("control API: refused %s (not root, not the daemon's user, not in "
                        "the socket's group)", who)
            await _send(stream, {"error": {"message": "permission denied", "errno": 13,
                                           "kind": "PermissionDenied"}})
            await stream.aclose()
            return
        buf = bytearray()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                if len(buf) > MAX_REQUEST:
                    await _send(stream, {"error": {"message": "request too large",
                                                   "errno": 7, "kind": "InvalidArgument"}})
                    return
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf = bytearray(rest)
                    await self._request(stream, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _request(self, stream: trio.SocketStream, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                raise ValueError("expected {\"method\": ..., \"params\": {...}}")
        except ValueError as e:
            await _send(stream, {"error": {"message": f"malformed request: {e}",
                                           "errno": 22, "kind": "InvalidArgument"}})
            return

        async def progress(p: dict[str, Any]) -> None:
            await _send(stream, {"progress": p})
        try:
            result = await self.api.call(req["method"], req.get("params") or {}, progress)
        except StorageError as e:
            await _send(stream, {"error": {"message": e.message, "errno": e.errno,
                                           "kind": type(e).__name__}})
            return
        await _send(stream, {"result": result})


async def _send(stream: trio.SocketStream, obj: Any) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


def call(path: str, method: str, params: dict[str, Any],
         on_progress: Any = None) -> Any:
    """Blocking client used by storagectl; raises ControlError / ConnectionError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(json.dumps({"method": method, "params": params}).encode() + b"\n")
        f = s.makefile("rb")
        for line in f:
            msg = json.loads(line)
            if "progress" in msg:
                if on_progress is not None:
                    on_progress(msg["progress"])
                continue
            if "error" in msg:
                raise ControlError(msg["error"]["message"], msg["error"].get("kind", ""))
            return msg["result"]
        raise ConnectionError("the daemon closed the connection without answering")
    finally:
        s.close()


class ControlError(Exception):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


__all__: Sequence[str] = ["ControlError", "ControlServer", "call"]
