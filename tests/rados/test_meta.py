"""Metadata on RADOS (pool/rados/meta.py; DESIGN invariants 2-4) against a real cluster:
commit and read back, refusals that change nothing, verification of everything read, and
a writer SIGKILLed at random instants and just before sampled RADOS writes."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from pool.errors import MediumError, StorageError
from pool.rados.conn import Connection, Fenced
from pool.rados.meta import RadosMeta, RadosSuperblock, journal_key
from pool.rados.owner import OwnershipLock
from tests.kit.cephkit import TEST_POOL, Cluster
from tests.rados.meta_worker import PAGES, page, payload, state
from tests.rados.radoskit import connect, new_uuid, owner, snapshot

REPO = Path(__file__).resolve().parents[2]


async def _open(ceph: Cluster, uuid: str, name: str = "a", *, create: bool = True,
                takeover: bool = False) -> tuple[Connection, OwnershipLock, RadosMeta]:
    conn = await connect(ceph)
    lock = OwnershipLock(conn, uuid, owner(name))
    await lock.acquire(create=create, takeover=takeover)
    return conn, lock, RadosMeta(conn, lock, uuid)


async def test_commit_and_read_back(ceph: Cluster) -> None:
    """Meta invariants 2 and 3: journal entries and a checkpoint read back exactly; the
    checkpoint drops the entries it covers and the blobs only the old one used."""
    uuid = new_uuid()
    conn, lock, meta = await _open(ceph, uuid)
    sb0 = RadosSuperblock(uuid, 0, 0, {})
    await meta.format(sb0)
    with pytest.raises(StorageError, match="already holds"):
        await meta.format(sb0)
    for txg in range(1, 4):
        await meta.append(txg, payload(txg))
    assert await meta.read_journal(0) == [(t, payload(t)) for t in range(1, 4)]
    assert await meta.read_journal(2) == [(3, payload(3))]
    refs = await meta.write_blobs("page", 1, [page(i, 1) for i in range(PAGES)])
    sb1 = RadosSuperblock(uuid, 1, 2, {"page": refs})
    await meta.commit_checkpoint(sb0, sb1)
    assert await meta.read_superblock() == sb1
    assert await meta.read_journal(2) == [(3, payload(3))]
    assert await meta.read_blobs(refs) == [page(i, 1) for i in range(PAGES)]
    # The next checkpoint keeps pages 0-1, replaces 2-3: the old 2-3 are deleted.
    new = await meta.write_blobs("page", 2, [page(2, 2), page(3, 2)], first=2)
    sb2 = RadosSuperblock(uuid, 2, 3, {"page": refs[:2] + new})
    await meta.commit_checkpoint(sb1, sb2)
    assert await meta.read_journal(3) == []
    objs = await trio.to_thread.run_sync(snapshot, conn, uuid)
    assert sorted(o for o in objs if ".page." in o) == sorted(r.oid for r in refs[:2] + new)
    assert await meta.orphans(sb2, ["page", "state"]) == []
    assert sorted(objs[lock.oid][2]) == ["gen"]          # no journal entry left
    await lock.release()
    await conn.close()


async def test_stale_checkpoint_is_refused_and_changes_nothing(ceph: Cluster) -> None:
    """Meta invariant 3: a checkpoint that does not replace the committed generation fails
    whole (the omap compare), and nothing of it is visible."""
    uuid = new_uuid()
    conn, lock, meta = await _open(ceph, uuid)
    sb0 = RadosSuperblock(uuid, 0, 0, {})
    await meta.format(sb0)
    await meta.commit_checkpoint(sb0, RadosSuperblock(uuid, 1, 0, {}))
    await meta.append(1, payload(1))
    before = await trio.to_thread.run_sync(snapshot, conn, uuid)
    with pytest.raises(StorageError):
        await meta.commit_checkpoint(sb0, RadosSuperblock(uuid, 1, 1, {}))
    with pytest.raises(StorageError, match="does not follow"):
        await meta.commit_checkpoint(sb0, RadosSuperblock(uuid, 5, 1, {}))
    assert await trio.to_thread.run_sync(snapshot, conn, uuid) == before
    await lock.release()
    await conn.close()


async def test_fenced_owner_writes_no_metadata(ceph: Cluster) -> None:
    """Meta invariant 1 and DESIGN 10: after a takeover the old owner's journal entries and
    checkpoints fail, and the new owner reads only what was committed before."""
    uuid = new_uuid()
    a, _la, ma = await _open(ceph, uuid, "a")
    sb0 = RadosSuperblock(uuid, 0, 0, {})
    await ma.format(sb0)
    await ma.append(1, payload(1))
    b, lb, mb = await _open(ceph, uuid, "b", create=False, takeover=True)
    with pytest.raises(Fenced):
        await ma.append(2, payload(2))
    with pytest.raises(Fenced):
        await ma.commit_checkpoint(sb0, RadosSuperblock(uuid, 1, 2, {}))
    assert await mb.read_superblock() == sb0
    assert await mb.read_journal(0) == [(1, payload(1))]
    await mb.append(2, payload(2))
    await lb.release()
    await a.close()
    await b.close()


async def test_damage_is_detected_never_returned(ceph: Cluster) -> None:
    """Meta invariant 4: a damaged blob is MediumError, a damaged superblock an error, and
    replay stops before a damaged journal entry."""
    uuid = new_uuid()
    conn, lock, meta = await _open(ceph, uuid)
    sb0 = RadosSuperblock(uuid, 0, 0, {})
    await meta.format(sb0)
    (ref,) = await meta.write_blobs("state", 1, [state(3)])
    for txg in range(1, 4):
        await meta.append(txg, payload(txg))
    io = conn.ioctx

    def damage() -> None:
        raw = bytearray(io.read(ref.oid, ref.length))
        raw[5] ^= 1
        io.write_full(ref.oid, bytes(raw))
        with conn.rados.WriteOpCtx() as op:         # flip a byte of entry 2's payload
            value = bytearray(b"\0" * 8 + payload(2))
            io.set_omap(op, (journal_key(2),), (bytes(value),))
            io.operate_write_op(op, lock.oid)
    await trio.to_thread.run_sync(damage)
    with pytest.raises(MediumError, match="checksum"):
        await meta.read_blob(ref)
    assert await meta.read_journal(0) == [(1, payload(1))]

    def damage_sb() -> None:
        raw = bytearray(io.read(lock.oid, 4096))
        raw[20] ^= 1
        with conn.rados.WriteOpCtx() as op:
            op.write_full(bytes(raw))
            io.operate_write_op(op, lock.oid)
    await trio.to_thread.run_sync(damage_sb)
    with pytest.raises(StorageError, match="checksum"):
        await meta.read_superblock()
    await lock.release()
    await conn.close()


# ---- crashes ------------------------------------------------------------------------------
def _worker(ceph: Cluster, uuid: str, crash_at: int, max_txg: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.rados.meta_worker", str(ceph.conf), TEST_POOL, uuid,
         str(crash_at), str(max_txg)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def _check(ceph: Cluster, uuid: str, out: str) -> int:
    """The pool after a crash: the superblock and every blob it references verify, the
    state blob is that of its txg, the journal continues it with the exact payloads, and
    every txg the worker acknowledged is there (at most one more: the one in flight).
    Returns the last committed txg."""
    acked = [int(t) for t in re.findall(r"^committed (\d+)$", out, re.M)]
    ckpts = [int(g) for g in re.findall(r"^checkpoint (\d+) \d+$", out, re.M)]
    recovered = re.findall(r"^recovered (\d+) (\d+)$", out, re.M)
    conn, lock, meta = await _open(ceph, uuid, "checker", create=False, takeover=True)
    sb = await meta.read_superblock()
    blobs = {k: await meta.read_blobs(v) for k, v in sb.blobs.items()}
    if sb.txg:
        assert blobs["state"] == [state(sb.txg)]
        for ref, data in zip(sb.blobs["page"], blobs["page"], strict=True):
            _uuid, _kind, gen, i = ref.oid.split(".")
            assert data == page(int(i), int(gen))
    entries = await meta.read_journal(sb.txg)
    assert [t for t, _ in entries] == list(range(sb.txg + 1, sb.txg + 1 + len(entries)))
    assert all(p == payload(t) for t, p in entries)
    last = entries[-1][0] if entries else sb.txg
    floor = max(acked, default=int(recovered[-1][1]) if recovered else 0)
    assert floor <= last <= floor + 1, (floor, last, out)
    assert sb.generation >= max(ckpts, default=0)
    await lock.release()
    await conn.close()
    return last


@pytest.mark.slow
async def test_writer_killed_at_random_instants(ceph: Cluster) -> None:
    """DESIGN invariants 1-3 on RADOS: SIGKILL at random instants of a run of commits and
    checkpoints; each time the last committed state reads back whole and verified, and
    the next run goes on from it."""
    uuid = new_uuid()
    rnd = random.Random(24)
    last = 0
    for _round in range(4):
        proc = await trio.to_thread.run_sync(partial(_worker, ceph, uuid, 0, 10**6))
        assert proc.stdout is not None
        try:
            with trio.fail_after(120):      # a worker that hangs fails the test, not CI
                line = await trio.to_thread.run_sync(proc.stdout.readline,
                                                     abandon_on_cancel=True)
            assert line.startswith("recovered"), line + (proc.stderr.read() if proc.stderr
                                                         else "")
            assert int(line.split()[2]) >= last
            await trio.sleep(rnd.uniform(0.05, 1.5))
        finally:
            proc.kill()
        out, _err = await trio.to_thread.run_sync(partial(proc.communicate, timeout=60))
        last = await _check(ceph, uuid, line + out)
    assert last > 0


@pytest.mark.slow
async def test_writer_killed_between_rados_writes(ceph: Cluster) -> None:
    """DESIGN invariant 2 at crash points between RADOS operations: the worker kills
    itself just before its n-th write (owner record, journal entries, blobs, superblock,
    deletes), for sampled n; every time the last committed state is intact."""
    uuid = new_uuid()
    rnd = random.Random(2024)
    points = sorted(rnd.sample(range(2, 30), 7))
    for n in points:
        proc = await trio.to_thread.run_sync(partial(_worker, ceph, uuid, n, 10**6))
        try:
            out, err = await trio.to_thread.run_sync(partial(proc.communicate, timeout=120))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, err
        await _check(ceph, uuid, out)
