"""What a pool is tuned with, handed to ``Pool.create``/``Pool.open`` (the daemon builds it
from the configuration, storaged.registry passes it on), instead of module globals a
caller assigns: so two pools in one process can be tuned differently.

A ``PoolTuning`` is a frozen value, read by the pool when it is built; none of its keys is
live (a change takes a restart, or a re-import of the pool: storaged.service.LIVE_KEYS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pool import readcache


@dataclass(frozen=True, slots=True)
class PoolTuning:
    """``discard_freed``: discard freed extents on the devices (config ``discard``).
    ``record_cache``: bytes of verified blocks of small reads kept, like ZFS's ARC (a hit
    costs no device read and no checksum; 0 turns the cache off; config cache.records)."""

    discard_freed: bool = True
    record_cache: int = field(default_factory=readcache.default_limit)
