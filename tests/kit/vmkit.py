"""The VM test tier's guest kit: real guests under qemu-system-x86_64, built from Debian
packages on this machine, nothing downloaded (issue 26).

The guest is the ``linux-image-amd64`` kernel plus an initramfs the kit writes itself
(a ``newc`` cpio, no cpio tool needed): ``busybox-static``, the host's e2fsprogs binaries
(``mke2fs``, ``e2fsck``) with the shared libraries ``ldd`` names (busybox's own mke2fs makes
only ext2), and the kernel's virtio/SCSI/ext4 modules with their dependencies resolved
through ``modules.dep``. Its init loads the modules, runs ``/guest.sh`` and reports on the
serial console:

    VMKIT:BOOTED                 init is up, modules loaded
    VMKIT:<anything> ...         what the guest program prints with ``mark``
    VMKIT:EXIT <rc>              the program's exit status; then the guest powers off

The guest program is a second cpio archive appended to the base one (the kernel unpacks
concatenated archives in order), so one base image serves every test. The host talks to
a running guest on a second serial port (``ttyS1``, a Unix socket on the host): the guest
program's ``hostwait`` reads one line from it.

Invariants of the kit:
  K1. A guest never outlives its test: ``Guest`` is a context manager that kills qemu on
      exit, and qemu runs with ``-no-reboot`` so a guest that panics or powers off ends.
  K2. The accelerator is probed once per session with a real boot: KVM when a guest boots
      on it within 8 s, TCG otherwise (on some hosts /dev/kvm exists and qemu aborts or
      hangs on it). STORAGED_VM_ACCEL=kvm or tcg skips the probe.
  K3. What the guest reports is read only from lines that start with ``VMKIT:`` on its
      console, so kernel messages interleaved with them cannot be mistaken for results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import lzma
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
MARK = "VMKIT:"

# Loaded in this order (each after its modules.dep dependencies). The crypto modules are
# requested by name at run time (ext4's metadata_csum needs crc32c, sd_mod's t10-pi the
# CRC-T10DIF and CRC64 transforms) and there is no modprobe helper in the guest.
MODULES = ("crc32c_generic", "crct10dif_generic", "crc64_rocksoft_generic", "virtio_pci",
           "virtio_blk", "virtio_scsi", "sd_mod", "ext4")
HOST_BINARIES = ("/usr/sbin/mke2fs", "/usr/sbin/e2fsck")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do insmod "/modules/$m" || echo "VMKIT:INSMOD-FAILED $m"; done
echo 1 > /proc/sys/kernel/printk
mark() { echo "VMKIT:$*"; }
hostwait() { read -r _line < /dev/ttyS1; }
waitdev() {
  i=0
  while [ ! -b "$1" ]; do
    i=$((i+1)); [ $i -gt 600 ] && { mark "NODEV $1"; return 1; }; sleep 0.05
  done
}
mark BOOTED
( . /guest.sh ) ; rc=$?
sync
echo "VMKIT:EXIT $rc"
poweroff -f
"""

# The guest program is sourced by init's shell (in a subshell), not exec'd, so that the
# helpers above (mark, hostwait, waitdev) are its shell functions.


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
                ino: int = 0) -> bytes:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + namez
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


class Cpio:
    """A ``newc`` archive being written (the kernel's initramfs format)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.dirs: set[str] = set()
        self.ino = 1

    def _next(self) -> int:
        self.ino += 1
        return self.ino

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.dir(os.path.dirname(name))
        self.dirs.add(name)
        self.parts.append(_cpio_entry(name, stat.S_IFDIR | 0o755, ino=self._next()))

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self.parts.append(_cpio_entry(name, stat.S_IFREG | mode, data, ino=self._next()))

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self.parts.append(_cpio_entry(name, stat.S_IFLNK | 0o777, target.encode(),
                                      ino=self._next()))

    def chardev(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self.parts.append(_cpio_entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor),
                                      ino=self._next()))

    def bytes(self) -> bytes:
        trailer = _cpio_entry("TRAILER!!!", 0)
        out = b"".join([*self.parts, trailer])
        return out + b"\0" * (-len(out) % 512)


def kernel_release() -> str | None:
    """The newest Debian kernel in /boot that has its modules, or None."""
    found = []
    for p in Path("/boot").glob("vmlinuz-*"):
        rel = p.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / rel / "modules.dep").exists():
            found.append(rel)
    return sorted(found)[-1] if found else None


def missing_tools() -> str | None:
    """Why this host cannot run the tier (a package not installed), or None."""
    if shutil.which(QEMU) is None:
        return "qemu-system-x86_64 is missing (Debian package qemu-system-x86)"
    if kernel_release() is None:
        return "no kernel with modules in /boot (Debian package linux-image-amd64)"
    if not Path("/bin/busybox").exists() or not _static_busybox():
        return "a static busybox is missing (Debian package busybox-static)"
    for b in HOST_BINARIES:
        if not Path(b).exists():
            return f"{b} is missing (Debian package e2fsprogs)"
    return None


def _static_busybox() -> bool:
    try:
        out = subprocess.run(["ldd", "/bin/busybox"], capture_output=True, text=True,
                             check=False)
    except FileNotFoundError:
        return False
    return "not a dynamic executable" in out.stdout + out.stderr


def _module_order(moddir: Path, wanted: Sequence[str]) -> list[str]:
    """Relative paths of ``wanted`` modules and their dependencies, dependencies first,
    from ``modules.dep`` (``path: dep dep ...``, deps listed deepest last); built-in
    modules are skipped."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = os.path.basename(path).split(".ko")[0]
        by_name[base.replace("-", "_")] = path
    builtin = {os.path.basename(p).split(".ko")[0].replace("-", "_")
               for p in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps.get(path, [])):
            add(d)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            add(by_name[key])
        elif key not in builtin:
            raise RuntimeError(f"kernel module {name} is neither in modules.dep nor built in")
    return order


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        raise RuntimeError(f"{path}: zstd-compressed modules are not supported by the kit")
    return data


@dataclass(frozen=True)
class GuestKit:
    """A built kernel + base initramfs, and the accelerator to boot them with."""

    kernel: Path
    initrd: Path
    accel: str = "tcg"

    def initrd_with(self, program: str, where: Path) -> Path:
        """The base initramfs with ``/guest.sh`` = program appended."""
        extra = Cpio()
        extra.file("guest.sh", program.encode(), 0o755)
        out = where / "initrd.img"
        with open(out, "wb") as f:
            f.write(self.initrd.read_bytes())
            f.write(extra.bytes())
        return out


def build_kit(cache: Path) -> GuestKit:
    """The kernel and base initramfs, built into ``cache`` (once; reused if there)."""
    rel = kernel_release()
    assert rel is not None
    moddir = Path("/lib/modules") / rel
    initrd = cache / f"base-{rel}.cpio"
    if not initrd.exists():
        a = Cpio()
        for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "mnt", "etc", "modules"):
            a.dir(d)
        a.chardev("dev/console", 5, 1)
        a.chardev("dev/null", 1, 3)
        a.file("bin/busybox", Path("/bin/busybox").read_bytes())
        a.symlink("bin/sh", "busybox")
        a.file("init", INIT.encode())
        order = _module_order(moddir, MODULES)
        names = []
        for rel_path in order:
            name = os.path.basename(rel_path).removesuffix(".xz").removesuffix(".zst")
            a.file(f"modules/{name}", _module_bytes(moddir / rel_path), 0o644)
            names.append(name)
        a.file("modules.list", ("\n".join(names) + "\n").encode(), 0o644)
        libs: set[str] = set()
        for b in HOST_BINARIES:
            a.file(f"sbin/{os.path.basename(b)}", Path(b).read_bytes())
            libs.update(_libraries(b))
        for lib in sorted(libs):
            a.file(lib, Path(lib).read_bytes())      # same path as on the host
            real = os.path.realpath(lib)
            if real != lib:
                a.file(real, Path(real).read_bytes())
        a.symlink("sbin/mkfs.ext4", "mke2fs")
        a.symlink("sbin/fsck.ext4", "e2fsck")
        if Path("/etc/mke2fs.conf").exists():
            a.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes(), 0o644)
        tmp = initrd.with_suffix(".tmp")
        tmp.write_bytes(a.bytes())
        tmp.rename(initrd)
    return GuestKit(Path(f"/boot/vmlinuz-{rel}"), initrd)


def probe_accel(kit: GuestKit, where: Path) -> str:
    """``kvm`` if a guest boots to its init on KVM here, else ``tcg`` (K2)."""
    forced = os.environ.get("STORAGED_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    where.mkdir(parents=True, exist_ok=True)
    try:
        with Guest(dataclasses.replace(kit, accel="kvm"), where, "mark PROBE\n") as g:
            g.wait_exit(timeout=8)
            return "kvm" if g.marks("PROBE") else "tcg"
    except (AssertionError, OSError, subprocess.SubprocessError):
        return "tcg"


# ---- disks as a hypervisor configures them ----------------------------------------------

def nbd_disk(port: int, export: str, *, reconnect_delay: int = 0, discard: bool = True,
             host: str = "127.0.0.1") -> dict[str, object]:
    """A ``-blockdev`` tree: raw over qemu's NBD client (``reconnect-delay`` seconds of
    reconnecting before requests fail), discard passed through (``discard=unmap``)."""
    nbd: dict[str, object] = {"driver": "nbd", "export": export,
                              "server": {"type": "inet", "host": host, "port": str(port)}}
    if reconnect_delay:
        nbd["reconnect-delay"] = reconnect_delay
    return {"driver": "raw", "discard": "unmap" if discard else "ignore",
            "cache": {"direct": True, "no-flush": False}, "file": nbd}


def iscsi_disk(portal: str, iqn: str, *, lun: int = 0, user: str | None = None,
               password_secret: str | None = None,
               initiator: str = "iqn.2026-11.org.storaged.test:vm") -> dict[str, object]:
    """A ``-blockdev`` tree over qemu's libiscsi driver."""
    iscsi: dict[str, object] = {"driver": "iscsi", "transport": "tcp", "portal": portal,
                                "target": iqn, "lun": lun, "initiator-name": initiator}
    if user is not None:
        iscsi["user"] = user
        iscsi["password-secret"] = password_secret
    return {"driver": "raw", "discard": "unmap", "cache": {"direct": True}, "file": iscsi}


def file_disk(path: Path) -> dict[str, object]:
    """A ``-blockdev`` tree: a raw file (the FUSE export) opened O_DIRECT, as libvirt's
    cache='none' opens it; discard as hole punching (which the mount refuses)."""
    return {"driver": "raw", "discard": "unmap", "cache": {"direct": True},
            "file": {"driver": "file", "filename": str(path), "aio": "threads",
                     "discard": "unmap", "cache": {"direct": True}}}


@dataclass
class Disk:
    """A block node and the device the guest sees it on: ``virtio-blk`` (``/dev/vdX``)
    or ``virtio-scsi`` (``/dev/sdX``)."""

    blockdev: dict[str, object]
    bus: str = "virtio-blk"
    serial: str = ""
    extra_objects: list[str] = field(default_factory=list)   # -object args (secrets)


def _disk_args(disks: Sequence[Disk]) -> list[str]:
    args: list[str] = []
    scsi = False
    for i, d in enumerate(disks):
        args += [a for o in d.extra_objects for a in ("-object", o)]
        node = dict(d.blockdev)
        node["node-name"] = f"disk{i}"
        args += ["-blockdev", json.dumps(node)]
        ser = f",serial={d.serial}" if d.serial else ""
        if d.bus == "virtio-blk":
            args += ["-device", f"virtio-blk-pci,drive=disk{i},id=dev{i}{ser}"]
        elif d.bus == "virtio-scsi":
            if not scsi:
                args += ["-device", "virtio-scsi-pci,id=scsi0"]
                scsi = True
            args += ["-device", f"scsi-hd,drive=disk{i},id=dev{i}{ser}"]
        else:
            raise ValueError(f"unknown bus {d.bus!r}")
    return args


class Guest:
    """One qemu process running the kit's kernel with ``program`` as the guest program.

    The console (ttyS0) goes to ``where/console.log``; ttyS1 is a Unix socket the host
    writes lines to (``send``). ``incoming`` starts qemu as a migration destination
    (``-incoming``) with the same devices; give it the source's ``where`` (it boots
    nothing itself, but qemu loads the same kernel and initramfs files) and another
    ``name``. Used as a context manager (K1).
    """

    def __init__(self, kit: GuestKit, where: Path, program: str,
                 disks: Sequence[Disk] = (), *, memory: str = "256M",
                 incoming: str | None = None, name: str = "guest") -> None:
        self.kit = kit
        self.where = where
        self.name = name
        where.mkdir(parents=True, exist_ok=True)
        self.console = where / f"{name}-console.log"
        self.console.write_bytes(b"")
        self.ctl_path = str(where / f"{name}-ttyS1.sock")
        self.qmp_path = str(where / f"{name}-qmp.sock")
        initrd = kit.initrd_with(program, where) if incoming is None else \
            where / "initrd.img"
        args = [QEMU, "-accel", kit.accel, "-cpu", "max" if kit.accel == "tcg" else "host",
                "-m", memory, "-smp", "1", "-nodefaults", "-display", "none",
                "-no-reboot", "-kernel", str(kit.kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 panic=-1 quiet loglevel=1 rdinit=/init "
                           "tsc=reliable no_timer_check",
                "-chardev", f"file,id=con,path={self.console}",
                "-serial", "chardev:con",
                "-chardev", f"socket,id=hostctl,path={self.ctl_path},server=on,wait=off",
                "-serial", "chardev:hostctl",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                *_disk_args(disks)]
        if incoming is not None:
            args += ["-incoming", incoming]
        self.log = open(where / f"{name}-qemu.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self._ctl: socket.socket | None = None

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._ctl is not None:
            self._ctl.close()
        self.log.close()

    # ---- what the guest says --------------------------------------------------------
    def text(self) -> str:
        return self.console.read_text(errors="replace")

    def lines(self) -> list[str]:
        """The guest's complete report lines (K3), without the marker prefix. A last line
        without its newline is still being printed, or was cut by a live migration (the
        rest of it is in the serial port's state, which the destination prints): it is
        left out, so a half-printed checksum is never taken for the guest's report."""
        out = []
        text = self.text()
        complete = text.splitlines()
        if complete and not text.endswith(("\n", "\r")):
            complete.pop()
        for line in complete:
            at = line.find(MARK)
            if at >= 0:
                out.append(line[at + len(MARK):].strip())
        return out

    def marks(self, word: str) -> list[str]:
        return [ln for ln in self.lines() if ln.split(" ", 1)[0] == word]

    def qemu_log(self) -> str:
        return (self.where / f"{self.name}-qemu.log").read_text(errors="replace")

    def _why(self) -> str:
        return (f"\n--- console ---\n{self.text()[-3000:]}\n--- qemu ---\n"
                f"{self.qemu_log()[-2000:]}")

    def wait_mark(self, word: str, count: int = 1, timeout: float = 120) -> list[str]:
        """Wait until the guest has printed ``count`` lines starting with ``word``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.marks(word)
            if len(got) >= count:
                return got
            if self.marks("EXIT") or self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {count} x {word!r} in {timeout} s"
                             f"{self._why()}")

    def wait_exit(self, timeout: float = 180) -> int:
        """The guest program's exit status, once it has powered off."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.marks("EXIT"):
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        exits = self.marks("EXIT")
        if not exits:
            raise AssertionError(f"{self.name}: the guest program did not finish in "
                                 f"{timeout} s{self._why()}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        return int(exits[-1].split()[1])

    def assert_ok(self, timeout: float = 180) -> None:
        rc = self.wait_exit(timeout)
        assert rc == 0, f"{self.name}: guest program exited {rc}{self._why()}"

    # ---- talking to it --------------------------------------------------------------
    def send(self, line: str = "go") -> None:
        """One line to the guest's ttyS1 (its ``hostwait`` returns)."""
        if self._ctl is None:
            s = socket.socket(socket.AF_UNIX)
            deadline = time.monotonic() + 10
            while True:
                try:
                    s.connect(self.ctl_path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self._ctl = s
        self._ctl.sendall(line.encode() + b"\n")

    def qmp(self, command: str, **arguments: object) -> dict[str, object]:
        """One QMP command on a fresh connection; its ``return`` (errors raise)."""
        with socket.socket(socket.AF_UNIX) as s:
            deadline = time.monotonic() + 10
            while True:
                try:
                    s.connect(self.qmp_path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            f = s.makefile("rwb")
            json.loads(f.readline())                      # greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise AssertionError(f"QMP {cmd}: {reply['error']}")
            ret = reply.get("return", {})
            return ret if isinstance(ret, dict) else {"return": ret}
