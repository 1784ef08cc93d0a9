"""The iSCSI target against real initiators on loopback: libiscsi's tools and its
conformance suite (iscsi-test-cu), and qemu-img through its libiscsi block driver; data
written over iSCSI reads back byte-identical over NBD (one Volume API, coherent)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.kit.iscsiharness import served_pool
from tests.kit.nbdharness import run

pytestmark = pytest.mark.slow


async def test_discovery_inquiry_and_capacity(tmp_path: Path) -> None:
    async with served_pool(tmp_path / "pool", {"vol": 64 << 20, "Other_Vol": 8 << 20}) as srv:
        await srv.vm.snapshot("vol", "s1")
        ls = (await run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{srv.port}"])).ok()
        assert f"Target:{srv.iqn()} Portal:127.0.0.1:{srv.port},1" in ls.stdout
        assert f"Target:{srv.iqn('vol', 's1')} " in ls.stdout
        assert "iqn.2026-11.org.storaged:tank:other-vol " in ls.stdout   # name mapping
        inq = (await run(["iscsi-inq", srv.url()])).ok()
        assert "Vendor:STORAGED" in inq.stdout and "DIRECT_ACCESS" in inq.stdout
        cap = (await run(["iscsi-readcapacity16", srv.url()])).ok()
        assert "LOGICAL BLOCK LENGTH IN BYTES:512" in cap.stdout
        assert f"Total size:{64 << 20}" in cap.stdout and "LBPME:1" in cap.stdout
        vpd = (await run(["iscsi-inq", "-e", "1", srv.url()])).ok()
        assert "LOGICAL_BLOCK_PROVISIONING" in vpd.stdout and "BLOCK_LIMITS" in vpd.stdout
        # An unknown target is refused at login.
        bad = await run(["iscsi-inq", f"iscsi://127.0.0.1:{srv.port}/iqn.2026-11.x:no/0"])
        assert bad.returncode != 0


async def test_write_over_iscsi_reads_back_over_nbd(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 << 20))
    async with served_pool(tmp_path / "pool", {"vol": 32 << 20}) as srv:
        (await run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                    srv.url()])).ok()
        back = tmp_path / "back.img"
        (await run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    f"nbd://127.0.0.1:{srv.nbd_port}/tank/vol", str(back)])).ok()
        assert back.read_bytes()[:16 << 20] == src.read_bytes()
        assert back.read_bytes()[16 << 20:] == bytes(16 << 20)
        # And back out over iSCSI, from a read-only snapshot target.
        await srv.vm.snapshot("vol", "s1")
        snap = tmp_path / "snap.img"
        (await run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.url("vol", "s1"),
                    str(snap)])).ok()
        assert snap.read_bytes() == back.read_bytes()
        wp = await run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                        srv.url("vol", "s1")])
        assert wp.returncode != 0


async def test_libiscsi_conformance_suite(tmp_path: Path) -> None:
    """libiscsi's whole default test list, destructive tests included, against a thin
    volume: no failures. Skips are counted and documented in docs/iscsi.md."""
    async with served_pool(tmp_path / "pool", {"vol": 256 << 20}) as srv:
        cu = await run(["iscsi-test-cu", "-d", "-n", srv.url()], seconds=400,
                       cwd=tmp_path)
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", cu.stdout)
    assert summary, f"no CUnit summary:\n{cu}"
    total, ran, passed, failed = map(int, summary.groups())
    skipped = cu.stdout.count("[SKIPPED]")
    print(f"iscsi-test-cu: {total} tests, {ran} ran, {passed} passed, {failed} failed, "
          f"{skipped} [SKIPPED] lines")
    failures = re.findall(r"Suite (\S+), Test (\S+) had failures", cu.stdout)
    assert failed == 0, f"failing: {sorted(set(failures))}\n{cu}"
    assert ran == total >= 600
