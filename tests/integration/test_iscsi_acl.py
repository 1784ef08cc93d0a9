"""iSCSI access control in the real daemon: ``storagectl export iscsi`` sets a volume's
policy (initiator allow list, CHAP, mutual CHAP); libiscsi's tools as the initiators;
policies survive a restart; ``iscsi.default_acl = "closed"``; secrets never come back
out of the daemon (API, log) and are kept in a file only the owner can read."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from iscsi import pdu as P
from storaged.config import load
from storaged.ctl.client import ControlError, call
from tests.kit.daemonkit import Daemon
from volumes import InvalidArgument

pytestmark = pytest.mark.slow

ONE = "iqn.2026-01.org.test:one"
TWO = "iqn.2026-01.org.test:two"
SECRET = "alice-secret-0123"
TSECRET = "target-secret-987"


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30,
                          check=False)


_PORTALS: dict[int, str] = {}


def api(d: Daemon, method: str, **params: Any) -> Any:
    """The control API without storagectl's start-up time (the CLI is tested too)."""
    return call(d.sock, method, params)


def portal(d: Daemon) -> str:
    """The daemon's iSCSI portal (asked once per daemon process: storagectl is slow)."""
    assert d.proc is not None
    if d.proc.pid not in _PORTALS:
        exports = api(d, "export.list")
        assert isinstance(exports, list) and exports
        url = str(exports[0]["iscsi"])
        _PORTALS[d.proc.pid] = url.removeprefix("iscsi://").partition("/")[0]
    return _PORTALS[d.proc.pid]


def discover(d: Daemon, initiator: str) -> str:
    r = tool("iscsi-ls", "-i", initiator, f"iscsi://{portal(d)}")
    assert r.returncode == 0, r.stderr
    return r.stdout


def inquiry(d: Daemon, initiator: str, vol: str, auth: str = "",
            query: str = "") -> subprocess.CompletedProcess[str]:
    iqn = f"iqn.2026-11.org.storaged:tank:{vol}"
    return tool("iscsi-inq", "-i", initiator, f"iscsi://{auth}{portal(d)}/{iqn}/0{query}")


def login_status(d: Daemon, initiator: str, vol: str) -> int:
    """The status of a plain (AuthMethod=None) login, over a raw socket."""
    host, _sep, port = portal(d).rpartition(":")
    req = P.LoginRequest(transit=True, csg=1, nsg=3, isid=b"\x80\0\0\0\0\7", itt=1,
                         cmdsn=1, data=P.format_text([
                             ("InitiatorName", initiator),
                             ("TargetName", f"iqn.2026-11.org.storaged:tank:{vol}"),
                             ("SessionType", "Normal")]))
    reader = P.PDUReader(opcodes=P.TARGET_OPCODES)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(P.encode(req))
        while (resp := reader.next_pdu()) is None:
            data = s.recv(65536)
            assert data, "connection closed without a login response"
            reader.receive_data(data)
    assert isinstance(resp, P.LoginResponse)
    return resp.status_class << 8 | resp.status_detail


def test_access_control_in_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    api(d, "pool.create", name="tank", devices=[str(tmp_path / "disk0")],
        file_size="256M", extent_size="4M")
    for vol in ("a", "b", "c"):
        api(d, "volume.create", name=f"tank/{vol}", size="16M")
    # Default: open.
    assert "tank:a " in discover(d, TWO) and "tank:b " in discover(d, TWO)
    shown = api(d, "export.iscsi", name="tank/a")
    assert isinstance(shown, dict)
    assert (shown["access"], shown["source"]) == ("open", "default")

    # An allow list: the other initiator neither sees nor logs in (0x0202).
    set_a = d.json("export", "iscsi", "tank/a", "--allow-initiator", ONE)
    assert isinstance(set_a, dict) and set_a["allow"] == [ONE]
    assert "tank:a " in discover(d, ONE)
    assert "tank:a " not in discover(d, TWO) and "tank:b " in discover(d, TWO)
    assert inquiry(d, ONE, "a").returncode == 0
    assert inquiry(d, TWO, "a").returncode != 0
    assert login_status(d, TWO, "a") == 0x0202
    assert login_status(d, ONE, "a") == 0x0000

    # CHAP, then mutual CHAP; secrets from files, never shown.
    (tmp_path / "chap").write_text(SECRET + "\n")
    (tmp_path / "tchap").write_text(TSECRET)
    set_b = d.ok("--json", "export", "iscsi", "tank/b", "--chap-user", "alice",
                 "--chap-secret-file", str(tmp_path / "chap"))
    assert SECRET not in set_b and json.loads(set_b)["chap_user"] == "alice"
    assert inquiry(d, TWO, "b", f"alice%{SECRET}@").returncode == 0
    assert inquiry(d, TWO, "b", "alice%wrong-secret-000@").returncode != 0
    assert inquiry(d, TWO, "b").returncode != 0
    assert login_status(d, TWO, "b") == 0x0201       # CHAP required: authentication
    api(d, "export.iscsi", name="tank/b", chap_user="alice", chap_secret=SECRET,
        mutual_chap_user="tank-b", mutual_chap_secret=TSECRET, allow=[ONE, TWO])
    mutual = f"?target_user=tank-b&target_password={TSECRET}"
    assert inquiry(d, TWO, "b", f"alice%{SECRET}@", mutual).returncode == 0
    # The initiator refuses a target that cannot prove itself.
    assert inquiry(d, TWO, "b", f"alice%{SECRET}@",
                   "?target_user=tank-b&target_password=not-the-secret0").returncode != 0
    assert inquiry(d, TWO, "b", f"alice%{SECRET}@").returncode != 0   # one-way refused
    # Bad policies are refused before anything changes.
    (tmp_path / "short").write_text("short")
    bad = d.ctl("export", "iscsi", "tank/c", "--chap-user", "x", "--chap-secret-file",
                str(tmp_path / "short"))
    assert bad.returncode != 0 and "12 bytes" in bad.stderr
    for bad_params in ({"allow": ["bogus"]}, {"open": True, "allow": [ONE]},
                       {"mutual_chap_user": "t", "mutual_chap_secret": TSECRET},
                       {"chap_user": "a", "chap_secret": SECRET, "mutual_chap_user": "t",
                        "mutual_chap_secret": SECRET}):
        with pytest.raises(ControlError):
            api(d, "export.iscsi", name="tank/c", **bad_params)

    state = tmp_path / "state" / "iscsi.json"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600

    # Policies survive a restart; a closed default hides volumes without a policy.
    d.stop()
    (tmp_path / "storaged.toml").write_text('[iscsi]\ndefault_acl = "closed"\n')
    d.args = ("--config", str(tmp_path / "storaged.toml"))
    d.start()
    listing = discover(d, ONE)
    assert "tank:a " in listing and "tank:b " in listing and "tank:c " not in listing
    assert "tank:a " not in discover(d, TWO)
    assert login_status(d, ONE, "c") == 0x0202
    assert inquiry(d, TWO, "b", f"alice%{SECRET}@", mutual).returncode == 0
    c = api(d, "export.iscsi", name="tank/c")
    assert isinstance(c, dict) and (c["access"], c["source"]) == ("closed", "default")
    d.ok("export", "iscsi", "tank/c", "--open")
    assert inquiry(d, TWO, "c").returncode == 0

    # Rename carries the policy; delete drops it.
    api(d, "volume.rename", name="tank/a", new_name="a2")
    a2 = api(d, "export.iscsi", name="tank/a2")
    assert isinstance(a2, dict) and a2["allow"] == [ONE]
    api(d, "volume.delete", name="tank/a2")
    api(d, "volume.create", name="tank/a2", size="16M")
    fresh = api(d, "export.iscsi", name="tank/a2")
    assert isinstance(fresh, dict) and fresh["source"] == "default"

    for text in (d.log(), (tmp_path / "daemon.log").read_text(errors="replace")):
        assert SECRET not in text and TSECRET not in text


def test_default_acl_config_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[iscsi]\ndefault_acl = "closed"\n')
    assert load(str(good)).iscsi_default_acl == "closed"
    bad = tmp_path / "bad.toml"
    bad.write_text('[iscsi]\ndefault_acl = "shut"\n')
    with pytest.raises(InvalidArgument, match="default_acl"):
        load(str(bad))
