"""A storaged pool on RADOS in its own process, for the crash tests of tests/rados/test_pool.py:

    python -m tests.rados.pool_worker CONF RADOS_POOL NAME SEED MODE

imports pool NAME (as the daemon ``owner("crash")``: each run is a restart of the same
daemon, which takes the lock of the killed one), then for rounds 1, 2, ... writes the
blocks ``round_blocks(SEED, round)`` to volume ``v``, flushes, and prints ``flushed
<round>``; every CHECKPOINT_EVERY rounds it also takes a checkpoint. MODE:

- ``run``: until killed;
- ``before-flip``: the first checkpoint after round 2 dies (SIGKILL) once its blobs are
  written, before the superblock flip;
- ``after-flip``: that checkpoint dies right after the flip, before the previous
  checkpoint's objects are deleted.
"""

from __future__ import annotations

import os
import random
import signal
import sys

import trio

from pool import owner as owners
from pool.pool import Pool
from pool.rados.target import RadosTarget
from tests.rados.radoskit import owner
from volumes.manager import VolumeManager

BS = 64 * 1024
VOLUME_BLOCKS = 256
PER_ROUND = 6
CHECKPOINT_EVERY = 3


def round_blocks(seed: int, rnd: int) -> dict[int, bytes]:
    """Block index -> content that round ``rnd`` writes."""
    rng = random.Random(f"{seed}-{rnd}")
    return {rng.randrange(VOLUME_BLOCKS): rng.randbytes(BS // 2) * 2
            for _ in range(PER_ROUND)}


def expected(seed: int, rounds: int) -> dict[int, bytes]:
    """The volume's blocks after rounds 1..``rounds`` (absent: never written, zeros)."""
    out: dict[int, bytes] = {}
    for r in range(1, rounds + 1):
        out.update(round_blocks(seed, r))
    return out


async def main(conf: str, rados_pool: str, name: str, seed: int, mode: str) -> None:
    target = RadosTarget.parse(rados_pool, conf)
    pool = await Pool.open_rados(target, name, claim=owners.Claim(owner("crash")))
    assert pool.rados is not None
    commit = pool.rados.commit
    meta = pool.rados.meta
    if mode != "run":
        write_checkpoint, flip = commit.write_checkpoint, meta.flip

        async def dying_write(plan: object) -> None:
            await write_checkpoint(plan)
            if mode == "before-flip" and armed:
                os.kill(os.getpid(), signal.SIGKILL)

        async def dying_flip(old: object, new: object) -> None:
            await flip(old, new)  # type: ignore[arg-type]
            if mode == "after-flip" and armed:
                os.kill(os.getpid(), signal.SIGKILL)
        commit.write_checkpoint = dying_write         # type: ignore[method-assign]
        meta.flip = dying_flip                        # type: ignore[method-assign]
    armed = False
    vol = VolumeManager(pool).get("v")
    print("open", flush=True)
    rnd = 0
    while True:
        rnd += 1
        for block, data in sorted(round_blocks(seed, rnd).items()):
            await vol.write(block * BS, data)
        await vol.flush()
        print(f"flushed {rnd}", flush=True)
        if rnd % CHECKPOINT_EVERY == 0 or (mode != "run" and rnd == 2):
            armed = rnd >= 2
            await pool.txn.checkpoint()


if __name__ == "__main__":
    conf, rados_pool, name, seed, mode = sys.argv[1:6]
    trio.run(main, conf, rados_pool, name, int(seed), mode)
