"""The real daemon as a subprocess, for end-to-end tests: start/stop it, drive it with
storagectl, reach its exports with qemu-io. The ``daemon`` fixture is in conftest.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pool import owner as owners

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    dir: Path
    sock: str
    nbd_port: int
    metrics_port: int                   # 0: metrics off
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()          # more storaged flags (e.g. --config FILE)

    def start(self) -> None:
        log = open(self.dir / "daemon.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log()}")
            if self.up():
                return
            time.sleep(0.01)
        raise AssertionError(f"daemon did not come up: {self.log()}")

    def argv(self) -> list[str]:
        """The daemon's command line."""
        return [str(BIN / "storaged"), "--state-dir", str(self.dir / "state"), "--socket",
                self.sock, "--nbd-listen", f"127.0.0.1:{self.nbd_port}", "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "off",
                "--iscsi-listen", "127.0.0.1:0", *self.args]

    def up(self) -> bool:
        """Serving: the control socket answers ``status`` (storagectl's request, asked
        from this process: a storagectl process per poll took 0.1-0.3 s of every start)."""
        return os.path.exists(self.sock) and answers(self.sock)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self.proc = None
        return rc

    def log(self) -> str:
        return (self.dir / "daemon.log").read_text(errors="replace")[-4000:]

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "storagectl"), "--socket", self.sock, *args],
                              capture_output=True, text=True, timeout=60, check=False)

    def ok(self, *args: str) -> str:
        r = self.ctl(*args)
        assert r.returncode == 0, f"storagectl {' '.join(args)}: {r.stderr}"
        return r.stdout

    def json(self, *args: str) -> object:
        return json.loads(self.ok("--json", *args))

    def url(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{name}"


def answers(path: str, seconds: float = 60.0) -> bool:
    """Whether the control socket ``path`` answers the request ``storagectl status``
    sends with a result (not an error) within ``seconds`` that says the daemon is ready
    (everything up: its FUSE mount and metrics listener too, as at READY=1)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(seconds)
        buf = b""
        try:
            s.connect(path)
            s.sendall(json.dumps({"method": "status", "params": {}}).encode() + b"\n")
            while b"\n" not in buf:
                data = s.recv(1 << 16)
                if not data:
                    return False
                buf += data
        except OSError:         # not listening (yet), reset, or no answer in time
            return False
    answer = json.loads(buf.split(b"\n", 1)[0])
    return "result" in answer and answer["result"].get("ready", True) is True


def start_daemon(tmp_path: Path) -> Daemon:
    d = Daemon(tmp_path, str(tmp_path / "ctl.sock"), _free_port(), _free_port())
    d.start()
    return d


def stop_daemon(d: Daemon) -> None:
    if d.proc is not None:
        d.stop(signal.SIGKILL)


def _qemu_io(url: str, *cmds: str, read_only: bool = False) -> str:
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, url], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "failed" not in r.stdout.lower(), r.stdout + r.stderr
    return r.stdout


def member_digests(paths: list[Path], *, mask_owner: bool = True) -> list[str]:
    """A hash per member of every data region (holes skipped), with the owner block
    masked (the live owner rewrites it every heartbeat)."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        fd = os.open(p, os.O_RDONLY)
        try:
            size, pos = os.fstat(fd).st_size, 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                data = bytearray(os.pread(fd, end - start, start))
                lo = owners.OWNER_OFFSET - start
                if mask_owner and 0 <= lo < len(data):
                    data[lo:lo + owners.OWNER_SIZE] = bytes(owners.OWNER_SIZE)
                h.update(b"@%d:" % start + data)
                pos = end
        finally:
            os.close(fd)
        out.append(h.hexdigest())
    return out
