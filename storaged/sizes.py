"""Sizes as people write them: 512, 4K, 64KiB, 10G, 1.5T (binary units)."""

from __future__ import annotations

import re

from volumes import InvalidArgument

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50}
_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtpb]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from '10G', '64K', '1.5T', '4096' (binary units; case-insensitive)."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return text
    m = _RE.fullmatch(text)
    if m is None:
        raise InvalidArgument(f"not a size: {text!r} (use e.g. 512, 64K, 10G, 2T)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise InvalidArgument(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """'10G', '1.5T', '512' — the shortest binary form with at most one decimal."""
    for unit, factor in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20),
                         ("K", 1 << 10)):
        if n >= factor:
            v = n / factor
            return f"{v:.0f}{unit}" if v == int(v) or v >= 100 else f"{v:.1f}{unit}"
    return str(n)
