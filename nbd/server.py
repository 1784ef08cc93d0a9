"""The NBD server's trio transport: sockets in, protocol core, Volume API calls out.

Everything protocol-shaped lives in ``nbd.proto``; this module only moves bytes, runs TLS,
and executes validated commands concurrently (replies may go out of order, as the spec
allows), with at most ``max_inflight`` requests per connection in flight: when that many
are running, the connection stops reading (backpressure).

Hostile peers (issue 20 item 6; docs/CONFIG.md states the bounds):
S1. Payload memory is reserved (``nbd.limits``) before it is allocated: a large write's
    buffer once its first payload byte is readable (proto P2), a read's length before it
    runs, a small write's payload (already received, at most one receive) before it runs;
    each is given back when its reply is queued within the reply-queue limit. So one
    connection holds at most ``connection_memory`` of payload and all of them together at
    most ``memory``; over that, a connection stops reading until memory is free.
S2. A connection not through the handshake within ``handshake_timeout`` seconds, or that
    starts a request (header, payload, a refused payload being skipped) and does not
    finish it within ``payload_timeout`` seconds (time spent waiting for memory not
    counted), is dropped. A connection idle between requests is never timed out.
S3. At most ``max_connections`` connections are served; one more is closed at once.
S4. An unexpected error in one request answers that request with EIO; an unexpected error
    in a connection ends that connection only. Neither reaches the listener.

Replies in transmission (issue 27):
R1. Replies leave in the order they were queued, each whole: bytes of one reply are never
    interleaved with another's. Only the writer task, or ``_enqueue`` when the writer is
    idle (no batch in progress, nothing queued), writes to the socket.
R2. On a plain TCP socket a reply's buffers (header, then the blocks' own buffers) go out
    in vectored writes (``os.writev``), never joined into one copy; a write the socket
    takes only in part leaves the rest, in order, to the writer.
R3. A small reply to a request answered inline (a cached read, a buffered write) may be
    held back while the next request's header has already arrived, and goes out with the
    replies after it in one vectored write: held replies are written before anything
    else is queued or written, and before the connection waits for anything (more
    bytes, memory, a slot, the end). At most HOLD_BYTES are held.
R4. A receive on a plain socket tries the read first and waits (a scheduler pass) only if
    nothing is there; a read that found bytes at once skips trio's checkpoint up to STREAK
    times in a row, then takes one: a client that always has its next request in when
    the last reply has gone still lets other tasks run (and cancellation in) every
    STREAK + 1 requests, and a QD1 request costs one scheduler pass at most.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from nbd import proto
from nbd.exports import VolumeCatalog
from nbd.limits import MemoryBudget, Reservation
from volumes import Opener, StorageError, Volume

log = logging.getLogger(__name__)
RECV = 256 * 1024
QUEUE_LIMIT = 8 * 1024 * 1024   # queued reply bytes before producers wait for the writer
WRITER_GRACE = 30.0             # seconds to send the last replies to a peer that stopped reading
IOV_MAX = 1024                  # buffers per writev (Linux's UIO_MAXIOV)
HOLD_REPLY = 16 * 1024          # replies up to this size may be held back (R3)...
HOLD_BYTES = 256 * 1024         # ...up to this much in all
STREAK = 8                      # receives in a row without a scheduler pass (R4)
UNIX_SNDBUF = 4 << 20           # send buffer of a connection on the Unix socket (nbd.socket)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ServerStatistics:
    connections: int = 0
    active: int = 0
    refused: int = 0
    protocol_errors: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    in_flight: int = 0
    timeouts: int = 0                  # connections dropped by a handshake/payload timeout
    memory: int = 0                    # payload bytes reserved now (S1)


@dataclass(frozen=True, slots=True)
class NBDConfig:
    host: str = "127.0.0.1"
    port: int = 10809
    tls: proto.TLSMode = proto.TLSMode.OFF
    tls_context: ssl.SSLContext | None = None
    allow: tuple[Network, ...] = ()    # empty: everyone
    max_inflight: int = 64
    max_connections: int = 256         # S3
    handshake_timeout: float = 30.0    # S2
    payload_timeout: float = 60.0      # S2
    memory: int = 512 << 20            # payload bytes, all connections (S1)
    connection_memory: int = 64 << 20  # payload bytes, one connection (S1)


def tls_server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class NBDServer:
    def __init__(self, catalog: VolumeCatalog, config: NBDConfig) -> None:
        if config.tls is not proto.TLSMode.OFF and config.tls_context is None:
            raise ValueError("TLS mode on/require needs a certificate and key")
        self.catalog = catalog
        self.config = config
        self.stats = ServerStatistics()
        self.memory = MemoryBudget(config.memory)
        self._last_refusal = -1e9
        self._readers: set[trio.CancelScope] = set()
        self._draining = False
        self._idle = trio.Event()   # set when draining and every connection has answered

    async def drain(self, grace: float = 30.0) -> None:
        """Stop reading new requests on every connection, let the requests in flight
        finish and be answered, then return (or give up after ``grace`` seconds).
        The caller cancels ``serve`` afterwards, which closes listeners and connections."""
        self._draining = True
        for scope in list(self._readers):
            scope.cancel()
        if not self._readers:
            return
        with trio.move_on_after(grace):
            await self._idle.wait()

    def _transmission_ended(self, reader: trio.CancelScope) -> None:
        """A connection left transmission, every reply it owed sent (or its peer gone)."""
        self._readers.discard(reader)
        if self._draining and not self._readers:
            self._idle.set()

    async def serve(self, *, task_status: trio.TaskStatus[Sequence[trio.SocketListener]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        log.info("NBD server listening on %s:%d (TLS %s)", self.config.host,
                 listeners[0].socket.getsockname()[1], self.config.tls.value)
        task_status.started(listeners)
        await trio.serve_listeners(self.handle, listeners)

    async def serve_listeners(self, listeners: Sequence[trio.SocketListener], *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
        """Serve on listeners made elsewhere (the daemon's Unix socket, ``nbd.socket``)."""
        task_status.started()
        await trio.serve_listeners(self.handle, list(listeners))

    def _allowed(self, stream: trio.SocketStream) -> bool:
        if not self.config.allow or stream.socket.family == socket.AF_UNIX:
            # The allow list is of IP networks; a Unix socket's file mode and directory
            # decide who may connect to it.
            return True
        try:
            host = stream.socket.getpeername()[0]
            addr = ipaddress.ip_address(host)
        except (OSError, ValueError):
            return False
        return any(addr in net for net in self.config.allow)

    async def handle(self, stream: trio.SocketStream) -> None:
        if self._draining:
            await stream.aclose()
            return
        if self.stats.active >= self.config.max_connections:       # S3
            self.stats.refused += 1
            now = trio.current_time()
            if now - self._last_refusal >= 10:
                self._last_refusal = now
                log.warning("NBD: refused connection from %s: %d connections already "
                            "(nbd.max_connections)", _peer(stream), self.stats.active)
            await stream.aclose()
            return
        if not self._allowed(stream):
            self.stats.refused += 1
            log.warning("NBD: refused connection from %s (not in the allow list)",
                        _peer(stream))
            await stream.aclose()
            return
        if stream.socket.family == socket.AF_UNIX:
            # A Unix socket's default send buffer (about 200 KiB) takes a 1 MiB reply in
            # many small writes, each a wake-up of the loop; TCP's grows by itself. (The
            # kernel caps it at net.core.wmem_max.)
            with contextlib.suppress(OSError):
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        self.stats.connections += 1
        self.stats.active += 1
        peer = _peer(stream)
        conn = proto.ServerConnection(self.catalog, tls=self.config.tls)
        client = _Client(self, conn, stream, peer)
        try:
            await client.run()
        except proto.RemoteProtocolError as e:
            self.stats.protocol_errors += 1
            log.info("NBD %s: protocol error, closing: %s", peer, e)
            await client.send_pending()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                ConnectionError) as e:
            log.info("NBD %s: connection lost: %s", peer, e)
        except Exception:                                         # S4
            log.exception("NBD %s: unexpected error, closing the connection", peer)
        finally:
            client.release()
            self.stats.active -= 1
            with trio.move_on_after(5):
                await client.stream.aclose()
            client.unregister()


class _TimedOut(proto.RemoteProtocolError):
    """A request begun was not finished within nbd.payload_timeout (S2)."""


def _advance(parts: Sequence[proto.Data], n: int) -> list[proto.Data]:
    """What is left of ``parts`` once their first ``n`` bytes are sent."""
    for i, p in enumerate(parts):
        size = p.nbytes if isinstance(p, memoryview) else len(p)
        if n < size:
            rest = list(parts[i:])
            if n:
                rest[0] = memoryview(p).cast("B")[n:]
            return rest
        n -= size
    return []


def _peer(stream: trio.SocketStream) -> str:
    if stream.socket.family == socket.AF_UNIX:
        try:
            cred = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", cred)
            return f"unix:pid={pid},uid={uid}"
        except OSError:
            return "unix:?"
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


class _Client:
    def __init__(self, server: NBDServer, conn: proto.ServerConnection,
                 stream: trio.SocketStream, peer: str) -> None:
        self.server = server
        self.conn = conn
        self.stream: trio.abc.Stream = stream
        self.peer = peer
        self.volume: Volume | None = None
        # Registered with the volume's openers while in transmission (volumes/openers.py):
        # a forced delete/rename/rollback ends the connection through ``disconnect``.
        self.opener: Opener | None = None
        self.reader = trio.CancelScope()
        self.closed = trio.Event()
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(server.config.max_inflight)
        self._memory = Reservation(MemoryBudget(server.config.connection_memory),
                                   server.memory)
        self._reserved = 0          # for the large write payload being received (S1)
        # Transmission replies are queued and sent by one writer task, which joins all
        # that is queued into one send (one syscall for many small replies).
        self._queue: list[proto.Data] = []
        self._queued = 0
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._writer_running = False
        self._writing = False       # the writer has a batch not yet fully sent (R1)
        self._held: list[proto.Data] = []     # inline replies held back (R3)
        self._held_bytes = 0
        # The socket's descriptor for vectored writes (R2); None under TLS.
        self._fd: int | None = None
        self._rbuf = memoryview(b"")     # requests are received into it (transmission)
        self._streak = 0            # receives in a row that did not wait (R4)
        self._stopping = False      # the writer ends once the queue is empty
        self._broken = False
        self._failure: BaseException | None = None

    def release(self) -> None:
        """Give back what the payload being received held (the connection ended)."""
        self._give(self._reserved)
        self._reserved = 0

    async def _take(self, n: int) -> None:
        await self._memory.take(n)
        self.server.stats.memory += n

    def _give(self, n: int) -> None:
        if n:
            self._memory.give(n)
            self.server.stats.memory -= n

    async def disconnect(self) -> None:
        """Stop reading requests, answer those in flight, close; return once closed."""
        log.info("NBD %s: disconnecting (its volume is being changed by force)", self.peer)
        self.reader.cancel()
        await self.closed.wait()

    def unregister(self) -> None:
        if self.opener is not None and self.volume is not None:
            self.volume.openers.remove(self.opener)
        self.opener = None
        self.closed.set()

    async def send_pending(self) -> None:
        data = self.conn.data_to_send()
        if data:
            with trio.move_on_after(5):
                async with self._send_lock:
                    await self.stream.send_all(data)

    async def _send(self, parts: Sequence[proto.Data]) -> None:
        if self._writer_running:
            if self._broken:
                return  # the reader sees the dead connection and ends it
            self._enqueue(parts)
            if self._queued > QUEUE_LIMIT:      # backpressure on a slow reader
                await self._drained.wait()
            return
        async with self._send_lock:
            pending = self.conn.data_to_send()
            if pending:
                await self.stream.send_all(pending)
            await self.stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))

    async def _writer(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                while self._queue:
                    queue = self._queue
                    self._queue = []
                    self._queued = 0
                    self._writing = True
                    with trio.move_on_after(self.server.config.payload_timeout) as sending:
                        await self._send_parts(queue)
                    self._writing = False
                    if sending.cancelled_caught:
                        # A peer that stops reading its replies would hold their memory
                        # (S1) for good: it is dropped like one that stops sending (S2).
                        self.server.stats.timeouts += 1
                        log.info("NBD %s: replies not taken within %gs "
                                 "(nbd.payload_timeout): closing", self.peer,
                                 self.server.config.payload_timeout)
                        await trio.aclose_forcefully(self.stream)
                        raise trio.ClosedResourceError("the peer stopped reading")
                self._drained.set()
                self._drained = trio.Event()
                if self._stopping:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                ConnectionError):
            self._broken = True
            self._queue.clear()
            self._drained.set()

    async def _send_parts(self, parts: list[proto.Data]) -> None:
        """Send ``parts`` in order: vectored writes on a plain socket (R2), else joined."""
        fd = self._fd
        if fd is None:
            await self.stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
            return
        assert isinstance(self.stream, trio.SocketStream)
        sock = self.stream.socket
        while parts:
            try:
                n = os.writev(fd, parts[:IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as e:
                raise trio.BrokenResourceError(f"send failed: {e}") from e
            parts = _advance(parts, n)
        await trio.lowlevel.checkpoint()

    async def _receive(self) -> None:
        buf = self.conn.receive_buffer()
        fd = self._fd
        if fd is not None:
            # Transmission on a plain socket: the same syscalls as trio's receive_some
            # (try, wait until readable, retry) without its wrapper, into a buffer kept
            # for the connection (or straight into a large write's payload).
            assert isinstance(self.stream, trio.SocketStream)
            into = buf if buf is not None else self._rbuf
            try:
                n = os.readv(fd, [into])
            except BlockingIOError:
                n = -1
            except OSError as e:
                raise trio.BrokenResourceError(f"receive failed: {e}") from e
            if n < 0:
                self._streak = 0
                while n < 0:
                    await trio.lowlevel.wait_readable(self.stream.socket)
                    try:
                        n = os.readv(fd, [into])
                    except BlockingIOError:
                        pass
                    except OSError as e:
                        raise trio.BrokenResourceError(f"receive failed: {e}") from e
            elif self._streak < STREAK:
                # R4: bytes were there at once: no scheduler pass, up to STREAK times.
                self._streak += 1
            else:
                self._streak = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
            if buf is not None:
                self.conn.received_into(n)
            else:
                self.conn.receive_data(self._rbuf[:n])
            return
        if buf is not None and isinstance(self.stream, trio.SocketStream):
            # A large write's payload goes straight into its own buffer (no copies).
            try:
                n = await self.stream.socket.recv_into(buf)
            except OSError as e:
                raise trio.BrokenResourceError(f"receive failed: {e}") from e
            self.conn.received_into(n)
            return
        data = await self.stream.receive_some(RECV)
        self.conn.receive_data(data)

    async def run(self) -> None:
        with trio.move_on_after(self.server.config.handshake_timeout) as handshake:
            if not await self._handshake():
                return
        if handshake.cancelled_caught:                            # S2
            self.server.stats.timeouts += 1
            log.info("NBD %s: handshake not done within %gs (nbd.handshake_timeout): "
                     "closing", self.peer, self.server.config.handshake_timeout)
            return
        await self._transmit()

    async def _handshake(self) -> bool:
        """The handshake, up to the selection of an export: True if it was selected."""
        await self._send([])
        while True:
            ev = self.conn.next_event()
            if ev is proto.NEED_DATA:
                await self._send([])
                await self._receive()
            elif isinstance(ev, proto.StartTLS):
                await self._send([])
                ctx = self.server.config.tls_context
                assert ctx is not None
                tls = trio.SSLStream(self.stream, ctx, server_side=True)
                await tls.do_handshake()
                self.stream = tls
                self.conn.tls_started()
                log.debug("NBD %s: TLS established", self.peer)
            elif isinstance(ev, proto.Disconnect):
                await self._send([])
                return False
            elif isinstance(ev, proto.Transmission):
                await self._send([])
                self.volume = self.server.catalog.volume(ev.export.name)
                if self.volume is None:  # deleted between lookup and now
                    return False
                self.opener = self.volume.openers.add(
                    Opener("NBD", self.peer, self.disconnect))
                log.info("NBD %s: serving %s (structured replies %s)", self.peer,
                         ev.export.name, "on" if ev.structured else "off")
                return True

    async def _transmit(self) -> None:
        # Transmission: read requests, run them concurrently, reply as they finish.
        # Errors are caught inside the nursery so they do not arrive as exception groups.
        # The reading side runs in its own cancel scope, so that a draining server can
        # stop taking requests while those in flight finish and are answered.
        failure: BaseException | None = None
        reader = self.reader
        self.server._readers.add(reader)
        try:
            async with trio.open_nursery() as outer:
                self._writer_running = True
                if isinstance(self.stream, trio.SocketStream):
                    self._fd = self.stream.socket.fileno()
                    self._rbuf = memoryview(bytearray(RECV))
                outer.start_soon(self._writer)
                try:
                    await self._transmission(reader)
                except BaseException:
                    outer.cancel_scope.cancel()
                    raise
                self._enqueue([])           # what is held (R3)
                # Every request is answered: let the writer send what is queued (never
                # cancel it mid-send, which would cut a reply), but not wait forever on a
                # peer that stopped reading.
                self._stopping = True
                self._wakeup.set()
                outer.cancel_scope.deadline = trio.current_time() + WRITER_GRACE
            self._writer_running = False
            self._fd = None
            self._rbuf = memoryview(b"")
            failure = self._failure
        finally:
            self.server._transmission_ended(reader)
        if failure is not None:
            raise failure
        await self._send([])

    async def _transmission(self, reader: trio.CancelScope) -> None:
        failure: BaseException | None = None
        timeout = self.server.config.payload_timeout
        deadline: float | None = None       # for the request begun (S2)
        async with trio.open_nursery() as nursery:
            with reader:
                while True:
                    try:
                        ev = self.conn.next_event()
                        if ev is proto.NEED_DATA:
                            if (self._held or self._queued > QUEUE_LIMIT or self._broken
                                    or self.conn.has_output):
                                await self._send([])
                            if not self.conn.in_request:
                                deadline = None
                                await self._receive()
                                continue
                            if deadline is None:
                                deadline = trio.current_time() + timeout
                            if self._reserved == 0 and self.conn.payload_wanted:
                                if not await self._reserve_payload(deadline):
                                    raise _TimedOut(
                                        f"no write payload within {timeout:g}s "
                                        f"(nbd.payload_timeout)")
                                deadline = trio.current_time() + timeout
                            with trio.move_on_at(deadline):
                                await self._receive()
                                continue
                            raise _TimedOut(
                                f"request not complete within {timeout:g}s "
                                f"(nbd.payload_timeout)")
                    except (proto.RemoteProtocolError, trio.BrokenResourceError,
                            trio.ClosedResourceError, ssl.SSLError,
                            ConnectionError) as e:
                        if isinstance(e, _TimedOut):
                            self.server.stats.timeouts += 1
                        failure = e
                        break
                    deadline = None
                    if isinstance(ev, proto.Command):
                        # S1: what the request holds: its payload (reserved while it was
                        # received, for a large write) or the read's reply.
                        held, self._reserved = self._reserved, 0
                        if ev.kind == proto.CMD_READ:
                            if self._read_at_once(ev):
                                continue
                            cost = ev.length
                        elif ev.kind == proto.CMD_WRITE:
                            if self._write_at_once(ev):
                                self._give(held)
                                continue
                            cost = len(ev.data)
                        else:
                            cost = 0
                        if self._held:
                            self._enqueue([])       # before any wait (R3)
                        try:
                            if cost > held:
                                await self._take(cost - held)
                            else:
                                self._give(held - cost)
                            held = cost
                            await self._slots.acquire()
                        except BaseException:
                            self._give(held)
                            raise
                        nursery.start_soon(self._execute, ev, cost)
                    elif isinstance(ev, proto.Disconnect):
                        break
            # Spec: on disconnect, finish what is in flight (the nursery waits).
        self._failure = failure

    async def _reserve_payload(self, deadline: float) -> bool:
        """Reserve the memory of the write payload whose header came in (S1), once its
        first byte is readable (a header with no payload costs nothing); False if that
        byte does not come by ``deadline``."""
        if isinstance(self.stream, trio.SocketStream) and not self.conn.buffered:
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(self.stream.socket)
            if trio.current_time() >= deadline:
                return False
        n = self.conn.payload_wanted
        await self._take(n)
        self._reserved = n
        return True

    def _read_at_once(self, cmd: proto.Command) -> bool:
        """Answer a read whose blocks are buffered or cached without a task: queue the
        reply for the writer and return True; False sends it down the usual path (which
        also produces any error reply)."""
        vol = self.volume
        if (vol is None or not self._writer_running or self._broken
                or self._queued > QUEUE_LIMIT):
            return False
        try:
            pieces = vol.read_sparse_nowait(cmd.offset, cmd.length)
        except StorageError:
            return False
        if pieces is None:
            return False
        commands = self.server.stats.commands
        name = cmd.name
        commands[name] = commands.get(name, 0) + 1
        self._enqueue(self.conn.reply_read(cmd, pieces), hold=True)
        return True

    def _write_at_once(self, cmd: proto.Command) -> bool:
        """Take a write that the volume can buffer at once (Volume.write_nowait) without a
        task: queue its reply and return True; False sends it down the usual path (FUA,
        waits, errors and their replies)."""
        vol = self.volume
        if (vol is None or not self._writer_running or self._broken
                or self._queued > QUEUE_LIMIT or cmd.flags & proto.CMD_FLAG_FUA):
            return False
        try:
            # The payload is this request's own buffer: the volume may keep views of it.
            if not vol.write_nowait(cmd.offset, cmd.data, owned=True):
                return False
        except StorageError:
            return False
        commands = self.server.stats.commands
        name = cmd.name
        commands[name] = commands.get(name, 0) + 1
        self._enqueue([self.conn.reply_ok(cmd)], hold=True)
        return True

    def _enqueue(self, parts: Sequence[proto.Data], *, hold: bool = False) -> None:
        """Queue what the protocol has pending and ``parts`` for the writer task; when the
        writer is idle, write them at once instead and queue only what the socket did not
        take (R1, R2): at queue depth 1 that saves waking the writer for every reply.
        ``hold``: a small reply to an inline request, which may wait for the replies to
        the requests already received (R3); anything held goes first."""
        pending = self.conn.data_to_send()
        if pending:
            parts = [pending, *parts]
        fd = self._fd
        idle = fd is not None and not self._queue and not self._writing and not self._broken
        if hold and idle and self.conn.buffered >= proto.REQUEST_SIZE and len(parts) <= 4 \
                and len(self._held) < 256:
            size = sum(len(p) for p in parts)
            if size <= HOLD_REPLY and self._held_bytes + size <= HOLD_BYTES:
                self._held += parts
                self._held_bytes += size
                return
        if self._held:
            parts = [*self._held, *parts]
            self._held = []
            self._held_bytes = 0
        if not parts:
            return
        if idle:
            assert fd is not None
            try:
                n = os.writev(fd, parts if len(parts) <= IOV_MAX else parts[:IOV_MAX])
            except OSError:
                n = 0           # the writer meets the error (or waits until writable)
            rest = _advance(parts, n)
            if not rest:
                return
            parts = rest
        self._queue.extend(parts)
        self._queued += sum(len(p) for p in parts)
        self._wakeup.set()

    async def _execute(self, cmd: proto.Command, cost: int) -> None:
        vol = self.volume
        assert vol is not None
        stats = self.server.stats
        stats.commands[cmd.name] = stats.commands.get(cmd.name, 0) + 1
        stats.in_flight += 1
        try:
            try:
                reply = await self._dispatch(vol, cmd)
            except StorageError as e:
                stats.errors += 1
                log.info("NBD %s: %s %d+%d failed: %s", self.peer, cmd.name, cmd.offset,
                         cmd.length, e)
                reply = [self.conn.reply_error(cmd, proto.nbd_error(e.errno), str(e))]
            except Exception as e:                                # S4
                stats.errors += 1
                log.exception("NBD %s: %s %d+%d failed unexpectedly", self.peer, cmd.name,
                              cmd.offset, cmd.length)
                reply = [self.conn.reply_error(cmd, proto.NBD_EIO,
                                               f"internal error: {type(e).__name__}")]
            # If the client is gone, the reader sees it and ends the connection.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     ssl.SSLError, ConnectionError):
                await self._send(reply)
        finally:
            stats.in_flight -= 1
            self._slots.release()
            self._give(cost)

    async def _dispatch(self, vol: Volume, cmd: proto.Command) -> list[proto.Data]:
        conn = self.conn
        fua = bool(cmd.flags & proto.CMD_FLAG_FUA)
        k = cmd.kind
        if k == proto.CMD_READ:
            return conn.reply_read(cmd, await vol.read_sparse(cmd.offset, cmd.length))
        if k == proto.CMD_WRITE:
            # The payload is this request's own buffer: the volume may keep views of it.
            await vol.write(cmd.offset, cmd.data, fua=fua, owned=True)
        elif k == proto.CMD_FLUSH:
            await vol.flush()
        elif k == proto.CMD_TRIM:
            await vol.trim(cmd.offset, cmd.length, fua=fua)
        elif k == proto.CMD_WRITE_ZEROES:
            # Zeroing makes holes, which is fast: FAST_ZERO can always be honoured. NO_HOLE
            # asks for the range to stay provisioned: zeros are then stored as data.
            await vol.write_zeroes(cmd.offset, cmd.length, fua=fua,
                                   punch=not cmd.flags & proto.CMD_FLAG_NO_HOLE)
        elif k == proto.CMD_CACHE:
            pass  # advisory; records are read on demand and cached by the kernel
        elif k == proto.CMD_BLOCK_STATUS:
            answers: list[tuple[int, list[tuple[int, int]]]] = []
            for ctx_id, ctx in conn.contexts:
                if ctx == proto.META_BASE_ALLOCATION:
                    extents = await vol.allocation(cmd.offset, cmd.length)
                    answers.append((ctx_id, [
                        (e.length, 0 if e.allocated else proto.STATE_HOLE | proto.STATE_ZERO)
                        for e in extents]))
                else:
                    assert conn.export is not None
                    changed = await self.server.catalog.changed(
                        conn.export.name, ctx.removeprefix(proto.META_DIRTY_BITMAP),
                        cmd.offset, cmd.length)
                    answers.append((ctx_id, [(n, proto.STATE_DIRTY if dirty else 0)
                                             for n, dirty in changed]))
            return [conn.reply_block_status(cmd, answers)]
        return [conn.reply_ok(cmd)]
