"""Blocking device work run off the event loop: one thread per call, in parallel, under the
pool's write deadline; closing devices.

Invariants this module owns:

1. Nothing here blocks the trio event loop: every device call runs in a worker thread
   (DESIGN §4).
2. ``write_within`` waits for every call or its deadline, then raises the first
   DeviceError (DeviceHung for a call that did not finish in time); a hung call's thread
   is left to finish on its own (``records.writes_within``).
3. ``close_devices`` is shielded: a cancelled caller still releases the devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import trio

from pool import records
from pool.deadlines import Deadlines
from pool.device import Device

T = TypeVar("T")


async def run(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread."""
    return await trio.to_thread.run_sync(lambda: fn(*args))


async def write_within(calls: Sequence[tuple[Device, Callable[[], None]]],
                       what: str, dl: Deadlines) -> None:
    """Blocking writes, one per device, in parallel under the write deadline
    (``records.writes_within``); raises the first DeviceError (DeviceHung for a device
    that did not finish in time)."""
    errors = await trio.to_thread.run_sync(records.writes_within, calls, what, dl)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


async def close_devices(devices: Sequence[Device | None]) -> None:
    """Close devices, in parallel threads: a close waits (up to ``CLOSE_WAIT``) for a call
    still stuck in its device, which must not hold the event loop. Shielded: a cancelled
    caller (often why devices are being closed) still releases them."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for dev in devices:
                if dev is not None:
                    nursery.start_soon(partial(trio.to_thread.run_sync, dev.close))
