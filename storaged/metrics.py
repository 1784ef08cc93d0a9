"""Prometheus metrics: a collector that reads every layer's ``statistics()`` at scrape time,
served at ``GET /metrics`` by a small HTTP/1.1 responder on the trio loop (so the scrape
sees a consistent state and needs no locks).

Only this module imports prometheus_client (enforced by an import-linter contract).
Label sets are bounded: pool, volume, device index and path, command.

Besides the collector, the daemon's registry holds prometheus_client's ProcessCollector
(``process_*``: RSS, CPU seconds, open fds, start time; it reads /proc, which does not
block) and ``storaged_build_info``.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable, Iterator
from importlib import metadata

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from iscsi.server import ISCSIServer
from nbd.server import NBDServer
from pool import scrub
from pool.rados.conn import BUCKETS as RADOS_BUCKETS
from pool.rados.conn import RadosStatistics
from storaged.api import pool_status
from storaged.registry import Registry
from volumes.volume import LATENCY_BUCKETS

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return metadata.version("storaged")
    except metadata.PackageNotFoundError:    # run from a checkout that is not installed
        return "unknown"


class StoragedCollector(Collector):
    def __init__(self, registry: Registry, nbd: NBDServer | None,
                 iscsi: ISCSIServer | None = None) -> None:
        self.registry = registry
        self.nbd = nbd
        self.iscsi = iscsi

    def collect(self) -> Iterator[Metric]:
        build = InfoMetricFamily("storaged_build", "The running storaged's version and Python")
        build.add_metric([], {"version": _version(),
                              "python": platform.python_version()})
        yield build
        yield from self._pools()
        yield from self._volumes()
        yield from rados_metrics(
            (name, st) for name, entry in sorted(self.registry.pools.items())
            if (st := entry.pool.rados_statistics()) is not None)
        if self.nbd is not None:
            yield from self._nbd(self.nbd)
        if self.iscsi is not None:
            yield from iscsi_metrics(self.iscsi)

    def _pools(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("storaged_pool_size_bytes", "Capacity of the pool's extents",
                                 labels=["pool"])
        used = GaugeMetricFamily("storaged_pool_used_bytes", "Bytes of extents in use",
                                 labels=["pool"])
        free = GaugeMetricFamily("storaged_pool_free_bytes", "Bytes of free extents",
                                 labels=["pool"])
        live = GaugeMetricFamily("storaged_pool_live_bytes",
                                 "Device bytes held by live records", labels=["pool"])
        over = GaugeMetricFamily("storaged_pool_overcommit_ratio",
                                 "Sum of volume sizes over the usable size",
                                 labels=["pool"])
        full = GaugeMetricFamily("storaged_pool_full_warning",
                                 "1 when the pool's used fraction is at or above the "
                                 "warning threshold", labels=["pool"])
        up = GaugeMetricFamily("storaged_pool_up", "1 when the pool is imported and not failed",
                               labels=["pool", "state"])
        dev = GaugeMetricFamily("storaged_device_up", "1 when the member device is present",
                                labels=["pool", "device", "path"])
        dev_err = CounterMetricFamily("storaged_device_errors",
                                      "I/O and checksum errors seen on a member device",
                                      labels=["pool", "device", "path", "kind"])
        reads = CounterMetricFamily("storaged_pool_records_read",
                                    "Records read from devices", labels=["pool"])
        writes = CounterMetricFamily("storaged_pool_records_written",
                                     "Records written to devices", labels=["pool"])
        degraded = CounterMetricFamily("storaged_pool_degraded_reads",
                                       "Records read using parity or another mirror",
                                       labels=["pool"])
        repaired = CounterMetricFamily("storaged_pool_repaired_fragments",
                                       "Bad fragments rewritten from redundancy",
                                       labels=["pool"])
        unreadable = CounterMetricFamily("storaged_pool_unreadable_records",
                                         "Records that could not be read (EIO)",
                                         labels=["pool"])
        commits = CounterMetricFamily("storaged_pool_commits",
                                      "Metadata commits (journal entries)", labels=["pool"])
        discarded = CounterMetricFamily("storaged_pool_discarded_extents",
                                        "Freed extents handed to the devices' discard "
                                        "(hole punch, BLKDISCARD)", labels=["pool"])
        dstate = GaugeMetricFamily("storaged_device_state",
                                   "1 for the member's state (online, rebuilding, faulted, "
                                   "offline, missing, removed)",
                                   labels=["pool", "device", "path", "state"])
        work = GaugeMetricFamily("storaged_pool_maintenance_bytes",
                                 "Scrub / rebuild progress: bytes done and total",
                                 labels=["pool", "task", "kind"])
        scrub_end = GaugeMetricFamily("storaged_pool_scrub_last_end_timestamp_seconds",
                                      "Unix time the last scrub that ran to its end finished",
                                      labels=["pool"])
        scrub_result = GaugeMetricFamily("storaged_pool_scrub_last_result",
                                         "1 for the last completed scrub's result: clean, "
                                         "repaired or unrecoverable", labels=["pool", "result"])
        scrub_frags = GaugeMetricFamily("storaged_pool_scrub_last_fragments",
                                        "Bad fragments the last completed scrub found, "
                                        "repaired, and records it could not recover",
                                        labels=["pool", "kind"])
        for name, entry in sorted(self.registry.pools.items()):
            s = pool_status(entry)
            for d in s["devices"]:
                dstate.add_metric([name, str(d["index"]), d["path"] or "", d["state"]], 1)
            last = scrub.last_completed(entry.pool)
            if last is not None:
                scrub_end.add_metric([name], last["finished"])
                result = ("unrecoverable" if last["unrecoverable"] else
                          "repaired" if last["found"] else "clean")
                scrub_result.add_metric([name, result], 1)
                for kind in ("found", "repaired", "unrecoverable"):
                    scrub_frags.add_metric([name, kind], last[kind])
            for task, done_key, total_key in (("scrub", "done", "total"),
                                              ("rebuild", "done_bytes", "total_bytes")):
                if s[task]:
                    work.add_metric([name, task, "done"], s[task][done_key])
                    work.add_metric([name, task, "total"], s[task][total_key])
            size.add_metric([name], s["size_bytes"])
            used.add_metric([name], s["used_bytes"])
            free.add_metric([name], s["free_bytes"])
            live.add_metric([name], s["live_bytes"])
            over.add_metric([name], s["overcommit_ratio"])
            full.add_metric([name], 1 if s["full_warning"] else 0)
            up.add_metric([name, s["state"]], 0 if s["state"] == "failed" else 1)
            for d in s["devices"]:
                lv = [name, str(d["index"]), d["path"] or ""]
                dev.add_metric(lv, 1 if d["state"] == "online" else 0)
                for kind in ("read", "write", "checksum"):
                    dev_err.add_metric([*lv, kind], d[f"{kind}_errors"])
            c = s["counters"]
            reads.add_metric([name], c["records_read"])
            writes.add_metric([name], c["records_written"])
            degraded.add_metric([name], c["degraded_reads"])
            repaired.add_metric([name], c["repaired_fragments"])
            unreadable.add_metric([name], c["unreadable_records"])
            commits.add_metric([name], c["commits"])
            discarded.add_metric([name], c["discarded_extents"])
        for name in sorted(self.registry.failed):
            if name not in self.registry.pools:
                up.add_metric([name, "unavailable"], 0)
        return [size, used, free, live, over, full, up, dev, dev_err, reads, writes, degraded,
                repaired, unreadable, commits, discarded, dstate, work, scrub_end,
                scrub_result, scrub_frags]

    def _volumes(self) -> Iterable[Metric]:
        labels = ["pool", "volume"]
        rb = CounterMetricFamily("storaged_volume_read_bytes", "Bytes read", labels=labels)
        wb = CounterMetricFamily("storaged_volume_written_bytes", "Bytes written",
                                 labels=labels)
        ro = CounterMetricFamily("storaged_volume_reads", "Read requests", labels=labels)
        wo = CounterMetricFamily("storaged_volume_writes", "Write requests", labels=labels)
        fl = CounterMetricFamily("storaged_volume_flushes", "Flushes", labels=labels)
        size = GaugeMetricFamily("storaged_volume_size_bytes", "Virtual size", labels=labels)
        used = GaugeMetricFamily("storaged_volume_used_bytes",
                                 "Device bytes held by the volume's records", labels=labels)
        dirty = GaugeMetricFamily("storaged_volume_dirty_bytes",
                                  "Bytes in the write buffer, not yet written",
                                  labels=labels)
        lat = HistogramMetricFamily("storaged_volume_request_duration_seconds",
                                    "Time to complete volume requests (QoS waits included)",
                                    labels=[*labels, "op"])
        throttled = CounterMetricFamily("storaged_volume_throttled_seconds",
                                        "Time requests spent waiting for the volume's QoS "
                                        "limits, summed over requests", labels=labels)
        waiting = GaugeMetricFamily("storaged_volume_qos_queue_depth",
                                    "Requests waiting now for the volume's QoS limits",
                                    labels=labels)
        for pname, entry in sorted(self.registry.pools.items()):
            for st in entry.volumes.list():
                lv = [pname, st.name]
                th = entry.volumes.get(st.name).throttle_statistics()
                throttled.add_metric(lv, th.throttled_seconds)
                waiting.add_metric(lv, th.waiting)
                rb.add_metric(lv, st.bytes_read)
                wb.add_metric(lv, st.bytes_written)
                ro.add_metric(lv, st.reads)
                wo.add_metric(lv, st.writes)
                fl.add_metric(lv, st.flushes)
                size.add_metric(lv, st.size)
                used.add_metric(lv, st.stored_bytes)
                dirty.add_metric(lv, st.dirty_bytes)
                for op, h in st.latency:
                    cumulative, buckets = 0, []
                    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), h.counts,
                                        strict=True):
                        cumulative += n
                        buckets.append(("+Inf" if bound == float("inf") else str(bound),
                                        cumulative))
                    lat.add_metric([*lv, op], buckets, h.sum_seconds)
        return [rb, wb, ro, wo, fl, size, used, dirty, lat, throttled, waiting]

    def _nbd(self, nbd: NBDServer) -> Iterable[Metric]:
        s = nbd.stats
        active = GaugeMetricFamily("storaged_nbd_connections", "Open NBD connections")
        active.add_metric([], s.active)
        total = CounterMetricFamily("storaged_nbd_connections_accepted",
                                    "NBD connections accepted")
        total.add_metric([], s.connections)
        refused = CounterMetricFamily("storaged_nbd_connections_refused",
                                      "NBD connections refused by the allow list or "
                                      "nbd.max_connections")
        refused.add_metric([], s.refused)
        errors = CounterMetricFamily("storaged_nbd_protocol_errors",
                                     "NBD connections dropped for protocol errors")
        errors.add_metric([], s.protocol_errors)
        cmds = CounterMetricFamily("storaged_nbd_requests", "NBD requests by command",
                                   labels=["command"])
        for name, n in sorted(s.commands.items()):
            cmds.add_metric([name.lower()], n)
        failed = CounterMetricFamily("storaged_nbd_request_errors",
                                     "NBD requests answered with an error")
        failed.add_metric([], s.errors)
        inflight = GaugeMetricFamily("storaged_nbd_requests_in_flight",
                                     "NBD requests being served now")
        inflight.add_metric([], s.in_flight)
        timeouts = CounterMetricFamily("storaged_nbd_timeouts",
                                       "NBD connections dropped by nbd.handshake_timeout "
                                       "or nbd.payload_timeout")
        timeouts.add_metric([], s.timeouts)
        memory = GaugeMetricFamily("storaged_nbd_payload_bytes",
                                   "Request payload bytes the NBD server holds (nbd.memory)")
        memory.add_metric([], s.memory)
        return [active, total, refused, errors, cmds, failed, inflight, timeouts, memory]


def rados_metrics(pools: Iterable[tuple[str, RadosStatistics]]) -> list[Metric]:
    """The RADOS pools' librados calls (issue 24): latency per pool and kind of call (read,
    write, lock, command) as a histogram on the connection's buckets, the calls that
    failed, and whether the pool's client is fenced (blocklisted by a takeover)."""
    lat = HistogramMetricFamily("storaged_rados_op_seconds",
                                "Time librados calls of the pool took, by kind",
                                labels=["pool", "kind"])
    failed = CounterMetricFamily("storaged_rados_op_failures",
                                 "librados calls of the pool that failed, by kind",
                                 labels=["pool", "kind"])
    fenced = GaugeMetricFamily("storaged_rados_fenced",
                               "1 when the pool's RADOS client was fenced (blocklisted or "
                               "its lock lost): the pool refuses I/O", labels=["pool"])
    for name, st in pools:
        for kind, op in sorted(st.latency.items()):
            buckets = [("+Inf" if bound == float("inf") else str(bound), n)
                       for bound, n in zip(RADOS_BUCKETS, op.buckets, strict=True)]
            lat.add_metric([name, kind], buckets, op.seconds)
            failed.add_metric([name, kind], op.failed)
        fenced.add_metric([name], 1 if st.fenced else 0)
    return [lat, failed, fenced]


def iscsi_metrics(server: ISCSIServer) -> list[Metric]:
    s = server.stats
    sessions = GaugeMetricFamily("storaged_iscsi_sessions", "Logged-in iSCSI sessions")
    sessions.add_metric([], s.sessions)
    total = CounterMetricFamily("storaged_iscsi_logins", "iSCSI logins, by result",
                                labels=["result"])
    total.add_metric(["ok"], s.sessions_total)
    total.add_metric(["refused"], s.logins_refused)
    errors = CounterMetricFamily("storaged_iscsi_protocol_errors",
                                 "PDUs rejected or connections dropped for protocol errors")
    errors.add_metric([], s.protocol_errors)
    cmds = CounterMetricFamily("storaged_iscsi_commands", "SCSI commands by kind",
                               labels=["command"])
    for name, n in sorted(s.commands.items()):
        cmds.add_metric([name.lower()], n)
    sense = CounterMetricFamily("storaged_iscsi_check_conditions",
                                "SCSI commands answered CHECK CONDITION, by sense key",
                                labels=["sense_key"])
    for key, n in sorted(s.sense.items()):
        sense.add_metric([key], n)
    nbytes = CounterMetricFamily("storaged_iscsi_bytes", "SCSI data bytes moved",
                                 labels=["direction"])
    nbytes.add_metric(["read"], s.bytes_read)
    nbytes.add_metric(["write"], s.bytes_written)
    lat = HistogramMetricFamily("storaged_iscsi_command_seconds", "SCSI command latency")
    cumulative, buckets = 0, []
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), s.latency_counts, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    lat.add_metric([], buckets, s.latency_sum)
    return [sessions, total, errors, cmds, sense, nbytes, lat]


class MetricsServer:
    def __init__(self, registry: Registry, nbd: NBDServer | None,
                 iscsi: ISCSIServer | None = None) -> None:
        self.prom = CollectorRegistry(auto_describe=False)
        self.prom.register(StoragedCollector(registry, nbd, iscsi))
        ProcessCollector(registry=self.prom)

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[list[trio.SocketListener]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        log.info("metrics on http://%s:%d/metrics", host,
                 listeners[0].socket.getsockname()[1])
        task_status.started(listeners)
        await trio.serve_listeners(self._client, listeners)

    async def _client(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                head = bytearray()
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    head += data
                line = bytes(head).split(b"\r\n", 1)[0].decode("latin-1").split()
                if len(line) < 2 or line[0] != "GET":
                    await _respond(stream, "405 Method Not Allowed", b"GET only\n")
                elif line[1].split("?")[0] != "/metrics":
                    await _respond(stream, "404 Not Found", b"try /metrics\n")
                else:
                    await _respond(stream, "200 OK", generate_latest(self.prom),
                                   "text/plain; version=0.0.4; charset=utf-8")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


async def _respond(stream: trio.SocketStream, status: str, body: bytes,
                   ctype: str = "text/plain") -> None:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    await stream.send_all(head + body)
