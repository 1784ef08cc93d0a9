"""Device wrappers used as test instruments (nbdkit's error/delay filters, dm-log-writes).

- ``RecordingDevice`` logs every write, discard and sync into a shared ``WriteLog``, so the
  crash suite can rebuild what the devices could hold after a power cut at any instant.
- ``FaultyDevice`` injects I/O errors, bit flips, short reads and disappearance.

Both forward everything they do not change to the device they wrap.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pool.device import Buffer, Device
from pool.errors import DeviceError


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One event on one device. ``kind`` is 'write', 'discard', 'sync' or 'mark'."""

    seq: int
    device: int
    kind: str
    offset: int = 0
    data: bytes = b""
    length: int = 0
    label: str = ""


@dataclass
class WriteLog:
    """The interleaved history of writes and syncs of every recorded device of a pool."""

    entries: list[LogEntry] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, device: int, kind: str, offset: int = 0, data: bytes = b"",
            length: int = 0, label: str = "") -> None:
        with self._lock:
            self.entries.append(LogEntry(len(self.entries), device, kind, offset, data,
                                         length, label))

    def mark(self, label: str) -> int:
        """Record a test-level event (e.g. 'flush 7 done'); returns its position."""
        with self._lock:
            self.entries.append(LogEntry(len(self.entries), -1, "mark", label=label))
            return len(self.entries) - 1


class RecordingDevice:
    """Forwards to ``inner`` and logs each write/discard/sync with the device's number."""

    def __init__(self, inner: Device, number: int, log: WriteLog) -> None:
        self.inner = inner
        self.number = number
        self.log = log

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def preadv_nowait(self, offset: int, buffers: Sequence[bytearray | memoryview]) -> int:
        return self.inner.preadv_nowait(offset, buffers)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.inner.pwrite(offset, data)
        self.log.add(self.number, "write", offset, bytes(data))

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.pwrite(offset, b"".join(buffers))

    def sync(self) -> None:
        self.inner.sync()
        self.log.add(self.number, "sync")

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)
        self.log.add(self.number, "discard", offset, length=length)

    def close(self) -> None:
        self.inner.close()


class FaultyDevice:
    """Forwards to ``inner`` and injects the faults it is told to.

    ``read_error_rate``/``write_error_rate``: probability that an op fails with EIO.
    ``bitflip_rate``: probability that a read returns data with one bit flipped.
    ``short_read_rate``: probability that a read returns fewer bytes than asked.
    ``bad_ranges``: byte ranges whose reads always fail.
    ``gone``: every operation fails (the device was pulled).
    ``read_delay``: every read first waits this long (a device that hangs).
    ``write_delay``: every write and sync first waits this long (a device whose writes
    hang).
    ``discard_delay``: every discard first waits this long (a slow thin LUN or SSD).
    Counters record what was injected so tests can assert it was detected.
    """

    def __init__(self, inner: Device, *, seed: int = 0) -> None:
        self.inner = inner
        self.read_error_rate = 0.0
        self.write_error_rate = 0.0
        self.bitflip_rate = 0.0
        self.short_read_rate = 0.0
        self.bad_ranges: list[tuple[int, int]] = []
        self.gone = False
        self.read_delay = 0.0             # seconds every read takes (a hanging device)
        self.write_delay = 0.0            # seconds every write and sync takes
        self.discard_delay = 0.0          # seconds every discard takes
        self.injected_errors = 0
        self.injected_flips = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def size(self) -> int:
        return self.inner.size

    def _roll(self, rate: float) -> bool:
        if rate <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def _fail(self, what: str) -> DeviceError:
        self.injected_errors += 1
        return DeviceError(f"injected I/O error: {what} on {self.path}")

    def preadv_nowait(self, offset: int, buffers: Sequence[bytearray | memoryview]) -> int:
        return 0  # every read goes through pread, where the faults are

    def pread(self, offset: int, length: int) -> bytes:
        if self.read_delay:
            time.sleep(self.read_delay)
        if self.gone:
            raise self._fail("read from a device that is gone")
        for start, end in self.bad_ranges:
            if offset < end and start < offset + length:
                raise self._fail(f"read of bad range at {offset}")
        if self._roll(self.read_error_rate):
            raise self._fail(f"read at {offset}")
        data = self.inner.pread(offset, length)
        if self._roll(self.short_read_rate) and length > 1:
            raise self._fail(f"short read at {offset}")
        if data and self._roll(self.bitflip_rate):
            with self._lock:
                bit = self._rng.randrange(len(data) * 8)
            buf = bytearray(data)
            buf[bit // 8] ^= 1 << (bit % 8)
            self.injected_flips += 1
            data = bytes(buf)
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.write_delay:
            time.sleep(self.write_delay)
        if self.gone:
            raise self._fail("write to a device that is gone")
        if self._roll(self.write_error_rate):
            raise self._fail(f"write at {offset}")
        self.inner.pwrite(offset, data)

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.pwrite(offset, b"".join(buffers))

    def sync(self) -> None:
        if self.write_delay:
            time.sleep(self.write_delay)
        if self.gone:
            raise self._fail("sync of a device that is gone")
        self.inner.sync()

    def discard(self, offset: int, length: int) -> None:
        if self.discard_delay:
            time.sleep(self.discard_delay)
        if self.gone:
            raise self._fail("discard on a device that is gone")
        self.inner.discard(offset, length)

    def close(self) -> None:
        self.inner.close()
