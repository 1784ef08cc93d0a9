"""An OSD killed and restarted under NBD I/O (issue 24): three OSDs, the RADOS pool of
size 3 / min_size 2, a storaged pool on it, a libnbd client (nbdsh) writing random blocks
and flushing while one OSD is SIGKILLed and started again. No error reaches the client,
and every byte it wrote reads back, also after a kill -9 and restart of the daemon (DESIGN
invariant 1: Ceph keeps the data redundant, storaged keeps its own promises on top).

Its own cluster (three OSDs, ~2 GB RSS): one module, marked slow.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.cephkit import TEST_POOL, Cluster, why_not
from tests.kit.daemonkit import Daemon, _free_port
from tests.kit.nbdharness import nbdsh_env

pytestmark = pytest.mark.slow
MiB = 1 << 20
VOLUME = 32 * MiB

# Run by nbdsh (libnbd's Python, system python3; ``h`` is the connected handle): writes
# random 64 KiB blocks at random offsets for SECONDS, flushing every 8 writes; any error
# ends it non-zero. Then a last flush, and the volume as written goes to OUT.
WRITER = """
import os, random, time
size, seconds, out = {size}, {seconds}, {out!r}
model = bytearray(size)
rng = random.Random(7)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    off = rng.randrange(0, size // 65536) * 65536
    data = os.urandom(65536)
    h.pwrite(data, off)
    model[off:off + 65536] = data
    n += 1
    if n % 8 == 0:
        h.flush()
h.flush()
with open(out, "wb") as f:
    f.write(model)
print(n)
"""


@pytest.fixture(scope="module")
def ceph3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    cluster = Cluster.start(tmp_path_factory.mktemp("ceph3"), osds=3)
    try:
        with cluster.client() as r:
            rc, _out, err = r.mon_command(json.dumps(
                {"prefix": "osd pool set-quota", "pool": TEST_POOL, "field": "max_bytes",
                 "val": str(2 << 30)}), b"", timeout=30)
            assert rc == 0, err
        yield cluster
    finally:
        cluster.stop()


def _osds_up(ceph: Cluster) -> int:
    with ceph.client() as r:
        rc, out, err = r.mon_command(json.dumps({"prefix": "osd stat", "format": "json"}),
                                     b"", timeout=30)
        assert rc == 0, err
    return int(json.loads(out)["num_up_osds"])


def test_osd_killed_and_restarted_under_nbd_io(ceph3: Cluster, tmp_path: Path) -> None:
    d = Daemon(tmp_path / "a", str(tmp_path / "a.sock"), _free_port(), 0)
    d.dir.mkdir()
    d.start()
    try:
        d.ok("pool", "create", "osdr", "--rados", TEST_POOL, "--ceph-conf", str(ceph3.conf))
        d.ok("volume", "create", "osdr/v", "--size", str(VOLUME))
        model = tmp_path / "model"
        writer = subprocess.Popen(
            ["nbdsh", "-u", d.url("osdr/v"), "-c",
             WRITER.format(size=VOLUME, seconds=14, out=str(model))],
            cwd=tmp_path, env=nbdsh_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        outcome: list[tuple[str, str]] = []
        waiter = threading.Thread(target=lambda: outcome.append(writer.communicate(
            timeout=180)))
        waiter.start()
        time.sleep(3)
        ceph3.kill_osd(1)
        deadline = time.monotonic() + 30
        while _osds_up(ceph3) != 2:
            assert time.monotonic() < deadline, "osd.1 was not marked down"
            time.sleep(0.5)
        time.sleep(3)                 # I/O goes on with two of three copies
        ceph3.start_osd(1)
        waiter.join(timeout=200)
        assert outcome, "the NBD writer did not finish"
        stdout, stderr = outcome[0]
        assert writer.returncode == 0, f"an error reached the NBD client: {stderr}"
        assert int(stdout.strip()) > 16
        expected = model.read_bytes()
        deadline = time.monotonic() + 60
        while _osds_up(ceph3) != 3:
            assert time.monotonic() < deadline, "osd.1 did not come back up"
            time.sleep(0.5)

        def read_back() -> bytes:
            got = tmp_path / "got"
            r = subprocess.run(["nbdcopy", d.url("osdr/v"), str(got)], capture_output=True,
                               text=True, timeout=120, check=False)
            assert r.returncode == 0, r.stderr
            return got.read_bytes()
        assert read_back() == expected
        d.stop(signal.SIGKILL)
        d.start()
        assert read_back() == expected
        check = d.json("pool", "check", "osdr", "--deep")
        assert isinstance(check, dict) and check["ok"], check
    finally:
        if d.proc is not None:
            d.stop(signal.SIGKILL)
