"""Who owns a pool: the owner record each member carries, and the checks an import or a
create makes before it touches a device (DESIGN invariant 10; ZFS multihost/MMP style).

Two locks keep a second daemon off a live pool:

- locally, the member's descriptor: an exclusive flock on a file, O_EXCL on a block device
  (``FileDevice(exclusive=True)``). The kernel releases it when the process dies;
- where that does not reach (a SAN LUN or iSCSI disk that other hosts see), the owner
  record at ``OWNER_OFFSET`` of every member (docs/FORMAT.md): host, daemon instance, pid,
  a heartbeat sequence and time, and the activity interval the owner promises to beat
  within. The owner rewrites it every ``interval`` seconds.

Invariants this module owns:

1. A record names exactly one owner; an all-zero block (old pools, exported pools) means
   "no owner".
2. ``assess`` is pure: the decision depends only on the records read and who asks.
3. An import never takes a pool whose record names another owner unless it watched the
   record for the record's whole activity interval and the heartbeat did not move, and the
   operator forced it (``watch`` + ``force``).
4. Nothing here writes except ``write_record``/``clear_record``, called only once the pool
   has been taken (import decided, or created).

``OwnerKeeper`` keeps a taken pool's record (the pool's ownership block):

5. Data and metadata writes go out only while this daemon's ownership was confirmed by a
   beat within half the activity interval (``confirm``); past that, a beat comes first.
6. A beat that finds another owner's record at a sequence no lower than ours fails the
   pool (all I/O stops, like ZFS suspending a pool whose MMP check fails) and writes
   nothing; a lower one is a stale record and is overwritten.
7. Beats, the take and the release are serialized (one lock), so no beat lands after the
   record was cleared by an export.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Protocol

import trio
import xxhash

from pool.deadlines import Deadlines
from pool.device import Device
from pool.devio import run, write_within
from pool.errors import Busy, DeviceError, StorageError
from pool.store import LocalStore
from pool.txn import Transaction

log = logging.getLogger(__name__)

OWNER_OFFSET = 60 * 1024        # between the superblock ring (ends at 36 KiB) and journal
OWNER_SIZE = 4096
OWNER_MAGIC = b"SDOWNER1"
DEFAULT_INTERVAL = 2.0          # seconds between heartbeats
DEFAULT_ACTIVITY = 10.0         # silence after which the owner counts as gone


@dataclass(frozen=True, slots=True)
class Owner:
    """Who we are: host id (stable per machine), host name, daemon instance (stable per
    state directory) and pid."""

    host_id: str
    host: str
    instance: str
    pid: int

    def describe(self) -> str:
        return f"host {self.host} (id {self.host_id}), pid {self.pid}, daemon {self.instance}"


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    pool_uuid: str
    owner: Owner
    seq: int                  # heartbeat sequence, +1 per beat
    time: float               # wall clock of the beat (informational: clocks differ)
    interval: float           # seconds between beats
    activity: float           # silence after which the owner counts as gone

    def beat(self) -> OwnerRecord:
        return replace(self, seq=self.seq + 1, time=time.time())

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True).encode()
        raw = OWNER_MAGIC + body + bytes(OWNER_SIZE - 16 - len(body))
        return raw + xxhash.xxh3_64_digest(raw)

    @staticmethod
    def decode(raw: bytes) -> OwnerRecord | None:
        """The record, or None for an empty block; DeviceError for a damaged one."""
        if not any(raw):
            return None
        if len(raw) != OWNER_SIZE or raw[:8] != OWNER_MAGIC:
            raise DeviceError("owner block holds no owner record")
        if xxhash.xxh3_64_digest(raw[:-8]) != raw[-8:]:
            raise DeviceError("owner record checksum mismatch")
        try:
            d = json.loads(raw[8:-8].rstrip(b"\0"))
            d["owner"] = Owner(**d["owner"])
            return OwnerRecord(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise DeviceError(f"owner record is unreadable: {e}") from e


@dataclass(frozen=True, slots=True)
class Claim:
    """What an importing or creating daemon writes: itself and its heartbeat timing."""

    owner: Owner
    interval: float = DEFAULT_INTERVAL
    activity: float = DEFAULT_ACTIVITY

    def record(self, pool_uuid: str, seq: int) -> OwnerRecord:
        return OwnerRecord(pool_uuid, self.owner, seq, time.time(), self.interval,
                           self.activity)


# ---- who we are -------------------------------------------------------------------------
def host_id() -> str:
    """ZFS's /etc/hostid if there is one, else systemd's machine id, else the host name."""
    try:
        with open("/etc/hostid", "rb") as f:
            raw = f.read(4)
        if len(raw) == 4:
            return f"{int.from_bytes(raw, 'little'):08x}"
    except OSError:
        pass
    try:
        with open("/etc/machine-id") as f:
            mid = f.read().strip()
        if mid:
            return mid[:16]
    except OSError:
        pass
    return socket.gethostname()


def instance_id(state_dir: str) -> str:
    """This daemon's instance id, kept in the state directory (``owner-id``) so that a
    restart of the same daemon (after a crash too) is the same owner. Blocking."""
    path = os.path.join(state_dir, "owner-id")
    try:
        with open(path) as f:
            text = f.read().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    text = str(uuid.uuid4())
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return text


def me(state_dir: str) -> Owner:
    return Owner(host_id(), socket.gethostname(), instance_id(state_dir), os.getpid())


# ---- reading and writing (blocking) ----------------------------------------------------
def read_record(dev: Device) -> OwnerRecord | None:
    """The member's owner record, read past this host's page cache where possible (the
    writer may be another host). A damaged record counts as none: the flock and the
    labels still guard, and the next heartbeat rewrites it."""
    drop = getattr(dev, "drop_cache", None)
    if drop is not None:
        drop(OWNER_OFFSET, OWNER_SIZE)
    try:
        return OwnerRecord.decode(dev.pread(OWNER_OFFSET, OWNER_SIZE))
    except DeviceError:
        return None


def write_record(dev: Device, record: OwnerRecord) -> None:
    dev.pwrite(OWNER_OFFSET, record.encode())
    dev.sync()


def clear_record(dev: Device) -> None:
    dev.pwrite(OWNER_OFFSET, bytes(OWNER_SIZE))
    dev.sync()


def read_path(path: str) -> OwnerRecord | None:
    """The owner record of a device given by path, opened read-only (no lock taken)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, OWNER_SIZE, OWNER_OFFSET)
        return OwnerRecord.decode(raw) if len(raw) == OWNER_SIZE else None
    except (OSError, DeviceError):
        return None
    finally:
        os.close(fd)


def lock_holder(path: str) -> int | None:
    """The pid holding an flock on ``path`` (from /proc/locks), if the kernel tells."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (waiters: "1: -> FLOCK ...")
        if (len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].lower() == want
                and parts[4].isdigit()):
            return int(parts[4])
    return None


# ---- decisions -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Assessment:
    """What the records of a pool's members say about its owner."""

    record: OwnerRecord | None      # the newest record naming someone else; None: free
    mine: bool                      # the newest record is ours (this daemon instance)


def assess(records: Sequence[OwnerRecord | None], pool_uuid: str, me: Owner) -> Assessment:
    """Invariant 2: pure. Records of another pool (a device reused) are ignored."""
    valid = [r for r in records if r is not None and r.pool_uuid == pool_uuid]
    if not valid:
        return Assessment(None, False)
    newest = max(valid, key=lambda r: r.seq)
    if newest.owner.instance == me.instance and newest.owner.host_id == me.host_id:
        return Assessment(None, True)
    return Assessment(newest, False)


def describe(record: OwnerRecord, now: float | None = None) -> str:
    ago = (time.time() if now is None else now) - record.time
    return (f"{record.owner.describe()}, last heartbeat {max(ago, 0):.1f} s ago "
            f"(seq {record.seq})")


def watch(devices: Sequence[Device], record: OwnerRecord, pool_name: str, *,
          sleep: float | None = None) -> None:
    """Blocking (run in a thread). Read the owner records for the activity interval the
    record promises; raise Busy as soon as the heartbeat moves (invariant 3)."""
    seconds = max(record.activity, record.interval)
    step = sleep if sleep is not None else max(min(record.interval / 2, 1.0), 0.05)
    end = time.monotonic() + seconds
    while True:
        for dev in devices:
            now = read_record(dev)
            if now is not None and now.pool_uuid == record.pool_uuid and (
                    now.seq != record.seq or now.owner != record.owner):
                raise Busy(f"pool {pool_name} is active: its owner, {describe(now)}, is "
                           f"writing heartbeats; it cannot be imported here")
        if time.monotonic() >= end:
            return
        time.sleep(min(step, max(end - time.monotonic(), 0.0)))


# ---- keeping the record of a taken pool ---------------------------------------------------
class OwnerHost(Protocol):
    """What ``OwnerKeeper`` uses of its pool: the device fan-out (the store's
    ``calls``/``per_device``) and the pool's state (the transaction's)."""

    @property
    def devices(self) -> list[Device | None]: ...
    @property
    def deadlines(self) -> Deadlines: ...
    @property
    def name(self) -> str: ...
    @property
    def uuid(self) -> str: ...
    @property
    def devstore(self) -> LocalStore: ...
    @property
    def txn(self) -> Transaction: ...


class OwnerKeeper:
    """The owner record this daemon keeps on every member of one pool (invariants 5-7).
    ``record`` is None while none is written (a pool opened without a claim, or
    released)."""

    def __init__(self, pool: OwnerHost) -> None:
        self._pool = pool
        self.record: OwnerRecord | None = None
        self._lock = trio.Lock()
        self._confirmed = 0.0      # time.monotonic() of the last beat that found us owner

    async def take(self, claim: Claim, devices: Sequence[Device] | None = None) -> None:
        """Write this daemon's owner record to every member (the pool is taken). Its
        sequence continues after the newest one found, so readers see it move."""
        p = self._pool
        devs = list(devices) if devices is not None else [
            d for d in p.devices if d is not None]
        found = await run(lambda: [read_record(d) for d in devs])
        seq = max((r.seq for r in found if r is not None), default=0) + 1
        record = claim.record(p.uuid, seq)
        async with self._lock:
            await write_within([(d, partial(write_record, d, record)) for d in devs],
                               "writing the owner record", p.deadlines)
            self.record = record
            self._confirmed = time.monotonic()

    async def heartbeat(self) -> None:
        """One beat: if a member's record names another owner at a sequence no lower than
        ours (a taker continues after the highest it found), the pool was taken over while
        this daemon was silent (hung, or cut off): stop all I/O at once (invariant 6). A
        lower one is a stale record of an earlier owner on a member that came back, and is
        overwritten. Otherwise write the next sequence to every present member, under the
        write deadline."""
        p = self._pool
        async with self._lock:
            mine = self.record
            if mine is None or p.txn.closed or p.txn.failed is not None:
                return
            seen: dict[int, OwnerRecord | None] = {}

            def reader(i: int, dev: Device) -> Callable[[], None]:
                def read() -> None:
                    seen[i] = read_record(dev)
                return read
            await p.devstore.per_device([(i, reader(i, d)) for i, d in enumerate(p.devices)
                                 if d is not None], "read", tolerate=True,
                                what="a read of the owner record")
            for rec in seen.values():
                if (rec is not None and rec.pool_uuid == mine.pool_uuid
                        and rec.owner.instance != mine.owner.instance
                        and rec.seq >= mine.seq):
                    self.record = None
                    p.txn.fail(f"taken over by {describe(rec)}")   # (logged there)
                    return
            beat = mine.beat()
            started = time.monotonic()
            failed = await p.devstore.per_device(
                p.devstore.calls(partial(write_record, record=beat)), "write",
                tolerate=True, what="a heartbeat")
            if len(failed) < sum(d is not None for d in p.devices):
                self.record = beat
                self._confirmed = started

    async def confirm(self) -> None:
        """Called before data and metadata writes. They go out only while this daemon's
        ownership was confirmed by a beat within half the activity interval: a takeover
        (which first waits a whole interval without a beat) cannot have happened since.
        Past that (the daemon was stopped, starved or cut off), a beat first confirms
        ownership, or finds the pool taken over and fails it (PoolFailed), before anything
        is written (invariant 5). Costs a clock read while the heartbeat runs on time."""
        mine = self.record
        if mine is not None and time.monotonic() - self._confirmed > mine.activity / 2:
            await self.heartbeat()
            self._pool.txn.check_ok()

    async def release(self, *, clear: bool) -> None:
        """Stop heartbeats; ``clear``: also zero the owner record on every member."""
        p = self._pool
        async with self._lock:
            had, self.record = self.record, None
            if clear and had is not None:
                try:
                    await p.devstore.per_device(p.devstore.calls(clear_record), "write",
                                        tolerate=True, what="clearing the owner record")
                except StorageError as e:
                    log.warning("pool %s: clearing the owner record: %s", p.name,
                                e.message)
