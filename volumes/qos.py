"""Per-volume QoS (DESIGN §9): IOPS and bytes/s limits with bursts, enforced by token
buckets in the volumes layer, so that NBD, iSCSI and FUSE clients of one volume draw from
one budget; a group is one more set of buckets shared by several volumes.

Accounting, per bucket (like qemu's util/throttle.c "leaky bucket" and librbd's
TokenBucketThrottle, reduced to one level per bucket): ``level`` is the work admitted and
not yet leaked; it leaks at ``rate`` (the limit) per second. A request is admitted when
every bucket it draws from is at or under its ``capacity``; then its cost is added, so a
request larger than a bucket still passes (once) and the next ones wait for it to leak.
Without a burst the capacity is a tenth of a second of the limit (qemu's default bucket
size); with a burst B for S seconds over a limit L it is (B - L) * S, so that from an idle
volume B per second is reached for S seconds, then L; a second bucket leaking at B (a tenth
of a second deep) caps the rate during the burst.

Costs: a read or a write costs 1 IO (``iops_size`` set: max(1, bytes / iops_size) IOs,
like qemu's iops-size) and its bytes; trim and write-zeroes cost 1 write IO and no bytes
(they move no data); flush costs nothing.

Invariants:

1. A request is never failed for QoS: it waits until every bucket it draws from admits it
   (a cancelled wait leaves the buckets as they were).
2. Requests of one direction (read or write) through one ``Throttle`` are admitted in
   arrival order (FIFO); reads never wait behind writes or the reverse.
3. ``configure`` applies at once: the requests waiting recompute their wait under the new
   limits (a cleared limit lets them all through), and the levels carry over.
4. With no limit set, a volume has no ``Throttle`` at all: the cost on the request path is
   one test of an empty tuple.
5. ``QosSettings`` values are always valid: ``decode`` and ``updated`` raise InvalidArgument
   (and change nothing) for negative numbers, non-numbers, a burst below its limit or
   without one, and unknown keys.

Weights (``WeightedDispatcher``, one per pool): start-time fair queueing with a bounded
number of requests in service (SFQ(D), as in Jin, Chase and Kaur's paper and cgroup's
io.weight in spirit). Each request gets a start tag ``max(V, F)`` (V: the start tag of
the latest request put in service; F: the finish tag of the volume's previous request)
and a finish tag ``start + cost / weight``; while ``depth`` requests are in service the
others wait and the smallest start tag goes next. So volumes that all want more than
their share get service in proportion to their weights, and a volume that asks less than
its share always has the smallest tags and is served at once.

6. While fewer than ``depth`` requests are in service and none waits, a request goes at
   once (no contention, no reordering); only the waiting ones are ordered by tag.
7. A slot is released exactly once per acquired request, also when its wait or its work
   is cancelled; a cancelled waiter that was already handed a slot passes it on.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import trio

from pool.errors import InvalidArgument

SLICE = 0.1                 # seconds of the limit a bucket holds without a burst
DEFAULT_WEIGHT = 100
MAX_WEIGHT = 10_000
MAX_BURST_SECONDS = 3600.0
READ, WRITE = 0, 1
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")

LIMIT_KEYS = ("iops", "read_iops", "write_iops", "bps", "read_bps", "write_bps")
_INT_KEYS = (*LIMIT_KEYS, "burst_iops", "burst_bps", "iops_size")


@dataclass(frozen=True, slots=True)
class QosSettings:
    """A volume's (or a group's) QoS: limits per second (0 = none), bursts, the IO size
    large requests are counted in, the weight under contention, the group it belongs to."""

    iops: int = 0
    read_iops: int = 0
    write_iops: int = 0
    bps: int = 0
    read_bps: int = 0
    write_bps: int = 0
    burst_iops: int = 0
    burst_bps: int = 0
    burst_seconds: float = 1.0
    iops_size: int = 0
    weight: int = DEFAULT_WEIGHT
    group: str | None = None

    @property
    def limited(self) -> bool:
        """Whether any limit is set (a Throttle is needed)."""
        return any(getattr(self, k) for k in LIMIT_KEYS)

    def encode(self) -> dict[str, Any]:
        """The settings that differ from the defaults, as plain JSON values."""
        default = QosSettings()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> QosSettings:
        """Settings from their encoded form (invariant 5)."""
        return QosSettings().updated(d)

    def updated(self, changes: Mapping[str, Any]) -> QosSettings:
        """These settings with ``changes`` applied (a value of None or 0 clears a limit;
        None restores a default), checked as a whole (invariant 5)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidArgument(f"unknown QoS setting {unknown[0]!r}")
        new: dict[str, Any] = {}
        default = QosSettings()
        for key, v in changes.items():
            if v is None:
                new[key] = getattr(default, key)
            elif key in _INT_KEYS:
                new[key] = _count(key, v)
            elif key == "burst_seconds":
                if isinstance(v, bool) or not isinstance(v, int | float) \
                        or not 0 < v <= MAX_BURST_SECONDS or not math.isfinite(v):
                    raise InvalidArgument(f"QoS burst_seconds must be a number of seconds "
                                          f"above 0 and at most {MAX_BURST_SECONDS:g}, got "
                                          f"{v!r}")
                new[key] = float(v)
            elif key == "weight":
                if isinstance(v, bool) or not isinstance(v, int) \
                        or not 1 <= v <= MAX_WEIGHT:
                    raise InvalidArgument(f"QoS weight must be an integer from 1 to "
                                          f"{MAX_WEIGHT}, got {v!r}")
                new[key] = v
            else:   # group
                if not isinstance(v, str) or not _GROUP.fullmatch(v):
                    raise InvalidArgument(f"invalid QoS group name {v!r}: use 1-64 letters, "
                                          f"digits, '_', '.', ':', '-'")
                new[key] = v
        out = replace(self, **new)
        out.check()
        return out

    def check(self) -> None:
        """Raise InvalidArgument if a burst is below its limits or has none."""
        for burst, kind, limits in (("burst_iops", "IOPS", ("iops", "read_iops", "write_iops")),
                                    ("burst_bps", "bytes/s", ("bps", "read_bps", "write_bps"))):
            b = getattr(self, burst)
            if not b:
                continue
            set_ = [(k, getattr(self, k)) for k in limits if getattr(self, k)]
            if not set_:
                raise InvalidArgument(f"QoS {burst} needs a {kind} limit to burst over")
            for k, v in set_:
                if b < v:
                    raise InvalidArgument(f"QoS {burst} ({b}) is below {k} ({v})")


def _count(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidArgument(f"QoS {key} must be a whole number, 0 or more, got {v!r}")
    return v


class _Bucket:
    __slots__ = ("at", "capacity", "level", "rate")

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = 0.0
        self.at = 0.0

    def leak(self, now: float) -> None:
        if now > self.at:
            self.level = max(0.0, self.level - (now - self.at) * self.rate)
            self.at = now

    def wait(self) -> float:
        """Seconds until this bucket admits (after ``leak``)."""
        over = self.level - self.capacity
        # (A tolerance: a wait below the clock's resolution would never end.)
        return max(over / self.rate, 1e-6) if over > 1e-6 else 0.0


def _buckets(limit: int, burst: int, seconds: float) -> list[_Bucket]:
    if not limit:
        return []
    if not burst:
        return [_Bucket(limit, max(1.0, limit * SLICE))]
    return [_Bucket(limit, max(1.0, limit * SLICE, (burst - limit) * seconds)),
            _Bucket(burst, max(1.0, burst * SLICE))]


@dataclass(frozen=True, slots=True)
class ThrottleStatistics:
    throttled_seconds: float      # summed over requests: time spent waiting for admission
    throttled: int                # requests that had to wait
    waiting: int                  # requests waiting now


class Throttle:
    """The buckets of one QosSettings and the requests waiting on them (invariants 1-3)."""

    def __init__(self, settings: QosSettings) -> None:
        self._waiting: tuple[deque[trio.Event], deque[trio.Event]] = (deque(), deque())
        self._old: dict[str, list[_Bucket]] = {}
        self.throttled_seconds = 0.0
        self.throttled = 0
        self.configure(settings)

    def configure(self, settings: QosSettings) -> None:
        s = settings
        self.settings = s
        old = self._old
        new = {k: _buckets(getattr(s, k), s.burst_bps if "bps" in k else s.burst_iops,
                           s.burst_seconds) for k in LIMIT_KEYS}
        for k, bs in new.items():     # carry the levels over (invariant 3)
            for b, was in zip(bs, old.get(k, ()), strict=False):
                b.level, b.at = min(was.level, b.capacity + b.rate), was.at
        self._old = new
        self._iops = (new["iops"] + new["read_iops"], new["iops"] + new["write_iops"])
        self._bps = (new["bps"] + new["read_bps"], new["bps"] + new["write_bps"])
        self._size = s.iops_size
        for q in self._waiting:
            if q:
                q[0].set()

    def _wait(self, op: int, now: float) -> float:
        w = 0.0
        for b in self._iops[op]:
            b.leak(now)
            w = max(w, b.wait())
        for b in self._bps[op]:
            b.leak(now)
            w = max(w, b.wait())
        return w

    def _charge(self, op: int, nbytes: int) -> None:
        ios = max(1.0, nbytes / self._size) if self._size else 1.0
        for b in self._iops[op]:
            b.level += ios
        for b in self._bps[op]:
            b.level += nbytes

    def try_admit(self, op: int, nbytes: int) -> bool:
        """Admit at once (and charge) if no one waits and every bucket admits."""
        if self._waiting[op] or self._wait(op, trio.current_time()) > 0:
            return False
        self._charge(op, nbytes)
        return True

    async def admit(self, op: int, nbytes: int) -> None:
        """Wait until the request is admitted (invariants 1, 2), then charge it."""
        if self.try_admit(op, nbytes):
            return
        queue = self._waiting[op]
        me = trio.Event()
        queue.append(me)
        started = trio.current_time()
        try:
            while True:
                if queue[0] is me:
                    delay = self._wait(op, trio.current_time())
                    if delay <= 0:
                        break
                    with trio.move_on_after(delay):
                        await me.wait()
                else:
                    await me.wait()
                me = _renew(queue, me)
        finally:
            head = queue[0] is me
            queue.remove(me)
            if head and queue:
                queue[0].set()
        self._charge(op, nbytes)
        self.throttled += 1
        self.throttled_seconds += trio.current_time() - started

    def statistics(self) -> ThrottleStatistics:
        return ThrottleStatistics(self.throttled_seconds, self.throttled,
                                  len(self._waiting[READ]) + len(self._waiting[WRITE]))


DEFAULT_DEPTH = 32            # requests a pool serves at once before weights order the rest


class Tagged(Protocol):
    """What the dispatcher keeps per volume: its weight and its last finish tag."""

    weight: int
    finish_tag: float


class WeightedDispatcher:
    """SFQ(depth) over a pool's volumes (invariants 6, 7)."""

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        self.depth = depth
        self.in_service = 0
        self._vtime = 0.0
        self._seq = 0
        # Waiting requests as (start tag, arrival, event), a heap; non-empty only under
        # contention (the nowait paths step aside then: Volume.read_sparse_nowait).
        self.queue: list[tuple[float, int, trio.Event]] = []

    @property
    def contended(self) -> bool:
        return bool(self.queue)

    def try_acquire(self) -> bool:
        """Take a slot at once if one is free and nobody waits (invariant 6). Service
        without contention leaves the tags alone: tags only order waiting requests, and
        a volume's next tag is at least V anyway. (Volume inlines this test.)"""
        if self.in_service >= self.depth or self.queue:
            return False
        self.in_service += 1
        return True

    async def acquire(self, who: Tagged, cost: float) -> None:
        """Wait for a slot, in start-tag order (``try_acquire`` first, for speed)."""
        start = max(self._vtime, who.finish_tag)
        who.finish_tag = start + cost / who.weight
        if self.in_service < self.depth and not self.queue:
            self.in_service += 1
            self._vtime = start
            return
        self._seq += 1
        me = trio.Event()
        entry = (start, self._seq, me)
        heapq.heappush(self.queue, entry)
        try:
            await me.wait()
        except BaseException:
            if me.is_set():
                self.release()           # handed a slot meanwhile: pass it on
            else:
                self.queue.remove(entry)
                heapq.heapify(self.queue)
            raise

    def release(self) -> None:
        if self.queue:
            start, _seq, event = heapq.heappop(self.queue)
            self._vtime = max(self._vtime, start)
            event.set()                  # the slot goes to it (in_service unchanged)
        else:
            self.in_service -= 1


def _renew(queue: deque[trio.Event], me: trio.Event) -> trio.Event:
    """Replace a set event in the queue by a fresh one at the same place."""
    if not me.is_set():
        return me
    fresh = trio.Event()
    queue[queue.index(me)] = fresh
    return fresh


__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_WEIGHT",
    "LIMIT_KEYS",
    "READ",
    "WRITE",
    "QosSettings",
    "Tagged",
    "Throttle",
    "ThrottleStatistics",
    "WeightedDispatcher",
]
