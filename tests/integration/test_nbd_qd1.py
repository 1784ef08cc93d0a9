"""The QD1 receive path (issue 27; nbd/server R4, with R1 and DESIGN's one-loop rule): a
receive that finds bytes at once skips trio's checkpoint only a bounded number of times in
a row, so a client whose next request is always already in (one request per send, a window
of them in flight, from its own thread and event loop) still gets byte-exact replies, and
another client on the same server keeps being served while it runs."""

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
