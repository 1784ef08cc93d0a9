"""VM tier (issue 26): live migration with shared storage.

Two qemu processes attached to the same volume over NBD at the same time (storaged
advertises multi-conn): the source runs a guest that writes with fsync; the destination
waits with ``-incoming``. The source migrates (QMP ``migrate`` over a Unix socket) while
the guest writes; the guest goes on in the destination, and then reads back, with its
caches dropped, every file it wrote before and after the switch, and e2fsck finds ext4
clean. Proves that storaged serves the destination what the source wrote (DESIGN
invariant 1: qemu flushes the source's disks at switch-over; one volume object behind
every connection, so no stale data, buffered or not) and that two connections to one
volume at once are safe.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_vm_restart import WRITERS
from tests.kit import vmkit
from tests.kit.vmdaemon import VmDaemon
from tests.kit.vmkit import Disk, GuestKit

pytestmark = pytest.mark.vm

PROGRAM = WRITERS + r"""
set -e
waitdev /dev/vda
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda
mkdir -p /mnt/0 && mount -t ext4 /dev/vda /mnt/0
writer /mnt/0 & p0=$!
mark WRITING
hostwait
touch /tmp/stop
wait $p0
(cd /mnt/0 && sha256sum w* > /tmp/sums)
umount /mnt/0
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/vda /mnt/0
(cd /mnt/0 && sha256sum -c -s /tmp/sums) && mark SUMS-OK $(wc -l < /tmp/sums)
for f in /mnt/0/w*; do mark HAVE ${f#/mnt/0/w} $(sha256sum $f | cut -d' ' -f1); done
umount /mnt/0
e2fsck -fn /dev/vda > /tmp/fsck 2>&1 && mark FSCK-CLEAN
mark DEVSUM $(sha256sum /dev/vda)
"""


@pytest.fixture
def vmd(tmp_path: Path, one_guest_at_a_time: None) -> Iterator[VmDaemon]:
    d = VmDaemon(tmp_path)
    d.start()
    try:
        d.create_pool()
        d.create_volume("vm", "48M")
        yield d
    finally:
        if d.proc is not None:
            d.stop(signal.SIGKILL)


def migrate(src: vmkit.Guest, channel: str) -> None:
    """QMP ``migrate`` to ``channel`` until it completes. The destination opens its disks
    before it listens, so the first tries may find no socket yet: those are retried."""
    deadline = time.monotonic() + 120
    src.qmp("migrate", uri=channel)
    while (st := src.qmp("query-migrate")).get("status") != "completed":
        assert time.monotonic() < deadline, st
        if st.get("status") == "failed" and "Failed to connect" in str(st.get("error-desc")):
            time.sleep(0.5)
            src.qmp("migrate", uri=channel)
            continue
        assert st.get("status") not in ("failed", "cancelled"), st
        time.sleep(0.2)


def written(g: vmkit.Guest) -> dict[int, str]:
    return {int(ln.split()[2]): ln.split()[3] for ln in g.marks("W")}


def test_live_migration_while_the_guest_writes(guest_kit: GuestKit, vmd: VmDaemon,
                                               tmp_path: Path) -> None:
    where = tmp_path / "g"
    disk = Disk(vmkit.nbd_disk(vmd.nbd_port, "tank/vm", reconnect_delay=10))
    channel = f"unix:{tmp_path / 'migrate.sock'}"
    with vmkit.Guest(guest_kit, where, PROGRAM, [disk], name="src") as src:
        src.wait_mark("WRITING", timeout=300)
        src.wait_mark("W", count=4, timeout=120)
        with vmkit.Guest(guest_kit, where, PROGRAM, [disk], name="dst",
                         incoming=channel) as dst:
            # Both are attached now: two NBD connections to one volume.
            deadline = time.monotonic() + 30
            while len(vmd.clients("vm")) < 2:
                assert time.monotonic() < deadline, vmd.log()
                time.sleep(0.1)
            migrate(src, channel)
            assert dst.qmp("query-status")["status"] == "running"
            before = written(src)
            src.close()                                    # the source is gone
            # The guest goes on in the destination: new fsynced writes land there.
            dst_before = len(written(dst))
            deadline = time.monotonic() + 120
            while len(written(dst)) < dst_before + 4:
                assert time.monotonic() < deadline, dst.text()[-2000:]
                assert not dst.marks("WERR"), dst.lines()
                time.sleep(0.2)
            dst.send()
            dst.assert_ok(timeout=240)
            after = written(dst)
            lines = dst.lines()
            have = {int(ln.split()[1]): ln.split()[2] for ln in dst.marks("HAVE")}
            guest_sum = dst.marks("DEVSUM")[0].split()[1]
    assert before and after and not (set(after) <= set(before)), (before, after)
    every = {**before, **after}
    assert {n: d for n, d in every.items() if have.get(n) != d} == {}, lines
    assert "FSCK-CLEAN" in lines, lines
    assert any(ln.startswith("SUMS-OK ") for ln in lines), lines
    assert vmd.volume_sha256("vm", tmp_path) == guest_sum
