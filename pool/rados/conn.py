"""One connection to a Ceph cluster and one RADOS pool, for the trio side of storaged.

Invariants:

1. No librados call runs on the event loop: every one goes through ``Connection.run``,
   which runs it in a worker thread (``trio.to_thread.run_sync``) under the connection's
   limiter, or through ``call_blocking`` from a thread the caller already runs in, or is
   an asynchronous read of the read-ahead (``prefetch``, pool/rados/prefetch.py), started
   from its own thread, or an asynchronous record read (``aio``, pool/rados/aioread.py),
   started on the event loop: ``aio_read`` only queues the op and returns (aioread
   invariant 3: the objecter's throttle, the one place it could wait, is set above all
   this client ever has in flight). A librados
   call cannot be interrupted, so a cancelled caller waits for it to finish (the op
   timeout, ``rados_osd_op_timeout``, bounds that).
2. Every call's latency lands in its kind's histogram (``statistics()``), failed calls
   too (asynchronous reads from their completion: ``observe``).
3. Fenced is final: once any call reports that this client is blocklisted (ESHUTDOWN,
   which Ceph also names EBLOCKLISTED), ``fenced`` holds why, the watchers are told once
   (on the event loop), and every later call is refused with ``Fenced`` without reaching
   librados. A fenced client is never un-fenced; the pool is reopened on a new connection.
4. librados errors leave this module as StorageError subclasses with an errno hint and a
   one-line message naming the object and the operation.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import trio

from pool.errors import Busy, NotFound, StorageError
from pool.rados.aioread import AioReads
from pool.rados.binding import load
from pool.rados.prefetch import Prefetcher

log = logging.getLogger(__name__)
T = TypeVar("T")

# Upper bounds (seconds) of the latency buckets, Prometheus style (the last is +Inf).
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
           float("inf"))
KINDS = ("read", "write", "lock", "command")
DEFAULT_THREADS = 16
# The objecter's throttle (librados' default: 100 MiB and 1024 ops in flight), raised far
# above all a connection has in flight: DEFAULT_THREADS synchronous calls (a segment run
# each at most), the read-ahead's budget (prefetch.LIMIT) and the asynchronous reads
# (aioread.LIMIT, aioread.OPS), so an ``aio_read`` started on the event loop never waits
# on it (conn invariant 1). It is only accounting: the bytes are the callers' buffers.
THROTTLE_BYTES = 8 << 30
THROTTLE_OPS = 16384


class RadosError(StorageError):
    """A librados call failed; ``errno`` is librados' own."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class Fenced(RadosError):
    """This client was blocklisted: another daemon took the pool over (invariant 10)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.ESHUTDOWN)


@dataclass(frozen=True, slots=True)
class OpLatency:
    """Latency of one kind of call: count, failed, total seconds, and per bucket of
    BUCKETS the number of calls that took at most that long (cumulative)."""

    count: int
    failed: int
    seconds: float
    buckets: tuple[int, ...]

    def quantile(self, q: float) -> float:
        """The bucket bound under which ``q`` of the calls finished (0 for no calls)."""
        if self.count == 0:
            return 0.0
        want = q * self.count
        for bound, n in zip(BUCKETS, self.buckets, strict=True):
            if n >= want:
                return bound
        return BUCKETS[-1]


@dataclass(frozen=True, slots=True)
class ClusterUsage:
    """Raw capacity of the cluster and what the RADOS pool stores. librados has these
    from the mgr: a cluster without one reports zeros, so ``known`` is False then."""

    total_bytes: int
    used_bytes: int
    avail_bytes: int
    pool_bytes: int
    pool_objects: int

    @property
    def known(self) -> bool:
        return self.total_bytes > 0


@dataclass(frozen=True, slots=True)
class RadosStatistics:
    pool: str
    fsid: str
    latency: dict[str, OpLatency]
    fenced: str | None


class _Histogram:
    def __init__(self) -> None:
        self.lock = threading.Lock()        # added to from worker threads
        self.count = self.failed = 0
        self.seconds = 0.0
        self.counts = [0] * len(BUCKETS)

    def add(self, seconds: float, ok: bool) -> None:
        i = next(i for i, bound in enumerate(BUCKETS) if seconds <= bound)
        with self.lock:
            self.count += 1
            self.failed += not ok
            self.seconds += seconds
            self.counts[i] += 1

    def freeze(self) -> OpLatency:
        with self.lock:
            counts, count, failed, seconds = list(self.counts), self.count, self.failed, \
                self.seconds
        cum, out = 0, []
        for n in counts:
            cum += n
            out.append(cum)
        return OpLatency(count, failed, seconds, tuple(out))


def _errno(e: BaseException) -> int:
    n = getattr(e, "errno", None)
    return abs(n) if isinstance(n, int) else errno.EIO


class Connection:
    """A connected librados client (``rados.Rados``) with an ioctx on one RADOS pool.

    Open with ``await Connection.open(...)``; ``await close()`` when done."""

    def __init__(self, cluster: Any, ioctx: Any, pool: str, threads: int) -> None:
        self.cluster = cluster
        self.ioctx = ioctx
        self.pool = pool
        self.fsid: str = cluster.get_fsid()
        self.addrs: str = cluster.get_addrs()              # e.g. 127.0.0.1:0/3197335454
        self.client_id: int = cluster.get_instance_id()    # this client is client.<id>
        self.fenced: str | None = None
        self._watchers: list[Callable[[str], None]] = []
        self._limiter = trio.CapacityLimiter(threads)
        self._hist = {k: _Histogram() for k in KINDS}
        self.rados = load()
        self.prefetch = Prefetcher(self)
        self.aio = AioReads(self)

    @staticmethod
    async def open(rados_pool: str, conf: str | None = None, client: str = "admin",
                   connect_timeout: float = 20.0, op_timeout: float = 30.0,
                   threads: int = DEFAULT_THREADS) -> Connection:
        """Connect as ``client.<client>`` with ceph.conf ``conf`` (librados' default search
        if None) and open ``rados_pool``; a one-line RadosError if that fails."""
        rados = load()

        def connect() -> tuple[Any, Any]:
            # conffile None: librados' own search ($CEPH_CONF, /etc/ceph/ceph.conf, ...)
            cluster = rados.Rados(rados_id=client, conffile=conf)
            try:
                cluster.conf_set("rados_osd_op_timeout", str(max(1, round(op_timeout))))
                cluster.conf_set("rados_mon_op_timeout", str(max(1, round(op_timeout))))
                cluster.conf_set("objecter_inflight_op_bytes", str(THROTTLE_BYTES))
                cluster.conf_set("objecter_inflight_ops", str(THROTTLE_OPS))
                cluster.connect(timeout=int(connect_timeout))
                return cluster, cluster.open_ioctx(rados_pool)
            except BaseException:
                cluster.shutdown()
                raise

        try:
            cluster, ioctx = await trio.to_thread.run_sync(connect)
        except rados.ObjectNotFound as e:
            raise NotFound(f"RADOS pool {rados_pool!r} does not exist in the cluster of "
                           f"{conf or 'the default ceph.conf'}") from e
        except rados.Error as e:
            raise RadosError(f"cannot connect to Ceph as client.{client} with "
                             f"{conf or 'the default ceph.conf'}: {e}", _errno(e)) from e
        return Connection(cluster, ioctx, rados_pool, threads)

    def watch_fenced(self, callback: Callable[[str], None], *, first: bool = False) -> None:
        """``callback(reason)`` is called once, from the event loop, when fenced;
        ``first``: before the watchers registered so far (the pool's own, so its reason
        is the one that stands)."""
        if first:
            self._watchers.insert(0, callback)
        else:
            self._watchers.append(callback)

    def _fence_from_thread(self, reason: str) -> None:
        try:
            trio.from_thread.run_sync(self.fence, reason)
        except RuntimeError:            # not a trio worker thread: no loop to go back to
            self.fence(reason)

    def fence(self, reason: str) -> None:
        """Enter the fenced state (invariant 3); the owner lock also calls this when it
        finds its lock lost."""
        if self.fenced is None:
            self.fenced = reason
            log.error("RADOS pool %s: %s", self.pool, reason)
            for cb in self._watchers:
                cb(reason)

    async def run(self, kind: str, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread (invariant 1); ``what`` names the operation
        and object for errors. ``kind`` is one of KINDS (invariant 2)."""
        if self.fenced is not None:
            raise Fenced(f"{what}: refused, {self.fenced}")
        return await trio.to_thread.run_sync(
            partial(self.call_blocking, kind, what, fn, *args), limiter=self._limiter)

    def call_blocking(self, kind: str, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``run`` for code that is already in a worker thread (a column reader the pool
        calls from its threads); never on the event loop."""
        if self.fenced is not None:
            raise Fenced(f"{what}: refused, {self.fenced}")
        t0 = time.perf_counter()
        ok = False
        try:
            out = fn(*args)
            ok = True
            return out
        except self.rados.Error as e:
            raise self._translate(e, what) from e
        finally:
            self._hist[kind].add(time.perf_counter() - t0, ok)

    def observe(self, kind: str, seconds: float, ok: bool) -> None:
        """Count a call timed elsewhere (an asynchronous read's completion)."""
        self._hist[kind].add(seconds, ok)

    def _translate(self, e: BaseException, what: str) -> StorageError:
        n = _errno(e)
        if n == errno.ESHUTDOWN:
            self._fence_from_thread(f"this client (client.{self.client_id} at {self.addrs}) was "
                        f"blocklisted by another daemon's takeover; nothing more is written")
            return Fenced(f"{what}: {self.fenced}")
        if n == errno.ENOENT:
            return NotFound(f"{what}: no such object in RADOS pool {self.pool}")
        if n == errno.EBUSY:
            return Busy(f"{what}: busy ({e})")
        return RadosError(f"{what} failed in RADOS pool {self.pool}: {e}", n)

    async def mon_command(self, cmd: dict[str, Any]) -> str:
        """A mon command (JSON); its output text; RadosError if it fails."""
        def call() -> tuple[int, bytes, str]:
            rc, out, err = self.cluster.mon_command(json.dumps(cmd), b"")
            return int(rc), bytes(out), str(err)
        rc, out, err = await self.run("command", f"mon command {cmd['prefix']!r}", call)
        if rc != 0:
            raise RadosError(f"mon command {cmd['prefix']!r} failed: {err or rc}", abs(rc))
        return out.decode() or err

    async def usage(self) -> ClusterUsage:
        """The cluster's raw space and the pool's usage (rados_cluster_stat and the pool
        stats; both answer at once, with zeros when no mgr runs)."""
        def get() -> ClusterUsage:
            c = self.cluster.get_cluster_stats()
            p = self.ioctx.get_stats()
            return ClusterUsage(int(c["kb"]) << 10, int(c["kb_used"]) << 10,
                                int(c["kb_avail"]) << 10, int(p["num_bytes"]),
                                int(p["num_objects"]))
        return await self.run("command", "cluster usage", get)

    async def health(self) -> str:
        """The cluster's health, e.g. ``HEALTH_OK`` (a mon command: no mgr needed)."""
        out = await self.mon_command({"prefix": "health", "format": "json"})
        try:
            return str(json.loads(out)["status"])
        except (ValueError, KeyError, TypeError):
            return "unknown"

    def statistics(self) -> RadosStatistics:
        return RadosStatistics(self.pool, self.fsid,
                               {k: h.freeze() for k, h in self._hist.items()}, self.fenced)

    async def close(self) -> None:
        def shut() -> None:
            try:
                self.prefetch.close()   # no completion outlives the ioctx (prefetch 5,
                self.aio.close()        # aioread 2)
                self.ioctx.close()
            finally:
                self.cluster.shutdown()
        await trio.to_thread.run_sync(shut)
