"""The SCSI executor: runs what ``iscsi.cdb`` decoded against a Volume.

``LogicalUnit.plan(cdb)`` decodes and validates a CDB without touching the volume
(``iscsi.cdb.decode``): it returns either a finished ``Result`` (a refusal, with its exact
sense) or a ``Plan`` that says how many bytes of Data-Out the command needs and how to run
it. ``Plan.run(data)`` awaits Volume calls and returns a ``Result`` (status, Data-In bytes,
sense); these awaits are the only ones of the SCSI layer. Storage errors are translated in
one place (``sense_for``, by errno through ``cdb.sense_for_errno``).

No trio here: atomicity of COMPARE AND WRITE comes from a ``Gate`` the transport provides
(writes hold it shared, COMPARE AND WRITE exclusive).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from iscsi import cdb as C
from iscsi import reservations as pr
from iscsi.cdb import GOOD, LBA_SIZE, OK, Gate, Plan, Result, Sense, check
from iscsi.reservations import Nexus, Reservations, ReservationStore
from volumes import Capabilities, StorageError, Volume

WRITE_SAME_CHUNK: Final = 1 << 20


def sense_for(e: StorageError, *, write: bool) -> Sense:
    """The one translation of storage errors into sense data."""
    return C.sense_for_errno(e.errno, write=write)


@dataclass
class LogicalUnit:
    """One volume as a SCSI direct-access block device (shared by all sessions)."""

    volume: Volume
    gate: Gate
    serial: str
    target_name: str
    target_port: int = 1
    # Mode parameters an initiator may change (D_SENSE in the control page).
    d_sense: bool = False
    # Persistent reservations, kept by ``store`` under ``unit_key`` (if any).
    store: ReservationStore | None = None
    unit_key: str = ""
    reservations: Reservations = field(default_factory=Reservations)
    naa: bytes = field(default=b"", init=False)

    def __post_init__(self) -> None:
        # NAA 6 (IEEE registered extended): stable per volume, from its serial.
        digest = hashlib.sha256(self.serial.encode()).digest()
        # OUI-like company id 0x001405 (locally chosen), then 100 bits of the hash.
        self.naa = bytes([0x60 | 0x00, 0x14, 0x05 << 4 | digest[0] >> 4]) + digest[1:14]
        if self.store is not None:
            saved = self.store.load_reservations(self.unit_key)
            if saved is not None:
                self.reservations = Reservations.from_json(saved)

    # ---- geometry -------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return self.volume.size // LBA_SIZE

    @property
    def caps(self) -> Capabilities:
        """What the volume offers, as of now (a view's read-only flag may be set late)."""
        return self.volume.capabilities()

    @property
    def read_only(self) -> bool:
        """``caps.read_only`` (the volume's flag, which capabilities() reports as is)."""
        return self.volume.read_only

    # ---- entry point -----------------------------------------------------------------
    def plan(self, cdb: bytes, nexus: Nexus | None = None) -> Plan | Result:
        """``nexus``: the I_T nexus the command came from (None: an anonymous one)."""
        rw = C.decode_rw(self, cdb)
        if rw is not None:          # (a READ or WRITE decode() takes as it is)
            write, lba, count, fua = rw
            if write:
                return _WritePlan(self, "WRITE", lba, count, fua)
            return _ReadPlan(self, lba, count)
        op = C.decode(self, cdb, nexus)
        if isinstance(op, Result):
            return op
        build: Callable[[LogicalUnit, Any], Plan] = _BUILDERS[type(op)]
        return build(self, op)

    # ---- helpers ---------------------------------------------------------------------
    async def _guard(self, write: bool, coro: Callable[[], Awaitable[Result]]) -> Result:
        try:
            return await coro()
        except StorageError as e:
            return check(sense_for(e, write=write))

    # ---- one plan per decoded command ------------------------------------------------
    def _answer(self, op: C.Answer) -> Plan:
        result = op.result

        async def run(_data: bytes) -> Result:
            return result
        return Plan(op.name, 0, run)

    def _read(self, op: C.Read) -> Plan:
        return _ReadPlan(self, op.lba, op.count)

    async def _read_data(self, lba: int, count: int) -> Result:
        parts = await self.volume.read_vectored(lba * LBA_SIZE, count * LBA_SIZE)
        return Result(GOOD, parts=tuple(parts))

    def _write(self, op: C.Write) -> Plan:
        return _WritePlan(self, op.name, op.lba, op.count, op.fua)

    def _verify(self, op: C.Verify) -> Plan:
        lba, count, bytchk = op.lba, op.count, op.bytchk

        async def run(data: bytes) -> Result:
            if not count:
                return OK

            async def go() -> Result:
                have = await self.volume.read(lba * LBA_SIZE, count * LBA_SIZE)
                if not bytchk:
                    return OK
                return C.miscompare(have, data * count if bytchk == 3 else data) or OK
            return await self._guard(False, go)
        return Plan(op.name, op.data_out, run)

    def _compare_and_write(self, op: C.CompareAndWrite) -> Plan:
        lba, count, fua = op.lba, op.count, op.fua
        n = count * LBA_SIZE

        async def run(data: bytes) -> Result:
            if not count:
                return OK

            async def go() -> Result:
                async with self.gate.exclusive():
                    have = await self.volume.read(lba * LBA_SIZE, n)
                    differs = C.miscompare(have, data[:n])
                    if differs is not None:
                        return differs
                    await self.volume.write(lba * LBA_SIZE, data[n:], fua=fua)
                return OK
            return await self._guard(True, go)
        return Plan(op.name, op.data_out, run, write=True)

    def _sync_cache(self, op: C.SyncCache) -> Plan:
        async def run(_data: bytes) -> Result:
            async def go() -> Result:
                await self.volume.flush()
                return OK
            return await self._guard(True, go)
        return Plan(op.name, 0, run)

    def _write_same(self, op: C.WriteSame) -> Plan:
        offset, length = op.lba * LBA_SIZE, op.count * LBA_SIZE
        ndob, unmap = op.ndob, op.unmap

        async def run(data: bytes) -> Result:
            block = bytes(LBA_SIZE) if ndob else data

            async def go() -> Result:
                async with self.gate.shared():
                    if block == bytes(LBA_SIZE):
                        await self.volume.write_zeroes(offset, length, punch=unmap)
                    else:
                        chunk = block * (WRITE_SAME_CHUNK // LBA_SIZE)
                        pos = offset
                        while pos < offset + length:
                            n = min(len(chunk), offset + length - pos)
                            await self.volume.write(pos, chunk[:n])
                            pos += n
                return OK
            return await self._guard(True, go)
        return Plan(op.name, op.data_out, run, write=True)

    def _unmap(self, op: C.Unmap) -> Plan:
        length = op.length

        async def run(data: bytes) -> Result:
            if length == 0:
                return OK
            ranges = C.unmap_ranges(data, length, self.blocks)
            if isinstance(ranges, Result):
                return ranges

            async def go() -> Result:
                async with self.gate.shared():
                    for lba, n in ranges:
                        if n:
                            await self.volume.trim(lba * LBA_SIZE, n * LBA_SIZE)
                return OK
            return await self._guard(True, go)
        return Plan(op.name, length, run, write=True)

    def _get_lba_status(self, op: C.GetLbaStatus) -> Plan:
        async def run(_data: bytes) -> Result:
            async def go() -> Result:
                offset, span = C.lba_status_span(self.blocks, op)
                return C.lba_status(await self.volume.allocation(offset, span), op)
            return await self._guard(False, go)
        return Plan(op.name, 0, run)

    def _mode_select(self, op: C.ModeSelect) -> Plan:
        async def run(data: bytes) -> Result:
            d_sense = C.mode_select(op, data, self.d_sense,
                                     wce=self.caps.volatile_cache)
            if isinstance(d_sense, Result):
                return d_sense
            self.d_sense = d_sense
            return OK
        return Plan(op.name, op.length, run)

    def _prin(self, op: C.PrIn) -> Plan:
        async def run(_data: bytes) -> Result:
            return C.prin(self.reservations, op)
        return Plan(op.name, 0, run)

    def _prout(self, op: C.PrOut) -> Plan:
        async def run(data: bytes) -> Result:
            before = self.reservations.to_json()
            answer = self.reservations.prout(op.nexus, op.action, op.scope, op.rtype,
                                             bytes(data))
            if answer == pr.GOOD and self.store is not None and (
                    self.reservations.to_json() != before):
                await self.store.save_reservations(self.unit_key,
                                                     self.reservations.to_json())
            return C.PROUT_ANSWERS[answer]
        return Plan(op.name, op.length, run)


class _ReadPlan(Plan):
    """READ's plan: ``run`` and ``quick`` are methods, not closures made per command (the
    plan of nearly every command; ``Plan``'s fields are read from the class)."""

    __slots__ = ("count", "lba", "unit")
    name = "READ"
    data_out = 0
    write = False

    def __init__(self, unit: LogicalUnit, lba: int, count: int) -> None:
        self.unit, self.lba, self.count = unit, lba, count

    async def run(self, _data: bytes) -> Result:
        if not self.count:
            return OK
        unit = self.unit
        return await unit._guard(False, lambda: unit._read_data(self.lba, self.count))

    def quick(self, _data: bytes) -> Result | None:
        count = self.count
        if not count:
            return OK
        try:
            # A view of the pool's block, not a copy of the slice: the pool's blocks are
            # never written while a view lives (pool/reader.py invariant 5; the record
            # cache holds immutable bytes) and the volume copies buffered blocks, so the
            # bytes queued here are the bytes sent, whatever is written after.
            parts = self.unit.volume.read_vectored_nowait(self.lba * LBA_SIZE,
                                                          count * LBA_SIZE, view=True)
        except StorageError:
            return None                 # run() answers with the right sense
        if parts is None:
            return None
        return Result(GOOD, b"", None, tuple(parts))


class _WritePlan(Plan):
    """WRITE's plan (and WRITE AND VERIFY's), as ``_ReadPlan``."""

    __slots__ = ("fua", "offset", "unit")
    write = True

    def __init__(self, unit: LogicalUnit, name: str, lba: int, count: int,
                 fua: bool) -> None:
        self.unit, self.offset, self.fua = unit, lba * LBA_SIZE, fua
        self.name = name
        self.data_out = count * LBA_SIZE

    async def run(self, data: bytes) -> Result:
        if not data:
            return OK
        unit = self.unit

        async def go() -> Result:
            async with unit.gate.shared():
                await unit.volume.write(self.offset, data, fua=self.fua)
            return OK
        return await unit._guard(True, go)

    def quick(self, data: bytes) -> Result | None:
        if not data:
            return OK
        unit = self.unit
        if self.fua or not unit.gate.free():
            return None
        try:
            return OK if unit.volume.write_nowait(self.offset, data) else None
        except StorageError:
            return None                 # run() answers with the right sense


_LU = LogicalUnit
_BUILDERS: Final[dict[type, Callable[[LogicalUnit, Any], Plan]]] = {
    C.Answer: _LU._answer, C.Read: _LU._read, C.Write: _LU._write, C.Verify: _LU._verify,
    C.CompareAndWrite: _LU._compare_and_write, C.SyncCache: _LU._sync_cache,
    C.WriteSame: _LU._write_same, C.Unmap: _LU._unmap, C.GetLbaStatus: _LU._get_lba_status,
    C.ModeSelect: _LU._mode_select, C.PrIn: _LU._prin, C.PrOut: _LU._prout,
}
