"""A pool owner in its own process, for the SIGSTOP takeover test:

    python -m tests.rados.owner_worker CONF RADOS_POOL POOL_UUID NAME

takes the pool (``OwnershipLock``, renewing every 0.2 s), prints ``owned``, then writes
``NAME <n>`` to the header ``<uuid>.header`` through a guarded op every 20 ms, and a plain write to
``<uuid>.seg`` (no lock guard: only the blocklist stops it). When it finds itself fenced it
prints ``fenced: <reason>`` and exits 3."""

from __future__ import annotations

import sys

import trio

from pool.rados.conn import Fenced
from pool.rados.owner import OwnershipLock
from tests.kit.cephkit import Cluster
from tests.rados.radoskit import connect, owner


async def main(conf: str, rados_pool: str, pool_uuid: str, name: str) -> int:
    from pathlib import Path  # noqa: PLC0415
    conn = await connect(Cluster(Path(conf).parent, 0, Path(conf)), rados_pool)
    lock = OwnershipLock(conn, pool_uuid, owner(name), duration=30, interval=0.2)
    await lock.acquire(create=True)
    print("owned", flush=True)
    n = 0
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lock.run)
            while True:
                n += 1
                value = f"{name} {n}".encode()

                def write(value: bytes = value) -> None:
                    op = conn.ioctx.create_write_op()
                    try:
                        lock.guard(op)
                        op.write_full(value)
                        conn.ioctx.operate_write_op(op, lock.oid)
                    finally:
                        conn.ioctx.release_write_op(op)
                await conn.run("write", "data", write)
                await conn.run("write", "seg", conn.ioctx.write_full,
                               f"{pool_uuid}.seg", value)
                await trio.sleep(0.02)
    except* Fenced as group:
        print(f"fenced: {group.exceptions[0]}", flush=True)
        fenced = True
    else:
        fenced = False
    return 3 if fenced else 0


if __name__ == "__main__":
    conf, rados_pool, pool_uuid, name = sys.argv[1:5]
    sys.exit(trio.run(main, conf, rados_pool, pool_uuid, name))
