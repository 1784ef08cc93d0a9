"""Where things live on a device, and the device label (docs/FORMAT.md has the picture).

Every member of a pool has the same layout up to its data area:

    0                label (primary)                     4 KiB
    4 KiB            superblock ring: SB_SLOTS slots      4 KiB each
    64 KiB           journal ring                         layout.journal_size
    ...              metadata page area                   layout.pages_size
    data_offset      extents                              n_extents * extent_size
    size - 4 KiB     label (backup)                       4 KiB

The metadata (superblocks, journal, pages) is mirrored on every member at the same offsets.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass

import xxhash

from pool.errors import DeviceError, InvalidArgument

FORMAT_VERSION = 1
LABEL_SIZE = 4096
LABEL_MAGIC = b"STORAGED"
SB_OFFSET = 4096
SB_SLOT_SIZE = 4096
SB_SLOTS = 8
JOURNAL_OFFSET = 64 * 1024
PAGE_UNIT = 4096          # allocation unit of the metadata page area
SECTOR = 512              # allocation unit of fragments inside an extent
MIN_EXTENT = 64 * 1024
MAX_EXTENT = 1024 * 1024 * 1024
DEFAULT_EXTENT = 16 * 1024 * 1024
MiB = 1024 * 1024


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class Layout:
    """Offsets shared by every member of a pool (sizes in bytes)."""

    extent_size: int
    journal_size: int
    pages_size: int

    @property
    def journal_offset(self) -> int:
        return JOURNAL_OFFSET

    @property
    def pages_offset(self) -> int:
        return JOURNAL_OFFSET + self.journal_size

    @property
    def data_offset(self) -> int:
        return align_up(self.pages_offset + self.pages_size, MiB)

    def n_extents(self, device_size: int) -> int:
        usable = device_size - LABEL_SIZE - self.data_offset
        return max(0, usable // self.extent_size)

    def extent_offset(self, extent: int) -> int:
        return self.data_offset + extent * self.extent_size

    @staticmethod
    def choose(smallest_device: int, extent_size: int, meta_size: int | None) -> Layout:
        """Pick journal and page-area sizes for a new pool (see docs/FORMAT.md)."""
        if extent_size & (extent_size - 1) or not MIN_EXTENT <= extent_size <= MAX_EXTENT:
            raise InvalidArgument(
                f"extent size must be a power of two between {MIN_EXTENT // 1024}K and "
                f"{MAX_EXTENT // MiB}M, got {extent_size}")
        if meta_size is None:
            # 1/32 of the smallest member, at least 4 MiB, at most 8 GiB.
            meta_size = min(max(smallest_device // 32, 4 * MiB), 8192 * MiB)
        meta_size = align_up(meta_size, PAGE_UNIT * 4)
        journal = min(max(align_up(meta_size // 4, PAGE_UNIT), 256 * 1024), 64 * MiB)
        pages = max(meta_size - journal, 256 * 1024)
        layout = Layout(extent_size, journal, pages)
        if layout.n_extents(smallest_device) < 1:
            raise InvalidArgument(
                f"device of {smallest_device} bytes is too small: it needs at least "
                f"{layout.data_offset + extent_size + LABEL_SIZE} bytes for metadata and one "
                f"extent of {extent_size} bytes")
        return layout


@dataclass(frozen=True, slots=True)
class Label:
    """Identifies a device as member ``index`` of pool ``pool_uuid``."""

    pool_uuid: str
    pool_name: str
    device_uuid: str
    index: int
    generation: int
    device_size: int
    layout: Layout
    format_version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True).encode()
        if len(body) > LABEL_SIZE - 16:
            raise InvalidArgument("label does not fit (pool name too long?)")
        raw = LABEL_MAGIC + body + bytes(LABEL_SIZE - 16 - len(body))
        return raw + xxhash.xxh3_64_digest(raw)

    @staticmethod
    def decode(raw: bytes) -> Label:
        """Parse a label; raise DeviceError saying what is wrong with it."""
        if len(raw) != LABEL_SIZE or raw[:8] != LABEL_MAGIC:
            raise DeviceError("no storaged label")
        if xxhash.xxh3_64_digest(raw[:-8]) != raw[-8:]:
            raise DeviceError("label checksum mismatch (corrupt label)")
        try:
            d = json.loads(raw[8:-8].rstrip(b"\0"))
            d["layout"] = Layout(**d["layout"])
            label = Label(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise DeviceError(f"label is unreadable: {e}") from e
        if label.format_version > FORMAT_VERSION:
            raise DeviceError(f"label has format version {label.format_version}; this "
                              f"storaged reads up to {FORMAT_VERSION}")
        return label


def new_uuid() -> str:
    return str(uuid.uuid4())
