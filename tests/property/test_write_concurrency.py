"""The write buffer under concurrency (docs/INTERNALS.md, "Write buffer concurrency",
rules W1-W8; DESIGN invariants 1 and 7).

First the exact interleavings of issue 20 item 1, each made deterministic with a slow
device (a flush holds the writeback lock while its batch is written): a flush that holds
the lock while newer writes arrive and a snapshot is requested (W3), a writeback that fails
while a newer write is buffered (W6), a snapshot cancelled while it waits (W5), and a flush
under writers that never stop (W4).

Then a seeded model checker: many tasks write (aligned and not, disjoint and overlapping),
zero, trim, write with FUA and flush, while others create, diff, delete, clone and roll back
snapshots and the write buffer is so small that writebacks run all the time. Every read is
checked against what was acknowledged, every snapshot against the writes acknowledged before
it was requested and after it completed, and everything flushed against a re-import.
``STORAGED_SOAK_SECONDS`` runs it longer (``make soak``); ``STORAGED_SOAK_SEED`` picks the
seed.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from pool import Device, FileDevice, Pool
from pool.checker import check
from pool.device import Buffer
from pool.faults import FaultyDevice
from tests.conftest import DiskSet
from volumes import Volume, VolumeManager
from volumes import volume as volume_module

MiB = 1 << 20
BS = 64 << 10


class FailingWrites(FaultyDevice):
    """FaultyDevice that fails the next ``fail_next`` writes (after ``write_delay``), then
    writes again: a writeback that fails once, at a chosen moment."""

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.fail_next = 0

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail_next:
            if self.write_delay:
                time.sleep(self.write_delay)
            self.fail_next -= 1
            raise self._fail(f"write at {offset}")
        super().pwrite(offset, data)

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.pwrite(offset, b"".join(buffers))


async def _plain(tmp_path: Path) -> tuple[Pool, FailingWrites]:
    dev = FailingWrites(FileDevice(str(tmp_path / "d0"), create_size=64 * MiB))
    pool = await Pool.create("c", [dev], extent_size=MiB, meta_size=4 * MiB)
    pool.member_health.threshold = 1 << 30          # an injected error must not fault the member
    return pool, dev


async def _reopen(tmp_path: Path, pool: Pool) -> Pool:
    await pool.close()
    return await Pool.open([FileDevice(str(tmp_path / "d0"))])


def _blk(tag: int) -> bytes:
    return bytes([tag]) * BS


async def test_flush_holding_the_lock_never_lets_an_older_batch_win(tmp_path: Path) -> None:
    """W3 (issue 20 item 1): a flush holds the writeback lock while a newer write arrives,
    a snapshot is requested, a still newer write arrives and a second flush is called. The
    second flush makes the newest write durable; the snapshot holds the write acknowledged
    before it was requested (or a newer one); nothing older ever comes back."""
    pool, dev = await _plain(tmp_path)
    vm = VolumeManager(pool)
    vol = await vm.create("v", MiB, block_size=BS, compression=False)
    await vol.write(0, _blk(1))
    dev.write_delay = 0.2
    async with trio.open_nursery() as n:
        n.start_soon(vol.flush)                       # F1: holds the lock, writing 1
        await trio.testing.wait_all_tasks_blocked()
        await vol.write(0, _blk(2))                   # acknowledged before the snapshot
        n.start_soon(vm.snapshot, "v", "s")
        await trio.testing.wait_all_tasks_blocked()
        await vol.write(0, _blk(3))                   # concurrent with the snapshot
        await vol.flush()                             # F2: 3 must be durable now
        dev.write_delay = 0.0
    assert await vol.read(0, BS) == _blk(3)
    assert await vm.snapshot_volume("v", "s").read(0, BS) in (_blk(2), _blk(3))
    snap = await vm.snapshot_volume("v", "s").read(0, BS)
    pool = await _reopen(tmp_path, pool)
    try:
        vm = VolumeManager(pool)
        assert await vm.get("v").read(0, BS) == _blk(3)
        assert await vm.snapshot_volume("v", "s").read(0, BS) == snap
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()


async def test_failed_writeback_never_puts_back_over_a_newer_write(tmp_path: Path) -> None:
    """W6: a writeback fails while a newer write of the same block is buffered and a
    snapshot waits for the lock: the failed batch's older value is not put back over it."""
    pool, dev = await _plain(tmp_path)
    vm = VolumeManager(pool)
    vol = await vm.create("v", MiB, block_size=BS, compression=False)
    await vol.write(0, _blk(1))
    await vol.write(BS, _blk(7))                      # in the failing batch, not rewritten
    dev.write_delay, dev.fail_next = 0.2, 1
    failed: list[BaseException] = []

    async def failing_flush() -> None:
        try:
            await vol.flush()
        except Exception as e:
            failed.append(e)
    async with trio.open_nursery() as n:
        n.start_soon(failing_flush)
        await trio.testing.wait_all_tasks_blocked()
        await vol.write(0, _blk(2))
        n.start_soon(vm.snapshot, "v", "s")
        await trio.testing.wait_all_tasks_blocked()
    dev.write_delay = 0.0
    assert failed and dev.injected_errors == 1
    assert await vol.read(0, 2 * BS) == _blk(2) + _blk(7)
    assert await vm.snapshot_volume("v", "s").read(0, 2 * BS) == _blk(2) + _blk(7)
    await vol.flush()
    pool = await _reopen(tmp_path, pool)
    try:
        vm = VolumeManager(pool)
        assert await vm.get("v").read(0, 2 * BS) == _blk(2) + _blk(7)
        assert await vm.snapshot_volume("v", "s").read(0, 2 * BS) == _blk(2) + _blk(7)
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()


async def test_a_cancelled_snapshot_drops_no_buffered_write(tmp_path: Path) -> None:
    """W5: a snapshot request cancelled while it waits for the writeback lock leaves every
    acknowledged write in the buffer."""
    pool, dev = await _plain(tmp_path)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", MiB, block_size=BS, compression=False)
        await vol.write(0, _blk(1))
        dev.write_delay = 0.2
        async with trio.open_nursery() as n:
            n.start_soon(vol.flush)
            await trio.testing.wait_all_tasks_blocked()
            await vol.write(0, _blk(2))
            with trio.move_on_after(0.05):
                await vm.snapshot("v", "s")
        dev.write_delay = 0.0
        assert "s" not in vm.snapshot_names("v")
        assert await vol.read(0, BS) == _blk(2)
        await vol.flush()
        assert await vol.read(0, BS) == _blk(2)
    finally:
        await pool.close()


async def test_flush_ends_while_writers_keep_writing(tmp_path: Path) -> None:
    """W4: a flush writes what was acknowledged before it was called, once; writers that
    never stop do not hold it (or a snapshot queued behind it) up."""
    pool, dev = await _plain(tmp_path)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", 4 * MiB, block_size=BS, compression=False)
        await vol.write(0, bytes(range(256)) * 256)
        dev.write_delay = 0.02
        stop = trio.Event()
        quota = 400                                   # writes per writer, ~5 ms apart
        done = [0, 0]

        async def writer(i: int) -> None:
            rng = random.Random(i)
            while done[i] < quota and not stop.is_set():
                await vol.write(rng.randrange(64) * BS, rng.randbytes(BS))
                done[i] += 1
                await trio.sleep(0.005)
        async with trio.open_nursery() as n:
            n.start_soon(writer, 0)
            n.start_soon(writer, 1)
            await trio.sleep(0.05)
            await vol.flush()
            await vm.snapshot("v", "s")
            stop.set()
        assert min(done) < quota, "the flush waited for the writers to stop"
    finally:
        await pool.close()


# ---- the model checker ------------------------------------------------------------------

SOAK_SECONDS = float(os.environ.get("STORAGED_SOAK_SECONDS", "12"))
SOAK_SEED = int(os.environ.get("STORAGED_SOAK_SEED", "20"))
M_SIZE = 256 << 10                  # the volume: 64 blocks of 4 KiB, so writers collide
M_BS = 4096
WRITERS = 6
REGION = M_SIZE // WRITERS // M_BS * M_BS     # each writer's own part (disjoint writes)
INF = 1 << 62


@dataclass(eq=False)
class Put:
    """One acknowledged-or-not change of a byte range (write, zeroes, trim, rollback):
    logical times of its call and of its acknowledgement (None: still in flight)."""

    off: int
    data: bytes | None              # None: zeros
    issue: int
    ack: int | None = None
    durable_at_ack: bool = False    # FUA, rollback

    @property
    def end(self) -> int:
        return self.off + (len(self.data) if self.data is not None else self.zlen)

    zlen: int = 0

    def at(self, a: int, b: int) -> bytes:
        if self.data is None:
            return bytes(b - a)
        return self.data[a - self.off:b - self.off]


@dataclass
class Model:
    """The history of the volume and the oracle (rules W1-W6, invariants 1 and 7).

    A read that starts at s and ends at e may return, for each byte, the value of any
    change covering it that was called before e and not overwritten before s (a change
    is overwritten before s when another one covering the byte was called after it was
    acknowledged and was itself acknowledged before s): a register per byte. A snapshot
    requested at r and completed at c is such a read over [r, c]. After a crash, a byte
    may hold any change not overwritten by a durable one (acknowledged before a
    completed flush was called, or FUA)."""

    puts: list[Put] = field(default_factory=list)
    now: int = 1
    durable_before: int = 0         # writes acknowledged before this time are durable
    pending: dict[int, int] = field(default_factory=dict)   # check token -> its start
    checks: int = 0

    def tick(self) -> int:
        self.now += 1
        return self.now

    def begin(self, put: Put) -> Put:
        self.puts.append(put)
        return put

    def durable(self, p: Put) -> bool:
        return p.ack is not None and (p.durable_at_ack or p.ack < self.durable_before)

    def _pieces(self, off: int, end: int) -> tuple[list[Put], list[int]]:
        cover = [p for p in self.puts if p.off < end and off < p.end]
        cuts = {off, end}
        for p in cover:
            cuts.update(x for x in (p.off, p.end) if off < x < end)
        cuts.update(range((off // M_BS + 1) * M_BS, end, M_BS))   # blocks are atomic
        return cover, sorted(cuts)

    def check(self, off: int, got: bytes, start: int, stop: int, what: str, *,
              crash: bool = False) -> None:
        """``got`` (bytes at ``off``) is allowed for a read over [start, stop]; after a
        crash (``crash``) against the durable history instead."""
        self.checks += 1
        cover, cuts = self._pieces(off, off + len(got))
        for a, b in itertools.pairwise(cuts):
            here = [p for p in cover if p.off <= a and b <= p.end]
            if crash:
                t = max((p.issue for p in here if self.durable(p)), default=0)
            else:
                t = max((p.issue for p in here if p.ack is not None and p.ack < start),
                        default=0)
            allowed = [p for p in here if p.issue < stop and (p.ack is None or p.ack >= t)]
            seen = got[a - off:b - off]
            if any(p.at(a, b) == seen for p in allowed):
                continue
            for x in range(a, b):                 # per byte, as the oracle says
                v = seen[x - a]
                assert any(p.at(x, x + 1)[0] == v for p in allowed), (
                    f"{what}: byte {x} (block {x // M_BS}) reads {v:#x}, allowed: "
                    f"{sorted({p.at(x, x + 1)[0] for p in allowed})} from "
                    f"{[(p.off, p.end, p.issue, p.ack) for p in allowed]}")

    def prune(self) -> None:
        """Forget changes that no pending or later check can allow any more: overwritten
        at every byte, before the oldest pending check began, by durable changes."""
        s0 = min(self.pending.values(), default=self.now)
        strong = [p for p in self.puts if self.durable(p) and p.ack is not None
                  and p.ack < s0]
        keep: list[Put] = []
        for p in self.puts:
            if p.ack is None or p.ack >= s0:
                keep.append(p)
                continue
            over = sorted((q.off, q.end) for q in strong
                          if q.issue > p.ack and q.off < p.end and p.off < q.end)
            pos = p.off
            for lo, hi in over:
                if lo > pos:
                    break
                pos = max(pos, hi)
            if pos < p.end:
                keep.append(p)
        self.puts = keep


async def _random_op(vol: Volume, model: Model, rng: random.Random, me: int,
                     counts: dict[str, int]) -> None:
    if rng.random() < 0.5:                        # my own region: disjoint from the others
        lo, hi = me * REGION, (me + 1) * REGION
    else:
        lo, hi = 0, M_SIZE
    shape = rng.random()
    if shape < 0.4:                               # aligned whole blocks
        n = M_BS * rng.randint(1, 3)
        off = rng.randrange(lo, hi - n + 1, M_BS)
    else:                                         # unaligned, maybe across blocks
        n = rng.choice((1, 17, 512, 3000, 4096, 6000))
        off = rng.randrange(lo, hi - n + 1)
    kind = rng.random()
    if kind < 0.55:
        data = rng.randbytes(n)
        fua = rng.random() < 0.08
        put = model.begin(Put(off, data, model.tick(), durable_at_ack=fua))
        if fua or rng.random() < 0.5 or not vol.write_nowait(off, data, owned=True):
            await vol.write(off, data, fua=fua, owned=True)
        put.ack = model.tick()
        counts["fua" if fua else "write"] += 1
    elif kind < 0.65:
        fua = rng.random() < 0.1
        put = model.begin(Put(off, None, model.tick(), durable_at_ack=fua, zlen=n))
        if rng.random() < 0.5:
            await vol.trim(off, n, fua=fua)
            counts["trim"] += 1
        else:
            await vol.write_zeroes(off, n, fua=fua, punch=rng.random() < 0.7)
            counts["zeroes"] += 1
        put.ack = model.tick()
    elif kind < 0.75:
        issued = model.tick()
        await vol.flush()
        model.durable_before = max(model.durable_before, issued)
        counts["flush"] += 1
    else:
        token = model.tick()
        model.pending[token] = token
        try:
            how = rng.random()
            if how < 0.6:
                got = await vol.read(off, n)
            elif how < 0.8:
                buf = bytearray(n)
                await vol.readinto(off, buf)
                got = bytes(buf)
            else:
                quick = vol.read_vectored_nowait(off, n)
                parts = quick if quick is not None else await vol.read_vectored(off, n)
                got = b"".join(parts)
            model.check(off, got, token, model.tick(), f"read {off}+{n}")
        finally:
            del model.pending[token]
        counts["read"] += 1


@dataclass
class Snaps:
    content: dict[str, bytes] = field(default_factory=dict)


async def _snapshot_op(vm: VolumeManager, vol: Volume, model: Model, snaps: Snaps,
                       rng: random.Random, prefix: str, serial: list[int],
                       counts: dict[str, int]) -> None:
    mine = sorted(s for s in snaps.content if s.startswith(prefix))
    kind = rng.random()
    if (kind < 0.35 and len(mine) < 3) or not mine:
        serial[0] += 1
        name = f"{prefix}{serial[0]}"
        token = model.tick()
        model.pending[token] = token
        try:
            await vm.snapshot("v", name)
            done = model.tick()
            got = await vm.snapshot_volume("v", name).read(0, M_SIZE)
            model.check(0, got, token, done, f"snapshot {name}")
        finally:
            del model.pending[token]
        snaps.content[name] = got
        counts["snapshot"] += 1
        return
    name = rng.choice(mine)
    if kind < 0.55:
        token = model.tick()
        model.pending[token] = token
        try:
            ranges = await vm.diff("v", name)
            done = model.tick()
            listed = {b for o, n in ranges for b in range(o // M_BS, -(-(o + n) // M_BS))}
            same = snaps.content[name]
            for b in range(M_SIZE // M_BS):       # unlisted: the live volume was the same
                if b not in listed:
                    model.check(b * M_BS, same[b * M_BS:(b + 1) * M_BS], token, done,
                                f"diff {name}: unlisted block {b}")
        finally:
            del model.pending[token]
        counts["diff"] += 1
    elif kind < 0.7:
        put = model.begin(Put(0, snaps.content[name], model.tick(), durable_at_ack=True))
        await vm.rollback("v", name)
        put.ack = model.tick()
        counts["rollback"] += 1
    elif kind < 0.85:
        serial[0] += 1
        clone = f"{prefix}clone{serial[0]}"
        c = await vm.clone("v", name, clone)
        assert await c.read(0, M_SIZE) == snaps.content[name], f"clone of {name}"
        patch = rng.randbytes(5000)
        at = rng.randrange(0, M_SIZE - 5000)
        await c.write(at, patch)
        expect = bytearray(snaps.content[name])
        expect[at:at + 5000] = patch
        assert await c.read(0, M_SIZE) == bytes(expect), f"clone {clone}"
        await vm.delete(clone)
        counts["clone"] += 1
    else:
        await vm.delete_snapshot("v", name)
        del snaps.content[name]
        counts["delete"] += 1
    for other in mine:                            # snapshots never change (invariant 7)
        if other in snaps.content:
            got = await vm.snapshot_volume("v", other).read(0, M_SIZE)
            assert got == snaps.content[other], f"snapshot {other} changed"


async def _verify_image(pool: Pool, model: Model, snaps: Snaps, *, crash: bool,
                        expect: bytes | None = None) -> None:
    vm = VolumeManager(pool)
    got = await vm.get("v").read(0, M_SIZE)
    if expect is not None:
        assert got == expect, "after close and re-import the volume differs"
    model.check(0, got, model.now, model.now, "re-import", crash=crash)
    assert vm.snapshot_names("v") == sorted(snaps.content)
    for name, content in snaps.content.items():
        assert await vm.snapshot_volume("v", name).read(0, M_SIZE) == content, name
    report = await check(pool, deep=True)
    assert report.ok, report


@pytest.mark.slow
async def test_model_checker_concurrent_writes_flushes_and_snapshots(
        disks: Callable[..., DiskSet], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """W1-W8, invariants 1 and 7: six writers and two snapshot tasks against one volume
    whose write buffer writes back every 16 KiB, with age writebacks and the cleaner
    running meanwhile. Every read, snapshot and diff is checked against the model as it
    happens; at the end a crash image (the devices as they are, no close) must hold
    every flushed write, and a clean close and re-import must read back exactly."""
    monkeypatch.setattr(volume_module, "WRITE_BUFFER", volume_module.WriteBuffer(0))
    monkeypatch.setattr(volume_module, "WRITEBACK_MIN", 4 * M_BS)
    ds = disks(3, 64 * MiB)
    pool = await Pool.create("m", ds.create(), profile="ec:2+1", extent_size=MiB)
    vm = VolumeManager(pool)
    vol = await vm.create("v", M_SIZE, block_size=M_BS, compression=True)
    model = Model()
    model.begin(Put(0, None, 0, 0, durable_at_ack=True, zlen=M_SIZE))
    snaps = Snaps()
    counts: dict[str, int] = dict.fromkeys(
        ("write", "fua", "trim", "zeroes", "flush", "read", "snapshot", "diff",
         "rollback", "clone", "delete", "writeback", "clean"), 0)
    deadline = trio.current_time() + SOAK_SECONDS
    master = random.Random(SOAK_SEED)
    serial = [0]

    async def writer(me: int, seed: int) -> None:
        rng = random.Random(seed)
        while trio.current_time() < deadline:
            await _random_op(vol, model, rng, me, counts)
            if rng.random() < 0.3:
                await trio.lowlevel.checkpoint()

    async def snapshotter(prefix: str, seed: int) -> None:
        rng = random.Random(seed)
        while trio.current_time() < deadline:
            await _snapshot_op(vm, vol, model, snaps, rng, prefix, serial, counts)
            await trio.sleep(rng.random() * 0.02)

    async def background() -> None:
        rounds = 0
        while trio.current_time() < deadline:
            await trio.sleep(0.01)
            counts["writeback"] += await vm.write_back_older_than(0.0)
            model.prune()
            rounds += 1
            if rounds % 20 == 0:                  # the cleaner, as the daemon runs it
                counts["clean"] += await pool.clean()

    try:
        async with trio.open_nursery() as n:
            for me in range(WRITERS):
                n.start_soon(writer, me, master.randrange(1 << 30))
            for prefix in ("a", "b"):
                n.start_soon(snapshotter, prefix, master.randrange(1 << 30))
            n.start_soon(background)
        final = await vol.read(0, M_SIZE)
        model.check(0, final, model.tick(), model.tick(), "final read")
        print(f"seed {SOAK_SEED}, {SOAK_SECONDS:.0f} s: {counts}, {model.checks} checks")
        assert counts["snapshot"] and counts["rollback"] and counts["diff"] \
            and counts["flush"] and counts["read"] > 100
        crash = tmp_path / "crash"
        crash.mkdir()
        image = DiskSet(crash, 3, 64 * MiB, "d")
        image.restore(ds.save())                   # the devices now, nothing closed
        copy = await Pool.open(image.open())
        try:
            await _verify_image(copy, model, snaps, crash=True)
        finally:
            await copy.close()
    finally:
        await pool.close()
    pool = await Pool.open(ds.open())
    try:
        await _verify_image(pool, model, snaps, crash=False, expect=final)
    finally:
        await pool.close()


async def test_a_partial_write_straddling_a_rollback_patches_the_rolled_back_block(
        tmp_path: Path) -> None:
    """W7: a partial write that reads its block from the pool while a rollback replaces
    the map patches the rolled-back content (or lands before the rollback), never the
    content the rollback replaced."""
    pool, dev = await _plain(tmp_path)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", MiB, block_size=BS, compression=False)
        await vol.write(0, _blk(1))
        await vol.flush()
        await vm.snapshot("v", "s")
        await vol.write(0, _blk(2))
        await vol.flush()
        dev.read_delay = 0.2                       # the partial write's read waits
        async with trio.open_nursery() as n:
            n.start_soon(vol.write, 100, b"p" * 10)
            await trio.testing.wait_all_tasks_blocked()
            dev.read_delay = 0.0
            await vm.rollback("v", "s")
        patched = _blk(1)[:100] + b"p" * 10 + _blk(1)[110:]
        assert await vol.read(0, BS) in (patched, _blk(1))
        await vol.flush()
        assert await vol.read(0, BS) in (patched, _blk(1))
        assert await vm.snapshot_volume("v", "s").read(0, BS) == _blk(1)
    finally:
        await pool.close()


async def test_delete_waits_for_the_writeback_under_way(tmp_path: Path) -> None:
    """W7: deleting a volume while a flush writes its buffer back waits for that
    writeback, so no writeback points a deleted map at records (that raised KeyError in
    the flush); the flush succeeds, the pool checks clean and imports without the
    volume."""
    pool, dev = await _plain(tmp_path)
    vm = VolumeManager(pool)
    keep = await vm.create("k", MiB, block_size=BS, compression=False)
    await keep.write(0, _blk(5))
    vol = await vm.create("v", MiB, block_size=BS, compression=False)
    await vol.write(0, _blk(1))
    dev.write_delay = 0.2
    async with trio.open_nursery() as n:
        n.start_soon(vol.flush)
        await trio.testing.wait_all_tasks_blocked()
        await vm.delete("v")
    dev.write_delay = 0.0
    await keep.flush()
    assert vm.names() == ["k"]
    assert (await check(pool, deep=True)).ok
    pool = await _reopen(tmp_path, pool)
    try:
        vm = VolumeManager(pool)
        assert vm.names() == ["k"]
        assert await vm.get("k").read(0, BS) == _blk(5)
        assert (await check(pool, deep=True)).ok
    finally:
        await pool.close()
