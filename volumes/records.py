"""The records the volumes layer stores as pool objects (``Pool.put_object``): one per
volume, one per snapshot. Frozen values; ``decode`` reads the stored dict and ``encode``
gives it back, so the on-disk format and send/receive streams do not change.

Invariants:

1. ``decode(d).encode() == d`` for every record this code or an older one stored, key
   order included: unknown keys are kept in ``extra`` and written back as they were.
2. A record is never changed in place: a change is a new record (``dataclasses.replace``)
   stored under the same object id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from volumes.qos import QosSettings

_VOLUME_KEYS = ("type", "name", "size", "block_size", "profile", "compression", "map",
                "created", "origin", "receiving", "qos")
_SNAPSHOT_KEYS = ("type", "volume", "name", "map", "size", "block_size", "profile",
                  "compression", "created", "uuid")
_RECEIVE_KEYS = ("target", "snapshot", "snapshot_name", "base", "seq", "resumable",
                 "header")


def _extra(d: Mapping[str, Any], known: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in d.items() if k not in known)


def _ordered(order: tuple[str, ...], out: dict[str, Any]) -> dict[str, Any]:
    """``out`` in the key order of the stored dict it was decoded from (invariant 1);
    new keys after."""
    return {**{k: out[k] for k in order if k in out}, **out} if order else out


@dataclass(frozen=True, slots=True)
class ReceiveState:
    """What a hidden volume is receiving (volumes/portable.py) and how far it is durable."""

    target: str                  # the volume name the receive makes or updates
    snapshot: str                # the stream snapshot's uuid
    snapshot_name: str
    base: str | None             # the base snapshot's uuid (an incremental stream)
    seq: int                     # records below this one are durable in the volume
    resumable: bool
    header: Mapping[str, Any]    # the stream's header fields
    extra: tuple[tuple[str, Any], ...] = ()
    _order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> ReceiveState:
        return cls(d["target"], d["snapshot"], d["snapshot_name"], d.get("base"), d["seq"],
                   d["resumable"], d["header"], _extra(d, _RECEIVE_KEYS), tuple(d))

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "snapshot": self.snapshot,
                               "snapshot_name": self.snapshot_name, "base": self.base,
                               "seq": self.seq, "resumable": self.resumable,
                               "header": self.header, **dict(self.extra)}
        return _ordered(self._order, out)


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """A volume: its name, size, block size, profile, compression, block map, creation
    time; a clone's origin snapshot; a receive's state while it is a hidden volume; its
    QoS settings (volumes/qos.py; stored only when some differ from the defaults)."""

    name: str
    size: int
    block_size: int
    profile: str
    compression: bool
    map: int
    created: int
    origin: int | None = None
    receiving: ReceiveState | None = None
    qos: QosSettings = field(default_factory=QosSettings)
    extra: tuple[tuple[str, Any], ...] = ()
    _order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> VolumeRecord:
        kept = d.get("receiving")
        return cls(d["name"], d["size"], d["block_size"], d["profile"], d["compression"],
                   d["map"], d["created"], d.get("origin"),
                   None if kept is None else ReceiveState.decode(kept),
                   QosSettings.decode(d.get("qos") or {}),
                   _extra(d, _VOLUME_KEYS), tuple(d))

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "volume", "name": self.name, "size": self.size,
                               "block_size": self.block_size, "profile": self.profile,
                               "compression": self.compression, "map": self.map,
                               "created": self.created}
        if self.origin is not None:
            out["origin"] = self.origin
        if self.receiving is not None:
            out["receiving"] = self.receiving.encode()
        qos = self.qos.encode()
        if qos:
            out["qos"] = qos
        out.update(self.extra)
        return _ordered(self._order, out)


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A snapshot of the volume stored as object ``volume``: its own block map (a clone
    of the volume's when taken), the volume's geometry then, and its stream identity
    (``uuid``: None for a snapshot older than send/receive, given one when first sent)."""

    volume: int
    name: str
    map: int
    size: int
    block_size: int
    profile: str
    compression: bool
    created: int
    uuid: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    _order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def decode(cls, d: Mapping[str, Any]) -> SnapshotRecord:
        return cls(d["volume"], d["name"], d["map"], d["size"], d["block_size"],
                   d["profile"], d["compression"], d["created"], d.get("uuid"),
                   _extra(d, _SNAPSHOT_KEYS), tuple(d))

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "snapshot", "volume": self.volume, "name": self.name,
                               "map": self.map, "size": self.size,
                               "block_size": self.block_size, "profile": self.profile,
                               "compression": self.compression, "created": self.created}
        if self.uuid is not None:
            out["uuid"] = self.uuid
        out.update(self.extra)
        return _ordered(self._order, out)
