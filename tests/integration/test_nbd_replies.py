"""Replies under a slow reader (issue 27; nbd/server R1-R2): pipelined 1 MiB and 4 KiB reads
whose replies cannot all fit in the socket buffers, so that vectored writes are taken in
part and the rest waits for the writer while new replies arrive behind it. Every reply must
come back whole, parseable (R1: never interleaved) and byte-exact (R2: the rest of a
partial write is the rest of the same buffers).
"""

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
async def test_pipelined_reads_behind_a_slow_reader_come_back_whole_and_exact(
        tmp_path: Path, structured: bool) -> None:
    rng = random.Random(27)
    content = rng.randbytes(32 * MiB)
    async with served_pool(tmp_path, {"vol": 32 * MiB}) as srv:
        w = await RawClient.open(srv.port, VOL)
        for off in range(0, len(content), 4 * MiB):
            r = await w.write(off, content[off:off + 4 * MiB])
            assert r.error == 0
        await w.aclose()
        c = await RawClient.open(srv.port, VOL, structured=structured)
        # 24 MiB of 1 MiB replies (more than loopback's socket buffers take) with 4 KiB
        # ones in between; some are answered inline, some by a task (R1 holds for both).
        wanted: dict[int, tuple[int, int]] = {}
        batch = b""
        for cookie in range(1, 73):
            if cookie % 3:
                off, n = rng.randrange(0, 32 * MiB - MiB, 4 * KiB), MiB
            else:
                off, n = rng.randrange(0, 32 * MiB - 4 * KiB), 4 * KiB
            wanted[cookie] = (off, n)
            batch += c.encode(proto.CMD_READ, cookie, off, n)
        await c.send(batch)
        await trio.sleep(0.3)       # the server's writes fill the buffers and stall
        while wanted:
            r = await c.reply()
            off, n = wanted.pop(r.cookie)
            assert r.error == 0, r.message
            assert r.data == content[off:off + n], f"cookie {r.cookie}: bytes differ"
        # The connection is still in step: one more request, one more exact reply.
        r = await c.read(5 * MiB + 7, 3 * KiB, cookie=99)
        assert r.data == content[5 * MiB + 7:5 * MiB + 7 + 3 * KiB]
        await c.aclose()
