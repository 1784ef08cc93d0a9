"""An asynchronous libnbd client driven over stdin/stdout JSON lines
(tests/integration/test_concurrency).

Run by the *system* python (``/usr/bin/python3 -P nbdworker.py``, from a directory outside
the repo): our top-level ``nbd`` package shadows libnbd's module inside the repo, so libnbd is
imported at run time only, by name. It holds any number of connections (handles) and keeps
any number of commands in flight on each with libnbd's aio_* calls, all driven by one
select() loop; it checks nothing itself.

Requests (one JSON object a line):
  {"id": N, "c": "connect", "h": H, "uri": U}      open handle H (replaces a dead one)
  {"id": N, "c": "close", "h": H}
  {"id": N, "h": H, "op": "write", "off": O, "len": L, "seed": S, "fua": B}
  {"id": N, "h": H, "op": "read" | "trim" | "zero", "off": O, "len": L [, "fua": B]}
  {"id": N, "h": H, "op": "flush"}
  {"id": N, "c": "dump", "uri": U, "size": Z, "path": P}   read a whole export into file P
                                                           (own handle, own thread)
Replies: {"id": N, "ok": true [, "data": base64 | "crc": CRC]} or {"id": N, "err": TEXT}.
Write payloads are ``random.Random(seed).randbytes(len)``, made on both sides.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import random
import select
import sys
import threading
import zlib
from typing import Any

CHUNK = 1 << 20


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Worker:
    def __init__(self, nbd: Any) -> None:
        self.nbd = nbd
        self.handles: dict[int, Any] = {}
        # handle -> {cookie: (request id, op, read buffer or None)}
        self.flight: dict[int, dict[int, tuple[int, str, Any]]] = {}
        self.out_lock = threading.Lock()

    def reply(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj) + "\n"
        with self.out_lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    def fail_all(self, h: int, why: str) -> None:
        for rid, _op, _buf in self.flight.pop(h, {}).values():
            self.reply({"id": rid, "err": why})
        self.handles.pop(h, None)

    def request(self, req: dict[str, Any]) -> None:
        c = req.get("c")
        if c == "connect":
            h = int(req["h"])
            self.fail_all(h, "replaced")
            try:
                hd = self.nbd.NBD()
                hd.connect_uri(req["uri"])
            except Exception as e:
                self.reply({"id": req["id"], "err": str(e)})
                return
            self.handles[h] = hd
            self.flight[h] = {}
            self.reply({"id": req["id"], "ok": True})
        elif c == "close":
            h = int(req["h"])
            hd = self.handles.get(h)
            self.fail_all(h, "closed")
            if hd is not None:
                with contextlib.suppress(Exception):   # already dead is fine
                    hd.shutdown()
            self.reply({"id": req["id"], "ok": True})
        elif c == "dump":
            threading.Thread(target=self.dump, args=(req,), daemon=True).start()
        else:
            self.submit(req)

    def dump(self, req: dict[str, Any]) -> None:
        try:
            hd = self.nbd.NBD()
            hd.connect_uri(req["uri"])
            size = int(req["size"])
            with open(req["path"], "wb") as f:
                for off in range(0, size, CHUNK):
                    f.write(hd.pread(min(CHUNK, size - off), off))
            hd.shutdown()
        except Exception as e:
            self.reply({"id": req["id"], "err": str(e)})
            return
        self.reply({"id": req["id"], "ok": True})

    def submit(self, req: dict[str, Any]) -> None:
        rid, h, op = int(req["id"]), int(req["h"]), str(req["op"])
        hd = self.handles.get(h)
        if hd is None:
            self.reply({"id": rid, "err": f"handle {h} is not connected"})
            return
        nbd = self.nbd
        flags = nbd.CMD_FLAG_FUA if req.get("fua") else 0
        buf = None
        try:
            if op == "write":
                data = payload(int(req["seed"]), int(req["len"]))
                cookie = hd.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)),
                                       int(req["off"]), flags=flags)
                buf = zlib.crc32(data)
            elif op == "read":
                buf = nbd.Buffer(int(req["len"]))
                cookie = hd.aio_pread(buf, int(req["off"]))
            elif op == "trim":
                cookie = hd.aio_trim(int(req["len"]), int(req["off"]), flags=flags)
            elif op == "zero":
                cookie = hd.aio_zero(int(req["len"]), int(req["off"]), flags=flags)
            elif op == "flush":
                cookie = hd.aio_flush()
            else:
                self.reply({"id": rid, "err": f"unknown op {op}"})
                return
        except Exception as e:
            self.reply({"id": rid, "err": str(e)})
            return
        self.flight[h][cookie] = (rid, op, buf)

    def reap(self, h: int) -> None:
        hd = self.handles[h]
        for cookie, (rid, op, buf) in list(self.flight[h].items()):
            try:
                done = hd.aio_command_completed(cookie)
            except Exception as e:
                del self.flight[h][cookie]
                self.reply({"id": rid, "err": str(e)})
                continue
            if not done:
                continue
            del self.flight[h][cookie]
            out: dict[str, Any] = {"id": rid, "ok": True}
            if op == "read":
                out["data"] = base64.b64encode(bytes(buf.to_bytearray())).decode()
            elif op == "write":
                out["crc"] = buf
            self.reply(out)

    def run(self) -> None:
        pending = b""
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        while True:
            rfds: list[int] = [stdin]
            wfds: list[int] = []
            byfd: dict[int, int] = {}
            for h, hd in list(self.handles.items()):
                try:
                    fd = hd.aio_get_fd()
                    d = hd.aio_get_direction()
                except Exception as e:
                    self.fail_all(h, str(e))
                    continue
                byfd[fd] = h
                if d & self.nbd.AIO_DIRECTION_READ:
                    rfds.append(fd)
                if d & self.nbd.AIO_DIRECTION_WRITE:
                    wfds.append(fd)
            r, w, _x = select.select(rfds, wfds, [], 0.5)
            for fd in set(r) | set(w):
                if fd == stdin:
                    continue
                h = byfd[fd]
                hd = self.handles.get(h)
                if hd is None:
                    continue
                try:
                    if fd in r:
                        hd.aio_notify_read()
                    if fd in w:
                        hd.aio_notify_write()
                except Exception as e:
                    self.reap(h)
                    self.fail_all(h, str(e))
            for h in list(self.handles):
                self.reap(h)
            if stdin in r:
                chunk = os.read(stdin, 1 << 20)
                if not chunk:
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.request(json.loads(line))


def main() -> None:
    # libnbd's module, by name: this file runs outside the repo, where `nbd` is libnbd's.
    Worker(importlib.import_module("nbd")).run()


if __name__ == "__main__":
    main()
