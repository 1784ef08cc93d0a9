"""The device layer: FileDevice on sparse files, MemoryDevice, and the test instruments
(FaultyDevice, RecordingDevice + WriteLog) the redundancy and crash suites rely on.

Invariant 4 needs a device layer that never passes a short read off as data; invariant 6
needs discard to really give space back; invariant 1's crash proofs need a write log that
records every write and sync, in order (DESIGN §4).
"""

from __future__ import annotations

import os
import random
import re
import threading
from pathlib import Path

import pytest

from pool import FileDevice, MemoryDevice, Pool, device, iovec
from pool.errors import DeviceError
from pool.faults import FaultyDevice, RecordingDevice, WriteLog
from volumes import VolumeManager

MiB = 1 << 20


def _blocks(path: Path) -> int:
    return os.stat(path).st_blocks


# ---- FileDevice -------------------------------------------------------------------------

def test_write_behind_syncs_in_the_background_and_never_loses_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SYNC_BEHIND bytes written, a device runs an fdatasync in a background thread.
    The kernel reports a write-back error to one fsync only: when that is the background
    one, the next sync() must still raise it (fsyncgate), exactly once."""
    monkeypatch.setattr(iovec, "SYNC_BEHIND", 2 * MiB)
    monkeypatch.setattr(iovec, "WRITE_BEHIND", MiB)
    real = os.fdatasync
    calls: list[str] = []
    fail_next = threading.Event()

    def fdatasync(fd: int) -> None:
        calls.append(threading.current_thread().name)
        if fail_next.is_set():
            fail_next.clear()
            raise OSError(5, "Input/output error")
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    dev = FileDevice(str(tmp_path / "dev"), create_size=64 * MiB)
    try:
        data = os.urandom(MiB)
        for i in range(3):
            dev.pwrite(i * MiB, data)
        dev._behind.join()
        assert calls == ["storaged-sync-behind"]
        dev.sync()                                  # nothing failed: nothing raised
        fail_next.set()
        dev.pwritev(8 * MiB, [data, data])          # 2 MiB more: a background sync, failing
        dev._behind.join()
        assert calls[-1] == "storaged-sync-behind" and not fail_next.is_set()
        with pytest.raises(DeviceError, match="Input/output error"):
            dev.sync()                              # its own fdatasync succeeds
        dev.sync()                                  # the error was reported once
        assert dev.pread(8 * MiB, MiB) == data
    finally:
        dev.close()


def test_file_device_is_sparse_and_round_trips(tmp_path: Path) -> None:
    """A new FileDevice is a sparse file of the asked size that reads zeros; pwrite, pwritev
    (empty buffers and more than IOV_MAX of them) and sync put back exactly what was
    written, where it was written."""
    path = tmp_path / "dev"
    dev = FileDevice(str(path), create_size=64 * MiB)
    try:
        assert dev.size == 64 * MiB == os.path.getsize(path)
        assert dev.path == str(path)
        assert _blocks(path) == 0
        assert dev.pread(10 * MiB, 4096) == bytes(4096)
        rng = random.Random(1)
        a = rng.randbytes(3 * 4096 + 17)
        dev.pwrite(5 * MiB - 100, a)
        pieces = [rng.randbytes(rng.randrange(0, 40)) for _ in range(2500)]
        dev.pwritev(20 * MiB + 3, pieces)
        dev.pwrite(dev.size - 8, b"the end!")
        dev.sync()
        assert dev.pread(5 * MiB - 100, len(a)) == a
        joined = b"".join(pieces)
        assert dev.pread(20 * MiB + 3, len(joined)) == joined
        assert dev.pread(20 * MiB, 3) == bytes(3)
        assert dev.pread(20 * MiB + 3 + len(joined), 5) == bytes(5)
        assert dev.pread(dev.size - 8, 8) == b"the end!"
        assert 0 < _blocks(path) * 512 < 2 * MiB
        with open(path, "rb") as f:               # really on the file, at that offset
            f.seek(5 * MiB - 100)
            assert f.read(len(a)) == a
        # Scattered into several buffers when cached (it is: just written).
        parts = [bytearray(n) for n in (1, 4095, len(a) - 4096)]
        got = dev.preadv_nowait(5 * MiB - 100, [parts[0], memoryview(parts[1]), parts[2]])
        assert got == len(a) and b"".join(parts) == a
        # More buffers than one preadv takes (IOV_MAX): several calls, back to back.
        many = [bytearray(3) for _ in range(1500)]
        assert dev.preadv_nowait(20 * MiB + 3, many) == 4500
        assert b"".join(many) == joined[:4500]
    finally:
        dev.close()
        dev.close()                               # closing twice is harmless
    again = FileDevice(str(path), create_size=MiB)  # an existing bigger file is kept
    try:
        assert again.size == 64 * MiB
        assert again.pread(dev.size - 8, 8) == b"the end!"
    finally:
        again.close()


def test_discard_punches_a_hole_that_reads_zeros(tmp_path: Path) -> None:
    """Invariant 6 at the bottom: discard on a file punches a hole -- the blocks are given
    back (st_blocks drops), the range reads zeros, the bytes around it (even inside the
    same file-system block) are untouched and the file keeps its size."""
    path = tmp_path / "dev"
    dev = FileDevice(str(path), create_size=16 * MiB)
    try:
        data = random.Random(2).randbytes(4 * MiB)
        dev.pwrite(MiB, data)
        dev.sync()
        before = _blocks(path)
        assert before * 512 >= 4 * MiB
        dev.discard(2 * MiB, 2 * MiB)
        assert before - _blocks(path) >= (2 * MiB) // 512 - 8
        assert dev.pread(2 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert dev.pread(MiB, MiB) == data[:MiB]
        assert dev.pread(4 * MiB, MiB) == data[3 * MiB:]
        dev.discard(MiB + 1000, 3000)              # unaligned: exactly these bytes zeroed
        assert dev.pread(MiB, 6000) == data[:1000] + bytes(3000) + data[4000:6000]
        assert dev.size == os.path.getsize(path) == 16 * MiB
    finally:
        dev.close()


def test_reads_past_the_end_raise_instead_of_returning_short_data(tmp_path: Path) -> None:
    """Invariant 4: a read that cannot be served in full is a DeviceError naming the device
    and the shortfall, never fewer bytes than asked (a truncated member must not pass for
    one full of zeros). The non-blocking read never raises: it says None."""
    path = tmp_path / "dev"
    dev = FileDevice(str(path), create_size=MiB)
    try:
        for off, n in [(MiB - 10, 20), (MiB, 1), (5 * MiB, 4096)]:
            with pytest.raises(DeviceError) as err:
                dev.pread(off, n)
            assert err.value.message.startswith(f"short read on {path}: ")
            assert f"of {n} bytes at {off}" in err.value.message
            assert dev.preadv_nowait(off, [bytearray(n)]) == max(0, MiB - off)  # short
        assert dev.pread(MiB - 10, 10) == bytes(10)
    finally:
        dev.close()


def test_what_is_not_a_device_is_refused(tmp_path: Path) -> None:
    """Invariant 9: a missing path, a directory or a FIFO is a DeviceError saying so."""
    with pytest.raises(DeviceError, match=r"cannot open device .*missing"):
        FileDevice(str(tmp_path / "missing"))
    with pytest.raises(DeviceError, match="cannot open device"):
        FileDevice(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DeviceError, match="neither a regular file nor a block device"):
        FileDevice(str(fifo))


def test_memory_device_bounds_and_discard() -> None:
    """MemoryDevice (used for crash images) refuses I/O beyond its end, zeroes on discard
    and hands out its image."""
    dev = MemoryDevice(8192, path="ram")
    dev.pwrite(100, b"abc")
    dev.pwritev(4096, [b"x" * 10, b"", b"y" * 5])
    assert dev.pread(100, 3) == b"abc"
    assert dev.pread(4096, 15) == b"x" * 10 + b"y" * 5
    for bad in (lambda: dev.pread(8190, 4), lambda: dev.pwrite(8190, b"1234"),
                lambda: dev.pread(-1, 2)):
        with pytest.raises(DeviceError, match="beyond end of ram"):
            bad()
    assert dev.preadv_nowait(8190, [bytearray(4)]) == 2          # short at the end
    two = [bytearray(2), bytearray(1)]
    assert dev.preadv_nowait(100, two) == 3 and two == [b"ab", b"c"]
    dev.discard(4096, 10)
    assert dev.pread(4096, 15) == bytes(10) + b"y" * 5
    img = dev.image()
    assert len(img) == 8192 and img[100:103] == b"abc"
    assert MemoryDevice(16, data=b"ab").image() == b"ab" + bytes(14)


# ---- FaultyDevice -----------------------------------------------------------------------

def _inner(tmp_path: Path, size: int = MiB) -> tuple[FileDevice, bytes]:
    dev = FileDevice(str(tmp_path / "inner"), create_size=size)
    data = random.Random(3).randbytes(size)
    dev.pwrite(0, data)
    return dev, data


def test_faulty_device_injects_errors_and_counts_them(tmp_path: Path) -> None:
    """Read and write errors are DeviceErrors saying they were injected; a failed write
    does not reach the device; bad ranges fail only the reads that overlap them; a device
    that is gone fails everything; every injected error is counted."""
    inner, data = _inner(tmp_path)
    dev = FaultyDevice(inner, seed=1)
    try:
        assert dev.pread(0, 4096) == data[:4096] and dev.injected_errors == 0
        assert dev.preadv_nowait(0, [bytearray(4096)]) == 0  # faults live on the blocking path
        dev.read_error_rate = 1.0
        want = re.escape(f"injected I/O error: read at 512 on {inner.path}")
        with pytest.raises(DeviceError, match=want):
            dev.pread(512, 10)
        dev.read_error_rate = 0.0
        dev.write_error_rate = 1.0
        with pytest.raises(DeviceError, match="injected I/O error: write at 0"):
            dev.pwrite(0, b"\0" * 100)
        with pytest.raises(DeviceError, match="injected I/O error: write at 8"):
            dev.pwritev(8, [b"a", b"b"])
        assert inner.pread(0, 4096) == data[:4096]     # nothing was written
        dev.write_error_rate = 0.0
        dev.short_read_rate = 1.0
        with pytest.raises(DeviceError, match="injected I/O error: short read at 0"):
            dev.pread(0, 100)
        dev.short_read_rate = 0.0
        dev.bad_ranges = [(10000, 20000)]
        for off, n in [(9000, 1001), (19999, 1), (12000, 100)]:
            with pytest.raises(DeviceError, match=f"bad range at {off}"):
                dev.pread(off, n)
        assert dev.pread(9000, 1000) == data[9000:10000]
        assert dev.pread(20000, 100) == data[20000:20100]
        dev.bad_ranges = []
        assert dev.injected_errors == 7
        dev.gone = True
        for op in (lambda: dev.pread(0, 1), lambda: dev.pwrite(0, b"x"), dev.sync,
                   lambda: dev.discard(0, 4096)):
            with pytest.raises(DeviceError, match="gone"):
                op()
        assert dev.injected_errors == 11
        dev.gone = False
        dev.pwrite(0, b"back")
        dev.sync()
        assert inner.pread(0, 4) == b"back"
    finally:
        dev.close()


def test_faulty_device_flips_exactly_one_bit_at_read_time(tmp_path: Path) -> None:
    """A flipped read differs from the truth in exactly one bit; the device itself is not
    changed (the flip is in the returned bytes only); each flip is counted."""
    inner, data = _inner(tmp_path)
    dev = FaultyDevice(inner, seed=4)
    dev.bitflip_rate = 1.0
    try:
        for i in range(50):
            off, n = i * 9000, 1 + i * 37
            got = dev.pread(off, n)
            want = data[off:off + n]
            assert len(got) == n
            diff = sum(bin(a ^ b).count("1") for a, b in zip(got, want, strict=True))
            assert diff == 1, (off, n, diff)
        assert dev.injected_flips == 50
        assert inner.pread(0, MiB) == data
    finally:
        dev.close()


def test_faulty_device_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    """The same seed and the same reads give the same faults (so a failing test can be
    replayed); another seed gives other faults."""
    inner, data = _inner(tmp_path)

    def run(seed: int) -> list[str]:
        dev = FaultyDevice(inner, seed=seed)
        dev.read_error_rate = 0.2
        dev.bitflip_rate = 0.3
        out = []
        for i in range(300):
            try:
                got = dev.pread(i * 3000, 64)
            except DeviceError:
                out.append("E")
                continue
            out.append("ok" if got == data[i * 3000:i * 3000 + 64] else got.hex())
        assert dev.injected_errors == out.count("E")
        assert dev.injected_flips == sum(1 for x in out if len(x) > 2)
        return out

    try:
        first = run(7)
        assert first == run(7)
        assert first != run(8)
        assert 30 < first.count("E") < 100 and 30 < sum(len(x) > 2 for x in first) < 130
    finally:
        inner.close()


# ---- RecordingDevice and WriteLog -------------------------------------------------------

def test_recording_devices_log_writes_syncs_and_discards_in_order() -> None:
    """DESIGN §4: every write (pwritev as one write of the joined bytes), discard and sync
    of every recorded device goes into one shared log, in the order it happened, with the
    device's number; marks interleave; reads are not logged; all of it reaches the device."""
    log = WriteLog()
    a, b = MemoryDevice(1 << 16, path="a"), MemoryDevice(1 << 16, path="b")
    ra, rb = RecordingDevice(a, 0, log), RecordingDevice(b, 1, log)
    assert (ra.path, ra.size) == ("a", 1 << 16)
    ra.pwrite(100, b"one")
    rb.pwritev(200, [b"tw", b"", b"o"])
    assert ra.pread(100, 3) == b"one"
    assert log.mark("flush 1 sent") == 2
    rb.sync()
    ra.discard(4096, 512)
    ra.sync()
    rb.pwrite(0, bytearray(b"three"))
    assert [(e.seq, e.device, e.kind, e.offset, e.data, e.length, e.label)
            for e in log.entries] == [
        (0, 0, "write", 100, b"one", 0, ""),
        (1, 1, "write", 200, b"two", 0, ""),
        (2, -1, "mark", 0, b"", 0, "flush 1 sent"),
        (3, 1, "sync", 0, b"", 0, ""),
        (4, 0, "discard", 4096, b"", 512, ""),
        (5, 0, "sync", 0, b"", 0, ""),
        (6, 1, "write", 0, b"three", 0, ""),
    ]
    assert type(log.entries[6].data) is bytes    # a copy, not the caller's buffer
    assert b.pread(200, 3) == b"two" and b.pread(0, 5) == b"three"


def test_write_log_is_safe_across_threads() -> None:
    """Devices are driven from worker threads: concurrent writes all land in the log,
    numbered 0..n-1 in log order, each device's own writes in its own order."""
    log = WriteLog()
    devs = [RecordingDevice(MemoryDevice(1 << 20, path=f"m{i}"), i, log) for i in range(4)]

    def work(d: RecordingDevice) -> None:
        for j in range(200):
            d.pwrite(j * 16, j.to_bytes(2, "little"))
    threads = [threading.Thread(target=work, args=(d,)) for d in devs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.seq for e in log.entries] == list(range(800))
    for i in range(4):
        mine = [e for e in log.entries if e.device == i]
        assert [e.offset for e in mine] == [j * 16 for j in range(200)]


async def test_a_flush_returns_only_after_every_device_synced_its_writes() -> None:
    """Invariant 1 seen from the write log: when a volume flush (or FUA write) returns, no
    device holds an unsynced write -- every device's last logged event is a sync."""
    log = WriteLog()
    devs = [RecordingDevice(MemoryDevice(48 * MiB, path=f"r{i}"), i, log) for i in range(3)]
    pool = await Pool.create("rec", devs, profile="ec:2+1", extent_size=MiB)
    try:
        vol = await VolumeManager(pool).create("v", 4 * MiB, block_size=4096)

        def unsynced() -> set[int]:
            last: dict[int, str] = {}
            for e in log.entries:
                if e.kind in ("write", "sync"):
                    last[e.device] = e.kind
            return {d for d, kind in last.items() if kind == "write"}

        for i in range(3):
            n = len(log.entries)
            await vol.write(i * 70000, os.urandom(50000))
            assert len(log.entries) == n     # DESIGN §4: acknowledged from the buffer
            await vol.flush()
            assert unsynced() == set()
            assert any(e.kind == "write" for e in log.entries[n:])
            await vol.write(3 * MiB + i * 4096, b"fua" * 1000, fua=True)
            assert unsynced() == set()
    finally:
        await pool.close()


def test_close_leaves_a_descriptor_open_while_a_call_is_stuck_in_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write the pool gave up on (a hung device) may still be inside the kernel when the
    pool closes: the descriptor must not be closed under it, or its number, reused by the
    next file opened, would take the late write. Once closed, every call fails."""
    monkeypatch.setattr(device, "CLOSE_WAIT", 0.1)
    dev = FileDevice(str(tmp_path / "d"), create_size=1 << 20)
    fd = dev._fd
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:
        with dev._in_use():             # what a pwrite blocked in the kernel holds
            entered.set()
            release.wait(10)
    t = threading.Thread(target=stuck)
    t.start()
    try:
        assert entered.wait(10)
        dev.close()
        os.fstat(fd)                    # still open: close gave up waiting and left it
        with pytest.raises(DeviceError, match="is closed"):
            dev.pwrite(0, b"late")
    finally:
        release.set()
        t.join()
    os.close(fd)
    other = FileDevice(str(tmp_path / "e"), create_size=1 << 20)
    other.close()
    with pytest.raises(OSError):
        os.fstat(other._fd)             # nothing stuck: closed at once


def test_pwritev_goes_on_after_a_short_write(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A short pwritev (the kernel may write less than asked) is continued from the byte
    where it stopped, in the middle of a buffer, until every byte is written in order."""
    dev = FileDevice(str(tmp_path / "dev"), create_size=8 * MiB)
    real = os.pwritev
    calls: list[int] = []

    def short(fd: int, bufs: list[bytes | memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) % 2:                  # every other call writes only 1000 bytes
            return real(fd, [memoryview(b"".join(bytes(b) for b in bufs))[:1000]], offset)
        return real(fd, bufs, offset)
    rng = random.Random(5)
    pieces = [rng.randbytes(rng.randrange(0, 700)) for _ in range(40)]
    try:
        monkeypatch.setattr(os, "pwritev", short)
        dev.pwritev(MiB + 7, pieces)
        monkeypatch.undo()
        joined = b"".join(pieces)
        assert len(calls) >= 2
        assert dev.pread(MiB + 7, len(joined)) == joined
        assert dev.pread(MiB, 7) == bytes(7)
        assert dev.pread(MiB + 7 + len(joined), 9) == bytes(9)
    finally:
        dev.close()
