"""Redundancy profiles: ``plain``, ``mirror:N`` and ``ec:K+M`` as a (k, m) value.

Invariants this module owns:

1. A ``Profile`` is immutable and hashable; ``Profile(k, m)`` always names k data and m
   parity fragments per record, on k + m distinct members (DESIGN invariant 5).
2. ``Profile.parse`` accepts exactly the three spellings (any case, ASCII digits, no
   surrounding or inner blanks) within their bounds, and refuses anything else with one
   ``InvalidArgument`` line; ``str(Profile.parse(t))`` is the canonical spelling of ``t``.

A low module: it imports only ``pool.errors`` (an import-linter contract keeps it from
importing ``pool.pool``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pool.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Profile:
    """Redundancy profile: k data fragments + m parity fragments per record."""

    k: int
    m: int

    @staticmethod
    def parse(text: str) -> Profile:
        # Exactly one of the three spellings (any case, ASCII digits): "ec:2+1 " or
        # "mirror: 2" is refused, not trimmed into something the admin did not write.
        t = text.lower()
        if t == "plain":
            return Profile(1, 0)
        if mt := re.fullmatch(r"mirror:([0-9]+)", t):
            n = int(mt.group(1))
            if not 2 <= n <= 16:
                raise InvalidArgument(f"mirror:N needs 2 <= N <= 16, got {text!r}")
            return Profile(1, n - 1)
        if mt := re.fullmatch(r"ec:([0-9]+)\+([0-9]+)", t):
            k, m = int(mt.group(1)), int(mt.group(2))
            if not (2 <= k <= 32 and 1 <= m <= 16):
                raise InvalidArgument(f"ec:K+M needs 2 <= K <= 32 and 1 <= M <= 16, got "
                                      f"{text!r}")
            return Profile(k, m)
        raise InvalidArgument(f"unknown redundancy profile {text!r}: use plain, mirror:N "
                              f"or ec:K+M")

    @property
    def width(self) -> int:
        return self.k + self.m

    def __str__(self) -> str:
        if self.k == 1:
            return "plain" if self.m == 0 else f"mirror:{self.m + 1}"
        return f"ec:{self.k}+{self.m}"
