"""What a device *is*, as opposed to the path it was named by (issue 20 item 5).

Two paths name the same device when they lead to the same inode (a symlink such as
/dev/disk/by-id/..., a hard link, ``./a.img`` and ``a.img``) or the same block device
number. Members are compared by this identity, never by path, wherever a device joins a
pool: create, add, replace, import.

Invariants:

1. A pool never holds one device twice: ``Pool.create``, ``add_device`` and
   ``replace_device`` refuse a device whose identity is that of another one given or of a
   current member (present or parked), before anything is written.
2. Identity is taken from the open descriptor (``fstat``), so it is what the pool reads
   and writes, even if the path is changed afterwards; a member whose path leads elsewhere
   later is caught by ``FileDevice.vanished``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from pool.device import Device

Identity = tuple[str, int, int]   # ("file", st_dev, st_ino) or ("block", st_rdev, 0)
D = TypeVar("D", bound=Device)


def identity_of(dev: object) -> Identity | None:
    """The identity of a device, seen through wrappers (``faults``' devices keep theirs in
    ``inner``); None for one without (a RAM disk)."""
    seen = 0
    while dev is not None and seen < 8:
        ident = getattr(dev, "identity", None)
        if isinstance(ident, tuple):
            return ident
        dev = getattr(dev, "inner", None)
        seen += 1
    return None


def first_duplicate(devices: Iterable[D]) -> tuple[D, D] | None:
    """The first two devices that are the same device, in the order given; else None."""
    seen: dict[Identity, D] = {}
    for dev in devices:
        ident = identity_of(dev)
        if ident is None:
            continue
        if ident in seen:
            return seen[ident], dev
        seen[ident] = dev
    return None


def describe(ident: Identity) -> str:
    kind, a, b = ident
    if kind == "block":
        return f"block device {os.major(a)}:{os.minor(a)}"
    return f"inode {b} on device {os.major(a)}:{os.minor(a)}"
