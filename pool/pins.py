"""Segment pins: which segments work in flight still needs, so they are neither freed nor
cleaned under it.

Three kinds of work pin a segment: the writer while records it placed there are in flight
(``take``/``drop``), and the cleaner, scrub and rebuild while they read a segment's records
and write what they rebuilt (``pin``/``unpin``, which also hold a store read, so a segment
freed meanwhile keeps its space until they are done: pool.store invariant 3).

Invariants this module owns (DESIGN invariant numbers in brackets):

1. A segment with a pin (of either kind) is never freed by the pool's reap, never chosen
   by the cleaner, and a member fault leaves its marks at the start [3, 5].
2. Each ``pin`` holds one store read (``SegmentStore.read_hold``) until its ``unpin``;
   the holds are released in reverse order of taking, one per ``unpin``.
3. Counts never go below zero: an ``unpin``/``drop`` without its ``pin``/``take`` is a
   bug (KeyError), not a silent no-op.
4. ``unpin`` reaps (frees the segments that emptied while pinned) unless the caller says
   its new records are not referenced yet (``reap=False``: the cleaner, between writing a
   relocated record and pointing the maps at it).
"""

from __future__ import annotations

from collections.abc import Callable

from pool.store import ReadHold


class SegmentPins:
    """Pin counts per segment id; ``read_hold`` is the store's, ``reap`` the pool's."""

    def __init__(self, read_hold: Callable[[], ReadHold], reap: Callable[[], None]) -> None:
        self._read_hold = read_hold
        self._reap = reap
        self._counts: dict[int, int] = {}
        self._holds: dict[int, list[ReadHold]] = {}

    def __contains__(self, seg_id: object) -> bool:
        """Whether ``seg_id`` is pinned (invariant 1)."""
        return seg_id in self._counts

    def take(self, seg_id: int) -> None:
        """A count-only pin (the writer: records in flight to ``seg_id``)."""
        self._counts[seg_id] = self._counts.get(seg_id, 0) + 1

    def drop(self, seg_id: int) -> None:
        """Undo one ``take`` (invariant 3); does not reap (the writer's caller does)."""
        n = self._counts[seg_id] - 1
        if n:
            self._counts[seg_id] = n
        else:
            del self._counts[seg_id]

    def pin(self, seg_id: int) -> None:
        """Pin ``seg_id`` and hold a store read for it (invariant 2)."""
        self.take(seg_id)
        self._holds.setdefault(seg_id, []).append(self._read_hold())

    def unpin(self, seg_id: int, *, reap: bool = True) -> None:
        """Undo one ``pin``; ``reap=False`` for a caller whose new records nothing
        references yet (invariant 4)."""
        holds = self._holds[seg_id]
        hold = holds.pop()
        if not holds:
            del self._holds[seg_id]
        self.drop(seg_id)
        hold.release()
        if reap:
            self._reap()
