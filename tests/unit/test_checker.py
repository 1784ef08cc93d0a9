"""The pool checker (pool/checker.py), one function per check: each names the fault it
is for and nothing else, check() reports what they found in order, and a sound pool is
clean, deep included (DESIGN invariant 4: what is stored verifies or is named)."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable

import pytest
import trio

from pool import Pool
from pool import checker as C
from pool.layout import PAGE_UNIT
from tests.conftest import DiskSet
from tests.kit.poolkit import filled_pool, read_all, rotten_pool
from volumes import VolumeManager

Disks = Callable[..., DiskSet]
SIZE = 1 << 20


def _sound_parts(pool: Pool) -> list[str]:
    scan = C.scan_records(pool)
    return (C.check_members(pool) + C.check_blobs(pool) + C.check_segments(pool)
            + C.check_map_nodes(pool) + scan.problems + C.check_live_counts(pool, scan.live)
            + C.check_objects(pool))


async def test_a_rotten_fragment_is_named_by_the_deep_read_only(disks: Disks) -> None:
    ds = disks(3)
    pool, data, path = await rotten_pool(ds, "ec:2+1", SIZE, 3, 1, seed=1)
    try:
        assert (await C.check(pool)).ok
        assert _sound_parts(pool) == []
        report = await C.check(pool, deep=True)
        assert report.fragments_bad == 1 and report.fragments_checked == 3 * report.records
        assert len(report.problems) == 1 and report.problems[0].startswith(path)
        assert "fragment 1 of the record" in report.problems[0]
        assert report.problems[0].endswith("fails verification")
        assert await read_all(pool, SIZE) == data      # k = 2 of 3 still read it back
    finally:
        await pool.close()


async def test_each_metadata_check_names_its_fault(disks: Disks) -> None:
    ds = disks(3)
    pool, data = await filled_pool(ds, "ec:2+1", SIZE)
    try:
        assert (await C.check(pool, deep=True)).ok
        seg = next(iter(pool.state.segments.values()))

        seg.live += 1
        want = [f"segment {seg.id} says {seg.live} live sectors, the maps reference "
                f"{seg.live - 1}"]
        assert C.check_live_counts(pool, C.scan_records(pool).live) == want
        assert C.check_segments(pool) == [] and C.check_objects(pool) == []
        assert list((await C.check(pool)).problems) == want
        seg.live -= 1

        extents = seg.extents
        seg.extents = (extents[0], extents[0], extents[2])
        found = C.check_segments(pool)
        assert found[0] == (f"segment {seg.id} puts two fragments on one member "
                            f"({[extents[0][0]] * 2 + [extents[2][0]]})")
        assert f"belongs to segments {seg.id} and {seg.id}" in found[1]
        assert C.check_live_counts(pool, C.scan_records(pool).live) == []
        seg.extents = extents

        orphan = pool.create_map()
        assert C.check_objects(pool) == [f"map {orphan} is referenced by 0 objects "
                                         f"(expected 1)"]
        assert C.check_segments(pool) == []
        pool.delete_map(orphan)

        report = await C.check(pool, deep=True)     # nothing the checks did changed a thing
        assert report.ok, report.render()
        assert await read_all(pool, SIZE) == data
    finally:
        await pool.close()


async def test_a_deep_check_while_the_pool_overwrites_and_cleans_reads_what_it_scanned(
        disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deep read runs in a thread while the pool goes on serving: the segments it
    scanned are pinned meanwhile (pins invariant 1), so an overwrite of every block and
    a cleaner that empties every old segment under it change nothing of what it reads:
    no segment vanished (it was a KeyError) and no fragment "fails verification" because
    its extent was reused."""
    ds = disks(3)
    pool, _data = await filled_pool(ds, "ec:2+1", SIZE)
    entered, go = threading.Event(), threading.Event()
    real = C.read_fragments

    def held(p: Pool, entries: list[tuple[int, int, bytes]]) -> tuple[int, int, list[str]]:
        entered.set()
        assert go.wait(30)
        return real(p, entries)

    monkeypatch.setattr(C, "read_fragments", held)
    try:
        old = set(pool.state.segments)
        report: list[C.CheckReport] = []

        async def deep() -> None:
            report.append(await C.check(pool, deep=True))

        async with trio.open_nursery() as n:
            n.start_soon(deep)
            try:
                assert await trio.to_thread.run_sync(entered.wait, 30)
                vol = VolumeManager(pool).get("v")
                for seed in range(2, 6):           # the old segments fill up and close
                    new = random.Random(seed).randbytes(SIZE)
                    await vol.write(0, new)
                    await vol.flush()
                await pool.clean(max_segments=100, threshold=1.0)
                await pool.commit()
                kept = old <= set(pool.state.segments)
            finally:
                go.set()
        assert kept, "pinned segments were freed under the deep read"
        assert report[0].ok and report[0].fragments_checked > 0, report[0].render()
        assert await read_all(pool, SIZE) == new
        assert (await C.check(pool, deep=True)).ok      # unpinned: the old ones go now
    finally:
        go.set()
        await pool.close()


async def test_a_bad_blob_copy_is_named_by_check_after_the_confirming_pass(
        disks: Disks) -> None:
    """check() reads the metadata in threads while the pool serves, and confirms what they
    found with commits held off (a commit racing the read is not a problem): a copy of a
    checkpoint blob that is really bad is named by both passes, with nothing else."""
    ds = disks(3)
    pool, data = await filled_pool(ds, "ec:2+1", SIZE)
    try:
        await pool.txn.checkpoint()
        nid, loc = sorted(pool.txn.page_locs.items())[0]
        dev = pool.meta.present()[1]
        at = pool.layout.pages_offset + loc.unit * PAGE_UNIT
        fd = os.open(dev.path, os.O_RDWR)
        try:
            old = os.pread(fd, 64, at + 16)
            os.pwrite(fd, bytes(b ^ 0xFF for b in old), at + 16)
        finally:
            os.close(fd)
        report = await C.check(pool)
        assert list(report.problems) == [
            f"{dev.path}: copy of map node {nid} (metadata units {loc.unit}-"
            f"{loc.unit + loc.units - 1}) fails its checksum"], report.render()
        assert await read_all(pool, SIZE) == data
    finally:
        await pool.close()
