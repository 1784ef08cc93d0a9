"""Daemon configuration: a TOML file (every key documented in docs/CONFIG.md), overridden
by command-line flags. Validated at load: a bad file is refused with the key and the reason
(invariant 9), before the daemon touches any pool.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from iscsi.targets import DEFAULT_BASE_IQN, check_base_iqn
from nbd.proto import MAX_PAYLOAD
from pool.labels import check_name as check_pool_name
from pool.rados.target import RadosTarget
from storaged.sizes import parse_size
from storaged.wire import DEFAULT_SOCKET
from volumes import InvalidArgument
from volumes.qos import QosSettings

DEFAULT_STATE_DIR = "/var/lib/storaged"
DEFAULT_NBD = "127.0.0.1:10809"
DEFAULT_METRICS = "127.0.0.1:9810"
DEFAULT_ISCSI = "127.0.0.1:3260"


class Size(int):
    """Marks a config key whose value is a byte count (int or size string)."""


@dataclass(frozen=True)
class RadosPoolConfig:
    """A ``[[rados_pool]]`` table: a storaged pool on Ceph RADOS to import at start (never
    with takeover: a pool another daemon owns is reported as not imported)."""

    name: str
    target: RadosTarget


# The keys of a [[rados_pool]] table and their types (all strings).
RADOS_POOL_KEYS = ("name", "rados_pool", "ceph_conf", "ceph_id")


@dataclass(frozen=True)
class Config:
    state_dir: str = DEFAULT_STATE_DIR
    socket: str = DEFAULT_SOCKET
    log_level: str = "info"
    nbd_listen: str | None = DEFAULT_NBD          # None: NBD off
    nbd_socket: str | None = None                 # a Unix socket path for NBD too
    nbd_tls: str = "off"                          # off | on | require
    nbd_tls_cert: str | None = None
    nbd_tls_key: str | None = None
    nbd_allow: tuple[str, ...] = ()               # CIDR networks; empty: everyone
    nbd_max_inflight: int = 64
    nbd_max_connections: int = 256                # more are closed at once
    nbd_handshake_timeout: float = 30.0           # seconds from connect to an export
    nbd_payload_timeout: float = 60.0             # seconds to finish a request begun
    nbd_memory: int = 512 << 20                   # payload bytes held, all connections
    nbd_connection_memory: int = 64 << 20         # ... one connection
    nbd_allow_insecure: bool = False              # plain NBD open to a non-loopback net
    metrics_listen: str | None = DEFAULT_METRICS  # None: metrics off
    iscsi_listen: str | None = DEFAULT_ISCSI      # None: iSCSI off
    iscsi_base_iqn: str = DEFAULT_BASE_IQN        # target names: BASE:POOL:VOLUME
    iscsi_default_acl: str = "open"               # volumes without a policy: open|closed
    iscsi_allow_insecure: bool = False            # open volumes on a non-loopback portal
    iscsi_max_connections: int = 256              # more are closed at once
    iscsi_login_timeout: float = 30.0             # seconds from connect to logged in
    demo: bool = False                            # create a demo pool if there is none
    full_warning: float = 0.8                     # used fraction that raises a warning
    space_interval: float = 10.0                  # seconds between cleaner / full checks
    overcommit_warning: float = 1.0               # volumes' size / usable size that warns
    discard: bool = True                          # discard freed extents on the devices
    fault_threshold: int = 10                     # I/O errors that fault a pool member
    scrub_rate: int = 256 << 20                   # bytes/s a scrub may read
    rebuild_rate: int = 0                         # bytes/s a rebuild may read (0: no cap)
    auto_replace: bool = False                    # replace a faulted member by a spare
    read_timeout: float = 30.0                    # seconds before a device read is given up
    write_timeout: float = 120.0                  # ... a write or sync (the member faulted)
    check_interval: float = 2.0                   # seconds between checks of members' devices
    record_cache: int | None = None               # bytes of verified blocks per pool
    write_buffer: int | None = None               # bytes of unflushed writes, all volumes
    write_buffer_age: float = 30.0                # seconds before unflushed writes go out
    fuse_mount: str | None = None                 # FUSE mount point; None: FUSE off
    fuse_uid: int | None = None                   # owner of the files (None: the daemon's)
    fuse_gid: int | None = None
    fuse_mode: int = 0o600                        # volume files; snapshots: its read bits
    fuse_allow_other: bool = False                # other users may enter the mount
    owner_heartbeat: float = 2.0                  # seconds between owner-record heartbeats
    owner_activity: float = 10.0                  # silence after which an owner is gone
    qos: QosSettings = field(default_factory=QosSettings)   # new volumes' QoS (no pool's)
    rados_pools: tuple[RadosPoolConfig, ...] = ()  # [[rados_pool]]: imported at start
    extra: dict[str, Any] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches this machine only (a name other than localhost is
    taken as reaching further: it is not resolved here)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"{what}: {text!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


_KEYS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "state_dir": ("state_dir", str), "socket": ("socket", str),
    "log_level": ("log_level", str), "nbd.listen": ("nbd_listen", str),
    "nbd.socket": ("nbd_socket", str),
    "nbd.tls": ("nbd_tls", str), "nbd.tls_cert": ("nbd_tls_cert", str),
    "nbd.tls_key": ("nbd_tls_key", str), "nbd.allow": ("nbd_allow", list),
    "nbd.max_inflight": ("nbd_max_inflight", int), "metrics.listen": ("metrics_listen", str),
    "nbd.max_connections": ("nbd_max_connections", int),
    "nbd.handshake_timeout": ("nbd_handshake_timeout", float),
    "nbd.payload_timeout": ("nbd_payload_timeout", float),
    "nbd.memory": ("nbd_memory", Size), "nbd.connection_memory": ("nbd_connection_memory", Size),
    "nbd.allow_insecure": ("nbd_allow_insecure", bool),
    "iscsi.allow_insecure": ("iscsi_allow_insecure", bool),
    "iscsi.max_connections": ("iscsi_max_connections", int),
    "iscsi.login_timeout": ("iscsi_login_timeout", float),
    "demo": ("demo", bool), "full_warning": ("full_warning", (float, int)),
    "overcommit_warning": ("overcommit_warning", (float, int)),
    "space.check_interval": ("space_interval", (float, int)),
    "discard": ("discard", bool),
    "faults.threshold": ("fault_threshold", int), "faults.scrub_rate": ("scrub_rate", Size),
    "faults.rebuild_rate": ("rebuild_rate", Size),
    "faults.auto_replace": ("auto_replace", bool),
    "faults.read_timeout": ("read_timeout", float),
    "faults.write_timeout": ("write_timeout", float),
    "faults.check_interval": ("check_interval", (float, int)),
    "cache.records": ("record_cache", Size),
    "cache.write_buffer": ("write_buffer", Size),
    "cache.write_buffer_age": ("write_buffer_age", (float, int)),
    "fuse.mount": ("fuse_mount", str), "fuse.uid": ("fuse_uid", int),
    "fuse.gid": ("fuse_gid", int), "fuse.mode": ("fuse_mode", int),
    "fuse.allow_other": ("fuse_allow_other", bool),
    "iscsi.listen": ("iscsi_listen", str), "iscsi.base_iqn": ("iscsi_base_iqn", str),
    "iscsi.default_acl": ("iscsi_default_acl", str),
    "owner.heartbeat": ("owner_heartbeat", float),
    "owner.activity": ("owner_activity", float),
}

# The config file's name of each Config attribute (messages name keys as written).
KEY_OF: dict[str, str] = {attr: key for key, (attr, _typ) in _KEYS.items()}
KEY_OF["rados_pools"] = "rados_pool"


def load(path: str | None) -> Config:
    """Read a TOML config file (None: defaults only)."""
    cfg = Config()
    if path is None:
        return validate(cfg)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise InvalidArgument(f"config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"config {path}: not valid TOML: {e}") from e
    flat: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    if "rados_pool" in data:
        changes["rados_pools"] = _rados_pools(path, data.pop("rados_pool"))
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    qos = {k: v for k, v in flat.items() if k.startswith("qos.")}
    if qos:
        changes["qos"] = _qos(path, qos)
    for key, raw in flat.items():
        value = raw
        if key.startswith("qos."):
            continue
        if key not in _KEYS:
            raise InvalidArgument(f"config {path}: unknown key {key!r} (known: "
                                  f"{', '.join(sorted(_KEYS))})")
        attr, typ = _KEYS[key]
        if typ is Size:
            # A byte count: an integer, or a size string like the CLI's ("512M", "1.5G").
            try:
                value = parse_size(value)
            except InvalidArgument as e:
                raise InvalidArgument(f"config {path}: {key}: {e.message}") from e
            typ = int
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)            # read_timeout = 30 means 30.0
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            name = (typ.__name__ if isinstance(typ, type)
                    else " or ".join(t.__name__ for t in typ))
            raise InvalidArgument(f"config {path}: {key} must be of type {name}")
        if attr in ("nbd_listen", "nbd_socket", "metrics_listen", "fuse_mount",
                    "iscsi_listen") and value == "off":
            value = None
        if attr == "nbd_allow":
            value = tuple(value)
        changes[attr] = value
    return validate(replace(cfg, **changes))


def _rados_pools(path: str, tables: Any) -> tuple[RadosPoolConfig, ...]:
    """The ``[[rados_pool]]`` tables (an array of tables): each names a storaged pool
    (``name``) on a RADOS pool (``rados_pool``), and optionally the ceph.conf
    (``ceph_conf``) and the cephx id (``ceph_id``) to reach it with."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InvalidArgument(f"config {path}: rados_pool must be an array of tables "
                              f"([[rados_pool]])")
    out: list[RadosPoolConfig] = []
    for i, t in enumerate(tables):
        where = f"config {path}: rados_pool[{i}]"
        for key, value in t.items():
            if key not in RADOS_POOL_KEYS:
                raise InvalidArgument(f"{where}: unknown key {key!r} (known: "
                                      f"{', '.join(RADOS_POOL_KEYS)})")
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"{where}.{key} must be a non-empty string")
        for key in ("name", "rados_pool"):
            if key not in t:
                raise InvalidArgument(f"{where}: missing key {key!r}")
        try:
            check_pool_name(t["name"])
            target = RadosTarget.parse(t["rados_pool"], t.get("ceph_conf"), t.get("ceph_id"))
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {e.message}") from e
        if any(p.name == t["name"] for p in out):
            raise InvalidArgument(f"{where}: pool {t['name']!r} is declared twice")
        out.append(RadosPoolConfig(t["name"], target))
    return tuple(out)


_QOS_SIZES = ("bps", "read_bps", "write_bps", "burst_bps", "iops_size")


def _qos(path: str, keys: dict[str, Any]) -> QosSettings:
    """The ``[qos]`` table: the QoS settings new volumes get in pools that have no
    defaults of their own (``storagectl qos defaults``); bps keys take sizes."""
    out: dict[str, Any] = {}
    for key, raw in keys.items():
        name = key.removeprefix("qos.")
        if name == "group":
            raise InvalidArgument(f"config {path}: qos.group is not a config key (groups "
                                  f"belong to a pool: storagectl qos defaults POOL --group)")
        value = raw
        if name in _QOS_SIZES and isinstance(raw, str):
            try:
                value = parse_size(raw)
            except InvalidArgument as e:
                raise InvalidArgument(f"config {path}: {key}: {e.message}") from e
        out[name] = value
    try:
        return QosSettings().updated(out)
    except InvalidArgument as e:
        raise InvalidArgument(f"config {path}: [qos]: {e.message}") from e


def validate(cfg: Config) -> Config:
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidArgument(f"log_level must be debug, info, warning or error, not "
                              f"{cfg.log_level!r}")
    if cfg.nbd_listen is not None:
        parse_address(cfg.nbd_listen, "nbd.listen")
    if cfg.nbd_socket is not None:
        if not os.path.isabs(cfg.nbd_socket):
            raise InvalidArgument(f"nbd.socket must be an absolute path, not "
                                  f"{cfg.nbd_socket!r}")
        if os.path.abspath(cfg.nbd_socket) == os.path.abspath(cfg.socket):
            raise InvalidArgument(f"nbd.socket {cfg.nbd_socket} is the control socket's "
                                  f"path; give it another")
        if len(os.fsencode(cfg.nbd_socket)) > 107:
            raise InvalidArgument(f"nbd.socket {cfg.nbd_socket}: too long for a Unix "
                                  f"socket (at most 107 bytes)")
    if cfg.metrics_listen is not None:
        parse_address(cfg.metrics_listen, "metrics.listen")
    if cfg.iscsi_listen is not None:
        parse_address(cfg.iscsi_listen, "iscsi.listen")
    try:
        check_base_iqn(cfg.iscsi_base_iqn)
    except ValueError as e:
        raise InvalidArgument(f"iscsi.base_iqn: {e}") from e
    if cfg.iscsi_default_acl not in ("open", "closed"):
        raise InvalidArgument(f"iscsi.default_acl must be open or closed, not "
                              f"{cfg.iscsi_default_acl!r}")
    if cfg.nbd_tls not in ("off", "on", "require"):
        raise InvalidArgument(f"nbd.tls must be off, on or require, not {cfg.nbd_tls!r}")
    if cfg.nbd_tls != "off" and not (cfg.nbd_tls_cert and cfg.nbd_tls_key):
        raise InvalidArgument("nbd.tls on/require needs nbd.tls_cert and nbd.tls_key")
    for net in cfg.nbd_allow:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as e:
            raise InvalidArgument(f"nbd.allow: {net!r} is not a network: {e}") from e
    if not 0 <= cfg.overcommit_warning <= 1000:
        raise InvalidArgument(f"overcommit_warning must be a ratio in [0, 1000] (0: off), "
                              f"not {cfg.overcommit_warning!r}")
    if not 0 < cfg.full_warning <= 1:
        raise InvalidArgument(f"full_warning must be a fraction in (0, 1], not "
                              f"{cfg.full_warning!r}")
    if cfg.fault_threshold < 1 or cfg.scrub_rate < 0 or cfg.rebuild_rate < 0:
        raise InvalidArgument("faults.threshold must be >= 1 and the rates >= 0")
    if cfg.record_cache is not None and cfg.record_cache < 0:
        raise InvalidArgument("cache.records must be a number of bytes (0: no cache)")
    if not 0 < cfg.space_interval <= 3600:
        raise InvalidArgument(f"space.check_interval must be seconds in (0, 3600], not "
                              f"{cfg.space_interval!r}")
    if not 0 < cfg.check_interval <= 3600:
        raise InvalidArgument(f"faults.check_interval must be seconds in (0, 3600], not "
                              f"{cfg.check_interval!r}")
    if not 0 < cfg.write_buffer_age <= 3600:
        raise InvalidArgument(f"cache.write_buffer_age must be seconds in (0, 3600], not "
                              f"{cfg.write_buffer_age!r}")
    if cfg.write_buffer is not None and cfg.write_buffer < 0:
        raise InvalidArgument("cache.write_buffer must be a number of bytes (0: each "
                              "volume writes back past 32 MiB)")
    if not 0 < cfg.read_timeout <= 3600:
        raise InvalidArgument(f"faults.read_timeout must be seconds in (0, 3600], not "
                              f"{cfg.read_timeout!r}")
    if not 0 < cfg.write_timeout <= 3600:
        raise InvalidArgument(f"faults.write_timeout must be seconds in (0, 3600], not "
                              f"{cfg.write_timeout!r}")
    if not 0 < cfg.owner_heartbeat <= 600:
        raise InvalidArgument(f"owner.heartbeat must be seconds in (0, 600], not "
                              f"{cfg.owner_heartbeat!r}")
    if not max(2 * cfg.owner_heartbeat, 1.0) <= cfg.owner_activity <= 3600:
        raise InvalidArgument(f"owner.activity must be seconds, at least 1 and twice "
                              f"owner.heartbeat, at most 3600, not {cfg.owner_activity!r}")
    if not 1 <= cfg.nbd_max_inflight <= 4096:
        raise InvalidArgument("nbd.max_inflight must be between 1 and 4096")
    for key, count in (("nbd.max_connections", cfg.nbd_max_connections),
                       ("iscsi.max_connections", cfg.iscsi_max_connections)):
        if not 1 <= count <= 65536:
            raise InvalidArgument(f"{key} must be between 1 and 65536, not {count!r}")
    for key, secs in (("nbd.handshake_timeout", cfg.nbd_handshake_timeout),
                      ("nbd.payload_timeout", cfg.nbd_payload_timeout),
                      ("iscsi.login_timeout", cfg.iscsi_login_timeout)):
        if not 0 < secs <= 3600:
            raise InvalidArgument(f"{key} must be seconds in (0, 3600], not {secs!r}")
    if cfg.nbd_connection_memory < MAX_PAYLOAD:
        raise InvalidArgument(f"nbd.connection_memory must be at least the maximum payload "
                              f"({MAX_PAYLOAD} bytes), not {cfg.nbd_connection_memory!r}")
    if cfg.nbd_memory < cfg.nbd_connection_memory:
        raise InvalidArgument(f"nbd.memory must be at least nbd.connection_memory "
                              f"({cfg.nbd_connection_memory} bytes), not {cfg.nbd_memory!r}")
    _refuse_insecure(cfg)
    if cfg.fuse_mount is not None and not cfg.fuse_mount:
        raise InvalidArgument("fuse.mount must be a directory path or 'off'")
    if not 0 <= cfg.fuse_mode <= 0o777:
        raise InvalidArgument(f"fuse.mode must be permission bits like 0o640, not "
                              f"{cfg.fuse_mode!r}")
    for key, ident in (("fuse.uid", cfg.fuse_uid), ("fuse.gid", cfg.fuse_gid)):
        if ident is not None and not 0 <= ident < 2**32 - 1:
            raise InvalidArgument(f"{key} must be a user/group id, not {ident!r}")
    return cfg


def _refuse_insecure(cfg: Config) -> None:
    """A listener reachable from other machines needs a way to keep strangers out, or the
    operator's explicit word that it may go without (invariant 9)."""
    if cfg.nbd_listen is not None and not cfg.nbd_allow_insecure:
        host, _port = parse_address(cfg.nbd_listen, "nbd.listen")
        if not is_loopback(host) and cfg.nbd_tls != "require" and not cfg.nbd_allow:
            raise InvalidArgument(
                f"nbd.listen {cfg.nbd_listen} is not a loopback address and has neither "
                f"nbd.tls = \"require\" nor an nbd.allow list: set nbd.allow_insecure = "
                f"true to serve every volume to anyone who can reach it")
    if cfg.iscsi_listen is not None and not cfg.iscsi_allow_insecure:
        host, _port = parse_address(cfg.iscsi_listen, "iscsi.listen")
        if not is_loopback(host) and cfg.iscsi_default_acl != "closed":
            raise InvalidArgument(
                f"iscsi.listen {cfg.iscsi_listen} is not a loopback address and "
                f"iscsi.default_acl is open (every initiator, no CHAP): set "
                f"iscsi.default_acl = \"closed\" (volumes then need an ACL with initiators "
                f"or CHAP) or iscsi.allow_insecure = true")
