"""The record cache: verified logical blocks of recent small reads and writes, kept per
pool like ZFS's ARC (an LRU here), so that a hit costs no device read and no checksum.

The key is a block's map entry (``pool.state.ENTRY``: segment, offset, length, flags and
the record's hash). A record never changes where it lies (DESIGN invariant 3) and the
entry carries its checksum, so an entry always names the same bytes: nothing is ever
invalidated, entries only age out.

Invariants this module owns:

1. Only verified data goes in: callers ``put`` a record's payload after its checksum was
   verified (DESIGN invariant 4), or the very bytes a record was just made from (the
   writer's ``keep``, writer invariant 6), never bytes anyone may still change (``bytes``
   or a read-only ``memoryview`` of bytes nobody writes again).
2. After every ``put``, the bytes held are at most ``limit`` (a limit of 0 keeps nothing).
3. A ``put`` of a key already held changes nothing (not its data, not its age).
4. Eviction is least recently used first; a ``get`` that hits makes its entry the most
   recently used.
5. ``hits`` counts every ``get`` that returned data (maintenance reads it, through
   ``RecordReader.activity``, to tell whether the pool is idle).

A low module: it imports nothing from the pool (an import-linter contract keeps it from
importing ``pool.pool``).
"""

from __future__ import annotations

import os
from collections import OrderedDict


def default_limit() -> int:
    """1/16 of the machine's memory, between 64 MiB and 4 GiB (the daemon's cache.records
    setting overrides it)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        ram = 1 << 30
    return max(64 << 20, min(4 << 30, ram // 16))


class RecordCache:
    """An LRU of verified blocks keyed by map entry, holding at most ``limit`` bytes."""

    __slots__ = ("_bytes", "_data", "hits", "limit")

    def __init__(self, limit: int) -> None:
        self._data: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.limit = limit

    def get(self, key: bytes) -> bytes | memoryview | None:
        """The block kept under ``key`` (now the most recently used), or None."""
        hit = self._data.get(key)
        if hit is not None:
            self._data.move_to_end(key)
            self.hits += 1
        return hit

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        """Keep a verified block (invariants 1-3), evicting the least recently used."""
        cache = self._data
        if key in cache:
            return
        cache[key] = data
        self._bytes += len(data)
        while self._bytes > self.limit:
            _k, old = cache.popitem(last=False)
            self._bytes -= len(old)

    def drop(self, key: bytes) -> None:
        """Forget the block kept under ``key``, if any: one a write has just replaced."""
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= len(old)

    def clear(self) -> None:
        """Forget every block (``hits`` stays)."""
        self._data.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
