"""Block devices as pool members: sizing by BLKGETSIZE64, BLKDISCARD, a full round trip.

Uses loop devices over sparse files (losetup). Skips only when the host cannot provide
loop devices at all (no /dev/loop-control, or losetup refuses: e.g. an unprivileged run).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool import FileDevice, Pool
from pool.checker import check
from pool.errors import DeviceBusy
from tests.conftest import loop_devices
from volumes import VolumeManager

SIZE = 64 << 20


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[list[str]]:
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("host has no loop device support (/dev/loop-control missing)")
    made: list[str] = []
    with loop_devices():
        try:
            for i in range(3):
                img = tmp_path / f"loop{i}.img"
                with open(img, "wb") as f:
                    f.truncate(SIZE)
                r = subprocess.run(["losetup", "--find", "--show", str(img)],
                                   capture_output=True, text=True, check=False)
                if r.returncode != 0:
                    pytest.skip(f"losetup cannot attach loop devices here: {r.stderr.strip()}")
                made.append(r.stdout.strip())
            yield made
        finally:
            for dev in made:
                subprocess.run(["losetup", "--detach", dev], check=False)


def test_block_device_size_and_discard(loops: list[str]) -> None:
    dev = FileDevice(loops[0])
    try:
        assert dev.size == SIZE
        dev.pwrite(1 << 20, b"\xab" * 65536)
        dev.sync()
        assert dev.pread(1 << 20, 65536) == b"\xab" * 65536
        dev.discard(1 << 20, 65536)  # BLKDISCARD on a loop device punches the backing file
        assert dev.pread(1 << 20, 65536) == bytes(65536)
    finally:
        dev.close()


async def test_pool_on_block_devices_round_trip(loops: list[str]) -> None:
    """A pool of three block devices survives close/import byte-exact (invariant 1)."""
    pool = await Pool.create("blk", [FileDevice(p) for p in loops], profile="ec:2+1",
                             extent_size=1 << 20)
    vol = await VolumeManager(pool).create("v", 16 << 20)
    data = os.urandom(8 << 20)
    await vol.write(4096, data)
    await vol.flush()
    await pool.close()
    pool = await Pool.open([FileDevice(p) for p in reversed(loops)])
    try:
        vol = VolumeManager(pool).get("v")
        assert await vol.read(4096, len(data)) == data
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()


def test_a_block_device_member_is_held_exclusively(loops: list[str]) -> None:
    """DESIGN invariant 10 on a block device: an exclusive open is O_EXCL, so a second
    exclusive open (this process or any other, e.g. mkfs or another daemon) is refused
    with EBUSY until the first is closed; a plain read-only open still works."""
    first = FileDevice(loops[0], exclusive=True)
    try:
        with pytest.raises(DeviceBusy, match="in use"):
            FileDevice(loops[0], exclusive=True)
        FileDevice(loops[0], read_only=True).close()
    finally:
        first.close()
    FileDevice(loops[0], exclusive=True).close()
