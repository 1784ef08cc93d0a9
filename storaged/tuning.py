"""Process-wide tuning applied by the daemon and storagectl at start (``tune_process``).

The GIL switch interval: the event loop hands device I/O, checksums, lz4 and zfec to
worker threads, and each C call there gives the GIL up and must get it back from the event
loop. When the loop has work queued it keeps the GIL until CPython's switch interval asks
for it (5 ms by default), so a worker thread needs milliseconds for what takes
microseconds. In tests/unit/test_write_buffer.py, eight writers racing a reader that keeps the
loop busy, with writebacks of about 1,100 records meanwhile, took 48 s at 5 ms (about
36 ms per record written back), 20 s at 200 us and 2.9 s at 50 us. storaged sets 50 us;
a forced switch only happens while a thread is waiting for the GIL.

The allocator: storaged moves data in buffers of 64 KiB to a few MiB (records, NBD and
iSCSI payloads, stream chunks). With glibc's default settings a buffer above the dynamic
mmap threshold gets its own mmap and is unmapped when freed, and the top of the heap is
given back whenever 128 KiB of it is free; either way the next buffer of that size starts
on fresh pages, and the page faults that fill them cost more than the copy itself (about
1.5 ms per MiB on the development VM, against 60 us when the pages are reused). A fixed
mmap threshold of 32 MiB and a trim threshold of 256 MiB keep such buffers on the heap,
reused. The price is memory held after a burst: at most what the burst used, up to the
trim threshold, which a storage node has.

The cyclic garbage collector: CPython collects its youngest generation every 700 net
allocations of container objects (tuples, lists, memoryviews...), holding the GIL
throughout. The write path makes a few such objects per fragment (views, header pieces,
iovec lists), so an ec:4+2 writeback of 1 GiB ran about 770 young collections, which
took 0.5 s of the 4.5 s and stalled the encoding and writing threads meanwhile (measured
with gc.callbacks on device files on tmpfs). storaged's objects are not in reference
cycles on those paths; freeing them does not need the collector. A first-generation
threshold of 10,000 (the older generations' factors unchanged) makes it about 50
collections and 0.02 s, and the ec:4+2 writeback 15-25% faster there. The price is up to
10,000 young objects more before a cycle among them is found, a few MiB at most.

After start-up (``freeze_startup``, once the pools are imported and the listeners are up):
one full collection, then ``gc.freeze()``, so the objects that live as long as the process
(modules, classes, functions, the imported pools' state) leave the collector's
generations. A full collection traverses every tracked object with the GIL held: in the
benchmark server's state (a pool with two 1 GiB volumes, 28,000 tracked objects) one took
6.8 ms, with them frozen well under 0.1 ms, and a daemon with more pools and volumes has
more. A full collection comes about once per million container allocations, so it is one
request in a million that waited those milliseconds, not the p99 (issue 27: at queue depth
1 no collection at all ran in 5-s fio runs). The price: a reference cycle among the frozen
objects that becomes garbage later (a pool exported after start-up) is never collected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20       # glibc's upper bound for this setting on 64-bit
TRIM_THRESHOLD = 256 << 20
SWITCH_INTERVAL = 50e-6          # seconds
GC_YOUNG_THRESHOLD = 10_000      # container allocations between young collections


def tune_process() -> None:
    """All three settings: the GIL switch interval, the allocator thresholds and the
    collector's young-generation threshold."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    tune_malloc()
    tune_gc()


def tune_gc() -> None:
    """Collect the young generation every GC_YOUNG_THRESHOLD container allocations."""
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def freeze_startup() -> int:
    """Collect everything once, then move every object still tracked to the collector's
    permanent generation (``gc.freeze``): the objects of start-up are not traversed by
    later collections. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def tune_malloc() -> bool:
    """Set the allocator thresholds above (glibc only); False where they cannot be set."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False              # not glibc (e.g. musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the buffer thresholds; using the allocator's defaults")
    return ok


__all__ = ["freeze_startup", "tune_gc", "tune_malloc", "tune_process"]
