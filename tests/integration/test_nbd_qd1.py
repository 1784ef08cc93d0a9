"""The QD1 receive path (issue 27; nbd/server R4, with R1 and DESIGN's one-loop rule): a
receive that finds bytes at once skips trio's checkpoint only a bounded number of times in
a row, so a client whose next request is always already in (one request per send, a window
of them in flight, from its own thread and event loop) still gets byte-exact replies, and
another client on the same server keeps being served while it runs; so does one flooded by
a client in another process."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from nbd import proto
from tests.kit.nbdharness import POOL, Bystander, RawClient, served_pool

KiB = 1024
MiB = 1024 * 1024
BLOCK = 4 * KiB
WINDOW = 512         # requests in flight: the server's socket is seldom empty


async def _stream(port: int, content: bytes, n: int, structured: bool) -> dict[int, bytes]:
    """``n`` 4 KiB requests, each in its own send, up to ``WINDOW`` in flight (a sender and
    a receiver task): reads of the first MiB (checked against ``content``) and writes to
    the second (block cookie // 3 % 256, so that no two writes in flight share a block).
    Returns the block -> last bytes written."""
    rng = random.Random(27)
    c = await RawClient.open(port, f"{POOL}/vol", structured=structured)
    want: dict[int, bytes] = {}        # cookie -> bytes a read must return (b"": a write)
    written: dict[int, bytes] = {}
    window = trio.Semaphore(WINDOW)

    async def send() -> None:
        for cookie in range(1, n + 1):
            await window.acquire()
            if cookie % 3 == 0:
                data = rng.randbytes(BLOCK)
                blk = cookie // 3 % 256
                want[cookie] = b""
                written[blk] = data
                await c.send(c.encode(proto.CMD_WRITE, cookie, MiB + blk * BLOCK, data=data))
            else:
                off = rng.randrange(0, MiB - BLOCK, 512)
                want[cookie] = content[off:off + BLOCK]
                await c.send(c.encode(proto.CMD_READ, cookie, off, BLOCK))

    async def receive() -> None:
        for _ in range(n):
            r = await c.reply(seconds=10)
            assert r.error == 0, r.message
            assert r.data == want.pop(r.cookie), f"cookie {r.cookie}: bytes differ"
            window.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    await c.aclose()
    return written


async def test_a_client_with_its_next_request_always_in_does_not_starve_others(
        tmp_path: Path) -> None:
    content = random.Random(1).randbytes(MiB)
    async with served_pool(tmp_path, {"vol": 2 * MiB, "side": MiB}) as srv:
        c = await RawClient.open(srv.port, f"{POOL}/vol")
        assert (await c.write(0, content)).error == 0
        assert (await c.read(0, MiB)).data == content       # cached: reads go inline
        async with Bystander(srv.port).running() as side:
            before = side.cycles
            for structured in (True, False):
                written = await trio.to_thread.run_sync(
                    trio.run, _stream, srv.port, content, 3000, structured)
            during = side.cycles - before
        # R4: the streaming connection let the loop run other tasks in between.
        assert during >= 3, f"the other client completed {during} cycles meanwhile"
        for blk, data in written.items():
            r = await c.read(MiB + blk * BLOCK, BLOCK, cookie=blk + 10)
            assert r.data == data, f"block {blk} of the written region differs"
        await c.aclose()


# A client in its own process (no share of this process's GIL or loop) that sends 512-byte
# reads one per send, as fast as it can, with up to 4096 in flight, for SECONDS, while a
# thread reads and counts the replies: the server's socket almost never runs dry.
FLOOD = r"""
import socket, struct, sys, threading, time
port, name, seconds = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "EOF"
        b += c
    return b
exact(18)
s.sendall(struct.pack(">I", 3))                       # fixed newstyle, no zeroes
s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
exact(10)
REPLY = 16 + 512
got = [0]
def receive():
    while True:
        c = s.recv(1 << 20)
        if not c:
            return
        got[0] += len(c)
threading.Thread(target=receive, daemon=True).start()
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    if sent - got[0] // REPLY < 4096:
        s.send(struct.pack(">IHHQQI", 0x25609513, 0, 0, sent, (sent % 64) * 512, 512))
        sent += 1
while got[0] < sent * REPLY:
    time.sleep(0.01)
print(sent)
"""


async def test_a_flooding_client_leaves_room_for_another(tmp_path: Path) -> None:
    async with served_pool(tmp_path, {"vol": MiB, "side": MiB}) as srv:
        c = await RawClient.open(srv.port, f"{POOL}/vol")
        assert (await c.write(0, bytes(range(256)) * 128)).error == 0
        async with Bystander(srv.port).running() as side:
            before = side.cycles
            done = await trio.run_process(
                ["/usr/bin/python3", "-c", FLOOD, str(srv.port), f"{POOL}/vol", "1.5"],
                capture_stdout=True, cwd="/")
            during = side.cycles - before
        requests = int(done.stdout)
        assert requests > 1000
        # R4 (and S4's "everybody else is still served"): the flooded connection lets the
        # loop run. (Without R4's bound the other client still got 20-75 cycles here, by
        # load, against 20-120 with it: the flood's socket does run dry now and then, so
        # this guards the property without measuring the bound.)
        assert during >= 3, f"{during} cycles of the other client in 1.5 s ({requests} reads)"
        await c.aclose()
