"""The wire format of Ceph's ``lock`` object class (src/cls/lock), pure: no I/O.

The Python binding of librados takes and releases locks but cannot list the lockers of an
object or break another client's lock; ``Ioctx.execute(obj, "lock", method, payload)``
can, with payloads in Ceph's encoding: little-endian integers, a string as a u32 length
and its bytes, a struct as ``ENCODE_START(v, compat)`` framing (u8 v, u8 compat, u32 body
length) around its fields, a map as a u32 count and its key/value pairs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pool.errors import StorageError

ENTITY_CLIENT = 8           # entity_name_t type of a client (CEPH_ENTITY_TYPE_CLIENT)
LOCK_EXCLUSIVE = 1          # ClsLockType
LOCK_FLAG_MAY_RENEW = 1     # lock_exclusive flags
LOCK_FLAG_MUST_RENEW = 2


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<I", len(b)) + b


def _framed(body: bytes, v: int = 1, compat: int = 1) -> bytes:
    return struct.pack("<BBI", v, compat, len(body)) + body


def get_info_op(name: str) -> bytes:
    """cls_lock_get_info_op: the lock's name."""
    return _framed(_str(name))


def break_lock_op(name: str, client_id: int, cookie: str) -> bytes:
    """cls_lock_break_op: lock name, the locker (entity_name_t: u8 type, i64 num), cookie."""
    return _framed(_str(name) + struct.pack("<Bq", ENTITY_CLIENT, client_id) + _str(cookie))


def assert_locked_op(name: str, cookie: str, tag: str = "") -> bytes:
    """cls_lock_assert_op: name, u8 type, cookie, tag. In a write op it makes the whole op
    fail (EBUSY) unless the calling client holds the lock with this cookie."""
    return _framed(_str(name) + struct.pack("<B", LOCK_EXCLUSIVE) + _str(cookie) + _str(tag))


@dataclass(frozen=True, slots=True)
class Locker:
    """One holder of a lock: the client (``client.<id>``), its cookie, when the lock
    expires (0: never; seconds since the epoch) and the description it gave."""

    client_id: int
    cookie: str
    expiration: float
    description: str


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.raw):
            raise StorageError("cls_lock reply is truncated")
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("<I")
        return self.take(n).decode(errors="replace")

    def frame(self) -> int:
        """Enter an ENCODE_START frame; returns where it ends."""
        _v, _compat, n = self.unpack("<BBI")
        if self.pos + n > len(self.raw):
            raise StorageError("cls_lock reply is truncated")
        return self.pos + n


def _skip_addr(r: _Reader) -> None:
    """entity_addr_t: a marker byte 1 and a framed body (msgr2 clients), or the legacy
    fixed form (marker 0: 3 pad bytes, u32 nonce, 128-byte sockaddr_storage)."""
    (marker,) = r.unpack("<B")
    if marker == 1:
        r.pos = r.frame()
    else:
        r.take(3 + 4 + 128)


def parse_get_info(raw: bytes) -> tuple[list[Locker], int]:
    """cls_lock_get_info_reply -> (lockers, lock type)."""
    r = _Reader(raw)
    end = r.frame()
    (count,) = r.unpack("<I")
    lockers = []
    for _ in range(count):
        id_end = r.frame()                       # cls_lock_id_t
        etype, num = r.unpack("<Bq")
        cookie = r.string()
        r.pos = id_end
        info_end = r.frame()                     # cls_lock_locker_info_t
        sec, nsec = r.unpack("<II")
        _skip_addr(r)
        desc = r.string()
        r.pos = info_end
        if etype == ENTITY_CLIENT:
            lockers.append(Locker(num, cookie, sec + nsec / 1e9, desc))
    (lock_type,) = r.unpack("<B")
    r.pos = end
    return lockers, lock_type
