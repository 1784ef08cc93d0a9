"""The real daemon against hostile peers and operator mistakes (issue 20 items 6-8, issue 21
"the daemon itself"): every test drives the storaged subprocess over loopback only.

Cites nbd/server S1-S3, storaged/control C1-C4, storaged/startup D1-D3 and DESIGN
invariants 9 (bad input gets a clear error and changes nothing) and 10 (one owner).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import trio

from nbd import proto
from storaged.config import load
from tests.kit.daemonkit import BIN, Daemon, _free_port, _qemu_io, member_digests
from tests.kit.nbdharness import RawClient, request
from volumes import InvalidArgument

KiB = 1024
MiB = 1024 * 1024
RSS_BOUND = 64 * MiB          # growth of the daemon's peak RSS under the attack


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _sep, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * KiB
    return out


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {name: float(value) for name, _sp, value in
            (line.partition(" ") for line in text.splitlines())
            if name.startswith("storaged_nbd_") and "{" not in name}


def _make_pool(d: Daemon, tmp_path: Path, vols: dict[str, str]) -> list[str]:
    devs = [str(tmp_path / f"disk{i}") for i in range(3)]
    d.ok("pool", "create", "tank", *devs, "--profile", "ec:2+1", "--extent-size", "4M",
         "--file-size", "256M")
    for name, size in vols.items():
        d.ok("volume", "create", f"tank/{name}", "--size", size)
    return devs


def _deep_check_clean(d: Daemon) -> None:
    check = d.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check


class _Bystander:
    """A well-behaved client writing and reading back 256 KiB blocks (large enough to go
    through the payload memory budget, S1), byte-exact, on its own connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cycles = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        c = await RawClient.open(self.port, "tank/side")
        task_status.started()
        i = 0
        while True:
            i += 1
            block = bytes([i % 251]) * (256 * KiB)
            off = (i % 16) * 256 * KiB
            r = await c.write(off, block, cookie=2 * i)
            assert r.error == 0, f"bystander write failed: {r.error} {r.message}"
            r = await c.read(off, len(block), cookie=2 * i + 1)
            assert r.error == 0 and r.data == block, "bystander read back wrong data"
            self.cycles += 1
            await trio.sleep(0.01)


async def _attackers(port: int) -> list[RawClient]:
    """100 hostile connections: stalled handshakes (greeting read, nothing sent; an
    option header cut short), write headers of the maximum payload and of more than it
    with no payload, and writes claiming 1 GiB."""
    out: list[RawClient] = []
    for i in range(25 + 13 + 12):
        c = await RawClient.open(port, "tank/vol")
        n = 32 * MiB if i < 25 else 48 * MiB if i < 38 else 1 << 30
        await c.send(request(proto.CMD_WRITE, i, 0, n))
        out.append(c)
    for i in range(50):
        c = await RawClient.connect(port)
        if i % 2:
            await c.greeting()
        else:
            await c.start()
            await c.send(struct.pack(">QI", proto.IHAVEOPT, proto.OPT_GO))
        out.append(c)
    return out


@pytest.mark.slow
async def test_hundred_hostile_connections_keep_rss_bounded_and_others_served(
        tmp_path: Path) -> None:
    """100 connections with stalled handshakes, stalled or oversized write headers: the
    daemon's peak RSS grows by less than RSS_BOUND (before: 25 x 32 MiB + 13 x 48 MiB
    allocated and zeroed), a bystander is served byte-exact throughout, every hostile
    connection is closed by the server (1 GiB claims at once, the others after their
    timeout), and nothing was written."""
    cfg = tmp_path / "storaged.toml"
    cfg.write_text("[nbd]\nhandshake_timeout = 3\npayload_timeout = 3\n")
    d = Daemon(tmp_path, str(tmp_path / "ctl.sock"), _free_port(), _free_port(),
               args=("--config", str(cfg)))
    await trio.to_thread.run_sync(d.start)
    try:
        await trio.to_thread.run_sync(_make_pool, d, tmp_path,
                                      {"vol": "64M", "side": "16M"})
        assert d.proc is not None
        pid = d.proc.pid
        bystander = _Bystander(d.nbd_port)
        async with trio.open_nursery() as nursery:
            await nursery.start(bystander.run)
            with trio.fail_after(30):
                while bystander.cycles < 20:  # noqa: ASYNC110 - a counter, not an event
                    await trio.sleep(0.05)
            await trio.Path(f"/proc/{pid}/clear_refs").write_text("5")   # reset VmHWM
            base = _status(pid)["VmRSS"]
            attackers = await _attackers(d.nbd_port)
            before = bystander.cycles
            await trio.sleep(1.5)
            during = _status(pid)
            assert bystander.cycles > before + 10, "the bystander stalled"
            start = trio.current_time()
            async with trio.open_nursery() as closing:
                for c in attackers:
                    closing.start_soon(c.read_to_eof, 15.0)
            waited = trio.current_time() - start
            assert bystander.cycles > before + 20
            nursery.cancel_scope.cancel()
        after = _status(pid)
        print(f"RSS base {base / MiB:.1f} MiB, during {during['VmRSS'] / MiB:.1f} MiB, "
              f"peak {after['VmHWM'] / MiB:.1f} MiB; every attacker closed after "
              f"{waited:.1f} s more")
        assert after["VmHWM"] - base < RSS_BOUND, (base, during, after)
        for c in attackers:
            await c.aclose()
        with trio.fail_after(10):
            while True:                                   # the bystander left too
                status = await trio.to_thread.run_sync(d.json, "status")
                assert isinstance(status, dict)
                if status["nbd"]["connections"] == 0:
                    break
                await trio.sleep(0.1)
        metrics = await trio.to_thread.run_sync(_metrics, d.metrics_port)
        # 50 handshakes and 38 write headers timed out; the 12 1-GiB claims were refused
        # at once (protocol errors); every reservation was given back.
        assert metrics["storaged_nbd_timeouts_total"] == 88, metrics
        assert metrics["storaged_nbd_protocol_errors_total"] == 50, metrics  # 38 + 12
        assert metrics["storaged_nbd_payload_bytes"] == 0, metrics
        info = await trio.to_thread.run_sync(d.json, "volume", "info", "tank/vol")
        assert isinstance(info, dict) and info["mapped_bytes"] == 0
        await trio.to_thread.run_sync(_deep_check_clean, d)
    finally:
        if d.proc is not None:
            d.stop(signal.SIGKILL)


def test_deeply_nested_json_and_too_many_control_connections_get_errors(
        daemon: Daemon, tmp_path: Path) -> None:
    """C3: a 200 KB request nested 100,000 deep (RecursionError in the parser, which ended
    the daemon) is answered with an error on its connection, which goes on serving; C2: a
    control connection over the limit gets an error line; the daemon serves throughout."""
    _make_pool(daemon, tmp_path, {"v": "16M"})
    _qemu_io(daemon.url("tank/v"), "write -P 0x6b 0 1M", "flush")
    nested = (b'{"method": "status", "params": {"x": ' + b"[" * 100_000 + b"]" * 100_000
              + b"}}\n")
    assert len(nested) > 200_000
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(daemon.sock)
        s.sendall(nested)
        f = s.makefile("rb")
        answer = json.loads(f.readline())
        assert answer["error"]["errno"] == 22 and "nested" in answer["error"]["message"]
        s.sendall(b'{"method": "status"}\n')
        assert "result" in json.loads(f.readline())
        f.close()
    time.sleep(0.5)                              # (the first connection's end is seen)
    held = []
    try:
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(daemon.sock)
            held.append(s)
        s.sendall(b'{"method": "status"}\n')    # the 64th is served ...
        assert "result" in json.loads(s.makefile("rb").readline())
        with socket.socket(socket.AF_UNIX) as extra:   # ... the 65th refused
            extra.settimeout(30)
            extra.connect(daemon.sock)
            refused = json.loads(extra.makefile("rb").readline())
            assert "too many control connections" in refused["error"]["message"]
    finally:
        for s in held:
            s.close()
    assert daemon.proc is not None and daemon.proc.poll() is None
    _qemu_io(daemon.url("tank/v"), "read -P 0x6b 0 1M", read_only=True)
    _deep_check_clean(daemon)


@pytest.mark.parametrize(("toml", "key"), [
    ('[nbd]\nlisten = "0.0.0.0:10809"\n', "nbd.allow_insecure"),
    ('[nbd]\nlisten = "[::]:10809"\ntls = "on"\ntls_cert = "c"\ntls_key = "k"\n',
     "nbd.allow_insecure"),
    ('[nbd]\nlisten = "192.0.2.7:10809"\n', "nbd.allow_insecure"),
    ('[iscsi]\nlisten = "0.0.0.0:3260"\n', "iscsi.allow_insecure"),
])
def test_insecure_listeners_are_refused_naming_the_key(tmp_path: Path, toml: str,
                                                       key: str) -> None:
    """An NBD listener off loopback with neither TLS required nor an allow list, or an
    iSCSI portal off loopback with open volumes, is refused by config validation (no
    socket is opened), naming the key that allows it; with that key, or with TLS
    required / an allow list / closed iSCSI ACLs, the config is accepted."""
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(InvalidArgument, match=key.replace(".", r"\.")):
        load(str(path))
    section = key.split(".", maxsplit=1)[0]
    path.write_text(toml.replace(f"[{section}]\n", f"[{section}]\nallow_insecure = true\n"))
    load(str(path))
    fix = {"nbd": '[nbd]\nallow = ["10.0.0.0/8"]\n', "iscsi": '[iscsi]\ndefault_acl = '
           '"closed"\n'}[section]
    path.write_text(toml.replace(f"[{section}]\n", fix))
    load(str(path))
    path.write_text(toml)
    r = subprocess.run([str(BIN / "storaged"), "--config", str(path), "--state-dir",
                        str(tmp_path / "state"), "--socket", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and key in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()       # refused before anything was touched


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """D3: an NBD port in use ends start-up with one line naming nbd.listen, exit 1, no
    traceback, and no control socket left behind."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        sock = tmp_path / "ctl.sock"
        r = subprocess.run([str(BIN / "storaged"), "--state-dir", str(tmp_path / "state"),
                            "--socket", str(sock), "--nbd-listen", f"127.0.0.1:{port}",
                            "--metrics-listen", "off", "--iscsi-listen", "off",
                            "--log-level", "warning"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1, r
    assert r.stderr.splitlines() == [f"storaged: nbd.listen 127.0.0.1:{port}: cannot listen: "
                                     f"Address already in use"], r.stderr
    assert not sock.exists()


def test_a_second_daemon_on_the_same_state_dir_or_socket_is_refused(
        daemon: Daemon, tmp_path: Path) -> None:
    """D1: a second storaged on the running one's state directory stops with one line
    naming the first one's pid, before importing anything (before this, it imported the
    live pool, failed to bind its port, and closed the pool from its stale view, which
    could then not be imported again). D2: one on another state directory but the same
    socket is refused and the socket stays. The first daemon serves throughout; after
    it is restarted, the pool imports, the deep check is clean and the data is exact."""
    _make_pool(daemon, tmp_path, {"v": "16M"})
    _qemu_io(daemon.url("tank/v"), "write -P 0x3c 0 4M", "flush")
    assert daemon.proc is not None
    state = daemon.dir / "state"
    assert (state / "storaged.pid").read_text().strip() == str(daemon.proc.pid)
    disks = sorted(tmp_path.glob("disk*"))
    before = member_digests(disks)        # (the live owner's heartbeat block masked)
    common = ["--metrics-listen", "off", "--iscsi-listen", "off"]
    second = subprocess.run(
        [str(BIN / "storaged"), "--state-dir", str(state), "--socket",
         str(tmp_path / "other.sock"), "--nbd-listen", f"127.0.0.1:{_free_port()}", *common],
        capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 1 and len(second.stderr.splitlines()) == 1, second.stderr
    assert f"pid {daemon.proc.pid}" in second.stderr and str(state) in second.stderr
    third = subprocess.run(
        [str(BIN / "storaged"), "--state-dir", str(tmp_path / "elsewhere"), "--socket",
         daemon.sock, "--nbd-listen", f"127.0.0.1:{_free_port()}", *common],
        capture_output=True, text=True, timeout=60, check=False)
    assert third.returncode == 1 and len(third.stderr.splitlines()) == 1, third.stderr
    assert "socket" in third.stderr and "another running storaged" in third.stderr
    assert os.path.exists(daemon.sock) and daemon.up()
    assert member_digests(disks) == before
    _qemu_io(daemon.url("tank/v"), "read -P 0x3c 0 4M", read_only=True)
    assert daemon.stop() == 0
    daemon.start()
    status = daemon.json("pool", "status", "tank")
    assert isinstance(status, dict) and status["state"] == "online", status
    _deep_check_clean(daemon)
    _qemu_io(daemon.url("tank/v"), "read -P 0x3c 0 4M", read_only=True)


def test_a_fuse_mount_point_that_cannot_be_used_is_one_line_and_exit_1(
        daemon: Daemon, tmp_path: Path) -> None:
    """D3 for fuse.mount: a mount point that is a file, lies under a file, or is another
    file system's mount point is refused before any pool is imported (one line naming
    fuse.mount, exit 1, no traceback, members byte-identical, owner block included); one
    that fails only at mount(2) (here mkdir under /proc) is one line too, after which the
    imported pool was closed whole: the daemon starts again with it online, deep check
    clean, data exact."""
    _make_pool(daemon, tmp_path, {"v": "16M"})
    _qemu_io(daemon.url("tank/v"), "write -P 0x3c 0 4M", "flush")
    assert daemon.stop() == 0
    disks = sorted(tmp_path.glob("disk*"))
    before = member_digests(disks, mask_owner=False)
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "tmpfs").mkdir()
    bad = {str(tmp_path / "file"): "is not a directory",
           str(tmp_path / "file" / "mnt"): "not a directory"}
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "none", str(tmp_path / "tmpfs")], check=True)
        bad[str(tmp_path / "tmpfs")] = "already a mount point (tmpfs)"

    def start(mnt: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "storaged"), "--state-dir", str(daemon.dir / "state"), "--socket",
             daemon.sock, "--nbd-listen", "127.0.0.1:0", "--metrics-listen", "off",
             "--iscsi-listen", "off", "--log-level", "error", "--fuse-mount", mnt],
            capture_output=True, text=True, timeout=60, check=False)
    try:
        for mnt, why in bad.items():
            r = start(mnt)
            assert r.returncode == 1 and r.stdout == "", r
            assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr
            assert r.stderr.startswith(f"storaged: fuse.mount {mnt} ") and why in r.stderr
            assert member_digests(disks, mask_owner=False) == before
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(tmp_path / "tmpfs")], check=False)
    late = start("/proc/storaged-no-such-dir")
    assert late.returncode == 1 and "Traceback" not in late.stderr, late
    assert late.stderr.splitlines() == ["storaged: fuse.mount /proc/storaged-no-such-dir: "
                                        "cannot mount: No such file or directory"], late
    daemon.start()
    status = daemon.json("pool", "status", "tank")
    assert isinstance(status, dict) and status["state"] == "online", status
    _deep_check_clean(daemon)
    _qemu_io(daemon.url("tank/v"), "read -P 0x3c 0 4M", read_only=True)
