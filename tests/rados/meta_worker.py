"""A process that commits metadata on RADOS until it is killed, for the crash tests:

    python -m tests.rados.meta_worker CONF RADOS_POOL POOL_UUID CRASH_AT_WRITE MAX_TXG

It takes the pool (as the same daemon every run, so a run takes over the dead one before
it), recovers the superblock and journal, and goes on from the last committed txg: per txg
one journal entry ``payload(txg)``, printing ``committed <txg>`` once it is durable; every
CHECKPOINT_EVERY txgs a checkpoint (a state blob, pages of which some are kept from the
previous checkpoint), printing ``checkpoint <generation> <txg>`` after its commit.
CRASH_AT_WRITE n > 0: the process SIGKILLs itself just before its n-th RADOS write (a
crash point between RADOS operations). Exits 0 at MAX_TXG.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from pool.errors import NotFound
from pool.rados.meta import RadosMeta, RadosSuperblock
from pool.rados.owner import OwnershipLock
from tests.kit.cephkit import Cluster
from tests.rados.radoskit import connect, owner

CHECKPOINT_EVERY = 5
PAGES = 4


def payload(txg: int) -> bytes:
    return hashlib.sha256(b"%d" % txg).digest() * (1 + txg % 50)


def state(txg: int) -> bytes:
    chain = hashlib.sha256()
    for t in range(1, txg + 1):
        chain.update(payload(t))
    return json.dumps({"txg": txg, "chain": chain.hexdigest()}).encode()


def page(i: int, generation: int) -> bytes:
    return f"page {i} of generation {generation};".encode() * 200


async def main(conf: str, rados_pool: str, pool_uuid: str, crash_at: int,
               max_txg: int) -> int:
    conn = await connect(Cluster(Path(conf).parent, 0, Path(conf)), rados_pool)
    writes = 0
    real_run = conn.run

    async def run(kind: str, what: str, fn: Any, *args: Any) -> Any:
        nonlocal writes
        if kind == "write":
            writes += 1
            if writes == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return await real_run(kind, what, fn, *args)
    conn.run = run  # type: ignore[method-assign]

    lock = OwnershipLock(conn, pool_uuid, owner("worker"))
    await lock.acquire(create=True)
    meta = RadosMeta(conn, lock, pool_uuid)
    try:
        sb = await meta.read_superblock()
    except NotFound:
        sb = RadosSuperblock(pool_uuid, 0, 0, {})
        await meta.format(sb)
    entries = await meta.read_journal(sb.txg)
    txg = entries[-1][0] if entries else sb.txg
    print(f"recovered {sb.generation} {txg}", flush=True)
    while txg < max_txg:
        txg += 1
        await meta.append(txg, payload(txg))
        print(f"committed {txg}", flush=True)
        if txg % CHECKPOINT_EVERY == 0:
            gen = sb.generation + 1
            old_pages = sb.blobs.get("page", [])
            fresh = [i for i in range(PAGES) if i >= len(old_pages) or (i + gen) % 2 == 0]
            new_refs = [(await meta.write_blobs("page", gen, [page(i, gen)], first=i))[0]
                        for i in fresh]
            pages = list(old_pages) + [None] * (PAGES - len(old_pages))
            for i, ref in zip(fresh, new_refs, strict=True):
                pages[i] = ref
            (state_ref,) = await meta.write_blobs("state", gen, [state(txg)])
            new = RadosSuperblock(pool_uuid, gen, txg,
                                  {"state": [state_ref], "page": [p for p in pages if p]})
            await meta.commit_checkpoint(sb, new)
            sb = new
            print(f"checkpoint {gen} {txg}", flush=True)
    await lock.release()
    return 0


if __name__ == "__main__":
    a = sys.argv[1:6]
    sys.exit(trio.run(main, a[0], a[1], a[2], int(a[3]), int(a[4])))
