"""VolumeFS's request paths without a mount (fuse/fs.py): what ``read`` and ``write``
answer on their no-wait paths, on a real Pool of file devices. The real mount is
tests/integration/test_fuse.py; these pin the properties that the mount cannot show
because pyfuse3 copies an answer before anything else runs ("VolumeFS invariant N")."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import cast

import pyfuse3

from fuse.fs import VolumeFS
from pool.device import FileDevice
from pool.pool import Pool
from pool.tuning import PoolTuning
from volumes import VolumeManager

BS = 64 * 1024
SIZE = 8 * BS


async def _mounted_volume(tmp_path: Path) -> tuple[Pool, VolumeFS, int, bytes]:
    """A VolumeFS over pool 'p' whose volume 'v' holds random bytes (flushed, so reads
    come from records), and a read-write handle of 'v' opened through lookup + open."""
    devs = [FileDevice(str(tmp_path / f"d{i}"), create_size=64 << 20) for i in range(3)]
    pool = await Pool.create("p", devs, profile="plain", extent_size=1 << 20,
                             tuning=PoolTuning(record_cache=16 << 20))
    vm = VolumeManager(pool)
    vol = await vm.create("v", SIZE, block_size=BS, compression=False)
    data = random.Random(7).randbytes(SIZE - 2 * BS) + bytes(2 * BS)   # last two: holes
    await vol.write(0, data[:SIZE - 2 * BS])
    await vol.flush()
    fs = VolumeFS({"p": vm})
    ctx = cast(pyfuse3.RequestContext, None)
    pool_ino = (await fs.lookup(pyfuse3.ROOT_INODE, b"p", ctx)).st_ino
    ino = (await fs.lookup(pool_ino, b"v", ctx)).st_ino
    fh = (await fs.open(ino, os.O_RDWR, ctx)).fh
    return pool, fs, fh, data


async def test_small_reads_answer_bytes_no_later_write_changes(tmp_path: Path) -> None:
    """VolumeFS invariant 2 (DESIGN 4: no bytes but the volume's): a small read answered
    at once is a copy or a view of bytes nothing changes -- a record read and cached,
    a hole, a block the write buffer keeps as the writer's immutable bytes -- never a view
    of a block that a later write patches in place. Each answer is byte-exact when it is
    given and still is after every later write to the same bytes."""
    pool, fs, fh, data = await _mounted_volume(tmp_path)
    model = bytearray(data)
    answers: list[tuple[bytes | memoryview, bytes]] = []

    async def read(off: int, size: int) -> None:
        got = await fs.read(fh, off, size)
        assert bytes(got) == bytes(model[off:off + size])
        answers.append((got, bytes(model[off:off + size])))

    async def write(off: int, buf: bytes) -> None:
        assert await fs.write(fh, off, buf) == len(buf)
        model[off:off + len(buf)] = buf

    rng = random.Random(8)
    await read(0, 4096)                   # first: the full path resolves the handle
    await read(4096, 4096)                # a record: read, checked, cached
    await read(4096 + 512, 4096)          # a record-cache hit
    await read(BS - 2048, 4096)           # across two blocks: joined
    await read(6 * BS + 100, 4096)        # a hole
    await write(4096, rng.randbytes(4096))          # block 0 becomes the buffer's bytearray
    await read(4096, 4096)                # ... whose bytes come copied
    await write(4096 + 1024, rng.randbytes(1024))   # patched in place
    await read(4096, 8192)
    await write(2 * BS, rng.randbytes(BS))          # a whole block: the writer's bytes
    await read(2 * BS + 8192, 4096)
    await write(2 * BS + 8192, rng.randbytes(4096))
    await write(6 * BS + 100, rng.randbytes(100))   # the hole gets data
    await read(6 * BS, 4096)
    for got, expected in answers:
        assert bytes(got) == expected
    await pool.close()
