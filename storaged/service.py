"""Running under systemd (issue 22): journald priorities, the sd_notify protocol with its
watchdog, and what SIGHUP (``systemctl reload``) may change.

Invariants:
S1. Log lines written to the journal's stream (JOURNAL_STREAM names stderr's device and
    inode) start with the syslog priority of their level, ``<3>`` error, ``<4>`` warning,
    ``<6>`` info, ``<7>`` debug (``<2>`` critical), so ``journalctl -p warning`` selects
    them; anywhere else lines carry no prefix.
S2. ``sd_notify`` sends one datagram to $NOTIFY_SOCKET (a path, or ``@`` for the abstract
    namespace) and never blocks: a socket that is missing or full drops the message
    (logged), the daemon goes on. Without $NOTIFY_SOCKET it does nothing.
S3. With $WATCHDOG_USEC set (and $WATCHDOG_PID, if set, ours) ``watchdog`` sends
    ``WATCHDOG=1`` every WATCHDOG_USEC/2 from a task of the event loop, from the daemon's
    start (pool imports included) to its end: a loop that hangs stops the pings and
    systemd restarts the daemon.
S4. A reload re-reads the configuration whole before it changes anything: a file that
    fails to load or validate changes nothing (one error line; the daemon serves on with
    the settings it had). Of a valid file, the keys in ``LIVE_KEYS`` take effect at once;
    every other key that differs from the running value is named in one warning as
    needing a restart and keeps its running value.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace

import trio

from storaged.config import KEY_OF, Config

log = logging.getLogger(__name__)

# S1: Python's levels as syslog priorities (sd-daemon(3)'s SD_ERR etc.).
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
                   logging.INFO: 6, logging.DEBUG: 7}
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# S4: config attributes a reload applies while the daemon serves (docs/CONFIG.md).
LIVE_KEYS = frozenset({
    "log_level", "full_warning", "fault_threshold", "scrub_rate", "rebuild_rate",
    "auto_replace", "read_timeout", "write_timeout", "write_buffer_age", "overcommit_warning",
    "space_interval", "qos",
})


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a Python level (a custom level takes the next one up)."""
    for level in sorted(SYSLOG_PRIORITY):
        if levelno <= level:
            return SYSLOG_PRIORITY[level]
    return SYSLOG_PRIORITY[logging.CRITICAL]


class JournalFormatter(logging.Formatter):
    """Each line of a record prefixed with its syslog priority (S1): journald reads the
    prefix of every line of its stream, so a traceback keeps its priority too."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream: JOURNAL_STREAM is ``DEV:INODE`` of the
    stream systemd connected, and a child whose stderr was redirected elsewhere inherits
    the variable but not the stream (systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: str) -> None:
    """Logs to stderr without timestamps (journald adds them), level and logger name;
    with priority prefixes on the journal's stream (S1)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(LOG_FORMAT) if stderr_is_journal()
                         else logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())


def _notify_address() -> str | None:
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return None
    return "\0" + target[1:] if target.startswith("@") else target


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) about our state (S2); whether the message went out."""
    target = _notify_address()
    if target is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        try:
            s.sendto(message.encode(), target)
        except OSError as e:
            log.warning("sd_notify %s failed: %s", message.split("\n", 1)[0],
                        e.strerror or e)
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, half of what systemd waits (S3); None when the
    service has no watchdog or it is meant for another process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or _notify_address() is None:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


async def watchdog(interval: float) -> None:
    """Ping systemd's watchdog every ``interval`` seconds from the event loop (S3)."""
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)


def reloading_message() -> str:
    """RELOADING=1 with the CLOCK_MONOTONIC time systemd (253+) wants beside it."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def merge(running: Config, loaded: Config) -> tuple[Config, list[str], list[str]]:
    """The configuration after a reload (S4): ``running`` with the live keys of
    ``loaded``; and the names of the live keys that changed and of the other keys that
    differ (which need a restart)."""
    changed: list[str] = []
    restart: list[str] = []
    live: dict[str, object] = {}
    for f in fields(Config):
        if f.name == "extra":
            continue
        old, new = getattr(running, f.name), getattr(loaded, f.name)
        if old == new:
            continue
        if f.name in LIVE_KEYS:
            live[f.name] = new
            changed.append(KEY_OF.get(f.name, f.name))
        else:
            restart.append(KEY_OF.get(f.name, f.name))
    return replace(running, **live), changed, restart  # type: ignore[arg-type]


class Reloader:
    """Holds the running configuration; ``reload`` re-reads it (S4). ``apply`` is called
    with the new configuration once it is whole."""

    def __init__(self, cfg: Config, load: Callable[[], Config] | None,
                 apply: Callable[[Config], None]) -> None:
        self.cfg = cfg
        self._load = load
        self._apply = apply

    async def reload(self) -> bool:
        """Whether the configuration was re-read and applied."""
        if self._load is None:
            log.warning("reload: no configuration to re-read")
            return False
        try:
            loaded = await trio.to_thread.run_sync(self._load)
        except Exception as e:       # whatever the failure, the running config stays
            log.error("reload refused, running configuration kept: %s",
                      getattr(e, "message", None) or e)
            return False
        new, changed, restart = merge(self.cfg, loaded)
        self.cfg = new
        self._apply(new)
        if restart:
            log.warning("reload: kept as running, a restart applies them: %s",
                        ", ".join(restart))
        log.info("configuration reloaded: %s", ", ".join(
            f"{k} = {getattr(new, a)!r}" for a, k in
            ((a, KEY_OF.get(a, a)) for a in sorted(LIVE_KEYS))
            if k in changed) or "no live key changed")
        return True
