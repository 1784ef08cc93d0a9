"""The frozen values a pool reports about itself (``Pool.statistics``): per member and for
the whole pool. Shared by the facade (pool.pool) and the members (pool.members).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemberStatus:
    index: int
    uuid: str
    path: str
    state: str                # online | rebuilding | faulted | offline | missing | removed
    size: int
    extents: int
    free_extents: int
    read_errors: int = 0
    write_errors: int = 0
    checksum_errors: int = 0
    rebuild_segments: int = 0  # segments whose fragments on this member await a rebuild
    why: str = ""             # why it is away (faulted, left out at import), if it is


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    name: str
    uuid: str
    state: str                # online | degraded | failed
    profile: str
    extent_size: int
    members: tuple[MemberStatus, ...]
    capacity_bytes: int       # all extents of present members
    allocated_bytes: int      # extents held by segments
    free_bytes: int           # extents free now (excludes frees awaiting commit)
    live_bytes: int           # record bytes referenced, once per referencing map leaf
    reserved_bytes: int       # promised to buffered writes not yet written
    segments: int
    txg: int
    generation: int
    commits: int
    checkpoints: int
    records_written: int
    records_read: int
    degraded_reads: int
    repaired_fragments: int
    unreadable_records: int
    records_relocated: int
    rebuilt_bytes: int = 0
    scrubbed_bytes: int = 0
    discarded_extents: int = 0   # freed extents handed to the devices' discard
