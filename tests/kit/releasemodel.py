"""The part of a SegmentStore state machine that models store invariant 3 (DESIGN 3): frees
become durable with a commit, reads in flight hold them back, and a freed unit comes back
only once its freeing commit is durable and every read begun before that commit has ended.

Shared by the allocator machine on files (tests/property/test_sm_store.py) and the one on
RADOS (tests/rados/test_store.py): a machine mixes this in, sets ``store`` and ``portal``
and the model fields in its ``__init__`` (``init_release_model``), appends to ``pending``
when it frees, and says what a released unit does in the model (``released``).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from pool.store import ReadHold, SegmentStore
from tests.kit.trioportal import TrioPortal


class ReleaseModel(RuleBasedStateMachine):
    store: SegmentStore
    portal: TrioPortal

    def init_release_model(self) -> None:
        self.pending: list[Any] = []                          # freed, in free order
        self.releasable: list[tuple[int, Any]] = []           # (commit, unit)
        self.commits = 0
        self.holds: dict[int, tuple[int, ReadHold]] = {}      # id -> (commits seen, token)
        self.next_hold = 0

    def released(self, unit: Any) -> None:
        """``unit`` may come back now (the model's part)."""
        raise NotImplementedError

    def model_release(self) -> None:
        """The specification of store invariant 3."""
        keep = []
        for c, unit in self.releasable:
            if all(seen >= c for seen, _h in self.holds.values()):
                self.released(unit)
            else:
                keep.append((c, unit))
        self.releasable = keep

    @rule(n=st.integers(0, 8))
    def durable(self, n: int) -> None:
        n = min(n, len(self.pending))

        async def call() -> None:
            self.store.durable(n)
        self.portal.run(call)
        self.commits += 1
        self.releasable.extend((self.commits, unit) for unit in self.pending[:n])
        del self.pending[:n]
        self.model_release()

    @rule()
    def read_hold(self) -> None:
        self.holds[self.next_hold] = (self.commits, self.store.read_hold())
        self.next_hold += 1

    @precondition(lambda self: self.holds)
    @rule(pick=st.integers(0, 1 << 16), twice=st.booleans())
    def release(self, pick: int, twice: bool) -> None:
        hid = sorted(self.holds)[pick % len(self.holds)]
        _seen, token = self.holds.pop(hid)

        async def call() -> None:
            token.release()
            if twice:
                token.release()          # a second release changes nothing
        self.portal.run(call)
        self.model_release()
