"""Issue 22 end to end: progress of long commands (a bar on a terminal, a line per step
elsewhere), capacity under the pool's default profile, the over-commit warning, refusals of
odd sizes and profiles that change nothing (DESIGN invariants 6 and 9), and the libvirt
``<disk>`` element with discard='unmap'."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from storaged.ctl.progress import ProgressBar, duration
from storaged.daemon import attach_hint
from tests.kit.daemonkit import BIN, Daemon, _free_port

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_one_per_tenth_with_rate_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(out, tty=False, clock=clock, line_delay=0)
    for done in range(0, 1000 * MIB + 1, 10 * MIB):       # 101 updates, 0.1 s apart
        bar.update("scrubbing", done, 1000 * MIB)
        clock.t += 0.1
    bar.update("scrubbing", 1000 * MIB, 1000 * MIB, final=True)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 11, lines                           # 0%, 10%, ... 100%, no repeat
    assert lines[0] == "scrubbing: 0 of 1000M (0%)"
    assert lines[5] == "scrubbing: 500M of 1000M (50%) at 100M/s, ETA 0:05", lines[5]
    assert lines[-1] == "scrubbing: 1000M of 1000M (100%) at 100M/s"


def test_lines_without_a_total_come_every_period() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(out, tty=False, clock=clock, line_delay=0)
    for i in range(31):                                      # 30 s, 3 s of data a second
        bar.update("sending", i * 3 * MIB, None)
        clock.t += 1
    bar.update("sending", 93 * MIB, None, final=True)
    lines = out.getvalue().splitlines()
    assert lines == ["sending: 0", "sending: 30M at 3M/s", "sending: 60M at 3M/s",
                     "sending: 90M at 3M/s", "sending: 93M at 3M/s"], lines


def test_lines_wait_for_work_that_lasts() -> None:
    """Off a terminal, work shorter than LINE_DELAY prints nothing (a refusal stays one
    line); longer work starts its lines from where it is."""
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(out, tty=False, clock=clock)
    for done in range(0, 90 * MIB, 10 * MIB):
        bar.update("receiving", done, 100 * MIB)
        clock.t += 0.1
    bar.update("receiving", 90 * MIB, 100 * MIB, final=True)
    assert out.getvalue() == ""
    clock.t += 0.2
    bar.update("receiving", 95 * MIB, 100 * MIB)
    bar.update("receiving", 100 * MIB, 100 * MIB, final=True)
    assert out.getvalue().splitlines() == [
        "receiving: 95M of 100M (95%) at 86.4M/s, ETA 0:00",
        "receiving: 100M of 100M (100%) at 90.9M/s"], out.getvalue()


def test_terminal_bar_redraws_in_place_and_ends_its_line() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(out, tty=True, clock=clock)
    bar.update("rebuilding", 0, 4 << 30)
    clock.t += 0.05
    bar.update("rebuilding", 1 << 30, 4 << 30)               # within 0.2 s: not redrawn
    clock.t += 1
    bar.update("rebuilding", 2 << 30, 4 << 30, rate=512 * MIB, eta=4.0)
    bar.update("scrubbing", 0, 100)                          # a new phase: a new line
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 2
    rebuild, scrub = text.split("\n")[:2]
    assert "1G of" not in text
    assert rebuild.split("\r")[1:] == [
        "rebuilding [" + "-" * 24 + "] 0 of 4G (0%)",
        "rebuilding [" + "#" * 12 + "-" * 12 + "] 2G of 4G (50%) at 512M/s, ETA 0:04"]
    assert scrub == "\rscrubbing [" + "-" * 24 + "] 0 of 100 (0%)"


def test_durations() -> None:
    assert [duration(x) for x in (0, 7.4, 65, 3723)] == ["0:00", "0:07", "1:05", "1:02:03"]


# ---- end to end ---------------------------------------------------------------------------

def _in_pty(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; its exit code and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:          # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_mirror_pool_capacity_progress_and_refusals(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    # Size strings in the config; the rates make scrub and rebuild last a few seconds.
    cfg.write_text('[faults]\nscrub_rate = "24M"\nrebuild_rate = "16MiB"\n')
    daemon = Daemon(tmp_path, str(tmp_path / "ctl.sock"), _free_port(), 0,
                    args=("--config", str(cfg)))
    daemon.start()
    try:
        _mirror_pool(daemon, tmp_path)
    finally:
        daemon.stop()


def _mirror_pool(daemon: Daemon, tmp_path: Path) -> None:
    ctl = [str(BIN / "storagectl"), "--socket", daemon.sock]
    devs = [str(tmp_path / f"d{i}") for i in range(2)]
    daemon.ok("pool", "create", "tank", *devs, "--profile", "mirror:2", "--file-size", "2G")
    before = daemon.json("pool", "status", "tank")
    assert isinstance(before, dict)
    # Two 2G files under mirror:2 store about 2G, not 4G; the raw figures stay beside it.
    assert 1.8 * 2**30 < before["usable_size_bytes"] <= 2 * 2**30
    assert before["usable_size_bytes"] * 2 == before["size_bytes"]
    assert before["avail_bytes"] * 2 == before["free_bytes"]
    table = daemon.ok("pool", "list").splitlines()
    assert table[0].split() == ["NAME", "STATE", "PROFILE", "SIZE", "AVAIL", "CAP", "VOLUMES",
                                "OVERCOMMIT", "RAW_SIZE", "RAW_FREE"]
    assert table[1].split()[3:5] == ["1.9G", "1.9G"] and table[1].split()[8] == "3.8G"

    # Refusals: one clear line, nothing created, nothing changed (invariant 9).
    for args, words in ((["volume", "create", "tank/v", "--size", "10GB"], "ambiguous unit"),
                        (["volume", "create", "tank/v", "--size", "1.5 G"], "no spaces"),
                        (["volume", "create", "tank/v", "--size", "0.3K"], "whole number"),
                        (["pool", "create", "t2", str(tmp_path / "e0"), "--file-size", "1G",
                          "--profile", "ec:2+1 "], "unknown redundancy profile 'ec:2+1 '"),
                        (["pool", "create", "t2", str(tmp_path / "e0"), "--file-size", "1GB"],
                         "ambiguous unit")):
        r = daemon.ctl(*args)
        assert r.returncode == 1 and words in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stdout == ""
    assert not (tmp_path / "e0").exists()
    assert daemon.json("volume", "list") == []
    assert daemon.json("pool", "status", "tank") == before

    # Over-commit is counted against the usable 1.9G: 1.5G is fine, 1.5G more warns
    # (created all the same, as LVM-thin does).
    r = daemon.ctl("volume", "create", "tank/a", "--size", "1.5G")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = daemon.ctl("volume", "create", "tank/b", "--size", "1536M")
    assert r.returncode == 0 and r.stderr.startswith("storagectl: warning: pool tank is "
                                                     "over-committed"), r.stderr
    assert "1.5" in r.stderr and "overcommit_warning = 1" in r.stderr
    st = daemon.json("pool", "status", "tank")
    assert isinstance(st, dict)
    assert st["overcommit_ratio"] == round((3 << 30) / st["usable_size_bytes"], 4)

    # Import, export, send and receive: on a terminal (pty) a bar in human sizes; off one,
    # work this short (under progress.LINE_DELAY) prints no lines; the data reads back exact.
    image = tmp_path / "in.img"
    image.write_bytes(os.urandom(12 * MIB))
    rc, out = _in_pty([*ctl, "volume", "import", "tank/img", str(image)])
    assert rc == 0 and "\rimporting [" in out, out
    assert "] 12M of 12M (100%)" in out and "imported tank/img (12M)" in out, out
    r = daemon.ctl("volume", "export", "tank/img", str(tmp_path / "out.img"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()
    stream = tmp_path / "img.stream"
    daemon.ok("snapshot", "create", "tank/img@s")
    r = daemon.ctl("volume", "send", "tank/img@s", "-o", str(stream))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    rc, out = _in_pty([*ctl, "volume", "receive", "tank/copy", "-i", str(stream)])
    assert rc == 0 and re.search(r"\rreceiving \[#+\] 12.0M of 12.0M \(100%\)", out), out
    rc, out = _in_pty([*ctl, "volume", "export", "tank/copy", str(tmp_path / "copy.img")])
    assert rc == 0 and "\rexporting [" in out and "12M of 12M (100%)" in out, out
    assert (tmp_path / "copy.img").read_bytes() == image.read_bytes()

    # Scrub --wait (about 48M of fragments at faults.scrub_rate = "24M": 2 s): a line
    # per step off a terminal, a bar on one; never raw byte counts.
    r = daemon.ctl("pool", "scrub", "tank", "--wait")
    steps = r.stderr.splitlines()
    assert r.returncode == 0 and len(steps) >= 2 and "\r" not in r.stderr, r.stderr
    assert all(re.fullmatch(r"scrubbing: \S+ of 4\d\.\dM \(\d+%\)( at \S+/s)?(, ETA \d:\d\d)?",
                            line) for line in steps), steps
    assert not re.search(r"\d{6}", r.stderr), r.stderr
    assert re.search(r"scrub finished: (\S+) of \1 \(100.0%\)", r.stdout), r.stdout
    rc, out = _in_pty([*ctl, "pool", "scrub", "tank", "--wait"])
    assert rc == 0 and "\rscrubbing [" in out and re.search(r" of 4\d\.\dM \(", out), out
    assert "ETA" in out and "scrub finished" in out and not re.search(r"\d{6}", out), out
    # --json keeps stderr quiet.
    r = daemon.ctl("--json", "pool", "scrub", "tank", "--wait")
    assert r.returncode == 0 and r.stderr == "", r.stderr

    # replace-device --wait on a terminal (24M at 16M/s): the rebuild's bar; then the pool
    # is whole again, its deep check clean and the data byte-exact (DESIGN invariant 5).
    rc, out = _in_pty([*ctl, "pool", "replace-device", "tank", devs[1], str(tmp_path / "n1"),
                       "--file-size", "2G", "--wait"])
    bar = out.split("\r\n")[0]                            # then the pool's status
    assert rc == 0 and bar.startswith("\rrebuilding [") and not re.search(r"\d{6}", bar), out
    check = daemon.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check
    daemon.ok("volume", "export", "tank/img", str(tmp_path / "after.img"))
    assert (tmp_path / "after.img").read_bytes() == image.read_bytes()


def test_export_list_gives_libvirt_disks_with_discard(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("pool", "create", "p", str(tmp_path / "d0"), "--file-size", "256M")
    daemon.ok("volume", "create", "p/vm", "--size", "64M")
    daemon.ok("snapshot", "create", "p/vm@s")
    text = daemon.ok("export", "list")
    disks = {name: ET.fromstring(xml) for name, xml in
             re.findall(r"\n(\S+) \(libvirt\):\n(<disk .*?</disk>)", text, re.S)}
    rw, ro = disks["p/vm"], disks["p/vm@s"]
    driver = rw.find("driver")
    assert driver is not None and driver.get("discard") == "unmap"
    source, host = rw.find("source"), rw.find("source/host")
    assert source is not None and source.get("name") == "p/vm" and host is not None
    assert host.get("port") == str(daemon.nbd_port) and rw.find("readonly") is None
    assert ro.find("readonly") is not None
    assert "<driver name='qemu' type='raw' cache='none' discard='unmap'/>" in text


def test_make_run_hint_has_discard() -> None:
    hint = attach_hint(("127.0.0.1", 10809), "/run/s")
    assert "discard='unmap'" in hint and "cache=none,discard=unmap" in hint


def test_overcommit_warning_off_and_live(tmp_path: Path) -> None:
    """overcommit_warning = 0 (config file) turns the warning off; a SIGHUP reload of the
    file turns it back on (a live key)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("overcommit_warning = 0\n")
    d = Daemon(tmp_path, str(tmp_path / "ctl.sock"), _free_port(), 0, args=("--config",
                                                                          str(cfg)))
    d.start()
    try:
        d.ok("pool", "create", "p", str(tmp_path / "d0"), "--file-size", "128M")
        r = d.ctl("volume", "create", "p/big", "--size", "1T")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        cfg.write_text("overcommit_warning = 2.5\n")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "overcommit_warning = 2.5" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        r = d.ctl("volume", "create", "p/more", "--size", "1G")
        assert r.returncode == 0 and "(overcommit_warning = 2.5)" in r.stderr, r.stderr
    finally:
        d.stop()
