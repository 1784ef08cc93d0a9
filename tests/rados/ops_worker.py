"""One pool operation in its own process, for tests/rados/test_pool.py's destroy and
create-race tests:

    python -m tests.rados.ops_worker CONF RADOS_POOL create NAME WHO GO_FILE
    python -m tests.rados.ops_worker CONF RADOS_POOL destroy NAME KILL_AT

``create``: waits until GO_FILE exists (so two workers start together), creates pool NAME
as daemon ``owner(WHO)`` and prints ``created <uuid>``, or ``exists: <message>`` if the
name was taken. ``destroy``: imports pool NAME as daemon ``owner("crash")`` and destroys
it, SIGKILLing itself once KILL_AT objects are deleted (a daemon killed half-way).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import trio

from pool import owner as owners
from pool.errors import AlreadyExists
from pool.pool import Pool
from pool.rados.target import RadosTarget
from tests.rados.radoskit import owner


def wait_for(go: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.001)               # a busy start line: both workers leave at once


async def create(target: RadosTarget, name: str, who: str) -> None:
    try:
        pool = await Pool.create_rados(name, target, extent_size=4 << 20,
                                       claim=owners.Claim(owner(who)))
    except AlreadyExists as e:
        print(f"exists: {e.message}", flush=True)
        return
    print(f"created {pool.uuid}", flush=True)
    await pool.close()


async def destroy(target: RadosTarget, name: str, kill_at: int) -> None:
    pool = await Pool.open_rados(target, name, claim=owners.Claim(owner("crash")))

    async def progress(done: int, total: int) -> None:
        print(f"deleted {done} of {total}", flush=True)
        if done >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    await pool.destroy(progress)
    print("destroyed", flush=True)


if __name__ == "__main__":
    conf, rados_pool, op, name = sys.argv[1:5]
    tgt = RadosTarget.parse(rados_pool, conf)
    if op == "create":
        wait_for(sys.argv[6])
        trio.run(create, tgt, name, sys.argv[5])
    else:
        trio.run(destroy, tgt, name, int(sys.argv[5]))
