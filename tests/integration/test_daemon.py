"""End to end: the real daemon as a subprocess, driven only through storagectl, NBD clients
(qemu-io, nbdinfo) and HTTP. Invariant 1 across SIGTERM and kill -9; invariant 9 for bad
arguments (clear one-line error, exit code, nothing changed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.daemonkit import BIN, Daemon, _free_port, _qemu_io
from tests.kit.nbdharness import nbdsh_env

__all__ = ["BIN", "Daemon", "_free_port", "_qemu_io"]


def test_cli_pool_and_volume_lifecycle(daemon: Daemon, tmp_path: Path) -> None:
    devs = [str(tmp_path / f"disk{i}") for i in range(3)]
    created = daemon.json("pool", "create", "tank", *devs, "--profile", "ec:2+1",
                          "--extent-size", "4M", "--file-size", "256M")
    assert isinstance(created, dict)
    assert created["name"] == "tank" and created["state"] == "online"
    assert [d["path"] for d in created["devices"]] == devs
    for key in ("size_bytes", "used_bytes", "free_bytes"):
        assert isinstance(created[key], int)
    vol = daemon.json("volume", "create", "tank/vm1", "--size", "64M", "--block-size", "4K")
    assert isinstance(vol, dict)
    assert (vol["name"], vol["size_bytes"], vol["block_size"], vol["profile"]) == (
        "tank/vm1", 64 << 20, 4096, "ec:2+1")
    assert {"used_bytes", "unique_bytes"} <= set(vol)
    assert "tank/vm1" in daemon.ok("volume", "list")
    exports = daemon.json("export", "list")
    assert isinstance(exports, list)
    assert {"name": "tank/vm1", "read_only": False, "clients": [],
            "nbd": daemon.url("tank/vm1")} in [
        {k: v for k, v in e.items() if k != "iscsi"} for e in exports]
    assert any(e.get("iscsi", "").endswith("/iqn.2026-11.org.storaged:tank:vm1/0")
               for e in exports)
    _qemu_io(daemon.url("tank/vm1"), "write -P 0x5a 0 1M", "flush")
    info = daemon.json("volume", "info", "tank/vm1")
    assert isinstance(info, dict) and info["mapped_bytes"] == 1 << 20
    resized = daemon.json("volume", "resize", "tank/vm1", "--size", "128M")
    assert isinstance(resized, dict) and resized["size_bytes"] == 128 << 20
    check = daemon.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"] and check["records"] == 256
    listed = subprocess.run(["nbdinfo", "--list", f"nbd://127.0.0.1:{daemon.nbd_port}"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert 'export="tank/vm1"' in listed.stdout
    assert "tank" in daemon.ok("status")
    daemon.ok("volume", "delete", "tank/vm1")
    daemon.ok("pool", "export", "tank")
    assert daemon.json("pool", "list") == []
    imported = daemon.json("pool", "import", "tank",
                           *[a for d in devs for a in ("--device", d)])
    assert isinstance(imported, dict) and imported["state"] == "online"
    daemon.ok("pool", "destroy", "tank")
    assert daemon.json("pool", "list") == []


@pytest.mark.parametrize(("args", "code", "words"), [
    (("volume", "create", "nopool/v", "--size", "1G"), 1, "no pool named 'nopool'"),
    (("volume", "create", "tank/v", "--size", "lots"), 1, "not a size"),
    (("volume", "create", "tank", "--size", "1G"), 1, "is not POOL/VOLUME"),
    (("volume", "create", "tank/bad name", "--size", "1G"), 1, "invalid volume name"),
    (("volume", "info", "tank/ghost"), 1, "no volume 'ghost'"),
    (("pool", "create", "p2", "/nonexistent/dev"), 1, "no such device"),
    (("pool", "create", "p3", "DEVX", "--profile", "raid5", "--file-size", "64M"), 1,
     "unknown redundancy profile"),
    (("pool", "frobnicate"), 2, "invalid choice"),
])
def test_bad_arguments_get_one_clear_line_and_change_nothing(
        daemon: Daemon, tmp_path: Path, args: tuple[str, ...], code: int, words: str) -> None:
    daemon.ok("pool", "create", "tank", str(tmp_path / "d0"), "--file-size", "128M")
    before = daemon.json("pool", "list")
    r = daemon.ctl(*[a.replace("DEVX", str(tmp_path / "x0")) for a in args])
    assert r.returncode == code, r
    assert words in r.stderr
    if code == 1:
        assert r.stderr.startswith("storagectl: ") and r.stderr.count("\n") == 1
    after = daemon.json("pool", "list")
    assert isinstance(before, list) and isinstance(after, list)
    assert [p["name"] for p in after] == [p["name"] for p in before]
    assert after[0]["volumes"] == before[0]["volumes"]


def test_daemon_not_running_is_said_so(tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "storagectl"), "--socket", str(tmp_path / "none.sock"),
                        "status"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "not running" in r.stderr


def test_sigterm_and_kill9_keep_flushed_data(daemon: Daemon, tmp_path: Path) -> None:
    """Invariant 1: flushed data survives SIGTERM (clean) and kill -9 (journal replay)."""
    daemon.ok("pool", "create", "tank", str(tmp_path / "d0"), str(tmp_path / "d1"),
              "--profile", "mirror:2", "--extent-size", "4M", "--file-size", "256M")
    daemon.ok("volume", "create", "tank/v", "--size", "32M")
    url = daemon.url("tank/v")
    _qemu_io(url, "write -P 0x11 0 4M", "flush")
    assert daemon.stop(signal.SIGTERM) == 0
    daemon.start()
    _qemu_io(url, "read -P 0x11 0 4M", "write -P 0x22 4M 4M", "flush",
             "write -P 0x33 8M 64K")
    daemon.stop(signal.SIGKILL)
    daemon.start()
    out = _qemu_io(url, "read -P 0x11 0 4M", "read -P 0x22 4M 4M")
    assert "read 4194304/4194304" in out
    assert daemon.json("pool", "check", "tank")["ok"]  # type: ignore[index]


def test_unflushed_writes_reach_the_devices_within_the_age_limit(
        daemon: Daemon, tmp_path: Path) -> None:
    """cache.write_buffer_age: writes never flushed are written back and committed within
    that time, so they survive kill -9 once it has passed; a later unflushed write, not
    yet that old, may be lost, but never corrupts what is there."""
    (tmp_path / "storaged.toml").write_text("[cache]\nwrite_buffer_age = 3\n")
    daemon.stop(signal.SIGTERM)
    daemon.args = ("--config", str(tmp_path / "storaged.toml"))
    daemon.start()
    daemon.ok("pool", "create", "tank", str(tmp_path / "d0"), "--extent-size", "4M",
              "--file-size", "128M")
    daemon.ok("volume", "create", "tank/v", "--size", "16M")
    url = daemon.url("tank/v")
    # libnbd sends no flush of its own (qemu-io would flush when it closes the image).
    r = subprocess.run(["nbdsh", "-u", url, "-c", "h.pwrite(b'\\x5a' * (3 << 20), 0)",
                        "-c", "h.pwrite(b'\\x6b' * (100 << 10), 5 << 20)"],
                       capture_output=True, text=True, timeout=60, env=nbdsh_env(),
                       check=False)
    assert r.returncode == 0, r.stderr
    vols = daemon.json("volume", "list")
    assert isinstance(vols, list) and vols[0]["dirty_bytes"] > 0     # not flushed yet
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        vols = daemon.json("volume", "list")
        assert isinstance(vols, list)
        if vols[0]["dirty_bytes"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"still buffered after 30 s: {vols}")
    daemon.stop(signal.SIGKILL)
    daemon.start()
    out = _qemu_io(url, "read -P 0x5a 0 3M", "read -P 0x6b 5M 100K", "read -P 0 3M 2M")
    assert out.count("read ") == 3 and "failed" not in out.lower()
    assert daemon.json("pool", "check", "tank")["ok"]  # type: ignore[index]


def test_metrics_scrape_moves_after_io(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("pool", "create", "tank", str(tmp_path / "d0"), "--file-size", "128M")
    daemon.ok("volume", "create", "tank/v", "--size", "16M", "--compression", "off")

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}
    before = scrape()
    key = ("storaged_volume_written_bytes_total", (("pool", "tank"), ("volume", "v")))
    assert before[key] == 0
    _qemu_io(daemon.url("tank/v"), "write -P 0x44 0 1M", "flush")
    after = scrape()
    assert after[key] >= 1 << 20
    assert after[("storaged_nbd_connections_accepted_total", ())] >= 1
    assert after[("storaged_pool_size_bytes", (("pool", "tank"),))] > 0
    assert shutil.which("qemu-io")
    # Deleting the volume gives its extents back down to the sparse device file (all but
    # the pool's open one: 16M written fill one 16M extent and start the next): in the
    # background after a while, or at once when the pool is exported.
    _qemu_io(daemon.url("tank/v"), "write -P 0x45 0 16M", "flush")
    held = os.stat(tmp_path / "d0").st_blocks * 512
    daemon.ok("volume", "delete", "tank/v")
    assert ("storaged_pool_discarded_extents_total", (("pool", "tank"),)) in scrape()
    daemon.ok("pool", "export", "tank")
    assert os.stat(tmp_path / "d0").st_blocks * 512 <= held - (15 << 20)


def test_snapshots_over_cli_and_nbd(daemon: Daemon, tmp_path: Path) -> None:
    """Invariant 7 end to end: a snapshot export is read-only (EPERM), keeps its data while
    the volume changes; clone, diff and rollback through storagectl."""
    daemon.ok("pool", "create", "tank", str(tmp_path / "d0"), "--file-size", "256M")
    daemon.ok("volume", "create", "tank/v", "--size", "16M", "--compression", "off")
    vol = daemon.url("tank/v")
    _qemu_io(vol, "write -P 0x61 0 2M", "flush")
    snap = daemon.json("snapshot", "create", "tank/v@monday")
    assert isinstance(snap, dict) and snap["name"] == "tank/v@monday"
    _qemu_io(vol, "write -P 0x62 1M 1M", "flush")
    snap_url = daemon.url("tank/v@monday")
    _qemu_io(snap_url, "read -P 0x61 0 2M", read_only=True)   # the old data, still
    # qemu refuses to open a read-only export for writing (EPERM on the wire is covered
    # by tests/integration/test_nbd_clients.py with a client that sends the write anyway).
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x63 0 4k", snap_url],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "Permission denied" in r.stdout + r.stderr
    exports = daemon.json("export", "list")
    assert isinstance(exports, list)
    assert {"name": "tank/v@monday", "read_only": True, "nbd": snap_url,
            "iscsi": exports[1].get("iscsi"), "clients": []} in exports
    assert str(exports[1].get("iscsi")).endswith(":tank:v:monday/0")
    space = daemon.json("pool", "status", "tank")
    assert isinstance(space, dict)
    # 2 MiB live in the snapshot, 1 MiB of it overwritten in the volume: 3 MiB of records,
    # 1 MiB shared (each a little more than its logical size: headers, padding).
    assert 3 << 20 <= space["data_bytes"] < (3 << 20) * 1.05
    assert 1 << 20 <= space["shared_bytes"] < (1 << 20) * 1.05
    diff = daemon.json("snapshot", "diff", "tank/v@monday")
    assert isinstance(diff, dict)
    assert diff["ranges"] == [{"offset": 1 << 20, "length": 1 << 20}]
    clone = daemon.json("snapshot", "clone", "tank/v@monday", "tank/v2")
    assert isinstance(clone, dict) and clone["name"] == "tank/v2"
    _qemu_io(daemon.url("tank/v2"), "read -P 0x61 0 2M")
    busy = daemon.ctl("snapshot", "delete", "tank/v@monday")
    assert busy.returncode == 1 and "has clones (v2)" in busy.stderr
    listed = daemon.json("snapshot", "list", "tank/v")
    assert isinstance(listed, list) and listed[0]["clones"] == ["tank/v2"]
    daemon.ok("snapshot", "rollback", "tank/v@monday")
    _qemu_io(vol, "read -P 0x61 0 2M")
    refused = daemon.ctl("volume", "delete", "tank/v")
    assert refused.returncode == 1 and "snapshot" in refused.stderr
    daemon.ok("volume", "delete", "tank/v2")
    daemon.ok("snapshot", "delete", "tank/v@monday")
    daemon.ok("volume", "delete", "tank/v")
    assert daemon.json("pool", "check", "tank")["ok"]  # type: ignore[index]


def test_metrics_latency_histograms_and_device_errors(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("pool", "create", "tank", str(tmp_path / "d0"), "--file-size", "128M")
    daemon.ok("volume", "create", "tank/v", "--size", "16M")
    _qemu_io(daemon.url("tank/v"), "write -P 0x45 0 1M", "flush", "read -P 0x45 0 1M")
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics",
                                timeout=10) as resp:
        fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    hist = fams["storaged_volume_request_duration_seconds"]
    assert hist.type == "histogram"
    counts = {(s.labels["op"], s.labels.get("le")): s.value for s in hist.samples
              if s.name.endswith("_bucket")}
    assert counts[("write", "+Inf")] >= 1 and counts[("flush", "+Inf")] >= 1
    assert counts[("read", "+Inf")] >= 1
    errs = [s for s in fams["storaged_device_errors"].samples
            if s.labels["pool"] == "tank"]
    assert {s.labels["kind"] for s in errs} == {"read", "write", "checksum"}
    assert all(s.value == 0 for s in errs)
    status = daemon.json("pool", "status", "tank")
    assert isinstance(status, dict)
    assert status["devices"][0]["checksum_errors"] == 0


def test_add_device_and_full_warning(daemon: Daemon, tmp_path: Path) -> None:
    """pool add-device grows capacity; a nearly full pool shows full_warning (JSON and
    metric) and the daemon logs it, at its next pass over the pools' space
    (space.check_interval, 0.5 s here instead of 10)."""
    (tmp_path / "storaged.toml").write_text("[space]\ncheck_interval = 0.5\n")
    daemon.stop(signal.SIGTERM)
    daemon.args = ("--config", str(tmp_path / "storaged.toml"))
    daemon.start()
    daemon.ok("pool", "create", "small", str(tmp_path / "s0"), "--extent-size", "1M",
              "--file-size", "32M")
    before = daemon.json("pool", "status", "small")
    assert isinstance(before, dict) and before["full_warning"] is False
    daemon.ok("volume", "create", "small/v", "--size", "64M", "--compression", "off")
    _qemu_io(daemon.url("small/v"), "write -P 0x55 0 22M", "flush")
    full = daemon.json("pool", "status", "small")
    assert isinstance(full, dict) and full["full_warning"] is True
    assert full["used_fraction"] >= 0.8
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics",
                                timeout=10) as resp:
        text = resp.read().decode()
    assert 'storaged_pool_full_warning{pool="small"} 1.0' in text
    assert "storaged_nbd_requests_in_flight 0.0" in text
    # Within a few passes (10 s would pass without one at the default interval).
    deadline = time.monotonic() + 8
    while "% full (warning at 80%)" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "% full (warning at 80%)" in daemon.log()
    grown = daemon.json("pool", "add-device", "small", str(tmp_path / "s1"),
                        "--file-size", "64M")
    assert isinstance(grown, dict)
    assert grown["size_bytes"] > full["size_bytes"] and len(grown["devices"]) == 2
    assert grown["full_warning"] is False
    deadline = time.monotonic() + 8
    while "is back under 80% full" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "is back under 80% full" in daemon.log()
    _qemu_io(daemon.url("small/v"), "read -P 0x55 0 22M")


def test_unimportable_pool_is_reported_and_others_come_up(daemon: Daemon,
                                                          tmp_path: Path) -> None:
    daemon.ok("pool", "create", "good", str(tmp_path / "g0"), "--file-size", "64M")
    daemon.ok("pool", "create", "bad", str(tmp_path / "b0"), "--file-size", "64M")
    daemon.ok("volume", "create", "good/v", "--size", "8M")
    _qemu_io(daemon.url("good/v"), "write -P 0x66 0 1M", "flush")
    assert daemon.stop(signal.SIGTERM) == 0
    (tmp_path / "b0").unlink()                      # the bad pool's only disk is gone
    daemon.start()
    pools = daemon.json("pool", "list")
    assert isinstance(pools, list)
    states = {p["name"]: p["state"] for p in pools}
    assert states == {"good": "online", "bad": "unavailable"}
    assert "none of the devices" in next(p["error"] for p in pools if p["name"] == "bad")
    _qemu_io(daemon.url("good/v"), "read -P 0x66 0 1M")
    r = daemon.ctl("pool", "status", "bad")
    assert r.returncode == 1 and "import failed" in r.stderr
    # Export and re-import by scanning the state directory (no --device given).
    daemon.ok("pool", "export", "good")
    for f in (tmp_path / "g0",):
        f.rename(tmp_path / "state" / f.name)
    imported = daemon.json("pool", "import", "good")
    assert isinstance(imported, dict) and imported["state"] == "online"
    _qemu_io(daemon.url("good/v"), "read -P 0x66 0 1M")


def test_other_users_are_refused(daemon: Daemon) -> None:
    """The control socket is 0660: a user who is not root, the daemon's user or in the
    socket's group cannot drive the daemon."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run storagectl as another user")
    assert os.stat(daemon.sock).st_mode & 0o777 == 0o660
    # The test directory must be traversable for the other user to reach the socket.
    for parent in Path(daemon.sock).parents:
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o001)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        str(BIN / "storagectl"), "--socket", daemon.sock, "status"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1, r
    assert "permission denied" in r.stderr
