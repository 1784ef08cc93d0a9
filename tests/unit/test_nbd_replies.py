"""nbd/server R2: what is left of a reply's buffers after a partial vectored write."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbd.server import _advance


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8), st.data())
def test_advance_leaves_exactly_the_unsent_bytes_in_order(parts: list[bytes],
                                                          data: st.DataObject) -> None:
    whole = b"".join(parts)
    views = [memoryview(p) if i % 2 else p for i, p in enumerate(parts)]
    n = data.draw(st.integers(0, len(whole)))
    rest = _advance(views, n)
    assert b"".join(bytes(r) for r in rest) == whole[n:]
    assert all(len(r) for r in rest)            # no empty buffer handed to writev
    assert _advance(views, len(whole)) == []


def test_advance_counts_bytes_of_a_view_with_a_wider_format() -> None:
    words = memoryview(bytes(range(16))).cast("I")       # 4 items, 16 bytes
    rest = _advance([b"hd", words], 5)
    assert [bytes(r) for r in rest] == [bytes(range(3, 16))]
