"""Sizes and redundancy profiles as admins write them (issue 22): the one size parser of the
CLI, the control API and the config file (storaged.sizes), checked against qemu-img itself,
and the strict profile parser. DESIGN invariant 9: bad input gets a clear error."""

from __future__ import annotations

import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.profile import Profile
from storaged import config
from storaged.sizes import MAX_SIZE, exact_size, format_size, parse_size
from volumes import InvalidArgument

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
         "E": 1 << 60}


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("4096", 4096), ("512B", 512), ("64K", 65536), ("64k", 65536),
    ("1.5G", 3 << 29), ("512M", 512 << 20), ("10GiB", 10 << 30), ("10Gi", 10 << 30),
    ("10g", 10 << 30), ("0.5K", 512), ("1.25M", 1310720), ("2T", 2 << 40),
    ("1.5E", 3 << 59), ("007M", 7 << 20)])
def test_sizes_people_write(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"), ("10GB", "ambiguous unit"), ("1.5gb", "ambiguous unit"),
    (" 1G", "no spaces"), ("1G ", "no spaces"), ("1 G", "no spaces"), ("1G\n", "no spaces"),
    ("-1G", "no sign"), ("+1G", "no sign"), ("1.0001K", "not a whole number of bytes"),
    ("1.5", "not a whole number of bytes"), ("8E", "too large"), ("1e3", "use e.g."),
    ("0x10", "use e.g."), ("1_000", "use e.g."), ("1,5G", "use e.g."), (".5G", "use e.g."),
    ("5.G", "use e.g."), ("\u0661\u0662", "use e.g."), ("10GiBB", "use e.g."),
    ("10Bi", "use e.g."), ("10KiB\u00a0", "no spaces"), ("G", "use e.g.")])
def test_odd_sizes_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(why)) as e:
        parse_size(text)
    assert repr(text) in e.value.message and "\n" not in e.value.message


@pytest.mark.parametrize("value", [-1, True, 1.5, None, MAX_SIZE + 1])
def test_non_strings_that_are_no_sizes(value: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(value)  # type: ignore[arg-type]


@given(st.integers(0, MAX_SIZE))
def test_exact_form_round_trips(n: int) -> None:
    assert parse_size(exact_size(n)) == n
    assert parse_size(str(n)) == n
    assert parse_size(n) == n


@given(st.integers(0, MAX_SIZE))
def test_display_form_is_within_its_rounding(n: int) -> None:
    """format_size keeps at most one decimal: what it shows is within 5% of the truth, and
    it reads back as what it shows where that is a whole number of bytes."""
    shown = format_size(n)
    value = Fraction(shown[:-1]) * UNITS[shown[-1]] if shown[-1] in UNITS else Fraction(shown)
    assert abs(value - n) <= n * Fraction(5, 100)
    if value.denominator == 1 and value <= MAX_SIZE:
        assert parse_size(shown) == value


@given(st.integers(0, 1 << 20), st.sampled_from(sorted(UNITS)),
       st.sampled_from(["", "i", "iB"]), st.booleans())
def test_every_unit_spelling(value: int, unit: str, iec: str, lower: bool) -> None:
    if not unit or unit == "B":
        iec = ""        # no "Bi", no "iB" without a prefix
    text = f"{value}{unit}{iec}"
    text = text.lower() if lower else text
    if value * UNITS[unit] > MAX_SIZE:
        with pytest.raises(InvalidArgument, match="too large"):
            parse_size(text)
    else:
        assert parse_size(text) == value * UNITS[unit]


@given(st.integers(0, 1 << 20), st.text("0123456789", min_size=1, max_size=20),
       st.sampled_from(sorted(UNITS)))
def test_decimals_are_exact_or_refused(whole: int, frac: str, unit: str) -> None:
    text = f"{whole}.{frac}{unit}"
    exact = (whole + Fraction(int(frac), 10 ** len(frac))) * UNITS[unit]
    if exact.denominator == 1 and exact <= MAX_SIZE:
        assert parse_size(text) == exact
    else:
        with pytest.raises(InvalidArgument):
            parse_size(text)


@given(st.text(max_size=12))
def test_any_text_is_a_size_or_a_clear_refusal(text: str) -> None:
    """Never another exception, never a size from text outside the grammar."""
    grammar = re.fullmatch(r"[0-9]+(\.[0-9]+)?([bkmgtpe]|[kmgtpe]ib?)?", text, re.I)
    try:
        n = parse_size(text)
    except InvalidArgument as e:
        assert e.message.startswith(("not a size", "size ")), e.message
        return
    assert grammar is not None and 0 <= n <= MAX_SIZE


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_qemu_img_reads_the_same_sizes(tmp_path: Path) -> None:
    """What both accept means the same bytes; what qemu-img refuses we refuse too."""
    for text in ("1.5G", "512M", "10g", "0.5K", "4096", "1.25M", "3T"):
        r = subprocess.run(["qemu-img", "create", "-f", "raw", str(tmp_path / "x.img"), text],
                           capture_output=True, text=True, check=False)
        m = re.search(r"size=(\d+)", r.stdout)
        assert m is not None, r.stdout + r.stderr
        assert parse_size(text) == int(m.group(1))
    for text in ("10GB", "1.5 G", "1e3", "-1G"):
        r = subprocess.run(["qemu-img", "create", "-f", "raw", str(tmp_path / "y.img"), text],
                           capture_output=True, text=True, check=False)
        assert r.returncode != 0
        with pytest.raises(InvalidArgument):
            parse_size(text)


# ---- profiles ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "ec:2+1 ", " plain", "plain\n", "mirror: 2", "mirror:2x", "ec:2 +1", "ec:2+\u0661",
    "mirror:\u0662", "ec:2+1+1", "raid1", "", "mirror:1", "mirror:17", "ec:1+1", "ec:2+0",
    "ec:33+1", "ec:2+17"])
def test_malformed_profiles_are_refused(text: str) -> None:
    # pool.profile invariant 2: only the three exact spellings, within bounds.
    with pytest.raises(InvalidArgument) as e:
        Profile.parse(text)
    assert repr(text) in e.value.message


@given(st.one_of(st.just(Profile(1, 0)),
                 st.builds(Profile, st.just(1), st.integers(1, 15)),
                 st.builds(Profile, st.integers(2, 32), st.integers(1, 16))))
@settings(max_examples=60)
def test_profiles_round_trip(p: Profile) -> None:
    # pool.profile invariants 1 and 2: str() is the canonical spelling parse() gives back.
    assert Profile.parse(str(p)) == p
    assert Profile.parse(str(p).upper()) == p


# ---- the config file --------------------------------------------------------------------

def test_config_byte_keys_take_sizes(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('overcommit_warning = 2.5\n[nbd]\nmemory = "1.5G"\nconnection_memory = 33554432\n'
                 '[faults]\nscrub_rate = "64MiB"\n[cache]\nwrite_buffer = "512M"\n')
    cfg = config.load(str(f))
    assert (cfg.nbd_memory, cfg.nbd_connection_memory, cfg.scrub_rate, cfg.write_buffer,
            cfg.overcommit_warning) == (3 << 29, 32 << 20, 64 << 20, 512 << 20, 2.5)
    assert config.load(None).overcommit_warning == 1.0


@pytest.mark.parametrize(("line", "words"), [
    ('[nbd]\nmemory = "10GB"', "nbd.memory: not a size: '10GB' (ambiguous unit"),
    ('[cache]\nrecords = "1G "', "cache.records: not a size"),
    ('[cache]\nrecords = -1', "cache.records: size out of range"),
    ("[cache]\nrecords = true", "cache.records: not a size"),
    ("overcommit_warning = -1", "overcommit_warning must be a ratio")])
def test_config_refuses_odd_sizes(tmp_path: Path, line: str, words: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(line + "\n")
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        config.load(str(f))
