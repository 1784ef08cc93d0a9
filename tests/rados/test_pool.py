"""A storaged Pool on Ceph RADOS (issue 24; pool/radosimporter.py, pool/rados/backend.py),
end to end through the VolumeManager against a real one-node cluster.

"backend invariant N" is pool/rados/backend.py's list, "importer invariant N"
pool/radosimporter.py's, "owner invariant N" pool/rados/owner.py's; DESIGN's are cited as
"DESIGN N"."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool import owner as owners
from pool import radosimporter, scrub
from pool.checker import check
from pool.errors import (
    AlreadyExists,
    InvalidArgument,
    MediumError,
    NotFound,
    PoolFailed,
    StorageError,
)
from pool.pool import Pool
from pool.rados import clslock
from pool.rados.backend import DIRECTORY, directory
from pool.rados.conn import Connection
from pool.rados.meta import Destroying
from pool.rados.owner import LOCK_NAME, PoolOwned
from pool.rados.target import RadosTarget
from tests.kit.cephkit import TEST_POOL, Cluster
from tests.property import test_volume_model as volume_model
from tests.rados.pool_worker import VOLUME_BLOCKS, expected, round_blocks
from tests.rados.radoskit import connect, owner, snapshot
from volumes.manager import VolumeManager

ROOT = Path(__file__).resolve().parents[2]

MiB = 1 << 20
BS = 64 * 1024
EXTENT = 4 * MiB
QUOTA = 2 << 30


def target(ceph: Cluster) -> RadosTarget:
    return RadosTarget.parse(TEST_POOL, str(ceph.conf))


def claim(name: str) -> owners.Claim:
    return owners.Claim(owner(name))


async def _quota(ceph: Cluster) -> Connection:
    conn = await connect(ceph)
    await conn.mon_command({"prefix": "osd pool set-quota", "pool": TEST_POOL,
                            "field": "max_bytes", "val": str(QUOTA)})
    return conn


async def create(ceph: Cluster, name: str, who: str = "a") -> Pool:
    conn = await _quota(ceph)
    await conn.close()
    return await Pool.create_rados(name, target(ceph), extent_size=EXTENT,
                                   claim=claim(who))


async def assert_holds(pool: Pool, data: bytes) -> None:
    """Volume 'v' of ``pool`` begins with ``data``, and the deep check is clean."""
    assert await VolumeManager(pool).get("v").read(0, len(data)) == data
    report = await check(pool, deep=True)
    assert report.ok, report.render()


async def test_create_write_close_reopen_snapshot_clone(ceph: Cluster) -> None:
    """DESIGN 1, 2, 7 on RADOS: volumes written and flushed through the VolumeManager read
    back byte-exact, and again after close and a reopen by name (backend invariants 1-3:
    the checkpoint's packs and index, the journal); a snapshot keeps the bytes of its
    instant and a clone of it is writable on its own."""
    pool = await create(ceph, "p-basic")
    assert pool.backend == "rados" and pool.rados_target == target(ceph)
    assert pool.state.members == [] and pool.devices == []
    vm = VolumeManager(pool)
    vol = await vm.create("v", 64 * MiB, block_size=BS)
    a = os.urandom(3 * MiB)
    b = os.urandom(BS + 4096)
    await vol.write(0, a)
    await vol.write(20 * MiB + 512, b)
    await vol.flush()
    assert await vol.read(0, len(a)) == a
    await vm.snapshot("v", "s1")
    c = os.urandom(2 * MiB)
    await vol.write(MiB, c)
    await vol.flush()
    clone = await vm.clone("v", "s1", "c")
    d = os.urandom(BS)
    await clone.write(0, d)
    await clone.flush()
    want_v = a[:MiB] + c + a[3 * MiB:]
    assert await vol.read(0, 3 * MiB) == want_v
    status = pool.rados_status()
    assert status is not None and status["pool"] == TEST_POOL
    assert status["fenced"] is None and status["lock_holder"]
    assert pool.rados_statistics() is not None
    await pool.close()
    # Reopened by name: every flushed byte, snapshot and clone as they were.
    again = await Pool.open_rados(target(ceph), "p-basic", claim=claim("a"))
    try:
        vm2 = VolumeManager(again)
        assert await vm2.get("v").read(0, 3 * MiB) == want_v
        assert await vm2.get("v").read(20 * MiB + 512, len(b)) == b
        assert await vm2.snapshot_volume("v", "s1").read(0, 3 * MiB) == a
        assert await vm2.get("c").read(0, 3 * MiB) == d + a[BS:]
        st = again.statistics()
        assert st.state == "online" and st.capacity_bytes == QUOTA and st.live_bytes > 0
    finally:
        await again.close()


def _everything(conn: Connection) -> dict[str, Any]:
    """Every object of the RADOS pool: data, xattrs, omap (blocking)."""
    return snapshot(conn, "")


async def test_refusals_change_nothing(ceph: Cluster) -> None:
    """Importer invariant 1 (DESIGN 9, 10): ec:4+2 (and mirror:2) are refused with the
    store's message, a name the RADOS pool holds is AlreadyExists, an unknown name is
    NotFound naming the RADOS pool, and a second daemon's import while the owner lives is
    PoolOwned naming the holder; the RADOS pool is the same object for object after each."""
    pool = await create(ceph, "p-ref")
    try:
        conn = await connect(ceph)
        before = await trio.to_thread.run_sync(_everything, conn)
        for prof in ("ec:4+2", "mirror:2"):
            with pytest.raises(InvalidArgument, match=f"profile {re.escape(prof)} is not "
                               f"possible on RADOS pool {TEST_POOL}.*use plain"):
                await Pool.create_rados("p-ec", target(ceph), profile=prof,
                                        claim=claim("a"))
        with pytest.raises(AlreadyExists, match="already holds a storaged pool named"):
            await Pool.create_rados("p-ref", target(ceph), claim=claim("b"))
        with pytest.raises(NotFound, match=f"RADOS pool {TEST_POOL} holds no storaged "
                                           f"pool named 'p-none'"):
            await Pool.open_rados(target(ceph), "p-none", claim=claim("b"))
        with pytest.raises(PoolOwned, match="is owned by host node-a"):
            await Pool.open_rados(target(ceph), "p-ref", claim=claim("b"))
        with pytest.raises(InvalidArgument, match="profile ec:2\\+1 is not possible"):
            await VolumeManager(pool).create("v", 4 * MiB, profile="ec:2+1")
        after = await trio.to_thread.run_sync(_everything, conn)
        assert after == before
        await conn.close()
    finally:
        await pool.close()


async def test_takeover_fences_the_old_owner(ceph: Cluster) -> None:
    """DESIGN 10 (owner invariants 3, 4): with the first owner's pool serving (its runner
    renews the lock), a takeover import fences it; its next flush fails, it is FAILED with
    the fenced reason and its runner ends; nothing it wrote after lands. The new owner
    reads every byte flushed before, and its deep check is clean."""
    old = await create(ceph, "p-take", "a")
    vm = VolumeManager(old)
    vol = await vm.create("v", 16 * MiB, block_size=BS)
    flushed = os.urandom(2 * MiB)
    await vol.write(0, flushed)
    await vol.flush()
    ended = trio.Event()

    async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await old.run(task_status=task_status)
        ended.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(runner)
        new = await Pool.open_rados(target(ceph), "p-take", takeover=True, claim=claim("b"))
        try:
            assert new.rados is not None and new.rados.lock.fenced_others
            await vol.write(0, os.urandom(BS))
            with pytest.raises(StorageError):
                await vol.flush()
            assert old.txn.failed is not None and old.txn.failed.startswith("fenced: ")
            assert "blocklisted" in old.txn.failed
            with pytest.raises(PoolFailed):
                await old.commit()
            status = old.rados_status()
            assert status is not None and status["fenced"]
            assert old.health() and "fenced" in old.health()[0]
            with trio.fail_after(30):            # the runner saw it and returned
                await ended.wait()
            await assert_holds(new, flushed)
        finally:
            await old.close()
            await new.close()


async def test_deep_check_finds_damage_and_orphans(ceph: Cluster) -> None:
    """The checker on RADOS (``check_rados``, ``read_fragments``; DESIGN 4, §5): clean after
    writes; a segment object whose bytes were overwritten is reported by name (and reads
    of it fail, never return the damage), as are an orphaned segment object and an
    orphaned checkpoint blob."""
    pool = await create(ceph, "p-check")
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", 16 * MiB, block_size=BS, compression=False)
        data = os.urandom(MiB)
        await vol.write(0, data)
        await vol.flush()
        report = await check(pool, deep=True)
        assert report.ok, report.render()
        assert report.fragments_checked == MiB // BS
        seg = next(iter(pool.state.segments.values()))
        oid = pool.store.columns(seg)[0].name
        conn = await connect(ceph)
        uuid = pool.uuid
        await conn.run("write", "damage", conn.ioctx.write, oid, b"\xff" * 4096, 8192)
        await conn.run("write", "orphan", conn.ioctx.write_full,
                       f"{uuid}.seg.{0xfffff:016x}.0", b"left over")
        await conn.run("write", "orphan", conn.ioctx.write_full,
                       f"{uuid}.pages.999.0", b"left over")
        pool.record_cache.clear()
        report = await check(pool, deep=True)
        text = report.render()
        assert report.fragments_bad == 1, text
        assert f"{oid}: fragment 0 of the record" in text
        assert f"object {uuid}.seg.{0xfffff:016x}.0 is an orphan" in text
        assert f"object {uuid}.pages.999.0 is an orphan" in text
        with pytest.raises(MediumError):
            await vol.read(0, BS)
        await conn.close()
    finally:
        await pool.close()


def _worker(ceph: Cluster, name: str, seed: int, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.rados.pool_worker", str(ceph.conf), TEST_POOL, name,
         str(seed), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT)


def _flushed(out: str) -> int:
    return max([int(line.split()[1]) for line in out.splitlines()
                if line.startswith("flushed ")], default=0)


async def _check_volume(ceph: Cluster, name: str, seed: int, rounds: int) -> None:
    """Reopen (a restart of the killed daemon): every block flushed by round ``rounds``
    reads back, or the next round's (it may have been written back before the kill);
    the deep check is clean (no orphans left)."""
    pool = await Pool.open_rados(target(ceph), name, claim=claim("crash"))
    try:
        vol = VolumeManager(pool).get("v")
        got = await vol.read(0, VOLUME_BLOCKS * BS)
        now, nxt = expected(seed, rounds), round_blocks(seed, rounds + 1)
        for b in range(VOLUME_BLOCKS):
            block = got[b * BS:(b + 1) * BS]
            ok = [now.get(b, bytes(BS))] + ([nxt[b]] if b in nxt else [])
            assert block in ok, f"block {b} after round {rounds}"
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()


@pytest.mark.parametrize("mode", ["before-flip", "after-flip", "run"])
async def test_sigkilled_worker_loses_nothing_flushed(ceph: Cluster, mode: str) -> None:
    """DESIGN 1-3 on RADOS (meta invariants 2, 3; backend invariant 2; importer invariant
    3): a worker process writes and flushes rounds of blocks and takes checkpoints; it is
    SIGKILLed between a checkpoint's blob writes and its flip, right after the flip (before
    the old objects go), or at a random instant; the reopened pool (journal replay or the
    new checkpoint) holds every flushed byte and no orphan."""
    name, seed = f"p-crash-{mode}", len(mode)
    pool = await create(ceph, name, "crash")
    await VolumeManager(pool).create("v", VOLUME_BLOCKS * BS, block_size=BS)
    await pool.close()
    proc = _worker(ceph, name, seed, mode)
    if mode == "run":
        deadline = trio.current_time() + 60
        lines: list[str] = []
        assert proc.stdout is not None
        while _flushed("\n".join(lines)) < 4 + random.randrange(4):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert line and trio.current_time() < deadline, proc.stderr
            lines.append(line)
        await trio.sleep(random.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        rest, err = await trio.to_thread.run_sync(proc.communicate)
        out = "".join(lines) + rest
    else:
        out, err = await trio.to_thread.run_sync(partial(proc.communicate, timeout=60))
    assert proc.returncode == -signal.SIGKILL, err
    rounds = _flushed(out)
    assert rounds >= 2, out + err
    await _check_volume(ceph, name, seed, rounds)


async def test_a_lost_lock_stops_the_pool(ceph: Cluster) -> None:
    """DESIGN 10 (owner invariant 4): when the pool's renewal finds its lock gone (broken
    by someone, no blocklist), the pool fails with "lost its RADOS lock: ...", refuses I/O
    (PoolFailed) and nothing it writes afterwards lands; another daemon then imports it
    (fencing the owner the record names) with every flushed byte."""
    pool = await create(ceph, "p-lost")
    assert pool.rados is not None
    vol = await VolumeManager(pool).create("v", 8 * MiB, block_size=BS)
    data = os.urandom(MiB)
    await vol.write(0, data)
    await vol.flush()
    conn = await connect(ceph)
    lock = pool.rados.lock
    lock.interval = 0.1
    ended = trio.Event()

    async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await pool.run(task_status=task_status)
        ended.set()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner)
            await conn.run("lock", "break", conn.ioctx.execute, lock.oid, "lock",
                           "break_lock", clslock.break_lock_op(
                               LOCK_NAME, pool.rados.conn.client_id, lock.cookie))
            with trio.fail_after(20):
                await ended.wait()
        assert pool.txn.failed is not None
        assert pool.txn.failed.startswith("lost its RADOS lock: "), pool.txn.failed
        before = await trio.to_thread.run_sync(snapshot, conn, pool.uuid)
        with pytest.raises(PoolFailed, match="lost its RADOS lock"):
            await vol.write(0, os.urandom(BS))
            await vol.flush()
        assert await trio.to_thread.run_sync(snapshot, conn, pool.uuid) == before
    finally:
        await pool.close()
        await conn.close()
    again = await Pool.open_rados(target(ceph), "p-lost", claim=claim("b"))
    try:
        assert await VolumeManager(again).get("v").read(0, MiB) == data
    finally:
        await again.close()


async def test_cleaner_and_scrub_on_rados(ceph: Cluster) -> None:
    """The maintenance engines through the SegmentStore alone (DESIGN 3, 4, 6): the
    cleaner moves the live records out of sparse segments and their objects are deleted
    once the freeing commit is durable (RadosStore invariant 3); a scrub reads every
    record and finds nothing wrong; the bytes stay."""
    pool = await create(ceph, "p-clean")
    try:
        vol = await VolumeManager(pool).create("v", 32 * MiB, block_size=BS,
                                                compression=False)
        first = os.urandom(8 * MiB)
        await vol.write(0, first)
        await vol.flush()
        again = os.urandom(7 * MiB)
        await vol.write(0, again)           # the first segment(s) are now mostly dead
        await vol.flush()
        want = again + first[7 * MiB:]
        conn = await connect(ceph)
        before = {k for k in await trio.to_thread.run_sync(snapshot, conn, pool.uuid)
                  if ".seg." in k}
        moved = await pool.clean(max_segments=8, threshold=0.9)
        assert moved >= 1
        await pool.commit()
        await pool.settle_discards()
        after = {k for k in await trio.to_thread.run_sync(snapshot, conn, pool.uuid)
                 if ".seg." in k}
        assert before - after, "no segment object was deleted"
        assert after == {c.name for sg in pool.state.segments.values()
                         for c in pool.store.columns(sg)}
        pool.record_cache.clear()
        assert await vol.read(0, 8 * MiB) == want
        await scrub.control(pool, "start")
        done = await scrub.run(pool)
        assert done is not None and done["state"] == "finished", done
        assert done["found"] == 0 and done["unrecoverable"] == 0, done
        report = await check(pool, deep=True)
        assert report.ok, report.render()
        await conn.close()
    finally:
        await pool.close()


class Crash(BaseException):
    """The process died here (raised by ``CrashAt``; nothing catches it as an error)."""


class CrashAt:
    """Fault injection at the connection: counts the pool's RADOS writes, lock and
    command calls, and at the ``at``-th one dies -- before the call reaches librados, or
    (``after``) once it returned, its reply lost -- and refuses every later call, like a
    process that is gone. ``at`` None: only counts."""

    def __init__(self, conn: Connection, at: int | None, after: bool) -> None:
        self.conn, self.at, self.after = conn, at, after
        self.count = 0
        self.dead = False
        self._run = conn.run

    async def run(self, kind: str, what: str, fn: Any, *args: Any) -> Any:
        if self.dead:
            raise Crash(what)
        if kind == "read":
            return await self._run(kind, what, fn, *args)
        self.count += 1
        n = self.count                  # calls run concurrently: this one's number
        if n == self.at and not self.after:
            self.dead = True
            raise Crash(what)
        out = await self._run(kind, what, fn, *args)
        if n == self.at:
            self.dead = True
            raise Crash(what)
        return out


CRASH_BLOCKS = 24


def _crash_round(seed: int, rnd: int) -> dict[int, bytes]:
    rng = random.Random(f"crash-{seed}-{rnd}")
    return {rng.randrange(CRASH_BLOCKS): rng.randbytes(BS) for _ in range(3)}


async def _crash_workload(pool: Pool, seed: int, progress: list[int]) -> None:
    """Rounds of writes and flushes; a checkpoint every third round, a snapshot taken at
    round 2 and deleted at round 5, the cleaner at round 4 (segments freed, objects
    deleted). ``progress`` gets each round whose flush returned."""
    vm = VolumeManager(pool)
    vol = vm.get("v")
    for rnd in range(1, 8):
        for block, data in sorted(_crash_round(seed, rnd).items()):
            await vol.write(block * BS, data)
        await vol.flush()
        progress.append(rnd)
        if rnd == 2:
            await vm.snapshot("v", "s")
        if rnd == 4:
            await pool.clean(max_segments=8, threshold=0.9)
            await pool.commit()
            await pool.settle_discards()
        if rnd == 5:
            await vm.delete_snapshot("v", "s")
        if rnd % 3 == 0:
            await pool.txn.checkpoint()


async def _crash_once(ceph: Cluster, name: str, seed: int, at: int | None,
                      after: bool) -> tuple[int, int]:
    """Create ``name`` with an empty volume, run the workload until the crash; returns
    (RADOS calls counted, rounds flushed)."""
    conn = await _quota(ceph)
    await conn.close()
    pool = await Pool.create_rados(name, target(ceph), extent_size=256 * 1024,
                                   claim=claim("crash"))
    await VolumeManager(pool).create("v", CRASH_BLOCKS * BS, block_size=BS,
                                     compression=False)
    assert pool.rados is not None
    pconn = pool.rados.conn
    inject = CrashAt(pconn, at, after)
    pconn.run = inject.run              # type: ignore[method-assign]
    progress: list[int] = []
    try:
        await _crash_workload(pool, seed, progress)
    except BaseException as e:          # Crash, maybe inside a nursery's group
        crashes = e.split(Crash)[0] if isinstance(e, BaseExceptionGroup) else e
        if at is None or not (isinstance(e, Crash) or crashes is not None):
            raise
    else:
        assert at is None or at > inject.count, "the crash point was never reached"
        pconn.run = inject._run         # type: ignore[method-assign]
        await pool.close()
        return inject.count, len(progress)
    await pconn.close()                 # the dead process's client goes away unreleased
    return inject.count, len(progress)


@pytest.mark.slow
async def test_crash_at_every_rados_call_keeps_every_flushed_byte(ceph: Cluster) -> None:
    """The crash suite on RADOS (DESIGN 1-3; meta invariants 2-3, backend invariant 2,
    importer invariant 3): a workload of writes, flushes, checkpoints, a snapshot and its
    delete and the cleaner's frees is cut at 16 RADOS calls spread over it (segment writes, journal
    entries, checkpoint blobs, flips, deletes, lock renewals), before the call or after it
    with its reply lost; the restarted daemon's import holds every block as of the last
    flush that returned (or the round being written), and its deep check is clean."""
    total, rounds = await _crash_once(ceph, "p-crash-dry", 7, None, False)
    assert rounds == 7 and total > 20
    points = sorted({round(i * (total - 1) / 15) + 1 for i in range(16)})
    for n, at in enumerate(points):
        name = f"p-crash-{n}"
        _count, flushed = await _crash_once(ceph, name, 7, at, after=bool(n % 2))
        pool = await Pool.open_rados(target(ceph), name, claim=claim("crash"))
        try:
            got = await VolumeManager(pool).get("v").read(0, CRASH_BLOCKS * BS)
            now: dict[int, bytes] = {}
            for r in range(1, flushed + 1):
                now.update(_crash_round(7, r))
            nxt = _crash_round(7, flushed + 1)
            for b in range(CRASH_BLOCKS):
                ok = [now.get(b, bytes(BS))] + ([nxt[b]] if b in nxt else [])
                assert got[b * BS:(b + 1) * BS] in ok, (at, b, flushed)
            report = await check(pool, deep=True)
            assert report.ok, (at, report.render())
        finally:
            await pool.close()


class OnRados:
    """test_volume_model's Backend: a pool on the test cluster's RADOS pool."""

    def __init__(self, ceph: Cluster) -> None:
        self.ceph = ceph
        self.name = f"model-{uuid.uuid4().hex[:12]}"

    async def create(self) -> Pool:
        conn = await _quota(self.ceph)
        await conn.close()
        return await Pool.create_rados(self.name, target(self.ceph),
                                       extent_size=256 << 10, claim=claim("model"))

    async def reopen(self) -> Pool:
        return await Pool.open_rados(target(self.ceph), self.name, claim=claim("model"))

    def cleanup(self) -> None:
        """The pool's objects stay until the cluster is removed with the module."""


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(program=st.lists(volume_model.ops, min_size=1, max_size=25))
def test_volume_matches_model_on_rados(ceph: Cluster, program: list[volume_model.Op]
                                       ) -> None:
    """tests/property/test_volume_model.py's programs (write, trim, zero, racing writes,
    flush, reopen) on a pool on RADOS: every read matches the bytearray model, a reopen
    brings back everything written before the close (DESIGN 1, 6), the checker is clean
    and trimming everything leaves nothing mapped."""
    trio.run(volume_model._run, program, "plain", 0, OnRados(ceph))


# ---- destroy and the directory's guarded updates (pool/rados/destroy.py) --------------------
def _keys(conn: Connection) -> set[str]:
    return {str(o.key) for o in conn.ioctx.list_objects()}


async def _keys_of(conn: Connection, uuid: str) -> set[str]:
    """The objects of the storaged pool ``uuid``."""
    return {k for k in await trio.to_thread.run_sync(_keys, conn) if k.startswith(uuid + ".")}


def _ops_worker(ceph: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.rados.ops_worker", str(ceph.conf), TEST_POOL, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _uuids(conn: Connection) -> set[str]:
    """The storaged pools that have objects in the RADOS pool (their uuid prefixes)."""
    return {k.split(".", 1)[0] for k in _keys(conn) if k != DIRECTORY}


async def test_destroy_takes_only_its_own_pool(ceph: Cluster) -> None:
    """Destroy invariants 1-4 (DESIGN 10): two storaged pools in one RADOS pool; destroying
    one (its lock held by its open Pool) deletes every object under its uuid (segments,
    checkpoint blobs, header) and its directory entry, reporting progress; the other's
    objects are the same byte for byte and it reopens with its data and a clean deep
    check; the destroyed name is unknown afterwards."""
    keep, gone = await create(ceph, "p-keep"), await create(ceph, "p-gone")
    data = {p.name: os.urandom(10 * MiB) for p in (keep, gone)}
    for p in (keep, gone):
        vol = await VolumeManager(p).create("v", 16 * MiB, block_size=BS, compression=False)
        await vol.write(0, data[p.name])
        await vol.flush()
    await keep.close()
    conn = await connect(ceph)
    before = await trio.to_thread.run_sync(snapshot, conn, keep.uuid)
    mine = await _keys_of(conn, gone.uuid)
    assert len([k for k in mine if ".seg." in k]) >= 3, mine
    seen: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:
        seen.append((done, total))
    await gone.destroy(progress)
    assert seen[-1] == (len(mine) - 1, len(mine) - 1), seen        # all but the header
    assert gone.uuid not in await trio.to_thread.run_sync(_uuids, conn)
    assert await directory(conn) == {**await directory(conn), "p-keep": keep.uuid}
    assert "p-gone" not in await directory(conn)
    assert await trio.to_thread.run_sync(snapshot, conn, keep.uuid) == before
    with pytest.raises(NotFound, match="holds no storaged pool named 'p-gone'"):
        await Pool.open_rados(target(ceph), "p-gone", claim=claim("a"))
    again = await Pool.open_rados(target(ceph), "p-keep", claim=claim("a"))
    try:
        await assert_holds(again, data["p-keep"])
    finally:
        await again.close()
        await conn.close()


async def test_destroy_refused_while_owned_changes_nothing(ceph: Cluster) -> None:
    """Destroy invariant 1 (owner invariant 2): finishing a destroy from a daemon that
    does not hold the pool is refused -- PoolOwned naming the holder while another daemon
    has it open, "not imported here" once it is free (a whole pool is destroyed only
    through its open Pool) -- and every object of the RADOS pool is as it was."""
    pool = await create(ceph, "p-owned")
    conn = await connect(ceph)
    try:
        before = await trio.to_thread.run_sync(_everything, conn)
        with pytest.raises(PoolOwned, match="p-owned is owned by host node-a"):
            await radosimporter.destroy_named(target(ceph), "p-owned", claim=claim("b"))
        assert await trio.to_thread.run_sync(_everything, conn) == before
    finally:
        await pool.close()
    before = await trio.to_thread.run_sync(_everything, conn)
    with pytest.raises(StorageError, match="is not imported here: import it"):
        await radosimporter.destroy_named(target(ceph), "p-owned", claim=claim("b"))
    assert await trio.to_thread.run_sync(_everything, conn) == before
    await conn.close()


async def test_destroy_killed_half_way_is_finished_by_a_second(ceph: Cluster) -> None:
    """Destroy invariants 2, 3: a worker destroying a pool is SIGKILLed after deleting 2
    objects; the pool is still named, its header holds the tombstone, so an import is
    refused ("was being destroyed"), never a pool with missing objects; a second destroy
    (the restarted daemon) deletes the rest and the name; a neighbouring pool is
    untouched throughout."""
    other = await create(ceph, "p-nextdoor")
    await other.close()
    pool = await create(ceph, "p-half", "crash")
    vol = await VolumeManager(pool).create("v", 16 * MiB, block_size=BS, compression=False)
    await vol.write(0, os.urandom(12 * MiB))
    await vol.flush()
    await pool.close()
    conn = await connect(ceph)
    nextdoor = await trio.to_thread.run_sync(snapshot, conn, other.uuid)
    mine = await _keys_of(conn, pool.uuid)
    proc = _ops_worker(ceph, "destroy", "p-half", "2")
    out, err = await trio.to_thread.run_sync(partial(proc.communicate, timeout=60))
    assert proc.returncode == -signal.SIGKILL, out + err
    left = await _keys_of(conn, pool.uuid)
    assert f"{pool.uuid}.header" in left and 0 < len(left) < len(mine) - 1, (mine, left)
    assert (await directory(conn))["p-half"] == pool.uuid
    with pytest.raises(Destroying, match="p-half was being destroyed"):
        await Pool.open_rados(target(ceph), "p-half", claim=claim("crash"))
    await radosimporter.destroy_named(target(ceph), "p-half", claim=claim("crash"))
    assert pool.uuid not in await trio.to_thread.run_sync(_uuids, conn)
    assert "p-half" not in await directory(conn)
    assert await trio.to_thread.run_sync(snapshot, conn, other.uuid) == nextdoor
    await conn.close()


async def test_racing_creates_name_one_pool(ceph: Cluster) -> None:
    """Backend invariant 4, importer invariant 4: two creates of one name racing in one
    process (both read the directory before either names the pool, so the guarded
    directory op decides): exactly one wins, the loser gets AlreadyExists and no object
    of its uuid is left; the directory names the winner."""
    await (await _quota(ceph)).close()
    conn = await connect(ceph)
    before = await trio.to_thread.run_sync(_uuids, conn)
    got: dict[str, Pool | AlreadyExists] = {}

    async def one(who: str) -> None:
        try:
            got[who] = await Pool.create_rados("p-race", target(ceph), extent_size=EXTENT,
                                               claim=claim(who))
        except AlreadyExists as e:
            got[who] = e
    async with trio.open_nursery() as nursery:
        for who in ("a", "b"):
            nursery.start_soon(one, who)
    won = [p for p in got.values() if isinstance(p, Pool)]
    assert len(won) == 1, got
    try:
        assert (await directory(conn))["p-race"] == won[0].uuid
        assert await trio.to_thread.run_sync(_uuids, conn) == before | {won[0].uuid}
    finally:
        await won[0].close()
        await conn.close()


async def test_racing_create_processes_name_one_pool(ceph: Cluster, tmp_path: Path) -> None:
    """Backend invariant 4 across processes (two daemons' creates), three times: exactly
    one prints "created", the other "exists", and only the winner's uuid has objects."""
    await (await _quota(ceph)).close()
    conn = await connect(ceph)
    for i in range(3):
        before = await trio.to_thread.run_sync(_uuids, conn)
        go = tmp_path / f"go{i}"
        procs = [_ops_worker(ceph, "create", f"p-prace{i}", who, str(go))
                 for who in ("a", "b")]
        await trio.sleep(1.5)                 # both imported and waiting at the line
        go.touch()
        outs = [await trio.to_thread.run_sync(partial(p.communicate, timeout=60))
                for p in procs]
        lines = sorted(o.strip() for o, _e in outs)
        assert [s.split()[0] for s in lines] == ["created", "exists:"], outs
        winner = lines[0].split()[1]
        assert (await directory(conn))[f"p-prace{i}"] == winner
        assert await trio.to_thread.run_sync(_uuids, conn) == before | {winner}
    await conn.close()


def _rot(conn: Connection, oid: str, offset: int) -> None:
    """Flip one byte of object ``oid`` through librados, behind storaged's back."""
    old = bytes(conn.ioctx.read(oid, 1, offset))
    conn.ioctx.write(oid, bytes([old[0] ^ 0x40]), offset)


def _rot_journal(conn: Connection, header: str) -> int:
    """Flip a payload byte of the header's last journal entry; its txg."""
    io = conn.ioctx
    with conn.rados.ReadOpCtx() as op:
        it, _ret = io.get_omap_vals(op, "", "j.", 100000)
        io.operate_read_op(op, header)
        entries = [(str(k), bytearray(v)) for k, v in it]
    key, value = entries[-1]
    value[-1] ^= 0x40
    op = io.create_write_op()
    try:
        io.set_omap(op, (key,), (bytes(value),))
        io.operate_write_op(op, header)
    finally:
        io.release_write_op(op)
    return int(key[2:], 16)


async def test_metadata_scrub_finds_and_repairs_rotten_objects(ceph: Cluster) -> None:
    """Backend invariant 5 (DESIGN 4): one byte rotted through librados in the superblock,
    the state blob, a map node pack and a journal entry after the checkpoint: the scrub's
    metadata pass reports each (found 4), repairs them from the verified state in memory
    (a checkpoint rewriting everything: repaired 4, unrecoverable 0), a second
    verification finds nothing, the deep check is clean and a reopen reads every byte."""
    pool = await create(ceph, "p-mscrub")
    conn = await connect(ceph)
    try:
        vol = await VolumeManager(pool).create("v", 16 * MiB, block_size=BS)
        data = os.urandom(4 * MiB)
        await vol.write(0, data)
        await vol.flush()
        await pool.txn.checkpoint()
        more = os.urandom(MiB)
        await vol.write(8 * MiB, more)
        await vol.flush()                            # a journal entry after it
        assert pool.rados is not None
        commit = pool.rados.commit
        sb, header = commit.sb, pool.rados.meta.oid
        assert (await commit.verify())[1] == []
        state_ref, pack_ref = sb.blobs["state"][0], sb.blobs["pages"][0]
        await trio.to_thread.run_sync(_rot, conn, state_ref.oid, state_ref.length // 2)
        await trio.to_thread.run_sync(_rot, conn, pack_ref.oid, 5)
        await trio.to_thread.run_sync(_rot, conn, header, 20)
        txg = await trio.to_thread.run_sync(_rot_journal, conn, header)
        checked, bad = await commit.verify()
        assert len(bad) == 4 and checked >= 5, bad
        assert any(f"journal entry {txg}" in b for b in bad), bad
        assert any(state_ref.oid in b for b in bad) and any(pack_ref.oid in b for b in bad)
        await scrub.control(pool, "start")
        done = await scrub.run(pool)
        assert done is not None and done["state"] == "finished", done
        assert (done["found"], done["repaired"], done["unrecoverable"]) == (4, 4, 0), done
        assert (await commit.verify())[1] == []
        report = await check(pool, deep=True)
        assert report.ok, report.render()
    finally:
        await pool.close()
    again = await Pool.open_rados(target(ceph), "p-mscrub", claim=claim("a"))
    try:
        got = VolumeManager(again).get("v")
        assert await got.read(0, 4 * MiB) == data
        assert await got.read(8 * MiB, MiB) == more
    finally:
        await again.close()
        await conn.close()
