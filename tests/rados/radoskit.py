"""Helpers of the RADOS tests: connections with distinct owner identities, and a snapshot
of everything stored under a storaged pool's prefix (to prove a refusal changed nothing)."""

from __future__ import annotations

import uuid
from typing import Any

from pool.owner import Owner
from pool.rados.conn import Connection
from tests.kit.cephkit import TEST_POOL, Cluster


def owner(name: str, host_id: str = "testhost") -> Owner:
    return Owner(host_id, f"node-{name}", f"daemon-{name}", 1000)


async def connect(ceph: Cluster, pool: str = TEST_POOL) -> Connection:
    return await Connection.open(pool, conf=str(ceph.conf), op_timeout=20.0)


def new_uuid() -> str:
    return str(uuid.uuid4())


def snapshot(conn: Connection, pool_uuid: str) -> dict[str, Any]:
    """Every object under ``pool_uuid``'s prefix: data, xattrs and omap (blocking)."""
    io = conn.ioctx
    out: dict[str, Any] = {}
    for obj in io.list_objects():
        if not obj.key.startswith(pool_uuid):
            continue
        size, _mtime = io.stat(obj.key)
        data = bytes(io.read(obj.key, max(size, 1)))
        xattrs = {k: bytes(v) for k, v in io.get_xattrs(obj.key)}
        with conn.rados.ReadOpCtx() as op:
            it, _ret = io.get_omap_vals(op, "", "", 100000)
            io.operate_read_op(op, obj.key)
            omap = {k: bytes(v) for k, v in it}
        out[obj.key] = (data, xattrs, omap)
    return out
