"""storagectl volume send / receive / import / export.

send and receive hand the daemon the output or input itself (the -o/-i file, or stdout
or stdin: a pipe into ssh works the same), as a file descriptor passed over the control
socket: the daemon writes or reads the stream there, so it never crosses the socket.
import and export drive ``qemu-img convert`` against the daemon's own NBD export
(storaged.ctl.image).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

from storaged.ctl.client import ControlError, call
from storaged.ctl.progress import ProgressBar
from storaged.sizes import format_size


class _Meter:
    """The progress of one stream on stderr (storaged.ctl.progress), or nothing."""

    def __init__(self, verb: str, total: int | None, show: bool, tty: bool) -> None:
        self.verb, self.total, self.done = verb, total, 0
        self.bar = ProgressBar(sys.stderr, tty=tty) if show else None

    def update(self, done: int | None, *, final: bool = False) -> None:
        self.done = self.done if done is None else done
        if self.bar is not None:
            self.bar.update(self.verb, self.done, self.total, final=final)


def run(args: argparse.Namespace, path: str, show: bool, tty: bool = False) -> int:
    """Run send, receive, import or export; ``show``: report progress on stderr (a bar
    where ``tty``, else a line per step)."""
    result: Any
    if args.cmd == "send":
        params: dict[str, Any] = {"name": args.name, "resume": args.resume}
        if args.base:
            params["from"] = args.base
        meter = _Meter("sending", None, show, tty)

        def sent(p: dict[str, Any]) -> None:
            meter.update(p["bytes"])
        if args.output:
            result = _send_to_file(args.output, path, params, sent)
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
                meter = _Meter("receiving",
                               st.st_size if stat.S_ISREG(st.st_mode) else None, show, tty)
                result = call(path, "volume.receive", params,
                              lambda p: meter.update(p["bytes"]), fd=fd)
                # Done: the whole input (a file's size) went in.
                meter.update(meter.total, final=True)
            finally:
                if args.input:
                    os.close(fd)
    else:
        # Imported here: subprocess (for qemu-img) would cost send and receive (what a
        # migration or backup runs) about 8 ms of start-up.
        from storaged.ctl import image  # noqa: PLC0415
        if args.cmd == "import":
            result = image.import_image(args, path, show, tty)
        else:
            result = image.export_image(args, path, show, tty)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.cmd != "send" or args.output:
        print(_describe(args.cmd, result))
    return 0


def _send_to_file(output: str, path: str, params: dict[str, Any],
                  sent: Callable[[dict[str, Any]], None]) -> Any:
    """Send into ``output``. A regular file (or a new one) is written as a temporary file
    beside it and renamed over it once the daemon answered (it makes the file durable
    first), so a refused or failed send leaves no file behind and never truncates an
    existing one (an older backup stays whole). Anything else (a FIFO, a device,
    /dev/stdout) is written in place."""
    try:
        st: os.stat_result | None = os.stat(output)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ControlError(f"cannot open {output}: {e.strerror}", "IOError") from e
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ControlError(f"cannot open {output}: {e.strerror}", "IOError") from e
        try:
            return call(path, "volume.send", params, sent, fd=fd)
        finally:
            os.close(fd)
    where, name = os.path.split(os.path.abspath(output))
    tmp = os.path.join(where, f".{name}.{os.getpid()}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o666 if st is None else stat.S_IMODE(st.st_mode))
    except OSError as e:
        raise ControlError(f"cannot open {output}: {e.strerror}", "IOError") from e
    try:
        try:
            result = call(path, "volume.send", params, sent, fd=fd)
        finally:
            os.close(fd)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)      # the rename is durable too
    finally:
        os.close(dfd)
    return result


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
