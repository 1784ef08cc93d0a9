"""Helpers shared by the failure-handling tests (issue 9): a filled pool on sparse files,
where each record's fragments lie, and corrupting them on disk."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from pool import Pool, codec
from pool.faults import FaultyDevice
from pool.layout import SECTOR
from pool.profile import Profile
from pool.state import ENTRY
from pool.tuning import PoolTuning
from tests.conftest import DiskSet
from volumes import VolumeManager

EXT = 1 << 20
BS = 64 << 10


async def filled_pool(ds: DiskSet, profile: str, size: int, *, seed: int = 1,
                      compression: bool = False, tuning: PoolTuning | None = None
                      ) -> tuple[Pool, bytes]:
    """An open pool on ``ds`` whose volume 'v' holds ``size`` random bytes (flushed)."""
    pool = await Pool.create("p", ds.create(), profile=profile, extent_size=EXT,
                             tuning=tuning)
    vol = await VolumeManager(pool).create("v", size, block_size=BS, compression=compression)
    data = random.Random(seed).randbytes(size)
    await vol.write(0, data)
    await vol.flush()
    return pool, data


async def read_all(pool: Pool, size: int, name: str = "v") -> bytes:
    return await VolumeManager(pool).get(name).read(0, size)


def fragments(pool: Pool, name: str = "v") -> dict[tuple[int, int], tuple[int, int, int]]:
    """(block, column) -> (member, byte offset on the device, fragment bytes)."""
    map_id = next(int(o["map"]) for o in pool.objects().values()
                  if o.get("type") == "volume" and o["name"] == name)
    out = {}
    for block, raw in pool.state.forest.items(map_id):
        seg_id, off, plen, _f, _h = ENTRY.unpack(raw)
        seg = pool.state.segments[seg_id]
        units = -(-(32 + -(-plen // seg.k)) // SECTOR)
        for c, (member, ext) in enumerate(seg.extents):
            out[(block, c)] = (member, pool.layout.extent_offset(ext) + off * SECTOR,
                               units * SECTOR)
    return out


def corrupt(ds: DiskSet, member: int, offset: int, length: int, rng: random.Random) -> None:
    """Overwrite a few bytes inside [offset, offset + 64) of a device file (the header
    and first chunk bytes, all covered by the fragment checksum)."""
    with open(ds.paths[member], "r+b") as f:
        pos = offset + rng.randrange(0, min(64, length))
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ 0xFF]))


async def rotten_pool(ds: DiskSet, profile: str, size: int, block: int, column: int,
                      seed: int) -> tuple[Pool, bytes, str]:
    """``filled_pool`` closed, one fragment (``block``, ``column``) corrupted on its device,
    and the pool opened again: (pool, the volume's data, that device's path)."""
    pool, data = await filled_pool(ds, profile, size)
    member, off, length = fragments(pool)[(block, column)]
    await pool.close()
    corrupt(ds, member, off, length, random.Random(seed))
    return await Pool.open(ds.open()), data, str(ds.paths[member])


def fail_stores_after(pool: Pool, faulty: Sequence[FaultyDevice], good: int,
                      lost: int = 3) -> Callable[[], int]:
    """Make ``pool.writer.store`` fail from its ``good + 1``-th call on: the first ``lost``
    of ``faulty`` then fail every write (more than ec:4+2 can lose). Returns a function
    that undoes it (the store as it was, the devices healthy) and tells how many stores
    were called."""
    w = pool.writer
    store = w.store
    stored = 0

    async def failing_store(prof: Profile, encoded: Sequence[codec.EncodedRecord]
                            ) -> list[bytes]:
        nonlocal stored
        if stored == good:
            for d in faulty[:lost]:
                d.write_error_rate = 1.0
        stored += 1
        return await store(prof, encoded)

    def undo() -> int:
        w.store = store                            # type: ignore[method-assign]
        for d in faulty:
            d.write_error_rate = 0.0
        return stored
    w.store = failing_store                        # type: ignore[method-assign]
    return undo
