"""The FUSE export end to end: the real daemon (a subprocess) with a real mount, driven by
real tools (qemu-img, mkfs.ext4 + mount -o loop + e2fsck, fio, du/df/truncate/rm/mv) and
checked against storagectl and NBD. Invariant 1 (fsync, sync through a loop mount, kill -9),
7 (snapshot files), 8 (ENOSPC, then the mount goes on) and 9 (clean errnos).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import loop_devices
from tests.kit.daemonkit import Daemon, _free_port
from tests.kit.vmdaemon import live_mount

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse"),
    reason="/dev/fuse is missing: this machine (or container) cannot mount FUSE file systems")


def run(*argv: str | Path, ok: bool = True, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if ok:
        assert r.returncode == 0, f"{' '.join(map(str, argv))}: {r.stdout}{r.stderr}"
    return r


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class FuseDaemon(Daemon):
    """The real daemon with its FUSE mount (no metrics, no iSCSI listener)."""

    def __init__(self, dir: Path, mnt: Path, sock: str, nbd_port: int) -> None:
        super().__init__(dir, sock, nbd_port, 0,
                         args=("--iscsi-listen", "off", "--fuse-mount", str(mnt)))
        self.mnt = mnt

    def up(self) -> bool:
        return live_mount(self.mnt) and super().up()

    def volumes(self) -> dict[str, int]:
        listed = self.json("volume", "list")
        assert isinstance(listed, list)
        return {v["name"]: v["size_bytes"] for v in listed}

    def url(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{name}"

    def create_pool(self, name: str = "tank", n: int = 3, size: str = "256M",
                    profile: str = "ec:2+1") -> None:
        devs = [str(self.dir / f"{name}{i}.img") for i in range(n)]
        self.ok("pool", "create", name, *devs, "--profile", profile, "--extent-size", "4M",
                "--file-size", size)


@pytest.fixture
def fused(tmp_path: Path) -> Iterator[FuseDaemon]:
    d = FuseDaemon(tmp_path, tmp_path / "mnt", str(tmp_path / "ctl.sock"), _free_port())
    d.start()
    d.create_pool()
    try:
        yield d
    finally:
        for path in tmp_path.glob("loop-*"):   # loop mounts a failed test left behind
            run("umount", "-l", path, ok=False)
        if d.proc is not None:
            # SIGTERM answers what is in flight, flushes and unmounts.
            assert d.stop() == 0, d.log()
            assert not mounted(d.mnt), "SIGTERM left the mount behind"
        if mounted(d.mnt):
            run("fusermount3", "-u", "-z", d.mnt, ok=False)


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _nbd_read(d: FuseDaemon, name: str, where: Path) -> bytes:
    out = where / f"nbd-{name.replace('/', '_')}.raw"
    run("nbdcopy", d.url(name), out)
    return out.read_bytes()


# ---- data paths -----------------------------------------------------------------------------
def test_qemu_img_convert_in_and_out_byte_exact_with_nbd(fused: FuseDaemon,
                                                         tmp_path: Path) -> None:
    data = bytearray(_random(64 * MiB, 1))
    data[20 * MiB:24 * MiB] = bytes(4 * MiB)        # a zero run: a hole in the volume
    (tmp_path / "src.raw").write_bytes(data)
    src = tmp_path / "src.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", tmp_path / "src.raw", src)
    target = fused.mnt / "tank" / "img"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, target)
    assert "identical" in run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src,
                              target).stdout
    assert fused.volumes()["tank/img"] == 64 * MiB
    assert _nbd_read(fused, "tank/img", tmp_path) == data
    # The reverse: written over NBD, read through the mount.
    fused.ok("volume", "create", "tank/back", "--size", "64M")
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", src, fused.url("tank/back"))
    assert (fused.mnt / "tank" / "back").read_bytes() == data
    assert "identical" in run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src,
                              fused.mnt / "tank" / "back").stdout


def test_unaligned_and_o_direct_io_is_coherent_with_nbd_at_once(fused: FuseDaemon,
                                                               tmp_path: Path) -> None:
    """direct_io: no page cache, so a write on either side is seen on the other at once
    (through a file descriptor that was open all along), at any offset and length."""
    path = fused.mnt / "tank" / "v"
    run("truncate", "-s", "8M", path)
    model = bytearray(8 * MiB)
    rng = random.Random(7)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(200):
            off = rng.randrange(0, 8 * MiB - 1)
            n = rng.randrange(1, min(300_000, 8 * MiB - off))
            chunk = rng.randbytes(n)
            assert os.pwrite(fd, chunk, off) == n
            model[off:off + n] = chunk
        for _ in range(50):
            off = rng.randrange(0, 8 * MiB)
            n = rng.randrange(1, 200_000)
            assert os.pread(fd, n, off) == model[off:off + n]
        assert _nbd_read(fused, "tank/v", tmp_path) == model     # no fsync needed
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000 70000", fused.url("tank/v"))
        model[1000:71000] = b"\x5a" * 70000
        assert os.pread(fd, 8 * MiB, 0) == model                  # no stale cache
        assert os.pread(fd, 100, 8 * MiB - 50) == model[-50:]     # short read at the end
        assert os.pread(fd, 100, 8 * MiB) == b""
    finally:
        os.close(fd)
    # O_DIRECT with aligned buffers.
    buf = mmap.mmap(-1, 1 * MiB)
    buf.write(_random(1 * MiB, 8))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], 3 * MiB) == MiB
        model[3 * MiB:4 * MiB] = bytes(buf)
        back = mmap.mmap(-1, 1 * MiB)
        assert os.preadv(fd, [back], 3 * MiB) == MiB
        assert bytes(back) == bytes(buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _nbd_read(fused, "tank/v", tmp_path) == model
    # Writing past the end grows the volume to whole sectors.
    with open(path, "r+b") as f:
        f.seek(8 * MiB + 100)
        f.write(b"tail")
    assert fused.volumes()["tank/v"] == 8 * MiB + 512
    assert path.read_bytes()[8 * MiB:] == bytes(100) + b"tail" + bytes(408)


def _tree(root: Path, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    sums = {}
    for i in range(40):
        sub = root / f"d{i % 5}"
        sub.mkdir(exist_ok=True)
        data = rng.randbytes(rng.randrange(0, 300_000))
        (sub / f"f{seed}-{i}").write_bytes(data)
        sums[f"d{i % 5}/f{seed}-{i}"] = hashlib.sha256(data).hexdigest()
    return sums


def _sums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("f*") if p.is_file()}


def test_ext4_on_a_volume_file_survives_umount_snapshot_and_kill9(fused: FuseDaemon,
                                                                 tmp_path: Path) -> None:
    with loop_devices():           # (a worker running test_blockdev may hold the others)
        _ext4_on_a_volume_file(fused, tmp_path)


def _ext4_on_a_volume_file(fused: FuseDaemon, tmp_path: Path) -> None:
    image = fused.mnt / "tank" / "ext4"
    run("truncate", "-s", "96M", image)
    run("mkfs.ext4", "-q", image)
    lo = tmp_path / "loop-fs"
    lo.mkdir()
    run("mount", "-o", "loop", image, lo)
    try:
        first = _tree(lo, 1)
        run("sync")                                   # reaches us as fsync via the loop
        fused.ok("snapshot", "create", "tank/ext4@one")
        second = _tree(lo, 2)
    finally:
        run("umount", lo)
    r = run("e2fsck", "-fn", image, ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
    run("mount", "-o", "loop", image, lo)
    try:
        assert _sums(lo) == first | second
    finally:
        run("umount", lo)
    # The snapshot mounts read-only with exactly the files of snapshot time (noload: its
    # journal was live when it was taken, and a read-only device cannot be replayed).
    snap = tmp_path / "loop-snap"
    snap.mkdir()
    run("mount", "-o", "loop,ro,noload", fused.mnt / "tank" / ".snapshots" / "ext4@one",
        snap)
    try:
        assert _sums(snap) == first
    finally:
        run("umount", snap)
    # kill -9 after sync: the flushed tree survives; the restarted daemon clears the
    # stale mount the dead one left.
    run("mount", "-o", "loop", image, lo)
    third = _tree(lo, 3)
    run("sync")
    fused.stop(signal.SIGKILL)
    run("umount", "-l", lo)
    assert os.stat(fused.mnt.parent) is not None
    with pytest.raises(OSError) as stale:
        os.stat(fused.mnt)
    assert stale.value.errno == errno.ENOTCONN
    fused.start()
    assert "stale mount" in fused.log()
    run("mount", "-o", "loop", image, lo)             # replays the ext4 journal
    try:
        assert _sums(lo) == first | second | third
    finally:
        run("umount", lo)
    r = run("e2fsck", "-fn", image, ok=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_handle_follows_its_volume_through_truncate_to_zero_and_regrowth(
        fused: FuseDaemon, tmp_path: Path) -> None:
    """fuse.fs VolumeFS invariant 1: read and write answer on the handle's volume without
    resolving the inode only while that volume is not deleted. A file truncated to 0 (its
    volume deleted, a placeholder left) and grown again by a write through the same open
    handle reads the new volume's bytes, never the old one's (which a stale handle would
    still hold in its record cache), and NBD sees the same."""
    pool = fused.mnt / "tank"
    old, new = _random(256 * 1024, 11), _random(64 * 1024, 12)
    fd = os.open(pool / "t", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, old, 0)                         # a placeholder grows into a volume
        os.fsync(fd)
        for at in range(0, len(old), 4096):           # 4K reads: the handle's fast path
            assert os.pread(fd, 4096, at) == old[at:at + 4096]
        os.pwrite(fd, b"x" * 4096, 8192)              # a 4K rewrite of a cached block
        assert os.pread(fd, 4096, 8192) == b"x" * 4096
        os.ftruncate(fd, 0)                           # the volume goes, the handle stays
        assert "tank/t" not in fused.volumes()
        assert os.pread(fd, 4096, 0) == b"" and os.fstat(fd).st_size == 0
        os.pwrite(fd, new, 4096)                      # a new volume, through the handle
        assert fused.volumes()["tank/t"] == 4096 + len(new)
        want = bytes(4096) + new
        for at in range(0, len(want), 4096):
            assert os.pread(fd, 4096, at) == want[at:at + 4096]
        os.pwrite(fd, b"y" * 4096, 8192)
        want = want[:8192] + b"y" * 4096 + want[12288:]
        assert os.pread(fd, len(want), 0) == want
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _nbd_read(fused, "tank/t", tmp_path) == want
    check = fused.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check


@pytest.mark.parametrize("direct", [0, 1])
def test_fio_verify_crc32c(fused: FuseDaemon, direct: int) -> None:
    path = fused.mnt / "tank" / "fio"
    run("truncate", "-s", "32M", path)
    r = run("fio", "--name=verify", f"--filename={path}", "--rw=randwrite", "--bs=4k",
            "--bsrange=512-64k", "--size=24M", "--verify=crc32c", "--verify_fatal=1",
            f"--direct={direct}", "--ioengine=libaio", "--iodepth=16", "--do_verify=1",
            "--verify_state_save=0", "--output-format=json", ok=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 24 * MiB


def test_concurrent_1m_reads_verify_from_buffer_and_pool(fused: FuseDaemon) -> None:
    """VolumeFS.read answers whole-block reads in one shared buffer (fuse/fs.py: pyfuse3
    copies it into the reply before any other request runs): 1 MiB reads eight at a time,
    first of buffered blocks, then (after fsync) of records, each verified by fio."""
    path = fused.mnt / "tank" / "seq"
    run("truncate", "-s", "32M", path)
    common = [f"--filename={path}", "--bs=1m", "--size=32M", "--verify=crc32c",
              "--verify_fatal=1", "--direct=1", "--ioengine=libaio", "--iodepth=8",
              "--verify_state_save=0", "--output-format=json"]
    for args in (["--name=w", "--rw=write", "--do_verify=1", "--end_fsync=1"],
                 ["--name=w", "--rw=write", "--verify_only"]):
        r = run("fio", *args, *common, ok=False)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["read"]["io_bytes"] >= 32 * MiB, job["read"]


# ---- attributes -----------------------------------------------------------------------------
def test_du_shows_thin_usage_and_df_shows_the_pool(fused: FuseDaemon) -> None:
    path = fused.mnt / "tank" / "thin"
    run("truncate", "-s", "1G", path)
    st = os.stat(path)
    assert (st.st_size, st.st_blocks) == (1 << 30, 0)
    assert run("du", "-B1", path).stdout.split()[0] == "0"
    before = st.st_mtime_ns
    time.sleep(0.01)
    with open(path, "r+b") as f:
        f.seek(10 * MiB)
        f.write(_random(3 * MiB, 3))                 # 48 blocks of 64 KiB
    st = os.stat(path)
    assert st.st_blocks * 512 == 3 * MiB
    assert st.st_mtime_ns > before and st.st_ctime_ns >= st.st_mtime_ns
    assert run("du", "-B1", path).stdout.split()[0] == str(3 * MiB)
    assert run("ls", "-s", "--block-size=1", path).stdout.split()[0] == str(3 * MiB)
    with open(path, "r+b") as f:
        f.seek(100 * MiB + 1)
        f.write(b"x")                                 # one more 64 KiB block
    assert os.stat(path).st_blocks * 512 == 3 * MiB + 64 * 1024
    pool = fused.json("pool", "status", "tank")
    assert isinstance(pool, dict)
    vfs = os.statvfs(fused.mnt)
    assert vfs.f_blocks * vfs.f_frsize == pool["size_bytes"]
    assert vfs.f_bavail * vfs.f_frsize == pool["free_bytes"]
    df = run("df", "-B1", "--output=source,size", fused.mnt).stdout.splitlines()[1].split()
    assert df == ["storaged", str(pool["size_bytes"])]


def test_fallocate_is_eopnotsupp_and_seek_hole_sees_one_data_run(fused: FuseDaemon) -> None:
    """pyfuse3 registers no fallocate and no lseek handler, so the kernel answers
    fallocate with EOPNOTSUPP and SEEK_DATA/SEEK_HOLE with its generic answer (the whole
    file is data). Trim goes over NBD; here: a file, so the byte range reads the same."""
    path = fused.mnt / "tank" / "t"
    run("truncate", "-s", "4M", path)
    fd = os.open(path, os.O_RDWR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        for mode in (0, 0x01 | 0x02, 0x10):   # allocate, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE
            assert libc.fallocate(fd, mode, 0, MiB) == -1
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4 * MiB
    finally:
        os.close(fd)
    # Trimming over NBD frees what the file held.
    with open(path, "r+b") as f:
        f.write(b"\x01" * MiB)
    assert os.stat(path).st_blocks * 512 == MiB
    run("qemu-io", "-f", "raw", "-c", "discard 0 1M", fused.url("tank/t"))
    assert os.stat(path).st_blocks == 0
    assert path.read_bytes() == bytes(4 * MiB)


# ---- the namespace --------------------------------------------------------------------------
def test_create_truncate_rename_unlink_match_storagectl(fused: FuseDaemon) -> None:
    pool = fused.mnt / "tank"
    run("truncate", "-s", "20G", pool / "new")
    assert fused.volumes() == {"tank/new": 20 << 30}
    vol = fused.json("volume", "info", "tank/new")
    assert isinstance(vol, dict) and vol["profile"] == "ec:2+1"     # the pool's default
    run("qemu-img", "create", "-f", "raw", pool / "q", "1G")
    assert fused.volumes() == {"tank/new": 20 << 30, "tank/q": 1 << 30}
    run("truncate", "-s", "40G", pool / "new")                       # grow
    assert fused.volumes()["tank/new"] == 40 << 30
    with open(pool / "q", "r+b") as f:
        f.write(b"keep" * 1024)
    run("truncate", "-s", "1M", pool / "q")                          # shrink keeps the head
    assert fused.volumes()["tank/q"] == MiB and os.stat(pool / "q").st_size == MiB
    assert (pool / "q").read_bytes() == b"keep" * 1024 + bytes(MiB - 4096)
    r = run("truncate", "-s", "1000", pool / "q", ok=False)          # not whole sectors
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert fused.volumes()["tank/q"] == MiB
    # A created file is a placeholder until it has a size, then a volume.
    (pool / "empty").touch()
    assert os.stat(pool / "empty").st_size == 0 and "tank/empty" not in fused.volumes()
    os.rename(pool / "empty", pool / "empty2")                      # placeholders rename
    os.truncate(pool / "empty2", 2 * MiB)
    assert fused.volumes()["tank/empty2"] == 2 * MiB
    # A volume renames (storagectl volume rename), data and all; it does not replace one.
    os.rename(pool / "q", pool / "q2")
    assert "tank/q" not in fused.volumes() and fused.volumes()["tank/q2"] == MiB
    assert (pool / "q2").read_bytes()[:4096] == b"keep" * 1024
    with pytest.raises(OSError) as e:
        os.rename(pool / "q2", pool / "new")
    assert e.value.errno == errno.EOPNOTSUPP and fused.volumes()["tank/new"] == 40 << 30
    fused.ok("volume", "rename", "tank/q2", "q")                     # and back, by storagectl
    assert (pool / "q").read_bytes()[:4096] == b"keep" * 1024 and not (pool / "q2").exists()
    # Changes made with storagectl show up in the mount at once.
    fused.ok("volume", "create", "tank/fromctl", "--size", "3M")
    assert os.stat(pool / "fromctl").st_size == 3 * MiB
    fused.ok("volume", "resize", "tank/fromctl", "--size", "5M")
    assert os.stat(pool / "fromctl").st_size == 5 * MiB
    fused.ok("volume", "delete", "tank/fromctl")
    assert not (pool / "fromctl").exists()
    # unlink deletes; refused while open or while snapshots (and so clones) depend on it.
    with open(pool / "q", "rb"):
        with pytest.raises(OSError) as e:
            os.unlink(pool / "q")
        assert e.value.errno == errno.EBUSY
    os.unlink(pool / "q")
    fused.ok("snapshot", "create", "tank/new@s")
    fused.ok("snapshot", "clone", "tank/new@s", "tank/kid")
    with pytest.raises(OSError) as e:
        os.unlink(pool / "new")
    assert e.value.errno == errno.EBUSY
    assert sorted(os.listdir(pool)) == [".snapshots", "empty2", "kid", "new"]
    assert sorted(fused.volumes()) == ["tank/empty2", "tank/kid", "tank/new"]
    # Everything else gets a clean errno.
    refused: list[tuple[Callable[[], object], int]] = [
        (lambda: os.mkdir(pool / "dir"), errno.EPERM),
        (lambda: os.symlink("x", pool / "ln"), errno.EPERM),
        (lambda: os.link(pool / "new", pool / "hard"), errno.EPERM),
        (lambda: os.chmod(pool / "new", 0o644), errno.EPERM),
        (lambda: os.mkdir(fused.mnt / "pool2"), errno.EPERM),
        ((fused.mnt / "x").touch, errno.EPERM),
        ((pool / "bad name").touch, errno.EINVAL)]
    for action, code in refused:
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == code
    assert sorted(fused.volumes()) == ["tank/empty2", "tank/kid", "tank/new"]


def test_snapshot_files_are_read_only_with_the_data_of_their_time(fused: FuseDaemon) -> None:
    pool = fused.mnt / "tank"
    run("truncate", "-s", "4M", pool / "v")
    old = _random(4 * MiB, 5)
    (pool / "v").write_bytes(old)                    # O_TRUNC: deleted and re-created
    assert fused.volumes()["tank/v"] == 4 * MiB
    fused.ok("snapshot", "create", "tank/v@before")
    with open(pool / "v", "r+b") as f:
        f.write(b"\xff" * MiB)
    snap = pool / ".snapshots" / "v@before"
    assert os.listdir(pool / ".snapshots") == ["v@before"]
    assert snap.read_bytes() == old
    assert os.stat(snap).st_size == 4 * MiB and os.stat(snap).st_mode & 0o222 == 0
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            os.open(snap, flags)
        assert e.value.errno in (errno.EROFS, errno.EACCES)
    # Even root (which passes the permission check) gets EROFS.
    with pytest.raises(OSError) as e:
        os.truncate(snap, MiB)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.unlink(snap)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        (pool / ".snapshots" / "new@x").touch()
    assert e.value.errno == errno.EROFS
    assert (pool / "v").read_bytes()[:MiB] == b"\xff" * MiB


def test_full_pool_gives_enospc_and_the_mount_keeps_working(fused: FuseDaemon) -> None:
    fused.create_pool("small", n=1, size="64M", profile="plain")
    pool = fused.mnt / "small"
    run("truncate", "-s", "256M", pool / "filler")
    run("truncate", "-s", "16M", pool / "keep")
    keep = _random(1 * MiB, 9)
    fd = os.open(pool / "keep", os.O_RDWR)
    os.pwrite(fd, keep, 0)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(pool / "filler", os.O_RDWR)
    written = 0
    try:
        with pytest.raises(OSError) as e:
            for i in range(256):
                os.pwrite(fd, _random(MiB, 100 + i), i * MiB)
                written += MiB
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert 0 < written < 64 * MiB
    # The mount goes on: reads, stat, listing, and writes once space is freed.
    assert (pool / "keep").read_bytes()[:MiB] == keep
    assert sorted(os.listdir(pool)) == [".snapshots", "filler", "keep"]
    os.unlink(pool / "filler")                                   # delete always works
    assert "small/filler" not in fused.volumes()
    data = _random(4 * MiB, 11)
    fd = os.open(pool / "keep", os.O_RDWR)
    try:
        os.pwrite(fd, data, 2 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (pool / "keep").read_bytes()[2 * MiB:6 * MiB] == data


def test_sigterm_flushes_and_unmounts(fused: FuseDaemon) -> None:
    path = fused.mnt / "tank" / "v"
    run("truncate", "-s", "2M", path)
    data = _random(2 * MiB, 12)
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, data, 0)                            # no fsync: SIGTERM must flush it
    os.close(fd)
    assert fused.stop() == 0
    assert not mounted(fused.mnt)
    fused.start()
    assert path.read_bytes() == data


def test_a_live_mount_point_is_refused(fused: FuseDaemon, tmp_path: Path) -> None:
    """A second daemon given the first one's live mount point exits 1 and says so; the
    first mount serves on. Run to its exit, not through Daemon.start: the second daemon
    may answer its own control socket for a moment before it gets to the mount, and
    start() would then take it for up."""
    other = FuseDaemon(tmp_path / "b", fused.mnt, str(tmp_path / "b.sock"), _free_port())
    other.dir.mkdir()
    r = subprocess.run(other.argv(), capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 1 and "already a mount point" in r.stdout + r.stderr, r
    assert os.listdir(fused.mnt) == ["tank"]
    shutil.rmtree(other.dir)


def test_open_files_block_delete_rename_rollback_until_forced(fused: FuseDaemon) -> None:
    """DESIGN invariant 10 through the mount (volumes/openers.py invariants 1-4): open
    handles make a volume (or snapshot) busy for storagectl, named by count; refusals
    change nothing; changes made through the mount itself keep its handles working;
    --force revokes the handles (EBADF afterwards) and the file is gone."""
    pool = fused.mnt / "tank"
    fused.ok("volume", "create", "tank/f", "--size", "4M")
    data = _random(MiB, 7)
    with open(pool / "f", "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    fused.ok("snapshot", "create", "tank/f@s")
    fd, fd2 = os.open(pool / "f", os.O_RDWR), os.open(pool / "f", os.O_RDONLY)
    sfd = os.open(pool / ".snapshots" / "f@s", os.O_RDONLY)
    try:
        info = fused.json("volume", "info", "tank/f")
        assert isinstance(info, dict)
        assert info["clients"] == [{"protocol": "fuse", "client": "2 open handles"}]
        exports = fused.json("export", "list")
        assert isinstance(exports, list)
        assert {e["name"]: e["clients"] for e in exports}["tank/f@s"] == [
            {"protocol": "fuse", "client": "1 open handle"}]
        for args in (("volume", "delete", "tank/f", "-r"), ("volume", "rename", "tank/f", "g"),
                     ("snapshot", "rollback", "tank/f@s"), ("snapshot", "delete", "tank/f@s")):
            r = fused.ctl(*args)
            assert r.returncode == 1 and "FUSE: " in r.stderr and "in use" in r.stderr, r
            assert os.pread(fd2, MiB, 0) == data and os.pread(sfd, MiB, 0) == data
        assert sorted(fused.volumes()) == ["tank/f"]
        # Through the mount, its own handles do not count: rename and shrink work.
        os.rename(pool / "f", pool / "g")
        os.ftruncate(fd, 2 * MiB)
        assert fused.volumes() == {"tank/g": 2 * MiB}
        assert os.pread(fd2, MiB, 0) == data
        check = fused.json("pool", "check", "tank", "--deep")
        assert isinstance(check, dict) and check["ok"], check
        # Forced: both handles of the volume and the snapshot's are revoked.
        fused.ok("volume", "delete", "tank/g", "-r", "--force")
        assert not (pool / "g").exists() and fused.volumes() == {}
        for handle in (fd, fd2, sfd):
            with pytest.raises(OSError) as e:
                os.pread(handle, 4096, 0)
            assert e.value.errno == errno.EBADF
        assert "revoked 2 open handle(s)" in fused.log()
    finally:
        for handle in (fd, fd2, sfd):
            os.close(handle)
    # The mount goes on serving.
    fused.ok("volume", "create", "tank/after", "--size", "1M")
    (pool / "after").write_bytes(data)
    assert (pool / "after").read_bytes() == data


def test_open_files_make_pool_export_busy_until_forced(fused: FuseDaemon) -> None:
    """DESIGN invariant 10 for a whole pool (volumes/openers.py 3-4, manager claim_pool):
    open handles of a volume file and a snapshot file make `pool export` refuse (one line
    naming the FUSE clients) and change nothing (handles read on, pool still imported,
    deep check clean); --force revokes them (EBADF), the pool's directory leaves the
    mount, and it imports again with the data byte-exact."""
    pool = fused.mnt / "tank"
    fused.ok("volume", "create", "tank/f", "--size", "4M")
    data = _random(MiB, 11)
    with open(pool / "f", "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    fused.ok("snapshot", "create", "tank/f@s")
    fd, sfd = os.open(pool / "f", os.O_RDWR), os.open(pool / ".snapshots" / "f@s", os.O_RDONLY)
    try:
        r = fused.ctl("pool", "export", "tank")
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r
        assert "pool tank is in use by 2 client(s)" in r.stderr, r.stderr
        assert r.stderr.count("FUSE: 1 open handle") == 2 and "--force" in r.stderr
        assert os.pread(fd, MiB, 0) == data and os.pread(sfd, MiB, 0) == data
        pools = fused.json("pool", "list")
        assert isinstance(pools, list) and [p["name"] for p in pools] == ["tank"]
        check = fused.json("pool", "check", "tank", "--deep")
        assert isinstance(check, dict) and check["ok"], check
        fused.ok("pool", "export", "tank", "--force")
        for handle in (fd, sfd):
            with pytest.raises(OSError) as e:
                os.pread(handle, 4096, 0)
            assert e.value.errno == errno.EBADF
        assert fused.json("pool", "list") == [] and not pool.exists()
    finally:
        for handle in (fd, sfd):
            os.close(handle)
    fused.ok("pool", "import", "tank", *(f"--device={fused.dir / f'tank{i}.img'}"
                                         for i in range(3)))
    assert (pool / "f").read_bytes()[:MiB] == data
    assert (pool / ".snapshots" / "f@s").read_bytes()[:MiB] == data
