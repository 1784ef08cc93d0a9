"""A storaged Pool on Ceph RADOS (issue 24; pool/radosimporter.py, pool/rados/backend.py),
end to end through the VolumeManager against a real one-node cluster.

"backend invariant N" is pool/rados/backend.py's list, "importer invariant N"
pool/radosimporter.py's, "owner invariant N" pool/rados/owner.py's; DESIGN's are cited as
"DESIGN N"."""

from __future__ import annotations

import os

import pytest
import trio

from pool import owner as owners
from pool.pool import Pool
from pool.rados.conn import Connection
from pool.rados.target import RadosTarget
from tests.kit.cephkit import TEST_POOL, Cluster
from tests.rados.radoskit import connect, owner
from volumes.manager import VolumeManager

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
