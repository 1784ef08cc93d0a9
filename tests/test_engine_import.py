"""Import, labels and bad input (invariant 9: a clear error, and nothing changed).

Corrupted labels, a device of another pool, a truncated device, a stale member, a device
that is already labelled, bad profiles/sizes/names and out-of-range I/O are each refused
with a message that says what is wrong; the device files are byte-identical afterwards.
Import works from the devices alone, in any order, from another directory ("another
machine"); destroy wipes the labels; add_device grows the pool.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from pool import FileDevice, Pool
from pool.errors import ImportFailed, InvalidArgument
from pool.layout import LABEL_SIZE
from volumes import VolumeManager

DEV = 32 << 20


async def _pool(tmp: Path, name: str = "tank", n: int = 3,
                profile: str = "ec:2+1") -> tuple[list[Path], bytes]:
    paths = [tmp / f"{name}{i}" for i in range(n)]
    pool = await Pool.create(name, [FileDevice(str(p), create_size=DEV) for p in paths],
                             profile=profile, extent_size=1 << 20, meta_size=2 << 20)
    vol = await VolumeManager(pool).create("v", 2 << 20)
    data = os.urandom(2 << 20)
    await vol.write(0, data)
    await pool.close()
    return paths, data


def _scribble(path: Path, *offsets: int) -> None:
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(b"garbage")


def _digests(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


async def _refused(paths: list[Path], match: str, **kw: str) -> None:
    before = _digests(paths)
    devs = [FileDevice(str(p)) for p in paths]
    try:
        with pytest.raises(ImportFailed, match=match):
            await Pool.open(devs, **kw)
    finally:
        for d in devs:
            d.close()
    assert _digests(paths) == before, "a refused import changed a device"


async def _content(paths: list[Path]) -> bytes:
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    try:
        return await VolumeManager(pool).get("v").read(0, 2 << 20)
    finally:
        await pool.close()


async def test_corrupt_primary_label_falls_back_to_the_backup(tmp_path: Path) -> None:
    paths, data = await _pool(tmp_path)
    _scribble(paths[1], 100)
    assert await _content(paths) == data


async def test_both_labels_corrupt_is_refused_naming_the_device(tmp_path: Path) -> None:
    paths, _ = await _pool(tmp_path)
    _scribble(paths[2], 100, DEV - LABEL_SIZE + 100)
    await _refused(paths, f"{paths[2]} is not a storaged pool member.*checksum")


async def test_device_of_another_pool_is_refused(tmp_path: Path) -> None:
    paths, _ = await _pool(tmp_path, "tank")
    other, _ = await _pool(tmp_path, "other", n=1, profile="plain")
    await _refused([*paths, other[0]], "belongs to another pool", name="tank")
    await _refused([*paths, other[0]], "devices belong to 2 pools")


async def test_truncated_device_is_refused(tmp_path: Path) -> None:
    paths, _ = await _pool(tmp_path)
    os.truncate(paths[0], DEV - (1 << 20))
    await _refused(paths, "truncated: its label says")


async def test_stale_member_copy_is_refused(tmp_path: Path) -> None:
    paths, _ = await _pool(tmp_path)
    old = tmp_path / "old-copy"
    shutil.copy(paths[0], old)
    for _ in range(3):                      # the pool moves on (checkpoints) without it
        pool = await Pool.open([FileDevice(str(p)) for p in paths])
        vol = VolumeManager(pool).get("v")
        await vol.write(0, os.urandom(65536))
        await pool.close()
    shutil.copy(old, paths[0])              # an old copy of member 0 put back
    await _refused(paths, "stale member 0 of pool tank")


async def test_import_from_devices_alone_any_order_other_directory(tmp_path: Path) -> None:
    paths, data = await _pool(tmp_path)
    elsewhere = tmp_path / "another-machine"
    elsewhere.mkdir()
    moved = []
    for i, p in enumerate(reversed(paths)):
        target = elsewhere / f"disk-{i}.img"
        shutil.move(p, target)
        moved.append(target)
    assert await _content(moved) == data


async def test_create_refuses_a_labelled_device_unless_forced(tmp_path: Path) -> None:
    paths, _ = await _pool(tmp_path)
    before = _digests(paths)
    with pytest.raises(InvalidArgument, match="already member 0 of pool 'tank'"):
        await Pool.create("again", [FileDevice(str(paths[0]))])
    assert _digests(paths) == before
    pool = await Pool.create("again", [FileDevice(str(paths[0]))], force=True,
                             extent_size=1 << 20)
    await pool.close()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"profile": "ec:4+2"}, "needs 6 devices"),
    ({"profile": "mirror:1"}, "mirror:N needs"),
    ({"profile": "raid5"}, "unknown redundancy profile"),
    ({"extent_size": 3 << 20}, "power of two"),
    ({"extent_size": 4096}, "power of two"),
])
async def test_bad_pool_parameters(tmp_path: Path, kwargs: dict[str, object],
                                   match: str) -> None:
    devs = [FileDevice(str(tmp_path / f"d{i}"), create_size=DEV) for i in range(3)]
    with pytest.raises(InvalidArgument, match=match):
        await Pool.create("p", devs, **kwargs)  # type: ignore[arg-type]
    for d in devs:
        assert d.pread(0, LABEL_SIZE) == bytes(LABEL_SIZE)   # nothing written
        d.close()


async def test_bad_names_sizes_and_ranges(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="invalid pool name"):
        await Pool.create("bad name", [FileDevice(str(tmp_path / "x"), create_size=DEV)])
    pool = await Pool.create("p", [FileDevice(str(tmp_path / "d"), create_size=DEV)],
                             extent_size=1 << 20)
    vm = VolumeManager(pool)
    try:
        for name, size, match in [("a/b", 1 << 20, "invalid volume name"),
                                  ("v", 0, "positive multiple of 512"),
                                  ("v", 1000, "positive multiple of 512")]:
            with pytest.raises(InvalidArgument, match=match):
                await vm.create(name, size)
        with pytest.raises(InvalidArgument, match="block size"):
            await vm.create("v", 1 << 20, block_size=3000)
        vol = await vm.create("v", 1 << 20)
        for off, n in [(-1, 10), ((1 << 20) - 5, 10), (0, (1 << 20) + 1)]:
            with pytest.raises(InvalidArgument, match="outside volume"):
                await vol.read(off, n)
            with pytest.raises(InvalidArgument, match="outside volume"):
                await vol.write(off, b"x" * max(n, 0))
        assert vol.statistics().mapped_bytes == 0
    finally:
        await pool.close()


async def test_destroy_wipes_labels(tmp_path: Path) -> None:
    paths, _ = await _pool(tmp_path)
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    await pool.destroy()
    await _refused(paths, "not a storaged pool member")


async def test_add_device_grows_the_pool(tmp_path: Path) -> None:
    paths, data = await _pool(tmp_path)
    pool = await Pool.open([FileDevice(str(p)) for p in paths])
    cap = pool.statistics().capacity_bytes
    extra = tmp_path / "extra"
    await pool.add_device(FileDevice(str(extra), create_size=DEV))
    assert pool.statistics().capacity_bytes > cap
    vol = VolumeManager(pool).get("v")
    more = os.urandom(1 << 20)
    await vol.write(1 << 20, more)
    await pool.close()
    expect = data[:1 << 20] + more
    assert await _content([*paths, extra]) == expect
    with pytest.raises(InvalidArgument, match="already a member"):
        pool = await Pool.open([FileDevice(str(p)) for p in [*paths, extra]])
        try:
            await pool.add_device(FileDevice(str(extra)))
        finally:
            await pool.close()
