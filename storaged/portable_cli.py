"""storagectl volume send / receive / import / export.

send and receive hand the daemon the output or input itself (the -o/-i file, or stdout
or stdin: a pipe into ssh works the same), as a file descriptor passed over the control
socket: the daemon writes or reads the stream there, so it never crosses the socket.
import and export drive ``qemu-img convert`` against the daemon's own NBD export
(storaged.image_cli).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import time
from typing import Any

from storaged.client import ControlError, call
from storaged.sizes import format_size


class _Meter:
    """One self-overwriting progress line on stderr: bytes, rate, percent and ETA."""

    def __init__(self, verb: str, total: int | None, enabled: bool) -> None:
        self.verb, self.total, self.enabled = verb, total, enabled
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and not final):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6)
        line = f"\r{self.verb} {format_size(done)} at {format_size(int(rate))}/s"
        if self.total:
            pct = min(100.0, 100 * done / self.total)
            eta = (self.total - done) / rate if rate else 0
            line += f", {pct:.0f}%" + ("" if final else f", {eta:.0f}s left")
        print(line + " " * 8, end="\n" if final else "", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, path: str, show: bool) -> int:
    result: Any
    if args.cmd == "send":
        params: dict[str, Any] = {"name": args.name, "resume": args.resume}
        if args.base:
            params["from"] = args.base
        meter = _Meter("sent", None, show)

        def sent(p: dict[str, Any]) -> None:
            meter.update(p["bytes"])
        if args.output:
            fd, created = _open_output(args.output)
            try:
                # The daemon writes the file and makes it durable before it answers.
                result = call(path, "volume.send", params, sent, fd=fd)
            except BaseException:
                if created:         # a refused send leaves no file behind
                    os.unlink(args.output)
                raise
            finally:
                os.close(fd)
        else:
            if sys.stdout.isatty():
                print("storagectl: refusing to write a binary stream to a terminal (use -o "
                      "FILE or a pipe)", file=sys.stderr)
                return 2
            sys.stdout.flush()
            result = call(path, "volume.send", params, sent, fd=sys.stdout.fileno())
        meter.update(result["bytes"], final=True)
    elif args.cmd == "receive":
        if args.abort:
            result = call(path, "volume.receive_abort", {"name": args.name})
        else:
            params = {"name": args.name, "resumable": args.resumable, "resume": args.resume,
                      "force": args.force}
            if args.profile:
                params["profile"] = args.profile
            if args.input:
                try:
                    fd = os.open(args.input, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise ControlError(f"cannot open {args.input}: {e.strerror}",
                                       "NotFound" if e.errno == errno.ENOENT
                                       else "IOError") from e
            else:
                if sys.stdin.isatty():
                    print("storagectl: refusing to read a binary stream from a terminal (use "
                          "-i FILE or a pipe)", file=sys.stderr)
                    return 2
                fd = sys.stdin.fileno()
            try:
                st = os.fstat(fd)
                meter = _Meter("received", st.st_size if stat.S_ISREG(st.st_mode) else None,
                               show)
                result = call(path, "volume.receive", params,
                              lambda p: meter.update(p["bytes"]), fd=fd)
            finally:
                if args.input:
                    os.close(fd)
    else:
        # Imported here: subprocess (for qemu-img) would cost send and receive (what a
        # migration or backup runs) about 8 ms of start-up.
        from storaged import image_cli  # noqa: PLC0415
        if args.cmd == "import":
            result = image_cli.import_image(args, path, show)
        else:
            result = image_cli.export_image(args, path, show)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.cmd != "send" or args.output:
        print(_describe(args.cmd, result))
    return 0


def _open_output(name: str) -> tuple[int, bool]:
    """The -o file opened for writing (truncated), and whether this call created it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    try:
        try:
            return os.open(name, flags | os.O_EXCL, 0o666), True
        except FileExistsError:
            return os.open(name, flags | os.O_TRUNC), False
    except OSError as e:
        raise ControlError(f"cannot open {name}: {e.strerror}", "IOError") from e


def _describe(cmd: str, r: dict[str, Any]) -> str:
    if cmd == "send":
        return f"stream of {format_size(r['bytes'])} written"
    if cmd == "receive":
        if r.get("discarded"):
            return f"interrupted receive into {r['name']} discarded"
        kind = "increment" if r["incremental"] else "volume"
        return (f"received {kind} {r['volume']}@{r['snapshot']} ({r['records']} records, "
                f"{format_size(r['applied_bytes'])} of data)")
    return f"{cmd}ed {r['name']} ({format_size(r['size_bytes'])})"
