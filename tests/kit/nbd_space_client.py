"""An NBD client for the space tests, run by the *system* python (libnbd's binding; our own
``nbd`` package shadows it in-process, DESIGN §1) from a directory outside the repo:

    python3 nbd_space_client.py URI SECONDS INFLIGHT SEED MODE [MODEL_IN [MODEL_OUT [GRACE]]]

It keeps INFLIGHT asynchronous commands in flight on one connection for SECONDS: writes of
random, often unaligned, ranges (aligned whole blocks too), write-zeroes and trims, with a
flush every ~64 commands. In-flight commands never overlap, so a byte-exact model of the
volume holds: a command that succeeds changes its range, one that fails changes nothing
(invariant 8: a refused write changes nothing). At the end it reads the whole volume back
and compares it with the model (MODEL_IN: the starting content, "-" or absent for zeros;
MODEL_OUT: where to save the final model, "-" for nowhere).

MODE: "mixed" (all of the above), "writes" (writes and flushes only) or "fill" (writes,
most of them of 4-16 whole blocks, and flushes).

Prints one JSON line: counts of commands by kind and outcome (errno names), "mismatch"
(the first differing offset or null), "hung" (commands still unanswered GRACE seconds,
default 60, after the last was sent: the server stopped answering them).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import sys
import time
from typing import Any

nbd: Any = importlib.import_module("nbd")   # libnbd's binding (this runs outside the repo)

BLOCK = 65536


def main() -> None:
    uri, seconds, inflight, seed, mode = (sys.argv[1], float(sys.argv[2]), int(sys.argv[3]),
                                          int(sys.argv[4]), sys.argv[5])
    model_in = sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] != "-" else None
    model_out = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] != "-" else None
    grace = float(sys.argv[8]) if len(sys.argv) > 8 else 60.0
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    model = bytearray(size)
    if model_in:
        with open(model_in, "rb") as src:
            model[:] = src.read()
    assert len(model) == size
    counts: dict[str, int] = {}
    busy: dict[int, tuple[str, int, int, bytes | None]] = {}   # cookie -> command
    started = time.monotonic()
    deadline = started + seconds
    issued = 0

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    def overlaps(off: int, n: int) -> bool:
        return any(o < off + n and off < o + ln for k, o, ln, _d in busy.values()
                   if k != "flush")

    def pick() -> tuple[int, int]:
        while True:
            r = rng.random()
            if mode == "fill" and r < 0.7:   # big whole-block writes: fills a pool fast
                n = BLOCK * rng.randint(4, 16)
                off = BLOCK * rng.randrange(size // BLOCK - 16)
            elif r < 0.4:      # whole blocks
                n = BLOCK * rng.randint(1, 4)
                off = BLOCK * rng.randrange(size // BLOCK - 4)
            elif r < 0.8:    # small, unaligned (sector-aligned like a guest's)
                n = 512 * rng.randint(1, 64)
                off = 512 * rng.randrange((size - n) // 512)
            else:            # large, unaligned
                n = 512 * rng.randint(64, 1024)
                off = 512 * rng.randrange((size - n) // 512)
            if not overlaps(off, n):
                return off, n

    def issue() -> None:
        nonlocal issued
        issued += 1
        if issued % 64 == 0:
            busy[h.aio_flush()] = ("flush", 0, 0, None)
            return
        off, n = pick()
        r = rng.random()
        if mode == "mixed" and r < 0.15:
            busy[h.aio_zero(n, off)] = ("zero", off, n, None)
        elif mode == "mixed" and r < 0.25:
            busy[h.aio_trim(n, off)] = ("trim", off, n, None)
        else:
            data = rng.randbytes(n)
            busy[h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)] = (
                "write", off, n, data)

    while True:
        now = time.monotonic()
        while now < deadline and len(busy) < inflight:
            issue()
        if not busy:
            break
        if now > deadline + grace:
            break
        h.poll(1000)
        for cookie in list(busy):
            kind, off, n, data = busy[cookie]
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as e:
                del busy[cookie]
                count(f"{kind}:{errno.errorcode.get(e.errno or 0, str(e.errno))}")
                continue
            del busy[cookie]
            count(f"{kind}:ok")
            if kind == "write":
                assert data is not None
                model[off:off + n] = data
            elif kind in ("zero", "trim"):
                model[off:off + n] = bytes(n)
    hung = len(busy)
    mismatch = None
    if not hung:
        h.flush()
        step = 4 << 20
        for off in range(0, size, step):
            got = h.pread(min(step, size - off), off)
            if got != model[off:off + len(got)]:
                first = next(i for i in range(len(got)) if got[i] != model[off + i])
                mismatch = off + first
                break
    if model_out:
        with open(model_out + ".tmp", "wb") as f:
            f.write(model)
        os.replace(model_out + ".tmp", model_out)
    print(json.dumps({"counts": counts, "mismatch": mismatch, "hung": hung,
                      "seconds": round(time.monotonic() - started, 1)}))
    if not hung:
        h.shutdown()


if __name__ == "__main__":
    main()
