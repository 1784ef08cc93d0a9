"""The control API transport: newline-delimited JSON over a Unix socket.

Request:  {"method": "pool.status", "params": {"name": "tank"}}
Replies:  zero or more {"progress": {...}} lines, then {"result": ...} or
          {"error": {"message": "...", "errno": 2, "kind": "NotFound"}}.

Two methods carry a binary stream (docs/STREAM.md), in one of two ways:
- through a file descriptor the client passes with the request line (SCM_RIGHTS; params
  "fd": true), what storagectl does: the daemon writes the stream into it (volume.send;
  a regular file is fdatasynced before the result) or reads it from it to its end
  (volume.receive), answering {"progress": {"bytes": N}} lines meanwhile, then the result
  or error line. The client closing the connection stops the transfer (a receive then
  counts as interrupted). The stream never crosses the socket: no copies in and out of it.
- framed on the connection, as big-endian u32 lengths followed by that many bytes, a zero
  length ending it (for clients that cannot pass a descriptor):
  volume.send: the daemon answers {"stream": {...header...}}, then the frames, then the
  result or error line (an error after the stream started means the stream is incomplete);
  volume.receive: the daemon answers {"ready": {...}} once the parameters are valid, the
  client sends the frames (closing the connection early means "interrupted"), and the
  daemon answers with the result or error line.

The socket is created mode 0660; a client whose peer credentials are neither root, the
daemon's own user, nor a member of the socket's group is refused.

Robustness (issue 20 item 7):
C1. A request line is at most MAX_REQUEST bytes, and once its first byte is in it must be
    whole within REQUEST_TIMEOUT seconds; a connection idle between requests is closed
    after IDLE_TIMEOUT seconds. Either way the client gets an error line first.
C2. At most MAX_CONNECTIONS control connections are served at once; one more gets an
    error line and is closed.
C3. Whatever one request raises (malformed or deeply nested JSON, a bug in a method)
    answers that request with an error line; nothing a client sends ends the daemon.
C4. The socket path is never unlinked while another daemon answers on it
    (storaged.startup D2), and on exit only if it is still this daemon's socket.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

from pool.errors import InvalidArgument, NoSpace, StorageError
from pool.iovec import advance
from storaged.api import ControlAPI
from storaged.startup import bind_unix, unlink_unix
from storaged.wire import FRAME_HEAD, MAX_FRAME, Buffer, widen
from volumes import portable
from volumes.stream import StreamError

log = logging.getLogger(__name__)
_INT = array.array("i")
T = TypeVar("T")
MAX_REQUEST = 1 << 20
REQUEST_TIMEOUT = 30.0           # seconds for a request line, once begun (C1)
IDLE_TIMEOUT = 3600.0            # seconds a connection may wait between requests (C1)
MAX_CONNECTIONS = 64             # control connections served at once (C2)
MAX_FDS = 4                      # descriptors taken with one receive (more are closed)
PROGRESS_EVERY = 0.25            # seconds between progress lines of a descriptor transfer


class _Conn:
    """A control connection with its receive buffer (lines and frames share it) and the
    file descriptors passed along with it. A descriptor belongs to the request whose line
    holds the first byte sent with it; the request being served has its own in ``fds``
    (closed when it is done), and one that came with a frame's bytes is closed."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.fds: list[int] = []                # passed with the request being served
        self._marks: list[tuple[int, int]] = []   # (where in buf its bytes start, fd)

    async def fill(self) -> bool:
        data, anc, _flags, _addr = await self.stream.socket.recvmsg(
            1 << 20, socket.CMSG_SPACE(MAX_FDS * _INT.itemsize))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self._marks.extend((len(self.buf), fd) for fd in fds)
        if not data:
            return False
        self.buf += data
        return True

    def take_line(self) -> bytes | None:
        """The next request line, if the buffer holds it whole; the descriptors that came
        with it become ``fds`` (those of the previous request are closed)."""
        i = self.buf.find(b"\n")
        if i < 0:
            return None
        line = bytes(self.buf[:i])
        self.close_fds()
        self._consume(i + 1, keep=True)
        return line

    def _consume(self, n: int, *, keep: bool) -> None:
        """Drop ``n`` bytes from the front of the buffer; the descriptors that came with
        them go to ``fds`` (``keep``) or are closed."""
        del self.buf[:n]
        rest: list[tuple[int, int]] = []
        for pos, fd in self._marks:
            if pos >= n:
                rest.append((pos - n, fd))
            elif keep:
                self.fds.append(fd)
            else:
                os.close(fd)
        self._marks = rest

    def take_fd(self) -> int:
        """The descriptor that came with the request being served."""
        if not self.fds:
            raise InvalidArgument("the request says it passes a file descriptor (\"fd\": "
                                  "true), but none came with it")
        return self.fds.pop(0)

    def close_fds(self, *, all_: bool = False) -> None:
        """Close the request's unused descriptors (``all_``: every one still held)."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if all_:
            for _pos, fd in self._marks:
                os.close(fd)
            self._marks.clear()

    async def _exact(self, n: int) -> bytearray | None:
        """The next ``n`` bytes, received straight into their own buffer (what the line
        buffer already holds first); None if the peer went away first."""
        out = bytearray(n)
        got = min(len(self.buf), n)
        if got:
            out[:got] = self.buf[:got]
            self._consume(got, keep=False)
        view = memoryview(out)
        sock = self.stream.socket
        while got < n:
            k = await sock.recv_into(view[got:])
            if k == 0:
                return None
            got += k
        return out

    async def frame(self) -> bytearray | None:
        """The next frame's bytes; empty for the end frame; None if the peer went away."""
        head = await self._exact(4)
        if head is None:
            return None
        (n,) = FRAME_HEAD.unpack(head)
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes is too large")
        return await self._exact(n)


async def _send_pieces(sock: trio.socket.SocketType, pieces: Sequence[Buffer]) -> None:
    """Send buffers back to back with scatter-gather writes (no joined copy)."""
    views = [memoryview(p).cast("B") for p in pieces]
    while views:
        n = await sock.sendmsg(views)
        views = advance(views, n)


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
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listener, st = await bind_unix("socket", self.path)               # C4
        gid = st.st_gid
        log.info("control API on %s", self.path)
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            await self._client(stream, gid)
        try:
            await trio.serve_listeners(handler, [listener])
        finally:
            await unlink_unix(self.path, st)                                  # C4

    async def _client(self, stream: trio.SocketStream, gid: int) -> None:
        if self.connections >= MAX_CONNECTIONS:                                 # C2
            log.warning("control API: %d connections already: refusing one more",
                        self.connections)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     OSError), trio.move_on_after(1):
                await _send(stream, _error(f"too many control connections (at most "
                                           f"{MAX_CONNECTIONS})", errno.EBUSY, "Busy"))
            await stream.aclose()
            return
        self.connections += 1
        try:
            await self._serve_client(stream, gid)
        except Exception:                                                       # C3
            log.exception("control API: unexpected error; closing that connection")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        finally:
            self.connections -= 1

    async def _serve_client(self, stream: trio.SocketStream, gid: int) -> None:
        ok, who = _peer_allowed(stream.socket, gid)
        if not ok:
            log.warning("control API: refused %s (not root, not the daemon's user, not in "
                        "the socket's group)", who)
            await _send(stream, {"error": {"message": "permission denied", "errno": 13,
                                           "kind": "PermissionDenied"}})
            await stream.aclose()
            return
        conn = _Conn(stream)
        widen(stream.socket)
        try:
            while True:
                # C1: an idle connection waits up to IDLE_TIMEOUT for a request to begin,
                # a begun one up to REQUEST_TIMEOUT for its end.
                deadline = trio.current_time() + (REQUEST_TIMEOUT if conn.buf
                                                  else IDLE_TIMEOUT)
                while (line := conn.take_line()) is None:
                    if len(conn.buf) > MAX_REQUEST:
                        await _send(stream, _error(f"request too large (more than "
                                                   f"{MAX_REQUEST} bytes)", errno.E2BIG,
                                                   "InvalidArgument"))
                        return
                    began = bool(conn.buf)
                    with trio.move_on_at(deadline) as waiting:
                        if not await conn.fill():
                            return
                    if waiting.cancelled_caught:
                        what = "request not complete" if conn.buf else "no request"
                        await _send(stream, _error(
                            f"{what} within {REQUEST_TIMEOUT if conn.buf else IDLE_TIMEOUT:g}"
                            f"s: closing", errno.ETIMEDOUT, "TimedOut"))
                        return
                    if not began and conn.buf:
                        deadline = trio.current_time() + REQUEST_TIMEOUT
                await self._request(conn, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            return
        finally:
            conn.close_fds(all_=True)
            await stream.aclose()

    async def _request(self, conn: _Conn, line: bytes) -> None:
        stream = conn.stream
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                raise ValueError("expected {\"method\": ..., \"params\": {...}}")
        except RecursionError:                                                  # C3
            await _send(stream, _error("malformed request: JSON nested too deeply",
                                       errno.EINVAL, "InvalidArgument"))
            return
        except ValueError as e:
            await _send(stream, {"error": {"message": f"malformed request: {e}",
                                           "errno": 22, "kind": "InvalidArgument"}})
            return

        sending = trio.Lock()

        async def progress(p: dict[str, Any]) -> None:
            # Several tasks of one operation may report at once (a RADOS pool destroy's
            # parallel deletes): one line at a time on the stream, which refuses a second
            # sender while the first waits (trio.BusyResourceError: an internal error).
            async with sending:
                await _send(stream, {"progress": p})
        method, params = req["method"], req.get("params") or {}
        try:
            passed = isinstance(params, dict) and params.pop("fd", False) is True
            if passed and method in ("volume.send", "volume.receive"):
                fd = conn.take_fd()
                blocking = os.get_blocking(fd)
                try:
                    if method == "volume.send":
                        result = await self._send_to_fd(conn, params, fd)
                    else:
                        result = await self._receive_from_fd(conn, params, fd)
                finally:
                    # A pipe's open file is shared with the client: leave it as it came.
                    with contextlib.suppress(OSError):
                        os.set_blocking(fd, blocking)
                    os.close(fd)
            elif passed:
                raise InvalidArgument(f"{method} takes no file descriptor")
            elif method == "volume.send":
                result = await self._send_stream(stream, params)
            elif method == "volume.receive":
                result = await self._receive_stream(conn, params)
            else:
                result = await self.api.call(method, params, progress)
        except StorageError as e:
            await _send(stream, {"error": {"message": e.message, "errno": e.errno,
                                           "kind": type(e).__name__}})
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise                                   # the client went away: nobody to answer
        except Exception as e:                                                  # C3
            log.exception("control API: %s failed unexpectedly", method)
            await _send(stream, _error(f"{method} failed: internal error "
                                       f"({type(e).__name__}: {e})"[:500], errno.EIO,
                                       "InternalError"))
            return
        await _send(stream, {"result": result})

    async def _send_stream(self, stream: trio.SocketStream, params: Any) -> Any:
        header, chunks = await self.api.volume_send(params)
        await _send(stream, {"stream": header})
        sent = 0
        async with chunks as parts:
            async for pieces in parts:
                # One frame per part (a record is at most a chunk and a little).
                n = sum(map(len, pieces))
                if n > MAX_FRAME:
                    raise InvalidArgument(f"a stream part of {n} bytes does not fit a frame")
                await _send_pieces(stream.socket, (FRAME_HEAD.pack(n), *pieces))
                sent += n
        await stream.send_all(FRAME_HEAD.pack(0))
        return {"bytes": sent}

    async def _send_to_fd(self, conn: _Conn, params: Any, fd: int) -> Any:
        _usable(fd, write=True)
        _header, chunks = await self.api.volume_send(params)
        sink = portable.FdSink(fd)
        progress = _Progress(conn.stream)

        async def send() -> int:
            sent = await portable.write_out(chunks, sink, progress=progress.bytes)
            try:
                await trio.to_thread.run_sync(sink.sync)
            except OSError as e:
                raise _io_error("cannot make the stream durable", e) from e
            return sent
        try:
            sent = await _unless_gone(conn, send)
        except OSError as e:
            raise _io_error("cannot write the stream", e) from e
        except _Gone:
            raise InvalidArgument("the client went away; the send was stopped") from None
        return {"bytes": sent}

    async def _receive_from_fd(self, conn: _Conn, params: Any, fd: int) -> Any:
        _usable(fd, write=False)
        rx = await self.api.volume_receive(params)
        progress = _Progress(conn.stream)

        async def source() -> AsyncIterator[bytes]:
            got = 0
            async for piece in portable.read_in(fd):
                got += len(piece)
                await progress.bytes(got)
                yield piece

        async def receive() -> None:
            try:
                await rx.run(source())
            except OSError as e:
                raise _io_error("cannot read the stream", e) from e
        try:
            await _unless_gone(conn, receive)
        except StorageError as e:
            # As over the socket: a resumable receive keeps what verified before a bad
            # record; anything else is discarded, leaving the pool as it was.
            keep = isinstance(e, StreamError) and rx.resumable
            e.message = await rx.abort(e.message, interrupted=keep)
            e.args = (e.message,)
            raise
        except _Gone:
            await rx.abort("the client went away", interrupted=True)
            raise InvalidArgument("the client went away; the receive was stopped") from None
        if rx.done is not None:
            return {**rx.done, "volume": params["name"]}
        raise InvalidArgument(await rx.abort("the stream ended before its end record "
                                             "(truncated)", interrupted=True))

    async def _receive_stream(self, conn: _Conn, params: Any) -> Any:
        rx = await self.api.volume_receive(params)
        await _send(conn.stream, {"ready": {"volume": params.get("name")}})
        why = ["the stream ended before its end record (truncated)"]

        async def frames() -> AsyncIterator[bytearray]:
            while True:
                try:
                    data = await conn.frame()
                except ValueError as e:
                    raise StreamError(f"bad framing: {e}") from None
                if data is None:
                    why[0] = "the stream broke off (the connection closed)"
                    return
                if not data:
                    return
                yield data
        try:
            await rx.run(frames())
        except StorageError as e:
            # A resumable receive keeps what verified before a bad record; anything else
            # is discarded, leaving the pool as it was.
            keep = isinstance(e, StreamError) and rx.resumable
            e.message = await rx.abort(e.message, interrupted=keep)
            e.args = (e.message,)
            # Read what the client still sends, so that it sees this answer rather than
            # a reset connection.
            with trio.move_on_after(5), contextlib.suppress(ValueError,
                                                             trio.BrokenResourceError):
                while (await conn.frame()) not in (None, b""):
                    pass
            raise
        if rx.done is not None:
            return {**rx.done, "volume": params["name"]}
        raise InvalidArgument(await rx.abort(why[0], interrupted=True))


def _error(message: str, code: int, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "errno": code, "kind": kind}}


async def _send(stream: trio.SocketStream, obj: Any) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


class _Progress:
    """Progress lines of a descriptor transfer, at most every PROGRESS_EVERY seconds."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.last = 0.0

    async def bytes(self, n: int) -> None:
        now = trio.current_time()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            await _send(self.stream, {"progress": {"bytes": n}})


def _usable(fd: int, *, write: bool) -> None:
    """Refuse a passed descriptor the transfer cannot use, saying why."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument("the passed file descriptor is a directory")
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if write and mode == os.O_RDONLY:
        raise InvalidArgument("the passed file descriptor is not open for writing")
    if not write and mode == os.O_WRONLY:
        raise InvalidArgument("the passed file descriptor is not open for reading")


def _io_error(what: str, e: OSError) -> StorageError:
    """A failed write or read of a passed descriptor, as the error the client sees."""
    msg = f"{what}: {e.strerror or e}"
    if e.errno == errno.ENOSPC:
        return NoSpace(msg)
    err = StorageError(msg)
    err.errno = e.errno or errno.EIO
    return err


class _Gone(Exception):
    """The client closed the connection while a transfer ran."""


async def _unless_gone(conn: _Conn, fn: Callable[[], Awaitable[T]]) -> T:
    """``fn()``, cancelled if the client closes the connection meanwhile (it sends nothing
    during a transfer; anything it does send is kept for the next request): then _Gone.
    Errors of ``fn`` come out as they are, not in an exception group."""
    out: list[T] = []
    err: list[Exception] = []
    gone = False
    async with trio.open_nursery() as nursery:
        async def watch() -> None:
            nonlocal gone
            with contextlib.suppress(OSError, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                while await conn.fill():
                    pass
            gone = True
            nursery.cancel_scope.cancel()
        nursery.start_soon(watch)
        try:
            out.append(await fn())
        except Exception as e:
            err.append(e)
        nursery.cancel_scope.cancel()
    if err:
        raise err[0]
    if not out:
        raise _Gone
    return out[0]
