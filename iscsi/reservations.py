"""SPC-4 persistent reservations (§5.9, PERSISTENT RESERVE IN/OUT §6.15, §6.16) of one
logical unit, as pure state: registrations (I_T nexus -> reservation key), at most one
reservation (holder, type), and the PRgeneration counter.

``Reservations.prout`` applies one PERSISTENT RESERVE OUT and says what to answer;
``prin`` builds the PERSISTENT RESERVE IN data; ``conflicts`` says whether a command from
an I_T nexus meets RESERVATION CONFLICT (SPC-4 table 62 / SBC-3 table 13, summarised in
``conflicts``). ``to_json``/``from_json`` keep the state across daemon restarts (the
daemon always persists it, as if every registration had APTPL set: a restart of the
daemon is not a power loss of the volume). No I/O, no trio.

There is one target port (relative port 1), so ALL_TG_PT is accepted and changes
nothing. SPEC_I_PT and REGISTER AND MOVE are not supported. Unit attentions to other
I_T nexuses (reservations released or preempted) are not established (docs/iscsi.md).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

# Reservation types (SPC-4 table 170)
WRITE_EXCLUSIVE: Final = 0x1
EXCLUSIVE_ACCESS: Final = 0x3
WRITE_EXCLUSIVE_RO: Final = 0x5
EXCLUSIVE_ACCESS_RO: Final = 0x6
WRITE_EXCLUSIVE_AR: Final = 0x7
EXCLUSIVE_ACCESS_AR: Final = 0x8
TYPES: Final = frozenset((WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS, WRITE_EXCLUSIVE_RO,
                          EXCLUSIVE_ACCESS_RO, WRITE_EXCLUSIVE_AR, EXCLUSIVE_ACCESS_AR))
_ALL_REGISTRANTS: Final = frozenset((WRITE_EXCLUSIVE_AR, EXCLUSIVE_ACCESS_AR))
_REGISTRANTS: Final = frozenset((WRITE_EXCLUSIVE_RO, EXCLUSIVE_ACCESS_RO)) | _ALL_REGISTRANTS
_EXCLUSIVE: Final = frozenset((EXCLUSIVE_ACCESS, EXCLUSIVE_ACCESS_RO, EXCLUSIVE_ACCESS_AR))

# Service actions
PRIN_READ_KEYS: Final = 0
PRIN_READ_RESERVATION: Final = 1
PRIN_REPORT_CAPABILITIES: Final = 2
PRIN_READ_FULL_STATUS: Final = 3
PROUT_REGISTER: Final = 0
PROUT_RESERVE: Final = 1
PROUT_RELEASE: Final = 2
PROUT_CLEAR: Final = 3
PROUT_PREEMPT: Final = 4
PROUT_PREEMPT_AND_ABORT: Final = 5
PROUT_REGISTER_AND_IGNORE: Final = 6
PROUT_PARAMETERS: Final = 24               # the basic parameter list

# What a PROUT answers (mapped to status and sense by iscsi.cdb).
GOOD: Final = "good"
CONFLICT: Final = "conflict"
BAD_FIELD_CDB: Final = "invalid field in cdb"
BAD_FIELD_PARAMETERS: Final = "invalid field in parameter list"
BAD_LENGTH: Final = "parameter list length error"
BAD_RELEASE: Final = "invalid release of persistent reservation"

# Command classes for the conflict check.
ALWAYS: Final = "always"          # INQUIRY, REPORT LUNS, PR IN/OUT, TEST UNIT READY, ...
READS: Final = "read"             # allowed under Write Exclusive types
WRITES: Final = "write"           # conflict under every type


@dataclass(frozen=True, slots=True, order=True)
class Nexus:
    """An I_T nexus: the initiator port (iSCSI name and ISID) and our one target port."""

    initiator: str
    isid: bytes

    def transport_id(self) -> bytes:
        """iSCSI TransportID, format 01b (name and ISID), SPC-4 §7.6.4.6."""
        name = f"{self.initiator},i,0x{self.isid.hex()}".encode() + b"\0"
        name += bytes(-len(name) % 4)
        return bytes([0x40 | 0x05, 0]) + len(name).to_bytes(2, "big") + name


class ReservationStore(Protocol):
    """Where a logical unit's reservations are kept (the daemon: the state dir)."""

    def load_reservations(self, unit: str) -> dict[str, Any] | None: ...

    def save_reservations(self, unit: str, state: dict[str, Any] | None) -> Awaitable[None]:
        ...


@dataclass
class Reservations:
    generation: int = 0
    keys: dict[Nexus, int] = field(default_factory=dict)
    holder: Nexus | None = None        # for all-registrants types: None, see ``rtype``
    rtype: int = 0                     # 0: not reserved
    aptpl: bool = False

    # ---- queries ----------------------------------------------------------------------
    @property
    def reserved(self) -> bool:
        return self.rtype != 0

    def is_holder(self, nexus: Nexus) -> bool:
        if not self.reserved:
            return False
        if self.rtype in _ALL_REGISTRANTS:
            return nexus in self.keys
        return nexus == self.holder

    def conflicts(self, nexus: Nexus | None, kind: str) -> bool:
        """Whether a command of this class from ``nexus`` meets RESERVATION CONFLICT."""
        if not self.reserved or kind == ALWAYS:
            return False
        if nexus is not None and self.is_holder(nexus):
            return False
        if nexus is not None and self.rtype in _REGISTRANTS and nexus in self.keys:
            return False                # registrants-only types: registrants have access
        return kind == WRITES or self.rtype in _EXCLUSIVE

    # ---- PERSISTENT RESERVE IN --------------------------------------------------------
    def prin(self, action: int) -> bytes | None:
        """The parameter data of one service action, or None if it is not one."""
        gen = self.generation.to_bytes(4, "big")
        if action == PRIN_READ_KEYS:
            body = b"".join(k.to_bytes(8, "big") for _n, k in sorted(self.keys.items()))
            return gen + len(body).to_bytes(4, "big") + body
        if action == PRIN_READ_RESERVATION:
            if not self.reserved:
                return gen + bytes(4)
            key = 0
            if self.rtype not in _ALL_REGISTRANTS and self.holder is not None:
                key = self.keys.get(self.holder, 0)
            body = key.to_bytes(8, "big") + bytes(4) + bytes([0, self.rtype & 0x0F, 0, 0])
            return gen + len(body).to_bytes(4, "big") + body
        if action == PRIN_REPORT_CAPABILITIES:
            # ATP_C (one port: ALL_TG_PT is harmless), PTPL_C; PTPL_A; the type mask.
            mask = (0x80 | 0x40 | 0x20 | 0x08 | 0x02) << 8 | 0x01
            return (bytes([0, 8, 0x04 | 0x01, 0x01 if self.aptpl else 0])
                    + mask.to_bytes(2, "big") + bytes(2))
        if action == PRIN_READ_FULL_STATUS:
            out = bytearray()
            for nexus, key in sorted(self.keys.items()):
                tid = nexus.transport_id()
                holder = self.is_holder(nexus)
                out += key.to_bytes(8, "big") + bytes(4)
                out += bytes([0x01 if holder else 0, self.rtype & 0x0F if holder else 0])
                out += bytes(4) + (1).to_bytes(2, "big") + len(tid).to_bytes(4, "big") + tid
            return gen + len(out).to_bytes(4, "big") + bytes(out)
        return None

    # ---- PERSISTENT RESERVE OUT -------------------------------------------------------
    def prout(self, nexus: Nexus, action: int, scope: int, rtype: int,
              params: bytes) -> str:
        """Apply one PERSISTENT RESERVE OUT; the answer (GOOD, CONFLICT or a refusal)."""
        if action not in (PROUT_REGISTER, PROUT_RESERVE, PROUT_RELEASE, PROUT_CLEAR,
                          PROUT_PREEMPT, PROUT_PREEMPT_AND_ABORT,
                          PROUT_REGISTER_AND_IGNORE):
            return BAD_FIELD_CDB
        if len(params) != PROUT_PARAMETERS:
            return BAD_LENGTH
        key = int.from_bytes(params[0:8], "big")
        sark = int.from_bytes(params[8:16], "big")
        flags = params[20]
        if flags & 0x08:                         # SPEC_I_PT: not supported
            return BAD_FIELD_PARAMETERS
        mine = self.keys.get(nexus)
        if action in (PROUT_REGISTER, PROUT_REGISTER_AND_IGNORE):
            if action == PROUT_REGISTER and (key != mine if mine is not None else key):
                return CONFLICT
            self._register(nexus, sark)
            if sark:
                self.aptpl = bool(flags & 0x01)
            self.generation = (self.generation + 1) & 0xFFFFFFFF
            return GOOD
        if mine is None or mine != key:
            return CONFLICT
        if action in (PROUT_RESERVE, PROUT_PREEMPT, PROUT_PREEMPT_AND_ABORT) or (
                action == PROUT_RELEASE and self.is_holder(nexus)):
            if scope != 0:
                return BAD_FIELD_CDB
            if rtype not in TYPES and (action in (PROUT_RESERVE, PROUT_RELEASE)
                                       or self.reserved):
                return BAD_FIELD_CDB
        if action == PROUT_RESERVE:
            if not self.reserved:
                self.rtype = rtype
                self.holder = None if rtype in _ALL_REGISTRANTS else nexus
                return GOOD
            return GOOD if self.is_holder(nexus) and self.rtype == rtype else CONFLICT
        if action == PROUT_RELEASE:
            if not self.is_holder(nexus):
                return GOOD
            if rtype != self.rtype:
                return BAD_RELEASE
            self.rtype, self.holder = 0, None
            return GOOD
        if action == PROUT_CLEAR:
            self.keys.clear()
            self.rtype, self.holder = 0, None
            self.generation = (self.generation + 1) & 0xFFFFFFFF
            return GOOD
        return self._preempt(nexus, sark, rtype)

    def _register(self, nexus: Nexus, sark: int) -> None:
        if sark:
            self.keys[nexus] = sark
            return
        if nexus not in self.keys:
            return
        was_holder = self.is_holder(nexus)
        del self.keys[nexus]
        if was_holder and (self.rtype not in _ALL_REGISTRANTS or not self.keys):
            self.rtype, self.holder = 0, None    # unregistering the holder releases

    def _preempt(self, nexus: Nexus, sark: int, rtype: int) -> str:
        holder_key = (self.keys.get(self.holder) if self.holder is not None else None)
        if self.reserved and self.rtype in _ALL_REGISTRANTS and sark == 0:
            # Preempting an all-registrants reservation: everyone else goes.
            self.keys = {n: k for n, k in self.keys.items() if n == nexus}
            self.rtype = rtype
            self.holder = None if rtype in _ALL_REGISTRANTS else nexus
        elif self.reserved and self.rtype not in _ALL_REGISTRANTS and sark == holder_key:
            self.keys = {n: k for n, k in self.keys.items() if k != sark or n == nexus}
            self.rtype = rtype
            self.holder = None if rtype in _ALL_REGISTRANTS else nexus
        else:
            if sark == 0:
                return BAD_FIELD_PARAMETERS
            gone = [n for n, k in self.keys.items() if k == sark and n != nexus]
            if not gone and not any(k == sark for k in self.keys.values()):
                return CONFLICT
            for n in gone:
                del self.keys[n]
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        return GOOD

    # ---- persistence ------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "type": self.rtype, "aptpl": self.aptpl,
                "holder": ([self.holder.initiator, self.holder.isid.hex()]
                           if self.holder is not None else None),
                "keys": [[n.initiator, n.isid.hex(), f"{k:016x}"]
                         for n, k in sorted(self.keys.items())]}

    @classmethod
    def from_json(cls, obj: Any) -> Reservations:
        """The state saved by ``to_json``; anything unreadable gives an empty state."""
        try:
            keys = {Nexus(str(i), bytes.fromhex(s)): int(k, 16) for i, s, k in obj["keys"]}
            holder = obj.get("holder")
            rtype = int(obj.get("type", 0))
            return cls(generation=int(obj.get("generation", 0)) & 0xFFFFFFFF, keys=keys,
                       holder=Nexus(str(holder[0]), bytes.fromhex(holder[1]))
                       if holder else None,
                       rtype=rtype if rtype in TYPES else 0,
                       aptpl=bool(obj.get("aptpl", False)))
        except (KeyError, TypeError, ValueError, IndexError):
            return cls()
