"""What the benchmarks that drive servers from outside share: a result row, a free port,
waiting for a server to listen."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass


@dataclass
class Result:
    target: str
    test: str
    mbps: float
    iops: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str,
              timeout: float = 60) -> None:
    """Return once something listens on ``port``; raise if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port}")
