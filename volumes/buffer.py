"""A volume's write buffer: the buffered blocks, their space reservations, the partial-block
patching under per-block locks, and the writeback of batches to the pool.

``Volume`` (volumes/volume.py) composes one ``VolumeBuffer`` and keeps the request paths
(reads, ``write``, ``write_nowait``, zeroing, flush); this module is what they call to
buffer a block and to write the buffer back. The concurrency rules are W1-W9 of
docs/INTERNALS.md ("Write buffer concurrency"), the space rules S1-S6 ("Space"); each is
cited where it is enforced.

Invariants (tests cite them as "buffer invariant N"):

1. ``dirty``, ``inflight``, ``locks`` and ``no_lz4`` are never rebound, only changed in
   place: the volume holds them under its own names for its fast paths (W8), which must
   not pay a call or an attribute hop per request.
2. ``dirty_blocks`` is the number of blocks in ``dirty`` holding data (not a hole), each
   with one reservation of ``cost`` in the pool (S4), and ``write_buffer.used`` counts
   them in bytes; every change goes through the ``dirty_data`` setter, which keeps both
   and ``since`` in step.
3. ``inflight`` is non-empty only while the holder of ``wb_lock`` writes it back (W2); it
   is filled from ``dirty`` in the step that empties ``dirty`` (W3).
4. ``syncing`` counts the data blocks a flush or an age writeback took from ``dirty``
   whose commit has not returned (W9); ``dirty_bytes`` is ``dirty_blocks + syncing``.
5. ``map_id`` and ``size`` mirror the volume's record: ``Volume._store`` is the only
   writer of both.
6. A block's lock exists in ``locks`` only while a partial write of it reads the block
   (read-modify-write) or waits to; its last waiter removes it.
7. A bytearray block that leaves ``dirty`` for a writeback is never changed again: partial
   writes patch in place only what ``dirty`` holds (``base_now``), and a writeback that
   fails puts copies back. So the pool may keep it, as written, in its record cache
   (``write_blocks(keep=...)``: the read-modify-write results of small writes, which
   are likely read again; whole blocks written from the caller's bytes are not kept).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from pool.pool import Pool
from pool.profile import Profile

if TYPE_CHECKING:
    from volumes.volume import WriteBuffer

log = logging.getLogger(__name__)

_MISSING = object()
# A buffered block's content: bytes or a view of immutable bytes (a full block written from
# them, kept without a copy), or a bytearray the volume owns (a read-modify-write result,
# patched in place by later partial writes while it is buffered).
Block = bytes | bytearray | memoryview


class VolumeBuffer:
    """The write buffer of one volume (see the module's invariants)."""

    def __init__(self, pool: Pool, *, map_id: int, size: int, block_size: int,
                 profile: Profile, compression: bool, write_buffer: WriteBuffer) -> None:
        self.pool = pool
        self.map_id = map_id             # invariant 5
        self.size = size
        self.block_size = block_size
        self.profile = profile
        self.compression = compression
        # The budget this volume's unflushed writes count against (its manager's).
        self.write_buffer = write_buffer
        # Set by a writer that writes each block once, in one pass (a receive): the buffer
        # then cannot absorb rewrites, so writeback starts at WRITEBACK_MIN and overlaps
        # the rest of the stream instead of waiting for the flush.
        self.streaming = False
        self.deleted = False
        self.zero = bytes(block_size)
        self.cost = pool.record_cost(block_size, profile)
        # Two layers over the map, newest first: dirty (new writes) and inflight (the
        # batch the holder of wb_lock is writing back), W1.
        self.dirty: dict[int, Block | None] = {}
        self.inflight: dict[int, Block | None] = {}
        self.dirty_blocks = 0            # invariant 2
        # Blocks in dirty whose writer knew they do not compress (write compressible=
        # False): writeback stores them without trying lz4.
        self.no_lz4: set[int] = set()
        self.since: float | None = None  # monotonic time dirty got its first data
        self.syncing = 0                 # invariant 4
        self.locks: dict[int, trio.Lock] = {}
        self.wb_lock = trio.Lock()

    # ---- accounting -----------------------------------------------------------------------
    @property
    def dirty_data(self) -> int:
        return self.dirty_blocks

    @dirty_data.setter
    def dirty_data(self, n: int) -> None:
        self.write_buffer.used += (n - self.dirty_blocks) * self.block_size
        if not n:
            self.since = None
        elif not self.dirty_blocks:
            self.since = time.monotonic()
        self.dirty_blocks = n

    def age(self) -> float:
        """Seconds since the oldest data in the buffer arrived (0 when it has none)."""
        since = self.since
        return 0.0 if since is None else time.monotonic() - since

    def threshold(self, buffered: int) -> int:
        return self.write_buffer.threshold(buffered, streaming=self.streaming)

    def discard(self) -> None:
        """Forget buffered writes (the volume is deleted or rolled back)."""
        self.pool.unreserve(self.dirty_data * self.cost)
        self.dirty.clear()
        self.dirty_data = 0
        self.syncing = 0
        self.no_lz4.clear()

    # ---- the layers -----------------------------------------------------------------------
    def held(self, b: int) -> tuple[bool, Block | None]:
        """Whether the buffer holds block ``b`` (newest layer first: the buffer, the
        writeback under way; rule W2) and its content there (None: a hole)."""
        for layer in (self.dirty, self.inflight):
            if b in layer:
                return True, layer[b]
        return False, None

    def buffered(self, b: int) -> bytearray | None:
        """A copy of block ``b`` from the buffer, or None when only the pool has it."""
        held, v = self.held(b)
        if not held:
            return None
        return bytearray(self.zero if v is None else v)

    def overlay(self, mapped: set[int], first: int, end: int) -> None:
        """Apply the buffered blocks in [first, end) to ``mapped``, the map's data blocks
        (oldest layer first, so the newest wins)."""
        for layer in (self.inflight, self.dirty):
            for b, v in layer.items():
                if first <= b < end:
                    if v is None:
                        mapped.discard(b)
                    else:
                        mapped.add(b)

    def mapped_count(self) -> int:
        """Blocks that hold data, buffered ones included: the map's leaf counts and a
        lookup per buffered block."""
        n = self.pool.mapped_count(self.map_id)
        final: dict[int, bool] = {}
        for layer in (self.inflight, self.dirty):   # newest last
            for b, v in layer.items():
                final[b] = v is not None
        if final:
            present = self.pool.mapped_among(self.map_id, final)
            n += sum(1 for b, data in final.items() if data and b not in present)
            n -= sum(1 for b, data in final.items() if not data and b in present)
        return n

    def whole(self, b: int, lo: int, hi: int) -> bool:
        """Whether bytes ``lo:hi`` of block ``b`` are all of it (the last block of a volume
        whose size is not a multiple of the block size is whole up to the end)."""
        bs = self.block_size
        return lo == 0 and (hi == bs or (b == (self.size - 1) // bs
                                         and b * bs + hi == self.size))

    # ---- buffering a block ----------------------------------------------------------------
    def put(self, b: int, content: Block, reserved: int, holes: bool = True) -> int:
        """Buffer a block's new content; returns how many reservations it consumed.

        An all-zero block becomes a hole (DESIGN invariant 6) unless ``holes`` is False."""
        # (startswith: a fast compare for views too; content is a whole block)
        new: Block | None = None if holes and self.zero.startswith(content) else content
        old = self.dirty.get(b, _MISSING)
        had_data = old is not _MISSING and old is not None
        used = 0
        if new is not None and not had_data:
            if reserved > 0:
                used = 1
            else:   # (``update`` reserves first: only a ``write_nowait`` bug gets here)
                self.pool.reserve(self.cost, self.profile)
            self.dirty_data += 1
        elif new is None and had_data:
            self.dirty_data -= 1
            self.pool.unreserve(self.cost)
        self.dirty[b] = new
        self.no_lz4.discard(b)
        return used

    def put_whole(self, first: int, view: memoryview, keep: bool, reserved: int) -> None:
        """``put`` of each whole block of ``view`` from block ``first`` on (no block lock
        held, checked by the caller), in one pass: what ``put_on`` does per block for a
        whole-block write, with the counts settled once. ``reserved`` is the number of
        those blocks the buffer holds no data for (each reserved by the caller, rule S4);
        what the blocks do not use goes back."""
        bs = self.block_size
        dirty = self.dirty
        zero = self.zero
        added = removed = 0
        pos = 0
        for b in range(first, first + len(view) // bs):
            chunk: Block = view[pos:pos + bs] if keep else bytes(view[pos:pos + bs])
            pos += bs
            # An all-zero block becomes a hole (DESIGN invariant 6).
            if zero.startswith(chunk):
                if dirty.get(b) is not None:
                    removed += 1
                dirty[b] = None
            else:
                if dirty.get(b) is None:
                    added += 1
                dirty[b] = chunk
        if self.no_lz4:
            self.no_lz4.difference_update(range(first, first + len(view) // bs))
        if added != removed:
            self.dirty_data += added - removed
        unused = reserved - added + removed
        if unused:
            self.pool.unreserve(unused * self.cost)

    def needs_space(self, b: int, base: bytearray | bool, lo: int, hi: int, chunk: Block,
                    holes: bool) -> bool:
        """Whether buffering ``chunk`` at ``lo:hi`` of block ``b`` on ``base`` (as
        ``put_on`` would) makes the buffer hold data for a block it holds none for: that
        takes a reservation (rule S4)."""
        if self.dirty.get(b) is not None or not holes:
            return self.dirty.get(b) is None
        zero = self.zero
        if not zero.startswith(chunk):
            return True
        return isinstance(base, bytearray) and not (zero.startswith(base[:lo])
                                                     and zero.startswith(base[hi:]))

    def base_now(self, b: int, lo: int, hi: int) -> bytearray | bool:
        """What buffering bytes ``lo:hi`` of block ``b`` starts from, when that needs no
        wait: True for a whole block (nothing), the buffer's own bytearray of the block
        (patched in place: no writeback holds it, those take the whole buffer), or a copy
        of the block from the buffer or, without a device wait, from the pool (a hole, the
        record cache, page-cached fragments). False when it needs a wait: the block's lock
        is held (invariant 6), or the pool must read."""
        if b in self.locks:
            return False
        if self.whole(b, lo, hi):
            return True
        mine = self.dirty.get(b)
        if type(mine) is bytearray:
            return mine
        base = self.buffered(b)
        if base is not None:
            return base
        # A block the pool's record cache holds (the commonest base of a small write: the
        # blocks small writes made are kept there as they are written back): the new buffer
        # is one copy of it, with no zero-filling and no read to plan.
        hit = self.pool.cached_block(self.map_id, b)
        if hit is not None and len(hit) == self.block_size:
            return bytearray(hit)
        # Page-cached raw records are read and checked straight into the new buffer.
        base = bytearray(self.block_size)
        if self.pool.read_blocks_into_nowait(self.map_id, [b], self.block_size,
                                             [memoryview(base)]):
            return base
        got = self.pool.read_blocks_nowait(self.map_id, [b], self.block_size)
        if got is None:
            return False
        base[:] = self.zero if got[0] is None else got[0]   # (the failed try left anything)
        return base

    def put_on(self, base: bytearray | bool, b: int, lo: int, hi: int, chunk: Block,
               reserved: int, holes: bool, keep: bool) -> int:
        """Buffer the span on what ``base_now`` gave; returns the reservations used."""
        if isinstance(base, bytearray):
            base[lo:hi] = chunk
            return self.put(b, base, reserved, holes)
        content: Block = ((chunk if keep else bytes(chunk)) if hi == self.block_size
                          else bytes(chunk) + self.zero[hi:])
        return self.put(b, content, reserved, holes)

    async def current(self, b: int) -> bytearray:
        """A copy of a block's present content (under its lock), to patch."""
        while True:
            base = self.buffered(b)
            if base is not None:
                return base
            base = bytearray(self.block_size)
            map_id = self.map_id
            await self.pool.read_blocks_into(map_id, [b], self.block_size,
                                             [memoryview(base)])
            if self.map_id == map_id:
                return base
            # A rollback or receive replaced the map meanwhile (rule W7): patch the new one.

    async def update(self, spans: list[tuple[int, int, int]], piece: Any, *, reserve: bool,
                     holes: bool = True, keep: bool = False) -> None:
        """Buffer ``piece(lo, hi, pos)`` on each span (block, lo, hi) of a write."""
        # Reserve space for every block up front, so a full pool fails the write before it
        # changes anything (DESIGN invariant 8) and a buffered write can always be written back
        # (rule S4); a reservation that does not fit makes room first (rule S3). Blocks
        # buffered now are counted too: a writeback may take them while this write waits
        # for a block's lock, and a reservation that failed half-way would leave the write
        # half done. What is not used goes back at the end. Zeroing needs none for whole
        # blocks (they become holes), so trim works on a full pool; the partial blocks it
        # rewrites (two at most) reserve from the zeroing reserve (rule S2).
        if reserve:
            need = len(spans)
        else:
            need = sum(1 for b, lo, hi in spans if not self.whole(b, lo, hi))
        pool = self.pool
        if need:
            if reserve:
                pool.check_writable(self.profile)
            await pool.reserve_wait(need * self.cost, self.profile, zeroing=not reserve)
        reserved = need
        try:
            pos = 0
            for b, lo, hi in spans:
                chunk = piece(lo, hi, pos)
                pos += hi - lo
                while True:
                    base = self.base_now(b, lo, hi)
                    if base is False:
                        break
                    if reserved or not self.needs_space(b, base, lo, hi, chunk, holes):
                        reserved -= self.put_on(base, b, lo, hi, chunk, reserved, holes, keep)
                        break
                    # The block newly holds data and no reservation is left for it (a
                    # zeroed partial block, or a writeback took the buffered block this
                    # write counted on): reserve one, then look at the block again.
                    await pool.reserve_wait(self.cost, self.profile, zeroing=not reserve)
                    reserved += 1
                if base is not False:
                    continue
                lock = self.locks.setdefault(b, trio.Lock())
                try:
                    async with lock:
                        base = await self.current(b)
                        base[lo:hi] = chunk
                        if not reserved and self.needs_space(b, True, 0, self.block_size,
                                                             base, holes):
                            await pool.reserve_wait(self.cost, self.profile,
                                                    zeroing=not reserve)
                            reserved += 1
                        reserved -= self.put(b, base, reserved, holes)
                finally:
                    if self.locks.get(b) is lock and not lock.statistics().tasks_waiting:
                        del self.locks[b]
        finally:
            pool.unreserve(reserved * self.cost)

    # ---- writeback ------------------------------------------------------------------------
    async def maybe_writeback(self) -> None:
        """Past the volume's share of the write buffer (WriteBuffer.threshold), write the
        buffer back. While a writeback is under way, writers go on buffering up to twice
        that (double buffering: the next batch fills while the last one is written), and
        only then wait for it."""
        buffered = self.dirty_data * self.block_size
        limit = self.threshold(buffered)
        if buffered < limit:
            return
        if self.wb_lock.locked() and buffered < 2 * limit:
            return
        async with self.wb_lock:
            buffered = self.dirty_data * self.block_size
            if buffered >= self.threshold(buffered):
                await self.write_dirty()

    async def write_back(self, *, commit_next: bool = False) -> int:
        """``Volume.write_back``. One pass under the lock (rule W4): whatever was
        acknowledged before the call is, once the lock is ours, in the map or in ``dirty``
        (the previous holder's batch is in the map, or back in ``dirty`` if it failed), so
        writes that keep arriving meanwhile never hold a flush or a snapshot up."""
        async with self.wb_lock:
            return await self.write_dirty(commit_next=commit_next)

    def durable(self, blocks: int) -> None:
        """The commit after ``write_back(commit_next=True)`` returned (rule W9)."""
        self.syncing = max(0, self.syncing - blocks)

    async def write_dirty(self, *, commit_next: bool = False) -> int:
        """Write out the whole of ``dirty`` (the caller holds the writeback lock);
        returns the data blocks now counted in ``syncing`` (``commit_next`` only)."""
        if not self.dirty:
            return 0
        batch = self.inflight            # empty: only the lock's holder fills it (inv. 3)
        batch.update(self.dirty)
        self.dirty.clear()
        data_blocks, self.dirty_data = self.dirty_data, 0
        syncing = data_blocks if commit_next else 0
        self.syncing += syncing          # in the same step as they leave dirty (W9)
        try:
            await self._write_out(batch, data_blocks)
        except BaseException:
            self.syncing -= syncing      # back in dirty (W6), or dropped with the volume
            raise
        return syncing

    async def writeback_then(self, action: Callable[[], None], *,
                             write_back: bool = True) -> None:
        """``Volume.writeback_then`` (rule W5). The buffer is taken once the writeback lock
        is ours, never before: a batch taken earlier could be written over newer blocks
        that the lock's holder writes meanwhile (rule W3). A free lock is taken without
        yielding, so then the cut is at the call; while it is held, writes called during
        the wait may land on either side of ``action`` (DESIGN invariant 7 allows it). Writes
        called after it returns are never seen by ``action``."""
        try:
            self.wb_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.wb_lock.acquire()
        try:
            if write_back:
                await self.write_dirty()
            action()
        finally:
            self.wb_lock.release()

    async def _write_out(self, batch: dict[int, Block | None], data_blocks: int) -> None:
        """Write ``batch`` (``inflight``, holding ``data_blocks`` reservations) to the pool
        as records; the caller holds the writeback lock. On failure (or cancellation) the
        batch returns to the buffer, except blocks overwritten since: ``dirty`` is the only
        layer newer than ``inflight``, so nothing newer is ever shadowed by what is put
        back (W6)."""
        raw = self.no_lz4 & batch.keys()
        self.no_lz4 -= raw               # (in place: invariant 1)
        try:
            # One pool call for the whole batch: the pool pipelines it (encoding the
            # next part in threads while the last one is written: pool/writer.py).
            await self.pool.write_blocks(self.map_id, self.profile, self.compression,
                                         sorted(batch.items()), raw=raw,
                                         keep={b for b, v in batch.items()
                                               if type(v) is bytearray})
        except BaseException:
            if self.deleted:
                # Deleted meanwhile (its buffer was discarded): nothing to put back.
                self.pool.unreserve(data_blocks * self.cost)
                raise
            # Nothing acknowledged is dropped: put back what was not overwritten.
            for b, v in batch.items():
                if b in self.dirty:
                    if v is not None:
                        self.pool.unreserve(self.cost)
                else:
                    # A copy: the pool may keep the one it was given (invariant 7).
                    self.dirty[b] = bytearray(v) if type(v) is bytearray else v
                    if v is not None:
                        self.dirty_data += 1
                    if b in raw:
                        self.no_lz4.add(b)
            raise
        finally:
            batch.clear()
        self.pool.unreserve(data_blocks * self.cost)


__all__ = ["Block", "VolumeBuffer"]
