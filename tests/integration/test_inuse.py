"""Volumes in use (issue 21, DESIGN invariant 10; volumes/openers.py invariants 1-4): the
real daemon, real clients holding their connections open (qemu-io over NBD and over iSCSI
via libiscsi). Every refusal is checked to have changed nothing: the volume is still
there under its name, the holding client is still served, the data reads back byte-exact
and ``pool check --deep`` is clean. ``--force`` disconnects the clients, then acts.
"""

from __future__ import annotations

import queue
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.daemonkit import Daemon, _qemu_io

MiB = 1 << 20


class Holder:
    """An interactive qemu-io holding one connection to an export open, fed commands one
    at a time (so a test can check the client is still served between operations)."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "qemu-io", "-f", "raw", *(["-r"] if read_only else []), url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")          # EOF

    def run(self, command: str, seconds: float = 30) -> str:
        """Run one command; its output (up to its statistics line or its failure)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + seconds
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                return "".join(out) + "(no answer)"
            out.append(line)
            if not line or " ops; " in line or "failed" in line.lower():
                return "".join(out)

    def served(self, command: str) -> None:
        out = self.run(command)
        assert " ops; " in out and "failed" not in out.lower(), out

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        h.close()


def _info(daemon: Daemon, name: str) -> dict[str, object]:
    out = daemon.json("volume", "info", name)
    assert isinstance(out, dict)
    return out


def _wait_clients(daemon: Daemon, name: str, n: int) -> list[dict[str, str]]:
    deadline = time.monotonic() + 20
    while True:
        clients = _info(daemon, name)["clients"]
        assert isinstance(clients, list)
        if len(clients) == n or time.monotonic() > deadline:
            assert len(clients) == n, clients
            return clients
        time.sleep(0.05)


def _export(daemon: Daemon, name: str) -> dict[str, object]:
    exports = daemon.json("export", "list")
    assert isinstance(exports, list)
    return next(e for e in exports if e["name"] == name)


def _refused(daemon: Daemon, *args: str) -> str:
    r = daemon.ctl(*args)
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def _unchanged(daemon: Daemon, name: str, pattern: str) -> None:
    """The volume is still there under its name, reads back byte-exact (a new client,
    read-only), and the pool's deep check is clean."""
    listed = daemon.json("volume", "list")
    assert isinstance(listed, list) and name in {v["name"] for v in listed}
    _qemu_io(daemon.url(name), pattern, read_only=True)
    check = daemon.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check


@pytest.fixture
def tank(daemon: Daemon, tmp_path: Path) -> Daemon:
    daemon.ok("pool", "create", "tank", str(tmp_path / "disk0"), "--extent-size", "4M",
              "--file-size", "128M")
    daemon.ok("volume", "create", "tank/vm1", "--size", "16M")
    _qemu_io(daemon.url("tank/vm1"), "write -P 0x5a 0 4M", "flush")
    return daemon


def test_nbd_client_blocks_delete_rename_rollback_until_forced(
        tank: Daemon, holders: list[Holder]) -> None:
    """Invariant 10; openers 1 (registered while connected, shown), 3 (refusals change
    nothing, and a refusal for another reason disconnects nobody), 4 (--force disconnects,
    waits, then acts)."""
    d = tank
    d.ok("snapshot", "create", "tank/vm1@s1")
    h = Holder(d.url("tank/vm1"))
    holders.append(h)
    h.served("write -P 0x6b 4M 1M")                 # after the snapshot: rollback undoes it
    clients = _wait_clients(d, "tank/vm1", 1)
    assert clients[0]["protocol"] == "nbd"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", clients[0]["client"]), clients
    peer = clients[0]["client"]
    assert _export(d, "tank/vm1")["clients"] == clients
    assert _export(d, "tank/vm1@s1")["clients"] == []
    assert f"NBD {peer}" in d.ok("export", "list")
    assert f"NBD {peer}" in d.ok("volume", "info", "tank/vm1")

    for args in (("volume", "delete", "tank/vm1", "-r"),
                 ("volume", "rename", "tank/vm1", "vm2"),
                 ("snapshot", "rollback", "tank/vm1@s1")):
        err = _refused(d, *args)
        assert "in use" in err and f"NBD: {peer}" in err and "--force" in err, err
        h.served("read -P 0x6b 4M 1M")              # still connected and served
        _unchanged(d, "tank/vm1", "read -P 0x5a 0 4M")
    # Refused for its snapshot even with --force: the client stays connected.
    err = _refused(d, "volume", "delete", "tank/vm1", "--force")
    assert "snapshot" in err, err
    h.served("read -P 0x6b 4M 1M")
    assert _wait_clients(d, "tank/vm1", 1)[0]["client"] == peer

    # --force: the client is disconnected (its next request fails; qemu-io lives on),
    # then the volume is rolled back.
    rolled = d.json("snapshot", "rollback", "tank/vm1@s1", "--force")
    assert isinstance(rolled, dict) and rolled["clients"] == []
    out = h.run("read 0 4k")
    assert "failed" in out.lower(), out
    assert h.proc.poll() is None
    _unchanged(d, "tank/vm1", "read -P 0 4M 1M")     # the write after s1 is gone
    _qemu_io(d.url("tank/vm1"), "read -P 0x5a 0 4M", read_only=True)

    # Rename by force, with two clients (one of them reading the snapshot, which the
    # rename leaves alone).
    h2, snap = Holder(d.url("tank/vm1")), Holder(d.url("tank/vm1@s1"), read_only=True)
    holders += [h2, snap]
    h2.served("read -P 0x5a 0 64k")
    snap.served("read -P 0x5a 0 64k")
    _wait_clients(d, "tank/vm1", 1)
    d.ok("volume", "rename", "tank/vm1", "vm2", "--force")
    assert "failed" in h2.run("read 0 4k").lower()
    snap.served("read -P 0x5a 0 64k")
    assert _info(d, "tank/vm2")["clients"] == []

    # The snapshot is exported and open: its deletion is refused, then forced.
    snap_client = _export(d, "tank/vm2@s1")["clients"]
    assert isinstance(snap_client, list) and len(snap_client) == 1, snap_client
    err = _refused(d, "snapshot", "delete", "tank/vm2@s1")
    assert "snapshot tank/vm2@s1 is in use" in err and "NBD: 127.0.0.1:" in err, err
    snap.served("read -P 0x5a 0 64k")
    _qemu_io(d.url("tank/vm2@s1"), "read -P 0x5a 0 4M", read_only=True)
    d.ok("snapshot", "delete", "tank/vm2@s1", "--force")
    assert "failed" in snap.run("read 0 4k").lower()
    assert d.json("snapshot", "list") == []

    # Delete by force.
    h3 = Holder(d.url("tank/vm2"))
    holders.append(h3)
    h3.served("read -P 0x5a 0 64k")
    _wait_clients(d, "tank/vm2", 1)
    d.ok("volume", "delete", "tank/vm2", "--force")
    assert "failed" in h3.run("read 0 4k").lower()
    assert d.json("volume", "list") == []
    check = d.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check
    assert "disconnecting 1 client(s) (forced)" in d.log()


def test_iscsi_session_blocks_delete_until_forced(tank: Daemon,
                                                  holders: list[Holder]) -> None:
    """Invariant 10 over iSCSI: the session (initiator IQN and address) is named; --force
    ends it; the initiator's next command fails."""
    d = tank
    url = _export(d, "tank/vm1")["iscsi"]
    assert isinstance(url, str)
    h = Holder(url)
    holders.append(h)
    h.served("read -P 0x5a 0 1M")
    clients = _wait_clients(d, "tank/vm1", 1)
    assert clients[0]["protocol"] == "iscsi"
    assert re.fullmatch(r"iqn\.\S+ at 127\.0\.0\.1:\d+", clients[0]["client"]), clients
    err = _refused(d, "volume", "delete", "tank/vm1")
    assert f"iSCSI: {clients[0]['client']}" in err, err
    h.served("read -P 0x5a 0 1M")
    _unchanged(d, "tank/vm1", "read -P 0x5a 0 4M")
    d.ok("volume", "delete", "tank/vm1", "--force")
    # The initiator logs in again at once (libiscsi reconnects); that session is ended
    # too, then the target is gone: its commands fail or wait for a target that never
    # comes back (an initiator's recovery timeout), and are never answered with data.
    assert " ops; " not in h.run("read 0 4k", seconds=3)
    assert d.json("volume", "list") == []
    check = d.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check


def test_resize_shrink_needs_allow_shrink_and_sizes_can_be_relative(tank: Daemon) -> None:
    """A shrink discards data: refused without --allow-shrink (nothing changes, the tail
    still reads back), allowed with it; +SIZE grows and -SIZE shrinks relative to now."""
    d = tank
    _qemu_io(d.url("tank/vm1"), "write -P 0x77 12M 4M", "flush")
    for args in (("--size", "8M"), ("--size", "-4M"), ("--size=-4M",)):
        err = _refused(d, "volume", "resize", "tank/vm1", *args)
        assert "--allow-shrink" in err, err
        assert _info(d, "tank/vm1")["size_bytes"] == 16 * MiB
        _unchanged(d, "tank/vm1", "read -P 0x77 12M 4M")
    assert "not a size" in _refused(d, "volume", "resize", "tank/vm1", "--size", "+lots")
    assert "only" in _refused(d, "volume", "resize", "tank/vm1", "--size=-16M",
                              "--allow-shrink")
    grown = d.json("volume", "resize", "tank/vm1", "--size", "+16M")
    assert isinstance(grown, dict) and grown["size_bytes"] == 32 * MiB
    _qemu_io(d.url("tank/vm1"), "read -P 0x77 12M 4M", "read -P 0 16M 16M",
             read_only=True)
    shrunk = d.json("volume", "resize", "tank/vm1", "--size", "-20M", "--allow-shrink")
    assert isinstance(shrunk, dict) and shrunk["size_bytes"] == 12 * MiB
    d.ok("volume", "resize", "tank/vm1", "--size", "16M")   # the discarded tail reads zeros
    _unchanged(d, "tank/vm1", "read -P 0 12M 4M")
    _qemu_io(d.url("tank/vm1"), "read -P 0x5a 0 4M", read_only=True)


def test_incremental_receive_into_a_volume_in_use(tank: Daemon, holders: list[Holder],
                                                  tmp_path: Path) -> None:
    """An increment replaces a volume's content under its clients, as a rollback does
    (zfs receive -F): refused while it has clients (nothing changes), --force disconnects
    them first."""
    d = tank
    d.ok("snapshot", "create", "tank/vm1@s1")
    full, inc = tmp_path / "full.stream", tmp_path / "inc.stream"
    d.ok("volume", "send", "tank/vm1@s1", "-o", str(full))
    d.ok("volume", "receive", "tank/copy", "-i", str(full))
    _qemu_io(d.url("tank/vm1"), "write -P 0x3c 1M 1M", "flush")
    d.ok("snapshot", "create", "tank/vm1@s2")
    d.ok("volume", "send", "tank/vm1@s2", "--from", "@s1", "-o", str(inc))
    h = Holder(d.url("tank/copy"), read_only=True)
    holders.append(h)
    h.served("read -P 0x5a 0 4M")
    _wait_clients(d, "tank/copy", 1)
    err = _refused(d, "volume", "receive", "tank/copy", "-i", str(inc))
    assert "in use" in err and "NBD: 127.0.0.1:" in err, err
    h.served("read -P 0x5a 0 4M")
    snaps = d.json("snapshot", "list", "tank/copy")
    assert isinstance(snaps, list) and [s["snapshot"] for s in snaps] == ["s1"]
    _unchanged(d, "tank/copy", "read -P 0x5a 0 4M")
    d.ok("volume", "receive", "tank/copy", "-i", str(inc), "--force")
    assert "failed" in h.run("read 0 4k").lower()
    _unchanged(d, "tank/copy", "read -P 0x3c 1M 1M")


def test_pool_export_and_destroy_refused_while_in_use_until_forced(
        tank: Daemon, holders: list[Holder], tmp_path: Path) -> None:
    """A busy pool (ZFS "pool is busy"): `pool export` and `pool destroy` of a pool whose
    volume and snapshot have NBD and iSCSI clients are refused with one line naming every
    client, and change nothing (still imported, clients still served, data byte-exact,
    deep check clean); `pool export --force` disconnects them (openers 3-5) and exports,
    and the pool imports again intact (DESIGN invariant 10)."""
    d = tank
    d.ok("snapshot", "create", "tank/vm1@s1")
    nbd_vol, nbd_snap = Holder(d.url("tank/vm1")), Holder(d.url("tank/vm1@s1"),
                                                           read_only=True)
    url = _export(d, "tank/vm1")["iscsi"]
    assert isinstance(url, str)
    iscsi = Holder(url)
    holders += [nbd_vol, nbd_snap, iscsi]
    for h in holders:
        h.served("read -P 0x5a 0 64k")
    clients = _wait_clients(d, "tank/vm1", 2)
    snap_clients = _export(d, "tank/vm1@s1")["clients"]
    assert isinstance(snap_clients, list) and len(snap_clients) == 1, snap_clients
    named = [f"{'NBD' if c['protocol'] == 'nbd' else 'iSCSI'}: {c['client']}"
             for c in [*clients, *snap_clients]]

    for args in (("pool", "export", "tank"), ("pool", "destroy", "tank")):
        err = _refused(d, *args)
        assert "in use by 3 client(s)" in err and all(n in err for n in named), err
        for h in holders:
            h.served("read -P 0x5a 0 64k")
        pools = d.json("pool", "list")
        assert isinstance(pools, list) and [p["name"] for p in pools] == ["tank"]
        _unchanged(d, "tank/vm1", "read -P 0x5a 0 4M")
    assert "--force" in _refused(d, "pool", "export", "tank")
    assert "delete them first" in _refused(d, "pool", "destroy", "tank")

    d.ok("pool", "export", "tank", "--force")
    for h in (nbd_vol, nbd_snap):
        assert "failed" in h.run("read 0 4k").lower()
    assert " ops; " not in iscsi.run("read 0 4k", seconds=3)
    assert d.json("pool", "list") == []
    assert "disconnecting 3 client(s) (forced)" in d.log()
    d.ok("pool", "import", "tank", "--device", str(tmp_path / "disk0"))
    _unchanged(d, "tank/vm1", "read -P 0x5a 0 4M")
    _qemu_io(d.url("tank/vm1@s1"), "read -P 0x5a 0 4M", read_only=True)
