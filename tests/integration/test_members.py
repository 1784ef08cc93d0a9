"""Members: a bad one at start, one that vanishes or shrinks under a running pool, the same
device under two paths, and naming a lost member by its last path (issues 20 items 4-5,
21 "members named right").

Cited: DESIGN invariant 5 (a pool survives the loss of m members: reads go on degraded,
replace rebuilds), 9 (bad input is refused and changes nothing), 1 (nothing acknowledged is
lost); pool.identity invariants 1-2. Every test ends with the data byte-exact and the deep
check (every fragment of every record) clean; every refusal leaves the files byte-identical.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import storaged.registry as registry_module
from pool import FileDevice, Pool, rebuild
from pool.checker import check
from pool.device import Device
from pool.errors import InvalidArgument
from pool.faults import FaultyDevice
from pool.layout import LABEL_SIZE, SB_OFFSET, SB_SLOT_SIZE, SB_SLOTS, Label
from pool.tuning import PoolTuning
from storaged.api import pool_status
from storaged.registry import PoolEntry, Registry
from tests.conftest import DiskSet
from tests.kit.daemonkit import Daemon, _qemu_io
from tests.kit.poolkit import filled_pool, read_all
from volumes import VolumeManager

Disks = Callable[..., DiskSet]
DEV = 32 << 20
EXT = 1 << 20
VOL = 4 << 20
SIZE = 4 << 20


def garble_metadata(path: Path) -> None:
    """Random bytes over every superblock slot and the first MiB of the journal (the
    label stays intact: the device still says it is the member)."""
    with open(path, "r+b") as f:
        label = Label.decode(f.read(LABEL_SIZE))
        rng = random.Random(7)
        f.seek(SB_OFFSET)
        f.write(rng.randbytes(SB_SLOTS * SB_SLOT_SIZE))
        f.seek(label.layout.journal_offset)
        f.write(rng.randbytes(1 << 20))


def bad_labels(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for off in (100, size - LABEL_SIZE + 100):
            f.seek(off)
            f.write(b"\xde\xad\xbe\xef")


def to_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


# kind -> (what is done to the member file, a fragment of the reason given)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated to 0": (lambda p: os.truncate(p, 0), "is not a storaged pool member"),
    "truncated to half": (lambda p: os.truncate(p, DEV // 2), "is truncated"),
    "a directory": (to_directory, "Is a directory"),
    "garbled superblocks and journal": (garble_metadata, "no intact superblock"),
    "both labels bad": (bad_labels, "label checksum mismatch"),
    "EIO on every read": (lambda p: None, "injected I/O error"),
}


async def _tank(tmp_path: Path) -> tuple[Registry, list[Path], bytes, list[str]]:
    """A registry with pool 'tank' (ec:2+1 on three files) holding volume 'v' of random
    data, written and flushed (acknowledged), then closed; and the members' UUIDs."""
    reg = Registry(str(tmp_path / "state"))
    await reg.load()
    paths = [tmp_path / f"m{i}" for i in range(3)]
    entry = await reg.create("tank", [str(p) for p in paths], profile="ec:2+1",
                             extent_size=EXT, file_size=DEV, force=False)
    vol = await entry.volumes.create("v", VOL)
    data = random.Random(1).randbytes(VOL)
    await vol.write(0, data)
    await vol.flush()
    uuids = [m.uuid for m in entry.pool.statistics().members]
    await reg.close()
    return reg, paths, data, uuids


async def _assert_intact(entry: PoolEntry, data: bytes) -> None:
    """Invariant 1: every acknowledged byte reads back; the deep check is clean."""
    assert await entry.volumes.get("v").read(0, VOL) == data
    await assert_checks(entry.pool)


async def assert_checks(pool: Pool) -> None:
    """The deep check (every fragment of every present member) finds nothing wrong but
    members away (a degraded pool says so)."""
    report = await check(pool, deep=True)
    assert report.fragments_bad == 0 and report.records > 0
    assert all(p.endswith("the pool is degraded") for p in report.problems), report.problems


@pytest.mark.parametrize("kind", list(DAMAGE))
async def test_a_damaged_member_is_left_out_and_the_pool_imports_degraded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Issue 20 item 4, invariant 5: one member of an ec:2+1 pool damaged while the pool
    was down (each kind in DAMAGE) is left out of the import -- at start-up from
    pools.json (``Registry.load``) and by ``pool import --device`` naming all three --
    with the reason logged and in pool status under the member's last path and UUID; the
    pool imports degraded, every acknowledged byte reads back, the deep check is clean,
    writes go on, and replace-device naming the member by its last path rebuilds it."""
    reg, paths, data, uuids = await _tank(tmp_path)
    damage, reason = DAMAGE[kind]
    damage(paths[2])
    if kind.startswith("EIO"):
        real = FileDevice

        def opener(path: str, *, create_size: int | None = None, **kw: bool) -> Device:
            dev = real(path, create_size=create_size, **kw)
            if Path(path) != paths[2]:
                return dev
            bad = FaultyDevice(dev)
            bad.read_error_rate = 1.0
            return bad
        monkeypatch.setattr(registry_module, "FileDevice", opener)

    for how in ("start-up", "import --device"):
        reg = Registry(str(tmp_path / "state"))
        if how == "start-up":
            await reg.load()
            assert not reg.failed, reg.failed
        else:
            await reg.import_pool(None, [str(p) for p in paths])
        entry = reg.get("tank")
        try:
            st = pool_status(entry)
            assert st["state"] == "degraded"
            row = st["devices"][2]
            assert row["path"] == str(paths[2]) and row["state"] == "missing"
            assert reason in row["why"], row
            assert [d["path"] for d in st["devices"]] == [str(p) for p in paths]
            assert [d["uuid"] for d in st["devices"]] == uuids
            await _assert_intact(entry, data)
        finally:
            if how == "start-up":
                await reg.export("tank")
            else:
                await reg.close()

    # Writes go on degraded; then the member is replaced, named by its last path.
    monkeypatch.undo()
    reg = Registry(str(tmp_path / "state"))
    await reg.load()
    entry = reg.get("tank")
    try:
        fresh = random.Random(2).randbytes(1 << 20)
        vol = entry.volumes.get("v")
        await vol.write(1 << 20, fresh)
        await vol.flush()
        data = data[:1 << 20] + fresh + data[2 << 20:]
        index = await reg.replace_device("tank", str(paths[2]), str(tmp_path / "new"), DEV)
        assert index == 2
        await rebuild.run(entry.pool)
        st = pool_status(entry)
        assert st["state"] == "online" and st["devices"][2]["path"] == str(tmp_path / "new")
        await _assert_intact(entry, data)
    finally:
        await reg.close()


async def test_every_member_damaged_is_one_clear_error(tmp_path: Path) -> None:
    """Invariant 9: when no device given is usable, the import fails with each device's
    reason and nothing is imported."""
    reg, paths, _data, _uuids = await _tank(tmp_path)
    for p in paths:
        os.truncate(p, 0)
    reg = Registry(str(tmp_path / "state"))
    await reg.load()
    assert "tank" not in reg.pools
    why = reg.failed["tank"]
    assert "no device given is a usable pool member" in why
    assert all(str(p) in why for p in paths)


# ---- under a running pool ---------------------------------------------------------------

async def _faulted_within(pool: Pool, index: int, limit: float) -> float:
    start = time.monotonic()
    with trio.move_on_after(limit):
        while pool.member_state(index) != "faulted":  # noqa: ASYNC110 - polls the pool
            await trio.sleep(0.02)
    assert pool.member_state(index) == "faulted", pool.statistics().members[index]
    return time.monotonic() - start


@pytest.mark.parametrize("change", ["truncated to half", "deleted", "replaced by another file"])
async def test_a_member_that_shrinks_or_vanishes_is_faulted_within_seconds(
        disks: Disks, tmp_path: Path, change: str) -> None:
    """Issue 20 item 4, invariant 5: a member truncated, deleted or replaced under a
    running pool is faulted by the periodic check (0.3 s here; faults.check_interval)
    within a second; reads go on degraded byte-exact, writes go on, and the member, named
    by its last path, is replaced and rebuilt; the deep check is clean."""
    ds = disks(3, size=DEV)
    pool, data = await filled_pool(ds, "ec:2+1", SIZE)
    victim = ds.paths[1]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.watch_members, 0.3)
            if change == "truncated to half":
                os.truncate(victim, DEV // 2)
            else:
                victim.unlink()
                if change == "replaced by another file":
                    with victim.open("wb") as f:
                        f.truncate(DEV)
            took = await _faulted_within(pool, 1, 3.0)
            assert took < 1.5, took
            why = pool.statistics().members[1].why
            assert {"truncated to half": "shrank", "deleted": "is gone",
                    "replaced by another file": "another file"}[change] in why, why
            assert await read_all(pool, SIZE) == data
            vol = VolumeManager(pool).get("v")
            fresh = random.Random(3).randbytes(1 << 20)
            await vol.write(0, fresh)
            await vol.flush()
            data = fresh + data[1 << 20:]
            assert pool.member_index(str(victim)) == 1
            spare = tmp_path / "spare"
            await pool.replace_device(pool.member_index(str(victim)),
                                      FileDevice(str(spare), create_size=DEV))
            await rebuild.run(pool)
            assert pool.member_state(1) == "online"
            nursery.cancel_scope.cancel()
        assert await read_all(pool, SIZE) == data
        report = await check(pool, deep=True)
        assert report.ok, report.problems
    finally:
        await pool.close()


async def test_the_first_short_read_faults_a_shrunk_member_at_once(
        disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20 item 4: with the periodic check an hour away, a read that comes back
    short from a truncated member triggers the check: the member is faulted within a
    second of that read, which itself returned the right bytes (degraded)."""
    ds = disks(3, size=DEV)
    pool, data = await filled_pool(ds, "ec:2+1", SIZE,     # reads go to the devices
                                   tuning=PoolTuning(record_cache=0))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.watch_members, 3600.0)
            await trio.sleep(0.1)
            os.truncate(ds.paths[0], pool.layout.data_offset)   # every fragment cut
            assert pool.member_state(0) == "online"
            assert await read_all(pool, SIZE) == data
            took = await _faulted_within(pool, 0, 2.0)
            assert took < 1.0, took
            nursery.cancel_scope.cancel()
        assert await read_all(pool, SIZE) == data
    finally:
        await pool.close()


# ---- identity ---------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["symlink", "hard link"])
async def test_the_same_file_twice_is_refused_at_create_and_leaves_no_file(
        tmp_path: Path, link: str) -> None:
    """Issue 20 item 5, identity invariant 1: ``pool create r a.img <link to a.img>
    b.img`` is refused naming both paths -- files the create would have made are gone
    again, an existing a.img is byte-identical, and nothing is remembered."""
    reg = Registry(str(tmp_path / "state"))
    await reg.load()
    a, b, alias = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "alias.img"
    if link == "symlink":
        alias.symlink_to(a)            # dangling until a.img is created
    else:
        a.write_bytes(b"\x5a" * 4096)
        os.truncate(a, DEV)
        os.link(a, alias)
    before = a.read_bytes() if a.exists() else None
    with pytest.raises(InvalidArgument) as err:
        await reg.create("r", [str(a), str(alias), str(b)], profile="ec:2+1",
                         extent_size=EXT, file_size=DEV, force=False)
    assert f"{a} and {alias} are the same device" in err.value.message
    assert not b.exists()
    assert (a.read_bytes() if a.exists() else None) == before
    assert not reg.pools and not (tmp_path / "state" / "pools.json").exists()


async def test_a_member_under_another_path_is_refused_by_add_replace_and_spare(
        tmp_path: Path) -> None:
    """Identity invariant 1: add-device, replace-device and add-spare naming a current
    member by a symlink or a hard link are refused, naming the member; nothing changes
    (files byte-identical, the pool's members as they were, data and deep check)."""
    reg, paths, data, _uuids = await _tank(tmp_path)
    await reg.load()
    entry = reg.get("tank")
    sym, hard = tmp_path / "sym", tmp_path / "hard"
    sym.symlink_to(paths[0])
    os.link(paths[1], hard)
    try:
        await entry.pool.commit()
        before = [p.read_bytes() for p in paths]
        for alias, member in ((sym, 0), (hard, 1)):
            with pytest.raises(InvalidArgument, match=f"same device as member {member}"):
                await reg.add_device("tank", str(alias), None)
            with pytest.raises(InvalidArgument, match=f"same device as member {member}"):
                await reg.replace_device("tank", "2", str(alias), None)
            with pytest.raises(InvalidArgument, match=f"same device as member {member}"):
                await reg.add_spare("tank", str(alias), None)
        assert [p.read_bytes() for p in paths] == before
        assert [m.state for m in entry.pool.statistics().members] == ["online"] * 3
        assert entry.devices == [str(p) for p in paths] and not entry.spares
        await _assert_intact(entry, data)
    finally:
        await reg.close()


async def test_an_import_takes_a_device_named_twice_once(tmp_path: Path) -> None:
    """Identity invariant 1 at import: ``pool import --device`` given a member and a
    symlink to it imports the member once (the alias is left out, shown in status), the
    pool is online, the data byte-exact and the deep check clean."""
    reg, paths, data, _uuids = await _tank(tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(paths[0])
    reg = Registry(str(tmp_path / "state"))
    await reg.load()
    await reg.export("tank")
    entry = await reg.import_pool(None, [str(alias), *map(str, paths)])
    try:
        st = pool_status(entry)
        assert st["state"] == "online"
        assert st["left_out"] == {str(paths[0]): f"the same device as {alias}"}
        assert [d["path"] for d in st["devices"]] == [str(alias), *map(str, paths[1:])]
        await _assert_intact(entry, data)
    finally:
        await reg.close()


# ---- naming members ---------------------------------------------------------------------

async def _nothing(done: int, total: int) -> None:
    return None


async def test_a_lost_members_last_path_survives_restarts_and_names_it(
        tmp_path: Path) -> None:
    """Issue 21 "members named right": a member taken offline and moved, then one whose
    file is deleted, keep their paths and UUIDs in status (no row shows another member's
    path) across restarts (the path is in the pool's metadata, MemberInfo.path);
    online, replace-device and remove-device accept that last path; online --path
    records the member's new path."""
    reg, paths, data, uuids = await _tank(tmp_path)
    await reg.load()
    entry = reg.get("tank")
    await entry.pool.offline(entry.pool.member_index(str(paths[2])))
    await reg.close()
    moved = tmp_path / "moved2"
    paths[2].rename(moved)

    async def rows() -> list[tuple[str, str, str]]:
        reg = Registry(str(tmp_path / "state"))
        await reg.load()
        try:
            return [(r["path"], r["state"], r["uuid"])
                    for r in pool_status(reg.get("tank"))["devices"]]
        finally:
            await reg.close()
    assert await rows() == [(str(paths[0]), "online", uuids[0]),
                            (str(paths[1]), "online", uuids[1]),
                            (str(paths[2]), "offline", uuids[2])]
    reg = Registry(str(tmp_path / "state"))
    await reg.load()
    entry = reg.get("tank")
    assert await reg.online("tank", str(paths[2]), str(moved)) == 2
    await rebuild.run(entry.pool)
    paths[1].unlink()
    await entry.pool.watch_presence()
    await reg.close()
    for _ in range(2):
        assert await rows() == [(str(paths[0]), "online", uuids[0]),
                                (str(paths[1]), "faulted", uuids[1]),
                                (str(moved), "online", uuids[2])]
    reg = Registry(str(tmp_path / "state"))
    await reg.load()
    entry = reg.get("tank")
    try:
        assert await reg.replace_device("tank", str(paths[1]), str(tmp_path / "new1"),
                                        DEV) == 1
        await rebuild.run(entry.pool)
        # A fourth member, lost, is removed by its last path.
        extra = tmp_path / "extra"
        await reg.add_device("tank", str(extra), DEV)
        vol = entry.volumes.get("v")
        fresh = random.Random(4).randbytes(VOL)
        await vol.write(0, fresh)
        await vol.flush()
        data = fresh
        extra.unlink()
        await entry.pool.watch_presence()
        assert await reg.remove_device("tank", str(extra), _nothing) == 3
        st = pool_status(entry)
        assert [(r["path"], r["state"]) for r in st["devices"]] == [
            (str(paths[0]), "online"), (str(tmp_path / "new1"), "online"),
            (str(moved), "online"), (str(extra), "removed")]
        await _assert_intact(entry, data)
    finally:
        await reg.close()


# ---- the real daemon ----------------------------------------------------------------------

def _deep_check_clean(daemon: Daemon, name: str) -> None:
    r = daemon.json("pool", "check", name, "--deep")
    assert isinstance(r, dict) and r["records"] > 0 and r["fragments_bad"] == 0, r
    assert all(p.endswith("the pool is degraded") for p in r["problems"]), r


def _status(daemon: Daemon, name: str) -> dict[str, Any]:
    st = daemon.json("pool", "status", name)
    assert isinstance(st, dict)
    return st


def test_a_bad_member_at_daemon_start_leaves_its_pool_degraded(daemon: Daemon,
                                                              tmp_path: Path) -> None:
    """Issue 20 item 4 through the real daemon: four ec:2+1 pools, data written and
    flushed over NBD, SIGTERM; then one member of each is damaged a different way
    (truncated to 0, to half, replaced by a directory, superblocks and journal garbled);
    after the start every pool is degraded (not unavailable), pool status -- JSON and
    text -- shows the member under its last path and UUID with the reason, every byte
    reads back over NBD and the deep check finds nothing but the missing member."""
    kinds = ["truncated to 0", "truncated to half", "a directory",
             "garbled superblocks and journal"]
    files = {}
    for i, _kind in enumerate(kinds):
        name = f"p{i}"
        files[name] = [tmp_path / f"{name}m{j}" for j in range(3)]
        daemon.ok("pool", "create", name, *map(str, files[name]), "--profile", "ec:2+1",
                  "--file-size", "64M", "--extent-size", "4M")
        daemon.ok("volume", "create", f"{name}/v", "--size", "4M")
        _qemu_io(daemon.url(f"{name}/v"), f"write -P {0x31 + i} 0 4M", "flush")
    uuids = {n: [d["uuid"] for d in _status(daemon, n)["devices"]] for n in files}
    assert daemon.stop(signal.SIGTERM) == 0
    for i, kind in enumerate(kinds):
        DAMAGE[kind][0](files[f"p{i}"][2])
    daemon.start()
    for i, kind in enumerate(kinds):
        name = f"p{i}"
        st = _status(daemon, name)
        assert st["state"] == "degraded", st
        assert [d["path"] for d in st["devices"]] == [str(p) for p in files[name]]
        assert [d["uuid"] for d in st["devices"]] == uuids[name]
        row = st["devices"][2]
        assert row["state"] == "missing" and DAMAGE[kind][1] in row["why"], row
        text = daemon.ok("pool", "status", name)
        assert f"member 2 ({files[name][2]}) missing: left out at import" in text, text
        _qemu_io(daemon.url(f"{name}/v"), f"read -P {0x31 + i} 0 4M")
        _deep_check_clean(daemon, name)
    assert "left out of the import" in daemon.log()


def test_members_by_identity_shrink_under_the_daemon_and_replace_by_last_path(
        daemon: Daemon, tmp_path: Path) -> None:
    """Issue 20 items 4-5 and issue 21 through the real daemon and storagectl:
    - ``pool create r a.img <symlink to a.img> b.img`` is refused in one line and leaves
      no file behind;
    - add-device and replace-device naming a member by a symlink or hard link are refused
      and change nothing;
    - a member truncated under the running daemon is faulted within the check interval
      (2 s) and shows its last path; reads and writes go on over NBD;
    - replace-device naming it by that path rebuilds it; after a restart the pool is
      online, the data byte-exact and the deep check clean."""
    a, b, alias = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "alias.img"
    alias.symlink_to(a)
    r = daemon.ctl("pool", "create", "r", str(a), str(alias), str(b), "--profile",
                   "ec:2+1", "--file-size", "64M")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{a} and {alias} are the same device" in r.stderr
    assert not a.exists() and not b.exists()
    assert daemon.json("pool", "list") == []

    m = [tmp_path / f"m{i}" for i in range(3)]
    daemon.ok("pool", "create", "tank", *map(str, m), "--profile", "ec:2+1",
              "--file-size", "64M", "--extent-size", "4M")
    daemon.ok("volume", "create", "tank/v", "--size", "8M")
    url = daemon.url("tank/v")
    _qemu_io(url, "write -P 0x5a 0 8M", "flush")
    before = _status(daemon, "tank")
    sym, hard = tmp_path / "sym", tmp_path / "hard"
    sym.symlink_to(m[0])
    os.link(m[1], hard)
    for args, member in ((("add-device", "tank", str(sym)), 0),
                         (("replace-device", "tank", "2", str(hard)), 1)):
        r = daemon.ctl("pool", *args)
        assert r.returncode == 1 and f"same device as member {member}" in r.stderr, r.stderr
    after = _status(daemon, "tank")
    assert after["devices"] == before["devices"] and after["state"] == "online"
    hard.unlink()

    uuid1 = before["devices"][1]["uuid"]
    os.truncate(m[1], 16 << 20)
    start = time.monotonic()
    while _status(daemon, "tank")["devices"][1]["state"] != "faulted":
        assert time.monotonic() - start < 10, daemon.log()
        time.sleep(0.1)
    took = time.monotonic() - start
    assert took < 4.0, took                     # faults.check_interval is 2 s
    row = _status(daemon, "tank")["devices"][1]
    assert (row["path"], row["uuid"]) == (str(m[1]), uuid1) and "shrank" in row["why"]
    assert f"member 1 ({m[1]}) faulted: " in daemon.ok("pool", "status", "tank")
    _qemu_io(url, "read -P 0x5a 0 8M", "write -P 0x6b 1M 1M", "flush")
    daemon.ok("pool", "replace-device", "tank", str(m[1]), str(tmp_path / "new1"),
              "--file-size", "64M", "--wait")
    assert daemon.stop(signal.SIGTERM) == 0
    daemon.start()
    st = _status(daemon, "tank")
    assert st["state"] == "online", st
    assert [d["path"] for d in st["devices"]] == [str(m[0]), str(tmp_path / "new1"),
                                                  str(m[2])]
    _qemu_io(url, "read -P 0x5a 0 1M", "read -P 0x6b 1M 1M", "read -P 0x5a 2M 6M")
    report = daemon.json("pool", "check", "tank", "--deep")
    assert isinstance(report, dict) and report["ok"] and report["fragments_bad"] == 0
