"""Each volume's iSCSI access policy (initiator allow list, CHAP, mutual CHAP), and each
logical unit's persistent reservations, kept in ``STATE_DIR/iscsi.json`` so that they
survive a restart.

The file holds CHAP secrets: it is written with mode 0600 (atomically: a temporary file,
fsync, rename) and its contents never leave the daemon — ``describe`` returns the policy
without secrets, and nothing here logs them. A volume with no policy of its own follows
the configured default (``iscsi.default_acl``: ``open`` lets every initiator in without
authentication, ``closed`` lets none in until a policy is set). Snapshots use their
volume's policy. Policies are keyed by ``POOL/VOLUME``, reservations by ``POOL/VOLUME``
or ``POOL/VOLUME@SNAPSHOT``; the control API moves them with a renamed volume and drops
them with a deleted one. Writes go through ``commit`` (one at a time, in a worker thread).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Final

import trio

from iscsi.login import Credentials, TargetPolicy
from volumes import InvalidArgument

log = logging.getLogger(__name__)
FILE: Final = "iscsi.json"
# iSCSI names of initiators (RFC 7143 §4.2.7.1): iqn., eui. or naa. forms.
_INITIATOR = re.compile(r"(iqn\.\d{4}-\d{2}\.[^\s,]+|eui\.[0-9a-fA-F]{16}|"
                        r"naa\.[0-9a-fA-F]{16}([0-9a-fA-F]{16})?)")
MAX_SECRET: Final = 255


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """A volume's own policy. ``open``: everyone, no CHAP (the other fields empty)."""

    open: bool = False
    allow: tuple[str, ...] = ()
    chap: Credentials | None = None
    mutual: Credentials | None = None

    def target_policy(self) -> TargetPolicy:
        if self.open:
            return TargetPolicy()
        # Not open and nobody named: those who prove themselves with CHAP, else no one.
        return TargetPolicy(allow=self.allow, chap=self.chap, mutual=self.mutual,
                            closed=not self.allow and self.chap is None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"open": self.open, "allow": list(self.allow)}
        for key, cred in (("chap", self.chap), ("mutual", self.mutual)):
            if cred is not None:
                out[key] = {"user": cred.user, "secret": cred.secret.decode()}
        return out

    @classmethod
    def from_json(cls, obj: Any) -> StoredPolicy:
        if not isinstance(obj, dict):
            raise ValueError("a policy must be an object")
        creds: dict[str, Credentials | None] = {}
        for key in ("chap", "mutual"):
            c = obj.get(key)
            if c is None:
                creds[key] = None
            elif (isinstance(c, dict) and isinstance(c.get("user"), str)
                  and isinstance(c.get("secret"), str)):
                creds[key] = Credentials(c["user"], c["secret"].encode())
            else:
                raise ValueError(f"bad {key} credentials")
        allow = obj.get("allow", [])
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise ValueError("allow must be a list of initiator names")
        return cls(open=bool(obj.get("open", False)), allow=tuple(allow),
                   chap=creds["chap"], mutual=creds["mutual"])


def check_initiator(name: str) -> None:
    if not _INITIATOR.fullmatch(name):
        raise InvalidArgument(f"{name!r} is not an iSCSI initiator name (iqn.YYYY-MM.…, "
                              f"eui.… or naa.…)")


def check_credentials(user: str, secret: str, what: str) -> Credentials:
    if not user or any(c in user for c in "\0=") or len(user.encode()) > 255:
        raise InvalidArgument(f"{what} user must be 1..255 bytes, without '=' or NUL")
    raw = secret.encode()
    if not raw or len(raw) > MAX_SECRET or b"\0" in raw:
        raise InvalidArgument(f"{what} secret must be 1..{MAX_SECRET} bytes without NUL")
    if len(raw) < 12:
        # RFC 7143 §12.1.3 asks for secrets of at least 96 bits.
        raise InvalidArgument(f"{what} secret must be at least 12 bytes long")
    return Credentials(user, raw)


class AccessStore:
    """The policies, in memory and in ``STATE_DIR/iscsi.json``."""

    def __init__(self, state_dir: str, *, default_acl: str = "open") -> None:
        if default_acl not in ("open", "closed"):
            raise InvalidArgument(f"iscsi.default_acl must be open or closed, not "
                                  f"{default_acl!r}")
        self.path = os.path.join(state_dir, FILE)
        self.default_acl = default_acl
        self._policies: dict[str, StoredPolicy] = {}
        self._extra: dict[str, Any] = {}       # other sections of the file, kept as is
        self._reservations: dict[str, Any] = {}
        self._lock = trio.Lock()

    # ---- file (blocking: call from a worker thread) -------------------------------------
    def load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"{self.path}: cannot read the iSCSI policies: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("volumes", {}), dict):
            raise InvalidArgument(f"{self.path}: not an iSCSI policy file")
        try:
            self._policies = {name: StoredPolicy.from_json(obj)
                              for name, obj in data.get("volumes", {}).items()}
        except ValueError as e:
            raise InvalidArgument(f"{self.path}: {e}") from e
        reservations = data.get("reservations", {})
        self._reservations = reservations if isinstance(reservations, dict) else {}
        self._extra = {k: v for k, v in data.items()
                       if k not in ("version", "volumes", "reservations")}
        if os.stat(self.path).st_mode & 0o077:
            os.chmod(self.path, 0o600)

    def save(self) -> None:
        data = {"version": 1, **self._extra,
                "volumes": {n: p.to_json() for n, p in sorted(self._policies.items())},
                "reservations": dict(sorted(self._reservations.items()))}
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(data, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def commit(self) -> None:
        """Write the file (in a worker thread; one write at a time, each with the state
        as it is when its turn comes)."""
        async with self._lock:
            await trio.to_thread.run_sync(self.save)

    # ---- persistent reservations (iscsi.reservations.ReservationStore) ------------------
    def load_reservations(self, unit: str) -> dict[str, Any] | None:
        state = self._reservations.get(unit)
        return state if isinstance(state, dict) else None

    async def save_reservations(self, unit: str, state: dict[str, Any] | None) -> None:
        if state is None:
            self._reservations.pop(unit, None)
        else:
            self._reservations[unit] = state
        await self.commit()

    def _units_of(self, name: str) -> list[str]:
        return [u for u in self._reservations if u == name or u.startswith(name + "@")]

    # ---- policies -----------------------------------------------------------------------
    def policy(self, name: str) -> TargetPolicy:
        """The access policy of volume ``POOL/VOLUME`` (for ``TargetCatalog``)."""
        own = self._policies.get(name)
        if own is not None:
            return own.target_policy()
        return TargetPolicy(closed=self.default_acl == "closed")

    def own(self, name: str) -> StoredPolicy | None:
        return self._policies.get(name)

    def set(self, name: str, policy: StoredPolicy | None) -> None:
        """Set (None: clear) a volume's own policy in memory; ``save`` writes it."""
        if policy is None:
            self._policies.pop(name, None)
        else:
            self._policies[name] = policy

    def rename(self, old: str, new: str) -> bool:
        """Move a volume's policy and reservations; whether anything moved."""
        units = self._units_of(old)
        for unit in units:
            self._reservations[new + unit[len(old):]] = self._reservations.pop(unit)
        if old not in self._policies:
            return bool(units)
        self._policies[new] = self._policies.pop(old)
        return True

    def forget(self, name: str) -> bool:
        """Drop a volume's policy and reservations; whether there was any."""
        units = self._units_of(name)
        for unit in units:
            del self._reservations[unit]
        return self._policies.pop(name, None) is not None or bool(units)

    def describe(self, name: str) -> dict[str, Any]:
        """The policy as the API shows it: never a secret."""
        own = self._policies.get(name)
        if own is None:
            return {"name": name, "source": "default", "access": self.default_acl,
                    "allow": [], "chap_user": None, "mutual_chap_user": None}
        access = ("open" if own.open else "restricted" if own.allow or own.chap
                  else "closed")
        return {"name": name, "source": "volume", "access": access,
                "allow": list(own.allow),
                "chap_user": own.chap.user if own.chap else None,
                "mutual_chap_user": own.mutual.user if own.mutual else None}
