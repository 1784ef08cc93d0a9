"""Member maintenance in process (pool.members invariants 1-5; DESIGN invariants 5 and 9):
offline and online park and take back the same device with marks for what it missed,
refusals change nothing, and a pool whose last member goes away fails."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pool import FileDevice
from pool.errors import ImportFailed, InvalidArgument, PoolFailed
from tests.conftest import DiskSet
from tests.kit.poolkit import filled_pool, read_all
from volumes import VolumeManager

Disks = Callable[..., DiskSet]
SIZE = 2 << 20


async def test_offline_parks_marks_and_online_takes_the_device_back(disks: Disks) -> None:
    """Invariants 1 and 2: an offline member's device is parked (not used, not closed),
    it gets a new epoch, and what is written meanwhile is marked on it; ``online`` takes
    the parked device back, as rebuilding, with its reason cleared. Data stays exact."""
    ds = disks(3)
    pool, data = await filled_pool(ds, "ec:2+1", SIZE)
    try:
        dev = pool.devices[0]
        await pool.offline(0)
        assert pool.devices[0] is None and pool.members.parked == {0: dev}
        assert pool.member_state(0) == "offline" and pool.member_health.epoch(0) == 1
        assert pool.statistics().members[0].why == "taken offline"
        piece = random.Random(2).randbytes(1 << 20)
        vol = VolumeManager(pool).get("v")
        await vol.write(0, piece)
        await vol.flush()
        data = piece + data[len(piece):]
        assert pool.state.members[0].marks
        await pool.online(0)
        assert pool.devices[0] is dev and pool.members.parked == {}
        assert pool.member_state(0) == "rebuilding"
        assert pool.statistics().members[0].why == ""
        assert await read_all(pool, SIZE) == data
    finally:
        await pool.close()


async def test_refused_member_operations_change_nothing(disks: Disks) -> None:
    """Invariants 3 and 4 (DESIGN 9): taking a second member of an ec:2+1 pool offline,
    removing a member when too few would remain, bringing back a device that is not the
    member, and adding a current member under its own path are refused, and the member
    files stay byte-identical."""
    ds = disks(3)
    spare = disks(1, prefix="s")
    pool, data = await filled_pool(ds, "ec:2+1", SIZE)
    other = spare.create()[0]
    again = FileDevice(str(ds.paths[0]))
    try:
        await pool.offline(2)
        before = ds.digests()
        with pytest.raises(InvalidArgument, match="cannot go offline"):
            await pool.offline(1)
        with pytest.raises(InvalidArgument, match="profile ec:2\\+1 needs 3"):
            await pool.remove_device(0)
        with pytest.raises(ImportFailed, match="not a storaged pool member"):
            await pool.online(2, other)
        with pytest.raises(InvalidArgument, match="already a member"):
            await pool.add_device(again)
        assert ds.digests() == before
        assert [pool.member_state(i) for i in range(3)] == ["online", "online", "offline"]
        assert await read_all(pool, SIZE) == data
    finally:
        other.close()
        again.close()
        await pool.close()


async def test_the_last_member_going_away_fails_the_pool(disks: Disks) -> None:
    """Invariant 5: a plain pool whose only member is faulted fails; a commit then gets
    PoolFailed naming why."""
    ds = disks(1)
    pool, _ = await filled_pool(ds, "plain", SIZE)
    try:
        pool.fault(0, "pulled")
        assert pool.statistics().state == "failed"
        with pytest.raises(PoolFailed, match=r"no member left \(pulled\)"):
            await pool.commit()
    finally:
        await pool.close()
