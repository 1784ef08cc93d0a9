"""The concurrency tier (issue 20): many real NBD clients against the real daemon, checked
against a model of what was acknowledged, while snapshots, send/receive, scrub, the cleaner
and restarts run.

The daemon is ``storaged`` as a subprocess (tests/kit/daemonkit). The clients are libnbd's
asynchronous API (aio_pwrite/pread/trim/zero/flush, FUA) on several connections to several
volumes, all held by one system-python process (tests/kit/nbdworker.py, run outside the repo,
where ``import nbd`` is libnbd). Each connection keeps up to ``DEPTH`` commands in flight.
The controller runs one control operation at a time through storagectl: snapshot create,
delete, diff (two snapshots, and against the live volume), rollback, clone, volume
send/receive (full and incremental), pool scrub (half of them left running beside what
follows), ``pool clean`` (the cleaner, forced), and SIGTERM and kill -9 restarts after
which every connection reconnects; beside it, ``pool clean`` runs every second or so.

Oracle (the model, per volume, per byte; DESIGN invariants 1, 3 and 7):
- Commands in flight never overlap (a region is locked from submission to reply), so the
  bytes of each location have one order of values. Regions overlap over time: a hot zone is
  shared by every connection of a volume, each connection also has a stripe of its own, and
  the rest is anywhere; offsets and lengths are aligned or not.
- A read returns exactly the last acknowledged value of every byte.
- The volume advertises multi-conn, so a completed flush on any connection makes durable every
  write acknowledged (to the model) before the flush was sent; an acknowledged FUA write is
  durable by itself.
- After kill -9 a byte holds its durable value, or the value of any write acknowledged since,
  or of a write whose reply was lost; never a value older than a flushed or FUA write that
  covers it. After SIGTERM, every acknowledged write is there (only lost replies are open).
- A snapshot reads, per byte, the value acknowledged last before it was requested, or the
  value of a write in flight then or sent before it completed -- nothing older, nothing
  newer. Its content is then fixed: re-read after every restart, rolled back to, cloned,
  sent and received, it is byte-exact.
- Snapshot diffs cover every block in which the two snapshots differ.
- A finished scrub found nothing; at the end the volumes read back exactly and
  ``pool check --deep`` is clean.

Parameters: STORAGED_SOAK_SEED (default 1), STORAGED_SOAK_SECONDS (default 45; ``make soak``
runs 3600), STORAGED_SOAK_DEVICE_SIZE (default 512M, each of three sparse members).
The figures of a run (clients, operations, snapshots, restarts) are printed.

Not covered: commands in flight on overlapping ranges (the model would need a set of
values per byte); a control operation interrupted by a restart.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.kit.crashsim import mask_and, mask_or, mismatch
from tests.kit.daemonkit import BIN, Daemon, _qemu_io, start_daemon, stop_daemon

SEED = int(os.environ.get("STORAGED_SOAK_SEED", "1"))
SECONDS = float(os.environ.get("STORAGED_SOAK_SECONDS", "45"))
POOL = "tank"
# (name, size, block size, compression, connections): about 2% of the pool is live
# volume data, so snapshots and unreclaimed overwrites never make this a space test.
VOLUMES = [("v0", 8 << 20, "4K", "lz4", 3), ("v1", 6 << 20, "64K", "off", 2),
           ("v2", 4 << 20, "16K", "lz4", 1)]
# Three members: ~1 GiB usable, as overwrites leave garbage at tens of MB/s that the
# cleaner reclaims only so fast (STORAGED_SOAK_DEVICE_SIZE=160M shows issue 20 item 2).
DEVICE_SIZE = os.environ.get("STORAGED_SOAK_DEVICE_SIZE", "512M")
DEPTH = 8                      # commands in flight per connection
HOT = 192 << 10                # the zone every connection of a volume writes
MAX_SNAPS = 3                  # per volume; the oldest is deleted beyond this
MIN_SNAPSHOTS = 3              # the run takes at least this many, however slow the machine
LENGTHS = [1, 7, 511, 512, 4096, 4097, 12288, 65536, 65537, 131072]
REPLY_TIMEOUT = 60.0

def payload(seed: int, n: int) -> bytes:
    """The bytes of write ``seed`` (tests/kit/nbdworker.py makes the same)."""
    return random.Random(seed).randbytes(n)


@dataclass(eq=False)
class Op:
    """A command that changes data (write, trim, write-zeroes)."""
    kind: str
    off: int
    data: bytes
    fua: bool
    conn: int
    ack_seq: int = 0           # order of acknowledgement (0: not acknowledged)

    @property
    def end(self) -> int:
        return self.off + len(self.data)


@dataclass
class Model:
    name: str
    size: int
    block: int
    content: bytearray                  # every acknowledged change applied
    durable: bytearray                  # as of the last flush watermark
    pending: list[Op] = field(default_factory=list)   # acknowledged, not yet flushed
    unknown: list[Op] = field(default_factory=list)   # reply lost (restart)
    busy: list[tuple[int, int]] = field(default_factory=list)  # in-flight ranges
    inflight: set[Op] = field(default_factory=set)
    watchers: list[list[Op]] = field(default_factory=list)     # snapshot windows
    snaps: dict[str, bytes] = field(default_factory=dict)      # name -> exact content
    acks: int = 0
    history: list[Op] = field(default_factory=list)   # recent acknowledged ops (diagnosis)
    events: list[str] = field(default_factory=list)   # control operations (diagnosis)

    def whose(self, pos: int, value: int) -> str:
        """Which recent acknowledged ops covered byte ``pos``, marking those whose value
        there is ``value`` (for failure messages)."""
        out = []
        for op in reversed(self.history):
            if op.off <= pos < op.end:
                mark = "*" if op.data[pos - op.off] == value else ""
                out.append(f"{mark}{op.kind}#{op.ack_seq}{'+fua' if op.fua else ''}"
                           f"@conn{op.conn}")
                if len(out) == 6:
                    break
        return (f"ops covering it, newest first (* = holds the value read): "
                f"{', '.join(out) or 'none'}; acks so far {self.acks}; recent control: "
                f"{'; '.join(self.events[-4:])}")

    def overlaps(self, off: int, end: int) -> bool:
        return any(o < end and off < e for o, e in self.busy)

    def flushed(self, upto: int) -> None:
        """Writes acknowledged as ``upto`` or earlier are durable (in acknowledgement
        order, which is each byte's order of values)."""
        keep = []
        for op in self.pending:
            if op.ack_seq <= upto:
                self.durable[op.off:op.end] = op.data
            else:
                keep.append(op)
        self.pending = keep

    def adopt(self, data: bytes) -> None:
        """After a restart or rollback: what the volume reads now is its durable state."""
        self.content = bytearray(data)
        self.durable = bytearray(data)
        self.pending, self.unknown = [], []


def bad_bytes(got: bytes, base: bytes, candidates: Sequence[Op],
              fua_after: Sequence[tuple[Op, Sequence[Op]]] = ()) -> bytearray:
    """Mask of bytes of ``got`` that are neither ``base`` nor the value of a candidate op
    covering them; and, for each (FUA op, later ops), bytes of the FUA op's range that hold
    neither its value nor a later op's."""
    bad = bytearray(mismatch(got, base))
    for c in candidates:
        if bad.find(1, c.off, c.end) < 0:
            continue
        bad[c.off:c.end] = mask_and(bytes(bad[c.off:c.end]), mismatch(got[c.off:c.end], c.data))
    for f, later in fua_after:
        fb = mismatch(got[f.off:f.end], f.data)
        for c in later:
            lo, hi = max(c.off, f.off), min(c.end, f.end)
            if lo < hi:
                fb = (fb[:lo - f.off]
                      + mask_and(fb[lo - f.off:hi - f.off],
                             mismatch(got[lo:hi], c.data[lo - c.off:hi - c.off]))
                      + fb[hi - f.off:])
        bad[f.off:f.end] = mask_or(bytes(bad[f.off:f.end]), fb)
    return bad


class Failure(AssertionError):
    pass


class Tier:
    def __init__(self, d: Daemon, tmp: Path, seed: int) -> None:
        self.d = d
        self.tmp = tmp
        self.seed = seed
        self.rng = random.Random(seed)
        self.vols: dict[str, Model] = {}
        self.conns: list[tuple[str, int, int]] = []      # (volume, stripe start, stripe end)
        self.proc: trio.Process | None = None
        self.next_id = 1
        self.replies: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.restarting = False
        self.generation = 0                              # restarts so far
        self.gate = trio.Event()
        self.gate.set()
        self.stop = False
        self.dumps = 0
        self.send_lock = trio.Lock()

    # ---- the worker process ---------------------------------------------------------------
    async def read_replies(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        async for chunk in self.proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                ev, slot = self.replies.pop(int(msg["id"]))
                slot.append(msg)
                ev.set()

    async def call(self, req: dict[str, Any], seconds: float = REPLY_TIMEOUT
                   ) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        rid = self.next_id
        self.next_id += 1
        ev, slot = trio.Event(), list[dict[str, Any]]()
        self.replies[rid] = (ev, slot)
        async with self.send_lock:
            await self.proc.stdin.send_all(json.dumps({**req, "id": rid}).encode() + b"\n")
        with trio.move_on_after(seconds):
            await ev.wait()
        if not slot:
            raise Failure(f"seed {self.seed}: no reply in {seconds:.0f} s to "
                          f"{ {k: v for k, v in req.items() if k != 'seed'} }")
        return slot[0]

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.d.nbd_port}/{export}"

    async def connect_all(self) -> None:
        for h, (vol, _a, _b) in enumerate(self.conns):
            r = await self.call({"c": "connect", "h": h, "uri": self.uri(f"{POOL}/{vol}")})
            assert r.get("ok"), f"connect {vol}: {r}"

    async def dump(self, export: str, size: int) -> bytes:
        self.dumps += 1
        path = self.tmp / f"dump{self.dumps}"
        r = await self.call({"c": "dump", "uri": self.uri(f"{POOL}/{export}"),
                             "size": size, "path": str(path)}, seconds=120)
        assert r.get("ok"), f"read {export}: {r}"
        data = await trio.Path(path).read_bytes()
        await trio.Path(path).unlink()
        assert len(data) == size
        return data

    # ---- storagectl -----------------------------------------------------------------------
    async def ctl(self, *args: str) -> str:
        cp = await trio.run_process([str(BIN / "storagectl"), "--socket", self.d.sock, *args],
                                    capture_stdout=True, capture_stderr=True, check=False)
        assert cp.returncode == 0, (f"storagectl {' '.join(args)}: "
                                    f"{cp.stderr.decode(errors='replace')}")
        return cp.stdout.decode()

    async def ctl_json(self, *args: str) -> Any:
        return json.loads(await self.ctl("--json", *args))

    # ---- clients --------------------------------------------------------------------------
    def fail(self, text: str) -> None:
        self.failures.append(f"seed {self.seed}: {text}")
        self.stop = True

    def pick(self, m: Model, stripe: tuple[int, int]) -> tuple[int, int]:
        r = self.rng.random()
        lo, hi = (0, HOT) if r < 0.4 else stripe if r < 0.7 else (0, m.size)
        n = self.rng.choice(LENGTHS)
        if self.rng.random() < 0.5:
            n = max(4096, n // 4096 * 4096)
            off = self.rng.randrange(lo, hi) // 4096 * 4096
        else:
            off = self.rng.randrange(lo, hi)
        return off, max(1, min(n, m.size - off))

    async def client(self, h: int) -> None:
        vol, s0, s1 = self.conns[h]
        m = self.vols[vol]
        limit = trio.Semaphore(DEPTH)
        async with trio.open_nursery() as nursery:
            while not self.stop:
                await self.gate.wait()
                await limit.acquire()
                if self.stop:
                    limit.release()
                    break
                if not self.gate.is_set():
                    limit.release()
                    continue
                r = self.rng.random()
                kind = ("write" if r < 0.5 else "read" if r < 0.75 else "trim" if r < 0.82
                        else "zero" if r < 0.89 else "flush")
                if kind == "flush":
                    nursery.start_soon(self.flush, h, m, limit)
                    continue
                for _ in range(8):
                    off, n = self.pick(m, (s0, s1))
                    if not m.overlaps(off, off + n):
                        break
                else:
                    limit.release()        # every pick overlaps a command in flight
                    await trio.sleep(0.005)
                    continue
                m.busy.append((off, off + n))
                nursery.start_soon(self.command, h, m, kind, off, n, limit)

    async def flush(self, h: int, m: Model, limit: trio.Semaphore) -> None:
        try:
            upto = m.acks
            r = await self.call({"h": h, "op": "flush"})
            self.counts["flush"] += 1
            if r.get("ok"):
                m.flushed(upto)
            elif not self.restarting:
                self.fail(f"flush on {m.name} failed: {r['err']}")
        finally:
            limit.release()

    async def command(self, h: int, m: Model, kind: str, off: int, n: int,
                      limit: trio.Semaphore) -> None:
        try:
            await self._command(h, m, kind, off, n)
        finally:
            limit.release()

    async def _command(self, h: int, m: Model, kind: str, off: int, n: int) -> None:
        req: dict[str, Any] = {"h": h, "op": kind, "off": off, "len": n}
        op: Op | None = None
        if kind != "read":
            fua = self.rng.random() < 0.15
            req["fua"] = fua
            if kind == "write":
                req["seed"] = seed = self.rng.getrandbits(63)
                data = payload(seed, n)
            else:
                data = bytes(n)
            op = Op(kind, off, data, fua, h)
            m.inflight.add(op)
            for w in m.watchers:
                w.append(op)
        r = await self.call(req)
        self.counts[kind + ("+fua" if op is not None and op.fua else "")] += 1
        if op is not None:
            m.inflight.discard(op)
        if "err" in r:
            if not self.restarting:
                self.fail(f"{kind} {m.name} [{off}, +{n}) failed: {r['err']}")
            if op is not None:
                m.unknown.append(op)      # the range stays busy until the reconcile
            else:
                m.busy.remove((off, off + n))
            return
        m.busy.remove((off, off + n))
        if op is None:
            got = base64.b64decode(r["data"])
            want = bytes(m.content[off:off + n])
            if got != want:
                i = next(i for i in range(n) if got[i] != want[i])
                self.fail(f"read {m.name} [{off}, +{n}) differs from the last acknowledged "
                          f"data at byte {off + i}: {got[i]:#x}, not {want[i]:#x}; "
                          f"{m.whose(off + i, got[i])}")
            return
        if kind == "write" and r["crc"] != zlib.crc32(op.data):
            self.fail("the worker's payload differs from the model's")
        m.acks += 1
        op.ack_seq = m.acks
        m.content[off:off + n] = op.data
        m.history = [*m.history[-2000:], op]
        # Not durable until a flush; a FUA op is, and stays in pending for the crash
        # oracle's constraint that no byte it covers goes back to an older value.
        m.pending.append(op)

    async def quiesce(self) -> None:
        """Stop issuing commands and wait for every reply."""
        self.gate = trio.Event()
        await self.settled(lambda: any(m.busy for m in self.vols.values()))

    @staticmethod
    async def settled(busy: Callable[[], bool]) -> None:
        """Wait (polling: replies arrive from many tasks) until ``busy()`` is false."""
        with trio.fail_after(REPLY_TIMEOUT):
            while busy():  # noqa: ASYNC110
                await trio.sleep(0.02)

    def resume(self) -> None:
        self.gate.set()

    # ---- checks ---------------------------------------------------------------------------
    def report(self, what: str, got: bytes, bad: bytearray, m: Model) -> None:
        first = bad.find(1)
        if first >= 0:
            self.fail(f"{what}: {bad.count(1)} byte(s) hold no allowed value, the first at "
                      f"{m.name} byte {first} (holds {got[first]:#x}; last acknowledged "
                      f"{m.content[first]:#x}, durable {m.durable[first]:#x}); "
                      f"{m.whose(first, got[first])}")

    async def reconcile(self, how: str) -> None:
        """After a restart: every volume holds what the oracle allows for ``how``; it is
        then the new durable state. Every snapshot is byte-exact."""
        for m in self.vols.values():
            got = await self.dump(m.name, m.size)
            if how == "kill":
                cands = m.pending + m.unknown
                fua = [(op, cands[i + 1:]) for i, op in enumerate(m.pending) if op.fua]
                bad = bad_bytes(got, bytes(m.durable), cands, fua)
            else:
                bad = bad_bytes(got, bytes(m.content), m.unknown)
            self.report(f"after {how} and restart", got, bad, m)
            m.adopt(got)
            self.event(m, f"restart ({how})")
            m.busy.clear()
            for s, content in m.snaps.items():
                if await self.dump(f"{m.name}@{s}", m.size) != content:
                    self.fail(f"snapshot {m.name}@{s} changed across a {how} restart")

    # ---- control operations ---------------------------------------------------------------
    def event(self, m: Model, text: str) -> None:
        m.events.append(f"{text} at ack {m.acks}")

    async def snapshot(self, m: Model) -> None:
        name = f"s{self.counts['snapshot']}"
        self.event(m, f"snapshot @{name} requested")
        base, window = bytes(m.content), list(m.inflight)
        m.watchers.append(window)
        try:
            await self.ctl("snapshot", "create", f"{POOL}/{m.name}@{name}")
        finally:
            m.watchers.remove(window)
        self.counts["snapshot"] += 1
        self.event(m, f"snapshot @{name} done")
        got = await self.dump(f"{m.name}@{name}", m.size)
        self.report(f"snapshot {m.name}@{name} (invariant 7)", got,
                    bad_bytes(got, base, window), m)
        m.snaps[name] = got
        if len(m.snaps) > MAX_SNAPS:
            old = next(iter(m.snaps))
            await self.ctl("snapshot", "delete", f"{POOL}/{m.name}@{old}")
            del m.snaps[old]
            self.counts["snapshot delete"] += 1

    async def diff(self, m: Model) -> None:
        names = list(m.snaps)
        self.event(m, "diff")
        if len(names) < 2 or self.rng.random() < 0.3:
            # Against the live volume: with commands in flight it only has to succeed (it
            # writes back the buffer first); quiesced, it must cover every changed block.
            quiet = self.rng.random() < 0.5
            if quiet:
                await self.quiesce()
            try:
                out = await self.ctl_json("snapshot", "diff", f"{POOL}/{m.name}@{names[0]}")
                if quiet:
                    self.check_diff(m, out, m.snaps[names[0]], bytes(m.content),
                                    f"{m.name}@{names[0]} and the live volume")
            finally:
                self.resume()
            self.counts["diff live"] += 1
            return
        a, b = self.rng.sample(names, 2)
        out = await self.ctl_json("snapshot", "diff", f"{POOL}/{m.name}@{a}",
                                  f"{POOL}/{m.name}@{b}")
        self.check_diff(m, out, m.snaps[a], m.snaps[b], f"{m.name}@{a} and @{b}")
        self.counts["diff"] += 1

    def check_diff(self, m: Model, out: Any, sa: bytes, sb: bytes, what: str) -> None:
        covered = bytearray(m.size)
        for r in out["ranges"]:
            covered[r["offset"]:r["offset"] + r["length"]] = b"\1" * r["length"]
        for off in range(0, m.size, m.block):
            if sa[off:off + m.block] != sb[off:off + m.block] and not covered[off]:
                self.fail(f"the diff of {what} misses the changed block at {off}")
                break

    async def rollback(self, m: Model) -> None:
        name = self.rng.choice(list(m.snaps))
        await self.quiesce()
        try:
            # The volume's clients are connected (idle): a rollback under them is refused
            # unless forced, which disconnects them (issue 21); they connect again after.
            await self.ctl("snapshot", "rollback", f"{POOL}/{m.name}@{name}", "--force")
            for h, (vol, _a, _b) in enumerate(self.conns):
                if vol == m.name:
                    r = await self.call({"c": "connect", "h": h,
                                         "uri": self.uri(f"{POOL}/{vol}")})
                    assert r.get("ok"), f"connect {vol}: {r}"
            got = await self.dump(m.name, m.size)
            if got != m.snaps[name]:
                self.fail(f"rollback of {m.name} to @{name} does not read as the snapshot")
            m.adopt(m.snaps[name])
            self.event(m, f"rollback to @{name}")
            self.counts["rollback"] += 1
        finally:
            self.resume()

    async def clone(self, m: Model) -> None:
        name = self.rng.choice(list(m.snaps))
        target = f"c{self.counts['clone']}"
        await self.ctl("snapshot", "clone", f"{POOL}/{m.name}@{name}", f"{POOL}/{target}")
        if await self.dump(target, m.size) != m.snaps[name]:
            self.fail(f"clone {target} of {m.name}@{name} differs from the snapshot")
        await self.ctl("volume", "delete", f"{POOL}/{target}")
        self.counts["clone"] += 1

    async def send_receive(self, m: Model) -> None:
        """A full stream of one snapshot into a new volume; half the time then an
        incremental stream of a newer snapshot onto it. Each reads as its snapshot."""
        names = list(m.snaps)
        stream = self.tmp / "stream"
        target = f"r{self.counts['send/receive']}"
        steps: list[tuple[str, list[str]]]
        if len(names) >= 2 and self.rng.random() < 0.5:
            a, b = sorted(self.rng.sample(range(len(names)), 2))
            steps = [(names[a], []), (names[b], ["--from", f"@{names[a]}"])]
        else:
            steps = [(self.rng.choice(names), [])]
        for name, incremental in steps:
            await self.ctl("volume", "send", f"{POOL}/{m.name}@{name}", *incremental,
                           "-o", str(stream))
            await self.ctl("volume", "receive", f"{POOL}/{target}", "-i", str(stream))
            if await self.dump(target, m.size) != m.snaps[name]:
                self.fail(f"{target} received from {m.name}@{name} "
                          f"{'(incremental) ' if incremental else ''}differs from the "
                          f"snapshot")
            await trio.Path(stream).unlink()
        await self.ctl("volume", "delete", f"{POOL}/{target}", "--recursive")
        self.counts["send/receive"] += 1
        self.counts["incremental"] += len(steps) - 1

    async def scrub(self, *, wait: bool | None = None) -> None:
        """Start a scrub (waiting for it half the time; otherwise it runs on beside what
        follows, restarts included), or wait for the one running. A finished scrub of
        this healthy pool found nothing."""
        cur = (await self.ctl_json("pool", "scrub", POOL, "--status"))["scrub"]
        if cur is not None and cur["state"] in ("running", "paused"):
            if cur["state"] == "paused":
                await self.ctl("pool", "scrub", POOL, "--resume")
            out = await self.ctl_json("pool", "scrub", POOL, "--status", "--wait")
        else:
            wait = self.rng.random() < 0.5 if wait is None else wait
            out = await self.ctl_json("pool", "scrub", POOL, *(["--wait"] if wait else []))
            self.counts["scrub"] += 1
        s = out["scrub"]
        if s["state"] != "running" and (s["found"] or s["unrecoverable"]):
            self.fail(f"scrub found {s['found']} bad fragment(s) in a healthy pool: "
                      f"{s['problems'][:3]}")

    async def housekeeper(self) -> None:
        """The cleaner, forced every second or so beside everything else (a request cut
        off by a restart is forgiven)."""
        while not self.stop:
            await trio.sleep(self.rng.uniform(0.3, 1.5))
            if self.restarting:
                continue
            gen = self.generation
            cp = await trio.run_process([str(BIN / "storagectl"), "--socket", self.d.sock,
                                         "pool", "clean", POOL, "--max-segments", "2"],
                                        capture_stdout=True, capture_stderr=True,
                                        check=False)
            if cp.returncode == 0:
                self.counts["clean (beside)"] += 1
            elif not self.restarting and gen == self.generation:
                self.fail(f"pool clean: {cp.stderr.decode(errors='replace')}")

    async def restart(self, how: str) -> None:
        self.gate = trio.Event()
        self.restarting = True
        self.generation += 1
        assert self.d.proc is not None
        if how == "kill":
            self.d.proc.kill()
            await trio.to_thread.run_sync(self.d.proc.wait)
            self.d.proc = None
        else:
            rc = await trio.to_thread.run_sync(self.d.stop, signal.SIGTERM)
            assert rc == 0, f"SIGTERM: exit {rc}: {self.d.log()}"
        await self.settled(lambda: any(m.inflight for m in self.vols.values()))
        await trio.to_thread.run_sync(self.d.start)
        await self.connect_all()
        await self.reconcile(how)
        self.restarting = False
        self.counts["restart " + how] += 1
        self.resume()

    async def controller(self, seconds: float) -> None:
        start = time.monotonic()
        forced = {0.35: "kill", 0.7: "term"}
        while time.monotonic() - start < seconds and not self.stop:
            await trio.sleep(self.rng.uniform(0.1, 0.6))
            frac = (time.monotonic() - start) / seconds
            due = [k for k in forced if k <= frac]
            if due:
                await self.restart(forced.pop(due[0]))
                continue
            m = self.vols[self.rng.choice(list(self.vols))]
            r = self.rng.random()
            if r < 0.3 or not m.snaps:
                await self.snapshot(m)
            elif r < 0.4:
                await self.diff(m)
            elif r < 0.48:
                await self.rollback(m)
            elif r < 0.56:
                await self.clone(m)
            elif r < 0.64:
                await self.send_receive(m)
            elif r < 0.7:
                await self.scrub()
            elif r < 0.85:
                await self.ctl("pool", "clean", POOL)
                self.counts["clean"] += 1
            elif r < 0.9:
                await self.restart(self.rng.choice(["kill", "term"]))
        # A slow machine (load 15+) may reach the end before a forced restart or with fewer
        # snapshots than the test needs: do the rest now, with the clients still writing.
        for how in list(forced.values()):
            if not self.stop:
                await self.restart(how)
        while self.counts["snapshot"] < MIN_SNAPSHOTS and not self.stop:
            await self.snapshot(self.vols[self.rng.choice(list(self.vols))])
        self.stop = True


@pytest.mark.slow
async def test_many_clients_snapshots_restarts(tmp_path: Path) -> None:
    """Invariants 1, 3, 7 (DESIGN) under concurrency: the oracle in the module docstring
    holds for every read, snapshot, restart and at the end; the deep check is clean."""
    d = start_daemon(tmp_path)
    tier = Tier(d, tmp_path, SEED)
    try:
        devs = [str(tmp_path / f"dev{i}") for i in range(3)]
        await tier.ctl("pool", "create", POOL, *devs, "--profile", "ec:2+1",
                       "--file-size", DEVICE_SIZE, "--extent-size", "1M")
        for name, size, bs, comp, n in VOLUMES:
            await tier.ctl("volume", "create", f"{POOL}/{name}", "--size", str(size),
                           "--block-size", bs, "--compression", comp)
            tier.vols[name] = Model(name, size, int(bs[:-1]) << 10, bytearray(size),
                                    bytearray(size))
            part = (size - HOT) // n
            for i in range(n):
                tier.conns.append((name, HOT + i * part, HOT + (i + 1) * part))
        work = tmp_path / "client"
        work.mkdir()
        shutil.copy(Path(__file__).parents[1] / "kit" / "nbdworker.py", work / "nbdworker.py")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        async with trio.open_nursery() as nursery:
            tier.proc = await nursery.start(partial(
                trio.run_process, ["/usr/bin/python3", "-P", str(work / "nbdworker.py")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=work, env=env,
                check=False))
            nursery.start_soon(tier.read_replies)
            await tier.connect_all()
            async with trio.open_nursery() as clients:
                for h in range(len(tier.conns)):
                    clients.start_soon(tier.client, h)
                clients.start_soon(tier.housekeeper)
                await tier.controller(SECONDS)
            assert not tier.failures, "\n".join(tier.failures[:5])
            await tier.scrub(wait=True)      # finishes one under way, or runs one whole
            assert not tier.failures, "\n".join(tier.failures[:5])
            # The end: everything flushed reads back exactly; snapshots are unchanged.
            for h in range(len(tier.conns)):
                r = await tier.call({"h": h, "op": "flush"})
                assert r.get("ok"), r
            for m in tier.vols.values():
                assert await tier.dump(m.name, m.size) == bytes(m.content), m.name
                for s, content in m.snaps.items():
                    assert await tier.dump(f"{m.name}@{s}", m.size) == content
            check = await tier.ctl_json("pool", "check", POOL, "--deep")
            assert check["ok"], check["problems"]
            assert tier.proc.stdin is not None
            await tier.proc.stdin.aclose()
            nursery.cancel_scope.cancel()
        ops = sum(v for k, v in tier.counts.items()
                  if k.split("+")[0] in ("write", "read", "trim", "zero", "flush"))
        print(f"\nconcurrency tier, seed {SEED}, {SECONDS:.0f} s: {len(tier.conns)} clients "
              f"on {len(VOLUMES)} volumes, {ops} NBD commands, "
              f"{tier.counts['snapshot']} snapshots, "
              f"{tier.counts['restart kill'] + tier.counts['restart term']} restarts "
              f"({tier.counts['restart kill']} kill -9); "
              + ", ".join(f"{k} {v}" for k, v in sorted(tier.counts.items())))
        assert tier.counts["restart kill"] >= 1 and tier.counts["restart term"] >= 1
        assert tier.counts["snapshot"] >= MIN_SNAPSHOTS
    finally:
        stop_daemon(d)



def test_oracle_masks() -> None:
    """The checker itself: a byte is explained by the base or by a candidate covering it;
    a FUA op's bytes may hold only its value or a later op's."""
    base = bytes(8)
    a = Op("write", 2, b"\1\1\1", False, 0)
    b = Op("write", 3, b"\2\2", True, 0)
    c = Op("write", 4, b"\3", False, 0)
    assert bad_bytes(b"\0\0\1\2\3\0\0\0", base, [a, b, c]).count(1) == 0
    assert bad_bytes(b"\0\0\1\2\3\0\0\0", base, [a, c]).find(1) == 3    # 2 not allowed
    assert bad_bytes(b"\0\0\0\0\0\7\0\0", base, [a, b, c]).find(1) == 5
    # b is FUA: its bytes may not go back to the base or to a (older); c (newer) is fine.
    fua = [(b, [c])]
    assert bad_bytes(b"\0\0\1\2\3\0\0\0", base, [a, b, c], fua).count(1) == 0
    assert bad_bytes(b"\0\0\1\1\3\0\0\0", base, [a, b, c], fua).find(1) == 3
    assert bad_bytes(b"\0\0\1\0\2\0\0\0", base, [a, b, c], fua).find(1) == 3


def test_pool_clean_command(daemon: Daemon, tmp_path: Path) -> None:
    """`storagectl pool clean` moves the live records out of overwritten segments and frees
    them; the data reads back exactly and the deep check is clean. Bad arguments get one
    line and change nothing."""
    devs = [str(tmp_path / f"c{i}") for i in range(3)]
    daemon.ok("pool", "create", "tank", *devs, "--profile", "ec:2+1", "--file-size", "64M",
              "--extent-size", "1M")
    daemon.ok("volume", "create", "tank/v", "--size", "8M", "--block-size", "64K",
              "--compression", "off")
    url = daemon.url("tank/v")
    _qemu_io(url, "write -P 0x11 0 6M", "flush")
    # 128K of every 320K is overwritten: the 0x11 segments stay 3/5 live, above the
    # daemon's background cleaner (it moves segments under 1/2 live, every 10 s), so only
    # the command (threshold 1.0: any dead part) empties them, however slow the machine.
    holes = [f"write -P 0x22 {off}k 128k" for off in range(0, 6 * 1024 - 128, 320)]
    _qemu_io(url, *holes, "flush")
    before = daemon.json("pool", "status", "tank")
    for bad in (["--threshold", "0"], ["--threshold", "1.5"], ["--max-segments", "0"]):
        r = daemon.ctl("pool", "clean", "tank", *bad)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert daemon.json("pool", "status", "tank") == before
    out = daemon.json("pool", "clean", "tank")
    assert isinstance(out, dict) and out["segments_emptied"] >= 1, out
    assert out["records_moved"] >= 1, out
    after = daemon.json("pool", "status", "tank")
    assert isinstance(before, dict) and isinstance(after, dict)
    assert after["used_bytes"] < before["used_bytes"], (before, after)
    back = [c for off in range(0, 6 * 1024 - 128, 320)
            for c in (f"read -P 0x22 {off}k 128k", f"read -P 0x11 {off + 128}k 192k")]
    _qemu_io(url, *back, "read -P 0x11 6080k 64k", "read -P 0 6M 2M", read_only=True)
    check = daemon.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check
