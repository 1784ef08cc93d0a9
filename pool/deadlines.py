"""How long a pool waits for a member before giving it up: the one live part of a pool's
tuning (storaged.service.LIVE_KEYS: a SIGHUP reload changes it on every open pool).

Invariants:
1. Each pool holds its own ``Deadlines`` (``Pool.deadlines``, the same object its
   MetaStore reads), built from its ``PoolTuning``; two pools in one process can differ,
   and changing one pool's deadlines changes no other pool's.
2. Every device read or write with a deadline reads it from the ``Deadlines`` handed to
   it, when the call starts: a change applies to calls started after it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_READ = 30.0
DEFAULT_WRITE = 120.0


@dataclass(slots=True)
class Deadlines:
    """``read``: seconds a device read may take before its fragment counts as missing
    (config faults.read_timeout); ``write``: seconds a write or sync may take before its
    member is faulted (faults.write_timeout). None waits for ever."""

    read: float | None = DEFAULT_READ
    write: float | None = DEFAULT_WRITE
