"""Shutdown: a draining NBD server stops reading requests, answers every request it had
already taken, and refuses new connections (the daemon does this on SIGTERM before it
flushes and closes the pools)."""

from __future__ import annotations

import struct
from pathlib import Path

import trio

from nbd import proto
from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer
from pool import FileDevice, Pool
from volumes import VolumeManager


async def _handshake(stream: trio.SocketStream, export: bytes) -> None:
    await stream.receive_some(18)
    await stream.send_all(struct.pack(">I", 3) + struct.pack(
        ">QII", proto.IHAVEOPT, proto.OPT_EXPORT_NAME, len(export)) + export)
    got = b""
    while len(got) < 10:
        got += await stream.receive_some(10 - len(got))


async def test_drain_answers_requests_in_flight(tmp_path: Path) -> None:
    pool = await Pool.create("t", [FileDevice(str(tmp_path / "d0"), create_size=64 << 20)],
                             extent_size=1 << 20)
    vm = VolumeManager(pool)
    await vm.create("v", 16 << 20)
    server = NBDServer(VolumeCatalog({"t": vm}), NBDConfig(port=0))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await _handshake(stream, b"t/v")
        n = 64
        payload = b"\x5a" * 65536
        reqs = b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, proto.CMD_FLAG_FUA,
                                    proto.CMD_WRITE, i, i * 65536, 65536) + payload
                        for i in range(n))
        await stream.send_all(reqs)
        while server.stats.commands.get("WRITE", 0) < n:  # noqa: ASYNC110 - polling a counter
            await trio.sleep(0.001)
        await server.drain()
        replies = b""
        with trio.fail_after(10):
            while len(replies) < 16 * n:
                data = await stream.receive_some(65536)
                assert data, "connection closed before every request was answered"
                replies += data
        cookies = sorted(struct.unpack_from(">IIQ", replies, 16 * i)[2] for i in range(n))
        assert cookies == list(range(n))
        assert all(struct.unpack_from(">IIQ", replies, 16 * i)[1] == 0 for i in range(n))
        late = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await late.receive_some(100) == b""       # refused while draining
        nursery.cancel_scope.cancel()
    assert await vm.get("v").read(0, 65536) == payload
    await pool.close()
