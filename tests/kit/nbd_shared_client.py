"""An NBD client for the shared-volume tests, run by the *system* python (libnbd's binding;
our own ``nbd`` package shadows it in-process) from a directory outside the repo:

    python3 nbd_shared_client.py URI SECONDS INFLIGHT SEED WHO OF [MODEL_OUT]

Client WHO of OF, one connection each, all on one volume: client WHO owns the 4 KiB pages
whose index modulo OF is WHO, so every 64 KiB block of the volume is shared by all the
clients (each write of one is a read-modify-write of a block the others write too, as two
guests' file systems on one disk do during a live migration). It keeps INFLIGHT
asynchronous commands in flight for SECONDS: writes of its own pages (one, or a run of its
pages inside up to five blocks, each page's own write), reads of any range from 4 KiB to
1 MiB (unaligned too), and a flush every ~32 commands. A read is checked at once against
the client's model on the pages it owns that no write of its own had in flight while the
read was (the model is byte-exact there: its writes never overlap each other in flight).
At the end it flushes and reads the whole volume back against the model.

Prints one JSON line: counts by kind and outcome, "bad" (the first failed comparison:
kind, offset, page, or null), "hung" (commands unanswered 60 s after the last was sent).
With MODEL_OUT it saves the model (its own pages; others' pages zero) and its ownership.
"""

from __future__ import annotations

import errno
import importlib
import json
import random
import sys
import time
from typing import Any

nbd: Any = importlib.import_module("nbd")   # libnbd's binding (this runs outside the repo)

PAGE = 4096
BLOCK = 65536


def main() -> None:
    uri, seconds, inflight, seed, who, of = (sys.argv[1], float(sys.argv[2]),
                                             int(sys.argv[3]), int(sys.argv[4]),
                                             int(sys.argv[5]), int(sys.argv[6]))
    model_out = sys.argv[7] if len(sys.argv) > 7 else None
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    pages = size // PAGE
    mine = [p for p in range(pages) if p % of == who]
    model = bytearray(size)
    writing: dict[int, int] = {}          # page -> writes of it in flight
    counts: dict[str, int] = {}
    busy: dict[int, tuple[str, int, int, Any, set[int]]] = {}
    bad: list[Any] = []
    deadline = time.monotonic() + seconds
    issued = 0

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    def issue() -> None:
        nonlocal issued
        issued += 1
        if issued % 32 == 0:
            busy[h.aio_flush()] = ("flush", 0, 0, None, set())
            return
        if rng.random() < 0.55:
            p = rng.choice(mine)
            n = 1 if rng.random() < 0.6 else rng.randint(2, 5 * BLOCK // PAGE // of + 1)
            run = [q for q in range(p, min(pages, p + n * of), of) if q not in writing]
            if not run:
                return
            for q in run:
                data = rng.randbytes(PAGE)
                writing[q] = writing.get(q, 0) + 1
                for _k, _o, _n, _d, ok in busy.values():   # a read in flight may see it
                    ok.discard(q)
                cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), q * PAGE)
                busy[cookie] = ("write", q * PAGE, PAGE, data, set())
            return
        r = rng.random()
        if r < 0.4:
            n = PAGE
        elif r < 0.7:
            n = BLOCK
        else:
            n = rng.choice((3, 4, 8, 16)) * BLOCK
        n = min(n, size)
        if rng.random() < 0.3:
            n -= 512 * rng.randint(0, 7)
            off = 512 * rng.randrange((size - n) // 512 + 1)
        else:
            off = PAGE * rng.randrange((size - n) // PAGE + 1)
        buf = nbd.Buffer(n)
        # The pages of ours this read may check: none of our writes to them in flight now.
        first, last = off // PAGE, (off + n - 1) // PAGE
        ok = {q for q in range(first, last + 1) if q % of == who and q not in writing}
        busy[h.aio_pread(buf, off)] = ("read", off, n, buf, ok)

    def check_read(off: int, got: bytes, ok: set[int]) -> None:
        for q in sorted(ok):
            lo, hi = max(q * PAGE, off), min((q + 1) * PAGE, off + len(got))
            if got[lo - off:hi - off] != model[lo:hi] and not bad:
                bad.append(["read", off, q])

    while True:
        now = time.monotonic()
        while now < deadline and len(busy) < inflight and not bad:
            issue()
        if not busy or now > deadline + 60:
            break
        h.poll(1000)
        for cookie in list(busy):
            kind, off, n, data, ok = busy[cookie]
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as e:
                del busy[cookie]
                count(f"{kind}:{errno.errorcode.get(e.errno or 0, str(e.errno))}")
                if kind == "write":
                    writing[off // PAGE] -= 1
                    if not writing[off // PAGE]:
                        del writing[off // PAGE]
                continue
            del busy[cookie]
            count(f"{kind}:ok")
            if kind == "write":
                model[off:off + n] = data
                writing[off // PAGE] -= 1
                if not writing[off // PAGE]:
                    del writing[off // PAGE]
            elif kind == "read":
                check_read(off, data.to_bytearray(), ok)
    hung = len(busy)
    if not hung and not bad:
        h.flush()
        step = 4 << 20
        for off in range(0, size, step):
            got = h.pread(min(step, size - off), off)
            check_read(off, got, {q for q in range(off // PAGE, (off + len(got)) // PAGE)
                                  if q % of == who})
            if bad:
                bad[0][0] = "final"
                break
    if model_out:
        with open(model_out, "wb") as f:
            f.write(model)
    print(json.dumps({"counts": counts, "bad": bad[0] if bad else None, "hung": hung}))
    h.shutdown()


if __name__ == "__main__":
    main()
