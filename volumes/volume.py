"""Thin volumes: the Volume API that every frontend (NBD, iSCSI, FUSE) calls.

A volume is a virtual size cut into blocks (default 64 KiB); each block is either a hole
(reads as zeros, takes no space) or a record in the pool. Writes land in a per-volume write
buffer and are acknowledged from there, like a disk's volatile write cache (DESIGN §4);
``flush`` writes the buffer out as records and commits the pool, after which every write
acknowledged before the flush was called is durable (invariant 1). A FUA write is durable
when it returns.

Concurrency: all methods may be called concurrently. A write that covers part of a block
reads the block, patches it and puts it back under that block's lock, so concurrent
overlapping writes never lose each other's bytes; whole-block writes take no lock unless a
partial write of the same block is in progress. The write buffer's layers, the writeback
lock and the order in which flushes, snapshots, receives and background writebacks
interleave follow the rules W1-W9 of docs/INTERNALS.md ("Write buffer concurrency").

Composed parts: the write buffer (its layers, reservations, read-modify-write and
writeback) is ``VolumeBuffer`` in volumes/buffer.py; how a read's blocks become its answer
is volumes/readshape.py; QoS limits and weights are volumes/qos.py. This class keeps the
request paths, whose fast paths (``read_sparse_nowait``, ``read_vectored_nowait``,
``write_nowait``) use the buffer's dicts under their own names (buffer invariant 1).
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, overload

import trio

from pool.errors import InvalidArgument, NoSpace, NotFound, ReadOnly, StorageError
from pool.pool import Pool
from pool.profile import Profile
from volumes.buffer import Block, VolumeBuffer
from volumes.capabilities import Capabilities
from volumes.openers import Openers
from volumes.qos import (
    READ,
    WRITE,
    QosSettings,
    Throttle,
    ThrottleStatistics,
    WeightedDispatcher,
)
from volumes.readshape import Piece, buffers, runs
from volumes.records import ReceiveState, VolumeRecord

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger(__name__)

MIN_BLOCK = 4096
MAX_BLOCK = 1024 * 1024
DEFAULT_BLOCK = 64 * 1024
WRITEBACK_MIN = 32 * 1024 * 1024     # every volume may buffer this much before writeback
WEIGHT_IO_BYTES = 256 * 1024         # a request's weighted cost: 1 + its bytes / this


def _default_write_buffer() -> int:
    """1/16 of the machine's memory, between 64 MiB and 1 GiB (the daemon's
    cache.write_buffer setting overrides it)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        ram = 1 << 30
    return max(64 << 20, min(1 << 30, ram // 16))


class WriteBuffer:
    """The memory all volumes of the process may fill with acknowledged, unflushed writes
    (DESIGN §4), like the kernel's dirty page limit or ZFS's dirty data maximum.

    A volume writes its buffer back to the pool once it holds more than what the others
    leave of ``limit`` (and never later than at WRITEBACK_MIN when they leave less). So a
    working set that fits is rewritten in memory and reaches the devices once, at the next
    flush, instead of once per rewrite; a stream fills the buffer, then is written back in
    large batches while the next part fills (double buffering)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit if limit is not None else _default_write_buffer()
        self.used = 0                 # bytes of data blocks buffered by all volumes

    def threshold(self, own: int, *, streaming: bool = False) -> int:
        """Bytes a volume buffering ``own`` bytes may hold before writing back (a
        ``streaming`` one: WRITEBACK_MIN, see ``Volume.streaming``)."""
        if streaming:
            return WRITEBACK_MIN
        return max(WRITEBACK_MIN, self.limit - (self.used - own))


# The budget of managers not handed one (tests, benchmarks, tools); the daemon builds its
# own from cache.write_buffer and hands it to every pool's VolumeManager.
WRITE_BUFFER = WriteBuffer(_default_write_buffer())


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of a volume's address space that is all data or all hole."""

    offset: int
    length: int
    allocated: bool


LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class Latency:
    """A histogram of request latencies: counts per LATENCY_BUCKETS upper bound (not
    cumulative; the last count is for slower than the last bound), their sum and count."""

    counts: tuple[int, ...]
    sum_seconds: float
    count: int


class _LatencyRecorder:
    __slots__ = ("counts", "n", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def snapshot(self) -> Latency:
        return Latency(tuple(self.counts), self.total, self.n)


@dataclass(frozen=True, slots=True)
class VolumeStatistics:
    name: str
    size: int
    block_size: int
    profile: str
    compression: bool
    read_only: bool
    mapped_bytes: int      # logical bytes of blocks that hold data (committed or buffered)
    stored_bytes: int      # device bytes of the volume's records (all fragments)
    unique_bytes: int      # of those, held only by this volume (not shared with snapshots)
    dirty_bytes: int       # buffered bytes not yet written to the pool, and those a flush
                           # wrote whose commit has not returned (rule W9)
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    flushes: int
    trims: int
    latency: tuple[tuple[str, Latency], ...] = ()   # ("read" | "write" | "flush", ...)


class Volume:
    """One thin volume. Obtain it from ``VolumeManager``; never construct it directly."""

    def __init__(self, pool: Pool, obj_id: int, record: VolumeRecord,
                 write_buffer: WriteBuffer | None = None) -> None:
        self._pool = pool
        self._obj_id = obj_id
        self._record = record
        self._map: int = record.map
        self.name: str = record.name
        self.size: int = record.size
        self.block_size: int = record.block_size
        self.profile = Profile.parse(record.profile)
        self.compression: bool = record.compression
        self.read_only = False
        # The frontends' clients of this volume (volumes/openers.py); a snapshot's views
        # share their snapshot's (the manager sets it).
        self.openers = Openers()
        # The write buffer (volumes/buffer.py, rules W1-W9); its layers and block locks
        # under our own names too, for the fast paths (buffer invariant 1).
        self._buf = buf = VolumeBuffer(
            pool, map_id=record.map, size=record.size, block_size=self.block_size,
            profile=self.profile, compression=self.compression,
            write_buffer=write_buffer if write_buffer is not None else WRITE_BUFFER)
        self._dirty, self._inflight = buf.dirty, buf.inflight
        self._locks, self._no_lz4 = buf.locks, buf.no_lz4
        self._zero = buf.zero
        self._zero_view = memoryview(self._zero)
        self._deleted = False
        self._stats = dict.fromkeys(("reads", "writes", "bytes_read", "bytes_written",
                                     "flushes", "trims"), 0)
        self._latency = {op: _LatencyRecorder() for op in ("read", "write", "flush")}
        # QoS (volumes/qos.py): the volume's own Throttle (kept while limits change, so its
        # levels carry over) and what requests wait on: its own when it has limits, then
        # its group's. Empty when nothing limits it (qos invariant 4).
        self.qos = QosSettings()
        self._throttle: Throttle | None = None
        self._throttles: tuple[Throttle, ...] = ()
        self._qos_waits: list[Any] = [0.0, 0, 0]   # ThrottleStatistics' fields
        # Weights under contention: the pool's dispatcher (the manager hands every volume
        # its pool's; a volume made alone has its own), the weight and the finish tag.
        self.dispatcher = WeightedDispatcher()
        self.weight = self.qos.weight
        self.finish_tag = 0.0
        self.set_qos(record.qos)

    def set_qos(self, settings: QosSettings, group: Throttle | None = None) -> None:
        """Apply QoS settings (and the group's shared Throttle) at once, to waiting
        requests too (qos invariant 3). The manager stores them."""
        self.qos = settings
        self.weight = settings.weight
        if self._throttle is None:
            if settings.limited:
                self._throttle = Throttle(settings)
        else:
            self._throttle.configure(settings)
        own = self._throttle if settings.limited else None
        self._throttles = tuple(t for t in (own, group) if t is not None)

    def store_qos(self, settings: QosSettings, group: Throttle | None = None) -> None:
        """Store new QoS settings in the volume's record (part of the next commit) and
        apply them at once."""
        self._store(replace(self._record, qos=settings))
        self.set_qos(settings, group)

    def throttle_statistics(self) -> ThrottleStatistics:
        """Time this volume's requests spent waiting for its limits and its group's
        (summed over requests), how many had to wait, and how many wait now."""
        return ThrottleStatistics(*self._qos_waits)

    async def _slot(self, nbytes: int) -> WeightedDispatcher:
        """Wait for one of the pool dispatcher's slots (weights, qos invariants 6-7),
        for a request of ``nbytes`` bytes plus one IO; the caller releases it.
        (Requests take a free slot inline first: no coroutine when one is free.)"""
        d = self.dispatcher
        await d.acquire(self, 1 + nbytes / WEIGHT_IO_BYTES)
        return d

    async def _admit(self, op: int, nbytes: int) -> None:
        throttles = self._throttles
        i = 0
        while i < len(throttles) and throttles[i].try_admit(op, nbytes):
            i += 1
        if i == len(throttles):
            return
        start = trio.current_time()
        w = self._qos_waits
        w[2] += 1
        try:
            for t in throttles[i:]:
                await t.admit(op, nbytes)
        finally:
            w[2] -= 1
            waited = trio.current_time() - start
            if waited > 0:
                w[0] += waited
                w[1] += 1

    @property
    def write_buffer(self) -> WriteBuffer:
        """The budget this volume's unflushed writes count against (its manager's)."""
        return self._buf.write_buffer

    @property
    def streaming(self) -> bool:
        """Set by a writer that writes each block once, in one pass (a receive): the
        buffer then cannot absorb rewrites, so writeback starts at WRITEBACK_MIN and
        overlaps the rest of the stream instead of waiting for the flush."""
        return self._buf.streaming

    @streaming.setter
    def streaming(self, on: bool) -> None:
        self._buf.streaming = on

    def buffered_age(self) -> float:
        """Seconds since the oldest data in the write buffer arrived (0 when it has none)."""
        return self._buf.age()

    def capabilities(self) -> Capabilities:
        """What this volume offers now (see volumes/capabilities.py); computed on each call,
        since a view's ``read_only`` is set after it is made."""
        ro = self.read_only
        return Capabilities(
            read_only=ro, volatile_cache=True, can_flush=True, can_fua=True,
            can_trim=not ro, can_zero=not ro, can_fast_zero=not ro, can_cache=True,
            can_extents=True, can_multi_conn=True, thin=True, zeroes_unmapped=True,
            rotational=False, minimum_block=1, preferred_block=self.block_size,
            maximum_block=None, unmap_granularity=self.block_size)

    # ---- checks ---------------------------------------------------------------------------
    def _check(self, offset: int, length: int, *, write: bool) -> None:
        if self._deleted:
            raise NotFound(f"volume {self.name} was deleted")
        if write and self.read_only:
            raise ReadOnly(f"volume {self.name} is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"range {offset}+{length} is outside volume {self.name} "
                                  f"of {self.size} bytes")

    def _blocks(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(block, start within block, end within block) for each block the range touches."""
        bs = self.block_size
        end = offset + length
        b = offset // bs
        while b * bs < end:
            lo = max(offset - b * bs, 0)
            hi = min(end - b * bs, bs)
            yield b, lo, hi
            b += 1

    # ---- reads ----------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; holes read as zeros. Never unverified bytes."""
        pieces = await self.read_sparse(offset, length)  # records the latency
        if len(pieces) == 1 and pieces[0][2] is not None and len(pieces[0][2]) == 1:
            one = pieces[0][2][0]
            return one if isinstance(one, bytes) else bytes(one)
        return b"".join(b for _o, n, d in pieces for b in (d if d is not None else [bytes(n)]))

    async def read_sparse(self, offset: int,
                          length: int) -> list[tuple[int, int, list[Piece] | None]]:
        """Like ``read``, as runs of (offset, length, data) where data is None for a hole,
        else the run's bytes as buffers to send back to back (one per block, not joined).

        Adjacent data blocks make one run and adjacent holes merge, so a frontend can send
        holes without zeros (NBD OFFSET_HOLE).
        """
        started = time.perf_counter()
        spans, buffered = await self._admitted_contents(offset, length)
        out = runs(spans, buffered, offset, length, self.block_size)
        self._count_read(length, started)
        return out

    async def _admitted_contents(self, offset: int, length: int
                                 ) -> tuple[list[tuple[int, int, int]], dict[int, Block | None]]:
        """``_contents`` once QoS admits the read and the pool's dispatcher gives it a
        slot (the awaited read paths share this gate)."""
        d = await self._admit_read(length)
        try:
            return await self._contents(offset, length)
        finally:
            d.release()

    async def _admit_read(self, length: int) -> WeightedDispatcher:
        """The gate of every awaited read: QoS admits it, then the pool's dispatcher
        gives it a slot, which the caller releases (``release()`` of what this returns)."""
        if self._throttles:
            await self._admit(READ, length)
        d = self.dispatcher
        if d.queue or d.in_service >= d.depth:
            await self._slot(length)
        else:
            d.in_service += 1           # a free slot (WeightedDispatcher.try_acquire)
        return d

    def read_sparse_nowait(self, offset: int,
                           length: int) -> list[tuple[int, int, list[Piece] | None]] | None:
        """``read_sparse`` when it can be answered at once, without waiting on anything
        (blocks buffered, in the pool's record cache or page-cached and healthy); else
        None, and the caller uses ``read_sparse``. Lets a frontend answer cached reads
        without a task per request. Bad ranges raise as in ``read_sparse``. A volume
        with QoS limits always answers None (its requests are admitted by ``_admit``),
        and so does every volume while its pool's dispatcher orders requests by weight."""
        if self._throttles or self.dispatcher.queue:
            return None
        started = time.perf_counter()
        bs = self.block_size
        b = offset // bs
        if 0 < length <= bs and (offset + length - 1) // bs == b:
            return self._read_one_nowait(b, offset, length, started)
        got = self._span_nowait(offset, length)
        if got is None:
            return None
        if isinstance(got, memoryview):
            self._count_read(length, started)
            return [(offset, length, [got])]
        out = runs(*got, offset, length, bs)
        self._count_read(length, started)
        return out

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """``read`` of a range inside one block when it can be answered at once (as
        ``read_sparse_nowait``: buffered, record-cached or page-cached, or a hole), else
        None; also None for a range that is empty or crosses a block (``read_vectored_nowait``
        takes those). The small random read of a frontend that answers with one buffer
        (FUSE): one copy of the range, no lists. Bad ranges raise as in ``read``."""
        if self._throttles or self.dispatcher.queue:
            return None
        bs = self.block_size
        b = offset // bs
        if not 0 < length <= bs or (offset + length - 1) // bs != b:
            return None
        answered, data = self._one_nowait(b, offset, length, time.perf_counter())
        if not answered:
            return None
        return data if data is not None else self._zero[:length]

    def read_cached_nowait(self, offset: int, length: int) -> memoryview | None:
        """A range inside one block that the pool's record cache holds, with the block not
        in the write buffer and no QoS limit or dispatcher queue in the way: a read-only
        view of the cached block's range (no copy), counted as a read. Else None, and the
        caller takes ``read_vectored_nowait`` (which also answers this case, through more
        calls). The commonest small read of a frontend that sends its answer at once and
        lets it go (FUSE's 4 KiB random reads) in one call and one lookup. Bad ranges and
        a deleted volume answer None: the general path raises for them."""
        if self._throttles or self.dispatcher.queue or self._deleted:
            return None
        bs = self.block_size
        b = offset // bs
        lo = offset - b * bs
        if offset < 0 or length <= 0 or lo + length > bs or offset + length > self.size:
            return None
        if (self._dirty and b in self._dirty) or (self._inflight and b in self._inflight):
            return None                 # the buffer's version is the newest (rule W2)
        started = time.perf_counter()
        hit = self._pool.cached_block(self._map, b)
        if hit is None:
            return None
        self._count_read(length, started)
        return (hit if type(hit) is memoryview else memoryview(hit))[lo:lo + length]

    async def read_vectored(self, offset: int, length: int) -> list[bytes | memoryview]:
        """``read`` as buffers whose concatenation is the range (one per block touched;
        holes as views of zeros), so a frontend can send them without joining."""
        started = time.perf_counter()
        spans, buffered = await self._admitted_contents(offset, length)
        out = buffers(spans, buffered, self._zero_view)
        self._count_read(length, started)
        return out

    def read_vectored_nowait(self, offset: int, length: int, *,
                             view: bool = False) -> list[bytes | memoryview] | None:
        """``read_vectored`` when it can be answered at once (as ``read_sparse_nowait``),
        else None. With ``view``, a range inside one block may come as a read-only view
        of the pool's block (``_one_nowait``) instead of a copy: for a frontend that sends
        it and lets it go."""
        if self._throttles or self.dispatcher.queue:
            return None
        started = time.perf_counter()
        bs = self.block_size
        b = offset // bs
        if 0 < length <= bs and (offset + length - 1) // bs == b:
            answered, data = self._one_nowait(b, offset, length, started, view=view)
            if not answered:
                return None
            return [data if data is not None else self._zero_view[:length]]
        got = self._span_nowait(offset, length)
        if got is None:
            return None
        if isinstance(got, memoryview):
            self._count_read(length, started)
            return [got]
        vec = buffers(*got, self._zero_view)
        self._count_read(length, started)
        return vec

    async def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        """``read`` of ``len(buffer)`` bytes at ``offset`` into the caller's writable
        ``buffer`` (holes as zeros): whole blocks that are page-cached are read straight
        into it, with no copy, so a frontend with buffers of its own reads at memory speed.
        Admitted by QoS and the pool's dispatcher as every awaited read is (a send of a
        limited volume keeps to its limits).

        If the read fails or is cancelled, the buffer's content is undefined."""
        started = time.perf_counter()
        view = memoryview(buffer).cast("B")
        d = await self._admit_read(len(view))
        try:
            await self._readinto(offset, view)
        finally:
            d.release()
        self._count_read(len(view), started)

    async def _readinto(self, offset: int, view: memoryview) -> None:
        length = len(view)
        bs = self.block_size
        if not offset % bs and not length % bs and not self._dirty and not self._inflight:
            # Whole blocks, none in the write buffer: all of it from the pool.
            self._check(offset, length, write=False)
            await self._pool.read_blocks_into(
                self._map, range(offset // bs, (offset + length) // bs), bs,
                [view[at:at + bs] for at in range(0, length, bs)])
            return
        spans, buffered, _need = self._begin_read(offset, length)
        whole: list[int] = []
        into: list[memoryview] = []
        part: list[tuple[int, int, int, memoryview]] = []
        pos = 0
        for b, lo, hi in spans:
            dest = view[pos:pos + hi - lo]
            pos += hi - lo
            if b in buffered:
                v = buffered[b]
                dest[:] = self._zero_view[lo:hi] if v is None else v[lo:hi]
            elif hi - lo == bs:
                whole.append(b)
                into.append(dest)
            else:
                part.append((b, lo, hi, dest))
        if whole:
            await self._pool.read_blocks_into(self._map, whole, bs, into)
        if part:
            got = await self._pool.read_blocks(self._map, [b for b, *_ in part], bs)
            for (_b, lo, hi, dest), v in zip(part, got, strict=True):
                dest[:] = self._zero_view[lo:hi] if v is None else v[lo:hi]

    def readinto_nowait(self, offset: int, buffer: bytearray | memoryview) -> bool:
        """``readinto`` of whole blocks when it needs no wait (buffered blocks copied,
        holes zeroed, the rest record-cached or page-cached and healthy: read and checked
        straight into ``buffer``); False for any other range or when something needs a
        wait, and then what ``buffer`` holds is undefined. Lets a frontend that answers
        large reads with one buffer of its own (FUSE) skip joining per-block buffers. Bad
        ranges raise as in ``read``."""
        if self._throttles or self.dispatcher.queue:
            return False
        started = time.perf_counter()
        view = memoryview(buffer).cast("B")
        length = len(view)
        bs = self.block_size
        if offset % bs or length % bs or not length:
            return False
        _spans, buffered, need = self._begin_read(offset, length)
        first = offset // bs
        if buffered:
            zero = self._zero_view
            for b, v in buffered.items():
                at = (b - first) * bs
                view[at:at + bs] = zero if v is None else v
        if need and not self._pool.read_blocks_into_nowait(
                self._map, need, bs, [view[(b - first) * bs:(b - first + 1) * bs]
                                      for b in need]):
            return False
        self._count_read(length, started)
        return True

    def _count_read(self, length: int, started: float) -> None:
        stats = self._stats
        stats["reads"] += 1
        stats["bytes_read"] += length
        self._latency["read"].observe(time.perf_counter() - started)

    def may_compress(self, offset: int, length: int) -> bool:
        """Whether lz4 may shrink these bytes. False only for a volume that compresses
        (so every record was tried with lz4 when it was written) whose blocks in the range
        are all stored raw and none is in the write buffer: data that did not compress
        block by block will not in a larger piece either (lz4 looks back 64 KiB at most),
        so a send need not try again."""
        if not self.compression or self._dirty or self._inflight:
            return True
        bs = self.block_size
        first = offset // bs
        return self._pool.any_compressed(self._map, first,
                                         -(-(offset + length) // bs) - first)

    async def _contents(self, offset: int, length: int
                        ) -> tuple[list[tuple[int, int, int]], dict[int, Block | None]]:
        """The spans of a read and the content of every block they touch (None: a hole),
        from the write buffer or the pool."""
        spans, buffered, need = self._begin_read(offset, length)
        if need:
            buffered.update(zip(need, await self._pool.read_blocks(self._map, need,
                                                                   self.block_size),
                                strict=True))
        return spans, buffered

    def _contents_nowait(self, offset: int, length: int
                         ) -> tuple[list[tuple[int, int, int]],
                                    dict[int, Block | None]] | None:
        """``_contents`` if no block needs a wait, else None."""
        spans, buffered, need = self._begin_read(offset, length)
        if need:
            got = self._pool.read_blocks_nowait(self._map, need, self.block_size)
            if got is None:
                return None
            buffered.update(zip(need, got, strict=True))
        return spans, buffered

    def _span_nowait(self, offset: int, length: int
                     ) -> memoryview | tuple[list[tuple[int, int, int]],
                                             dict[int, Block | None]] | None:
        """``_contents_nowait``; or, when no block is buffered and the pool has every
        block of the range as a record stored raw (``Pool.read_span_nowait``), the range
        itself as one read-only view (readshape invariant 1: not a bytearray; pool/reader
        invariant 5: nothing writes it while it lives), which a frontend sends as one
        buffer instead of one per block."""
        if self._dirty or self._inflight or length <= 0:
            return self._contents_nowait(offset, length)
        self._check(offset, length, write=False)
        bs = self.block_size
        first = offset // bs
        n = (offset + length - 1) // bs - first + 1
        got = self._pool.read_span_nowait(self._map, first, n, bs)
        if got is None:
            return None
        if isinstance(got, memoryview):
            lo = offset - first * bs
            return got if lo == 0 and len(got) == length else got[lo:lo + length]
        return list(self._blocks(offset, length)), dict(zip(range(first, first + n), got,
                                                            strict=True))

    def _read_one_nowait(self, b: int, offset: int, length: int,
                         started: float) -> list[tuple[int, int, list[Piece] | None]] | None:
        """``read_sparse_nowait`` of a range inside block ``b`` (small random reads): the
        same answer without the general path's spans."""
        answered, data = self._one_nowait(b, offset, length, started, view=True)
        if not answered:
            return None
        return [(offset, length, None if data is None else [data])]

    @overload
    def _one_nowait(self, b: int, offset: int, length: int, started: float, *,
                    view: Literal[False] = False) -> tuple[bool, bytes | None]: ...

    @overload
    def _one_nowait(self, b: int, offset: int, length: int, started: float, *,
                    view: bool) -> tuple[bool, Piece | None]: ...

    def _one_nowait(self, b: int, offset: int, length: int, started: float, *,
                    view: bool = False) -> tuple[bool, Piece | None]:
        """(whether it could be answered at once, the bytes or None for a hole) of a range
        inside block ``b``: a copy (a small read keeps no whole block alive), or with
        ``view`` a read-only view of a block the pool read or cached (a frontend that sends
        it at once saves the copy), or of a buffered block that is a view of immutable
        ``bytes`` (a full-block write's payload, kept as it is); other buffered blocks
        (bytearrays a partial write changes in place) are still copied."""
        self._check(offset, length, write=False)
        if self._dirty or self._inflight:
            held, v = self._buf.held(b)
        else:
            held, v = False, None
        if not held:
            answered, v = self._pool.read_block_nowait(self._map, b, self.block_size)
            if not answered:
                return False, None
            if view and isinstance(v, memoryview) and v.readonly:
                lo = offset - b * self.block_size
                self._count_read(length, started)
                return True, v[lo:lo + length]
        lo = offset - b * self.block_size
        self._count_read(length, started)
        if v is None:
            return True, None
        if view and isinstance(v, memoryview) and v.readonly and type(v.obj) is bytes:
            return True, v[lo:lo + length]
        return True, v[lo:lo + length] if isinstance(v, bytes) else bytes(v[lo:lo + length])

    def _begin_read(self, offset: int, length: int
                    ) -> tuple[list[tuple[int, int, int]],
                               dict[int, Block | None], list[int]]:
        """The spans of a read (checked), the blocks the write buffer holds, and the
        blocks to read from the pool."""
        self._check(offset, length, write=False)
        spans = list(self._blocks(offset, length))
        buffered: dict[int, Block | None] = {}
        if not self._dirty and not self._inflight:
            return spans, buffered, [b for b, _lo, _hi in spans]
        need: list[int] = []
        for b, _lo, _hi in spans:
            held, v = self._buf.held(b)
            if held:
                buffered[b] = v
            else:
                need.append(b)
        return spans, buffered, need

    # ---- writes ---------------------------------------------------------------------------
    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False, owned: bool = False,
                    compressible: bool = True) -> None:
        """Write ``data`` at ``offset``; with ``fua``, durable when this returns.
        ``owned``: the caller hands ``data`` over and never changes it again (a received
        payload), so full blocks may be buffered as views of it, like immutable bytes.
        ``compressible=False``: the caller knows that no whole block of ``data`` saves
        the 1/8 lz4 must save (a stream says so), so writeback does not try lz4 on them."""
        self._check(offset, len(data), write=True)
        started = time.perf_counter()
        if self._throttles:
            await self._admit(WRITE, len(data))
        view = memoryview(data)
        # Full blocks of immutable bytes are buffered as views, others as copies.
        keep = view.contiguous and (owned or (isinstance(view.obj, bytes) and view.readonly))
        d = self.dispatcher
        if d.queue or d.in_service >= d.depth:
            await self._slot(len(data))
        else:
            d.in_service += 1           # a free slot (WeightedDispatcher.try_acquire)
        try:
            await self._buf.update(list(self._blocks(offset, len(data))),
                                   lambda lo, hi, pos: view[pos:pos + hi - lo],
                                   reserve=True, keep=keep)
        finally:
            d.release()
        if not compressible and self.compression:
            bs = self.block_size
            self._no_lz4.update(range(-(-offset // bs), (offset + len(data)) // bs))
        self._stats["writes"] += 1
        self._stats["bytes_written"] += len(data)
        if fua:
            await self.flush()
        else:
            try:
                await self._buf.maybe_writeback()
            except NoSpace as e:
                # The write is buffered with its space reserved (rule S4): failing it now
                # would report as not done a write that is. The batch stays buffered.
                log.error("volume %s: writeback failed, writes stay buffered: %s",
                          self.name, e.message)
        self._latency["write"].observe(time.perf_counter() - started)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                           punch: bool = True) -> None:
        """Zero a range. Whole zero blocks become holes and give their space back; with
        ``punch=False`` (NBD's NO_HOLE) they are stored as data and stay provisioned."""
        self._check(offset, length, write=True)
        if self._throttles:
            await self._admit(WRITE, 0)
        d = self.dispatcher
        if d.queue or d.in_service >= d.depth:
            await self._slot(0)
        else:
            d.in_service += 1           # a free slot (WeightedDispatcher.try_acquire)
        try:
            await self._zero_range(offset, length, fua=fua, punch=punch)
        finally:
            d.release()

    async def _zero_range(self, offset: int, length: int, *, fua: bool,
                          punch: bool) -> None:
        await self._buf.update(list(self._blocks(offset, length)),
                               lambda lo, hi, pos: self._zero[:hi - lo],
                               reserve=not punch, holes=punch)
        self._stats["writes"] += 1
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard a range: it reads as zeros afterwards and its space is released."""
        await self.write_zeroes(offset, length, fua=fua, punch=True)
        self._stats["trims"] += 1

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview, *,
                     owned: bool = False) -> bool:
        """``write`` (without FUA) if it can be done at once, without waiting on anything:
        every block it touches is whole, buffered, or readable from the pool without a
        wait (``VolumeBuffer.base_now``), space is there, and the buffer stays under its writeback
        threshold. Returns False, having changed nothing,
        when it cannot; the caller then awaits ``write``. Bad ranges raise as in ``write``.
        Lets a frontend take such writes without a task per request. A volume with QoS
        limits always returns False (its requests are admitted by ``_admit``), and so
        does every volume while its pool's dispatcher orders requests by weight."""
        if self._throttles or self.dispatcher.queue:
            return False
        started = time.perf_counter()
        buf = self._buf
        bs = self.block_size
        b = offset // bs
        n = len(data)
        mine = self._dirty.get(b)
        if type(mine) is bytearray and n > 0 and (offset + n - 1) // bs == b \
                and offset >= 0 and offset + n <= self.size and not self.read_only \
                and b not in self._locks and isinstance(data, bytes | bytearray) \
                and not self._zero.startswith(data) \
                and buf.dirty_blocks * bs < buf.threshold(buf.dirty_blocks * bs):
            # The common small rewrite: the block is buffered as our own bytearray (no
            # writeback holds it), so the write patches it in place. (Zeros take the
            # general path: the block may become a hole.)
            lo = offset - b * bs
            mine[lo:lo + n] = data
            self._no_lz4.discard(b)
            stats = self._stats
            stats["writes"] += 1
            stats["bytes_written"] += n
            self._latency["write"].observe(time.perf_counter() - started)
            return True
        if n and not offset % bs and not n % bs and offset >= 0 and offset + n <= self.size \
                and not self.read_only and not self._deleted:
            # Whole blocks (a FUSE or NBD 1 MiB write): what the general path below does
            # with every base True, in one pass with no per-block calls.
            end = b + n // bs
            locks = self._locks
            if locks and any(i in locks for i in range(b, end)):
                return False             # a partial write of one of them reads it (inv. 6)
            dirty = self._dirty
            need = sum(1 for i in range(b, end) if dirty.get(i) is None)
            if not self._room_nowait(need):
                return False
            view = memoryview(data)
            buf.put_whole(b, view, view.contiguous and (
                owned or (isinstance(view.obj, bytes) and view.readonly)), need)
            stats = self._stats
            stats["writes"] += 1
            stats["bytes_written"] += n
            self._latency["write"].observe(time.perf_counter() - started)
            return True
        self._check(offset, len(data), write=True)
        spans = list(self._blocks(offset, len(data)))
        bases = [buf.base_now(b, lo, hi) for b, lo, hi in spans]
        if any(base is False for base in bases):
            return False
        need = sum(1 for b, _lo, _hi in spans if self._dirty.get(b) is None)
        if not self._room_nowait(need):
            return False
        view = memoryview(data)
        keep = view.contiguous and (owned or (isinstance(view.obj, bytes) and view.readonly))
        reserved = need
        try:
            pos = 0
            for (b, lo, hi), base in zip(spans, bases, strict=True):
                reserved -= buf.put_on(base, b, lo, hi, view[pos:pos + hi - lo], reserved,
                                       True, keep)
                pos += hi - lo
        finally:
            self._pool.unreserve(reserved * buf.cost)
        self._stats["writes"] += 1
        self._stats["bytes_written"] += len(data)
        self._latency["write"].observe(time.perf_counter() - started)
        return True

    def _room_nowait(self, need: int) -> bool:
        """Whether ``need`` more blocks may be buffered at once (``write_nowait``): the
        buffer stays under its write-back threshold, and their space is reserved; else
        False, and ``write`` makes room or reports it."""
        buf = self._buf
        buffered = (buf.dirty_blocks + need) * self.block_size
        if buffered >= buf.threshold(buffered):
            return False
        if need:
            try:
                self._pool.check_writable(self.profile)
                self._pool.reserve(need * buf.cost, self.profile)
            except NoSpace:
                return False
        return True

    async def flush(self) -> None:
        """Make every write acknowledged before this call durable (invariant 1)."""
        if self._deleted:
            raise NotFound(f"volume {self.name} was deleted")
        started = time.perf_counter()
        written = await self._buf.write_back(commit_next=True)
        try:
            await self._pool.commit()
        finally:
            self._buf.durable(written)
        self._stats["flushes"] += 1
        self._latency["flush"].observe(time.perf_counter() - started)

    async def write_back(self, *, commit_next: bool = False) -> int:
        """Write back every write acknowledged before this call, as records (not yet
        committed): one pass under the writeback lock (rule W4). ``commit_next``: the
        caller commits the pool next, then calls ``durable`` with the count returned;
        until then the blocks written still count as ``dirty_bytes`` (rule W9)."""
        return await self._buf.write_back(commit_next=commit_next)

    def durable(self, blocks: int) -> None:
        """The commit after ``write_back(commit_next=True)`` returned: its ``blocks`` are
        durable and no longer count as dirty (rule W9)."""
        self._buf.durable(blocks)

    async def writeback_then(self, action: Callable[[], None], *,
                             write_back: bool = True) -> None:
        """Write back every write acknowledged before this call, then run ``action``
        synchronously while no other writeback can move the map (snapshot create, diff,
        rollback, receive: rule W5; ``VolumeBuffer.writeback_then`` tells the details).
        ``write_back=False``: only wait for the writeback under way (an action that
        discards the buffer or the volume: rollback, delete)."""
        await self._buf.writeback_then(action, write_back=write_back)

    # ---- allocation map -------------------------------------------------------------------
    async def allocation(self, offset: int, length: int) -> list[Extent]:
        """Runs of data and holes covering [offset, offset + length), block-granular."""
        self._check(offset, length, write=False)
        if length == 0:
            return []
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        mapped = set(self._pool.mapped_blocks(self._map, first, last + 1))
        self._buf.overlay(mapped, first, last + 1)
        out: list[Extent] = []
        for b in range(first, last + 1):
            lo = max(b * bs, offset)
            hi = min((b + 1) * bs, offset + length)
            alloc = b in mapped
            if out and out[-1].allocated == alloc:
                prev = out[-1]
                out[-1] = Extent(prev.offset, hi - prev.offset, alloc)
            else:
                out.append(Extent(lo, hi - lo, alloc))
        return out

    # ---- status ---------------------------------------------------------------------------
    def mapped_bytes(self) -> int:
        """Bytes of the blocks that hold data, buffered writes included; cheap (the map's
        leaf counts, and a lookup per buffered block), for file attributes."""
        return min(self._buf.mapped_count() * self.block_size, self.size)

    def statistics(self) -> VolumeStatistics:
        end = -(-self.size // self.block_size)
        mapped = set(self._pool.mapped_blocks(self._map, 0, end))
        self._buf.overlay(mapped, 0, end)
        return VolumeStatistics(
            self.name, self.size, self.block_size, str(self.profile), self.compression,
            self.read_only, min(len(mapped) * self.block_size, self.size),
            self._pool.stored_bytes(self._map), self._pool.exclusive_bytes(self._map),
            (self._buf.dirty_blocks + self._buf.syncing) * self.block_size,
            **self._stats,
            latency=tuple((op, rec.snapshot()) for op, rec in self._latency.items()))

    def discard_buffer(self) -> None:
        """Forget buffered writes (the volume is deleted or rolled back)."""
        self._buf.discard()

    @property
    def deleted(self) -> bool:
        """Whether the manager deleted this volume (or discarded it as a receive's hidden
        one): its requests answer NotFound, so a frontend holding it resolves the name
        again."""
        return self._deleted

    def mark_deleted(self) -> None:
        """Forget buffered writes and refuse I/O from now on (the manager deleted it)."""
        self.discard_buffer()
        self._deleted = self._buf.deleted = True

    # ---- the stored record (the manager's and a receive's verbs) -------------------------
    @property
    def obj_id(self) -> int:
        """The pool object holding this volume's record."""
        return self._obj_id

    @property
    def map_id(self) -> int:
        """The block map the volume reads and writes."""
        return self._map

    @property
    def record(self) -> VolumeRecord:
        """The stored record (volumes/records.py), as of the last change."""
        return self._record

    @property
    def origin(self) -> int | None:
        """The snapshot object a clone was made from (None: not a clone)."""
        return self._record.origin

    @property
    def receiving(self) -> ReceiveState | None:
        """A hidden volume a receive is filling: what it receives (volumes/portable.py)."""
        return self._record.receiving

    def _store(self, record: VolumeRecord) -> None:
        """Replace the stored record (part of the next commit) and what mirrors it."""
        self._record = record
        self._map, self.name, self.size = record.map, record.name, record.size
        self._buf.map_id, self._buf.size = record.map, record.size   # (buffer invariant 5)
        self._pool.put_object(record.encode(), self._obj_id)

    def rename_to(self, name: str) -> None:
        self._store(replace(self._record, name=name))

    def set_size(self, size: int) -> None:
        """Record a new size (the caller trimmed a shrunk tail first)."""
        self._store(replace(self._record, size=size))

    def replace_map(self, map_id: int, size: int) -> int:
        """Read ``map_id`` from now on, ``size`` bytes long, forgetting buffered writes (a
        rollback, a received increment); returns the old map, for the caller to delete.
        Called under the writeback lock (``writeback_then``)."""
        self.discard_buffer()
        old = self._map
        self._store(replace(self._record, map=map_id, size=size))
        return old

    def note_received(self, seq: int) -> None:
        """A receive's checkpoint: records below ``seq`` are durable in this volume."""
        kept = self._record.receiving
        assert kept is not None
        self._store(replace(self._record, receiving=replace(kept, seq=seq)))

    def finish_receive(self, name: str, size: int) -> None:
        """The receive is complete: an ordinary volume ``name`` from now on."""
        self._store(replace(self._record, name=name, size=size, receiving=None))



def check_block_size(bs: int) -> None:
    if bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
        raise InvalidArgument(f"block size must be a power of two from 4K to 1M, got {bs}")


__all__ = ["DEFAULT_BLOCK", "Extent", "StorageError", "Volume", "VolumeStatistics"]
