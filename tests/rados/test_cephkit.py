"""The throwaway cluster itself (tests/kit/cephkit.py): with a mgr it reports usage, and stop
leaves no daemon and no file behind. (That it serves I/O, and health without a mgr, is
tested in test_segments.py, on the cluster that module starts anyway.)"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from pool.rados.conn import Connection
from tests.kit.cephkit import TEST_POOL, Cluster, _alive, why_not


@pytest.mark.slow
async def test_mgr_gives_usage_and_stop_kills_and_removes(tmp_path: Path) -> None:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    c = await trio.to_thread.run_sync(partial(Cluster.start, tmp_path / "c", mgr=True))
    pids = c.pids()
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    conn = await Connection.open(TEST_POOL, conf=str(c.conf))
    await conn.run("write", "write", conn.ioctx.write_full, "u", b"u" * 8192)
    for _ in range(120):                    # the mgr reports some seconds after its start
        u = await conn.usage()
        if u.known:
            break
        await trio.sleep(0.5)
    assert u.total_bytes == 4 << 30 and 0 < u.used_bytes < u.total_bytes
    await conn.close()
    await trio.to_thread.run_sync(c.stop)
    assert not any(_alive(p) for p in pids)
    assert not (tmp_path / "c").exists()
