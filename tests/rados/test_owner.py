"""Ownership of a pool on RADOS (pool/rados/owner.py; DESIGN invariant 10) against a real
cluster: two real librados clients in one process, and an owner in a SIGSTOPped process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from pool.errors import NotFound
from pool.rados.conn import Connection, Fenced
from pool.rados.owner import OWNER_XATTR, OwnershipLock, PoolOwned
from tests.kit.cephkit import TEST_POOL, Cluster
from tests.rados.radoskit import connect, new_uuid, owner, snapshot

REPO = Path(__file__).resolve().parents[2]


async def _write(conn: Connection, oid: str, data: bytes) -> None:
    await conn.run("write", f"write {oid}", conn.ioctx.write_full, oid, data)


async def _guarded_write(lock: OwnershipLock, data: bytes) -> None:
    io = lock.conn.ioctx

    def write() -> None:
        op = io.create_write_op()
        try:
            lock.guard(op)
            op.write_full(data)
            io.operate_write_op(op, lock.oid)
        finally:
            io.release_write_op(op)
    await lock.conn.run("write", "guarded header write", write)


async def test_second_owner_refused_and_nothing_changed(ceph: Cluster) -> None:
    """Owner invariant 2: a live owner's pool is refused to another daemon, with an error
    naming the owner, and nothing under the pool's prefix changes."""
    uuid = new_uuid()
    a, b = await connect(ceph), await connect(ceph)
    la = OwnershipLock(a, uuid, owner("a"))
    await la.acquire(create=True)
    await _guarded_write(la, b"superblock of a")
    before = await trio.to_thread.run_sync(snapshot, a, uuid)
    lb = OwnershipLock(b, uuid, owner("b"))
    with pytest.raises(PoolOwned) as e:
        await lb.acquire()
    assert "node-a" in str(e.value) and a.addrs in str(e.value) and "--takeover" in str(e.value)
    assert await trio.to_thread.run_sync(snapshot, a, uuid) == before
    # a keeps its pool: renewal and guarded writes still work; b's guarded write does not.
    await la.renew()
    await _guarded_write(la, b"still a")
    with pytest.raises(Exception, match="busy"):
        await _guarded_write(lb, b"b sneaks in")
    assert (await la.lockers())[0].client_id == a.client_id
    await la.release()
    await a.close()
    await b.close()


async def test_import_of_missing_pool_writes_nothing(ceph: Cluster) -> None:
    uuid = new_uuid()
    a = await connect(ceph)
    with pytest.raises(NotFound):
        await OwnershipLock(a, uuid, owner("a")).acquire()
    assert await trio.to_thread.run_sync(snapshot, a, uuid) == {}
    await a.close()


async def test_takeover_fences_the_first(ceph: Cluster) -> None:
    """Owner invariants 3 and 4: after b's takeover, every write of a fails (guarded or
    not, header or any other object), a learns why once, and b writes."""
    uuid = new_uuid()
    a, b = await connect(ceph), await connect(ceph)
    reasons: list[str] = []
    la = OwnershipLock(a, uuid, owner("a"), on_lost=reasons.append)
    await la.acquire(create=True)
    await _write(a, f"{uuid}.seg", b"a's segment")
    lb = OwnershipLock(b, uuid, owner("b"))
    await lb.acquire(takeover=True)
    assert [h.addr for h in lb.fenced_others] == [a.addrs]
    stats = b.statistics().latency      # conn invariant 2: blocklist + map wait, lock ops
    assert stats["command"].count == 2 and stats["lock"].count >= 3
    assert 0 < stats["lock"].quantile(0.5) <= stats["lock"].quantile(0.99)
    with pytest.raises(Fenced):
        await _write(a, f"{uuid}.seg", b"a wakes up")
    assert reasons and "blocklisted" in reasons[0] and la.lost is not None
    with pytest.raises(Fenced):
        await la.renew()
    with pytest.raises(Fenced):                 # refused without reaching librados
        await _guarded_write(la, b"a again")
    assert len(reasons) == 1
    assert a.statistics().fenced is not None
    await _guarded_write(lb, b"b's superblock")
    await lb.renew()
    got = await b.run("read", "read", b.ioctx.read, f"{uuid}.seg")
    assert got == b"a's segment"
    assert await b.run("read", "read", b.ioctx.read, lb.oid) == b"b's superblock"
    rec = await lb.recorded_owner()
    assert rec is not None and rec.addr == b.addrs
    await lb.release()
    await a.close()
    await b.close()


async def test_renewal_task_notices_the_takeover(ceph: Cluster) -> None:
    """Owner invariant 4: the renewal task finds on its own (no write needed) that the lock
    was taken over, reports why once and ends; the connection refuses I/O from then on."""
    uuid = new_uuid()
    a, b = await connect(ceph), await connect(ceph)
    reasons: list[str] = []
    la = OwnershipLock(a, uuid, owner("a"), interval=0.1, on_lost=reasons.append)
    await la.acquire(create=True)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(la.run)
            await trio.sleep(0.3)
            assert la.held and la.lost is None      # renewing fine meanwhile
            lb = OwnershipLock(b, uuid, owner("b"))
            await lb.acquire(takeover=True)
            # la.run returns by itself: the nursery closes without a cancel.
    assert len(reasons) == 1 and la.lost == reasons[0] and not la.held
    assert a.fenced is not None
    with pytest.raises(Fenced):
        await _write(a, f"{uuid}.seg", b"after")
    await lb.release()
    await a.close()
    await b.close()


async def test_earlier_run_of_the_same_daemon_is_fenced_and_replaced(ceph: Cluster) -> None:
    """Owner invariant 2: a restart of the same daemon (same host id and instance) takes
    its pool back without --takeover, and the earlier client is fenced first."""
    uuid = new_uuid()
    a, a2 = await connect(ceph), await connect(ceph)
    await OwnershipLock(a, uuid, owner("a")).acquire(create=True)
    l2 = OwnershipLock(a2, uuid, owner("a"))
    await l2.acquire()
    with pytest.raises(Fenced):
        await _write(a, f"{uuid}.seg", b"old run")
    await _guarded_write(l2, b"new run")
    await l2.release()
    await a.close()
    await a2.close()


async def test_expired_lock_owner_is_fenced_by_the_record(ceph: Cluster) -> None:
    """Owner invariant 3: an owner that stopped renewing loses the lock when it expires;
    the next owner takes it without --takeover but still fences the recorded owner."""
    uuid = new_uuid()
    a, b = await connect(ceph), await connect(ceph)
    la = OwnershipLock(a, uuid, owner("a"), duration=1)
    await la.acquire(create=True)
    lb = OwnershipLock(b, uuid, owner("b"))
    with pytest.raises(PoolOwned):         # not before it expired
        await lb.acquire()
    # cls_lock durations are whole seconds, on the OSD's clock: poll (a loaded OSD is late).
    with trio.fail_after(15):
        while True:
            await trio.sleep(0.5)
            try:
                await lb.acquire()
                break
            except PoolOwned:
                continue
    assert [h.addr for h in lb.fenced_others] == [a.addrs]
    with pytest.raises(Fenced):
        await _write(a, f"{uuid}.seg", b"late")
    await lb.release()
    await a.close()
    await b.close()


async def test_clean_release_fences_no_one(ceph: Cluster) -> None:
    uuid = new_uuid()
    a, b = await connect(ceph), await connect(ceph)
    la = OwnershipLock(a, uuid, owner("a"))
    await la.acquire(create=True)
    await la.release()
    xattrs = await a.run("read", "xattrs", lambda: dict(a.ioctx.get_xattrs(la.oid)))
    assert OWNER_XATTR not in xattrs
    lb = OwnershipLock(b, uuid, owner("b"))
    await lb.acquire()
    assert lb.fenced_others == []
    await _write(a, f"{uuid}.other", b"a still works elsewhere")
    await lb.release()
    await a.close()
    await b.close()


@pytest.mark.slow
async def test_sigstopped_owner_cannot_write_after_takeover(ceph: Cluster) -> None:
    """DESIGN invariant 10: an owner process that hung (SIGSTOP) and was taken over writes
    nothing when it wakes (SIGCONT): it finds itself fenced and exits; what the new owner
    wrote stays."""
    uuid = new_uuid()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = await trio.to_thread.run_sync(partial(
        subprocess.Popen, [sys.executable, "-m", "tests.rados.owner_worker", str(ceph.conf),
                           TEST_POOL, uuid, "a"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line.strip() == "owned", proc.stderr.read() if proc.stderr else ""
        await trio.sleep(0.3)
        proc.send_signal(signal.SIGSTOP)
        b = await connect(ceph)
        lb = OwnershipLock(b, uuid, owner("b"))
        await lb.acquire(takeover=True)
        await _guarded_write(lb, b"b wrote this")
        await _write(b, f"{uuid}.seg", b"b wrote this")
        proc.send_signal(signal.SIGCONT)
        rc = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
        out = proc.stdout.read()
        err = proc.stderr.read() if proc.stderr else ""
        assert rc == 3 and "fenced:" in out and "blocklisted" in out, out + err
        for oid in (lb.oid, f"{uuid}.seg"):
            assert await b.run("read", "read", b.ioctx.read, oid) == b"b wrote this"
        await lb.release()
        await b.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
