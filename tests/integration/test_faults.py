"""Failing disks (issue 9; DESIGN §5, invariants 4 and 5).

- The real daemon: an ec:4+2 pool on 6 files serving NBD; a device file deleted under it
  is faulted, I/O goes on degraded and byte-exact; replace-device rebuilds onto a new file
  (progress to 100%, state online); then two other device files go and every byte still
  reads back. The scrub over storagectl finds nothing on a healthy pool.
- The error-injecting device wrapper: intermittent EIO on reads and on writes is absorbed
  by redundancy and counted, and a member reaching the threshold is faulted; short reads
  are errors, never data.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from pool import Pool, rebuild
from pool.errors import InvalidArgument, StorageError
from pool.faults import FaultyDevice
from pool.tuning import PoolTuning
from storaged.config import load
from tests.conftest import DiskSet
from tests.kit.daemonkit import Daemon
from tests.kit.poolkit import corrupt, filled_pool, fragments, read_all
from volumes import VolumeManager

Disks = Callable[..., DiskSet]
SIZE = 4 << 20


def _status(d: Daemon) -> dict[str, object]:
    out = d.json("pool", "status", "f")
    assert isinstance(out, dict)
    return out


def _devices(d: Daemon) -> list[dict[str, object]]:
    devs = _status(d)["devices"]
    assert isinstance(devs, list)
    return devs


def _until(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _nbdcopy(src: str, dst: str) -> None:
    subprocess.run(["nbdcopy", src, dst], check=True, timeout=60, capture_output=True)


def test_lose_a_device_under_io_replace_it_then_lose_two_more(daemon: Daemon,
                                                              tmp_path: Path) -> None:
    d = daemon
    files = [tmp_path / f"dev{i}" for i in range(6)]
    d.ok("pool", "create", "f", *map(str, files), "--profile", "ec:4+2", "--extent-size",
         "1M", "--file-size", "48M")
    d.ok("volume", "create", "f/v", "--size", "8M", "--compression", "off")
    data = bytearray(random.Random(1).randbytes(8 << 20))
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(data)
    _nbdcopy(str(src), d.url("f/v"))
    os.unlink(files[2])                                   # the disk is pulled
    _until(lambda: _devices(d)[2]["state"] == "faulted", "member 2 to be faulted")
    st = _status(d)
    assert st["state"] == "degraded", st
    # I/O goes on, degraded: new writes and reads, byte-exact.
    piece = random.Random(2).randbytes(1 << 20)
    (tmp_path / "piece.img").write_bytes(piece)
    data[3 << 20:4 << 20] = piece
    src.write_bytes(data)
    _nbdcopy(str(src), d.url("f/v"))
    _nbdcopy(d.url("f/v"), str(back))
    assert back.read_bytes() == bytes(data)
    new = tmp_path / "new2"
    out = json.loads(d.ok("--json", "pool", "replace-device", "f", "2", str(new),
                          "--file-size", "48M", "--wait"))
    assert out["replaced_member"] == 2
    _until(lambda: _status(d)["state"] == "online", "the pool to be online again")
    devs = _devices(d)
    assert [x["state"] for x in devs] == ["online"] * 6, devs
    assert devs[2]["path"] == str(new)
    assert "rebuild" in d.ok("pool", "status", "f") or _status(d)["rebuild"] is None
    # Full redundancy again: two other devices can go.
    os.unlink(files[0])
    os.unlink(files[5])
    _until(lambda: sum(x["state"] == "faulted" for x in _devices(d)) == 2,
           "members 0 and 5 to be faulted")
    back.unlink()
    _nbdcopy(d.url("f/v"), str(back))
    assert back.read_bytes() == bytes(data)


def test_scrub_over_the_cli(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    files = [tmp_path / f"dev{i}" for i in range(3)]
    d.ok("pool", "create", "f", *map(str, files), "--profile", "ec:2+1", "--extent-size",
         "1M", "--file-size", "32M")
    d.ok("volume", "create", "f/v", "--size", "4M")
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(3).randbytes(4 << 20))
    _nbdcopy(str(src), d.url("f/v"))
    out = json.loads(d.ok("--json", "pool", "scrub", "f", "--wait"))
    s = out["scrub"]
    assert s["state"] == "finished" and s["found"] == 0 and s["unrecoverable"] == 0, s
    assert "scrub finished" in d.ok("pool", "status", "f")
    r = d.ctl("pool", "scrub", "f", "--pause")
    assert r.returncode == 1 and "no scrub to pause" in r.stderr, r.stderr


async def test_intermittent_eio_is_absorbed_counted_then_faults(disks: Disks) -> None:
    ds = disks(6)
    pool, data = await filled_pool(ds, "ec:4+2", SIZE)
    await pool.close()
    devs = ds.open()
    flaky = FaultyDevice(devs[1], seed=3)
    writes = FaultyDevice(devs[4], seed=4)
    pool = await Pool.open([devs[0], flaky, devs[2], devs[3], writes, devs[5]])
    try:
        pool.member_health.threshold = 1000
        flaky.read_error_rate = 0.3
        writes.write_error_rate = 0.3
        assert await read_all(pool, SIZE) == data
        st = pool.statistics().members
        assert st[1].read_errors > 0 and st[1].state == "online"
        vol = VolumeManager(pool).get("v")
        piece = random.Random(5).randbytes(1 << 20)
        for i in range(4):
            await vol.write(i * (1 << 20), piece)
            await vol.flush()
        data = piece * 4
        assert await read_all(pool, SIZE) == data
        assert pool.statistics().members[4].write_errors > 0
        pool.member_health.threshold = 3
        flaky.read_error_rate = 1.0
        pool.record_cache.clear()   # (the record cache would serve the blocks without I/O)
        assert await read_all(pool, SIZE) == data
        assert pool.statistics().members[1].state == "faulted"
    finally:
        flaky.read_error_rate = writes.write_error_rate = 0.0
        await pool.close()
    pool = await Pool.open(ds.open())
    try:
        assert await read_all(pool, SIZE) == data
    finally:
        await pool.close()


async def test_short_reads_are_errors_never_data(disks: Disks) -> None:
    ds = disks(3)
    pool, data = await filled_pool(ds, "ec:2+1", SIZE)
    await pool.close()
    devs = ds.open()
    short = FaultyDevice(devs[0], seed=6)
    pool = await Pool.open([short, devs[1], devs[2]])
    try:
        pool.member_health.threshold = 10_000
        short.short_read_rate = 0.5
        assert await read_all(pool, SIZE) == data
        assert short.injected_errors > 0
        assert pool.statistics().members[0].read_errors > 0
    finally:
        short.short_read_rate = 0.0
        await pool.close()


async def test_a_member_that_hangs_is_left_out_of_an_import(
        disks: Disks) -> None:
    """Metadata reads have the read deadline too: an import given a member whose reads
    stop answering does not wait for it. The member is left out (missing), the pool
    imports degraded and serves everything from the others; the member, answering again,
    comes back at the next import."""
    ds = disks(3)
    pool, data = await filled_pool(ds, "ec:2+1", SIZE)
    await pool.close()
    devs = ds.open()
    hung = FaultyDevice(devs[0], seed=7)
    hung.read_delay = 4.0               # far longer than the timeout: a hang
    try:
        with trio.fail_after(3.5):      # imported before the device would have answered
            pool = await Pool.open([hung, devs[1], devs[2]],
                                   tuning=PoolTuning(read_timeout=0.2))
            st = pool.statistics()
            assert st.state == "degraded"
            assert [m.index for m in st.members if m.state == "missing"] == [0]
            assert await read_all(pool, SIZE) == data
        await pool.close()
    finally:
        hung.read_delay = 0.0
    await trio.sleep(4.0)               # the stuck reads return
    pool = await Pool.open(ds.open())
    try:
        assert pool.statistics().state == "online"
        assert await read_all(pool, SIZE) == data
    finally:
        await pool.close()


@asynccontextmanager
async def _writes_hang_on_member_0(ds: DiskSet, profile: str
                                   ) -> AsyncIterator[tuple[Pool, bytes]]:
    """A filled pool (and its data) re-opened with member 0 hanging on every write and
    sync: 2 s against a write timeout of 0.2 s. Closed once the given-up calls returned."""
    pool, data = await filled_pool(ds, profile, SIZE)
    await pool.close()
    devs = ds.open()
    hung = FaultyDevice(devs[0], seed=7)
    pool = await Pool.open([hung, *devs[1:]])
    pool.deadlines.write = 0.2
    hung.write_delay = 2.0
    try:
        yield pool, data
    finally:
        await trio.sleep(2.5)
        await pool.close()


async def _read_reimported(ds: DiskSet) -> bytes:
    pool = await Pool.open(ds.open())
    try:
        return await read_all(pool, SIZE)
    finally:
        await pool.close()


async def test_a_member_whose_writes_hang_is_faulted_and_writes_go_on(
        disks: Disks) -> None:
    """A member whose writes and syncs stop answering: the first one is given up after
    the write timeout and the member is faulted at once (for a full rebuild), so flushes
    go on degraded from the others instead of waiting for it; what they wrote reads back,
    also after a re-import with the member answering again."""
    ds = disks(3)
    async with _writes_hang_on_member_0(ds, "ec:2+1") as (pool, data):
        new = random.Random(5).randbytes(SIZE // 2)
        expect = new + data[len(new):-4096] + bytes(4096)
        vol = VolumeManager(pool).get("v")
        with trio.fail_after(1.8):      # done before the device would have answered
            await vol.write(0, new)
            await vol.flush()
            await vol.write(SIZE - 4096, bytes(4096))   # and again, without waiting
            await vol.flush()
        st = pool.statistics()
        assert st.state == "degraded"
        assert [m.state for m in st.members] == ["faulted", "online", "online"]
        assert await read_all(pool, SIZE) == expect
    assert await _read_reimported(ds) == expect


async def test_a_hung_member_is_replaced_without_waiting_for_it(
        disks: Disks) -> None:
    """Replacing the member that hung (the usual reason to replace one): wiping the old
    device's label is given up after the write timeout instead of holding the replace,
    and the new device is rebuilt and reads back byte-exact."""
    ds = disks(3)
    async with _writes_hang_on_member_0(ds, "ec:2+1") as (pool, data):
        vol = VolumeManager(pool).get("v")
        await vol.write(0, data[:4096])
        await vol.flush()                   # member 0 is given up and faulted
        assert pool.statistics().members[0].state == "faulted"
        spares = disks(1, prefix="spare")
        started = time.monotonic()
        await pool.replace_device(0, spares.create()[0])
        # A thread's wait is not cancellable (fail_after would only fire after it): timed.
        assert time.monotonic() - started < 1.5     # its wipe alone would take 8 s
        assert pool.statistics().members[0].state == "rebuilding"
        await rebuild.run(pool)
        assert [m.state for m in pool.statistics().members] == ["online"] * 3
        assert await read_all(pool, SIZE) == data
    pool = await Pool.open([*spares.open(), *ds.open()[1:]])
    try:
        assert [m.state for m in pool.statistics().members] == ["online"] * 3
        assert await read_all(pool, SIZE) == data
    finally:
        await pool.close()


async def test_a_lone_device_whose_writes_hang_fails_the_flush(
        disks: Disks) -> None:
    """With no redundancy to go on with, a hung write makes the flush fail with a clear
    error (the pool stops) instead of hanging; nothing flushed before is lost."""
    ds = disks(1)
    async with _writes_hang_on_member_0(ds, "plain") as (pool, data):
        vol = VolumeManager(pool).get("v")
        with trio.fail_after(1.8):
            await vol.write(0, bytes(4096))
            with pytest.raises(StorageError, match=r"did not complete in 0\.2 s"):
                await vol.flush()
    assert await _read_reimported(ds) == data


async def test_a_repair_write_that_hangs_does_not_hang_the_read(
        disks: Disks) -> None:
    """A read finds a bad fragment on a member whose writes hang: the data comes from the
    others at once, and the self-healing rewrite of that fragment is given up after the
    write timeout (the member faulted) instead of holding the read until it answers."""
    ds = disks(3)
    async with _writes_hang_on_member_0(ds, "ec:2+1") as (pool, data):
        member, offset, length = next(v for _k, v in sorted(fragments(pool).items())
                                      if v[0] == 0)
        corrupt(ds, member, offset, length, random.Random(2))
        with trio.fail_after(1.8):
            assert await read_all(pool, SIZE) == data
        assert pool.statistics().members[0].state == "faulted"
    assert await _read_reimported(ds) == data


async def test_a_hanging_device_times_out_and_reads_go_on_from_redundancy(
        disks: Disks) -> None:
    """A member whose reads stop answering: each stuck read is given up after the read
    timeout, the data comes from the other fragments, the member is charged read errors,
    and later reads skip it at once instead of waiting again."""
    ds = disks(3)
    pool, data = await filled_pool(ds, "ec:2+1", SIZE)
    await pool.close()
    devs = ds.open()
    hung = FaultyDevice(devs[0], seed=7)
    pool = await Pool.open([hung, devs[1], devs[2]])
    pool.deadlines.read = 0.2
    try:
        pool.member_health.threshold = 10_000
        hung.read_delay = 4.0           # far longer than the timeout: a hang
        with trio.fail_after(3.5):      # served before the device would have answered
            assert await read_all(pool, SIZE) == data
            assert await read_all(pool, SIZE) == data
        assert pool.statistics().members[0].read_errors >= 1
    finally:
        hung.read_delay = 0.0
        await pool.close()


def test_the_write_timeout_is_configured_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[faults]\nwrite_timeout = 45\nread_timeout = 5\n")
    cfg = load(str(good))
    assert (cfg.write_timeout, cfg.read_timeout) == (45.0, 5.0)
    assert load(None).write_timeout == 120.0
    for bad in ("0", "-1", "7200", '"soon"'):
        path = tmp_path / "bad.toml"
        path.write_text(f"[faults]\nwrite_timeout = {bad}\n")
        with pytest.raises(InvalidArgument, match="write_timeout"):
            load(str(path))
