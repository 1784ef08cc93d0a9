"""Sizes as people write them (512, 4K, 64KiB, 10G, 1.5T), parsed the way qemu-img does,
one parser for the CLI, the control API and the config file.

The grammar (docs/CONFIG.md, "Sizes"): DIGITS[.DIGITS][UNIT], no spaces, no sign, where UNIT
is one of B K M G T P E (any case, binary: K = 1024, as in qemu-img and rbd), optionally
spelled the IEC way (Ki, KiB). A bare number is bytes (qemu-img; rbd would read MiB).
A decimal must come out a whole number of bytes (``1.5K`` = 1536; ``1.0001K`` is refused,
where qemu-img would truncate it). ``10GB`` is refused: qemu-img refuses it, rbd reads it as
10 GiB and SI would read 10**9, so any reading would be a guess.
"""

from __future__ import annotations

import re
from fractions import Fraction

from volumes import InvalidArgument

MAX_SIZE = (1 << 63) - 1   # what qemu-img and the NBD protocol's signed offsets allow
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50, "e": 1 << 60}
_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?(?:([bkmgtpe])|([kmgtpe])i(b?))?", re.IGNORECASE)
_HINT = "use e.g. 4096, 64K, 1.5G, 10GiB"


def parse_size(text: str | int) -> int:
    """Bytes from '10G', '64K', '1.5T', '10GiB', '4096' (binary units, any case).
    Raises InvalidArgument, naming the text, for anything else."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InvalidArgument(f"not a size: {text!r} ({_HINT})")
    if isinstance(text, int):
        if not 0 <= text <= MAX_SIZE:
            raise InvalidArgument(f"size out of range: {text} (0 up to, not including, 8E)")
        return text
    m = _RE.fullmatch(text)
    if m is None:
        raise InvalidArgument(f"not a size: {text!r} ({_why(text)})")
    whole, frac, unit, iec_unit, _b = m.groups()
    value = Fraction(int(whole)) * _UNITS[(unit or iec_unit or "").lower()]
    if frac:
        value += Fraction(int(frac), 10 ** len(frac)) * _UNITS[(unit or iec_unit or "").lower()]
    if value.denominator != 1:
        raise InvalidArgument(f"size {text!r} is not a whole number of bytes")
    if value > MAX_SIZE:
        raise InvalidArgument(f"size {text!r} is too large (it must be below 8E)")
    return int(value)


def _why(text: str) -> str:
    if not text:
        return "empty"
    if text != text.strip() or " " in text:
        return "no spaces allowed"
    if text[0] in "+-":
        return "no sign allowed"
    if re.fullmatch(r"[0-9.]+[kmgtpe]b", text, re.IGNORECASE):
        return (f"ambiguous unit: write {text[:-1]} or {text[:-1]}iB for binary units; "
                f"decimal (SI) units are not accepted")
    return _HINT


def format_size(n: int) -> str:
    """'10G', '1.5T', '512' — the shortest binary form with at most one decimal (for
    display: it may round; see ``exact_size`` for a form that parses back exactly)."""
    for unit, factor in (("E", 1 << 60), ("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30),
                         ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            v = n / factor
            return f"{v:.0f}{unit}" if v == int(v) or v >= 100 else f"{v:.1f}{unit}"
    return str(n)


def exact_size(n: int) -> str:
    """``n`` in the largest unit that divides it ('1536K', '10G', '4097'): parse_size reads
    it back as exactly ``n``."""
    for unit, factor in (("E", 1 << 60), ("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30),
                         ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)
