"""A throwaway one-node Ceph cluster for the RADOS tests (issue 24).

``Cluster.start(dir)``: one mon (msgr v2 on a free port of 127.0.0.1; cephx, with one
keyring ``<dir>/keyring`` that ceph.conf names, holding client.admin) and one bluestore
OSD on a sparse file, tuned down (cache, memory target) for a test machine; a replicated
RADOS pool of size 1 for the tests. Ready in about 8 s here. ``stop()`` kills the
daemons by the pids they wrote and removes the directory. ``why_not()`` says why this host
cannot run one (missing Debian packages), for a skip; everything else is a failure.

Parallel clusters (pytest-xdist workers) differ in directory and mon port; the OSD picks
free ports itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pool.rados.binding import RadosUnavailable, load

BINARIES = ("ceph-mon", "ceph-osd", "monmaptool", "ceph-authtool")
TEST_POOL = "sd"
START_TIMEOUT = 60.0


def why_not() -> str | None:
    """None if this host can run a throwaway cluster, else why not (one line)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"no Ceph daemons on this host ({', '.join(missing)} missing: "
                f"apt-get install ceph-mon ceph-osd ceph-common)")
    try:
        load()
    except RadosUnavailable as e:
        return str(e)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONF = """[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {d}/keyring
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
run dir = {d}/run
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
ms bind ipv4 = true
ms bind ipv6 = false
public addr = 127.0.0.1
mon data avail warn = 1
mon data avail crit = 0
client mount timeout = 20
rados osd op timeout = 30
[mon]
mon data = {d}/mon/$name
[osd]
osd data = {d}/osd0
osd objectstore = bluestore
bluestore block path = {d}/osd0.block
bluestore block create = true
bluestore block size = {block_size}
bluestore fsck on mkfs = false
osd max object name len = 256
osd max object namespace len = 64
osd memory target = 939524096
bluestore cache size = 134217728
[mgr]
mgr data = {d}/mgr/$cluster-$id
mgr initial modules =
"""


@dataclass
class Cluster:
    dir: Path
    port: int
    conf: Path

    @staticmethod
    def start(directory: Path, block_size: int = 4 << 30, mgr: bool = False) -> Cluster:
        """A new cluster under ``directory`` (created; must not hold one already) with the
        RADOS pool TEST_POOL, ready for I/O. ``mgr``: also a ceph-mgr (no modules), which
        usage numbers need (``ceph df``, librados' cluster and pool stats); it reports them
        some seconds after the start."""
        d = directory
        for sub in ("mon", "osd0", "run", "log", "mgr/ceph-x"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            port = _free_port()
            c = Cluster(d, port, d / "ceph.conf")
            c.conf.write_text(CONF.format(fsid=uuid.uuid4(), port=port, d=d,
                                          block_size=block_size))
            try:
                c._bootstrap()
                if mgr:
                    c._start_mgr()
                return c
            except (subprocess.CalledProcessError, TimeoutError):
                c.stop(remove=False)
                if attempt == 2:
                    raise
                shutil.rmtree(d / "mon")
                (d / "mon").mkdir()
        raise AssertionError("unreachable")

    def _run(self, *args: str) -> str:
        return subprocess.run([*args], check=True, capture_output=True, text=True,
                              timeout=60).stdout

    def _bootstrap(self) -> None:
        conf = str(self.conf)
        fsid = next(line.split("=")[1].strip() for line in self.conf.read_text().splitlines()
                    if line.startswith("fsid"))
        monmap = str(self.dir / "monmap")
        keyring = str(self.dir / "keyring")
        # cephx: one keyring for every daemon and client.admin; the mon learns the keys
        # of mon. and client.admin at mkfs, the OSD's from ``osd new``.
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")
        self._run("ceph-authtool", keyring, "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr",
                  "allow *")
        self._run("monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{self.port}]", monmap)
        self._run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", monmap,
                  "--keyring", keyring)
        self._run("ceph-mon", "-c", conf, "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_key = self._run("ceph-authtool", "--gen-print-key").strip()
        self._run("ceph-authtool", keyring, "--add-key", osd_key, "-n", "osd.0")
        with self.client() as r:
            rc, _out, err = r.mon_command(
                json.dumps({"prefix": "osd new", "uuid": osd_uuid, "id": 0}),
                json.dumps({"cephx_secret": osd_key}).encode(), timeout=30)
            if rc != 0:
                raise subprocess.CalledProcessError(rc, "osd new", err)
            self._run("ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
            self._run("ceph-osd", "-c", conf, "-i", "0")
            self.create_pool(r, TEST_POOL)

    def _start_mgr(self) -> None:
        with self.client() as r:
            rc, out, err = r.mon_command(json.dumps(
                {"prefix": "auth get-or-create", "entity": "mgr.x",
                 "caps": ["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"]}),
                b"", timeout=30)
            if rc != 0:
                raise subprocess.CalledProcessError(rc, "auth get-or-create", err)
        key = next(line.split("=", 1)[1].strip() for line in out.decode().splitlines()
                   if "key" in line)
        self._run("ceph-authtool", str(self.dir / "keyring"), "--add-key", key, "-n", "mgr.x")
        self._run("ceph-mgr", "-c", str(self.conf), "-i", "x")

    def client(self) -> contextlib.AbstractContextManager[Any]:
        """A connected librados client (rados.Rados) of this cluster."""
        rados = load()

        @contextlib.contextmanager
        def connected() -> Any:
            r = rados.Rados(conffile=str(self.conf))
            r.connect(timeout=20)
            try:
                yield r
            finally:
                r.shutdown()
        return connected()

    @staticmethod
    def create_pool(r: Any, name: str) -> None:
        """Create RADOS pool ``name`` and wait until an object can be written to it."""
        for cmd in ({"prefix": "osd pool create", "pool": name, "pg_num": 8, "pgp_num": 8},
                    {"prefix": "osd pool application enable", "pool": name,
                     "app": "storaged"}):
            rc, _out, err = r.mon_command(json.dumps(cmd), b"", timeout=30)
            if rc != 0:
                raise subprocess.CalledProcessError(rc, str(cmd["prefix"]), err)
        deadline = time.monotonic() + START_TIMEOUT
        io = r.open_ioctx(name)
        try:
            while True:
                try:
                    io.write_full("probe", b"up")
                    io.remove_object("probe")
                    return
                except load().Error:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"RADOS pool {name} not writable") from None
                    time.sleep(0.2)
        finally:
            io.close()

    def pids(self) -> list[int]:
        out = []
        for f in (self.dir / "run").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                out.append(int(f.read_text().strip()))
        return out

    def stop(self, remove: bool = True) -> None:
        """Kill the daemons (a throwaway cluster keeps nothing worth a clean shutdown,
        which takes the OSD seconds) and remove the directory."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
