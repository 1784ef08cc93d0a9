"""Persistent reservations: the pure state machine (SPC-4 §5.9), and in the real daemon
over raw iSCSI sessions from two initiators, surviving a restart. (libiscsi's
PersistentReserve tests run in the conformance suite, tests/integration/test_iscsi_clients.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from iscsi import reservations as pr
from iscsi.reservations import Nexus, Reservations
from storaged.ctl.client import call
from tests.kit.daemonkit import Daemon
from tests.kit.iscsiraw import RawInitiator, prin, prout, read10, write10

A = Nexus("iqn.2026-01.org.test:a", b"\x80\0\0\0\0\1")
B = Nexus("iqn.2026-01.org.test:b", b"\x80\0\0\0\0\2")
C = Nexus("iqn.2026-01.org.test:c", b"\x80\0\0\0\0\3")


def params(key: int, sark: int = 0, flags: int = 0) -> bytes:
    return key.to_bytes(8, "big") + sark.to_bytes(8, "big") + bytes([0] * 4 + [flags, 0,
                                                                                0, 0])


def registered(*nexuses: Nexus) -> Reservations:
    r = Reservations()
    for i, n in enumerate(nexuses, 1):
        assert r.prout(n, pr.PROUT_REGISTER, 0, 0, params(0, i)) == pr.GOOD
    return r


@pytest.mark.parametrize(("rtype", "reg_read", "reg_write", "other_read", "other_write"), [
    (pr.WRITE_EXCLUSIVE, True, False, True, False),
    (pr.EXCLUSIVE_ACCESS, False, False, False, False),
    (pr.WRITE_EXCLUSIVE_RO, True, True, True, False),
    (pr.EXCLUSIVE_ACCESS_RO, True, True, False, False),
    (pr.WRITE_EXCLUSIVE_AR, True, True, True, False),
    (pr.EXCLUSIVE_ACCESS_AR, True, True, False, False)])
def test_access_by_reservation_type(rtype: int, reg_read: bool, reg_write: bool,
                                    other_read: bool, other_write: bool) -> None:
    r = registered(A, B)
    assert r.prout(A, pr.PROUT_RESERVE, 0, rtype, params(1)) == pr.GOOD
    assert not r.conflicts(A, pr.READS) and not r.conflicts(A, pr.WRITES)
    assert r.conflicts(B, pr.READS) is not reg_read
    assert r.conflicts(B, pr.WRITES) is not reg_write
    assert r.conflicts(C, pr.READS) is not other_read
    assert r.conflicts(C, pr.WRITES) is not other_write
    assert not r.conflicts(C, pr.ALWAYS)
    # READ RESERVATION: the holder's key, or 0 for all-registrants types.
    data = r.prin(pr.PRIN_READ_RESERVATION)
    assert data is not None and data[21] == rtype
    assert int.from_bytes(data[8:16], "big") == (0 if rtype in (
        pr.WRITE_EXCLUSIVE_AR, pr.EXCLUSIVE_ACCESS_AR) else 1)
    # A wrong type is an invalid release; a registrant that does not hold the
    # reservation releases nothing; under all-registrants types every registrant holds it.
    bad = pr.WRITE_EXCLUSIVE if rtype != pr.WRITE_EXCLUSIVE else pr.EXCLUSIVE_ACCESS
    assert r.prout(A, pr.PROUT_RELEASE, 0, bad, params(1)) == pr.BAD_RELEASE
    assert r.prout(B, pr.PROUT_RELEASE, 0, rtype, params(2)) == pr.GOOD
    all_registrants = rtype in (pr.WRITE_EXCLUSIVE_AR, pr.EXCLUSIVE_ACCESS_AR)
    assert r.reserved is not all_registrants
    assert r.prout(A, pr.PROUT_RELEASE, 0, rtype, params(1)) == pr.GOOD
    assert not r.reserved


def test_register_reserve_preempt_clear_and_generation() -> None:
    r = registered(A, B)
    assert r.generation == 2
    # REGISTER with the wrong key, or from an unregistered nexus with a key: conflict.
    assert r.prout(A, pr.PROUT_REGISTER, 0, 0, params(0, 9)) == pr.CONFLICT
    assert r.prout(C, pr.PROUT_REGISTER, 0, 0, params(5, 9)) == pr.CONFLICT
    assert r.prout(C, pr.PROUT_RESERVE, 0, pr.WRITE_EXCLUSIVE, params(0)) == pr.CONFLICT
    assert r.prout(A, pr.PROUT_RESERVE, 1, pr.WRITE_EXCLUSIVE, params(1)) == pr.BAD_FIELD_CDB
    assert r.prout(A, pr.PROUT_RESERVE, 0, 2, params(1)) == pr.BAD_FIELD_CDB
    assert r.prout(A, pr.PROUT_RESERVE, 0, pr.WRITE_EXCLUSIVE, params(1)[:20]) \
        == pr.BAD_LENGTH
    assert r.prout(A, pr.PROUT_RESERVE, 0, pr.WRITE_EXCLUSIVE, params(1)) == pr.GOOD
    assert r.generation == 2                       # RESERVE does not count
    assert r.prout(B, pr.PROUT_RESERVE, 0, pr.WRITE_EXCLUSIVE, params(2)) == pr.CONFLICT
    # B preempts A's reservation: A's registration goes, B holds an EA reservation.
    assert r.prout(B, pr.PROUT_PREEMPT, 0, pr.EXCLUSIVE_ACCESS, params(2, 1)) == pr.GOOD
    assert r.holder == B and r.rtype == pr.EXCLUSIVE_ACCESS and A not in r.keys
    assert r.generation == 3
    assert r.prout(B, pr.PROUT_PREEMPT, 0, pr.EXCLUSIVE_ACCESS, params(2, 77)) == pr.CONFLICT
    # Unregistering the holder releases the reservation.
    assert r.prout(B, pr.PROUT_REGISTER_AND_IGNORE, 0, 0, params(0, 0)) == pr.GOOD
    assert not r.reserved and not r.keys
    r = registered(A, B)
    assert r.prout(A, pr.PROUT_CLEAR, 0, 0, params(1)) == pr.GOOD
    assert not r.keys and r.generation == 3
    keys = r.prin(pr.PRIN_READ_KEYS)
    assert keys == (3).to_bytes(4, "big") + bytes(4)
    assert r.prin(9) is None
    caps = r.prin(pr.PRIN_REPORT_CAPABILITIES)
    assert caps is not None and caps[:2] == b"\0\x08"
    # Full status names each registrant by its iSCSI TransportID.
    r = registered(A)
    full = r.prin(pr.PRIN_READ_FULL_STATUS)
    assert full is not None and b"iqn.2026-01.org.test:a,i,0x800000000001\0" in full
    assert Reservations.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert Reservations.from_json({"bogus": 1}) == Reservations()


def _api(d: Daemon, method: str, **p: Any) -> Any:
    return call(d.sock, method, p)


def _portal(d: Daemon) -> tuple[str, int]:
    url = str(_api(d, "export.list")[0]["iscsi"])
    host, _sep, port = url.removeprefix("iscsi://").partition("/")[0].rpartition(":")
    return host, int(port)


def test_reservations_in_the_daemon_survive_a_restart(daemon: Daemon,
                                                       tmp_path: Path) -> None:
    d = daemon
    _api(d, "pool.create", name="tank", devices=[str(tmp_path / "disk0")],
         file_size="256M", extent_size="4M")
    _api(d, "volume.create", name="tank/v", size="16M")
    target = "iqn.2026-11.org.storaged:tank:v"
    block = bytes(range(256)) * 2

    def session(name: str, isid: int) -> RawInitiator:
        host, port = _portal(d)
        s = RawInitiator(host, port, initiator=f"iqn.2026-01.org.test:{name}",
                         isid=bytes([0x80, 0, 0, 0, 0, isid]))
        assert s.login(target).status_class == 0
        return s

    with session("a", 1) as a, session("b", 2) as b:
        for s, key in ((a, 0xA), (b, 0xB)):
            cdb, p = prout(pr.PROUT_REGISTER, 0, key)
            assert s.scsi(cdb, data_out=p).status == 0
        cdb, p = prout(pr.PROUT_RESERVE, 0xA, rtype=pr.WRITE_EXCLUSIVE)
        assert a.scsi(cdb, data_out=p).status == 0
        assert a.scsi(write10(0, 1), data_out=block).status == 0
        assert b.scsi(write10(0, 1), data_out=block).status == 0x18   # RESERVATION CONFLICT
        assert b.scsi(read10(0, 1), read=512).data == block
    d.stop()
    d.start()
    with session("a", 1) as a, session("b", 2) as b:
        keys = b.scsi(prin(pr.PRIN_READ_KEYS), read=8192)
        assert keys.status == 0 and keys.data[4:8] == (16).to_bytes(4, "big")
        assert {keys.data[8:16], keys.data[16:24]} == {(0xA).to_bytes(8, "big"),
                                                       (0xB).to_bytes(8, "big")}
        res = b.scsi(prin(pr.PRIN_READ_RESERVATION), read=8192).data
        assert res[8:16] == (0xA).to_bytes(8, "big") and res[21] == pr.WRITE_EXCLUSIVE
        assert b.scsi(write10(0, 1), data_out=bytes(512)).status == 0x18
        assert a.scsi(write10(0, 1), data_out=bytes(512)).status == 0
        cdb, p = prout(pr.PROUT_CLEAR, 0xA)
        assert a.scsi(cdb, data_out=p).status == 0
        assert b.scsi(write10(0, 1), data_out=block).status == 0
    # A deleted volume takes its reservations with it.
    cdb, p = prout(pr.PROUT_REGISTER, 0, 0xC)
    with session("c", 3) as c:
        assert c.scsi(cdb, data_out=p).status == 0
    state = json.loads((tmp_path / "state" / "iscsi.json").read_text())
    assert "tank/v" in state["reservations"]
    # (a volume in use is not deleted: wait until the target has seen session c go)
    deadline = time.monotonic() + 10
    while _api(d, "volume.info", name="tank/v")["clients"] and time.monotonic() < deadline:
        time.sleep(0.02)
    _api(d, "volume.delete", name="tank/v")
    state = json.loads((tmp_path / "state" / "iscsi.json").read_text())
    assert "tank/v" not in state["reservations"]
