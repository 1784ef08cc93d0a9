"""benchmarks/restart: how long storaged is away when it is restarted under its clients
(issue 26: upgrading storaged under running VMs).

For N open volumes (default 1, 10 and 100): a pool of three sparse files (ec:2+1), N
volumes, one NBD connection per volume with 1 MiB written and not flushed (as a guest's
write cache leaves it). Then, timed: SIGTERM -> the process has exited (it flushes
every volume and commits the pool), and start -> the control socket answers and every
volume accepts an NBD handshake again. qemu's NBD client rides this out while it is
shorter than its ``reconnect-delay``; libiscsi retries its login.

    .venv/bin/python -m benchmarks.restart [--volumes 1,10,100] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import free_port

BIN = Path(sys.executable).parent
MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise ConnectionError("server closed the connection")
        buf += got
    return buf


def nbd_open(port: int, name: str, timeout: float = 10) -> socket.socket:
    """A connection in the transmission phase (old-style NBD_OPT_EXPORT_NAME)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    _recv(s, 18)                                    # NBDMAGIC, IHAVEOPT, handshake flags
    s.sendall(struct.pack(">I", 3))                 # FIXED_NEWSTYLE | NO_ZEROES
    data = name.encode()
    s.sendall(struct.pack(">QII", IHAVEOPT, 1, len(data)) + data)
    _recv(s, 10)                                    # size, transmission flags
    return s


def nbd_write(s: socket.socket, offset: int, data: bytes) -> None:
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 7, offset, len(data)) + data)
    magic, err, _cookie = struct.unpack(">IIQ", _recv(s, 16))
    if magic != REPLY_MAGIC or err:
        raise OSError(err, "NBD write failed")


class Storaged:
    def __init__(self, where: Path) -> None:
        self.where = where
        self.sock = str(where / "ctl.sock")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.where / "daemon.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [str(BIN / "storaged"), "--state-dir", str(self.where / "state"),
             "--socket", self.sock, "--nbd-listen", f"127.0.0.1:{self.port}",
             "--metrics-listen", "off", "--iscsi-listen", "off", "--log-level", "warning"],
            stdout=log, stderr=log)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "storagectl"), "--socket", self.sock, *args],
                              capture_output=True, text=True, timeout=120, check=False)

    def wait_up(self, timeout: float = 120) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("storaged exited: see daemon.log")
            if os.path.exists(self.sock):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.sock)
                    return
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError("storaged did not come up")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=300)
        self.proc = None


def measure(where: Path, n: int) -> tuple[float, float, float]:
    """(stop, control socket up, every volume served) in seconds, with n open, dirty
    volumes."""
    d = Storaged(where)
    d.start()
    d.wait_up()
    devs = [str(where / f"d{i}") for i in range(3)]
    r = d.ctl("pool", "create", "tank", *devs, "--profile", "ec:2+1", "--file-size", "4G")
    assert r.returncode == 0, r.stderr
    for i in range(n):
        r = d.ctl("volume", "create", f"tank/v{i}", "--size", "1G")
        assert r.returncode == 0, r.stderr
    conns = [nbd_open(d.port, f"tank/v{i}") for i in range(n)]
    payload = os.urandom(MiB)
    for c in conns:
        nbd_write(c, 0, payload)
    t0 = time.monotonic()
    d.stop()
    stopped = time.monotonic() - t0
    for c in conns:
        c.close()
    t1 = time.monotonic()
    d.start()
    deadline = time.monotonic() + 120
    pending = list(range(n))
    d.wait_up()
    up = time.monotonic() - t1
    while pending:                      # every volume is served again
        try:
            nbd_open(d.port, f"tank/v{pending[0]}", timeout=2).close()
            pending.pop(0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    started = time.monotonic() - t1
    d.stop()
    return stopped, up, started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", default="1,10,100", help="comma-separated volume counts")
    ap.add_argument("--dir", help="where the pool files go (default: a temporary dir)")
    args = ap.parse_args()
    print(f"{'volumes':>8} {'stop (s)':>9} {'socket (s)':>11} {'served (s)':>11} "
          f"{'away (s)':>9}")
    for n in (int(x) for x in args.volumes.split(",")):
        where = Path(tempfile.mkdtemp(prefix="restart-", dir=args.dir))
        try:
            stop, up, start = measure(where, n)
        finally:
            shutil.rmtree(where, ignore_errors=True)
        print(f"{n:>8} {stop:>9.2f} {up:>11.2f} {start:>11.2f} {stop + start:>9.2f}",
              flush=True)


if __name__ == "__main__":
    main()
