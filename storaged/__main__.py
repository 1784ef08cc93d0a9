"""``storaged`` / ``python -m storaged``: the daemon.

Configuration comes from a TOML file (``--config``; docs/CONFIG.md lists every key) and
command-line flags, which override it. ``--demo`` is the embedded default ``make run``
uses: a demo pool on sparse files under the state directory, exported on localhost.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import trio

from pool.errors import StorageError
from storaged import daemon
from storaged.config import Config, load, validate
from storaged.service import setup_logging
from storaged.startup import lock_state_dir
from storaged.tuning import tune_process
from storaged.version import VersionAction


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    ap = argparse.ArgumentParser(prog="storaged", description="storaged storage daemon")
    ap.add_argument("--config", help="TOML configuration file")
    ap.add_argument("--state-dir", help="where pools.json and demo devices live")
    ap.add_argument("--socket", help="control API Unix socket path")
    ap.add_argument("--nbd-listen", metavar="HOST:PORT", help="NBD address, or 'off'")
    ap.add_argument("--nbd-socket", metavar="PATH",
                    help="also serve NBD on this Unix socket (default off), or 'off'")
    ap.add_argument("--metrics-listen", metavar="HOST:PORT", help="metrics address, or 'off'")
    ap.add_argument("--iscsi-listen", metavar="HOST:PORT",
                    help="iSCSI target portal (default 127.0.0.1:3260), or 'off'")
    ap.add_argument("--fuse-mount", metavar="DIR",
                    help="serve every volume as a file under DIR (FUSE), or 'off'")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--demo", action="store_true",
                    help="create/import the demo pool under the state dir")
    ap.add_argument("--version", action=VersionAction)
    args = ap.parse_args(argv)
    return args, config_from(args)


def config_from(args: argparse.Namespace) -> Config:
    """The configuration file with the command-line flags over it (also what a reload,
    SIGHUP, re-reads: the flags keep their say)."""
    cfg = load(args.config)
    over: dict[str, object] = {}
    for flag, attr in (("state_dir", "state_dir"), ("socket", "socket"),
                       ("log_level", "log_level")):
        if getattr(args, flag) is not None:
            over[attr] = getattr(args, flag)
    for flag in ("nbd_listen", "nbd_socket", "metrics_listen", "fuse_mount",
                 "iscsi_listen"):
        v = getattr(args, flag)
        if v is not None:
            over[flag] = None if v == "off" else v
    if args.demo:
        over["demo"] = True
    return validate(dataclasses.replace(cfg, **over))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Start-up failures (bad config, state directory in use, an address in use) are one
    line on stderr and exit code 1, before any pool is touched where they can be found
    first (storaged.startup D1-D3)."""
    try:
        args, cfg = parse_args(argv)
        lock = lock_state_dir(cfg.state_dir)        # D1: before anything is imported
        daemon.preflight(cfg)
    except StorageError as e:
        print(f"storaged: {e.message}", file=sys.stderr)
        return 1
    setup_logging(cfg.log_level)     # journald priorities on its stream (service S1)
    tune_process()
    try:
        trio.run(functools.partial(daemon.run, cfg, reload=lambda: config_from(args)))
    except (StorageError, BaseExceptionGroup) as e:
        errors = _storage_errors(e)
        if errors is None:
            raise
        for err in errors:
            print(f"storaged: {err.message}", file=sys.stderr, flush=True)
        return 1
    finally:
        os.close(lock)
    return 0


def _storage_errors(e: BaseException) -> list[StorageError] | None:
    """The StorageErrors an exception (group) consists of; None if anything else is in it
    (a bug: that keeps its traceback)."""
    if isinstance(e, StorageError):
        return [e]
    if isinstance(e, BaseExceptionGroup):
        out: list[StorageError] = []
        for sub in e.exceptions:
            got = _storage_errors(sub)
            if got is None:
                return None
            out += got
        return out
    return None


if __name__ == "__main__":
    sys.exit(main())
