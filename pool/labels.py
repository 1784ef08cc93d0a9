"""Member labels on a device: write, read (primary or backup copy), wipe, and the
refusals made before a device is labelled (blocking helpers: run them in a thread).

Invariants this module owns (DESIGN invariants cited in brackets):

1. A label is written in two identical copies, at offset 0 and at the labelled size minus
   ``LABEL_SIZE`` (``write_label``) [5].
2. A label is read from the primary copy, else the backup; a copy that fails its checksum
   (``Label.decode``) is never used, and a device shorter than its label says is refused
   as truncated (``read_label``) [4].
3. A device carrying a storaged label is not labelled again unless the operator forces it
   (``refuse_labelled``), and two paths to one device are refused
   (``refuse_same_device``, pool.identity) [9].
4. ``wipe`` clears both label copies, the superblock ring and the owner record, so a
   wiped device never imports as a member; ``wipe_quietly`` never raises [10].
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import partial

import trio

from pool import identity, records
from pool import owner as owners
from pool.deadlines import Deadlines
from pool.device import Device
from pool.devio import write_within
from pool.errors import DeviceError, ImportFailed, InvalidArgument, StorageError
from pool.layout import LABEL_SIZE, SB_OFFSET, SB_SLOT_SIZE, SB_SLOTS, Label

log = logging.getLogger(__name__)


def check_name(name: str) -> None:
    """Refuse a pool name that is not 1-64 letters, digits, '_', '.', '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise InvalidArgument(f"invalid pool name {name!r}: use 1-64 letters, digits, "
                              f"'_', '.', '-', starting with a letter or digit")


def write_label(dev: Device, label: Label) -> None:
    """Both copies of ``label`` (invariant 1); not synced."""
    raw = label.encode()
    dev.pwrite(0, raw)
    dev.pwrite(label.device_size - LABEL_SIZE, raw)


def label_copies(dev: Device, dl: Deadlines, size: int | None = None
                 ) -> list[tuple[str, Label | str]]:
    """Both label copies of a device: ("primary" | "backup", the label or what is wrong).
    ``size``: where the backup is (the labelled size); default the device's size."""
    out: list[tuple[str, Label | str]] = []
    end = dev.size if size is None else size
    for where, off in (("primary", 0), ("backup", end - LABEL_SIZE)):
        try:
            out.append((where, Label.decode(records.pread_within(dev, off, LABEL_SIZE, dl))))
        except DeviceError as e:
            out.append((where, e.message))
    return out


def read_label(dev: Device, dl: Deadlines) -> Label:
    """The device's label, from the primary copy or else the backup at the end."""
    errors = []
    for where, label in label_copies(dev, dl):
        if isinstance(label, str):
            errors.append(f"{where}: {label}")
            continue
        if label.device_size > dev.size:
            raise ImportFailed(f"{dev.path} is truncated: its label says {label.device_size} "
                               f"bytes but the device has {dev.size}")
        return label
    raise ImportFailed(f"{dev.path} is not a storaged pool member ({'; '.join(errors)})")


def refuse_labelled(devices: Sequence[Device], dl: Deadlines) -> None:
    """Refuse the first device that carries a readable label (invariant 3)."""
    for dev in devices:
        try:
            label = read_label(dev, dl)
        except ImportFailed:
            continue
        raise InvalidArgument(f"{dev.path} is already member {label.index} of pool "
                              f"{label.pool_name!r} ({label.pool_uuid}); destroy that pool "
                              f"first")


def refuse_same_device(devices: Sequence[Device],
                       error: type[StorageError] = InvalidArgument) -> None:
    """Refuse two paths to one device (pool.identity, invariant 1)."""
    dup = identity.first_duplicate(devices)
    if dup is not None:
        a, b = dup
        ident = identity.identity_of(a)
        assert ident is not None
        raise error(f"{a.path} and {b.path} are the same device "
                    f"({identity.describe(ident)}): give each device once")


def wipe(dev: Device) -> None:
    """Wipe a device's labels and superblocks (blocking); its data is not zeroed."""
    dev.pwrite(0, bytes(LABEL_SIZE))
    dev.pwrite(SB_OFFSET, bytes(SB_SLOTS * SB_SLOT_SIZE))
    dev.pwrite(owners.OWNER_OFFSET, bytes(owners.OWNER_SIZE))
    dev.pwrite(dev.size - LABEL_SIZE, bytes(LABEL_SIZE))
    dev.sync()


async def wipe_quietly(dev: Device, dl: Deadlines) -> None:
    """Wipe a detached device's labels and superblocks (it must not pass for a member),
    then close it. A device that is gone, or hangs (often why it was replaced), cannot
    be wiped, which is fine: the pool no longer counts it as a member either way."""
    try:
        await write_within([(dev, partial(wipe, dev))], "wiping the label", dl)
    except DeviceError as e:
        log.warning("could not wipe the label of %s: %s", dev.path, e.message)
    # close waits (boundedly) for a call still stuck in the device: not on the loop.
    await trio.to_thread.run_sync(dev.close)
