"""Running under systemd (issue 22): the unit file as systemd reads it, the sd_notify
protocol (READY=1, WATCHDOG=1, RELOADING=1, STOPPING=1) against a real datagram socket,
journald priorities on a real stream, and SIGHUP's reload while the daemon serves
(storaged.service S1-S4; DESIGN invariant 9 for a refused reload: nothing changes).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import trio

from storaged import service
from storaged.config import Config, load
from tests.kit.daemonkit import Daemon, _free_port, _qemu_io
from volumes import InvalidArgument

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "storaged.service"
FUSE_DROPIN = UNIT.parent / "storaged-fuse.conf"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


# --- the unit --------------------------------------------------------------------------

def _analyze_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A root directory systemd-analyze can load the unit from: the units it names
    (sysinit.target and the like) copied from the host, the programs it runs present."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for prog in ("usr/local/bin/storaged", "bin/kill"):
        (root / prog).parent.mkdir(parents=True, exist_ok=True)
        (root / prog).write_text("#!/bin/sh\n")
        (root / prog).chmod(0o755)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name, text in units.items():
        (etc / name).write_text(text)
    return root


def _analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args, f"--root={root}"], capture_output=True,
                          text=True, timeout=60, check=False)


def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    """`systemd-analyze verify` reads contrib/storaged.service without a word (an unknown
    key or a bad value is only a warning, so any output fails the test: the typo'd copy
    shows it would), also with the FUSE drop-in, and `systemd-analyze security` rates
    its exposure under 5.0 (the unhardened unit was 9.6)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing: `make system-deps` installs Debian's systemd")
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} is missing: systemd-analyze has no sysinit.target to "
                    f"order the unit against")
    text = UNIT.read_text()
    bad = text.replace("ProtectHome=yes", "ProtectHom=yes").replace("Type=notify\n",
                                                                   "Type=notifyy\n")
    root = _analyze_root(tmp_path, {"storaged.service": text, "typo.service": bad})
    # --man=no: Documentation= points where the package installs it; --generators=no: the
    # container has no /run/systemd to run them into.
    r = _analyze(root, "verify", "--man=no", "--generators=no", "storaged.service")
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    dropin = root / "etc/systemd/system/storaged.service.d/fuse.conf"
    dropin.parent.mkdir()
    dropin.write_text(FUSE_DROPIN.read_text())
    r = _analyze(root, "verify", "--man=no", "--generators=no", "storaged.service")
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    dropin.unlink()
    r = _analyze(root, "verify", "--man=no", "--generators=no", "typo.service")
    assert "Unknown key 'ProtectHom'" in r.stderr and "notifyy" in r.stderr, r.stderr
    for must in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "Before=libvirtd.service libvirt-guests.service", "ProtectSystem=strict",
                 "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "DeviceAllow=block-* rw"):
        assert must in text, must
    assert "PrivateDevices=yes" not in text          # it would hide the block devices
    r = _analyze(root, "security", "--offline=true", "--threshold=50", "storaged.service")
    got = re.search(r"Overall exposure level for storaged.service: ([0-9.]+)", r.stdout)
    assert r.returncode == 0 and got is not None and float(got.group(1)) < 5.0, r.stdout[-600:]


# --- in process: priorities, the reload merge -------------------------------------------

def test_syslog_priorities_per_level() -> None:
    """S1: the map, and every line of a multi-line record (a traceback) prefixed."""
    assert [service.syslog_priority(lv) for lv in (logging.DEBUG, logging.INFO,
                                                  logging.WARNING, logging.ERROR,
                                                  logging.CRITICAL)] == [7, 6, 4, 3, 2]
    assert service.syslog_priority(25) == 4          # a custom level between INFO and WARNING
    fmt = service.JournalFormatter(service.LOG_FORMAT)
    rec = logging.LogRecord("pool", logging.ERROR, __file__, 1, "one\ntwo", None, None)
    assert fmt.format(rec) == "<3>ERROR pool: one\n<3>two"


def test_journal_stream_must_be_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """S1: JOURNAL_STREAM counts only when it names stderr's device and inode."""
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert service.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not service.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not service.stderr_is_journal()


def test_reload_merge_takes_live_keys_only() -> None:
    """S4: live keys change, others keep their running value and are named."""
    running = Config(full_warning=0.8, nbd_max_inflight=64, log_level="info")
    loaded = Config(full_warning=0.5, nbd_max_inflight=32, log_level="info",
                    write_buffer_age=5.0, space_interval=2.0)
    new, changed, restart = service.merge(running, loaded)
    assert (new.full_warning, new.write_buffer_age, new.nbd_max_inflight,
            new.space_interval) == (0.5, 5.0, 64, 2.0)
    assert changed == ["full_warning", "space.check_interval", "cache.write_buffer_age"]
    assert restart == ["nbd.max_inflight"]


@pytest.mark.parametrize("value", ["0", "-1", "3601", '"10"'])
def test_space_check_interval_outside_its_range_is_refused(tmp_path: Path,
                                                           value: str) -> None:
    """space.check_interval: seconds in (0, 3600]; anything else is one clear error
    naming the key (a reload of such a file changes nothing: S4)."""
    path = tmp_path / "storaged.toml"
    path.write_text(f"[space]\ncheck_interval = {value}\n")
    with pytest.raises(InvalidArgument, match=r"space\.check_interval"):
        load(str(path))
    path.write_text("[space]\ncheck_interval = 0.25\n")
    assert load(str(path)).space_interval == 0.25


def test_watchdog_only_for_us(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3: no watchdog without WATCHDOG_USEC, a notify socket, or for another pid."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@nobody")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert service.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert service.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert service.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert service.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert service.watchdog_interval() is None


def test_a_blocked_loop_stops_the_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3: the pings come from the event loop itself: while it is blocked (here 1 s in a
    synchronous sleep) none goes out, which is what lets systemd see a hang."""
    listener = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.watchdog, 0.1)
            await trio.sleep(0.5)
            time.sleep(1.0)  # noqa: ASYNC251 - the loop hangs, on purpose
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        time.sleep(0.2)
    finally:
        listener.close()
    times = [t for t, m in listener.messages if m == "WATCHDOG=1"]
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    assert len(times) >= 8 and gaps[-1] >= 0.95 and gaps[-2] < 0.5, gaps


# --- the daemon under a (simulated) systemd ---------------------------------------------

class NotifyListener:
    """systemd's side of sd_notify: an abstract-namespace datagram socket, every message
    with its arrival time."""

    def __init__(self) -> None:
        self.name = f"@storaged-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, after: int = 0, timeout: float = 20.0) -> int:
        """Index of the first message from ``after`` on that is ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (_t, m) in enumerate(self.messages[after:], after):
                if m == text:
                    return i
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} after message {after}: {self.messages[after:]}")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def _journal_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    *args: str) -> Daemon:
    """A daemon as systemd starts it: stderr is the journal's stream (JOURNAL_STREAM is
    its device:inode), NOTIFY_SOCKET set (by the caller)."""
    log = tmp_path / "daemon.log"
    log.touch()
    st = log.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    d = Daemon(tmp_path, str(tmp_path / "ctl.sock"), _free_port(), 0, args=args)
    d.start()
    return d


def _lines(d: Daemon) -> list[str]:
    return (d.dir / "daemon.log").read_text(errors="replace").splitlines()


def test_notify_watchdog_and_journal_priorities(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """S2/S3: READY=1 once the control socket answers, WATCHDOG=1 every WATCHDOG_USEC/2
    from start to stop, STOPPING=1 on SIGTERM. S1: a faulted disk is a <3> line, the
    rest <6>; no line carries a Python level number. The degraded mirror reads back."""
    listener = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")         # pings every 0.5 s
    d: Daemon | None = None
    try:
        d = _journal_daemon(tmp_path, monkeypatch)
        ready = listener.wait_for("READY=1\nSTATUS=serving")
        assert d.up()
        assert [m for _t, m in listener.messages[:ready]] == ["WATCHDOG=1"] * ready
        d.ok("pool", "create", "tank", "--profile", "mirror:2", str(tmp_path / "m0"),
             str(tmp_path / "m1"), "--file-size", "64M", "--extent-size", "1M")
        d.ok("volume", "create", "tank/v", "--size", "8M")
        _qemu_io(d.url("tank/v"), "write -P 0x3c 0 2M", "flush")
        (tmp_path / "m1").unlink()                         # a disk gone: faulted
        deadline = time.monotonic() + 15
        while not any("faulted" in ln for ln in _lines(d)) and time.monotonic() < deadline:
            time.sleep(0.2)
        _qemu_io(d.url("tank/v"), "read -P 0x3c 0 2M", read_only=True)
        time.sleep(1.0)                                    # a few more pings
        pings = [t for t, m in listener.messages if m == "WATCHDOG=1"]
        assert d.stop(signal.SIGTERM) == 0
        d.proc = None
        listener.wait_for("STOPPING=1")
    finally:
        if d is not None and d.proc is not None:
            d.stop(signal.SIGKILL)
        listener.close()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(gaps) >= 4 and max(gaps) < 1.0, gaps      # never past WATCHDOG_USEC
    assert 0.4 < sum(gaps) / len(gaps) < 0.7, gaps
    lines = _lines(d)
    faulted = [ln for ln in lines if "faulted" in ln]
    assert faulted and all(ln.startswith("<3>ERROR ") for ln in faulted), lines
    assert any(ln.startswith("<6>INFO storaged.daemon: storaged ready") for ln in lines)
    assert not [ln for ln in lines if re.match(r"<(10|20|30|40|50)>", ln)], lines
    assert all(re.match(r"<[2-7]>", ln) for ln in lines), lines


def test_sighup_reloads_live_keys_while_serving(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """S4: SIGHUP applies full_warning and log_level at once, names a changed
    nbd.max_inflight as needing a restart (a <4> line), answers RELOADING=1 then READY=1,
    and an NBD connection open across it goes on; a broken file changes nothing."""
    conf = tmp_path / "storaged.toml"
    conf.write_text('log_level = "info"\nfull_warning = 0.9\n[nbd]\nmax_inflight = 64\n')
    listener = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    d: Daemon | None = None
    try:
        d = _journal_daemon(tmp_path, monkeypatch, "--config", str(conf))
        ready = listener.wait_for("READY=1\nSTATUS=serving")
        d.ok("pool", "create", "small", str(tmp_path / "s0"), "--file-size", "32M",
             "--extent-size", "1M")
        d.ok("volume", "create", "small/v", "--size", "16M", "--compression", "off")

        def status() -> dict[str, object]:
            st = d.json("pool", "status", "small") if d else None
            assert isinstance(st, dict)
            return st

        # A client that stays connected across the reload: write, wait, read back.
        client = subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", "-c", "flush",
             "-c", "sleep 1500", "-c", "read -P 0x5a 0 4M", d.url("small/v")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.7)
        assert status()["full_warning"] is False
        conf.write_text('log_level = "debug"\nfull_warning = 0.05\n'
                        '[nbd]\nmax_inflight = 32\n')
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        listener.wait_for("READY=1\nSTATUS=serving", after=ready + 1)
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0 and "failed" not in out.lower(), out
        deadline = time.monotonic() + 10
        while status()["full_warning"] is not True and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status()["full_warning"] is True
        msgs = [m for _t, m in listener.messages[ready + 1:] if m != "WATCHDOG=1"]
        assert len(msgs) == 2 and re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", msgs[0]) \
            and msgs[1] == "READY=1\nSTATUS=serving", msgs
        lines = _lines(d)
        assert "<4>WARNING storaged.service: reload: kept as running, a restart applies " \
            "them: nbd.max_inflight" in lines, lines
        assert any("configuration reloaded: full_warning = 0.05, log_level = 'debug'" in ln
                   for ln in lines), lines
        # A broken file: one error line, the running settings stay (log level debug,
        # full_warning 0.05), the daemon serves on.
        conf.write_text('full_warning = "lots"\n')
        before = len(_lines(d))
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (not any("reload refused" in ln for ln in _lines(d)[before:])
               and time.monotonic() < deadline):
            time.sleep(0.1)
        refused = [ln for ln in _lines(d)[before:] if "reload refused" in ln]
        assert len(refused) == 1 and refused[0].startswith("<3>ERROR ") \
            and "full_warning must be of type float" in refused[0], refused
        assert status()["full_warning"] is True
        _qemu_io(d.url("small/v"), "read -P 0x5a 0 4M", read_only=True)
        assert d.stop(signal.SIGTERM) == 0
        d.proc = None
    finally:
        if d is not None and d.proc is not None:
            d.stop(signal.SIGKILL)
        listener.close()
