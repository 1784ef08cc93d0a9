"""Shared harness for the NBD end-to-end tests (test_nbd_clients, test_nbd_badinput,
test_nbd_tls).

- ``served_pool``: a real pool on sparse file devices, a VolumeManager with volumes, and a
  real ``NBDServer`` on an ephemeral loopback port, all inside the test's trio run; yields a
  ``Served`` with ``url(name)``, ``port``, ``vm``, ``pool``, ``server``.
- ``serve``: the server alone, for a pool the test opened itself (re-import tests).
- ``run`` / ``nbdsh``: run an independent client as a subprocess (never blocking the event
  loop, always under a timeout) and keep its output for assertion messages.
- ``RawClient``: a hand-rolled NBD client over a trio TCP stream, for speaking the protocol
  byte by byte (bad input, pipelining), with a reply parser that handles simple replies and
  structured replies (chunks of different cookies may interleave).
- ``Bystander``: a second, well-behaved client that keeps writing and reading back its own
  pattern on its own connection while a test abuses the server (invariant 9: bad input on
  one connection changes nothing for anybody else).

libnbd's Python module is never imported here: our top-level package ``nbd`` shadows it,
so libnbd is driven through its command-line tools only (DESIGN §1). ``nbdsh`` runs
``python3 -m nbd``, so it is started from the test's tmp dir with PYTHONSAFEPATH=1 and the
system python first on PATH (it needs Debian's python3-libnbd).

Read-only exports: snapshot exports arrive with the snapshots issue; until then a read-only
export is a volume with ``Volume.read_only = True``.
"""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from nbd import proto
from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer, Network
from pool import FileDevice, Pool
from volumes import VolumeManager

POOL = "tank"
N_DEVICES = 6
DEVICE_SIZE = 256 << 20
PROFILE = "ec:4+2"
EXTENT = 4 << 20
OP_TIMEOUT = 15.0          # one network round trip / one short client run
CLIENT_TIMEOUT = 60.0      # one client subprocess moving tens of MiB


# ---- subprocesses ---------------------------------------------------------------------------
@dataclass
class Proc:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)}\n-> exit {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")

    def ok(self) -> Proc:
        assert self.returncode == 0, f"client failed:\n{self}"
        return self


async def run(argv: Sequence[str | Path], *, seconds: float = CLIENT_TIMEOUT,
              cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Proc:
    """Run a client to completion (killed after ``seconds``: a hang fails the test)."""
    args = [str(a) for a in argv]
    with trio.fail_after(seconds):
        cp = await trio.run_process(args, capture_stdout=True, capture_stderr=True,
                                    check=False, cwd=cwd, env=env)
    return Proc(args, cp.returncode, cp.stdout.decode(errors="replace"),
                cp.stderr.decode(errors="replace"))


def nbdsh_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # nbdsh execs `python3 -m nbd`: it needs the system python (python3-libnbd), and
    # must not find our own top-level `nbd` package on sys.path.
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    env["PYTHONSAFEPATH"] = "1"
    env.update(extra or {})
    return env


async def nbdsh(workdir: Path, *scripts: str, uri: str | None = None,
                seconds: float = CLIENT_TIMEOUT) -> Proc:
    """``nbdsh [-u URI] -c SCRIPT...``: libnbd's shell; ``h`` is the handle, ``nbd`` the
    module (in the nbdsh process, not ours)."""
    argv: list[str | Path] = ["nbdsh"]
    if uri is not None:
        argv += ["-u", uri]
    for s in scripts:
        argv += ["-c", s]
    return await run(argv, seconds=seconds, cwd=workdir, env=nbdsh_env())


# ---- pools and servers ----------------------------------------------------------------------
def devices(where: Path, n: int = N_DEVICES) -> list[FileDevice]:
    where.mkdir(parents=True, exist_ok=True)
    return [FileDevice(str(where / f"d{i}"), create_size=DEVICE_SIZE) for i in range(n)]


async def make_pool(where: Path, *, name: str = POOL) -> Pool:
    return await Pool.create(name, devices(where), profile=PROFILE, extent_size=EXTENT)


async def open_pool(where: Path, *, name: str = POOL) -> Pool:
    return await Pool.open(devices(where), name=name)


@dataclass
class Served:
    server: NBDServer
    port: int
    workdir: Path
    managers: dict[str, VolumeManager]
    host: str = "127.0.0.1"

    @property
    def vm(self) -> VolumeManager:
        return self.managers[POOL]

    @property
    def pool(self) -> Pool:
        return self.vm.pool

    def url(self, name: str = f"{POOL}/vol", *, scheme: str = "nbd", query: str = "") -> str:
        return f"{scheme}://{self.host}:{self.port}/{name}" + (f"?{query}" if query else "")

    def qemu_opts(self, name: str = f"{POOL}/vol", *, tls_creds: str | None = None) -> str:
        """A qemu ``--image-opts`` string: raw over the nbd protocol driver."""
        s = (f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={self.host},"
             f"file.server.port={self.port},file.export={name}")
        return s + (f",file.tls-creds={tls_creds}" if tls_creds else "")


@asynccontextmanager
async def serve(managers: Mapping[str, VolumeManager], workdir: Path, *,
                tls: proto.TLSMode = proto.TLSMode.OFF, tls_context: ssl.SSLContext | None = None,
                allow: tuple[Network, ...] = (), limits: Mapping[str, Any] | None = None
                ) -> AsyncIterator[Served]:
    """An NBDServer for ``managers`` (pool name -> VolumeManager) on an ephemeral port
    (``limits``: more NBDConfig fields, e.g. timeouts)."""
    server = NBDServer(VolumeCatalog(dict(managers)),
                       NBDConfig(host="127.0.0.1", port=0, tls=tls, tls_context=tls_context,
                                 allow=allow, **(limits or {})))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve)
        port = listeners[0].socket.getsockname()[1]
        try:
            yield Served(server, port, workdir, dict(managers))
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def served_pool(tmp_path: Path, vols: Mapping[str, int] | None = None, *,
                      tls: proto.TLSMode = proto.TLSMode.OFF,
                      tls_context: ssl.SSLContext | None = None,
                      allow: tuple[Network, ...] = (), limits: Mapping[str, Any] | None = None
                      ) -> AsyncIterator[Served]:
    """A fresh pool ``tank`` (ec:4+2 on six sparse files) with volumes ``vols`` (name ->
    size), served over NBD; the pool is closed cleanly afterwards."""
    pool = await make_pool(tmp_path / "devs")
    try:
        vm = VolumeManager(pool)
        for name, size in (vols if vols is not None else {"vol": 64 << 20}).items():
            await vm.create(name, size)
        async with serve({POOL: vm}, tmp_path, tls=tls, tls_context=tls_context,
                         allow=allow, limits=limits) as srv:
            yield srv
    finally:
        await pool.close()


async def wait_idle(server: NBDServer, *, leave: int = 0,
                    seconds: float = OP_TIMEOUT) -> None:
    """Wait until the server has at most ``leave`` connections left (the others' handlers
    have all finished)."""
    with trio.fail_after(seconds):
        # The server offers a counter, not an event: poll it.
        while server.stats.active > leave:  # noqa: ASYNC110
            await trio.sleep(0.01)


# ---- a hand-rolled client -------------------------------------------------------------------
OPT_HDR = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")


class PeerClosed(Exception):
    """The server closed the connection."""


@dataclass
class OptReply:
    option: int
    rtype: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.rtype & (1 << 31))


@dataclass
class Reply:
    cookie: int
    error: int = 0
    message: str = ""
    structured: bool = False
    data: bytes = b""                 # READ: the assembled bytes (holes as zeros)
    chunk_types: list[int] = field(default_factory=list)
    extents: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Pending:
    kind: int
    offset: int
    length: int
    buf: bytearray | None = None
    reply: Reply | None = None


def request(kind: int, cookie: int, offset: int = 0, length: int = 0, data: bytes = b"",
            flags: int = 0) -> bytes:
    return REQUEST.pack(proto.REQUEST_MAGIC, flags, kind, cookie, offset, length) + data


class RawClient:
    """The client side of NBD, by hand. Every receive is under ``OP_TIMEOUT``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._pending: dict[int, _Pending] = {}
        self.structured = False
        self.size = 0
        self.tflags = 0

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        with trio.fail_after(OP_TIMEOUT):
            return cls(await trio.open_tcp_stream(host, port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        with trio.fail_after(OP_TIMEOUT):
            await self.stream.send_all(data)

    async def recv_exact(self, n: int, seconds: float = OP_TIMEOUT) -> bytes:
        with trio.fail_after(seconds):
            while len(self._buf) < n:
                chunk = await self.stream.receive_some(1 << 20)
                if not chunk:
                    raise PeerClosed(f"EOF after {len(self._buf)} of {n} bytes")
                self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_to_eof(self, seconds: float = OP_TIMEOUT) -> bytes:
        """Everything the server sends until it closes (fails if it does not close)."""
        with trio.fail_after(seconds):
            while True:
                try:
                    chunk = await self.stream.receive_some(1 << 20)
                except trio.BrokenResourceError:   # reset by peer also means closed
                    break
                if not chunk:
                    break
                self._buf += chunk
        out = bytes(self._buf)
        self._buf.clear()
        return out

    # ---- handshake ----------------------------------------------------------------------
    async def greeting(self) -> int:
        magic, ihaveopt, hflags = struct.unpack(">QQH", await self.recv_exact(18))
        assert magic == proto.NBDMAGIC and ihaveopt == proto.IHAVEOPT, "bad server greeting"
        return int(hflags)

    async def start(self, client_flags: int = proto.FLAG_FIXED_NEWSTYLE
                    | proto.FLAG_NO_ZEROES) -> None:
        await self.greeting()
        await self.send(struct.pack(">I", client_flags))

    async def send_option(self, option: int, data: bytes = b"") -> None:
        await self.send(OPT_HDR.pack(proto.IHAVEOPT, option, len(data)) + data)

    async def option_reply(self) -> OptReply:
        magic, option, rtype, n = OPT_REPLY.unpack(await self.recv_exact(OPT_REPLY.size))
        assert magic == proto.REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return OptReply(option, rtype, await self.recv_exact(n))

    async def option(self, option: int, data: bytes = b"") -> list[OptReply]:
        """Send an option; its replies up to and including the final ACK or error."""
        await self.send_option(option, data)
        out = []
        while True:
            r = await self.option_reply()
            assert r.option == option, f"reply for option {r.option}, sent {option}"
            out.append(r)
            if r.rtype == proto.REP_ACK or r.is_error:
                return out

    async def list_exports(self) -> list[str]:
        names = []
        for r in await self.option(proto.OPT_LIST):
            if r.rtype == proto.REP_SERVER:
                (n,) = struct.unpack_from(">I", r.data)
                names.append(r.data[4:4 + n].decode())
            else:
                assert r.rtype == proto.REP_ACK, f"NBD_OPT_LIST failed: {r}"
        return names

    @staticmethod
    def go_data(name: str) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)

    async def go(self, name: str, *, structured: bool = True,
                 meta: bool = False) -> list[OptReply]:
        """NBD_OPT_GO (after NBD_OPT_STRUCTURED_REPLY and, with ``meta``,
        NBD_OPT_SET_META_CONTEXT base:allocation); returns GO's replies."""
        if structured:
            (r,) = await self.option(proto.OPT_STRUCTURED_REPLY)
            assert r.rtype == proto.REP_ACK, f"structured replies refused: {r}"
            self.structured = True
        if meta:
            raw, q = name.encode(), proto.META_BASE_ALLOCATION.encode()
            replies = await self.option(proto.OPT_SET_META_CONTEXT,
                                        struct.pack(">I", len(raw)) + raw
                                        + struct.pack(">II", 1, len(q)) + q)
            assert [r.rtype for r in replies] == [proto.REP_META_CONTEXT, proto.REP_ACK], (
                f"base:allocation refused: {replies}")
        replies = await self.option(proto.OPT_GO, self.go_data(name))
        if replies[-1].rtype == proto.REP_ACK:
            for r in replies:
                if r.rtype == proto.REP_INFO and struct.unpack_from(">H", r.data)[0] == 0:
                    _t, self.size, self.tflags = struct.unpack(">HQH", r.data)
        return replies

    @classmethod
    async def open(cls, port: int, name: str, *, structured: bool = True,
                   meta: bool = False) -> RawClient:
        """Connected and in transmission on export ``name``."""
        c = await cls.connect(port)
        await c.start()
        replies = await c.go(name, structured=structured, meta=meta)
        assert replies[-1].rtype == proto.REP_ACK, f"NBD_OPT_GO {name!r} failed: {replies}"
        return c

    # ---- transmission -------------------------------------------------------------------
    def track(self, kind: int, cookie: int, offset: int, length: int) -> None:
        assert cookie not in self._pending, f"cookie {cookie} already in flight"
        self._pending[cookie] = _Pending(kind, offset, length)

    def encode(self, kind: int, cookie: int, offset: int = 0, length: int | None = None,
               data: bytes = b"", flags: int = 0) -> bytes:
        """A request (tracked, so that its reply can be parsed)."""
        n = len(data) if length is None else length
        self.track(kind, cookie, offset, n)
        return request(kind, cookie, offset, n, data, flags)

    async def cmd(self, kind: int, cookie: int, offset: int = 0, length: int | None = None,
                  data: bytes = b"", flags: int = 0) -> Reply:
        await self.send(self.encode(kind, cookie, offset, length, data, flags))
        r = await self.reply()
        assert r.cookie == cookie, f"reply for cookie {r.cookie}, expected {cookie}"
        return r

    async def write(self, offset: int, data: bytes, cookie: int = 1) -> Reply:
        return await self.cmd(proto.CMD_WRITE, cookie, offset, data=data)

    async def read(self, offset: int, length: int, cookie: int = 2) -> Reply:
        return await self.cmd(proto.CMD_READ, cookie, offset, length)

    async def disconnect(self) -> None:
        await self.send(request(proto.CMD_DISC, 0xD15C))

    async def reply(self, seconds: float = OP_TIMEOUT) -> Reply:
        """The next complete reply (for whichever in-flight cookie finishes first)."""
        with trio.fail_after(seconds):
            while True:
                done = await self._one()
                if done is not None:
                    return done

    async def _one(self) -> Reply | None:
        (magic,) = struct.unpack(">I", await self.recv_exact(4))
        if magic == proto.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.recv_exact(12))
            p = self._pending.pop(cookie, None)
            assert p is not None, f"simple reply for unknown cookie {cookie}"
            r = Reply(cookie, error)
            if p.kind == proto.CMD_READ and not error:
                r.data = await self.recv_exact(p.length)
            return r
        assert magic == proto.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        assert self.structured, "structured reply chunk without structured replies"
        flags, rtype, cookie, n = struct.unpack(">HHQI", await self.recv_exact(16))
        payload = await self.recv_exact(n)
        p = self._pending.get(cookie)
        assert p is not None, f"chunk for unknown cookie {cookie}"
        if p.reply is None:
            p.reply = Reply(cookie, structured=True)
        r = p.reply
        r.chunk_types.append(rtype)
        if rtype in (proto.REPLY_TYPE_OFFSET_DATA, proto.REPLY_TYPE_OFFSET_HOLE):
            assert p.kind == proto.CMD_READ, f"content chunk for command {p.kind}"
            (off,) = struct.unpack_from(">Q", payload)
            if rtype == proto.REPLY_TYPE_OFFSET_DATA:
                body = payload[8:]
            else:
                assert n == 12, f"OFFSET_HOLE chunk of {n} bytes"
                body = bytes(struct.unpack_from(">I", payload, 8)[0])
            assert body, "empty content chunk"
            assert p.offset <= off and off + len(body) <= p.offset + p.length, (
                f"chunk {off}+{len(body)} outside request {p.offset}+{p.length}")
            if p.buf is None:
                p.buf = bytearray(p.length)
            p.buf[off - p.offset:off - p.offset + len(body)] = body
        elif rtype == proto.REPLY_TYPE_BLOCK_STATUS:
            (ctx,) = struct.unpack_from(">I", payload)
            assert ctx == proto.META_CONTEXT_ID
            r.extents += [struct.unpack_from(">II", payload, 4 + 8 * i)
                          for i in range((n - 4) // 8)]
        elif rtype & (1 << 15):
            err, mlen = struct.unpack_from(">IH", payload)
            r.error = err
            r.message = payload[6:6 + mlen].decode(errors="replace")
        else:
            assert rtype == proto.REPLY_TYPE_NONE, f"unknown chunk type {rtype}"
            assert flags & proto.REPLY_FLAG_DONE, "NBD_REPLY_TYPE_NONE without DONE"
        if not flags & proto.REPLY_FLAG_DONE:
            return None
        del self._pending[cookie]
        if p.kind == proto.CMD_READ and not r.error:
            assert p.buf is not None or p.length == 0, "successful READ without content"
            r.data = bytes(p.buf) if p.buf is not None else b""
        return r


# ---- a well-behaved second client -----------------------------------------------------------
class Bystander:
    """Keeps writing a fresh pattern and reading it back on its own connection.

    ``async with Bystander(port, name):`` runs it in the background; on exit it checks that
    it completed cycles after the body ended too (the server is still serving others)."""

    def __init__(self, port: int, name: str = f"{POOL}/side", span: int = 1 << 20) -> None:
        self.port = port
        self.name = name
        self.span = span
        self.cycles = 0
        self._cycled = trio.Event()

    async def _loop(self, task_status: trio.TaskStatus[None]) -> None:
        c = await RawClient.open(self.port, self.name)
        task_status.started()
        i = 0
        while True:
            i += 1
            block = bytes([i % 251]) * 4096
            off = (i * 4096 * 7) % self.span
            r = await c.write(off, block, cookie=2 * i)
            assert r.error == 0, f"bystander write failed: error {r.error} {r.message}"
            r = await c.read(off, 4096, cookie=2 * i + 1)
            assert r.error == 0, f"bystander read failed: error {r.error} {r.message}"
            assert r.data == block, f"bystander read back wrong data at {off}"
            self.cycles += 1
            self._cycled.set()
            self._cycled = trio.Event()
            await trio.sleep(0.005)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Bystander]:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._loop)
            yield self
            with trio.fail_after(OP_TIMEOUT):
                for _ in range(2):    # a whole write+read cycle after the body ended
                    await self._cycled.wait()
            nursery.cancel_scope.cancel()
