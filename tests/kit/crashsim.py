"""Crash simulation on top of the recording device (DESIGN §4).

``CrashSimulator`` replays a ``WriteLog`` and builds the device images a power cut at a given
log position could leave: every write followed by a sync on its device is durable; writes
since a device's last sync survive as an arbitrary subset, applied in an arbitrary order,
and the last one may be torn at a sector boundary.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from pool.faults import LogEntry, WriteLog

TORN_UNIT = 512


@dataclass(frozen=True, slots=True)
class CrashState:
    position: int            # log entries [0, position) had been issued
    variant: str             # how unsynced writes were treated
    images: list[bytes]


class CrashSimulator:
    def __init__(self, base_images: list[bytes], log: WriteLog) -> None:
        self.base = base_images
        self.entries: list[LogEntry] = list(log.entries)

    def sync_points(self) -> list[int]:
        """Positions right after each sync (where 'everything before is durable')."""
        return [e.seq + 1 for e in self.entries if e.kind == "sync"]

    def write_points(self) -> list[int]:
        return [e.seq + 1 for e in self.entries if e.kind == "write"]

    def states(self, positions: list[int], rng: random.Random,
               variants: tuple[str, ...] = ("drop", "keep", "random")) -> Iterator[CrashState]:
        """Crash states at ``positions`` (ascending), built in one pass over the log."""
        durable = [bytearray(img) for img in self.base]
        pending: list[list[LogEntry]] = [[] for _ in self.base]
        want = sorted(set(positions))
        wi = 0
        for pos in range(len(self.entries) + 1):
            while wi < len(want) and want[wi] == pos:
                for v in variants:
                    yield CrashState(pos, v, self._image(durable, pending, v, rng))
                wi += 1
            if pos == len(self.entries):
                break
            e = self.entries[pos]
            if e.kind in ("write", "discard"):
                pending[e.device].append(e)
            elif e.kind == "sync":
                for w in pending[e.device]:
                    _apply(durable[e.device], w)
                pending[e.device] = []

    @staticmethod
    def _image(durable: list[bytearray], pending: list[list[LogEntry]], variant: str,
               rng: random.Random) -> list[bytes]:
        out = []
        for dev, img in enumerate(durable):
            todo = pending[dev]
            if variant == "drop" or not todo:
                out.append(bytes(img))
                continue
            buf = bytearray(img)
            if variant == "keep":
                for w in todo:
                    _apply(buf, w)
            else:
                chosen = [w for w in todo if rng.random() < 0.5]
                rng.shuffle(chosen)
                for i, w in enumerate(chosen):
                    if i == len(chosen) - 1 and w.kind == "write" and len(w.data) > TORN_UNIT:
                        keep = rng.randrange(1, len(w.data) // TORN_UNIT) * TORN_UNIT
                        buf[w.offset:w.offset + keep] = w.data[:keep]
                    else:
                        _apply(buf, w)
            out.append(bytes(buf))
        return out


def _apply(img: bytearray, e: LogEntry) -> None:
    if e.kind == "write":
        img[e.offset:e.offset + len(e.data)] = e.data
    elif e.kind == "discard":
        img[e.offset:e.offset + e.length] = bytes(e.length)


# ---- per-byte oracles -----------------------------------------------------------------------
_NONZERO = bytes([0] + [1] * 255)


def mismatch(a: bytes, b: bytes) -> bytes:
    """One byte per position: 1 where ``a`` and ``b`` differ, 0 where they agree."""
    x = int.from_bytes(a, "little") ^ int.from_bytes(b, "little")
    return x.to_bytes(len(a), "little").translate(_NONZERO)


def mask_and(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(len(a),
                                                                               "little")


def mask_or(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a),
                                                                              "little")


def unexplained(got: bytes, allowed: list[bytes]) -> int:
    """Bytes of ``got`` that hold, at their position, the value of none of ``allowed``
    (each as long as ``got``): how many, or 0."""
    bad = mismatch(got, allowed[0])
    for a in allowed[1:]:
        bad = mask_and(bad, mismatch(got, a))
    return bad.count(1)
