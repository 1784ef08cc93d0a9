"""What a volume offers its frontends, as one frozen value (``Volume.capabilities()``).

Like nbdkit's can_* callbacks computed through its stack, the frontends do not restate
what a volume can do: NBD turns this value into transmission flags and block size
information (``nbd.exports``), iSCSI into READ CAPACITY, VPD B0/B1/B2 and the mode sense
header (``iscsi.cdb``), FUSE into the file mode of a read-only view. A frontend may only
narrow a capability by its own protocol limit (e.g. NBD's maximum payload), never widen it.

Two kinds of field:
- what the volume *is* (``thin``, ``zeroes_unmapped``, ``volatile_cache``, block sizes):
  the same for a volume and its read-only snapshot views;
- what a client *can do now* (``can_trim``, ``can_zero``, ...): a read-only view can read,
  cache, flush (a no-op) and report extents, but not write, trim or zero.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Capabilities:
    read_only: bool
    # Writes are buffered in memory until a flush (DESIGN §4, invariant 1): FLUSH and FUA
    # are meaningful, and accepted on a read-only view too (nothing to make durable).
    volatile_cache: bool
    can_flush: bool
    can_fua: bool
    can_trim: bool          # unmap blocks (NBD TRIM, SCSI UNMAP / WRITE SAME with UNMAP)
    can_zero: bool          # NBD WRITE_ZEROES
    can_fast_zero: bool     # zeroing punches holes, never slower than a write
    can_cache: bool         # prefetch (NBD CACHE, SCSI PRE-FETCH)
    can_extents: bool       # allocation map (NBD base:allocation, GET LBA STATUS)
    # Every connection to a volume shares one Volume object and its write buffer, so a
    # flush on any connection covers writes acknowledged on all of them.
    can_multi_conn: bool
    thin: bool              # thin provisioned: unmapped blocks use no space (LBPME)
    zeroes_unmapped: bool   # unmapped blocks read as zeros (LBPRZ)
    rotational: bool
    minimum_block: int      # any alignment works (a small write is a read-modify-write)
    preferred_block: int    # the volume's block size: no read-modify-write at this size
    maximum_block: int | None   # None: the volume sets no limit, the frontend does
    unmap_granularity: int  # a trim frees whole blocks of this size
