"""The storaged daemon: one trio nursery owns the control API, the NBD server and the
metrics endpoint; SIGTERM/SIGINT stop accepting, let in-flight requests finish, flush and
close every pool, and exit 0. Around it, for its whole run, the systemd watchdog pings and
SIGHUP's reload (storaged.service S3, S4); the background tasks read the settings a reload
may change from the live ``Reloader`` at each round.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import trio

from fuse.fs import FuseOptions, VolumeFS
from fuse.mount import FuseMount, check_mountpoint
from iscsi.server import ISCSIConfig, ISCSIServer, SharedExclusive
from iscsi.targets import TargetCatalog
from nbd import proto
from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer, tls_server_context
from pool import Pool, rebuild, scrub
from pool.errors import StorageError
from pool.tuning import PoolTuning
from storaged.api import ControlAPI
from storaged.config import Config, parse_address
from storaged.control import ControlServer
from storaged.iscsi_acl import AccessStore
from storaged.libvirt import disk_xml
from storaged.metrics import MetricsServer
from storaged.registry import PoolEntry, Registry
from storaged.service import Reloader, reloading_message, sd_notify, watchdog, watchdog_interval
from storaged.startup import (
    StartupError,
    bind_unix,
    check_control_socket,
    check_listen,
    check_unix_socket,
    listen_error,
    unlink_unix,
)
from storaged.tuning import freeze_startup
from volumes import VolumeManager
from volumes.volume import WriteBuffer

log = logging.getLogger(__name__)
DEMO_DEVICES = 3
DEMO_DEVICE_SIZE = 1 << 30


class _LiveManagers(Mapping[str, VolumeManager]):
    """The registry's pools as seen by the NBD catalog, always current."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> VolumeManager:
        return self._registry.pools[name].volumes

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._registry.pools))

    def __len__(self) -> int:
        return len(self._registry.pools)


async def ensure_demo(registry: Registry) -> None:
    """The embedded default: a demo pool on sparse files with a 10G volume disk0."""
    if "demo" in registry.pools:
        return
    paths = [os.path.join(registry.state_dir, f"demo-disk{i}.img") for i in range(DEMO_DEVICES)]
    exists = [await trio.Path(p).exists() for p in paths]
    if all(exists):
        entry = await registry.import_pool("demo", paths)
    else:
        entry = await registry.create("demo", paths, profile="ec:2+1", extent_size=16 << 20,
                                      file_size=DEMO_DEVICE_SIZE, force=True)
    if "disk0" not in entry.volumes.names():
        await entry.volumes.create("disk0", 10 << 30)


def attach_hint(addr: tuple[str, int], sock: str, mount: str | None = None,
                iscsi: str | None = None) -> str:
    uri = f"nbd://{addr[0]}:{addr[1]}/demo/disk0"
    disk = disk_xml(addr[0], addr[1], "demo/disk0").replace("\n", "\n" + " " * 13)
    files = f"  files:     {mount}/demo/disk0 (FUSE: qemu-img, losetup, cp, du)\n" if mount else ""
    if iscsi:
        files += f"  iSCSI:     {iscsi} (iscsi-inq, qemu-img, open-iscsi)\n"
    return f"""
storaged is serving the demo pool (Ctrl-C stops it, flushing everything first).
  inspect:   qemu-img info {uri}
  qemu:      -drive file={uri},format=raw,if=virtio,cache=none,discard=unmap
  libvirt:   {disk}
{files}  admin:     STORAGED_SOCKET={sock} .venv/bin/storagectl status
"""


async def watch_space(registry: Registry, threshold: Callable[[], float],
                      period: Callable[[], float] = lambda: 10.0) -> None:
    """The background cleaner, and the full-threshold warning: every ``period()`` seconds
    (space.check_interval, read anew each pass: a reload applies at the next) each pool
    moves the live records out of up to two segments that are mostly dead (so
    overwritten and trimmed space is reused), and a pool crossing the threshold is logged
    (and logged again when it drops back)."""
    warned: set[str] = set()
    while True:
        limit = threshold()
        for name, entry in list(registry.pools.items()):
            if entry.pool.stopped:      # failed: said once by the pool (pool.txn), no more
                continue
            try:
                if await entry.pool.clean(max_segments=2, threshold=0.5):
                    await entry.pool.commit()
            except StorageError as e:
                log.warning("pool %s: background cleaning stopped: %s", name, e.message)
            entry.full_warning = limit
            st = entry.pool.statistics()
            used = st.allocated_bytes / st.capacity_bytes if st.capacity_bytes else 0.0
            if used >= limit and name not in warned:
                warned.add(name)
                log.warning("pool %s is %.0f%% full (warning at %.0f%%): delete snapshots "
                            "or volumes, trim, or add a device", name, 100 * used,
                            100 * limit)
            elif used < limit and name in warned:
                warned.discard(name)
                log.info("pool %s is back under %.0f%% full", name, 100 * limit)
        await trio.sleep(period())


async def maintain(registry: Registry, settings: Reloader, period: float = 0.5) -> None:
    """Failing disks (issue 9): one task per imported pool that faults members whose
    device disappeared, replaces a faulted member by a spare (``faults.auto_replace``),
    and runs the rebuild and the scrub the pool's metadata asks for (so both resume after
    a restart); and one that writes back buffered writes older than
    cache.write_buffer_age."""
    async with trio.open_nursery() as nursery:
        watched: dict[str, Pool] = {}
        while True:
            for name, entry in list(registry.pools.items()):
                if watched.get(name) is not entry.pool:
                    watched[name] = entry.pool
                    entry.pool.member_health.threshold = settings.cfg.fault_threshold
                    nursery.start_soon(_maintain_pool, registry, entry, settings, period)
                    nursery.start_soon(_expire_writes, entry, settings, period)
                    nursery.start_soon(_watch_members, entry, settings.cfg)
                    nursery.start_soon(_heartbeat, entry, settings.cfg.owner_heartbeat)
                    nursery.start_soon(_background, entry, period)
            await trio.sleep(period)


def _serving(pool: Pool) -> bool:
    """Whether a pool's maintenance tasks go on: not once it is closed, nor once it has
    failed (a fenced RADOS pool, a failed metadata write): it refuses all I/O until a
    re-import (a new Pool, with new tasks), and its failure was logged once by the pool;
    these tasks would only repeat it."""
    return not pool.closed and not pool.stopped


async def _background(entry: PoolEntry, period: float) -> None:
    """The pool's own background task (``Pool.run``: discarding freed extents) in this
    daemon-owned nursery until the pool closes. A failure there is a bug, not an I/O
    error (those are counted against their member): it is logged with its traceback and
    the task started again after a pause; the pool keeps serving (discard is advisory)."""
    pool = entry.pool
    while not pool.closed:
        try:
            await pool.run()
        except Exception:
            if pool.closed:
                return
            log.exception("pool %s: its background task failed; starting it again",
                          entry.name)
            await trio.sleep(5 * period)


async def _expire_writes(entry: PoolEntry, settings: Reloader, period: float) -> None:
    """Writes never flushed reach the devices within cache.write_buffer_age seconds (its
    own task: a long rebuild or scrub does not hold it up)."""
    pool = entry.pool
    while _serving(pool):
        try:
            await entry.volumes.write_back_older_than(settings.cfg.write_buffer_age)
        except StorageError as e:
            if not pool.closed:
                log.error("pool %s: writing back old buffered writes: %s", entry.name,
                          e.message)
            await trio.sleep(5 * period)
        await trio.sleep(period)


async def _heartbeat(entry: PoolEntry, interval: float) -> None:
    """The owner record's heartbeat (pool.owner, DESIGN invariant 10), every ``interval``
    seconds while the pool is open (its own task: nothing else delays it). The first beat
    goes out at once: ``maintain`` notices a new pool up to ``period`` late, which
    owner.activity (at least 1 s) covers."""
    pool = entry.pool
    while _serving(pool):
        try:
            await pool.heartbeat()
        except StorageError as e:
            if not pool.closed:
                log.error("pool %s: heartbeat: %s", entry.name, e.message)
        await trio.sleep(interval)


async def _watch_members(entry: PoolEntry, cfg: Config) -> None:
    """Members that vanish, are replaced or shrink are faulted within
    faults.check_interval seconds, at once after a read error (its own task: a long
    rebuild or scrub does not hold it up)."""
    pool = entry.pool
    while _serving(pool):
        try:
            await pool.watch_members(cfg.check_interval)
        except StorageError as e:
            if not pool.closed:
                log.error("pool %s: checking its members: %s", entry.name, e.message)
            await trio.sleep(cfg.check_interval)


async def _maintain_pool(registry: Registry, entry: PoolEntry, settings: Reloader,
                         period: float) -> None:
    pool = entry.pool
    while _serving(pool):
        cfg = settings.cfg          # a reload applies from the next round
        try:
            if cfg.auto_replace and not pool.closed:
                await registry.auto_replace(entry)
            if rebuild.pending(pool):
                await rebuild.run(pool, rate=cfg.rebuild_rate or None)
            await scrub.run(pool, rate=cfg.scrub_rate or None)
        except StorageError as e:
            if not pool.closed:
                log.error("pool %s: maintenance: %s", entry.name, e.message)
            await trio.sleep(5 * period)
        await trio.sleep(period)


def preflight(cfg: Config) -> None:
    """Refuse now what would fail start-up later, before any pool is imported (D2, D3):
    a control socket another daemon serves, an address that cannot be listened on, a
    FUSE mount point that cannot be mounted on."""
    check_control_socket(cfg.socket)
    if cfg.nbd_socket is not None:
        check_unix_socket("nbd.socket", cfg.nbd_socket)
    if cfg.fuse_mount is not None:
        check_mountpoint(cfg.fuse_mount)
    for key, text in (("nbd.listen", cfg.nbd_listen), ("iscsi.listen", cfg.iscsi_listen),
                      ("metrics.listen", cfg.metrics_listen)):
        if text is not None:
            check_listen(key, *parse_address(text, key))


async def _start_listener(nursery: trio.Nursery, key: str, address: str | None,
                          serve: Any, *args: object) -> Any:
    """``nursery.start(serve, *args)``; an address that cannot be listened on is one line
    naming the config key (D3)."""
    try:
        return await nursery.start(serve, *args)
    except OSError as e:
        raise listen_error(key, address or "?", e) from None


async def _serve_nbd_unix(nbd: NBDServer, path: str, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """NBD on the Unix socket ``path`` too (``nbd.socket``; startup D4), removed at exit."""
    listener, st = await bind_unix("nbd.socket", path)
    log.info("NBD server listening on unix:%s", path)
    try:
        await nbd.serve_listeners([listener], task_status=task_status)
    finally:
        await unlink_unix(path, st)


def pool_tuning(cfg: Config) -> PoolTuning:
    """What the configuration tunes every pool with (not live: storaged.service.LIVE_KEYS,
    but for the deadlines each pool copies, which ``apply_live`` changes in place)."""
    tuning = PoolTuning(discard_freed=cfg.discard, read_timeout=cfg.read_timeout,
                        write_timeout=cfg.write_timeout)
    if cfg.record_cache is None:
        return tuning
    return replace(tuning, record_cache=cfg.record_cache)


def apply_live(cfg: Config, registry: Registry) -> None:
    """Put the keys a reload may change (storaged.service.LIVE_KEYS) into effect; the
    background tasks read the others from the Reloader at their next round."""
    logging.getLogger().setLevel(cfg.log_level.upper())
    # The deadlines are live (deadlines invariant 1): each open pool's own, changed in
    # place, and those of the pools imported from now on.
    registry.tuning = replace(registry.tuning, read_timeout=cfg.read_timeout,
                              write_timeout=cfg.write_timeout)
    registry.overcommit_warning = cfg.overcommit_warning
    registry.qos_defaults = cfg.qos
    for entry in list(registry.pools.values()):
        entry.pool.deadlines.read = cfg.read_timeout
        entry.pool.deadlines.write = cfg.write_timeout
        entry.pool.member_health.threshold = cfg.fault_threshold
        entry.full_warning = cfg.full_warning


async def _reload_on_hup(hups: Any, settings: Reloader, serving: trio.Event) -> None:
    """Each SIGHUP re-reads the configuration (service S4), told to systemd as a reload
    once the daemon has said READY."""
    async for _sig in hups:
        log.info("received SIGHUP: reloading the configuration")
        told = serving.is_set() and sd_notify(reloading_message())
        await settings.reload()
        if told:
            sd_notify("READY=1\nSTATUS=serving")


async def run(cfg: Config, *, ready: trio.Event | None = None,
              reload: Callable[[], Config] | None = None) -> None:
    """Serve until SIGTERM/SIGINT. ``reload``: what SIGHUP re-reads the configuration
    with (None: SIGHUP re-reads nothing)."""
    registry = Registry(cfg.state_dir, heartbeat=cfg.owner_heartbeat,
                        activity=cfg.owner_activity, tuning=pool_tuning(cfg),
                        write_buffer=WriteBuffer(cfg.write_buffer))
    settings = Reloader(cfg, reload, lambda new: apply_live(new, registry))
    apply_live(cfg, registry)
    serving = trio.Event()
    interval = watchdog_interval()
    with trio.open_signal_receiver(signal.SIGHUP) as hups:
        async with trio.open_nursery() as nursery:
            if interval is not None:
                nursery.start_soon(watchdog, interval)
            nursery.start_soon(_reload_on_hup, hups, settings, serving)
            await _serve(settings, registry, ready, serving)
            nursery.cancel_scope.cancel()


async def _serve(settings: Reloader, registry: Registry, ready: trio.Event | None,
                 serving: trio.Event) -> None:
    cfg = settings.cfg
    await registry.load([(p.name, p.target) for p in cfg.rados_pools])
    apply_live(cfg, registry)
    if cfg.demo:
        await ensure_demo(registry)
    nbd: NBDServer | None = None
    nbd_addr: tuple[str, int] | None = None
    if cfg.nbd_listen is not None or cfg.nbd_socket is not None:
        host, port = (parse_address(cfg.nbd_listen, "nbd.listen")
                      if cfg.nbd_listen is not None else ("127.0.0.1", 0))
        try:
            tls_ctx = (tls_server_context(cfg.nbd_tls_cert, cfg.nbd_tls_key)
                       if cfg.nbd_tls != "off" and cfg.nbd_tls_cert and cfg.nbd_tls_key
                       else None)
        except (OSError, ssl.SSLError) as e:
            raise StartupError(f"nbd.tls_cert/nbd.tls_key: cannot load: "
                               f"{getattr(e, 'strerror', None) or e}") from None
        nbd = NBDServer(VolumeCatalog(_LiveManagers(registry)),
                        NBDConfig(host=host, port=port, tls=proto.TLSMode(cfg.nbd_tls),
                                  tls_context=tls_ctx,
                                  allow=tuple(ipaddress.ip_network(n, strict=False)
                                              for n in cfg.nbd_allow),
                                  max_inflight=cfg.nbd_max_inflight,
                                  max_connections=cfg.nbd_max_connections,
                                  handshake_timeout=cfg.nbd_handshake_timeout,
                                  payload_timeout=cfg.nbd_payload_timeout,
                                  memory=cfg.nbd_memory,
                                  connection_memory=cfg.nbd_connection_memory))
    acl = AccessStore(cfg.state_dir, default_acl=cfg.iscsi_default_acl)
    await trio.to_thread.run_sync(acl.load)
    iscsi: ISCSIServer | None = None
    if cfg.iscsi_listen is not None:
        ihost, iport = parse_address(cfg.iscsi_listen, "iscsi.listen")
        iscsi = ISCSIServer(TargetCatalog(_LiveManagers(registry), SharedExclusive,
                                          base_iqn=cfg.iscsi_base_iqn,
                                          policies=acl.policy, reservations=acl),
                            ISCSIConfig(host=ihost, port=iport,
                                        max_connections=cfg.iscsi_max_connections,
                                        login_timeout=cfg.iscsi_login_timeout))
    fuse: FuseMount | None = None
    if cfg.fuse_mount is not None:
        fuse = FuseMount(VolumeFS(_LiveManagers(registry), FuseOptions(
            uid=os.getuid() if cfg.fuse_uid is None else cfg.fuse_uid,
            gid=os.getgid() if cfg.fuse_gid is None else cfg.fuse_gid,
            mode=cfg.fuse_mode)), cfg.fuse_mount, allow_other=cfg.fuse_allow_other)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                if nbd is not None and cfg.nbd_listen is not None:
                    listeners = await _start_listener(nursery, "nbd.listen", cfg.nbd_listen,
                                                      nbd.serve)
                    bound = listeners[0].socket.getsockname()
                    nbd_addr = (bound[0], bound[1])
                if nbd is not None and cfg.nbd_socket is not None:
                    await nursery.start(_serve_nbd_unix, nbd, cfg.nbd_socket)
                if iscsi is not None:
                    await _start_listener(nursery, "iscsi.listen", cfg.iscsi_listen,
                                          iscsi.serve)
                api = ControlAPI(registry, nbd, nbd_addr, nbd_socket=cfg.nbd_socket,
                                 iscsi=iscsi, acl=acl,
                                 fuse_mount=None if fuse is None else cfg.fuse_mount,
                                 ready=serving)
                await _start_listener(nursery, "socket", cfg.socket,
                                      ControlServer(api, cfg.socket).serve)
                if cfg.metrics_listen is not None:
                    mhost, mport = parse_address(cfg.metrics_listen, "metrics.listen")
                    await _start_listener(nursery, "metrics.listen", cfg.metrics_listen,
                                          MetricsServer(registry, nbd, iscsi).serve, mhost,
                                          mport)
                if fuse is not None:
                    await nursery.start(fuse.serve)
                nursery.start_soon(watch_space, registry, lambda: settings.cfg.full_warning,
                                   lambda: settings.cfg.space_interval)
                nursery.start_soon(maintain, registry, settings)
                log.info("storaged ready: %d pool(s), control socket %s", len(registry.pools),
                         cfg.socket)
                if cfg.demo and nbd_addr is not None:
                    target = None
                    if iscsi is not None and cfg.iscsi_listen is not None:
                        target = (f"iscsi://{cfg.iscsi_listen}/"
                                  f"{iscsi.catalog.target_name('demo', 'disk0')}/0")
                    print(attach_hint(nbd_addr, cfg.socket, fuse.mountpoint if fuse else None,
                                      target), flush=True)
                # Start-up's objects (the imported pools' state among them) stay for the
                # process: later full collections need not traverse them (tuning).
                frozen = freeze_startup()
                log.debug("froze %d start-up objects for the collector", frozen)
                sd_notify("READY=1\nSTATUS=serving")
                serving.set()
                if ready is not None:
                    ready.set()
                async for signum in signals:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    if nbd is not None:
                        # Stop taking requests; answer the ones in flight.
                        await nbd.drain()
                    if iscsi is not None:
                        # Ask initiators to log out (Async Message), then close.
                        await iscsi.drain()
                    if fuse is not None:
                        # Answer what is in flight, flush every volume, unmount.
                        await fuse.stop()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with trio.CancelScope(shield=True):
            await registry.close()
        log.info("storaged stopped; all pools flushed and closed")
