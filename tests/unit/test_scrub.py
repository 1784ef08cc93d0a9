"""Scrub (issue 9; DESIGN §5, invariant 4): every fragment and metadata copy is verified,
bad ones are rewritten from redundancy, records beyond repair are named (volume and
offset) and read as EIO, never as wrong bytes; the scrub's position survives a restart;
a crash during its repairs loses nothing."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
import trio

from pool import FileDevice, MemoryDevice, Pool, scrub
from pool.checker import check
from pool.errors import InvalidArgument, MediumError
from pool.faults import RecordingDevice, WriteLog
from tests.conftest import DiskSet
from tests.kit.crashsim import CrashSimulator
from tests.kit.poolkit import BS, corrupt, filled_pool, fragments, read_all
from volumes import VolumeManager

Disks = Callable[..., DiskSet]
SIZE = 4 << 20


async def _scrub(pool: Pool) -> dict[str, object]:
    await scrub.control(pool, "start")
    out = await scrub.run(pool)
    assert out is not None and out["state"] == "finished", out
    return out


async def test_bit_rot_in_two_devices_is_repaired_then_clean(disks: Disks) -> None:
    ds = disks(6)
    pool, data = await filled_pool(ds, "ec:4+2", SIZE)
    frags = fragments(pool)
    await pool.close()
    rng = random.Random(4)
    hit = 0
    for (block, _column), (member, off, length) in sorted(frags.items()):
        # Two devices (members 1 and 4) rot: never more than M = 2 bad fragments a record.
        if member in (1, 4) and block % 3 != 0:
            corrupt(ds, member, off, length, rng)
            hit += 1
    pool = await Pool.open(ds.open())
    try:
        out = await _scrub(pool)
        assert out["found"] == hit and out["repaired"] == hit, out
        assert out["unrecoverable"] == 0 and out["done"] == out["total"]
        again = await _scrub(pool)
        assert again["found"] == 0 and again["repaired"] == 0, again
        assert await read_all(pool, SIZE) == data
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()


async def test_beyond_parity_is_named_and_reads_eio(disks: Disks) -> None:
    ds = disks(6)
    pool, data = await filled_pool(ds, "ec:4+2", SIZE)
    frags = fragments(pool)
    await pool.close()
    rng = random.Random(5)
    victim = 7
    for column in range(3):          # M + 1 = 3 bad fragments of block 7's record
        member, off, length = frags[(victim, column)]
        corrupt(ds, member, off, length, rng)
    pool = await Pool.open(ds.open())
    try:
        out = await _scrub(pool)
        assert out["unrecoverable"] == 1, out
        problems = out["problems"]
        assert isinstance(problems, list)
        assert any(f"v offset {victim * BS}" in p for p in problems), problems
        vol_read = read_all(pool, SIZE)
        with pytest.raises(MediumError):
            await vol_read
        vol = VolumeManager(pool).get("v")
        assert await vol.read(0, victim * BS) == data[:victim * BS]
        with pytest.raises(MediumError):
            await vol.read(victim * BS, BS)
    finally:
        await pool.close()


async def test_pause_resume_cancel_and_resume_after_restart(disks: Disks) -> None:
    ds = disks(3)
    pool, data = await filled_pool(ds, "ec:2+1", 12 << 20)
    try:
        with pytest.raises(InvalidArgument, match="no scrub to pause"):
            await scrub.control(pool, "pause")
        await scrub.control(pool, "start")
        with pytest.raises(InvalidArgument, match="already running"):
            await scrub.control(pool, "start")
        # Work a little (throttled hard), then pause: the position is committed.
        with trio.move_on_after(0.5):
            await scrub.run(pool, rate=16 << 20)
        await scrub.control(pool, "pause")
        paused = scrub.task(pool)
        assert paused is not None and paused["state"] == "paused"
        assert 0 < paused["done"] < paused["total"], paused
    finally:
        await pool.close()
    pool = await Pool.open(ds.open())
    try:
        t = scrub.task(pool)
        assert t is not None and t["state"] == "paused" and t["position"] > 0
        await scrub.control(pool, "resume")
        out = await scrub.run(pool)
        assert out is not None and out["state"] == "finished" and out["found"] == 0
        await scrub.control(pool, "start")
        await scrub.control(pool, "cancel")
        t = scrub.task(pool)
        assert t is not None and t["state"] == "canceled"
        assert await read_all(pool, 12 << 20) == data
    finally:
        await pool.close()


async def test_last_completed_scrub_outlives_the_next_one(disks: Disks) -> None:
    """The metrics' last scrub (end time and result) is the last one that ran to its end:
    kept, persisted, while a newer one runs, is canceled, and across a restart."""
    ds = disks(3)
    pool, _data = await filled_pool(ds, "ec:2+1", 4 << 20)
    try:
        assert scrub.last_completed(pool) is None
        first = await _scrub(pool)
        last = scrub.last_completed(pool)
        assert last == {"finished": first["finished"], "found": 0, "repaired": 0,
                        "unrecoverable": 0}
        await scrub.control(pool, "start")
        assert scrub.last_completed(pool) == last
        await scrub.control(pool, "cancel")
        assert scrub.last_completed(pool) == last
    finally:
        await pool.close()
    pool = await Pool.open(ds.open())
    try:
        assert scrub.last_completed(pool) == last
        second = await _scrub(pool)
        now = scrub.last_completed(pool)
        assert now is not None and now["finished"] == second["finished"] > last["finished"]
    finally:
        await pool.close()


async def test_crash_during_scrub_repair_loses_nothing(tmp_path: object) -> None:
    tmp = str(tmp_path)
    paths = [os.path.join(tmp, f"d{i}") for i in range(3)]
    devs = [FileDevice(p, create_size=16 << 20) for p in paths]
    pool = await Pool.create("c", devs, profile="ec:2+1", extent_size=1 << 20,
                             meta_size=4 << 20)
    vol = await VolumeManager(pool).create("v", 2 << 20, block_size=BS, compression=False)
    data = random.Random(8).randbytes(2 << 20)
    await vol.write(0, data)
    await vol.flush()
    frags = fragments(pool)
    await pool.close()
    rng = random.Random(9)
    for (block, column), (member, off, _length) in frags.items():
        if column == (block % 3):
            _flip(paths[member], off + 40, rng.randrange(1, 256))
    base = [await trio.Path(p).read_bytes() for p in paths]
    log = WriteLog()
    pool = await Pool.open([RecordingDevice(FileDevice(p), i, log)
                            for i, p in enumerate(paths)])
    out = await _scrub(pool)
    assert isinstance(out["repaired"], int) and out["repaired"] > 0
    await pool.close()
    sim = CrashSimulator(base, log)
    rng2 = random.Random(1)
    points = sim.write_points()
    positions = sorted(set(rng2.sample(points, min(14, len(points)))) | set(sim.sync_points()))
    n = 0
    for cs in sim.states(positions, rng2, variants=("drop", "random")):
        mem = [MemoryDevice(len(img), path=f"m{i}", data=img)
               for i, img in enumerate(cs.images)]
        p2 = await Pool.open(mem)
        try:
            assert await read_all(p2, 2 << 20) == data, cs.position
            t = scrub.task(p2)
            if t is not None and t["state"] == "running":
                await scrub.run(p2)           # the scrub resumes where it was
            assert (await check(p2)).ok
        finally:
            await p2.close()
        n += 1
    assert n >= 10


def _flip(path: str, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ mask]))
