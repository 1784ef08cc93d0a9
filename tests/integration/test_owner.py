"""One owner per pool (issue 21; DESIGN invariant 10; pool.owner invariants 1-4).

In-process (real files): a member held exclusively cannot be opened again; the owner
record's heartbeat is seen moving by a watcher that holds no lock (where flock does not
reach: another host on a shared LUN), and stops being seen once the owner is silent; an
owner whose pool was taken over stops all I/O at its next heartbeat.
End to end (real daemons, storagectl, qemu-io): a stray ``pool import`` changes nothing; two
daemons racing to import the same members: exactly one wins; create --force never over a
live member; a killed owner's pool is refused without --force and taken over with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from pool import Device, FileDevice, Pool
from pool import owner as owners
from pool.deadlines import Deadlines
from pool.errors import Busy, DeviceBusy, PoolFailed
from storaged import registry
from tests.conftest import DiskSet
from tests.kit.daemonkit import BIN, Daemon, _free_port, _qemu_io, member_digests
from volumes import VolumeManager

Disks = Callable[..., DiskSet]
EXT = 1 << 20
A = owners.Owner("hostid-a", "host-a", "instance-a", 1111)
B = owners.Owner("hostid-b", "host-b", "instance-b", 2222)


# ---- in process ---------------------------------------------------------------------------
def test_a_member_held_exclusively_cannot_be_opened_again(tmp_path: Path) -> None:
    """Invariant 10: an exclusive FileDevice holds an flock; a second exclusive open of
    the same file (same process: another open file description) is refused, and works
    again once the first is closed. Plain opens (tools, tests) are not affected."""
    path = str(tmp_path / "d0")
    first = FileDevice(path, create_size=1 << 20, exclusive=True)
    with pytest.raises(DeviceBusy, match="in use"):
        FileDevice(path, exclusive=True)
    pid = owners.lock_holder(path)
    assert pid == os.getpid()
    FileDevice(path, read_only=True).close()
    first.close()
    assert owners.lock_holder(path) is None
    FileDevice(path, exclusive=True).close()


def test_owner_records_round_trip_and_assess() -> None:
    """Module invariants 1 and 2: zeros mean no owner; the newest record decides; ours
    is not another owner; a record of another pool is ignored."""
    rec = owners.Claim(A, 0.5, 2.0).record("u1", 7)
    assert owners.OwnerRecord.decode(rec.encode()) == rec
    assert owners.OwnerRecord.decode(bytes(owners.OWNER_SIZE)) is None
    newer = owners.Claim(B, 0.5, 2.0).record("u1", 8)
    assert owners.assess([rec, newer, None], "u1", A).record == newer
    assert owners.assess([rec, None], "u1", A).mine
    assert owners.assess([newer], "u2", A).record is None


async def _beating(disks: Disks, claim: owners.Claim) -> tuple[DiskSet, Pool]:
    ds = disks(3, 16 << 20)
    pool = await Pool.create("tank", ds.create(), profile="ec:2+1", extent_size=EXT,
                             claim=claim)
    return ds, pool


async def test_a_moving_heartbeat_refuses_a_watcher_and_a_silent_one_does_not(
        disks: Disks) -> None:
    """Invariant 10 where flock does not reach (module invariant 3): a watcher reading
    the members through its own, unlocked descriptors sees the heartbeat move within the
    activity interval and refuses (Busy, naming the owner's host and pid); once the owner
    stops beating, a watch of one activity interval passes."""
    claim = owners.Claim(A, 0.05, 0.4)
    ds, pool = await _beating(disks, claim)
    others = [FileDevice(str(p), read_only=True) for p in ds.paths]
    rec = owners.read_record(others[0])
    assert rec is not None and rec.owner == A and rec.pool_uuid == pool.uuid
    async with trio.open_nursery() as nursery:
        async def beat() -> None:
            while True:
                await trio.sleep(claim.interval)
                await pool.heartbeat()
        nursery.start_soon(beat)
        with pytest.raises(Busy, match=r"host-a.*pid 1111"):
            await trio.to_thread.run_sync(owners.watch, others, rec, "tank")
        nursery.cancel_scope.cancel()
    silent = owners.read_record(others[0])
    assert silent is not None and silent.seq > rec.seq
    t0 = time.monotonic()
    await trio.to_thread.run_sync(owners.watch, others, silent, "tank")
    assert time.monotonic() - t0 >= claim.activity
    for d in others:
        d.close()
    await pool.close(release=True)
    cleared = FileDevice(str(ds.paths[0]), read_only=True)
    assert owners.read_record(cleared) is None      # export clears the record
    cleared.close()


async def test_an_owner_taken_over_stops_all_io_at_its_next_heartbeat(disks: Disks) -> None:
    """Invariant 10 (a hung owner that wakes up cannot write on): when another daemon's
    record is found on the members at a sequence no lower than ours (a taker continues
    after the highest it found), the old owner's pool fails and refuses writes. A lower
    one (an earlier owner's record on a member that was away) is only overwritten
    (module invariant 6, OwnerKeeper.heartbeat)."""
    ds, pool = await _beating(disks, owners.Claim(A, 0.05, 0.4))
    vm = VolumeManager(pool)
    vol = await vm.create("v", 1 << 20, block_size=64 << 10)
    away = FileDevice(str(ds.paths[2]))
    owners.write_record(away, owners.Claim(B, 0.05, 0.4).record(pool.uuid, 0))
    await pool.heartbeat()
    back = owners.read_record(away)
    assert back is not None and back.owner == A
    away.close()
    await vol.write(0, b"y" * 4096)
    await vol.flush()
    other = [FileDevice(str(p), read_only=False) for p in ds.paths]
    taker = owners.Claim(B, 0.05, 0.4).record(pool.uuid, 100)
    for d in other:
        owners.write_record(d, taker)
        d.close()
    await pool.heartbeat()
    with pytest.raises(PoolFailed, match="taken over by host host-b"):
        await vol.write(0, b"x" * 4096)
        await vol.flush()
    await pool.close()


async def test_create_force_refuses_a_member_whose_owner_beats(disks: Disks) -> None:
    """``pool create --force`` where flock does not reach: a device whose owner record
    names another daemon with a fresh heartbeat is refused without a write; once that
    owner has been silent for its activity interval, the check lets it through."""
    claim = owners.Claim(A, 0.05, 1.0)
    ds, pool = await _beating(disks, claim)
    await pool.heartbeat()
    probe: list[Device] = [FileDevice(str(ds.paths[0]))]
    before = ds.digests()
    with pytest.raises(Busy, match=r"member 0 of pool 'tank', active on another daemon"):
        await trio.to_thread.run_sync(registry._refuse_live_owner, probe, B,
                                  Deadlines())
    assert ds.digests() == before
    await trio.sleep(claim.activity)          # the owner stays silent (hung, or gone)
    await trio.to_thread.run_sync(registry._refuse_live_owner, probe, B,
                                  Deadlines())
    probe[0].close()
    await pool.close()


async def test_an_owner_silent_past_half_its_interval_confirms_before_writing(
        disks: Disks) -> None:
    """Invariant 10 (a hung owner that wakes up cannot write): an owner whose last beat
    is older than half its activity interval (stopped, starved) confirms ownership before
    its next data write; finding the pool taken over meanwhile, it fails and writes
    nothing at all (members byte-identical but for the owner block). While it is still
    the owner, the confirmation is only a beat and the write goes through (module
    invariant 5, OwnerKeeper.confirm)."""
    claim = owners.Claim(A, 60.0, 0.2)        # no heartbeat task: the daemon is "stopped"
    ds, pool = await _beating(disks, claim)
    vol = await VolumeManager(pool).create("v", 1 << 20, block_size=64 << 10)
    await vol.flush()
    seq = pool.owner.seq if pool.owner else 0
    await trio.sleep(claim.activity)
    await vol.write(0, b"a" * 65536)
    await vol.flush()                          # confirmed by a beat, then written
    # (a beat at least: on a loaded machine the commit may pass the half interval again)
    assert pool.owner is not None and pool.owner.seq >= seq + 1
    await trio.sleep(claim.activity)
    taker = owners.Claim(B, 0.05, 0.2).record(pool.uuid, 1000)
    for p in ds.paths:
        d = FileDevice(str(p))
        owners.write_record(d, taker)
        d.close()
    before = member_digests(ds.paths)
    await vol.write(65536, b"b" * 65536)       # buffered in memory
    with pytest.raises(PoolFailed, match="taken over by host host-b"):
        await vol.flush()
    assert member_digests(ds.paths) == before
    await pool.close()


async def test_a_released_record_is_cleared_and_no_beat_follows(disks: Disks) -> None:
    """Module invariant 7 (an export): releasing with ``clear`` zeroes the record on every
    member, and a heartbeat after that writes nothing; the pool has no owner."""
    ds, pool = await _beating(disks, owners.Claim(A, 0.05, 0.4))
    await pool.heartbeat()
    assert pool.owner is not None and pool.owner.seq == 2
    await pool.owner_keeper.release(clear=True)
    before = member_digests(ds.paths)
    await pool.heartbeat()
    assert pool.owner is None and member_digests(ds.paths) == before
    for p in ds.paths:
        d = FileDevice(str(p))
        assert owners.read_record(d) is None
        d.close()
    await pool.close()


# ---- end to end ---------------------------------------------------------------------------
def _start(directory: Path, *args: str) -> Daemon:
    directory.mkdir(exist_ok=True)
    cfg = directory / "storaged.toml"
    cfg.write_text("[owner]\nheartbeat = 0.1\nactivity = 1.0\n")
    d = Daemon(directory, str(directory / "ctl.sock"), _free_port(), 0,
               args=("--config", str(cfg), *args))
    d.start()
    return d


def _devs(paths: list[Path]) -> list[str]:
    return [a for p in paths for a in ("--device", str(p))]


def _tank(d: Daemon, paths: list[Path]) -> None:
    d.ok("pool", "create", "tank", *map(str, paths), "--profile", "ec:2+1",
         "--extent-size", "1M", "--file-size", "32M")
    d.ok("volume", "create", "tank/v", "--size", "4M")
    _qemu_io(d.url("tank/v"), "write -P 0x5a 0 1M", "write -P 0xa5 2M 64k", "flush")


def _intact(d: Daemon) -> None:
    _qemu_io(d.url("tank/v"), "read -P 0x5a 0 1M", "read -P 0xa5 2M 64k",
             "read -P 0 1M 1M", read_only=True)
    check = d.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check


def test_a_stray_import_changes_nothing(tmp_path: Path) -> None:
    """The first scenario of issue 21: with the demo pool live, `pool import` (no name)
    lists it as imported here and writes nothing (members byte-identical but for the
    heartbeat's owner block); a named import of it is refused before any device is opened;
    the pool still serves, and export + import + deep check come back clean."""
    d = _start(tmp_path / "a", "--demo")
    try:
        demo = [tmp_path / "a" / "state" / f"demo-disk{i}.img" for i in range(3)]
        _qemu_io(d.url("demo/disk0"), "write -P 0x42 0 1M", "flush")
        before = member_digests(demo)
        listed = d.json("pool", "import")
        assert isinstance(listed, list) and len(listed) == 1, listed
        (entry,) = listed
        assert entry["name"] == "demo" and entry["state"] == "online"
        assert entry["missing"] == [] and len(entry["found"]) == 3
        assert "imported by this daemon" in entry["owner"] and not entry["importable"]
        text = d.ok("pool", "import")
        assert "pool: demo" in text and "3 of 3 members found" in text
        r = d.ctl("pool", "import", "demo")
        assert r.returncode == 1 and "already imported" in r.stderr
        r = d.ctl("pool", "import", "other", *_devs(demo))
        assert r.returncode == 1 and "imported by this daemon" in r.stderr, r.stderr
        assert member_digests(demo) == before
        _qemu_io(d.url("demo/disk0"), "read -P 0x42 0 1M")
        d.ok("pool", "export", "demo")
        listed = d.json("pool", "import")
        assert isinstance(listed, list) and listed[0]["owner"] == "exported"
        assert listed[0]["importable"]
        d.ok("pool", "import", "demo")
        _qemu_io(d.url("demo/disk0"), "read -P 0x42 0 1M")
        check = d.json("pool", "check", "demo", "--deep")
        assert isinstance(check, dict) and check["ok"], check
    finally:
        if d.proc is not None:
            d.stop()


def test_two_daemons_racing_to_import_one_wins(tmp_path: Path) -> None:
    """Invariant 10: two daemons (separate state directories) import the same members at
    once: exactly one wins; the loser gets a one-line error naming the pool and the
    holder, and its later import and create --force over a live member are refused too,
    changing nothing; the winner's data is intact. Once the winner exports, create
    --force over the exported pool's member is allowed."""
    disks = [tmp_path / f"m{i}" for i in range(3)]
    a, b = _start(tmp_path / "a"), _start(tmp_path / "b")
    try:
        _tank(a, disks)
        a.ok("pool", "export", "tank")
        # In opposite orders: members are locked in one order whatever the order given.
        procs = [subprocess.Popen([*_ctl(x), "pool", "import", "tank", *_devs(order)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for x, order in ((a, disks), (b, disks[::-1]))]
        results = [(*p.communicate(timeout=60), p.returncode) for p in procs]
        winners = [x for x, (_, _, rc) in zip((a, b), results, strict=True) if rc == 0]
        assert len(winners) == 1, results
        win, lose = winners[0], (b if winners[0] is a else a)
        err = next(e for _, e, rc in results if rc != 0)
        assert len(err.strip().splitlines()) == 1, err
        assert "tank" in err and ("in use" in err or "active" in err), err
        assert lose.json("pool", "list") == []
        _intact(win)
        before = member_digests(disks)
        r = lose.ctl("pool", "import", "tank", *_devs(disks), "--force")
        assert r.returncode == 1 and "in use" in r.stderr and "pool 'tank'" in r.stderr
        r = lose.ctl("pool", "create", "x", str(disks[0]), "--force")
        assert r.returncode == 1 and "in use" in r.stderr, r.stderr
        r = win.ctl("pool", "create", "y", str(disks[1]), "--force")
        assert r.returncode == 1 and "imported by this daemon" in r.stderr, r.stderr
        assert member_digests(disks) == before
        _intact(win)
        win.ok("pool", "export", "tank")
        lose.ok("pool", "create", "x", str(disks[0]), "--force")
        pools = lose.json("pool", "list")
        assert isinstance(pools, list) and [p["name"] for p in pools] == ["x"]
    finally:
        for x in (a, b):
            if x.proc is not None:
                x.stop()


def _ctl(d: Daemon) -> list[str]:
    return [str(BIN / "storagectl"), "--socket", d.sock]


def test_a_killed_owners_pool_needs_force_and_is_taken_over(tmp_path: Path) -> None:
    """Invariant 10 across daemons: after kill -9 of the owner, the flock is gone but its
    owner record stays; another daemon's import is refused without --force (naming the
    old owner's pid, changing nothing, not even the owner block); with --force it watches
    the heartbeat for the activity interval, takes the pool over and says so; the data
    is intact, and the old owner, restarted, no longer imports the pool (it says who has
    it)."""
    disks = [tmp_path / f"m{i}" for i in range(3)]
    a, b = _start(tmp_path / "a"), _start(tmp_path / "b")
    try:
        _tank(a, disks)
        assert a.proc is not None
        old_pid = a.proc.pid
        a.stop(signal.SIGKILL)
        before = member_digests(disks, mask_owner=False)
        r = b.ctl("pool", "import", "tank", *_devs(disks))
        assert r.returncode == 1 and f"pid {old_pid}" in r.stderr, r.stderr
        assert "--force" in r.stderr or "active" in r.stderr
        listed = b.json("pool", "import", *_devs(disks[:2]))
        assert isinstance(listed, list) and listed[0]["state"] == "degraded", listed
        assert listed[0]["missing"] == [2] and listed[0]["members"] == 3
        assert f"pid {old_pid}" in listed[0]["owner"] and not listed[0]["importable"]
        assert member_digests(disks, mask_owner=False) == before
        assert b.json("pool", "list") == []
        t0 = time.monotonic()
        out = b.ok("pool", "import", "tank", *_devs(disks), "--force")
        assert time.monotonic() - t0 >= 1.0            # watched one activity interval
        assert "took over pool tank from host" in out and f"pid {old_pid}" in out, out
        _intact(b)
        a.start()
        pools = a.json("pool", "list")
        assert isinstance(pools, list) and pools[0]["state"] == "unavailable"
        assert b.proc is not None
        assert "in use: member 0 of pool 'tank'" in pools[0]["error"], pools
        assert f"pid {b.proc.pid}" in pools[0]["error"], pools
        _intact(b)
    finally:
        for x in (a, b):
            if x.proc is not None:
                x.stop()
