"""Property test: a volume behaves like a bytearray (invariants 1, 6).

Hypothesis generates programs of write / partial write / trim / write-zeroes / flush /
reopen / concurrent-overlapping-writes ops; each program runs against a real pool on file
devices and against a plain bytearray model, and every read (``read``, the no-wait,
vectored and sparse reads, ``readinto``) must match byte for byte. A
reopen closes and re-imports the pool from its device files, so everything written before
the close must come back (a close writes back and commits). Space must be given back: after
trimming everything, nothing stays mapped.

``_run`` takes the pool's backend (``Files`` here; tests/rados/test_pool.py runs the same
programs on a pool on Ceph RADOS).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Protocol

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool import FileDevice, Pool
from pool.checker import check
from volumes import Volume, VolumeManager

VOL = 256 << 10
BS = 4096


@dataclass(frozen=True)
class Op:
    kind: str
    offset: int = 0
    length: int = 0
    seed: int = 0


def _ranges() -> st.SearchStrategy[tuple[int, int]]:
    return st.integers(0, VOL - 1).flatmap(
        lambda off: st.tuples(st.just(off), st.integers(1, min(VOL - off, 3 * BS + 100))))


ops = st.one_of(
    st.builds(lambda r, s: Op("write", r[0], r[1], s), _ranges(), st.integers(0, 255)),
    st.builds(lambda r: Op("trim", r[0], r[1]), _ranges()),
    st.builds(lambda r: Op("zero", r[0], r[1]), _ranges()),
    st.builds(lambda r, s: Op("pattern", r[0], r[1], s), _ranges(), st.integers(0, 255)),
    st.builds(lambda s: Op("race", 0, 0, s), st.integers(0, 1 << 16)),
    st.just(Op("flush")),
    st.just(Op("reopen")),
)


def _data(op: Op) -> bytes:
    if op.kind == "pattern":  # compressible
        return bytes([op.seed]) * op.length
    return os.urandom(op.length)


class Backend(Protocol):
    """Where a program's pool lives: made new, imported again after a close, removed."""

    async def create(self) -> Pool: ...

    async def reopen(self) -> Pool: ...

    def cleanup(self) -> None: ...


class Files:
    """A pool on ``ndev`` file devices in a scratch directory."""

    def __init__(self, profile: str, ndev: int) -> None:
        self.profile = profile
        self.tmp = tempfile.mkdtemp(prefix="vm-")
        self.paths = [os.path.join(self.tmp, f"d{i}") for i in range(ndev)]

    async def create(self) -> Pool:
        return await Pool.create("model", [FileDevice(p, create_size=32 << 20)
                                           for p in self.paths],
                                 profile=self.profile, extent_size=256 << 10,
                                 meta_size=2 << 20)

    async def reopen(self) -> Pool:
        return await Pool.open([FileDevice(p) for p in reversed(self.paths)])

    def cleanup(self) -> None:
        for p in self.paths:
            os.unlink(p)
        os.rmdir(self.tmp)


async def _run(program: list[Op], profile: str, ndev: int,
               backend: Backend | None = None) -> None:
    where = backend if backend is not None else Files(profile, ndev)
    pool = await where.create()
    vol: Volume = await VolumeManager(pool).create("v", VOL, block_size=BS)
    model = bytearray(VOL)
    try:
        for op in program:
            if op.kind in ("write", "pattern"):
                data = _data(op)
                # Half the writes try the no-wait path first (what NBD and iSCSI do),
                # which takes them only when nothing needs waiting for.
                if op.seed % 2 or not vol.write_nowait(op.offset, data):
                    await vol.write(op.offset, data)
                model[op.offset:op.offset + op.length] = data
            elif op.kind in ("trim", "zero"):
                fn = vol.trim if op.kind == "trim" else vol.write_zeroes
                await fn(op.offset, op.length)
                model[op.offset:op.offset + op.length] = bytes(op.length)
            elif op.kind == "race":
                # Two overlapping partial-block writes at once: the result must be one of
                # the two orders, never a mix of a stale base with either.
                a, b = os.urandom(3000), os.urandom(3000)
                off = (op.seed % (VOL // BS - 2)) * BS + 500
                async with trio.open_nursery() as n:
                    n.start_soon(vol.write, off, a)
                    n.start_soon(vol.write, off + 1000, b)
                one, two = bytearray(model), bytearray(model)
                one[off:off + 3000] = a
                one[off + 1000:off + 4000] = b
                two[off + 1000:off + 4000] = b
                two[off:off + 3000] = a
                got = await vol.read(off - 500, 5000)
                assert got in (bytes(one[off - 500:off + 4500]),
                               bytes(two[off - 500:off + 4500])), "racing writes mixed"
                model = one if got == bytes(one[off - 500:off + 4500]) else two
            elif op.kind == "flush":
                await vol.flush()
            elif op.kind == "reopen":
                await pool.close()
                pool = await where.reopen()
                vol = VolumeManager(pool).get("v")
            assert await vol.read(0, VOL) == bytes(model), f"mismatch after {op}"
            # Into a caller's buffer (whole blocks straight from the pool where they can
            # be), at an odd place in a larger one.
            into = bytearray(VOL + 3)
            await vol.readinto(0, memoryview(into)[1:VOL + 1])
            assert into[1:VOL + 1] == model and into[0] == into[-1] == 0, f"after {op}"
            # The cheap count FUSE attributes use (map leaf counts and the write buffer)
            # agrees with the walk over every block.
            assert vol.mapped_bytes() == vol.statistics().mapped_bytes, f"after {op}"
            # The no-wait path (cached reads answered without a task) agrees whenever it
            # answers: here, a small read right after the whole volume was read.
            # Across blocks (the general path) and inside one block (its own path).
            lo = (op.seed * 7919) % (VOL - 8192)
            small = lo + (op.seed % BS) // 2
            for at, size in ((lo, 8192), (small, BS - small % BS), (lo - lo % BS, BS)):
                quick = vol.read_sparse_nowait(at, size)
                if quick is not None:
                    assert quick == await vol.read_sparse(at, size), f"no-wait read after {op}"
                    assert b"".join(b for _o, k, d in quick
                                    for b in (d if d is not None else [bytes(k)])) \
                        == bytes(model[at:at + size])
                # The vectored reads (iSCSI's Data-In) give the same bytes as buffers.
                parts = vol.read_vectored_nowait(at, size)
                if parts is not None:
                    assert b"".join(parts) == bytes(model[at:at + size]), f"after {op}"
                assert b"".join(await vol.read_vectored(at, size)) == \
                    bytes(model[at:at + size]), f"vectored read after {op}"
                await vol.readinto(at, memoryview(into)[:size])
                assert into[:size] == model[at:at + size], f"readinto after {op}"
        report = await check(pool)
        assert report.ok, report.render()
        # Thin: trimming everything releases every block (invariant 6).
        await vol.trim(0, VOL)
        await vol.flush()
        assert vol.statistics().mapped_bytes == 0
        assert vol.statistics().stored_bytes == 0
        assert await vol.read(0, VOL) == bytes(VOL)
        assert pool.statistics().live_bytes == 0
    finally:
        await pool.close()
        where.cleanup()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=40))
def test_volume_matches_model_ec(program: list[Op]) -> None:
    trio.run(_run, program, "ec:2+1", 3)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=40))
def test_volume_matches_model_plain(program: list[Op]) -> None:
    trio.run(_run, program, "plain", 1)
