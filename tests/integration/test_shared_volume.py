"""Several NBD connections writing and reading one volume at once (DESIGN invariant 1:
every acknowledged write is what reads return; one volume object behind every connection).

Each libnbd client (``nbd_shared_client.py``, system python) owns every third 4 KiB page,
so every 64 KiB block is shared by the three connections: each small write is a
read-modify-write of a block the others write too, as two guests' file systems on one
disk do while a VM migrates. Reads of 4 KiB to 1 MiB (small ones answered from the write
buffer or the record cache, large ones read into one buffer) are checked as they return,
flushes and snapshots go on meanwhile, and at the end the volume reads back as the union
of the three models, also after a restart, and ``pool check --deep`` is clean.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kit.daemonkit import Daemon
from tests.kit.nbdharness import nbdsh_env

CLIENT = Path(__file__).parents[1] / "kit" / "nbd_shared_client.py"
CLIENTS = 3
PAGE = 4096


def _run(daemon: Daemon, vol: str, seconds: int, seed: int, snapshots: bool
         ) -> list[dict[str, Any]]:
    procs = [subprocess.Popen(
        ["/usr/bin/python3", str(CLIENT), daemon.url(f"tank/{vol}"), str(seconds), "16",
         str(seed + i), str(i), str(CLIENTS), str(daemon.dir / f"{vol}.{i}.model")],
        cwd=daemon.dir, env=nbdsh_env(), stdout=subprocess.PIPE, text=True)
        for i in range(CLIENTS)]
    taken = 0
    if snapshots:
        end = time.monotonic() + seconds
        while time.monotonic() < end and all(p.poll() is None for p in procs):
            daemon.ok("snapshot", "create", f"tank/{vol}@s{taken}")
            taken += 1
            time.sleep(0.5)
    outs = [p.communicate(timeout=seconds + 180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert not snapshots or taken >= 2, taken
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def _union(daemon: Daemon, vol: str) -> bytes:
    models = [(daemon.dir / f"{vol}.{i}.model").read_bytes() for i in range(CLIENTS)]
    out = bytearray(len(models[0]))
    for p in range(len(out) // PAGE):
        out[p * PAGE:(p + 1) * PAGE] = models[p % CLIENTS][p * PAGE:(p + 1) * PAGE]
    return bytes(out)


def _read_all(daemon: Daemon, vol: str) -> bytes:
    script = ("import sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
              "sys.stdout.buffer.write(h.pread(h.get_size(), 0))\nh.shutdown()\n")
    r = subprocess.run(["/usr/bin/python3", "-c", "import nbd\n" + script,
                        daemon.url(f"tank/{vol}")], cwd=daemon.dir, env=nbdsh_env(),
                       capture_output=True, timeout=120, check=True)
    return r.stdout


@pytest.mark.parametrize("profile", ["plain", "ec:2+1"])
def test_three_connections_share_every_block_of_one_volume(daemon: Daemon,
                                                           profile: str) -> None:
    files = [str(daemon.dir / f"d{i}.img") for i in range(3)]
    daemon.ok("pool", "create", "tank", *files, "--profile", profile, "--file-size", "200M")
    daemon.ok("volume", "create", "tank/v", "--size", "24M")
    got = _run(daemon, "v", 6, 7, snapshots=True)
    for g in got:
        assert g["bad"] is None and not g["hung"], got
        assert g["counts"].get("read:ok", 0) > 100 and g["counts"].get("write:ok", 0) > 100, g
        assert set(g["counts"]) <= {"read:ok", "write:ok", "flush:ok"}, g
    want = _union(daemon, "v")
    assert _read_all(daemon, "v") == want
    check = daemon.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["problems"] == [], check
    daemon.stop()
    daemon.start()
    assert _read_all(daemon, "v") == want
