"""What a pool is tuned with, handed to ``Pool.create``/``Pool.open`` (the daemon builds it
from the configuration, storaged.registry passes it on), instead of module globals a
caller assigns: so two pools in one process can be tuned differently.

A ``PoolTuning`` is a frozen value, read by the pool when it is built; its keys are not
live (a change takes a restart, or a re-import of the pool: storaged.service.LIVE_KEYS),
except the deadlines: ``read_timeout``/``write_timeout`` only seed the pool's own mutable
``Deadlines`` (pool.deadlines), which a reload changes in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pool import readcache
from pool.deadlines import DEFAULT_READ, DEFAULT_WRITE, Deadlines


@dataclass(frozen=True, slots=True)
class PoolTuning:
    """``discard_freed``: discard freed extents on the devices (config ``discard``).
    ``record_cache``: bytes of verified blocks of small reads kept, like ZFS's ARC (a hit
    costs no device read and no checksum; 0 turns the cache off; config cache.records).
    ``read_timeout``/``write_timeout``: the first ``Deadlines`` of the pool (config
    faults.read_timeout/write_timeout; None waits for ever)."""

    discard_freed: bool = True
    record_cache: int = field(default_factory=readcache.default_limit)
    read_timeout: float | None = DEFAULT_READ
    write_timeout: float | None = DEFAULT_WRITE

    def deadlines(self) -> Deadlines:
        """A new ``Deadlines`` with these values, for one pool (deadlines invariant 1)."""
        return Deadlines(self.read_timeout, self.write_timeout)
