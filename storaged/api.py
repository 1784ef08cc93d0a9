"""The control API's operations: validated at the edge, executed on the registry.

Each method takes a JSON object of parameters and returns a JSON value; bad parameters
raise InvalidArgument before anything changes (invariant 9). Long operations may report
progress through the ``progress`` callback. The JSON shapes are stable: storagectl --json
prints them as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from iscsi.server import ISCSIServer
from nbd.server import NBDServer
from pool import rebuild, scrub
from pool.checker import check
from pool.errors import InvalidArgument
from pool.rados.target import RadosTarget
from storaged.iscsi_acl import AccessStore, StoredPolicy, check_credentials, check_initiator
from storaged.registry import PoolEntry, Registry
from storaged.sizes import parse_size
from volumes import Volume, check_volume_name, portable
from volumes.qos import QosSettings
from volumes.volume import LATENCY_BUCKETS

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], Awaitable[None]]
Params = dict[str, Any]


def _str(p: Params, key: str, *, required: bool = True) -> str | None:
    v = p.get(key)
    if v is None:
        if required:
            raise InvalidArgument(f"missing parameter {key!r}")
        return None
    if not isinstance(v, str) or not v:
        raise InvalidArgument(f"parameter {key!r} must be a non-empty string")
    return v


def _req(p: Params, key: str) -> str:
    v = _str(p, key)
    assert v is not None
    return v


def _strs(p: Params, key: str) -> list[str]:
    v = p.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise InvalidArgument(f"parameter {key!r} must be a list of strings")
    return list(v)


def _size(p: Params, key: str, default: int | None = None) -> int | None:
    v = p.get(key)
    if v is None:
        return default
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise InvalidArgument(f"parameter {key!r} must be a size like 10G")
    return parse_size(v)


def _bool(p: Params, key: str, default: bool) -> bool:
    v = p.get(key, default)
    if not isinstance(v, bool):
        raise InvalidArgument(f"parameter {key!r} must be true or false")
    return v


_TARGET_KEYS = {"pool", "conf", "client"}


def _rados(p: Params, devices: list[str], *, refuse: tuple[str, ...]) -> RadosTarget | None:
    """The RADOS target of pool create/import (``"rados": {"pool", "conf", "client"}``),
    or None for a pool on devices. Devices beside it, and the ``refuse`` parameters
    (device-only), are refused before anything happens (invariant 9)."""
    raw = p.get("rados")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - _TARGET_KEYS:
        raise InvalidArgument("parameter 'rados' must be {\"pool\": RADOS_POOL, \"conf\": "
                              "FILE, \"client\": ID} (conf and client optional)")
    if devices:
        raise InvalidArgument("devices and a RADOS pool exclude each other: a pool lives "
                              "on devices or in a RADOS pool")
    for key in refuse:
        if p.get(key) not in (None, False):
            raise InvalidArgument(f"parameter {key!r} does not go with a RADOS pool")
    pool = _req(raw, "pool")
    conf = _str(raw, "conf", required=False)
    client = _str(raw, "client", required=False)
    return RadosTarget.parse(pool, conf, client)


def split_snapshot(spec: str) -> tuple[str, str, str]:
    pool, vol = split_volume(spec.partition("@")[0])
    snap = spec.partition("@")[2]
    if "@" not in spec or not snap:
        raise InvalidArgument(f"{spec!r} is not POOL/VOLUME@SNAPSHOT")
    return pool, vol, snap


def split_volume(spec: str) -> tuple[str, str]:
    pool, sep, vol = spec.partition("/")
    if not sep or not pool or not vol or "@" in vol:
        raise InvalidArgument(f"{spec!r} is not POOL/VOLUME")
    return pool, vol


def pool_status(entry: PoolEntry) -> dict[str, Any]:
    st = entry.pool.statistics()
    volumes = entry.volumes.list()
    virtual = sum(v.size for v in volumes)
    used_fraction = st.allocated_bytes / st.capacity_bytes if st.capacity_bytes else 0.0
    usable, avail = entry.pool.usable_capacity()
    unavailable = entry.pool.unavailable_segments()
    rados = entry.pool.rados_status()
    state = "faulted" if st.state == "failed" or unavailable else st.state
    if rados is not None and st.state == "failed":
        state = "failed"        # fenced or lost its lock: only a re-import brings it back
    return {
        "name": st.name, "uuid": st.uuid, "state": state,
        "backend": entry.pool.backend, "rados": rados,
        "failed": entry.pool.txn.failed,
        "profile": st.profile, "unavailable_segments": unavailable,
        "used_fraction": round(used_fraction, 4),
        "full_warning": used_fraction >= entry.full_warning,
        "size_bytes": st.capacity_bytes, "used_bytes": st.allocated_bytes,
        "free_bytes": st.free_bytes, "live_bytes": st.live_bytes,
        # Under the default profile (k of every k + m extents hold data): what can be stored.
        "usable_size_bytes": usable, "avail_bytes": avail,
        "extent_size": st.extent_size, "volumes": len(volumes),
        "virtual_bytes": virtual,
        "overcommit_ratio": overcommit(virtual, usable),
        "devices": [{"index": m.index, "path": m.path, "uuid": m.uuid,
                     "state": m.state, "why": m.why, "size_bytes": m.size,
                     "free_bytes": m.free_extents * st.extent_size,
                     "read_errors": m.read_errors, "write_errors": m.write_errors,
                     "checksum_errors": m.checksum_errors,
                     "rebuild_segments": m.rebuild_segments} for m in st.members],
        # Devices left out of the import that no member's last known path matches.
        "left_out": {p: why for p, why in entry.pool.left_out.items()
                     if p not in {m.path for m in st.members}},
        "spares": list(entry.spares), "scrub": scrub.status(entry.pool),
        "rebuild": _rebuild_status(entry),
        "txg": st.txg, "warnings": entry.pool.health(),
        "counters": {"records_written": st.records_written, "records_read": st.records_read,
                     "degraded_reads": st.degraded_reads,
                     "repaired_fragments": st.repaired_fragments,
                     "unreadable_records": st.unreadable_records, "commits": st.commits,
                     "checkpoints": st.checkpoints, "rebuilt_bytes": st.rebuilt_bytes,
                     "scrubbed_bytes": st.scrubbed_bytes,
                     "discarded_extents": st.discarded_extents},
    }


def overcommit(virtual: int, usable: int) -> float:
    """Volumes' total size over the usable size (thin over-commitment, invariant 6)."""
    return round(virtual / usable, 4) if usable else 0.0


def _rebuild_status(entry: PoolEntry) -> dict[str, Any] | None:
    work = rebuild.pending(entry.pool)
    live = entry.pool.activity.get("rebuild")
    if not work and live is None:
        return None
    out: dict[str, Any] = {"members": sorted({i for i, _s, _st in work}),
                           "segments_left": len(work), "done_bytes": 0, "total_bytes": 0,
                           "rate": 0.0, "eta": None}
    if isinstance(live, rebuild.RebuildProgress):
        out.update(done_bytes=live.done_bytes, total_bytes=live.total_bytes,
                   rate=round(live.rate), eta=live.eta)
    return out


def volume_info(pool: str, vol: Volume) -> dict[str, Any]:
    st = vol.statistics()
    return {"name": f"{pool}/{st.name}", "pool": pool, "volume": st.name,
            "size_bytes": st.size, "block_size": st.block_size, "profile": st.profile,
            "compression": "lz4" if st.compression else "off", "read_only": st.read_only,
            "used_bytes": st.stored_bytes, "unique_bytes": st.unique_bytes,
            "mapped_bytes": st.mapped_bytes, "dirty_bytes": st.dirty_bytes,
            "clients": [o.to_json() for o in vol.openers]}


_QOS_SIZES = ("bps", "read_bps", "write_bps", "burst_bps", "iops_size")
_QOS_KEYS = ("iops", "read_iops", "write_iops", "burst_iops", "burst_seconds", "weight",
             "group", *_QOS_SIZES)


def _qos_changes(p: Params) -> dict[str, Any]:
    """The QoS settings a call gives (``set``: key -> value; sizes may be written like
    100M), checked for shape here and for values by QosSettings (invariant 9)."""
    v = p.get("set", {})
    if not isinstance(v, dict):
        raise InvalidArgument("parameter 'set' must be an object of QoS settings")
    out: dict[str, Any] = {}
    for key, val in v.items():
        if key not in _QOS_KEYS:
            raise InvalidArgument(f"unknown QoS setting {key!r}")
        out[key] = parse_size(val) if key in _QOS_SIZES and isinstance(val, str) else val
    return out


def qos_json(s: QosSettings) -> dict[str, Any]:
    """All of a volume's QoS settings in plain numbers (bytes for bps; 0 = no limit)."""
    return {"iops": s.iops, "read_iops": s.read_iops, "write_iops": s.write_iops,
            "bps": s.bps, "read_bps": s.read_bps, "write_bps": s.write_bps,
            "burst_iops": s.burst_iops, "burst_bps": s.burst_bps,
            "burst_seconds": s.burst_seconds, "iops_size": s.iops_size, "weight": s.weight,
            "group": s.group}


def volume_sample(pool: str, vol: Volume) -> dict[str, Any]:
    """Counters for ``volume top`` (the CLI turns two samples into rates)."""
    st = vol.statistics()
    th = vol.throttle_statistics()
    return {"name": f"{pool}/{st.name}", "reads": st.reads, "writes": st.writes,
            "bytes_read": st.bytes_read, "bytes_written": st.bytes_written,
            "flushes": st.flushes, "throttled_seconds": th.throttled_seconds,
            "waiting": th.waiting,
            "latency": {op: list(h.counts) for op, h in st.latency},
            "latency_bounds": list(LATENCY_BUCKETS)}


def _new_size(text: Any, current: int) -> int:
    """A resize's target from ``--size``: absolute (10G) or relative to ``current`` (+10G,
    -1G)."""
    if not isinstance(text, (str, int)) or isinstance(text, bool):
        raise InvalidArgument("parameter 'size' must be a size like 10G, +10G or -1G")
    if isinstance(text, str) and text[:1] in ("+", "-"):
        delta = parse_size(text[1:])
        if text[0] == "+":
            return current + delta
        if delta >= current:
            raise InvalidArgument(f"cannot shrink by {text[1:]}: the volume has only "
                                  f"{current} bytes")
        return current - delta
    return parse_size(text)


class ControlAPI:
    def __init__(self, registry: Registry, nbd: NBDServer | None,
                 nbd_address: tuple[str, int] | None, *, nbd_socket: str | None = None,
                 iscsi: ISCSIServer | None = None, acl: AccessStore | None = None,
                 fuse_mount: str | None = None, ready: trio.Event | None = None) -> None:
        self.registry = registry
        # Set once everything is up (the FUSE mount, the metrics listener: the daemon's
        # READY=1); the control socket answers before that, so ``status`` says which.
        self.ready = ready
        self.nbd_socket = nbd_socket
        self.fuse_mount = fuse_mount
        self.iscsi = iscsi
        self.acl = acl
        self.nbd = nbd
        self.nbd_address = nbd_address
        self.methods: dict[str, Callable[[Params, Progress], Awaitable[Any]]] = {
            "pool.create": self.pool_create, "pool.import": self.pool_import,
            "pool.export": self.pool_export, "pool.destroy": self.pool_destroy,
            "pool.list": self.pool_list, "pool.status": self.pool_status,
            "pool.add_device": self.pool_add_device, "pool.check": self.pool_check,
            "pool.scrub": self.pool_scrub, "pool.replace_device": self.pool_replace_device,
            "pool.clean": self.pool_clean,
            "pool.add_spare": self.pool_add_spare, "pool.offline": self.pool_offline,
            "pool.online": self.pool_online, "pool.remove_device": self.pool_remove_device,
            "volume.create": self.volume_create, "volume.list": self.volume_list,
            "volume.info": self.volume_info, "volume.resize": self.volume_resize,
            "volume.delete": self.volume_delete, "export.list": self.export_list,
            "volume.qos": self.volume_qos, "volume.top": self.volume_top,
            "qos.list": self.qos_list, "qos.group": self.qos_group,
            "qos.defaults": self.qos_defaults,
            "export.iscsi": self.export_iscsi,
            "volume.receive_abort": self.volume_receive_abort,
            "volume.flush": self.volume_flush, "volume.rename": self.volume_rename,
            "volume.receive_status": self.volume_receive_status,
            "snapshot.create": self.snapshot_create, "snapshot.list": self.snapshot_list,
            "snapshot.delete": self.snapshot_delete,
            "snapshot.rollback": self.snapshot_rollback,
            "snapshot.clone": self.snapshot_clone, "snapshot.diff": self.snapshot_diff,
            "status": self.status,
        }

    async def call(self, method: str, params: Params, progress: Progress) -> Any:
        fn = self.methods.get(method)
        if fn is None:
            raise InvalidArgument(f"unknown method {method!r}")
        if not isinstance(params, dict):
            raise InvalidArgument("params must be a JSON object")
        return await fn(params, progress)

    # ---- pools --------------------------------------------------------------------------
    async def pool_create(self, p: Params, progress: Progress) -> Any:
        devices = _strs(p, "devices")
        target = _rados(p, devices, refuse=("force", "file_size"))
        if target is not None:
            entry = await self.registry.create_rados(
                _req(p, "name"), target,
                profile=_str(p, "profile", required=False) or "plain",
                extent_size=_size(p, "extent_size", 16 << 20) or 0)
            return pool_status(entry)
        if not devices:
            raise InvalidArgument("pool create needs at least one device (or a RADOS "
                                  "pool: \"rados\")")
        entry = await self.registry.create(
            _req(p, "name"), devices, profile=_str(p, "profile", required=False) or "plain",
            extent_size=_size(p, "extent_size", 16 << 20) or 0,
            file_size=_size(p, "file_size"), force=_bool(p, "force", False))
        return pool_status(entry)

    async def pool_import(self, p: Params, progress: Progress) -> Any:
        name = _str(p, "name", required=False)
        target = _rados(p, _strs(p, "devices"), refuse=("force",))
        if target is not None:
            if name is None:
                raise InvalidArgument("pool import from a RADOS pool needs the pool's name")
            entry = await self.registry.import_rados(name, target,
                                                     takeover=_bool(p, "takeover", False))
            out = pool_status(entry)
            if entry.taken_over:
                out["taken_over"] = entry.taken_over
            return out
        if _bool(p, "takeover", False):
            raise InvalidArgument("takeover goes with a RADOS pool (\"rados\"); a pool on "
                                  "devices is taken over with force")
        if name is None:
            # Like `zpool import`: list what could be imported, change nothing.
            return await self.registry.importable(_strs(p, "devices"))
        entry = await self.registry.import_pool(name, _strs(p, "devices"),
                                                force=_bool(p, "force", False))
        out = pool_status(entry)
        if entry.taken_over:
            out["taken_over"] = entry.taken_over
        return out

    async def pool_export(self, p: Params, progress: Progress) -> Any:
        await self.registry.export(_req(p, "name"), force=_bool(p, "force", False))
        return {"name": p["name"], "exported": True}

    async def pool_destroy(self, p: Params, progress: Progress) -> Any:
        # "rados": finish an interrupted destroy of a RADOS pool not imported here
        last = 0.0

        async def deleted(done: int, total: int) -> None:
            nonlocal last
            if done == total or time.monotonic() - last >= 0.5:
                last = time.monotonic()
                await progress({"phase": "deleting objects", "done": done, "total": total,
                                "unit": "objects"})
        await self.registry.destroy(_req(p, "name"), _rados(p, [], refuse=()),
                                    progress=deleted)
        return {"name": p["name"], "destroyed": True}

    async def pool_list(self, p: Params, progress: Progress) -> Any:
        out = [pool_status(e) for _n, e in sorted(self.registry.pools.items())]
        out += [{"name": n, "state": "unavailable", "error": why}
                for n, why in sorted(self.registry.failed.items())
                if n not in self.registry.pools]
        return out

    async def pool_status(self, p: Params, progress: Progress) -> Any:
        name = _str(p, "name", required=False)
        if name is None:
            # Like `zpool status`: every pool (those that failed to import as in pool.list).
            out = [self._pool_status(e) for _n, e in sorted(self.registry.pools.items())]
            return out + [{"name": n, "state": "unavailable", "error": why}
                          for n, why in sorted(self.registry.failed.items())
                          if n not in self.registry.pools]
        return self._pool_status(self.registry.get(name))

    @staticmethod
    def _pool_status(entry: PoolEntry) -> dict[str, Any]:
        out = pool_status(entry)
        # Exact data accounting walks every map (not done per metrics scrape).
        data, shared = entry.pool.record_space()
        out["data_bytes"], out["shared_bytes"] = data, shared
        return out

    async def pool_add_device(self, p: Params, progress: Progress) -> Any:
        name = _req(p, "name")
        await self.registry.add_device(name, _req(p, "device"), _size(p, "file_size"))
        return pool_status(self.registry.get(name))

    async def pool_check(self, p: Params, progress: Progress) -> Any:
        entry = self.registry.get(_req(p, "name"))
        await progress({"phase": "checking metadata and references", "done": 0, "total": 1})
        report = await check(entry.pool, deep=_bool(p, "deep", False))
        await progress({"phase": "done", "done": 1, "total": 1})
        return {"name": report.pool, "ok": report.ok, "problems": list(report.problems),
                "segments": report.segments, "records": report.records,
                "fragments_checked": report.fragments_checked,
                "fragments_bad": report.fragments_bad}

    async def pool_clean(self, p: Params, progress: Progress) -> Any:
        """Run the segment cleaner now (the daemon runs it every 10 s at threshold 0.5):
        moves the live records out of up to ``max_segments`` segments less than
        ``threshold`` live, then commits. For tests and for reclaiming space at once."""
        entry = self.registry.get(_req(p, "name"))
        threshold = p.get("threshold", 1.0)
        segments = p.get("max_segments", 8)
        if (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                or not 0 < threshold <= 1):
            raise InvalidArgument("threshold must be a number in (0, 1]")
        if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
            raise InvalidArgument("max_segments must be a positive integer")
        before = entry.pool.statistics().records_relocated
        emptied = await entry.pool.clean(max_segments=segments, threshold=float(threshold))
        await entry.pool.commit()
        return {"name": entry.name, "segments_emptied": emptied,
                "records_moved": entry.pool.statistics().records_relocated - before}

    # ---- failing disks (issue 9) --------------------------------------------------------
    async def pool_scrub(self, p: Params, progress: Progress) -> Any:
        entry = self.registry.get(_req(p, "name"))
        action = _str(p, "action", required=False) or "start"
        if action not in ("start", "pause", "resume", "cancel", "status"):
            raise InvalidArgument(f"scrub action must be start, pause, resume or cancel, "
                                  f"not {action!r}")
        if action != "status":
            await scrub.control(entry.pool, action)
        if _bool(p, "wait", False):
            while (cur := scrub.status(entry.pool)) is not None and cur["state"] == "running":
                await progress({"phase": "scrubbing", "done": cur["done"],
                                "total": cur["total"], "rate": cur["rate"],
                                "eta": cur["eta"], "unit": "bytes"})
                await trio.sleep(0.5)
        return {"name": entry.name, "scrub": scrub.status(entry.pool)}

    async def pool_replace_device(self, p: Params, progress: Progress) -> Any:
        name = _req(p, "name")
        index = await self.registry.replace_device(name, _req(p, "old"), _req(p, "new"),
                                                   _size(p, "file_size"))
        entry = self.registry.get(name)
        if _bool(p, "wait", False):
            await self._wait_rebuild(entry, progress)
        out = pool_status(entry)
        out["replaced_member"] = index
        return out

    async def _wait_rebuild(self, entry: PoolEntry, progress: Progress) -> None:
        while rebuild.pending(entry.pool) and not entry.pool.closed:
            r = _rebuild_status(entry) or {}
            if not r.get("total_bytes"):
                await trio.sleep(0.1)       # not begun: no total to show progress against
                continue
            await progress({"phase": "rebuilding", "done": r.get("done_bytes", 0),
                            "total": r.get("total_bytes", 0), "rate": r.get("rate", 0),
                            "eta": r.get("eta"), "unit": "bytes"})
            await trio.sleep(0.5)

    async def pool_add_spare(self, p: Params, progress: Progress) -> Any:
        name = _req(p, "name")
        await self.registry.add_spare(name, _req(p, "device"), _size(p, "file_size"))
        return pool_status(self.registry.get(name))

    async def pool_offline(self, p: Params, progress: Progress) -> Any:
        entry = self.registry.get(_req(p, "name"))
        await entry.pool.offline(entry.pool.member_index(_req(p, "device")))
        return pool_status(entry)

    async def pool_online(self, p: Params, progress: Progress) -> Any:
        name = _req(p, "name")
        await self.registry.online(name, _req(p, "device"), _str(p, "path", required=False))
        entry = self.registry.get(name)
        if _bool(p, "wait", False):
            await self._wait_rebuild(entry, progress)
        return pool_status(entry)

    async def pool_remove_device(self, p: Params, progress: Progress) -> Any:
        name = _req(p, "name")

        async def moved(done: int, total: int) -> None:
            await progress({"phase": "moving records off the device", "done": done,
                            "total": total})
        index = await self.registry.remove_device(name, _req(p, "device"), moved)
        out = pool_status(self.registry.get(name))
        out["removed_member"] = index
        return out

    # ---- volumes ------------------------------------------------------------------------
    def _volume(self, spec: str) -> tuple[PoolEntry, Volume]:
        pool, vol = split_volume(spec)
        entry = self.registry.get(pool)
        return entry, entry.volumes.get(vol)

    async def volume_create(self, p: Params, progress: Progress) -> Any:
        pool, name = split_volume(_req(p, "name"))
        check_volume_name(name)
        size = _size(p, "size")
        if size is None:
            raise InvalidArgument("volume create needs --size")
        compression = _str(p, "compression", required=False) or "lz4"
        if compression not in ("lz4", "off"):
            raise InvalidArgument(f"compression must be lz4 or off, not {compression!r}")
        entry = self.registry.get(pool)
        vol = await entry.volumes.create(name, size,
                                         block_size=_size(p, "block_size", 65536) or 0,
                                         profile=_str(p, "profile", required=False),
                                         compression=compression == "lz4",
                                         qos=self.registry.qos_defaults)
        out = volume_info(pool, vol)
        limit = self.registry.overcommit_warning
        usable, _avail = entry.pool.usable_capacity()
        ratio = overcommit(sum(v.size for v in entry.volumes.list()), usable)
        if limit and ratio > limit:
            # As LVM-thin warns when its thin volumes' sizes pass the pool's: created, but
            # writes may hit ENOSPC before the volumes fill.
            out["warning"] = (f"pool {pool} is over-committed: its volumes add up to "
                              f"{ratio:.2f}x its usable size (overcommit_warning = "
                              f"{limit:g}); writes fail with ENOSPC if they fill it")
            log.warning("%s", out["warning"])
        return out

    async def volume_list(self, p: Params, progress: Progress) -> Any:
        pool = _str(p, "pool", required=False)
        entries = [self.registry.get(pool)] if pool else [
            e for _n, e in sorted(self.registry.pools.items())]
        return [volume_info(e.name, e.volumes.get(v)) for e in entries
                for v in e.volumes.names()]

    async def volume_info(self, p: Params, progress: Progress) -> Any:
        entry, vol = self._volume(_req(p, "name"))
        return volume_info(entry.name, vol)

    async def volume_resize(self, p: Params, progress: Progress) -> Any:
        entry, vol = self._volume(_req(p, "name"))
        if p.get("size") is None:
            raise InvalidArgument("volume resize needs --size")
        size = _new_size(p["size"], vol.size)
        await entry.volumes.resize(vol.name, size,
                                   allow_shrink=_bool(p, "allow_shrink", False))
        return volume_info(entry.name, vol)

    async def volume_delete(self, p: Params, progress: Progress) -> Any:
        entry, vol = self._volume(_req(p, "name"))
        await entry.volumes.delete(vol.name, recursive=_bool(p, "recursive", False),
                                   force=_bool(p, "force", False))
        if self.acl is not None and self.acl.forget(f"{entry.name}/{vol.name}"):
            await self.acl.commit()
        return {"name": p["name"], "deleted": True}

    # ---- QoS (volumes/qos.py) -----------------------------------------------------------
    async def volume_qos(self, p: Params, progress: Progress) -> Any:
        """Set what ``set`` gives (``clear``: from the defaults first); nothing given:
        show. Durable and applied to open connections when this returns."""
        entry, vol = self._volume(_req(p, "name"))
        changes, clear = _qos_changes(p), _bool(p, "clear", False)
        if changes or clear:
            await entry.volumes.set_qos(vol.name, changes, clear=clear)
        return {"name": f"{entry.name}/{vol.name}", "qos": qos_json(vol.qos)}

    async def volume_top(self, p: Params, progress: Progress) -> Any:
        pool = _str(p, "pool", required=False)
        entries = [self.registry.get(pool)] if pool else [
            e for _n, e in sorted(self.registry.pools.items())]
        return [volume_sample(e.name, e.volumes.get(v)) for e in entries
                for v in e.volumes.names()]

    async def qos_list(self, p: Params, progress: Progress) -> Any:
        pool = _str(p, "pool", required=False)
        entries = [self.registry.get(pool)] if pool else [
            e for _n, e in sorted(self.registry.pools.items())]
        return {e.name: e.volumes.qos_list() for e in entries}

    async def qos_group(self, p: Params, progress: Progress) -> Any:
        """Create or change (``set``, ``clear``) or ``delete`` a group POOL/GROUP."""
        pool, group = split_volume(_req(p, "name"))
        vm = self.registry.get(pool).volumes
        if _bool(p, "delete", False):
            await vm.delete_qos_group(group)
            return {"name": p["name"], "deleted": True}
        s = await vm.set_qos_group(group, _qos_changes(p), clear=_bool(p, "clear", False))
        return {"name": p["name"], "qos": qos_json(s)}

    async def qos_defaults(self, p: Params, progress: Progress) -> Any:
        """The settings a pool's new volumes get (``set``, ``clear``; nothing: show)."""
        vm = self.registry.get(_req(p, "pool")).volumes
        changes, clear = _qos_changes(p), _bool(p, "clear", False)
        s = (await vm.set_qos_defaults(changes, clear=clear) if changes or clear
             else vm.qos.defaults)
        return {"name": p["pool"], "qos": qos_json(s)}

    # ---- send / receive (streams travel in control.py's framing) ------------------------
    async def volume_send(self, p: Params) -> tuple[dict[str, Any], portable.Chunks]:
        pool, vol, snap = split_snapshot(_req(p, "name"))
        base = _str(p, "from", required=False)
        if base is not None:
            base = base.rpartition("@")[2] if "@" in base else base
            if base.startswith(f"{pool}/") or not base:
                raise InvalidArgument(f"--from takes a snapshot of {pool}/{vol}, like @s1")
        resume = p.get("resume", 0)
        if not isinstance(resume, int) or isinstance(resume, bool) or resume < 0:
            raise InvalidArgument("parameter 'resume' must be a record number (>= 0)")
        return await portable.send(self.registry.get(pool).volumes, vol, snap, base, resume)

    async def volume_receive(self, p: Params) -> portable.Receiver:
        pool, vol = split_volume(_req(p, "name"))
        check_volume_name(vol)
        profile = _str(p, "profile", required=False)
        return portable.Receiver(self.registry.get(pool).volumes, vol, profile=profile,
                                 resumable=_bool(p, "resumable", False),
                                 resume=_bool(p, "resume", False),
                                 force=_bool(p, "force", False))

    async def volume_rename(self, p: Params, progress: Progress) -> Any:
        entry, vol = self._volume(_req(p, "name"))
        target = _req(p, "new_name")
        pool, _sep, new = target.rpartition("/")
        if pool and pool != entry.name:
            raise InvalidArgument("a volume cannot move to another pool by renaming: use "
                                  "volume send | volume receive")
        old = vol.name
        await entry.volumes.rename(vol.name, new, force=_bool(p, "force", False))
        if self.acl is not None and self.acl.rename(f"{entry.name}/{old}",
                                                    f"{entry.name}/{new}"):
            await self.acl.commit()
        return volume_info(entry.name, vol)

    async def volume_flush(self, p: Params, progress: Progress) -> Any:
        entry, vol = self._volume(_req(p, "name"))
        await vol.flush()
        return volume_info(entry.name, vol)

    async def volume_receive_abort(self, p: Params, progress: Progress) -> Any:
        pool, vol = split_volume(_req(p, "name"))
        await portable.abort_receive(self.registry.get(pool).volumes, vol)
        return {"name": p["name"], "discarded": True}

    async def volume_receive_status(self, p: Params, progress: Progress) -> Any:
        pool, vol = split_volume(_req(p, "name"))
        return portable.receive_state(self.registry.get(pool).volumes, vol)

    # ---- snapshots ----------------------------------------------------------------------
    def _snap_info(self, pool: str, info: dict[str, Any]) -> dict[str, Any]:
        return {"name": f"{pool}/{info['volume']}@{info['name']}", "pool": pool,
                "volume": info["volume"], "snapshot": info["name"],
                "size_bytes": info["size"], "created": info["created"],
                "referenced_bytes": info["referenced_bytes"],
                "unique_bytes": info["unique_bytes"],
                "clones": [f"{pool}/{c}" for c in info["clones"]]}

    async def snapshot_create(self, p: Params, progress: Progress) -> Any:
        pool, vol, snap = split_snapshot(_req(p, "name"))
        entry = self.registry.get(pool)
        return self._snap_info(pool, await entry.volumes.snapshot(vol, snap))

    async def snapshot_list(self, p: Params, progress: Progress) -> Any:
        spec = _str(p, "volume", required=False)
        out = []
        if spec:
            pool, vol = split_volume(spec)
            targets = [(pool, self.registry.get(pool), [vol])]
        else:
            targets = [(n, e, e.volumes.names()) for n, e in sorted(self.registry.pools.items())]
        for pool, entry, vols in targets:
            for vol in vols:
                for snap in entry.volumes.snapshot_names(vol):
                    out.append(self._snap_info(pool, entry.volumes.snapshot_info(vol, snap)))
        return out

    async def snapshot_delete(self, p: Params, progress: Progress) -> Any:
        pool, vol, snap = split_snapshot(_req(p, "name"))
        await self.registry.get(pool).volumes.delete_snapshot(
            vol, snap, force=_bool(p, "force", False))
        return {"name": p["name"], "deleted": True}

    async def snapshot_rollback(self, p: Params, progress: Progress) -> Any:
        pool, vol, snap = split_snapshot(_req(p, "name"))
        entry = self.registry.get(pool)
        return volume_info(pool, await entry.volumes.rollback(
            vol, snap, force=_bool(p, "force", False)))

    async def snapshot_clone(self, p: Params, progress: Progress) -> Any:
        pool, vol, snap = split_snapshot(_req(p, "name"))
        tpool, tvol = split_volume(_req(p, "target"))
        if tpool != pool:
            raise InvalidArgument(f"a clone lives in its snapshot's pool: use {pool}/{tvol}")
        entry = self.registry.get(pool)
        return volume_info(pool, await entry.volumes.clone(vol, snap, tvol,
                                                           qos=self.registry.qos_defaults))

    async def snapshot_diff(self, p: Params, progress: Progress) -> Any:
        pool, vol, snap_a = split_snapshot(_req(p, "from"))
        snap_b: str | None = None
        to = _str(p, "to", required=False)
        if to:
            pool_b, vol_b, snap_b = split_snapshot(to)
            if (pool_b, vol_b) != (pool, vol):
                raise InvalidArgument("both snapshots must be of the same volume")
        ranges = await self.registry.get(pool).volumes.diff(vol, snap_a, snap_b)
        return {"from": p["from"], "to": to or f"{pool}/{vol}",
                "ranges": [{"offset": o, "length": n} for o, n in ranges],
                "changed_bytes": sum(n for _o, n in ranges)}

    # ---- exports and overview -----------------------------------------------------------
    async def export_list(self, p: Params, progress: Progress) -> Any:
        out = []
        for pname, entry in sorted(self.registry.pools.items()):
            for vname in entry.volumes.names():
                names = [(f"{pname}/{vname}", False)] + [
                    (f"{pname}/{vname}@{s}", True)
                    for s in entry.volumes.snapshot_names(vname)]
                for name, ro in names:
                    item: dict[str, Any] = {"name": name, "read_only": ro}
                    snap_name = name.partition("@")[2] or None
                    item["clients"] = [o.to_json() for o in
                                       entry.volumes.clients(vname, snap_name)]
                    if self.nbd_address is not None:
                        host, port = self.nbd_address
                        item["nbd"] = f"nbd://{host}:{port}/{name}"
                    if self.nbd_socket is not None:
                        # The NBD URI standard's form: the export name in the path.
                        item["nbd_unix"] = f"nbd+unix:///{name}?socket={self.nbd_socket}"
                    if self.iscsi is not None:
                        snap = name.partition("@")[2] or None
                        iqn = self.iscsi.catalog.target_name(pname, vname, snap)
                        item["iscsi"] = f"iscsi://{self.iscsi.portal}/{iqn}/0"
                    if self.fuse_mount is not None:
                        item["fuse"] = (f"{self.fuse_mount}/{pname}/.snapshots/{vname}@"
                                        f"{snap_name}" if snap_name else
                                        f"{self.fuse_mount}/{pname}/{vname}")
                    out.append(item)
        return out

    async def export_iscsi(self, p: Params, progress: Progress) -> Any:
        """Set (or, with no policy parameters, show) a volume's iSCSI access policy. The
        parameters replace the whole policy; secrets are taken, never returned."""
        if self.acl is None:
            raise InvalidArgument("iSCSI access control is not available")
        entry, vol = self._volume(_req(p, "name"))
        name = f"{entry.name}/{vol.name}"
        allow = _strs(p, "allow")
        for a in allow:
            check_initiator(a)
        user, secret = _str(p, "chap_user", required=False), _str(p, "chap_secret",
                                                                  required=False)
        muser, msecret = (_str(p, "mutual_chap_user", required=False),
                          _str(p, "mutual_chap_secret", required=False))
        opened = _bool(p, "open", False)
        if (user is None) != (secret is None) or (muser is None) != (msecret is None):
            raise InvalidArgument("a CHAP user needs its secret (and a secret its user)")
        if muser is not None and user is None:
            raise InvalidArgument("mutual CHAP needs one-way CHAP (--chap-user) as well")
        if opened and (allow or user is not None):
            raise InvalidArgument("--open clears the policy: it takes no other option")
        if opened or allow or user is not None:
            chap = check_credentials(user, secret, "CHAP") if user and secret else None
            mutual = (check_credentials(muser, msecret, "mutual CHAP")
                      if muser and msecret else None)
            if chap is not None and mutual is not None and chap.secret == mutual.secret:
                raise InvalidArgument("the mutual CHAP secret must differ from the CHAP "
                                      "secret")
            self.acl.set(name, StoredPolicy(open=True) if opened else StoredPolicy(
                allow=tuple(a.lower() for a in allow), chap=chap, mutual=mutual))
            await self.acl.commit()
            log.info("iSCSI policy of %s set: %s", name, self.acl.describe(name)["access"])
        out = self.acl.describe(name)
        if self.iscsi is not None:
            iqn = self.iscsi.catalog.target_name(entry.name, vol.name)
            out["iscsi"] = f"iscsi://{self.iscsi.portal}/{iqn}/0"
        return out

    async def status(self, p: Params, progress: Progress) -> Any:
        pools = await self.pool_list({}, progress)
        nbd: dict[str, Any] | None = None
        if self.nbd is not None:
            s = self.nbd.stats
            nbd = {"listen": (None if self.nbd_address is None
                              else f"{self.nbd_address[0]}:{self.nbd_address[1]}"),
                   "socket": self.nbd_socket,
                   "connections": s.active, "connections_total": s.connections}
        return {"pools": pools, "volumes": await self.volume_list({}, progress), "nbd": nbd,
                "ready": self.ready is None or self.ready.is_set()}

