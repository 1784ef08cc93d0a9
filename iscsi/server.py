"""The iSCSI target's trio transport: sockets in, ``iscsi.session`` in the middle, Volume
calls out.

Everything protocol-shaped lives in the pure core; this module moves bytes, runs each
SCSI command as its own task (commands of one session run concurrently; the CmdSN window
bounds how many), pings idle initiators with NOP-In, reinstates sessions (a new login with
the same initiator name and ISID closes the old session) and, when the daemon stops, asks
every initiator to log out (Async Message) before closing.

Hostile peers (issue 20 item 6): at most ``max_connections`` connections are served (one
more is closed at once); a connection not logged in within ``login_timeout`` seconds is
closed; a logged-in initiator that goes silent is pinged and dropped (``nop_interval``); the
memory a connection holds is bounded by the session's negotiated limits (pdu, session).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from iscsi import cdb
from iscsi.pdu import Payload
from iscsi.scsi import LogicalUnit
from iscsi.session import Close, Connection, Execute, LoggedIn, Task
from iscsi.targets import TargetCatalog
from volumes import Opener
from volumes.volume import LATENCY_BUCKETS

log = logging.getLogger(__name__)
RECV = 256 * 1024        # room offered to one receive (iscsi.pdu.PDUReader.room)
LOGIN_RECV = 16 * 1024   # ... before login (what an unauthenticated peer makes us hold)
COPY_BELOW = 1024       # buffers smaller than this (headers) are joined before sending
IOV_CHUNK = 64          # buffers per sendmsg (IOV_MAX is 1024): three 1 MiB reads of
                        # 64 KiB blocks; sendmsg looks at every buffer it is given, sent
                        # or not
SEND_NOW = 64 * 1024    # answers this large are sent at once, before the next command
NOTSENT_LOWAT = 0       # TCP_NOTSENT_LOWAT of a connection: 0 is the kernel's default
SEND_AHEAD = 16 << 20   # unsent answers beyond this stop the reading of commands
FAIR_EVERY = 16         # the read loop yields at least once per this many receives
GRACE = 30.0          # seconds to let running commands finish when a connection ends


@dataclass(frozen=True, slots=True)
class ISCSIConfig:
    host: str = "127.0.0.1"
    port: int = 3260
    portal_group_tag: int = 1
    nop_interval: float = 15.0        # ping an initiator idle this long; drop it if the
                                      # previous ping is still unanswered
    max_connections: int = 256        # one more is closed at once
    login_timeout: float = 30.0       # seconds from connect to logged in


@dataclass
class ServerStatistics:
    sessions: int = 0                 # logged in now (normal and discovery)
    sessions_total: int = 0
    connections: int = 0
    logins_refused: int = 0
    protocol_errors: int = 0
    refused: int = 0                  # connections over max_connections
    login_timeouts: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    sense: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS)
                                                                     + 1))
    latency_sum: float = 0.0
    latency_count: int = 0

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1


class SharedExclusive:
    """``cdb.Gate`` with trio: writes share it, COMPARE AND WRITE holds it alone."""

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._readers = 0
        self._idle = trio.Event()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._lock:          # waits while an exclusive holder runs
            self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1
            if not self._readers:
                self._idle.set()

    def free(self) -> bool:
        return not self._lock.locked()  # an exclusive holder keeps the lock throughout

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._lock:
            while self._readers:
                self._idle = trio.Event()
                await self._idle.wait()
            yield


class ISCSIServer:
    def __init__(self, catalog: TargetCatalog, config: ISCSIConfig) -> None:
        self.catalog = catalog
        self.config = config
        self.stats = ServerStatistics()
        self.portal = f"{config.host}:{config.port}"
        self._clients: set[_Client] = set()
        self._sessions: dict[tuple[str, bytes], _Client] = {}
        self._tsih = 0
        self._draining = False

    def new_tsih(self) -> int:
        self._tsih = self._tsih % 0xFFFF + 1
        return self._tsih

    async def serve(self, *, task_status: trio.TaskStatus[Sequence[trio.SocketListener]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        port = listeners[0].socket.getsockname()[1]
        host = self.config.host
        self.portal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("iSCSI target listening on %s", self.portal)
        task_status.started(listeners)
        await trio.serve_listeners(self.handle, listeners)

    async def drain(self, grace: float = 5.0) -> None:
        """Ask every initiator to log out, and wait (up to ``grace`` seconds) for them to
        do so; the caller then cancels ``serve``."""
        self._draining = True
        for client in list(self._clients):
            client.conn.request_logout(max(int(grace), 1))
            await client.flush_quietly()
        with trio.move_on_after(grace):
            while self._clients:  # noqa: ASYNC110  (a set of live clients, not an event)
                await trio.sleep(0.05)

    async def handle(self, stream: trio.SocketStream) -> None:
        if self._draining:
            await stream.aclose()
            return
        peer = _peer(stream)
        if len(self._clients) >= self.config.max_connections:
            self.stats.refused += 1
            log.warning("iSCSI: refused connection from %s: %d connections already "
                        "(iscsi.max_connections)", peer, len(self._clients))
            await stream.aclose()
            return
        client = _Client(self, stream, peer)
        conn = client.conn
        self._clients.add(client)
        self.stats.connections += 1
        try:
            try:
                await client.run()
            except* (trio.BrokenResourceError, trio.ClosedResourceError,
                     ConnectionError) as group:
                # (from the client's nursery, so wrapped in a group: a peer that vanished
                # must end its own connection only, never the listener)
                log.info("iSCSI %s: connection lost: %s", peer, group.exceptions[0])
            except* Exception as group:
                # A bug met by one connection ends that connection, never the listener.
                log.error("iSCSI %s: unexpected error, closing the connection",
                          peer, exc_info=group)
        finally:
            self._clients.discard(client)
            if client.key is not None and self._sessions.get(client.key) is client:
                del self._sessions[client.key]
            if client.logged_in:
                self.stats.sessions -= 1
            if conn.login.failed is not None:
                self.stats.logins_refused += 1
            self.stats.protocol_errors += conn.stats.get("protocol_errors", 0)
            with trio.move_on_after(5):
                await stream.aclose()
            client.unregister()

    def logged_in(self, client: _Client) -> None:
        result = client.conn.result
        assert result is not None
        self.stats.sessions += 1
        self.stats.sessions_total += 1
        if result.target is None:
            log.info("iSCSI %s: discovery session for %s", client.peer, result.initiator)
            return
        key = (result.initiator.lower(), result.isid)
        old = self._sessions.get(key)
        if old is not None and old is not client:
            log.info("iSCSI: %s reinstates its session (ISID %s): closing the old one",
                     result.initiator, result.isid.hex())
            old.stop()
        self._sessions[key] = client
        client.key = key
        unit = client.unit
        if unit is not None:
            client.opener = unit.volume.openers.add(
                Opener("iSCSI", f"{result.initiator} at {client.peer}", client.disconnect))
        log.info("iSCSI %s: %s logged in to %s", client.peer, result.initiator,
                 result.target)


def _views(pieces: list[Payload]) -> list[Payload]:
    """PDUs' buffers to send back to back: small ones joined, data segments as they are
    (scatter-gather, no copy, no view made per buffer: ``sendmsg`` takes bytes and
    byte-format memoryviews as they are; ``_Wire.send_now`` makes a view only of a
    buffer it sent in part)."""
    views: list[Payload] = []
    small: list[Payload] = []
    for piece in pieces:
        p = piece.cast("B") if type(piece) is memoryview and piece.itemsize != 1 \
            else piece               # (len() in bytes below and in send_now)
        if len(p) < COPY_BELOW:
            small.append(p)
            continue
        if small:
            views.append(b"".join(small) if len(small) > 1 else small[0])
            small = []
        views.append(p)
    if small:
        views.append(b"".join(small) if len(small) > 1 else small[0])
    return views


class _Wire:
    """The connection's socket, called without trio when the call does not block.

    trio makes every socket call a checkpoint (a pass through its scheduler) even when the
    data is there; with a few small commands per receive that is a large share of a
    command's cost. So the read loop and the senders try the nonblocking call on the same
    file descriptor first and only wait through trio (``wait_readable`` /
    ``wait_writable``, checkpoints that also deliver cancellation) when it would block.
    Errors come out as trio's stream errors, as from ``SocketStream``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.sock = socket.socket(fileno=stream.socket.fileno())   # the same fd, no dup
        self.sock.setblocking(False)
        # trio's SocketStream sets TCP_NOTSENT_LOWAT to 16 KiB (python-trio/trio#72:
        # little unsent data queued, for latency); then a ``sendmsg`` takes only what
        # the connection transmits at once -- on loopback two or three 64 KiB segments
        # -- so a 1 MiB read went out in about five calls, each a TCP push and a wake-up
        # of the initiator for little data. Our answers are queued whole anyway: the
        # kernel's default (no limit but the send buffer) is restored.
        with contextlib.suppress(OSError, AttributeError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT,
                                 NOTSENT_LOWAT)

    def detach(self) -> None:
        """Forget the fd (the SocketStream closes it)."""
        self.sock.detach()

    async def receive_into(self, view: memoryview) -> int:
        """Receive into ``view`` (the PDU reader's own buffer); 0 at end of stream."""
        while True:
            try:
                return self.sock.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError as e:
                raise trio.BrokenResourceError(f"receive failed: {e}") from e

    def send_now(self, views: list[Payload]) -> list[Payload]:
        """Send what the socket takes without waiting; what is left. A socket that
        takes part of a ``sendmsg`` is full: the rest waits until it is writable again
        (half its buffer free) rather than going out a segment or two per call."""
        i = 0
        n = len(views)
        while i < n:
            end = min(n, i + IOV_CHUNK)
            try:
                sent = self.sock.sendmsg(views if end == n and not i else views[i:end])
            except BlockingIOError:
                break
            except OSError as e:
                raise trio.BrokenResourceError(f"send failed: {e}") from e
            while sent:                       # drop what went out, keep the rest
                if sent < len(views[i]):
                    views[i] = memoryview(views[i])[sent:]
                    break
                sent -= len(views[i])
                i += 1
            if i < end:
                break                         # (full)
        return views[i:]

    async def send_all(self, views: list[Payload]) -> None:
        while views := self.send_now(views):
            await trio.lowlevel.wait_writable(self.sock)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


class _Client:
    def __init__(self, server: ISCSIServer, stream: trio.SocketStream, peer: str) -> None:
        self.server = server
        # The session sees its unit as the pure ``cdb.Unit``; ``attach`` keeps the same
        # object as the LogicalUnit it is, for the volume's openers.
        self.conn = Connection(server.catalog, new_tsih=server.new_tsih, unit=self.attach,
                               portal=server.portal,
                               portal_group_tag=server.config.portal_group_tag)
        self.stream = stream
        self.peer = peer
        self.key: tuple[str, bytes] | None = None
        self.unit: LogicalUnit | None = None
        self.logged_in = False
        self._send_lock = trio.Lock()
        # What the socket did not take of a send the read loop made at once
        # (``_send_at_once``): the writer sends it before anything queued later.
        self._rest: list[Payload] = []
        self._wake = trio.Event()
        self.wire = _Wire(stream)
        self._reader = trio.CancelScope()
        self._last_rx = trio.current_time()
        # Registered with the logical unit's volume while logged in (volumes/openers.py).
        self.opener: Opener | None = None
        self._closed = trio.Event()

    def stop(self) -> None:
        """End this connection (its session was reinstated elsewhere, or its volume is
        being deleted by force)."""
        self._reader.cancel()

    async def disconnect(self) -> None:
        """End the session (running commands finish first); return once it is closed."""
        log.info("iSCSI %s: ending the session (its volume is being changed by force)",
                 self.peer)
        self.stop()
        await self._closed.wait()

    def attach(self, target: str) -> LogicalUnit | None:
        """The session's lookup of its logical unit at login (``Connection(unit=)``)."""
        self.unit = self.server.catalog.unit(target)
        return self.unit

    def unregister(self) -> None:
        unit = self.unit
        if self.opener is not None and unit is not None:
            unit.volume.openers.remove(self.opener)
        self.opener = None
        self._closed.set()

    async def flush(self) -> None:
        """Send everything queued so far, in order: whoever sends holds the lock, and
        takes the queue only once it does (or, when nobody holds it, sends at once
        without yielding, so nobody can come between)."""
        conn = self.conn
        rest: list[Payload] = []
        if not self._send_lock.locked() and not self._rest:
            pieces = conn.pieces_to_send()
            if not pieces:
                return
            rest = self.wire.send_now(_views(pieces))
            if not rest:
                return
        async with self._send_lock:
            if self._rest:                  # (then ``rest`` is empty: it went first)
                rest, self._rest = self._rest, []
            if rest:
                await self.wire.send_all(rest)
            while pieces := conn.pieces_to_send():
                await self.wire.send_all(_views(pieces))

    def _send_at_once(self) -> None:
        """``flush`` for the read loop after a large answer, without waiting: what the
        socket takes goes now, the rest (``_rest``) to the writer, which sends it before
        anything queued after it; while the writer sends, it takes the answer from the
        queue itself. (So the loop goes on with the next command at once, without a
        pass through trio's scheduler to start the writer.)"""
        if self._send_lock.locked() or self._rest:
            self._wake.set()
            return
        pieces = self.conn.pieces_to_send()
        if pieces:
            self._rest = self.wire.send_now(_views(pieces))
            if self._rest:
                self._wake.set()

    async def _writer(self) -> None:
        """Sends what the read loop queues, so that the loop goes on with the next
        commands while the initiator takes in the Data-In of the last ones."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()

    async def flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 ConnectionError), trio.move_on_after(5):
            await self.flush()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.wire.detach()

    async def _run(self) -> None:
        async with trio.open_nursery() as tasks:
            with self._reader:
                async with trio.open_nursery() as side:
                    side.start_soon(self._pinger)
                    side.start_soon(self._login_deadline)
                    side.start_soon(self._writer)
                    try:
                        await self._read_loop(tasks)
                    finally:
                        side.cancel_scope.cancel()
            # The connection is over: let running commands finish (their answers go
            # nowhere if the peer is gone), but not forever.
            tasks.cancel_scope.deadline = trio.current_time() + GRACE

    async def _read_loop(self, tasks: trio.Nursery) -> None:
        conn = self.conn
        reader = conn.reader
        quick = 0
        while True:
            ev = conn.next_event()
            if ev is None:
                if (self._send_lock.locked() or self._rest) \
                        and conn.queued_data <= SEND_AHEAD:
                    self._wake.set()        # the writer is busy (it sends this next)
                else:
                    await self.flush()      # (at once; or backpressure on a laggard)
                # Straight into the reader's buffer (no bytes object per receive, no
                # copy to append it); a small room until logged in.
                with reader.room(RECV if self.logged_in else LOGIN_RECV) as room:
                    n = await self.wire.receive_into(room)
                if not n:
                    return
                reader.received(n)
                quick += 1
                if quick >= FAIR_EVERY:     # (a receive yields only when it must wait)
                    quick = 0
                    await trio.lowlevel.checkpoint()
                self._last_rx = trio.current_time()
            elif type(ev) is Execute:        # (the common event first)
                data = ev.task.payload()
                if not self._at_once(ev.task, data):
                    tasks.start_soon(self._execute, ev.task, data)
                elif conn.queued_data >= SEND_NOW:
                    self._send_at_once()    # a large answer: out before the next command
            elif isinstance(ev, LoggedIn):
                self.logged_in = True
                self.server.logged_in(self)
                await self.flush()
            elif isinstance(ev, Close):
                log.debug("iSCSI %s: closing: %s", self.peer, ev.reason)
                await self.flush()
                return

    async def _login_deadline(self) -> None:
        timeout = self.server.config.login_timeout
        await trio.sleep(timeout)
        if not self.logged_in:
            self.server.stats.login_timeouts += 1
            log.info("iSCSI %s: not logged in within %gs (iscsi.login_timeout): closing",
                     self.peer, timeout)
            self.stop()

    async def _pinger(self) -> None:
        interval = self.server.config.nop_interval
        while True:
            await trio.sleep(interval)
            if trio.current_time() - self._last_rx < interval:
                continue
            if not self.conn.ping():
                log.info("iSCSI %s: no answer to NOP-In ping: closing", self.peer)
                self.stop()
                return
            await self.flush()

    def _at_once(self, task: Task, data: bytes) -> bool:
        """Complete a command that needs no waiting (a cached read, a buffered write)
        without a task; its answer goes out with the next flush of the read loop."""
        plan = task.plan
        if plan is None or plan.quick is None:
            return False
        started = time.perf_counter()
        try:
            result = plan.quick(data)
        except Exception:
            log.exception("iSCSI %s: %s failed unexpectedly", self.peer, plan.name)
            return False
        if result is None:
            return False
        self._finish(task, result, started)
        return True

    async def _execute(self, task: Task, data: bytes) -> None:
        plan = task.plan
        assert plan is not None
        started = time.perf_counter()
        try:
            result = await plan.run(data)
        except Exception:
            log.exception("iSCSI %s: %s failed unexpectedly", self.peer, plan.name)
            result = cdb.check(cdb.INTERNAL_FAILURE)
        self._finish(task, result, started)
        # If the peer is gone, the reader sees the dead connection and ends it.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 ConnectionError):
            await self.flush()

    def _finish(self, task: Task, result: cdb.Result, started: float) -> None:
        stats = self.server.stats
        plan = task.plan
        assert plan is not None
        commands = stats.commands
        commands[plan.name] = commands.get(plan.name, 0) + 1
        stats.observe(time.perf_counter() - started)
        if result.sense is not None:
            key = cdb.SENSE_KEY_NAMES.get(result.sense.key, "other")
            stats.sense[key] = stats.sense.get(key, 0) + 1
        if plan.write:
            if result.status == cdb.GOOD:
                stats.bytes_written += task.want
        elif result.parts or result.data:
            stats.bytes_read += result.size
        self.conn.complete(task, result)
