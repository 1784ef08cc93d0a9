"""Shared fixtures: sets of sparse device files in a test's tmp_path.

``disks(n)`` gives a ``DiskSet``: n file paths that can be created as sparse FileDevices,
reopened (leaving some out, in any order), hashed, and saved/restored as exact images
(only the non-hole parts are kept, so saving 6 x 64 MiB sparse files is cheap).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from pool import FileDevice
from storaged.tuning import tune_process
from tests.kit import schedule, vmkit
from tests.kit.daemonkit import Daemon, start_daemon, stop_daemon
from tests.kit.vmkit import GuestKit

DEV_SIZE = 64 << 20

# The engine runs in the test process as it runs in the daemon.
tune_process()

# A saved file: (size, [(offset, bytes) of each data region]).
Image = tuple[int, list[tuple[int, bytes]]]


class DiskSet:
    """n device files ``<prefix><i>`` in one directory."""

    def __init__(self, directory: Path, n: int, size: int, prefix: str) -> None:
        self.size = size
        self.paths = [directory / f"{prefix}{i}" for i in range(n)]

    def create(self) -> list[FileDevice]:
        return [FileDevice(str(p), create_size=self.size) for p in self.paths]

    def open(self, without: Iterable[int] = (), order: Sequence[int] | None = None
             ) -> list[FileDevice]:
        """FileDevices of the members not in ``without``, in ``order`` if given."""
        skip = set(without)
        idx = list(order) if order is not None else list(range(len(self.paths)))
        return [FileDevice(str(self.paths[i])) for i in idx if i not in skip]

    def digests(self) -> list[str]:
        """A hash per file of its size and every data region (offset and bytes): any
        changed byte changes it (holes read as zeros; a hole filled in counts as a change).
        """
        out = []
        for p in self.paths:
            size, regions = _save(p)
            h = hashlib.sha256(b"%d" % size)
            for off, data in regions:
                h.update(b"@%d:%d:" % (off, len(data)))
                h.update(data)
            out.append(h.hexdigest())
        return out

    def save(self) -> list[Image]:
        return [_save(p) for p in self.paths]

    def restore(self, images: list[Image]) -> None:
        for p, img in zip(self.paths, images, strict=True):
            _restore(p, img)


def _save(path: Path) -> Image:
    regions = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            regions.append((start, os.pread(fd, end - start, start)))
            pos = end
    finally:
        os.close(fd)
    return size, regions


def _restore(path: Path, image: Image) -> None:
    size, regions = image
    with open(path, "wb") as f:   # (re)created empty: a removed file comes back too
        f.truncate(size)
        for off, data in regions:
            f.seek(off)
            f.write(data)


@pytest.fixture
def disks(tmp_path: Path) -> Callable[..., DiskSet]:
    """A factory: ``disks(n, size=DEV_SIZE, prefix="d")`` -> DiskSet in tmp_path."""

    def make(n: int, size: int = DEV_SIZE, prefix: str = "d") -> DiskSet:
        return DiskSet(tmp_path, n, size, prefix)
    return make


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """The real storaged as a subprocess with its own state dir, socket and ports."""
    d = start_daemon(tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


@contextlib.contextmanager
def loop_devices() -> Iterator[None]:
    """Held by every test that attaches loop devices: the host may have only the eight
    /dev/loopN nodes it booted with (a container cannot make more), and tests on two xdist
    workers, plus the kernel's lazy release of a loop device after umount, ran out of them
    ("failed to setup loop device")."""
    fd = os.open("/tmp/storaged-tests-loop.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def guest_kit(tmp_path_factory: pytest.TempPathFactory) -> GuestKit:
    """The VM tier's kernel + initramfs (tests/kit/vmkit.py), built once per session, with
    the accelerator probed (vmkit K2). Skips, saying why, where the packages are missing."""
    why = vmkit.missing_tools()
    if why is not None:
        pytest.skip(f"cannot boot guests: {why}")
    cache = tmp_path_factory.mktemp("vmkit")
    kit = vmkit.build_kit(cache)
    return dataclasses.replace(kit, accel=vmkit.probe_accel(kit, cache / "probe"))


@pytest.fixture
def one_guest_at_a_time() -> Iterator[None]:
    """Held by every test that boots guests: they are CPU-heavy (TCG), and two at once
    on this 2-core machine would starve each other's timeouts."""
    fd = os.open("/tmp/storaged-tests-vm.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadgroup`` with the work units and order of tests/kit/schedule.py: the VM
    tier's modules as one group and each RADOS module as one, whatever their marks (xdist
    3.8 groups by an ``item._nodeid`` suffix that pytest 9.2 no longer reads, so its
    ``xdist_group`` marks are lost), handed out longest first so that neither worker is
    left idle at the end while the other runs a long test."""
    if config.getvalue("dist") != "loadgroup":
        return None   # xdist's own choice
    from xdist.scheduler import LoadGroupScheduling  # type: ignore[import-untyped]  # noqa: PLC0415

    sched = LoadGroupScheduling(config, log)
    by_mark = sched._split_scope

    def split_scope(nodeid: str) -> str:
        unit = schedule.scope(nodeid)
        return unit if unit != nodeid else str(by_mark(nodeid))

    sched._split_scope = split_scope
    assign = sched._assign_work_unit
    ordered = False

    def assign_longest_first(node: object) -> None:
        # The first call comes once the whole work queue is known (xdist's schedule()).
        nonlocal ordered
        if not ordered:
            ordered = True
            queue = sched.workqueue
            for unit in schedule.longest_first(queue):
                queue.move_to_end(unit)
        assign(node)

    sched._assign_work_unit = assign_longest_first
    return sched
