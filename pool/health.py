"""Member health: per-member I/O error counts, the fault threshold, why a member is away,
and its epoch. Knows nothing of the Pool: a member to fault is reported through the
``on_fault`` callback (the pool's fault handling, ``Members.fault``).

Invariants this module owns (DESIGN invariants cited in brackets):

1. Errors are counted per member and kind ("read", "write", "checksum") since the import,
   or since the member last came back (``came_back``: online, replace).
2. A member whose read + write errors reach ``threshold`` is reported to ``on_fault``
   exactly once, by the error that reaches it; checksum errors are never held against a
   device (they are repaired and reported) [4]. It is reported again only after it came
   back.
3. A read error sets ``recheck``, which wakes the member watcher: a short read may mean
   the device shrank or vanished.
4. A member's epoch grows each time it goes away and never decreases, so work begun before
   (a rebuild's ``mark_rebuilt``) can tell that writes may have missed the member [5].
5. Why a member is away is kept from ``went_away`` until ``came_back``.
6. Errors against an index that is not a member are ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import trio

FAULT_THRESHOLD = 10  # I/O errors after which a member is faulted (checksum errors excluded)
KINDS = ("read", "write", "checksum")


class MemberHealth:
    """Error counts, reasons and epochs of ``n`` members; ``on_fault(index, why)`` is
    called when a member reaches the threshold (invariant 2)."""

    def __init__(self, n: int, on_fault: Callable[[int, str], None],
                 threshold: int = FAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self._on_fault = on_fault
        self.errors: list[Counter[str]] = [Counter() for _ in range(n)]
        self.epochs: list[int] = [0] * n
        self.why: dict[int, str] = {}
        self.recheck = trio.Event()     # a read failed: check the members now
        self._reported: set[int] = set()

    def add_member(self) -> None:
        """A new member (the next index): no errors, epoch 0."""
        self.errors.append(Counter())
        self.epochs.append(0)

    def count(self, index: int, kind: str, why: str = "") -> None:
        """Count an I/O error ("read" | "write" | "checksum") against member ``index``
        (invariants 1-3, 6)."""
        if not 0 <= index < len(self.errors):
            return
        assert kind in KINDS, kind
        errs = self.errors[index]
        errs[kind] += 1
        if kind == "read":
            self.recheck.set()    # a short read may mean the device shrank: look now
        if (kind != "checksum" and index not in self._reported
                and errs["read"] + errs["write"] >= self.threshold):
            self._reported.add(index)
            self._on_fault(index, f"{errs['read']} read and {errs['write']} write errors"
                           + (f", last: {why}" if why else ""))

    def counts(self, index: int) -> tuple[int, int, int]:
        """(read, write, checksum) errors of member ``index``."""
        errs = self.errors[index]
        return errs["read"], errs["write"], errs["checksum"]

    def went_away(self, index: int, why: str) -> None:
        """Member ``index`` stopped being used (faulted, offline): a new epoch
        (invariant 4), and why (invariant 5)."""
        self.epochs[index] += 1
        self.why[index] = why

    def left_out(self, index: int, why: str) -> None:
        """Member ``index`` was not found at import (no new epoch: it was never used)."""
        self.why[index] = why

    def came_back(self, index: int) -> None:
        """Member ``index`` is used again (online, or a replacement): its counts start
        over and it may be reported again (invariants 1, 2, 5)."""
        self.errors[index] = Counter()
        self.why.pop(index, None)
        self._reported.discard(index)

    def epoch(self, index: int) -> int:
        return self.epochs[index]

    def reason(self, index: int) -> str:
        """Why member ``index`` is away ("" if no reason is known)."""
        return self.why.get(index, "")
