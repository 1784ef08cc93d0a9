"""How a read's blocks become its answer: runs of data and holes (``read_sparse``) or one
buffer per block (``read_vectored``). Pure functions of the blocks a read collected from
the write buffer and the pool; ``Volume`` (volumes/volume.py) counts the read.

Invariants (tests cite them as "readshape invariant N"):

1. An answer never holds a bytearray: the write buffer patches its own bytearrays in place
   (volumes/buffer.py), so a later write must never show through an answer being sent;
   ``piece`` copies those, and hands out immutable content as views (no copy).
2. ``runs`` covers [offset, offset + length) exactly, in order, with adjacent data blocks
   in one run and adjacent holes merged (so a frontend can send holes without zeros, NBD
   OFFSET_HOLE); ``buffers``' concatenation is the range, holes as views of zeros.
"""

from __future__ import annotations

from volumes.buffer import Block

Piece = bytes | memoryview    # a read's bytes of one block, never to change under a reader
Spans = list[tuple[int, int, int]]   # (block, start within it, end within it)


def piece(v: Block, lo: int, hi: int) -> Piece:
    """Bytes ``lo:hi`` of a block's content as a read hands them out (invariant 1)."""
    if isinstance(v, bytearray):
        return bytes(v[lo:hi])
    if lo == 0 and hi == len(v):
        return v
    return memoryview(v)[lo:hi]


def buffers(spans: Spans, blocks: dict[int, Block | None],
            zero: memoryview) -> list[bytes | memoryview]:
    """One buffer per span (invariant 2); ``zero`` is a view of a zero block."""
    out: list[bytes | memoryview] = []
    for b, lo, hi in spans:
        v = blocks[b]
        out.append(zero[lo:hi] if v is None else piece(v, lo, hi))
    return out


def runs(spans: Spans, blocks: dict[int, Block | None], offset: int, length: int,
         bs: int) -> list[tuple[int, int, list[Piece] | None]]:
    """(offset, length, data) runs of the range, data None for a hole (invariant 2)."""
    out: list[tuple[int, int, list[Piece] | None]] = []
    run: list[Piece] = []
    run_start = hole_start = -1
    for b, lo, hi in spans:
        v = blocks[b]
        pos = b * bs + lo
        if v is None:
            if run:
                out.append((run_start, pos - run_start, run))
                run = []
            if hole_start < 0:
                hole_start = pos
        else:
            if hole_start >= 0:
                out.append((hole_start, pos - hole_start, None))
                hole_start = -1
            if not run:
                run_start = pos
            run.append(piece(v, lo, hi))
    end = offset + length
    if run:
        out.append((run_start, end - run_start, run))
    elif hole_start >= 0:
        out.append((hole_start, end - hole_start, None))
    return out


__all__ = ["Piece", "buffers", "piece", "runs"]
