"""Small inline replies held back while the next request is already in (issue 27;
nbd/server R3, with R1): pipelined 4 KiB reads and writes come back in order, byte-exact,
and a held reply never waits for the client to send more -- not behind half a request
header, not behind a request that goes to a task."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from nbd import proto
from tests.kit.nbdharness import POOL, RawClient, served_pool

KiB = 1024
MiB = 1024 * 1024
VOL = f"{POOL}/vol"


@pytest.mark.parametrize("structured", [True, False])
async def test_pipelined_small_requests_answer_in_order_and_exact(
        tmp_path: Path, structured: bool) -> None:
    rng = random.Random(3)
    model = bytearray(rng.randbytes(4 * MiB))
    async with served_pool(tmp_path, {"vol": 4 * MiB}) as srv:
        c = await RawClient.open(srv.port, VOL, structured=structured)
        for off in range(0, len(model), MiB):
            assert (await c.write(off, bytes(model[off:off + MiB]))).error == 0
        # 300 requests in one send: reads (answered inline, held while more are in) and
        # writes (buffered at once) of the same blocks, so a read must see the write
        # before it.
        batch = bytearray()
        want: list[tuple[int, int, bytes]] = []     # cookie, offset, bytes read (or b"")
        for cookie in range(10, 310):
            off = rng.randrange(0, len(model) - 4 * KiB, 512)
            if cookie % 4 == 0:
                data = rng.randbytes(4 * KiB)
                model[off:off + len(data)] = data
                batch += c.encode(proto.CMD_WRITE, cookie, off, data=data)
                want.append((cookie, off, b""))
            else:
                batch += c.encode(proto.CMD_READ, cookie, off, 4 * KiB)
                want.append((cookie, off, bytes(model[off:off + 4 * KiB])))
        await c.send(bytes(batch))
        for cookie, off, data in want:
            r = await c.reply()
            assert r.cookie == cookie, f"reply {r.cookie} out of order, {cookie} next (R1)"
            assert r.error == 0, r.message
            assert r.data == data, f"cookie {cookie} at {off}: bytes differ"
        await c.aclose()


async def test_a_held_reply_goes_out_before_the_server_waits(tmp_path: Path) -> None:
    rng = random.Random(4)
    content = rng.randbytes(2 * MiB)
    async with served_pool(tmp_path, {"vol": 2 * MiB}) as srv:
        c = await RawClient.open(srv.port, VOL)
        assert (await c.write(0, content)).error == 0
        # Three reads, then a write's header and the start of its payload: the reads'
        # replies are held (a whole header is in behind each), and must be written
        # before the server waits for the rest of the payload.
        batch = b"".join(c.encode(proto.CMD_READ, i, i * 8 * KiB, 4 * KiB)
                         for i in (1, 2, 3))
        new = rng.randbytes(4 * KiB)
        fourth = c.encode(proto.CMD_WRITE, 4, 100 * KiB, data=new)
        await c.send(batch + fourth[:100])
        for i in (1, 2, 3):
            r = await c.reply(seconds=5)
            assert (r.cookie, r.data) == (i, content[i * 8 * KiB:i * 8 * KiB + 4 * KiB])
        await c.send(fourth[100:])
        assert (await c.reply(seconds=5)).cookie == 4
        assert (await c.read(100 * KiB, 4 * KiB, cookie=8)).data == new
        # Two reads then a flush (a task): both read replies arrive, then the flush's.
        batch = (c.encode(proto.CMD_READ, 5, 0, 4 * KiB)
                 + c.encode(proto.CMD_READ, 6, 4 * KiB, 4 * KiB)
                 + c.encode(proto.CMD_FLUSH, 7, 0, 0))
        await c.send(batch)
        got = {}
        with trio.fail_after(10):
            for _ in range(3):
                r = await c.reply()
                got[r.cookie] = r
        assert got[5].data == content[:4 * KiB] and got[6].data == content[4 * KiB:8 * KiB]
        assert got[7].error == 0
        await c.aclose()
