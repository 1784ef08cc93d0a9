"""SpaceAccount (pool.space) on its own, over a LocalStore on real file devices, with the
pool's side given as plain hooks: its numbered invariants ("space invariant N") and the
space rules S1-S6 of docs/INTERNALS.md."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from pool.errors import NoSpace
from pool.profile import Profile
from pool.space import SpaceAccount, SpaceHooks
from pool.state import Segment
from pool.store import LocalStore
from tests.unit.test_store import BS, EXT, _store

PROF = Profile(2, 1)


class Host:
    def __init__(self) -> None:
        self.meta = 0.1
        self.commits = self.cleans = self.reaps = self.written_back = 0
        self.caches: list[Callable[[], Awaitable[None]]] = [self.writeback]

    async def writeback(self) -> None:
        self.written_back += 1

    async def commit(self) -> None:
        self.commits += 1

    async def clean_one(self) -> bool:
        self.cleans += 1
        return False                       # nothing to clean

    def reap(self) -> None:
        self.reaps += 1

    def hooks(self) -> SpaceHooks:
        return SpaceHooks(lambda: None, self.reap, self.commit, self.clean_one,
                          lambda: self.caches, lambda: self.meta)


def _account(tmp_path: Path) -> tuple[SpaceAccount, LocalStore, Host]:
    store, _devices, _hooks, state = _store(tmp_path, discard=False)
    host = Host()
    open_segments: dict[tuple[int, int], Segment] = {}
    return SpaceAccount(state, store, EXT, open_segments, host.hooks()), store, host


async def test_grants_leave_both_reserves_and_never_go_negative(tmp_path: Path) -> None:
    """Space invariants 1, 2 (rule S2, DESIGN 8): client grants stop short of the
    cleaner's and the zeroing reserve; a zeroing grant may take the latter; unreserve
    never takes ``reserved`` below zero."""
    acct, store, _host = _account(tmp_path)
    cost = acct.record_cost(BS, PROF)
    assert acct.available_bytes(PROF) == store.room(PROF).free_bytes
    assert acct.cleaner_reserve() == 2 * 1 * EXT          # no segment yet: width 1
    assert acct.zeroing_reserve() == 4 * cost
    limit = acct.available_bytes(PROF) - acct.cleaner_reserve() - acct.zeroing_reserve()
    acct.reserve(limit, PROF)
    with pytest.raises(NoSpace, match="out of space"):
        acct.reserve(1, PROF)
    assert acct.reserved == limit
    acct.reserve(acct.zeroing_reserve(), PROF, zeroing=True)
    with pytest.raises(NoSpace):
        acct.reserve(1, PROF, zeroing=True)
    assert acct.available_bytes(PROF) == acct.cleaner_reserve()
    acct.unreserve(10 * limit)
    assert acct.reserved == 0


async def test_no_grant_outside_the_queue_while_room_is_made(tmp_path: Path) -> None:
    """Space invariant 3 (rule S3): while the room lock is held, ``reserve`` refuses and
    ``reserve_wait`` queues; nothing is granted meanwhile."""
    acct = _account(tmp_path)[0]
    acct.record_cost(BS, PROF)
    granted: list[int] = []

    async def waiter() -> None:
        await acct.reserve_wait(BS, PROF)
        granted.append(acct.reserved)
    async with trio.open_nursery() as nursery, acct._room_lock:
        with pytest.raises(NoSpace, match="making room"):
            acct.reserve(BS, PROF)
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert acct.reserved == 0 and not granted
    assert granted == [BS]


async def test_make_room_fails_only_after_nothing_could_be_won(tmp_path: Path) -> None:
    """Space invariant 4 (rule S3): with nothing to release, clean or commit, make_room
    writes the buffers back once, then raises NoSpace and grants nothing."""
    acct, _, host = _account(tmp_path)
    acct.record_cost(BS, PROF)
    too_much = acct.available_bytes(PROF) + 1
    with pytest.raises(NoSpace, match="out of space"):
        await acct.reserve_wait(too_much, PROF)
    assert acct.reserved == 0
    assert host.written_back == 1 and host.cleans == 2 and host.commits == 0


async def test_make_room_waits_for_frees_held_by_older_reads(tmp_path: Path) -> None:
    """Rule S5 through the store (store invariant 3): space freed by a durable commit
    but still visible to an older read is waited for, not refused; the grant follows
    the read's end."""
    acct, store, _host = _account(tmp_path)
    acct.record_cost(BS, PROF)
    taken = []
    while True:
        try:
            taken.append(store.allocate(PROF.k, PROF.m))
        except NoSpace:
            break
    assert acct.available_bytes(PROF) == 0
    reader = store.read_hold()
    for placement in taken:
        store.free(placement)
    store.durable(sum(len(p) for p in taken))
    want = acct.available_bytes(PROF)       # still 0: held by the read
    assert want == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acct.reserve_wait, BS, PROF)
        await trio.testing.wait_all_tasks_blocked()
        assert acct.reserved == 0
        reader.release()
    assert acct.reserved == BS


async def test_a_full_metadata_area_leaves_only_zeroing_grants(tmp_path: Path) -> None:
    """Space invariant 5 (DESIGN 8): past META_RESERVE of the metadata area, writes are
    refused with a clear message; trims' partial blocks still get space."""
    acct, _, host = _account(tmp_path)
    acct.record_cost(BS, PROF)
    host.meta = 0.95
    with pytest.raises(NoSpace, match="metadata area is 95% full"):
        acct.reserve(BS, PROF)
    with pytest.raises(NoSpace, match="metadata area"):
        await acct.reserve_wait(BS, PROF)
    assert acct.reserved == 0
    acct.reserve(BS, PROF, zeroing=True)
    assert acct.reserved == BS
