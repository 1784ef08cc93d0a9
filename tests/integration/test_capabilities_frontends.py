"""NBD and iSCSI announce what ``Volume.capabilities()`` says (issue 23), for a writable
volume and for a read-only snapshot export of it, as real clients see it: ``nbdinfo
--json`` for the NBD transmission flags and block sizes, and INQUIRY VPD B0/B1/B2, READ
CAPACITY (16) and MODE SENSE (10) over an iSCSI session for the SCSI side. The two frontends
therefore agree with each other too."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import trio

from tests.kit.iscsiharness import Served, served_pool
from tests.kit.iscsiraw import RawInitiator
from tests.kit.nbdharness import run
from volumes import Capabilities


def scsi_view(srv: Served, snap: str | None) -> dict[str, int | bool]:
    """What the iSCSI target announces about LUN 0 of the volume (or snapshot) target."""
    with RawInitiator(srv.host, srv.port, initiator="iqn.2026-01.org.test:caps",
                      timeout=10) as s:
        resp = s.login(srv.iqn("vol", snap))
        assert (resp.status_class, resp.status_detail) == (0, 0)

        def page(n: int) -> bytes:
            r = s.scsi(bytes([0x12, 0x01, n, 0, 255, 0]), read=255)
            assert r.status == 0 and r.data[1] == n, r
            return r.data

        b0, b1, b2 = page(0xB0), page(0xB1), page(0xB2)
        rc = s.scsi(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2),
                    read=32)
        ms = s.scsi(bytes([0x5A, 0x08, 0x3F, 0, 0, 0, 0, 0x10, 0, 0]), read=4096)
        assert rc.status == 0 and ms.status == 0
        assert ms.data[8] & 0x3F == 0x08               # caching page first (DBD: no desc)
        return {
            "write_protect": bool(ms.data[3] & 0x80),
            "dpofua": bool(ms.data[3] & 0x10),
            "wce": bool(ms.data[8 + 2] & 0x04),
            "lbpme": bool(rc.data[14] & 0x80),
            "lbprz_capacity": bool(rc.data[14] & 0x40),
            "optimal_granularity": int.from_bytes(b0[6:8], "big") * 512,
            "unmap_granularity": int.from_bytes(b0[28:32], "big") * 512,
            "non_rotating": int.from_bytes(b1[4:6], "big") == 1,
            "lbpu": bool(b2[5] & 0x80),
            "lbpws": bool(b2[5] & 0x40),
            "lbprz": bool(b2[5] & 0x04),
            "thin": b2[6] & 0x07 == 0x02,
        }


def assert_agree(caps: Capabilities, nbd: dict[str, object],
                 scsi: dict[str, int | bool]) -> None:
    # NBD: flags and block sizes, one for one.
    assert nbd["is_read_only"] is caps.read_only
    assert nbd["is_rotational"] is caps.rotational
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_cache", "can_multi_conn"):
        assert nbd[flag] is getattr(caps, flag), flag
    assert nbd["block_size_minimum"] == caps.minimum_block
    assert nbd["block_size_preferred"] == caps.preferred_block
    assert caps.maximum_block is None or nbd["block_size_maximum"] == caps.maximum_block
    # iSCSI: the same value, in SCSI's words.
    assert scsi["write_protect"] is caps.read_only
    assert scsi["dpofua"] is caps.can_fua
    assert scsi["wce"] is caps.volatile_cache is caps.can_flush
    assert scsi["lbpme"] is scsi["thin"] is scsi["lbpu"] is scsi["lbpws"] is caps.thin
    assert scsi["lbprz"] is scsi["lbprz_capacity"] is caps.zeroes_unmapped
    assert scsi["optimal_granularity"] == caps.preferred_block
    assert scsi["unmap_granularity"] == caps.unmap_granularity
    assert scsi["non_rotating"] is not caps.rotational
    # And so the frontends agree: a trim NBD offers is one SCSI offers on a writable unit.
    assert nbd["can_trim"] is (scsi["lbpu"] and not scsi["write_protect"])


async def test_nbd_and_iscsi_announce_the_volume_capabilities(tmp_path: Path) -> None:
    async with served_pool(tmp_path / "pool", {"vol": 16 << 20}) as srv:
        await srv.vm.snapshot("vol", "s")
        for snap, vol in ((None, srv.vm.get("vol")),
                          ("s", srv.vm.snapshot_volume("vol", "s"))):
            caps = vol.capabilities()
            assert caps.read_only is (snap is not None)
            export = "tank/vol" + (f"@{snap}" if snap else "")
            out = (await run(["nbdinfo", "--json",
                              f"nbd://127.0.0.1:{srv.nbd_port}/{export}"])).ok()
            nbd = json.loads(out.stdout)["exports"][0]
            scsi = await trio.to_thread.run_sync(scsi_view, srv, snap)
            assert_agree(caps, nbd, scsi)
