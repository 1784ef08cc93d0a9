"""Pools on Ceph RADOS in the real daemon (issue 24), end to end: storaged processes
(tests/kit/daemonkit) driven by storagectl, volumes reached over NBD by real clients
(nbdcopy, qemu-io), on the module's throwaway cluster (the ``ceph`` fixture).

- kill -9 and restart: every flushed byte back (DESIGN invariant 1; registry R1).
- two daemons: the second's import is refused while the first lives, nothing changed
  (invariant 10; registry R3), also at its start from a ``[[rados_pool]]`` (R2);
  ``--takeover`` of a SIGSTOPped owner; the old owner, woken, is fenced: its flushes fail,
  nothing of it lands, its pool shows failed with the reason, its other pool still
  serves; ``pool check --deep`` clean on the new owner.
- send/receive between a RADOS pool and a local ec:4+2 pool, byte-exact both ways.
- status and metrics: backend, RADOS pool, fsid, health, owner; the RADOS latency
  histogram in a scrape that the real Prometheus's promtool accepts.

The storaged pools share the cluster's RADOS pool ``sd`` (each test its own pool names).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.cephkit import TEST_POOL, Cluster
from tests.kit.daemonkit import Daemon, _free_port, _qemu_io

MiB = 1 << 20
VOLUME = 32 * MiB
QUOTA = 2 << 30          # no mgr runs: the RADOS pool's quota is the capacity storaged sees


@pytest.fixture(scope="module", autouse=True)
def _quota(ceph: Cluster) -> None:
    with ceph.client() as r:
        rc, _out, err = r.mon_command(json.dumps(
            {"prefix": "osd pool set-quota", "pool": TEST_POOL, "field": "max_bytes",
             "val": str(QUOTA)}), b"", timeout=30)
        assert rc == 0, err


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``make(name, *flags)``: a started daemon with its own state dir and ports; every one
    is killed at the end (SIGCONT first: one may be stopped)."""
    made: list[Daemon] = []

    def make(name: str, *flags: str) -> Daemon:
        d = Daemon(tmp_path / name, str(tmp_path / f"{name}.sock"), _free_port(),
                   _free_port(), args=flags)
        d.dir.mkdir(exist_ok=True)
        d.start()
        made.append(d)
        return d
    yield make
    for d in made:
        if d.proc is not None:
            d.proc.send_signal(signal.SIGCONT)
            d.stop(signal.SIGKILL)


def _conf(ceph: Cluster) -> list[str]:
    return ["--rados", TEST_POOL, "--ceph-conf", str(ceph.conf)]


def _write_file(d: Daemon, vol: str, data: bytes, path: Path) -> None:
    """``data`` onto the start of ``vol`` with nbdcopy, flushed (NBD FLUSH) before it
    exits."""
    path.write_bytes(data + bytes(VOLUME - len(data)))
    r = subprocess.run(["nbdcopy", "--flush", str(path), d.url(vol)], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr


def _read_all(d: Daemon, vol: str, path: Path) -> bytes:
    r = subprocess.run(["nbdcopy", d.url(vol), str(path)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return path.read_bytes()


def _status(d: Daemon, pool: str) -> dict[str, Any]:
    out = d.json("pool", "status", pool)
    assert isinstance(out, dict)
    return out


def _until(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return got


def test_kill_9_and_restart_brings_back_every_flushed_byte(
        ceph: Cluster, daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    """DESIGN invariant 1 through the daemon: pool create --rados, NBD writes flushed,
    SIGKILL, restart: the pool comes back from pools.json (R1) by itself, every flushed
    byte as written; status and metrics say where it lives."""
    d = daemons("a")
    created = d.json("pool", "create", "kill9", *_conf(ceph))
    assert isinstance(created, dict)
    assert created["backend"] == "rados" and created["devices"] == []
    assert created["rados"]["pool"] == TEST_POOL
    d.ok("volume", "create", "kill9/v", "--size", str(VOLUME))
    data = os.urandom(5 * MiB + 4096)
    _write_file(d, "kill9/v", data, tmp_path / "in")
    _qemu_io(d.url("kill9/v"), f"write -P 0x6b {20 * MiB} 3M", "flush")
    remembered = json.loads((d.dir / "state" / "pools.json").read_text())["pools"]
    assert remembered == [{"name": "kill9", "uuid": created["uuid"], "backend": "rados",
                           "rados": {"pool": TEST_POOL, "conf": str(ceph.conf),
                                     "client": "admin"}}]

    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    d.start()
    st = _status(d, "kill9")
    assert st["state"] == "online" and st["failed"] is None and st["uuid"] == created["uuid"]
    back = _read_all(d, "kill9/v", tmp_path / "out")
    assert back[:len(data)] == data
    assert back[20 * MiB:23 * MiB] == b"\x6b" * (3 * MiB)
    assert back[len(data):20 * MiB] == bytes(20 * MiB - len(data))

    # pool status: the backend, the RADOS pool, the cluster and the lock owner.
    r = st["rados"]
    assert r["pool"] == TEST_POOL and r["fsid"] == _fsid(ceph)
    assert str(r["health"]).startswith("HEALTH_")
    text = d.ok("pool", "status", "kill9")
    assert f"backend: rados pool {TEST_POOL}" in text and _fsid(ceph) in text
    assert d.proc is not None and f"pid {d.proc.pid}" in r["lock_holder"]
    assert f"owner: {r['lock_holder']}" in text and r["fenced"] is None

    # Metrics: the RADOS latency histogram per pool and kind, valid to promtool.
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics",
                                timeout=10) as resp:
        scrape = resp.read().decode()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package"
    lint = subprocess.run([promtool, "check", "metrics"], input=scrape,
                          capture_output=True, text=True, timeout=60, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
              for line in scrape.splitlines()
              if line.startswith("storaged_rados_op_seconds_count{")}
    assert counts['kind="read",pool="kill9"'] > 0 and counts['kind="write",pool="kill9"'] > 0
    assert 'storaged_rados_fenced{pool="kill9"} 0.0' in scrape


def _fsid(ceph: Cluster) -> str:
    return next(line.split("=")[1].strip() for line in ceph.conf.read_text().splitlines()
                if line.startswith("fsid"))


def test_takeover_fences_the_old_owner(ceph: Cluster, daemons: Callable[..., Daemon],
                                       tmp_path: Path) -> None:
    """DESIGN invariant 10 between two daemons (separate state dirs and ports)."""
    a = daemons("a")
    a.ok("pool", "create", "fo", *_conf(ceph))
    a.ok("pool", "create", "local", str(tmp_path / "a-d0"), "--file-size", "256M")
    a.ok("volume", "create", "fo/v", "--size", str(VOLUME))
    a.ok("volume", "create", "local/v", "--size", "8M")
    first = os.urandom(4 * MiB)
    _write_file(a, "fo/v", first, tmp_path / "first")

    # b declares the pool in its configuration: at start it is refused (a holds it), not
    # taken over (R2); b comes up all the same and says why.
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'[[rados_pool]]\nname = "fo"\nrados_pool = "{TEST_POOL}"\n'
                   f'ceph_conf = "{ceph.conf}"\n')
    b = daemons("b", "--config", str(cfg))
    listed = b.json("pool", "list")
    assert isinstance(listed, list) and [p["name"] for p in listed] == ["fo"]
    assert listed[0]["state"] == "unavailable", listed
    assert "is owned by" in listed[0]["error"] and "--takeover" in listed[0]["error"]
    assert _status(a, "fo")["state"] == "online"
    # ... and by hand: refused, naming the holder; nothing changed on either side (R3).
    r = b.ctl("pool", "import", "fo", *_conf(ceph))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--takeover" in r.stderr
    # By name alone, the declared target is tried again: refused the same way.
    r = b.ctl("pool", "import", "fo")
    assert r.returncode == 1 and "is owned by" in r.stderr, r.stderr
    assert b.json("pool", "list") == listed
    assert not (b.dir / "state" / "pools.json").exists() or "fo" not in \
        (b.dir / "state" / "pools.json").read_text()
    assert _read_all(a, "fo/v", tmp_path / "a1")[:len(first)] == first
    _qemu_io(a.url("fo/v"), f"write -P 0x11 {8 * MiB} 1M", "flush")   # a still writes

    # a hangs; b takes over: the data is intact, b writes its own.
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    taken = b.json("pool", "import", "fo", *_conf(ceph), "--takeover")
    assert isinstance(taken, dict) and taken["state"] == "online" and taken["taken_over"]
    got = _read_all(b, "fo/v", tmp_path / "b1")
    assert got[:len(first)] == first and got[8 * MiB:9 * MiB] == b"\x11" * MiB
    _qemu_io(b.url("fo/v"), f"write -P 0x22 {12 * MiB} 1M", "flush")
    expected = _read_all(b, "fo/v", tmp_path / "b2")

    # a wakes up: fenced. Its flush fails (an error, not a hang), nothing of it lands,
    # its pool says failed with the reason, and its other pool still serves.
    a.proc.send_signal(signal.SIGCONT)
    late = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x99 0 2M", "-c",
                           "flush", a.url("fo/v")], capture_output=True, text=True,
                          timeout=90, check=False)
    assert late.returncode != 0 or "failed" in late.stdout.lower() \
        or "error" in (late.stdout + late.stderr).lower(), late.stdout + late.stderr
    st = _until("a's pool failed", lambda: (s := _status(a, "fo"))["state"] == "failed"
                and s)
    assert st["failed"].startswith("fenced: ") and st["rados"]["fenced"]
    assert "failed: " in a.ok("pool", "status", "fo")
    _qemu_io(a.url("local/v"), "write -P 0x33 0 1M", "flush", "read -P 0x33 0 1M")
    assert _read_all(b, "fo/v", tmp_path / "b3") == expected
    # Logged once by the pool; its maintenance tasks stop rather than repeat it.
    time.sleep(3)
    said = [line for line in (a.dir / "daemon.log").read_text().splitlines()
            if line.startswith(("ERROR", "WARNING")) and "pool fo" in line]
    assert len(said) == 1 and "fenced" in said[0], said

    check = b.json("pool", "check", "fo", "--deep")
    assert isinstance(check, dict) and check["ok"], check
    assert check["records"] > 0
    # The fenced pool is exported from a (released; nothing written), b keeps serving it.
    a.ok("pool", "export", "fo")
    left = a.json("pool", "list")
    assert isinstance(left, list) and [p["name"] for p in left] == ["local"]
    assert _read_all(b, "fo/v", tmp_path / "b4") == expected
    assert _status(b, "fo")["state"] == "online"


def test_send_receive_between_rados_and_a_local_ec_pool(
        ceph: Cluster, daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    """A volume sent from a RADOS pool, received into a local ec:4+2 pool, sent back into
    the RADOS pool: byte-exact both ways."""
    d = daemons("a")
    d.ok("pool", "create", "sr", *_conf(ceph))
    d.ok("pool", "create", "ec", *(str(tmp_path / f"ec{i}") for i in range(6)),
         "--profile", "ec:4+2", "--file-size", "256M")
    d.ok("volume", "create", "sr/v", "--size", str(VOLUME))
    data = os.urandom(6 * MiB + 512)
    _write_file(d, "sr/v", data, tmp_path / "in")
    _qemu_io(d.url("sr/v"), f"write -P 0x5c {25 * MiB} 2M", "flush")
    original = _read_all(d, "sr/v", tmp_path / "orig")
    d.ok("snapshot", "create", "sr/v@s")
    d.ok("volume", "send", "sr/v@s", "-o", str(tmp_path / "s1"))
    d.ok("volume", "receive", "ec/v", "-i", str(tmp_path / "s1"))
    assert _read_all(d, "ec/v", tmp_path / "ec-back") == original
    d.ok("snapshot", "create", "ec/v@t")
    d.ok("volume", "send", "ec/v@t", "-o", str(tmp_path / "s2"))
    d.ok("volume", "receive", "sr/back", "-i", str(tmp_path / "s2"))
    assert _read_all(d, "sr/back", tmp_path / "sr-back") == original


def test_bad_rados_requests_are_refused_changing_nothing(
        ceph: Cluster, daemons: Callable[..., Daemon]) -> None:
    """ec:4+2, a ceph.conf that is not there, a RADOS pool that is not there, a pool name
    not in the RADOS pool: one line each from storagectl; no pool appears (R3)."""
    d = daemons("a")
    before = (d.dir / "state" / "pools.json").read_text() \
        if (d.dir / "state" / "pools.json").exists() else None
    r = d.ctl("pool", "create", "ecr", *_conf(ceph), "--profile", "ec:4+2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "redundancy is the RADOS pool's" in r.stderr
    # Where there is nothing to connect to, or no such RADOS pool: one line each.
    for argv, said in ((("--rados", TEST_POOL, "--ceph-conf", str(d.dir / "none.conf")),
                        "none.conf"),
                       (("--rados", "nosuchpool", "--ceph-conf", str(ceph.conf)),
                        "nosuchpool")):
        r = d.ctl("pool", "create", "ecr", *argv)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and said in r.stderr, \
            r.stderr
    r = d.ctl("pool", "import", "nosuch", *_conf(ceph))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nosuch" in r.stderr
    assert d.json("pool", "list") == []
    after = (d.dir / "state" / "pools.json").read_text() \
        if (d.dir / "state" / "pools.json").exists() else None
    assert after == before


def test_destroy_through_the_daemon(ceph: Cluster, daemons: Callable[..., Daemon]) -> None:
    """``pool destroy`` of a RADOS pool (pool/rados/destroy.py): refused from a second
    daemon while the first holds it (PoolOwned, one line), refused while it has volumes;
    then its objects and its name are gone, the neighbouring pool still serves, and the
    daemon forgets it (pools.json)."""
    a = daemons("a")
    made = a.json("pool", "create", "ds", *_conf(ceph))
    assert isinstance(made, dict)
    a.ok("pool", "create", "dk", *_conf(ceph))
    a.ok("volume", "create", "ds/v", "--size", str(VOLUME))
    a.ok("volume", "create", "dk/v", "--size", "8M")
    _qemu_io(a.url("ds/v"), "write -P 0x5a 0 6M", "flush")
    _qemu_io(a.url("dk/v"), "write -P 0x3c 0 1M", "flush")
    b = daemons("b")
    r = b.ctl("pool", "destroy", "ds", *_conf(ceph))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "ds is owned by host" in r.stderr, r.stderr
    r = a.ctl("pool", "destroy", "ds")
    assert r.returncode == 1 and "still has volumes (v)" in r.stderr, r.stderr
    a.ok("volume", "delete", "ds/v")
    a.ok("pool", "destroy", "ds")
    listed = a.json("pool", "list")
    assert isinstance(listed, list) and [p["name"] for p in listed] == ["dk"]
    assert "ds" not in (a.dir / "state" / "pools.json").read_text()
    with ceph.client() as rc:
        io = rc.open_ioctx(TEST_POOL)
        assert not [o.key for o in io.list_objects() if o.key.startswith(made["uuid"])]
        io.close()
    r = b.ctl("pool", "import", "ds", *_conf(ceph))
    assert r.returncode == 1 and "holds no storaged pool named 'ds'" in r.stderr, r.stderr
    _qemu_io(a.url("dk/v"), "read -P 0x3c 0 1M")
