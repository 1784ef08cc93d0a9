"""The cls_lock wire format (pool/rados/clslock.py), pure, and the binding loader
(pool/rados/binding.py). The formats are also exercised against a real OSD in
test_owner.py; here the corner the cluster does not show: a locker whose address comes in
the legacy form, and truncated replies."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from pool.errors import StorageError
from pool.rados import binding, clslock


def _s(x: str) -> bytes:
    return struct.pack("<I", len(x)) + x.encode()


def _frame(body: bytes) -> bytes:
    return struct.pack("<BBI", 1, 1, len(body)) + body


def _reply(addr: bytes) -> bytes:
    lid = _frame(struct.pack("<Bq", 8, 4242) + _s("cookie-1"))
    info = _frame(struct.pack("<II", 1700000000, 500000000) + addr + _s('{"host": "n"}'))
    return _frame(struct.pack("<I", 1) + lid + info + struct.pack("<B", 1) + _s(""))


@pytest.mark.parametrize("addr", [
    b"\x01" + _frame(struct.pack("<II", 2, 77) + _s("x" * 16)),     # msgr2 form
    b"\x00" + bytes(3 + 4 + 128),                                     # legacy form
])
def test_parse_get_info(addr: bytes) -> None:
    lockers, kind = clslock.parse_get_info(_reply(addr))
    assert kind == clslock.LOCK_EXCLUSIVE
    assert lockers == [clslock.Locker(4242, "cookie-1", 1700000000.5, '{"host": "n"}')]


def test_truncated_reply_is_an_error() -> None:
    raw = _reply(b"\x00" + bytes(135))
    for cut in (3, 10, len(raw) // 2, len(raw) - 2):
        with pytest.raises(StorageError, match="truncated"):
            clslock.parse_get_info(raw[:cut])


def test_payloads() -> None:
    assert clslock.break_lock_op("storaged", 5, "c") == _frame(
        _s("storaged") + struct.pack("<Bq", 8, 5) + _s("c"))
    assert clslock.assert_locked_op("storaged", "c") == _frame(
        _s("storaged") + b"\x01" + _s("c") + _s(""))
    assert clslock.get_info_op("storaged") == _frame(_s("storaged"))


def test_missing_binding_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setattr(binding, "DIST", tmp_path)
    monkeypatch.delitem(sys.modules, "rados", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "rados" not in p])
    try:
        import rados  # noqa: F401, PLC0415
    except ImportError:
        with pytest.raises(binding.RadosUnavailable, match="apt-get install python3-rados"):
            binding.load()
    else:
        pytest.skip("this virtualenv exposes rados itself (make rados-binding)")
