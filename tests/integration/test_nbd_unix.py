"""NBD on a Unix socket (``nbd.socket`` / ``--nbd-socket``), with the real daemon and real
clients (libnbd, qemu-img): a guest on the storage node itself reaches its disk without
the TCP stack (storaged.startup invariant D4 for the socket file).

- What is written over the Unix socket reads back byte-exact over TCP, and the reverse.
- The IP allow list (``nbd.allow``) keeps TCP peers out but not the Unix socket, whose
  file mode (0660) decides who connects.
- ``export list`` names each export's ``nbd+unix`` URI and its libvirt element;
  ``status`` names the socket.
- A second daemon given the same live socket is refused at start and changes nothing:
  the first goes on serving on it. A socket left by a daemon that was killed is
  replaced; a stopped daemon removes its own; a path that is not a socket, or a
  relative path, is refused.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

from tests.kit.daemonkit import BIN, Daemon, _free_port
from tests.kit.nbdharness import nbdsh_env

MiB = 1 << 20

READ = ("import sys, nbd\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
        "sys.stdout.buffer.write(h.pread(int(sys.argv[2]), int(sys.argv[3])))\n"
        "h.shutdown()\n")
WRITE = ("import sys, nbd\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
         "h.pwrite(sys.stdin.buffer.read(), int(sys.argv[2]))\nh.flush()\nh.shutdown()\n")


def _read(where: Path, uri: str, n: int, off: int) -> bytes:
    r = subprocess.run(["/usr/bin/python3", "-c", READ, uri, str(n), str(off)], cwd=where,
                       env=nbdsh_env(), capture_output=True, timeout=60, check=True)
    return r.stdout


def _write(where: Path, uri: str, data: bytes, off: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["/usr/bin/python3", "-c", WRITE, uri, str(off)], input=data,
                          cwd=where, env=nbdsh_env(), capture_output=True, timeout=60,
                          check=False)


def _daemon(where: Path, *args: str) -> Daemon:
    where.mkdir(parents=True, exist_ok=True)
    return Daemon(where, str(where / "ctl.sock"), _free_port(), 0, args=args)


def test_nbd_on_a_unix_socket_beside_tcp(tmp_path: Path) -> None:
    sock = str(tmp_path / "run" / "nbd.sock")
    conf = tmp_path / "storaged.toml"
    conf.write_text('[nbd]\nallow = ["192.0.2.0/24"]\n')
    d = _daemon(tmp_path / "a", "--nbd-socket", sock, "--config", str(conf))
    d.start()
    try:
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        d.ok("pool", "create", "tank", str(tmp_path / "d0.img"), "--file-size", "256M")
        d.ok("volume", "create", "tank/vm", "--size", "16M")
        unix = f"nbd+unix:///tank/vm?socket={sock}"
        data = os.urandom(3 * MiB + 4096)
        assert _write(tmp_path, unix, data, 512 * 1024).returncode == 0
        assert _read(tmp_path, unix, len(data), 512 * 1024) == data
        # The allow list is of IP networks: a loopback TCP client is not in it.
        r = _write(tmp_path, d.url("tank/vm"), b"x" * 4096, 0)
        assert r.returncode != 0
        assert _read(tmp_path, unix, 4096, 0) == bytes(4096)     # nothing of it landed

        exports = d.json("export", "list")
        assert isinstance(exports, list)
        item = next(e for e in exports if e["name"] == "tank/vm")
        assert item["nbd_unix"] == unix
        shown = d.ok("export", "list")
        assert f"<host transport='unix' socket='{sock}'/>" in shown
        status = d.json("status")
        assert isinstance(status, dict) and status["nbd"]["socket"] == sock
        # qemu-img reaches it too (a hypervisor's own client).
        info = subprocess.run(["qemu-img", "info", "--output=json", unix],
                              capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(info.stdout)["virtual-size"] == 16 * MiB

        # A second daemon given the same live socket: refused at start, nothing changed.
        other = tmp_path / "b"
        other.mkdir()
        r2 = subprocess.run([str(BIN / "storaged"), "--state-dir", str(other / "state"),
                             "--socket", str(other / "ctl.sock"), "--nbd-listen", "off",
                             "--metrics-listen", "off", "--iscsi-listen", "off",
                             "--nbd-socket", sock], capture_output=True, text=True,
                            timeout=60, check=False)
        assert r2.returncode == 1, r2.stderr
        assert f"nbd.socket {sock} is served by another running process" in r2.stderr
        assert _read(tmp_path, unix, len(data), 512 * 1024) == data

        # Killed: the socket stays behind, dead; the next start replaces it.
        d.stop(signal.SIGKILL)
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        d.start()
        assert _read(tmp_path, unix, len(data), 512 * 1024) == data
        # Stopped: it removes its own socket.
        d.stop()
        assert not os.path.exists(sock)
    finally:
        if d.proc is not None:
            d.stop(signal.SIGKILL)


def test_a_bad_nbd_socket_path_is_refused_and_left_alone(tmp_path: Path) -> None:
    plain = tmp_path / "not-a-socket"
    plain.write_bytes(b"keep me")
    for path, says in ((str(plain), "exists and is not a socket"),
                       ("relative/nbd.sock", "nbd.socket must be an absolute path")):
        r = subprocess.run([str(BIN / "storaged"), "--state-dir", str(tmp_path / "state"),
                            "--socket", str(tmp_path / "ctl.sock"), "--nbd-listen", "off",
                            "--metrics-listen", "off", "--iscsi-listen", "off",
                            "--nbd-socket", path], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 1 and says in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert plain.read_bytes() == b"keep me"
    assert not (tmp_path / "ctl.sock").exists()
