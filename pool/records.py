"""Blocking record I/O: writing stripes and reading records back verified.

These functions run in worker threads; they touch devices and pure codec code only, never
the pool's in-memory state (the event loop prepares plans and applies results).
"""

from __future__ import annotations

import concurrent.futures
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import xxhash
import zfec

from pool import codec
from pool.deadlines import Deadlines
from pool.device import Device
from pool.errors import DeviceError, DeviceHung
from pool.layout import SECTOR


class RecordPlan(NamedTuple):
    """Everything needed to read one record: where its k + m fragments are.

    A NamedTuple rather than a dataclass: one is built per block read, on the event loop.
    """

    slot: int                     # position in the caller's request
    segment: int
    offset: int                   # sectors into each extent
    units: int
    k: int
    m: int
    plen: int
    flags: int
    rhash: int
    columns: tuple[tuple[Device | None, int, str], ...]  # (device, extent byte offset, name)


@dataclass(frozen=True, slots=True)
class Repair:
    """A fragment that failed verification on a present device, with its good bytes."""

    segment: int
    index: int
    device: Device
    offset: int                   # absolute byte offset on the device
    data: bytes | bytearray


@dataclass
class ReadOutcome:
    # slot -> logical block (a view into the read buffer when stored raw: no copy)
    payloads: dict[int, bytes | memoryview] = field(default_factory=dict)
    repairs: list[Repair] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)      # slot -> why unreadable
    degraded: int = 0             # records that needed parity (or another mirror)
    # (device path, "read" | "checksum") -> count, for per-device error counters
    device_errors: Counter[tuple[str, str]] = field(default_factory=Counter)


def write_columns(writes: Sequence[tuple[Device, int, list[codec.Buffer]]]) -> None:
    for dev, offset, fragments in writes:
        dev.pwritev(offset, fragments)


# ---- reads with a deadline ------------------------------------------------------------
# A device that stops answering (a dying disk, a hung path) must not hang the reads that
# redundancy could serve. Fragment reads therefore run on a small pool of reader threads
# and are given up after the pool's read deadline (``Deadlines.read``, faults.read_timeout):
# the fragment counts as missing (and as a read error of its member), the record is
# rebuilt from the others. Until the stuck read returns, further reads of that device
# fail at once instead of each waiting out the timeout. A pread cannot be interrupted, so
# the stuck thread is left to finish; the pool of threads is bounded.
_readers = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                 thread_name_prefix="storaged-read")
_stuck: dict[int, concurrent.futures.Future[bytes]] = {}
_stuck_lock = threading.Lock()


def _start_read(dev: Device, offset: int, length: int, dl: Deadlines,
                readers: concurrent.futures.ThreadPoolExecutor = _readers
                ) -> concurrent.futures.Future[bytes] | DeviceError:
    with _stuck_lock:
        pending = _stuck.get(id(dev))
        if pending is not None:
            if not pending.done():
                return DeviceError(f"{dev.path} is not answering (a read has been "
                                   f"waiting more than {dl.read or 0:g} s)")
            del _stuck[id(dev)]
    return readers.submit(dev.pread, offset, length)


def _finish_read(dev: Device, fut: concurrent.futures.Future[bytes] | DeviceError,
                 length: int, offset: int, deadline: float, seconds: float) -> bytes:
    if isinstance(fut, DeviceError):
        raise fut
    try:
        return fut.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        with _stuck_lock:
            _stuck[id(dev)] = fut
        raise DeviceError(f"read of {length} bytes at {offset} on {dev.path} timed out "
                          f"after {seconds:g} s") from None


def pread_within(dev: Device, offset: int, length: int, dl: Deadlines) -> bytes:
    """``dev.pread`` given up after ``dl.read`` seconds: a DeviceError, like a failed
    read (and the device's later reads fail at once until the stuck one returns). For
    metadata, where every member holds a copy to fall back to. Page-cached bytes are read
    at once, without the reader thread (a hop that costs about 150 µs here)."""
    buf = bytearray(length)
    if length and dev.preadv_nowait(offset, [buf]) == length:
        return bytes(buf)
    return _pread_deadline(dev, offset, length, dl)


def _pread_deadline(dev: Device, offset: int, length: int, dl: Deadlines) -> bytes:
    seconds = dl.read
    if seconds is None:
        return dev.pread(offset, length)
    return _finish_read(dev, _start_read(dev, offset, length, dl), length, offset,
                        time.monotonic() + seconds, seconds)


def hung(dev: Device) -> bool:
    """Whether a read of ``dev`` timed out and has not returned yet."""
    with _stuck_lock:
        pending = _stuck.get(id(dev))
    return pending is not None and not pending.done()


# ---- writes with a deadline -----------------------------------------------------------
# A write or sync that a member does not finish within the pool's write deadline
# (``Deadlines.write``, faults.write_timeout) is given up: the pool faults that member at once and
# goes on degraded where redundancy allows (``LocalStore.per_device``; metadata below), instead
# of every flush waiting for a disk that may never answer. As with reads, the stuck call
# cannot be interrupted: its thread is left to finish, and the descriptor stays open until
# it does (``FileDevice.close``).
_writers = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                 thread_name_prefix="storaged-write")


def timed_out(what: str, dev: Device, seconds: float) -> DeviceHung:
    return DeviceHung(f"{what} on {dev.path} did not complete in {seconds:g} s "
                       f"(faults.write_timeout): the device is not answering")


def writes_within(calls: Sequence[tuple[Device, Callable[[], None]]],
                  what: str, dl: Deadlines) -> list[DeviceError | None]:
    """Run blocking writes (one per device) in parallel, each given up after
    ``dl.write`` seconds: per call None, or the DeviceError it raised or timed out with.
    Called from a thread."""
    seconds = dl.write
    if seconds is None or not calls:
        out: list[DeviceError | None] = []
        for _dev, call in calls:
            try:
                call()
                out.append(None)
            except DeviceError as e:
                out.append(e)
        return out
    deadline = time.monotonic() + seconds
    futs = [(dev, _writers.submit(call)) for dev, call in calls]
    results: list[DeviceError | None] = []
    for dev, fut in futs:
        try:
            fut.result(timeout=max(0.0, deadline - time.monotonic()))
            results.append(None)
        except concurrent.futures.TimeoutError:
            results.append(timed_out(what, dev, seconds))
        except DeviceError as e:
            results.append(e)
    return results


def read_columns(cols: Sequence[tuple[Device | None, int, str]], offset: int, units: int,
                 errors: Counter[tuple[str, str]], dl: Deadlines, *,
                 redundant: bool = True) -> list[bytes | None]:
    """The same sectors of several columns, read in parallel, each within the deadline;
    None for a column that is missing or failed (counted in ``errors``)."""
    length = units * SECTOR
    seconds = dl.read
    if seconds is None or (len(cols) == 1 and not redundant):
        # One column with nothing to fall back to: no thread hop; a hang is a hang.
        return [_frag_bytes(c, offset, units, errors, dl, deadline=False) for c in cols]
    deadline = time.monotonic() + seconds
    started = [(c, _start_read(c[0], c[1] + offset * SECTOR, length, dl)
                if c[0] is not None else None) for c in cols]
    out: list[bytes | None] = []
    for (dev, base, name), fut in started:
        if dev is None or fut is None:
            out.append(None)
            continue
        try:
            out.append(_finish_read(dev, fut, length, base + offset * SECTOR, deadline,
                                    seconds))
        except DeviceError:
            errors[(name, "read")] += 1
            out.append(None)
    return out


def _frag_bytes(col: tuple[Device | None, int, str], offset: int, units: int,
                errors: Counter[tuple[str, str]], dl: Deadlines, *,
                deadline: bool = True) -> bytes | None:
    dev, base, name = col
    if dev is None:
        return None
    try:
        if not deadline:
            return dev.pread(base + offset * SECTOR, units * SECTOR)
        return _pread_deadline(dev, base + offset * SECTOR, units * SECTOR, dl)
    except DeviceError:
        errors[(name, "read")] += 1
        return None


class WouldBlock(Exception):
    """The non-blocking attempt needs the thread path (data not cached, or a slow path)."""


def read_records(plans: Sequence[RecordPlan], block_size: int, dl: Deadlines, *,
                 nowait: bool = False, stored: bool = False) -> ReadOutcome:
    """Read and verify records; coalesce runs of adjacent records of one segment.

    With ``nowait`` (called on the event loop) only page-cached, fully healthy reads are
    served; anything else raises WouldBlock and the caller retries in a thread.
    """
    out = ReadOutcome()
    for run in _runs(plans):
        _read_run(run, -1 if stored else block_size, out, nowait, dl)
    return out


def read_records_into(plans: Sequence[RecordPlan], block_size: int,
                      dests: Sequence[memoryview], dl: Deadlines) -> int:
    """``read_records`` with ``nowait`` (on the event loop), each record's logical block
    written into ``dests[plan.slot]`` (writable, ``block_size`` bytes) instead of
    returned: lz4 is decompressed straight into it (``codec.expand_into``). Raises
    WouldBlock as ``read_records`` does, and also for a record that does not expand to
    exactly one block; ``dests`` then hold anything. Returns how many records it read."""
    out = ReadOutcome()
    for run in _runs(plans):
        _read_run(run, block_size, out, True, dl, into=dests)
    return len(plans)


def _runs(plans: Sequence[RecordPlan]) -> Iterator[Sequence[RecordPlan]]:
    """Runs of records lying one after another in one segment (read with one read per
    column)."""
    i = 0
    while i < len(plans):
        j = i + 1
        while (j < len(plans) and plans[j].segment == plans[i].segment
               and plans[j].offset == plans[j - 1].offset + plans[j - 1].units):
            j += 1
        yield plans[i:j]
        i = j


def _read_run(run: Sequence[RecordPlan], block_size: int, out: ReadOutcome,
              nowait: bool, dl: Deadlines, *,
              into: Sequence[memoryview] | None = None) -> None:
    first = run[0]
    k = first.k
    total = sum(p.units for p in run)
    columns: list[memoryview | None] = []
    if nowait:
        for c in range(k):
            dev, base, _name = first.columns[c]
            got = bytearray(total * SECTOR)
            if dev is None or dev.preadv_nowait(base + first.offset * SECTOR,
                                                [got]) != len(got):
                raise WouldBlock
            columns.append(memoryview(got))
    else:
        columns = [memoryview(raw) if raw is not None else None
                   for raw in read_columns(first.columns[:k], first.offset, total,
                                           out.device_errors, dl, redundant=first.m > 0)]
    pos = 0
    for p in run:
        size = p.units * SECTOR
        chunks: dict[int, memoryview] = {}
        for c in range(k):
            col = columns[c]
            if col is None:
                continue
            chunk = codec.check_fragment(col[pos:pos + size], c, k, p.m, p.plen, p.rhash)
            if chunk is not None:
                chunks[c] = chunk
            elif not nowait:
                out.device_errors[(first.columns[c][2], "checksum")] += 1
        pos += size
        if len(chunks) == k:
            # Every data fragment verified against its own checksum, and each header names
            # this record (index, k, m, length and the record hash the map holds): the
            # joined payload is what was written, so it is not hashed a second time. The
            # record hash is checked where parity rebuilt the payload (_read_slow).
            payload = codec.reassemble(chunks, k, p.m, p.plen)
            if into is None:
                out.payloads[p.slot] = codec.expand(payload, p.flags, block_size)
            elif not codec.expand_into(payload, p.flags, into[p.slot]):
                raise WouldBlock
            continue
        if nowait:
            raise WouldBlock
        _read_slow(p, block_size, chunks, out, dl)


class IntoRun(NamedTuple):
    """Records of whole, raw-stored blocks lying one after another in one segment, to be
    read straight into the caller's buffers (``read_runs_into``)."""

    columns: tuple[tuple[Device | None, int, str], ...]
    k: int
    m: int
    offset: int                   # sectors into each extent of the first record
    units: int                    # sectors of one fragment (the same for all: whole blocks)
    slots: list[int]              # each record's buffer, in ``dests``
    hashes: list[int]             # each record's hash (from the map)


_scratch = threading.local()


_Between = tuple[memoryview, list[memoryview], list[memoryview]]


def _between(n: int, gap: int) -> _Between:
    """Scratch for ``n`` fragment headers ``gap`` bytes apart (``read_runs_into``), its
    pieces as the iovec takes them (the first header, then each gap) and each header after
    its checksum (what ``codec.check_column`` hashes). This thread's own, reused from call
    to call (the headers are checked before the call returns)."""
    cache: dict[tuple[int, int], _Between] | None = getattr(_scratch, "by", None)
    if cache is None:
        cache = _scratch.by = {}
    got = cache.get((n, gap))
    if got is None:
        hs = codec.HEADER_SIZE
        between = memoryview(bytearray(n * gap))
        got = (between, [between[:hs], *(between[at:at + gap]
                                         for at in range(hs, n * gap, gap))],
               [between[at:at + hs - 8] for at in range(8, n * gap, gap)])
        if len(cache) < 64:
            cache[(n, gap)] = got
    return got


def read_runs_into(runs: Sequence[IntoRun], block_size: int,
                   dests: Sequence[memoryview]) -> int:
    """Read whole blocks stored raw straight into ``dests[slot]`` (each ``block_size``
    bytes): per run and data column one ``preadv`` scatters every chunk to its place in
    the caller's buffer, and what lies between two chunks (the padding of one fragment and
    the header of the next) to scratch; each fragment is then verified where it landed
    (``codec.check_column``).

    Called on the event loop: only page-cached, healthy records are read; for anything
    else it raises WouldBlock (the buffers may then hold anything) and the caller takes the
    general path, which also reports and heals. Returns how many records it read.
    """
    done = 0
    for run in runs:
        k = run.k
        clen = block_size // k
        n = len(run.slots)
        if n == 1:
            _read_one_into(run, block_size, dests[run.slots[0]])
            done += 1
            continue
        size = run.units * SECTOR
        gap = size - clen                 # from the end of one chunk to the next chunk
        for c in range(k):
            dev, base, _name = run.columns[c]
            if dev is None:
                raise WouldBlock
            chunks = ([dests[s] for s in run.slots] if k == 1 else
                      [dests[s][c * clen:(c + 1) * clen] for s in run.slots])
            # The first header, then each chunk followed by its padding and the next
            # header: headers land ``gap`` bytes apart in ``between``.
            between, gaps, tails = _between(n, gap)
            iov: list[memoryview] = [between] * (2 * n + 1)
            iov[0::2] = gaps
            iov[1::2] = chunks
            if dev.preadv_nowait(base + run.offset * SECTOR, iov) != n * size or \
                    not codec.check_column(between, gap, chunks, c, k, run.m, block_size,
                                           run.hashes, tails):
                raise WouldBlock
        done += n
    return done


def _head() -> memoryview:
    """Scratch for one fragment header (``_read_one_into``): this thread's own, reused
    from call to call (the header is checked before the call returns)."""
    head: memoryview | None = getattr(_scratch, "head", None)
    if head is None:
        head = _scratch.head = memoryview(bytearray(codec.HEADER_SIZE))
    return head


def _read_one_into(run: IntoRun, block_size: int, dest: memoryview) -> None:
    """``read_runs_into`` of a run of one record (a small read's block, a partial
    write's base): per data column one ``preadv`` of the fragment's header into scratch
    and its chunk into its place in ``dest``, then ``codec.check_one``; the padding after
    the chunk is not read. The many-record path's set-up (the scratch between chunks, the
    iovec, the headers unpacked as one) costs more than it saves for one record."""
    head = _head()
    k, m, rhash = run.k, run.m, run.hashes[0]
    clen = block_size // k
    want = codec.HEADER_SIZE + clen
    at = run.offset * SECTOR
    check, columns = codec.check_one, run.columns
    for c in range(k):
        dev, base, _name = columns[c]    # (every data column: never fewer than k)
        if dev is None:
            raise WouldBlock
        chunk = dest[c * clen:(c + 1) * clen]
        if dev.preadv_nowait(base + at, (head, chunk)) != want or \
                not check(head, chunk, c, k, m, block_size, rhash):
            raise WouldBlock


@dataclass(slots=True)
class PackedRun:
    """Records of one plain (k = 1) segment lying one after another, each stored raw or
    lz4-compressed, to be read with one ``preadv`` into scratch and expanded into the
    caller's buffers (``read_packed_into``)."""

    column: tuple[Device | None, int, str]   # fragment 0's column (the first copy)
    m: int
    offset: int                   # sectors into the extent of the first record
    size: int = 0                 # bytes of all of them
    slots: list[int] = field(default_factory=list)     # each record's buffer, in ``dests``
    ats: list[int] = field(default_factory=list)       # its fragment's byte in the run
    plens: list[int] = field(default_factory=list)     # its stored payload's length
    flags: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)    # its record hash (from the map)


PACKED_MAX = 4 << 20              # a PackedRun is at most this long (the scratch it needs)


def _packed_scratch(size: int) -> tuple[memoryview, int]:
    """Scratch of at least ``size`` bytes for ``read_packed_into`` and its address: this
    thread's own, kept from call to call (grown up to PACKED_MAX), never zeroed (every
    byte used is read into it first, and verified before use)."""
    got: tuple[memoryview, int, object] | None = getattr(_scratch, "packed", None)
    if got is None or len(got[0]) < size:
        buf = bytearray(max(size, 1 << 20))
        # The ctypes view holds an export of ``buf``: it can never move or resize.
        pin = codec.pin(buf)
        got = (memoryview(buf), codec.address(pin), pin)
        if size <= PACKED_MAX:
            _scratch.packed = got
    return got[0], got[1]


def read_packed_into(runs: Sequence[PackedRun], dests: Sequence[memoryview]) -> int:
    """Read records of plain segments, stored raw or lz4, into ``dests[slot]`` (each a
    writable block): per run one ``preadv`` into this thread's scratch; each fragment is
    verified there (``codec.check_fragment``'s checks, its xxh3 over the bytes read) and
    only then its payload decompressed straight into its block (``codec.lz4_into``) or, if
    stored raw, copied. Called on the event loop, as ``read_runs_into``: anything that is
    not page-cached and healthy raises WouldBlock (``dests`` may then hold anything).
    Returns how many records it read."""
    done = 0
    unpack = _unpack_header
    hs = codec.HEADER_SIZE
    lz4 = codec.FLAG_LZ4
    for run in runs:
        dev, base, _name = run.column
        view, addr = _packed_scratch(run.size)
        if dev is None or dev.preadv_nowait(base + run.offset * SECTOR,
                                            [view[:run.size]]) != run.size:
            raise WouldBlock
        m = run.m
        for slot, at, plen, flags, rhash in zip(run.slots, run.ats, run.plens, run.flags,
                                                run.hashes, strict=True):
            fhash, magic, idx, fk, fm, _flags, fplen, _res, frhash = unpack(view, at)
            end = at + hs + plen
            if (magic != _MAGIC or idx or fk != 1 or fm != m or fplen != plen
                    or frhash != rhash or _xxh3(view[at + 8:end]) != fhash):
                raise WouldBlock
            dest = dests[slot]
            if flags & lz4:
                if not codec.lz4_into(view[at + hs:end], addr + at + hs, dest):
                    raise WouldBlock
            elif plen == len(dest):
                dest[:] = view[at + hs:end]
            else:
                raise WouldBlock
        done += len(run.slots)
    return done


def _check_into(raw: bytes | memoryview | None, c: int, p: RecordPlan,
                chunks: dict[int, memoryview], bad: list[int],
                errors: Counter[tuple[str, str]]) -> None:
    """Verify fragment ``c`` of record ``p`` (``None``: it could not be read): its chunk
    goes into ``chunks``, else ``c`` into ``bad`` (a fragment that was read but did not
    verify is counted as a checksum error of its member)."""
    chunk = (codec.check_fragment(raw, c, p.k, p.m, p.plen, p.rhash)
             if raw is not None else None)
    if chunk is None:
        bad.append(c)
        if raw is not None:
            errors[(p.columns[c][2], "checksum")] += 1
    else:
        chunks[c] = chunk


def _read_slow(p: RecordPlan, block_size: int, chunks: dict[int, memoryview],
               out: ReadOutcome, dl: Deadlines) -> None:
    """Some data fragment was bad or missing: use parity/mirrors, then heal."""
    n = p.k + p.m
    bad: list[int] = [c for c in range(p.k) if c not in chunks]
    for c in range(p.k, n):
        if len(chunks) >= p.k:
            break
        raw = _frag_bytes(p.columns[c], p.offset, p.units, out.device_errors, dl)
        _check_into(raw, c, p, chunks, bad, out.device_errors)
    if len(chunks) < p.k:
        missing = [p.columns[c][2] for c in range(n) if c not in chunks]
        out.failures[p.slot] = (
            f"record in segment {p.segment} at sector {p.offset}: only {len(chunks)} of the "
            f"{p.k} fragments it needs verified; bad or missing on: {', '.join(missing)}")
        return
    payload = codec.reassemble(chunks, p.k, p.m, p.plen)
    if not codec.payload_ok(payload, p.rhash):
        out.failures[p.slot] = (f"record in segment {p.segment} at sector {p.offset}: "
                                f"fragments verify but the record checksum does not")
        return
    out.payloads[p.slot] = codec.expand(payload, p.flags, block_size)
    out.degraded += 1
    if bad:
        good = codec.stripe(payload, p.flags, p.k, p.m)
        for c in bad:
            dev, base, _name = p.columns[c]
            if dev is not None:
                out.repairs.append(Repair(p.segment, c, dev, base + p.offset * SECTOR,
                                          bytes(good.fragments[c])))


def apply_repairs(repairs: Sequence[Repair]) -> int:
    """Rewrite bad fragments with their rebuilt bytes; returns how many were written."""
    done = 0
    for r in repairs:
        try:
            r.device.pwrite(r.offset, r.data)
            done += 1
        except DeviceError:
            continue
    return done


# ==== scrub and rebuild (pool.maintenance) ===================================================
@dataclass
class StripeOutcome:
    """What a scrub or rebuild pass over some records found and did."""

    bytes_read: int = 0
    fragments_checked: int = 0
    bad: int = 0                   # fragments that failed to read or verify
    repairs: list[Repair] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)   # slot -> why unrecoverable
    device_errors: Counter[tuple[str, str]] = field(default_factory=Counter)


_Started = concurrent.futures.Future[bytes] | DeviceError | None
# Reads a rebuild starts ahead of time (start_stripes) have threads of their own: they are
# large and many, and must not queue up behind them the reads volumes wait for.
_ahead_readers = concurrent.futures.ThreadPoolExecutor(
    max_workers=8, thread_name_prefix="storaged-read-ahead")


@dataclass
class StripeReads:
    """The column reads of some records, for ``verify_stripes``: started by
    ``start_stripes`` (a rebuild reads the next steps while one is verified), done by
    ``result``."""

    # per run: the columns, where they are (first sector, sectors), their started reads
    started: list[tuple[list[int], list[tuple[Device | None, int, str]], int, int,
                        list[_Started]]]
    deadlines: Deadlines
    runs: list[tuple[list[int], list[bytes | None]]] = field(default_factory=list)
    device_errors: Counter[tuple[str, str]] = field(default_factory=Counter)

    def result(self) -> list[tuple[list[int], list[bytes | None]]]:
        """Per run: (columns, their bytes or None where missing or failed); blocks until
        the reads are done, each given up ``deadlines.read`` seconds from now."""
        if self.started:
            seconds = self.deadlines.read
            deadline = None if seconds is None else time.monotonic() + seconds
            for wanted, cols, offset, total, futs in self.started:
                raws: list[bytes | None] = []
                for (dev, base, name), fut in zip(cols, futs, strict=True):
                    if dev is None or fut is None:
                        raws.append(None)
                        continue
                    try:
                        if isinstance(fut, DeviceError):
                            raise fut
                        raws.append(fut.result() if deadline is None or seconds is None
                                    else _finish_read(dev, fut, total * SECTOR,
                                                      base + offset * SECTOR, deadline,
                                                      seconds))
                    except DeviceError:
                        self.device_errors[(name, "read")] += 1
                        raws.append(None)
                self.runs.append((wanted, raws))
            self.started = []
        return self.runs


def _wanted(first: RecordPlan, target: int | None) -> list[int]:
    n = first.k + first.m
    usable = [c for c in range(n) if c != target and first.columns[c][0] is not None]
    # A rebuild needs only k fragments: data columns first (no decoding when all verify).
    return usable if target is None else usable[:first.k]


def start_stripes(plans: Sequence[RecordPlan], dl: Deadlines, *,
                  target: int | None = None) -> StripeReads:
    """Start the reads ``verify_stripes`` begins with, without waiting for them (cheap: it
    may run on the event loop): one read per column per run of adjacent records, of all
    columns (scrub) or k other than ``target`` (rebuild)."""
    out = StripeReads([], dl)
    for run in _runs(plans):
        first = run[0]
        wanted = _wanted(first, target)
        total = sum(p.units for p in run)
        cols = [first.columns[c] for c in wanted]
        out.started.append((wanted, cols, first.offset, total, [
            _start_read(dev, base + first.offset * SECTOR, total * SECTOR, dl,
                        _ahead_readers)
            if dev is not None else None for dev, base, _name in cols]))
    return out


def read_stripes(plans: Sequence[RecordPlan], dl: Deadlines, *,
                 target: int | None = None) -> StripeReads:
    """The reads of ``start_stripes``, done now (scrub): in parallel on the shared reader
    threads, within the deadline."""
    out = StripeReads([], dl)
    for run in _runs(plans):
        first = run[0]
        wanted = _wanted(first, target)
        total = sum(p.units for p in run)
        out.runs.append((wanted, read_columns([first.columns[c] for c in wanted],
                                              first.offset, total, out.device_errors,
                                              dl)))
    return out


def verify_stripes(plans: Sequence[RecordPlan], dl: Deadlines, *, target: int | None = None,
                   reads: StripeReads | None = None) -> StripeOutcome:
    """Scrub (``target`` None): read all k + m fragments of every record, verify each one,
    and rebuild the bad ones from k good ones (``repairs``). Rebuild (``target`` = a
    column): read k other fragments (more only where some are bad), and rebuild the
    target column's fragment -- plus any bad one met on the way. A record with fewer than
    k good fragments is a failure: nothing is written for it.

    Runs of adjacent records of one segment are read with one read per column (``reads``:
    done beforehand by ``read_stripes`` with the same plans and target)."""
    if reads is None:
        reads = read_stripes(plans, dl, target=target)
    got = reads.result()
    out = StripeOutcome()
    out.device_errors.update(reads.device_errors)
    runs = list(_runs(plans))
    if len(runs) != len(got):
        raise ValueError("verify_stripes: the reads are not of these plans")
    for run, (wanted, raws) in zip(runs, got, strict=True):
        _verify_run(run, target, wanted, raws, out, dl)
    return out


def _verify_run(run: Sequence[RecordPlan], target: int | None, wanted: list[int],
                raws: list[bytes | None], out: StripeOutcome, dl: Deadlines) -> None:
    first = run[0]
    k, n = first.k, first.k + first.m
    usable = [c for c in range(n) if c != target and first.columns[c][0] is not None]
    columns: dict[int, memoryview | None] = {}
    for c, raw in zip(wanted, raws, strict=True):
        columns[c] = memoryview(raw) if raw is not None else None
        if raw is not None:
            out.bytes_read += len(raw)
    # Rebuilding one column from k whole columns read: the records whose k fragments all
    # verify are rebuilt together (one zfec call for the run, see _rebuild_batch).
    batch: list[tuple[RecordPlan, int]] | None = (
        [] if target is not None and k > 1 and first.m > 0 and len(wanted) == k
        and all(columns[c] is not None for c in wanted)
        and (target < k or wanted == list(range(k))) else None)
    if batch is not None:
        fast = [(c, col) for c in wanted if (col := columns[c]) is not None]
    pos = 0
    for p in run:
        size = p.units * SECTOR
        if batch is not None and _all_verify(fast, pos, k, p.m, p.plen, p.rhash):
            out.fragments_checked += k
            batch.append((p, pos))
            pos += size
            continue
        chunks: dict[int, memoryview] = {}
        bad: list[int] = []
        for c in wanted:
            col = columns[c]
            out.fragments_checked += 1
            _check_into(col[pos:pos + size] if col is not None else None, c, p, chunks, bad,
                        out.device_errors)
        pos += size
        for c in usable:
            if len(chunks) >= k:
                break
            if c in chunks or c in bad:
                continue
            raw = _frag_bytes(p.columns[c], p.offset, p.units, out.device_errors, dl)
            out.fragments_checked += 1
            if raw is not None:
                out.bytes_read += len(raw)
            _check_into(raw, c, p, chunks, bad, out.device_errors)
        out.bad += len(bad)
        if len(chunks) < k:
            names = [p.columns[c][2] for c in range(n) if c not in chunks]
            out.failures[p.slot] = (
                f"only {len(chunks)} of the {k} fragments it needs verified; bad or "
                f"missing on: {', '.join(names)}")
            continue
        _rebuild_one(p, chunks, bad + ([target] if target is not None else []), out)
    if batch and target is not None:
        _rebuild_batch(batch, target, wanted, columns, out)


def _rebuild_one(p: RecordPlan, chunks: dict[int, memoryview], todo: list[int],
                 out: StripeOutcome) -> None:
    """Fragments ``todo`` of one record from its k verified ``chunks``: from the payload,
    once the payload verifies against the record hash."""
    if not todo:
        return
    k = p.k
    payload = codec.reassemble(chunks, k, p.m, p.plen)
    if not codec.payload_ok(payload, p.rhash):
        out.failures[p.slot] = "fragments verify but the record checksum does not"
        return
    for c in todo:
        dev, base, _name = p.columns[c]
        if dev is not None:
            out.repairs.append(Repair(p.segment, c, dev, base + p.offset * SECTOR,
                                      codec.one_fragment(payload, p.flags, k, p.m, c,
                                                         p.rhash)))


def _all_verify(cols: list[tuple[int, memoryview]], pos: int, k: int, m: int, plen: int,
                rhash: int) -> bool:
    """Whether the fragments at ``pos`` of these columns all verify as their column's
    fragment of this record: ``codec.check_fragment`` (the same checks) inlined for the
    rebuild's common case, where it runs for every fragment read."""
    end = codec.HEADER_SIZE + codec.chunk_length(plen, k)
    for c, col in cols:
        fhash, magic, idx, fk, fm, _flags, fplen, _res, frhash = _unpack_header(col, pos)
        if (magic != _MAGIC or idx != c or fk != k or fm != m or fplen != plen
                or frhash != rhash or len(col) < pos + end
                or _xxh3(col[pos + 8:pos + end]) != fhash):
            return False
    return True


_unpack_header = codec.HEADER.unpack_from
_MAGIC = codec.MAGIC
_xxh3 = xxhash.xxh3_64_intdigest


def _rebuild_batch(batch: list[tuple[RecordPlan, int]], target: int,
                   wanted: list[int], columns: dict[int, memoryview | None],
                   out: StripeOutcome) -> None:
    """Fragment ``target`` of records whose k ``wanted`` fragments all verified, at byte
    ``pos`` of the run's column buffers.

    Erasure coding works byte by byte and every fragment of a record sits at the same
    position of its column, so one zfec call over the span of the column buffers computes
    the target chunk of every record in it (the header bytes in between come out as junk
    and are not used). Each record is then checked as ``_rebuild_one`` checks it: the
    payload (the k data chunks, cut to its length) must hash to the record hash; and the
    fragment written holds exactly the bytes ``codec.one_fragment`` would make (for a data
    target only the payload's bytes are copied, its padding stays zero; a parity target is
    computed this way only when the data chunks' padding is zero, as the encoder made it).
    """
    first = batch[0][0]
    k, m = first.k, first.m
    lo = batch[0][1]
    last = batch[-1]
    hi = last[1] + last[0].units * SECTOR
    ins = tuple(col[lo:hi] for c in wanted if (col := columns[c]) is not None)
    data: list[memoryview]        # the k data columns over [lo, hi)
    if target < k:
        data = [memoryview(b) for b in _decoder(k, m).decode(ins, tuple(wanted))]
        made = data[target]
    else:
        data = list(ins)
        made = memoryview(_encoder(k, m).encode(ins, (target,))[0])
    for p, pos in batch:
        clen = codec.chunk_length(p.plen, k)
        at = pos - lo + codec.HEADER_SIZE
        h = xxhash.xxh3_64()
        pad_ok = True
        for i in range(k):
            valid = min(clen, max(0, p.plen - i * clen))
            h.update(data[i][at:at + valid])
            if target >= k and valid < clen and any(data[i][at + valid:at + clen]):
                pad_ok = False
        if h.intdigest() != p.rhash:
            out.failures[p.slot] = "fragments verify but the record checksum does not"
            continue
        dev, base, _name = p.columns[target]
        if dev is None:
            continue
        if not pad_ok:
            size = p.units * SECTOR
            chunks = {c: chunk for c in wanted if (col := columns[c]) is not None and (
                chunk := codec.check_fragment(col[pos:pos + size], c, k, m, p.plen,
                                              p.rhash)) is not None}
            _rebuild_one(p, chunks, [target], out)
            continue
        keep = min(clen, max(0, p.plen - target * clen)) if target < k else clen
        frag = bytearray(p.units * SECTOR)
        end = codec.HEADER_SIZE + clen
        frag[codec.HEADER_SIZE:codec.HEADER_SIZE + keep] = made[at:at + keep]
        codec.HEADER.pack_into(frag, 0, 0, codec.MAGIC, target, k, m, p.flags, p.plen, 0,
                               p.rhash)
        struct.pack_into("<Q", frag, 0, xxhash.xxh3_64_intdigest(memoryview(frag)[8:end]))
        out.repairs.append(Repair(p.segment, target, dev, base + p.offset * SECTOR, frag))


_encoders: dict[tuple[int, int], zfec.Encoder] = {}
_decoders: dict[tuple[int, int], zfec.Decoder] = {}


def _encoder(k: int, m: int) -> zfec.Encoder:
    enc = _encoders.get((k, m))
    if enc is None:
        enc = _encoders[(k, m)] = zfec.Encoder(k, k + m)
    return enc


def _decoder(k: int, m: int) -> zfec.Decoder:
    dec = _decoders.get((k, m))
    if dec is None:
        dec = _decoders[(k, m)] = zfec.Decoder(k, k + m)
    return dec


def write_repairs(repairs: Sequence[Repair]) -> tuple[int, list[Repair]]:
    """Write rebuilt fragments, adjacent ones on a device as one write; returns the
    bytes written and the repairs whose write failed."""
    done = 0
    failed: list[Repair] = []
    todo = sorted(repairs, key=lambda r: (id(r.device), r.offset))
    i = 0
    while i < len(todo):
        j = i + 1
        while (j < len(todo) and todo[j].device is todo[i].device
               and todo[j].offset == todo[j - 1].offset + len(todo[j - 1].data)):
            j += 1
        group = todo[i:j]
        try:
            group[0].device.pwritev(group[0].offset, [r.data for r in group])
            done += sum(len(r.data) for r in group)
        except DeviceError:
            failed.extend(group)
        i = j
    return done, failed
