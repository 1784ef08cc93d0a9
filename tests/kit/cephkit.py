"""A throwaway one-node Ceph cluster for the RADOS tests (issue 24).

``Cluster.start(dir)``: one mon (msgr v2 on a free port of 127.0.0.1; cephx, with one
keyring ``<dir>/keyring`` that ceph.conf names, holding client.admin) and one bluestore
OSD on a sparse file, tuned down (cache, memory target) for a test machine; a replicated
RADOS pool of size 1 for the tests. Ready in about 4 s here. ``stop()`` kills the
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
mon osd reporter subtree level = osd
mon osd min down reporters = 1
osd heartbeat interval = 1
osd heartbeat grace = 4
rados osd op timeout = 30
[mon]
mon data = {d}/mon/$name
paxos propose interval = 0.01
[osd]
osd data = {d}/osd$id
osd objectstore = bluestore
bluestore block path = {d}/osd$id.block
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
[client]
admin socket =
"""
# paxos propose interval: the mon commits a change of its maps (an OSD map for a pool
# create or delete, a quota, a blocklist entry) at most once per interval, 1 s by default,
# so each such command took a second (a takeover's fence, every test's set-quota, the
# pool's create). At 10 ms they take about 12 ms; what a command does, and when its
# caller sees it done, is unchanged (a fence still waits for the OSD map that has it).
#
# Clients get no admin socket (Ceph's own default for clients). With the [global] path,
# every client.admin shared one, and a new client first asks the socket's holder whether
# it is alive: with that holder SIGSTOPped (a takeover test) the question times out after
# 10 s, which was most of a takeover through the daemon.


@dataclass
class Cluster:
    dir: Path
    port: int
    conf: Path

    osds: int = 1

    @staticmethod
    def start(directory: Path, block_size: int = 4 << 30, mgr: bool = False,
              osds: int = 1) -> Cluster:
        """A new cluster under ``directory`` (created; must not hold one already) with the
        RADOS pool TEST_POOL, ready for I/O. ``mgr``: also a ceph-mgr (no modules), which
        usage numbers need (``ceph df``, librados' cluster and pool stats); it reports them
        some seconds after the start. ``osds``: that many OSDs (each on its own sparse
        file); with more than one, TEST_POOL has size ``osds`` and min_size ``osds - 1``
        (an OSD may be down without stopping I/O; a killed one is marked down within
        seconds: the heartbeat settings in CONF)."""
        d = directory
        for sub in ("mon", "run", "log", "mgr/ceph-x", *(f"osd{i}" for i in range(osds))):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            port = _free_port()
            c = Cluster(d, port, d / "ceph.conf", osds)
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
        with self.client() as r:
            mkfs: list[tuple[str, ...]] = []
            for i in range(self.osds):
                osd_uuid = str(uuid.uuid4())
                osd_key = self._run("ceph-authtool", "--gen-print-key").strip()
                self._run("ceph-authtool", keyring, "--add-key", osd_key, "-n", f"osd.{i}")
                rc, _out, err = r.mon_command(
                    json.dumps({"prefix": "osd new", "uuid": osd_uuid, "id": i}),
                    json.dumps({"cephx_secret": osd_key}).encode(), timeout=30)
                if rc != 0:
                    raise subprocess.CalledProcessError(rc, "osd new", err)
                mkfs.append(("ceph-osd", "-c", conf, "-i", str(i), "--mkfs", "--osd-uuid",
                             osd_uuid))
            # The OSDs' mkfs, then their starts, at once: each waits mostly on its own
            # files and on the mon (about 1.5 s and 3 s each here), not on the CPU.
            self._run_all(mkfs)
            self._run_all([self._osd_argv(i) for i in range(self.osds)])
            self.create_pool(r, TEST_POOL, size=self.osds)

    def _run_all(self, argvs: list[tuple[str, ...]]) -> None:
        """Run the commands side by side; CalledProcessError (of the first that failed)
        unless every one exits 0 within 60 s (TimeoutError)."""
        procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for argv in argvs]
        deadline = time.monotonic() + 60
        failed: subprocess.CalledProcessError | None = None
        try:
            for argv, p in zip(argvs, procs, strict=True):
                try:
                    _out, err = p.communicate(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise TimeoutError(f"{' '.join(argv)}: no exit in 60 s") from None
                if p.returncode != 0 and failed is None:
                    failed = subprocess.CalledProcessError(p.returncode, argv, None, err)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failed is not None:
            raise failed

    def _osd_argv(self, i: int) -> tuple[str, ...]:
        return ("ceph-osd", "-c", str(self.conf), "-i", str(i))

    def start_osd(self, i: int) -> None:
        """Start OSD ``i`` (again, after ``kill_osd``)."""
        self._run(*self._osd_argv(i))

    def kill_osd(self, i: int) -> None:
        """SIGKILL OSD ``i`` and wait until it is gone."""
        pid = int((self.dir / "run" / f"osd.{i}.pid").read_text().strip())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

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
    def create_pool(r: Any, name: str, size: int = 1) -> None:
        """Create RADOS pool ``name`` (replicated, ``size`` copies, min_size ``size - 1``
        from 2 up) and wait until an object can be written to it."""
        cmds: list[dict[str, Any]] = [
            {"prefix": "osd pool create", "pool": name, "pg_num": 8, "pgp_num": 8},
            {"prefix": "osd pool application enable", "pool": name, "app": "storaged"}]
        if size > 1:
            cmds += [{"prefix": "osd pool set", "pool": name, "var": "size", "val": str(size)},
                     {"prefix": "osd pool set", "pool": name, "var": "min_size",
                      "val": str(max(1, size - 1))}]
        for cmd in cmds:
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

    def renew_pool(self) -> None:
        """Delete TEST_POOL with every object in it (and its quota, snapshots and
        application tag) and create it again, empty, as ``start`` made it: a test module
        that shares this cluster with earlier ones sees only its own objects."""
        with self.client() as r:
            rc, _out, err = r.mon_command(json.dumps(
                {"prefix": "osd pool rm", "pool": TEST_POOL, "pool2": TEST_POOL,
                 "yes_i_really_really_mean_it": True}), b"", timeout=30)
            if rc != 0:
                raise subprocess.CalledProcessError(rc, "osd pool rm", err)
        with self.client() as r:   # a new client: the first one's OSD map still has the old pool
            self.create_pool(r, TEST_POOL, size=self.osds)

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
