"""Send and receive: a snapshot (or the change between two) as one self-describing stream.

``send`` yields the stream of ``volume@snap`` (only the blocks that differ from ``base``
for an incremental); it reads the snapshot, so the volume stays online and writable.
``Receiver`` applies a stream: into a hidden partial volume that no frontend sees, which
becomes the real volume (with its snapshot) in one commit when the end record verifies.
A refused stream leaves the pool as it was; an interrupted one is kept for ``resume``
only when the receive asked for it (``resumable``), like ``zfs receive -s``.

The record plan is a pure function of the snapshot's block map, so a resumed send
(``resume_seq``) produces exactly the records a receiver is missing.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from pool.errors import AlreadyExists, Busy, InvalidArgument, NotFound, StorageError
from pool.iovec import IOV_MAX, WriteBehind, advance
from pool.profile import Profile
from volumes import stream
from volumes.manager import VolumeManager, _check_size
from volumes.openers import refuse_in_use
from volumes.records import ReceiveState, SnapshotRecord, VolumeRecord
from volumes.volume import Volume, check_block_size

log = logging.getLogger(__name__)
CHECKPOINT = 64 << 20          # resumable receives record their progress this often
SEND_AHEAD = 16                # records a send reads and compresses ahead of its reader
# A send's bytes: ``async with chunks as it: async for pieces in it``, each part of the
# stream (its header, a record, the end) as buffers to write back to back.
Chunks = AbstractAsyncContextManager[trio.abc.ReceiveChannel[list[stream.Buffer]]]
APPLY_PARALLEL = 4             # records a receive writes at once
WRITE_BATCH = 8 << 20          # bytes of stream a send writes to a descriptor per thread hop
READ_BATCH = 4 << 20           # bytes of stream a receive reads from a descriptor per hop


# ==== snapshots' identity ===================================================================
def latest_snapshot(vm: VolumeManager, volume: str) -> tuple[str, SnapshotRecord] | None:
    snaps = vm.snapshots_of(volume)
    if not snaps:
        return None
    name = max(snaps, key=lambda s: (snaps[s][1].created, snaps[s][0]))
    return name, snaps[name][1]


async def snapshot_uuid(vm: VolumeManager, volume: str, snap: str) -> str:
    """The snapshot's stream identity (given at creation; older snapshots get one now)."""
    return await vm.snapshot_uuid(volume, snap)


# ==== send ==================================================================================
def plan(vm: VolumeManager, volume: str, snap: str,
         base: str | None) -> list[tuple[int, int, int]]:
    """(kind, offset, length) of each record: runs of data (and, for an incremental, of
    blocks that became holes), at most ``stream.CHUNK`` bytes each, in block order."""
    _o, meta = vm.snapshot_record(volume, snap)
    bs, size = meta.block_size, meta.size
    nblocks = -(-size // bs)
    mapped = set(vm.pool.mapped_blocks(meta.map, 0, nblocks))
    if base is None:
        blocks = sorted(mapped)
        limit = size
    else:
        _ob, bmeta = vm.snapshot_record(volume, base)
        if bmeta.block_size != bs:
            raise InvalidArgument("base and snapshot have different block sizes")
        blocks = sorted(vm.pool.diff_maps(bmeta.map, meta.map))
        limit = max(size, bmeta.size)
    out: list[tuple[int, int, int]] = []
    for b in blocks:
        start = b * bs
        if start >= limit:
            break
        kind = stream.DATA if b in mapped else stream.HOLE
        length = min(bs, limit - start)
        if out:
            k, o, n = out[-1]
            cap = stream.CHUNK if kind == stream.DATA else stream.MAX_HOLE
            if k == kind and o + n == start and n + length <= cap:
                out[-1] = (k, o, n + length)
                continue
        out.append((kind, start, length))
    return out


async def send(vm: VolumeManager, volume: str, snap: str, base: str | None = None,
               resume_seq: int = 0) -> tuple[dict[str, Any], Chunks]:
    """The stream's header fields and its bytes: ``async with chunks as it: async for
    piece in it``. Everything is checked before the first byte, so a refusal never leaves
    a half stream behind. Records are read and encoded up to SEND_AHEAD ahead of the
    reader, so reading the volume overlaps writing the stream out."""
    _o, meta = vm.snapshot_record(volume, snap)
    suuid = await snapshot_uuid(vm, volume, snap)
    base_info: dict[str, Any] | None = None
    if base is not None:
        if base == snap:
            raise InvalidArgument("an incremental stream needs a base other than the snapshot")
        bo, bmeta = vm.snapshot_record(volume, base)
        if (bmeta.created, bo) > (meta.created, _o):
            raise InvalidArgument(f"base @{base} is newer than @{snap}: send from an older "
                                  f"snapshot")
        base_info = {"name": base, "uuid": await snapshot_uuid(vm, volume, base),
                     "size": bmeta.size}
    records = plan(vm, volume, snap, base)
    if resume_seq < 0 or resume_seq > len(records):
        raise InvalidArgument(f"resume point {resume_seq} is outside this stream's "
                              f"{len(records)} records")
    header: dict[str, Any] = {
        "format": stream.VERSION,
        "volume": {"name": volume, "size": meta.size, "block_size": meta.block_size,
                   "profile": meta.profile, "compression": meta.compression},
        "snapshot": {"name": snap, "uuid": suuid, "created": meta.created},
        "base": base_info, "chunk": stream.CHUNK, "records": len(records),
        "data_bytes": sum(n for k, _o2, n in records if k == stream.DATA),
        "resume": {"seq": resume_seq} if resume_seq else None,
        "sent": int(time.time()),
    }
    qos = vm.get(volume).qos.encode()
    if qos:     # an optional property, which the receiver takes when valid
        header["volume"]["qos"] = qos
    view = vm.snapshot_volume(volume, snap)

    seed = stream.stream_seed(header)

    @trio.as_safe_channel
    async def chunks() -> AsyncGenerator[list[stream.Buffer], None]:
        yield [stream.encode_header(header)]
        summer = stream.Summer(seed)
        # Each record gets a slot, queued in order; SEND_AHEAD loads (device reads and
        # lz4, both in threads) run at once, and the reader takes the slots in order.
        slots_send, slots_recv = trio.open_memory_channel[_Slot](SEND_AHEAD)
        failure: list[StorageError] = []
        async with trio.open_nursery() as nursery:
            async def feed() -> None:
                limit = trio.Semaphore(SEND_AHEAD)
                async with slots_send:
                    for seq in range(resume_seq, len(records)):
                        await limit.acquire()
                        slot = _Slot(stream.Summer(seed))
                        nursery.start_soon(_load, view, records[seq], seq, slot, limit)
                        await slots_send.send(slot)
            nursery.start_soon(feed)
            async with slots_recv:
                async for slot in slots_recv:
                    await slot.done.wait()
                    if slot.error is not None:
                        failure.append(slot.error)
                        nursery.cancel_scope.cancel()
                        break
                    summer.merge(slot.counts)
                    yield slot.data
        if failure:
            raise failure[0]
        yield stream.encode_end(len(records), summer)
    return header, chunks()


class _Slot:
    """One record of a send on its way: its bytes (or error) once ``done`` is set."""

    def __init__(self, counts: stream.Summer) -> None:
        self.counts = counts
        self.done = trio.Event()
        self.data: list[stream.Buffer] = []
        self.error: StorageError | None = None


async def _load(view: Volume, rec: tuple[int, int, int], seq: int, slot: _Slot,
                limit: trio.Semaphore) -> None:
    """Read and encode one record of a send into its slot."""
    kind, offset, length = rec
    try:
        if kind == stream.DATA:
            data = bytearray(length)       # the record's own: it leaves as it is
            await view.readinto(offset, data)
            if view.may_compress(offset, length):
                # lz4 takes a while: a worker thread (it lets go of the GIL).
                slot.data = await trio.to_thread.run_sync(stream.encode_data, seq, offset,
                                                          data, slot.counts)
            else:
                # Only the record's hash (tens of µs a MiB): less than a thread hop costs.
                slot.data = stream.encode_data(seq, offset, data, slot.counts, False)
        else:
            slot.data = stream.encode_record(stream.HOLE, seq, offset, length, b"",
                                             slot.counts)
    except StorageError as e:
        slot.error = e
    finally:
        limit.release()
        slot.done.set()


# ==== a stream to and from a file descriptor ================================================
class FdSink:
    """Where a stream is written when the client hands over a file descriptor (what
    ``storagectl send`` does with its -o file or stdout).

    A regular file is written from worker threads (a batch of parts per thread hop),
    written behind (pool.iovec.WriteBehind) and made durable by ``sync``. A pipe or
    socket is made non-blocking and written from the event loop, waiting while it is
    full: a reader that stops reading holds up only this send, which stays cancellable.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self.pos = os.lseek(fd, 0, os.SEEK_CUR) if self.regular else 0
        self._behind = WriteBehind(fd) if self.regular else None
        if not self.regular:
            os.set_blocking(fd, False)

    async def put(self, pieces: Sequence[stream.Buffer]) -> None:
        if self.regular:
            await trio.to_thread.run_sync(self.write, pieces)
            return
        views = [memoryview(p).cast("B") for p in pieces if len(p)]
        while views:
            try:
                n = os.writev(self.fd, views[:IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)
                continue
            views = advance(views, n)

    def write(self, pieces: Sequence[stream.Buffer]) -> None:
        """Blocking write of a regular file's next parts (from a worker thread)."""
        views = [memoryview(p).cast("B") for p in pieces if len(p)]
        start = self.pos
        while views:
            n = os.writev(self.fd, views[:IOV_MAX])
            self.pos += n
            views = advance(views, n)
        if self._behind is not None:
            self._behind.wrote(start, self.pos)

    def sync(self) -> None:
        """Make what was written durable (a regular file only; blocking); raises OSError."""
        if self._behind is not None:
            try:
                self._behind.sync()
            finally:
                self._behind.join()


async def write_out(chunks: Chunks, sink: FdSink, *,
                    progress: Callable[[int], Awaitable[None]] | None = None) -> int:
    """Write a send's stream into ``sink``, the parts gathered up to WRITE_BATCH bytes
    per write (for a file, one thread hop per batch, while the next records are read and
    compressed); the bytes written. Durable only after ``sink.sync``."""
    total = size = 0
    batch: list[stream.Buffer] = []
    async with chunks as it:
        async for pieces in it:
            batch += pieces
            size += sum(map(len, pieces))
            if size >= WRITE_BATCH:
                await sink.put(batch)
                total, size, batch = total + size, 0, []
                if progress is not None:
                    await progress(total)
    if batch:
        await sink.put(batch)
        total += size
    return total


async def read_in(fd: int) -> AsyncIterator[bytes]:
    """A stream read from a file descriptor, about READ_BATCH bytes at a time (each piece
    immutable: a receive keeps views into it). A regular file is read in worker threads;
    a pipe or socket is made non-blocking and read from the event loop, waiting for data
    (cancellable)."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        while data := await trio.to_thread.run_sync(os.read, fd, READ_BATCH):
            yield data
        return
    os.set_blocking(fd, False)
    pieces: list[bytes] = []
    size = 0
    while True:
        try:
            data = os.read(fd, READ_BATCH - size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        if data:
            pieces.append(data)
            size += len(data)
        if size and (size >= READ_BATCH or not data):
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces, size = [], 0
        if not data:
            return


# ==== receive ===============================================================================
def _partial_name(target: str) -> str:
    return f"%recv:{target}"


class Receiver:
    """Apply one stream to ``target`` in ``vm``. Call ``feed`` with the bytes as they come,
    then ``finish`` (after the end record) or ``abort`` (the stream broke off)."""

    def __init__(self, vm: VolumeManager, target: str, *, profile: str | None = None,
                 resumable: bool = False, resume: bool = False, force: bool = False) -> None:
        self.vm = vm
        self.target = target
        self.profile = profile
        self.resumable = resumable or resume
        self.resume = resume
        self.force = force
        self.parser = stream.StreamParser()
        self.partial: Volume | None = None
        self._skip_below = 0          # records already applied by an earlier try
        self._next = 0                # every record before this one is applied
        self._applied: set[int] = set()
        self._checkpoint_lock = trio.Lock()
        self._error: stream.StreamError | None = None
        self._since_checkpoint = 0
        self.applied_bytes = 0
        self.done: dict[str, Any] | None = None

    # -- checks at the header, before anything changes ----------------------------------
    def _check_header(self, h: dict[str, Any]) -> None:
        try:
            vol, snap = h["volume"], h["snapshot"]
            size, bs = int(vol["size"]), int(vol["block_size"])
            if not isinstance(snap["name"], str) or not isinstance(snap["uuid"], str):
                raise TypeError("snapshot name and uuid must be strings")
        except (KeyError, TypeError, ValueError) as e:
            raise stream.StreamError(f"the stream header is malformed: {e}") from None
        if size <= 0 or bs <= 0:
            raise stream.StreamError("the stream header gives a bad volume size")
        partial = self.vm.partial(self.target)
        if self.resume:
            if partial is None:
                raise NotFound(f"no interrupted receive into {self.target} to resume")
            kept = partial.receiving
            assert kept is not None
            if kept.snapshot != snap["uuid"] or kept.base != (
                    h["base"]["uuid"] if h.get("base") else None):
                raise InvalidArgument(
                    f"this stream is not the one the interrupted receive into {self.target} "
                    f"was reading (that was @{kept.snapshot_name})")
            start = (h.get("resume") or {}).get("seq", 0)
            if start > kept.seq:
                raise InvalidArgument(f"the stream resumes at record {start} but only "
                                      f"{kept.seq} were received: send with --resume "
                                      f"{kept.seq}")
            self._skip_below = kept.seq
            self._next = start        # this stream's first record
            return
        if h.get("resume"):
            raise InvalidArgument("this is a resumed stream: receive it with --resume")
        if partial is not None and partial.receiving is not None \
                and partial.receiving.resumable:
            raise Busy(f"an interrupted receive into {self.target} is kept: continue it "
                       f"with --resume, or discard it with --abort")
        base = h.get("base")
        snaps = self.vm.snapshots_of(self.target)
        if base is None:
            if self.vm.has_volume(self.target):
                raise AlreadyExists(f"volume {self.target!r} already exists in pool "
                                    f"{self.vm.pool.name}: a full stream makes a new volume "
                                    f"(an incremental one applies onto an existing one)")
            return
        if not self.vm.has_volume(self.target):
            raise NotFound(f"no volume {self.target!r} in pool {self.vm.pool.name} for this "
                           f"incremental stream (it needs @{base['name']} there)")
        latest = latest_snapshot(self.vm, self.target)
        if latest is None or latest[1].uuid != base["uuid"]:
            have = (f"its latest snapshot is @{latest[0]}" if latest else "it has no "
                    "snapshots")
            raise InvalidArgument(f"this incremental stream applies onto @{base['name']} "
                                  f"(uuid {base['uuid']}); volume {self.target} does not "
                                  f"have it as its latest snapshot ({have})")
        if snap["name"] in snaps:
            raise AlreadyExists(f"volume {self.target!r} already has a snapshot "
                                f"{snap['name']!r}")

    async def _start(self, h: dict[str, Any]) -> None:
        vm, pool = self.vm, self.vm.pool
        if self.resume:
            self.partial = vm.partial(self.target)
            assert self.partial is not None
            self.partial.streaming = True
            log.info("pool %s: resuming the receive into %s at record %d", pool.name,
                     self.target, self._skip_below)
            return
        crashed = vm.partial(self.target)
        if crashed is not None:                  # a crashed, non-resumable receive
            await vm.discard_partial(crashed)
        vol, snap, base = h["volume"], h["snapshot"], h.get("base")
        if base is not None:
            latest = latest_snapshot(vm, self.target)
            assert latest is not None
            changed = await vm.diff(self.target, latest[0])
            if changed and not self.force:
                raise Busy(f"volume {self.target} was written after @{latest[0]}: receive "
                           f"with --force to discard those writes")
            target = vm.get(self.target)
            if not self.force:
                # An increment replaces the content under the clients, as a rollback does:
                # refused before anything is written (checked again at the end).
                refuse_in_use(f"volume {pool.name}/{self.target}", list(target.openers),
                              "receive an increment into it")
            source_map, src_size = latest[1].map, latest[1].size
            prof, comp, bs = str(target.profile), target.compression, target.block_size
            if bs != vol["block_size"]:
                raise InvalidArgument("the stream's block size differs from the volume's")
            size = max(src_size, vol["size"])
            map_id = pool.clone_map(source_map)
        else:
            p = Profile.parse(self.profile) if self.profile else pool.default_profile
            pool.check_profile(p)
            prof, comp, bs, size = str(p), bool(vol["compression"]), vol["block_size"], \
                vol["size"]
            check_block_size(bs)
            _check_size(size, bs)
            map_id = pool.create_map()
        record = VolumeRecord(
            _partial_name(self.target), size, bs, prof, comp, map_id, int(time.time()),
            receiving=ReceiveState(self.target, snap["uuid"], snap["name"],
                                   base["uuid"] if base else None, 0, self.resumable, h))
        obj_id = pool.put_object(record.encode())
        self.partial = vm.add_partial(self.target, obj_id, record)
        self.partial.streaming = True
        await pool.commit()

    # -- the records ----------------------------------------------------------------------
    async def feed(self, data: bytes) -> None:
        self.parser.feed(data)
        more = True
        while more:
            # Parse (verify, decompress) every complete record in one thread hop.
            events, more = await trio.to_thread.run_sync(self._parse_some)
            for ev in events:
                await self._handle(ev)

    def _parse_some(self) -> tuple[list[object], bool]:
        """Parse (verify, decompress) up to 16 parts of what was fed; with whether there
        may be more (False: the parser needs more data first)."""
        if self._error is not None:
            raise self._error
        out: list[object] = []
        while len(out) < 16:
            try:
                ev = self.parser.next()
            except stream.StreamError as e:
                if not out:
                    raise
                self._error = e         # apply the good records first
                return out, True
            if ev is stream.NEED_DATA:
                return out, False
            out.append(ev)
            if isinstance(ev, stream.Header):
                break                   # checked before any record is parsed
        return out, True

    async def _handle(self, ev: object) -> None:
        if isinstance(ev, stream.Header):
            self._check_header(ev.fields)
            await self._start(ev.fields)
        elif isinstance(ev, stream.Record):
            await self._apply(ev)
        elif isinstance(ev, stream.End):
            await self._finish()

    async def _apply(self, rec: stream.Record) -> None:
        part = self.partial
        assert part is not None
        if rec.seq < self._skip_below:
            self._mark(rec.seq)
            return
        end = rec.offset + rec.length
        if end > part.size:
            raise stream.StreamError(f"record {rec.seq} reaches byte {end}, past the volume's "
                                     f"{part.size}")
        if rec.data is not None:
            # The parser never changes bytes fed to it: full blocks are buffered as views
            # of the received frame, not copied.
            await part.write(rec.offset, rec.data, owned=True,
                             compressible=not rec.incompressible)
            self.applied_bytes += rec.length
        else:
            await part.write_zeroes(rec.offset, rec.length)
        self._mark(rec.seq)
        self._since_checkpoint += rec.length
        if self.resumable and self._since_checkpoint >= CHECKPOINT:
            self._since_checkpoint = 0
            async with self._checkpoint_lock:
                await self._checkpoint()

    def _mark(self, seq: int) -> None:
        """Record ``seq`` as applied; ``_next`` is the end of the unbroken applied prefix
        (records may finish out of order when applied concurrently)."""
        self._applied.add(seq)
        while self._next in self._applied:
            self._applied.discard(self._next)
            self._next += 1

    async def run(self, source: AsyncIterator[bytes | bytearray]) -> None:
        """Receive a whole stream from ``source``: parsing overlaps the writes, which run
        APPLY_PARALLEL at a time (records cover distinct ranges, so their order does not
        matter until the end record). Returns when the source ends; ``done`` says whether
        the stream was complete. Storage and stream errors are raised as themselves (the
        first one); records already queued are then skipped, writes under way finish."""
        send, recv = trio.open_memory_channel[stream.Record](2 * APPLY_PARALLEL)
        failure: list[BaseException] = []
        ended = False

        async def worker(chan: trio.MemoryReceiveChannel[stream.Record]) -> None:
            async with chan:
                async for rec in chan:
                    if failure:
                        continue
                    try:
                        await self._apply(rec)
                    except StorageError as e:
                        failure.append(e)

        # The source is read one piece ahead, so reading it overlaps parsing and applying.
        pieces_send, pieces_recv = trio.open_memory_channel[bytes | bytearray](1)
        reading = trio.CancelScope()

        async def reader() -> None:
            with reading:
                async with pieces_send:
                    try:
                        async for data in source:
                            await pieces_send.send(data)
                    except trio.BrokenResourceError:
                        pass
                    except Exception as e:  # the source's own error, raised as itself
                        failure.append(e)

        async with trio.open_nursery() as nursery:
            async with recv:
                for _ in range(APPLY_PARALLEL):
                    nursery.start_soon(worker, recv.clone())
            nursery.start_soon(reader)
            try:
                async with send, pieces_recv:
                    async for data in pieces_recv:
                        if failure:
                            break
                        self.parser.feed(data)
                        more = True
                        while more and not ended and not failure:
                            events, more = await trio.to_thread.run_sync(self._parse_some)
                            for ev in events:
                                if isinstance(ev, stream.Header):
                                    self._check_header(ev.fields)
                                    await self._start(ev.fields)
                                elif isinstance(ev, stream.Record):
                                    await send.send(ev)
                                elif isinstance(ev, stream.End):
                                    ended = True
            except StorageError as e:
                # Never cancel the workers: a write cut off half-way is not what a
                # checkpoint may record. They skip what is queued and the nursery ends.
                failure.append(e)
            if failure:
                reading.cancel()    # stop reading a stream that is refused
        if failure:
            raise failure[0]
        if ended:
            await self._finish()

    async def _checkpoint(self) -> None:
        """Record how far the partial volume is durable, for a resume."""
        part = self.partial
        assert part is not None
        await part.flush()
        part.note_received(max(self._next, self._skip_below))
        await self.vm.pool.commit()
        self._since_checkpoint = 0

    async def _finish(self) -> None:
        """The end verified: the partial volume becomes the volume, with its snapshot,
        in one commit."""
        vm, pool, part = self.vm, self.vm.pool, self.partial
        assert part is not None and self.parser.header is not None
        h = self.parser.header.fields
        await part.flush()
        size, snap = int(h["volume"]["size"]), h["snapshot"]
        if size < part.size:
            await part.trim(size, part.size - size)
            await part.flush()
        if h.get("base") is not None:
            await vm.claim_volume(self.target, "receive an increment into it",
                                  force=self.force)
        part.streaming = False          # from now on an ordinary volume
        if h.get("base") is None:
            part.finish_receive(self.target, size)
            vm.promote_partial(self.target, volume=True)
            vm.apply_received_qos(part, h["volume"].get("qos"))
            vol = part
        else:
            vm.promote_partial(self.target, volume=False)
            vol = vm.get(self.target)
            new_map = part.map_id

            def swap() -> None:
                old = vol.replace_map(new_map, size)
                pool.delete_object(part.obj_id)
                pool.delete_map(old)
            await vol.writeback_then(swap)
        vm.add_snapshot(self.target, SnapshotRecord(
            vol.obj_id, snap["name"], pool.clone_map(vol.map_id), size, vol.block_size,
            str(vol.profile), vol.compression, int(snap["created"]), snap["uuid"]))
        await pool.commit()
        self.done = {"volume": self.target, "snapshot": snap["name"],
                     "incremental": h.get("base") is not None,
                     "records": self.parser.next_seq, "applied_bytes": self.applied_bytes}
        log.info("pool %s: received %s@%s (%d records, %d bytes applied)", pool.name,
                 self.target, snap["name"], self.parser.next_seq, self.applied_bytes)

    async def abort(self, why: str, *, interrupted: bool) -> str:
        """The stream failed. A resumable receive that was merely interrupted keeps what
        it has (durably) for ``resume``; anything else leaves the pool as it was."""
        part = self.partial
        if self.done is not None:
            return why
        if part is None:
            return f"{why}; nothing was kept"
        if interrupted and self.resumable:
            with trio.CancelScope(shield=True):
                await self._checkpoint()
            seq = max(self._next, self._skip_below)
            log.info("pool %s: receive into %s interrupted at record %d (kept for resume)",
                     self.vm.pool.name, self.target, seq)
            return (f"{why}; {seq} records are kept: send again with --resume {seq} and "
                    f"receive with --resume (or --abort to discard)")
        with trio.CancelScope(shield=True):
            await self.vm.discard_partial(part)
        return f"{why}; nothing was kept"


async def abort_receive(vm: VolumeManager, target: str) -> None:
    """Discard the kept state of an interrupted receive into ``target``."""
    part = vm.partial(target)
    if part is None:
        raise NotFound(f"no interrupted receive into {target}")
    await vm.discard_partial(part)


def receive_state(vm: VolumeManager, target: str) -> dict[str, Any] | None:
    part = vm.partial(target)
    if part is None:
        return None
    kept = part.receiving
    assert kept is not None
    return {"volume": target, "snapshot": kept.snapshot_name, "seq": kept.seq,
            "resumable": kept.resumable}
