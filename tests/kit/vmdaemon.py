"""The real daemon as the VM tier needs it: NBD and iSCSI on fixed ports (a restarted
daemon comes back where qemu reconnects), the FUSE mount where /dev/fuse exists, and a pool
``tank`` with volumes for the guests."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.kit.daemonkit import Daemon, _free_port

MiB = 1 << 20


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def live_mount(path: Path) -> bool:
    """A FUSE mount at ``path`` that answers: not the stale one a killed daemon left
    (ENOTCONN), which the next daemon clears and replaces only after its control socket
    already answers."""
    if not mounted(path):
        return False
    try:
        os.stat(path)
    except OSError:
        return False
    return True


class VmDaemon(Daemon):
    """storaged with NBD, iSCSI (fixed port) and, if ``fuse``, a FUSE mount."""

    def __init__(self, dir: Path, *, fuse: bool = False) -> None:
        self.iscsi_port = _free_port()
        self.mnt: Path | None = dir / "mnt" if fuse else None
        args = ["--iscsi-listen", f"127.0.0.1:{self.iscsi_port}"]
        if self.mnt is not None:
            args += ["--fuse-mount", str(self.mnt)]
        super().__init__(dir, str(dir / "ctl.sock"), _free_port(), 0, args=tuple(args))

    def up(self) -> bool:
        if self.mnt is not None and not live_mount(self.mnt):
            return False
        return super().up()

    def create_pool(self, size: str = "1G") -> None:
        self.ok("pool", "create", "tank", str(self.dir / "tank0.img"), "--file-size", size)

    def create_volume(self, name: str, size: str = "64M") -> None:
        self.ok("volume", "create", f"tank/{name}", "--size", size)

    def used(self, name: str) -> int:
        info = self.json("volume", "info", f"tank/{name}")
        assert isinstance(info, dict)
        return int(info["used_bytes"])

    def clients(self, name: str) -> list[object]:
        info = self.json("volume", "info", f"tank/{name}")
        assert isinstance(info, dict)
        return list(info["clients"])

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.iscsi_port}"

    def iqn(self, name: str) -> str:
        return f"iqn.2026-11.org.storaged:tank:{name}"

    def volume_sha256(self, name: str, where: Path) -> str:
        """The whole volume as storaged serves it (read over NBD by qemu-img)."""
        out = where / f"{name}.read.raw"
        r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                            self.url(f"tank/{name}"), str(out)],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        h = hashlib.sha256()
        with open(out, "rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
        os.unlink(out)
        return h.hexdigest()
