"""Login (RFC 7143 §6, §13): security and operational negotiation as a state machine.

``Login.handle`` takes each Login Request of one connection and returns the Login
Response; when ``Login.result`` is set, the connection enters the full feature phase with
the negotiated ``SessionParams``; when ``Login.failed`` is set, the response carried a
non-zero status and the connection closes after it is sent.

Security: AuthMethod None, or CHAP with MD5 (one-way, or mutual when the target has a
secret for itself). A target that has CHAP credentials accepts nothing else. Operational
keys are negotiated with the RFC's result functions (min, max, OR, AND, first of a list);
unknown keys are answered NotUnderstood, bad values Reject. Pure code: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from iscsi.pdu import LoginRequest, LoginResponse, ProtocolError, format_text, parse_text

STAGE_SECURITY: Final = 0
STAGE_OPERATIONAL: Final = 1
STAGE_FULL_FEATURE: Final = 3

# Login status (class << 8 | detail), RFC 7143 §11.13.5
SUCCESS: Final = 0x0000
INITIATOR_ERROR: Final = 0x0200
AUTH_FAILED: Final = 0x0201
AUTHORIZATION_FAILED: Final = 0x0202
NOT_FOUND: Final = 0x0203
UNSUPPORTED_VERSION: Final = 0x0205
MISSING_PARAMETER: Final = 0x0207
SESSION_TYPE_UNSUPPORTED: Final = 0x0209
NO_SESSION: Final = 0x020A
INVALID_DURING_LOGIN: Final = 0x020B
TARGET_ERROR: Final = 0x0300

TARGET_MAX_RECV: Final = 256 * 1024    # the MaxRecvDataSegmentLength we declare
CHAP_MD5: Final = "5"
CHAP_CHALLENGE_LEN: Final = 16


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    secret: bytes

    def __repr__(self) -> str:        # never print a secret
        return f"Credentials(user={self.user!r}, secret=<hidden>)"


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """Who may log in to a target: initiator names (empty: everyone, unless ``closed``:
    no one), and CHAP."""

    allow: tuple[str, ...] = ()
    chap: Credentials | None = None          # the initiator proves itself with this
    mutual: Credentials | None = None        # the target proves itself with this
    closed: bool = False                     # with no allow list: no initiator at all

    def permits(self, initiator: str) -> bool:
        if not self.allow:
            return not self.closed
        return initiator.lower() in (a.lower() for a in self.allow)


class TargetDirectory(Protocol):
    """What login needs to know about targets (implemented by ``iscsi.targets``)."""

    def policy(self, target: str) -> TargetPolicy | None:
        """The target's policy, or None if there is no such target."""

    def visible(self, initiator: str) -> Sequence[str]:
        """Names of the targets this initiator may see, for SendTargets."""


@dataclass(frozen=True, slots=True)
class SessionParams:
    """Negotiated session and connection parameters (RFC 7143 §13), with their defaults."""

    max_send_data: int = 8192               # the initiator's MaxRecvDataSegmentLength
    max_recv_data: int = 8192               # ours, once declared
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 20


@dataclass(frozen=True, slots=True)
class LoginResult:
    initiator: str
    target: str | None                      # None: a discovery session
    isid: bytes
    tsih: int
    cid: int
    cmdsn: int                              # the first ExpCmdSN of the session
    params: SessionParams
    alias: str = ""


class LoginFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# What the target is willing to do, per key (the target's side of each result function).
_OURS: Final[dict[str, int | bool]] = {
    "MaxBurstLength": 1024 * 1024, "FirstBurstLength": 256 * 1024, "MaxOutstandingR2T": 8,
    "MaxConnections": 1, "DefaultTime2Retain": 0, "DefaultTime2Wait": 2,
    "ErrorRecoveryLevel": 0, "InitialR2T": False, "ImmediateData": True,
    "DataPDUInOrder": True, "DataSequenceInOrder": True, "IFMarker": False,
    "OFMarker": False,
}
_NUMERIC: Final[dict[str, tuple[int, int, str]]] = {   # key: (lowest, highest, function)
    "MaxBurstLength": (512, 2**24 - 1, "min"),
    "FirstBurstLength": (512, 2**24 - 1, "min"),
    "MaxOutstandingR2T": (1, 65535, "min"),
    "MaxConnections": (1, 65535, "min"),
    "DefaultTime2Retain": (0, 3600, "min"),
    "DefaultTime2Wait": (0, 3600, "max"),
    "ErrorRecoveryLevel": (0, 2, "min"),
}
_BOOL_OR: Final = ("InitialR2T", "DataPDUInOrder", "DataSequenceInOrder")
_BOOL_AND: Final = ("ImmediateData", "IFMarker", "OFMarker")
_DIGESTS: Final = ("None", "CRC32C")
_FIELD: Final[dict[str, str]] = {
    "MaxBurstLength": "max_burst_length", "FirstBurstLength": "first_burst_length",
    "MaxOutstandingR2T": "max_outstanding_r2t", "MaxConnections": "max_connections",
    "DefaultTime2Retain": "default_time2retain", "DefaultTime2Wait": "default_time2wait",
    "ErrorRecoveryLevel": "error_recovery_level", "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data", "DataPDUInOrder": "data_pdu_in_order",
    "DataSequenceInOrder": "data_sequence_in_order",
}
# Keys that mean nothing in a discovery session (RFC 7143 §13: "Irrelevant").
_DISCOVERY_IRRELEVANT: Final = frozenset((
    "MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T", "MaxConnections",
    "InitialR2T", "ImmediateData", "DataPDUInOrder", "DataSequenceInOrder"))
_DECLARATIVE: Final = frozenset(("InitiatorName", "InitiatorAlias", "TargetName",
                                 "SessionType"))


def negotiate_key(key: str, value: str, *, discovery: bool = False) -> tuple[str, object]:
    """The target's answer to one offered operational key, and the negotiated value
    (None when the key changes nothing). Pure: the result functions of RFC 7143 §6.2."""
    if key in _NUMERIC:
        lo, hi, fn = _NUMERIC[key]
        if not value.isdigit() or not lo <= int(value) <= hi:
            return "Reject", None
        if discovery and key in _DISCOVERY_IRRELEVANT:
            return "Irrelevant", None
        ours = int(_OURS[key])
        result = min(int(value), ours) if fn == "min" else max(int(value), ours)
        return str(result), result
    if key in _BOOL_OR or key in _BOOL_AND:
        if value not in ("Yes", "No"):
            return "Reject", None
        if discovery and key in _DISCOVERY_IRRELEVANT:
            return "Irrelevant", None
        offered = value == "Yes"
        ours_b = bool(_OURS[key])
        result_b = (offered or ours_b) if key in _BOOL_OR else (offered and ours_b)
        return ("Yes" if result_b else "No"), result_b
    if key in ("HeaderDigest", "DataDigest"):
        for choice in value.split(","):
            if choice in _DIGESTS:
                return choice, choice == "CRC32C"
        return "Reject", None
    if key in ("OFMarkInt", "IFMarkInt"):
        return "Irrelevant", None
    if key == "MaxRecvDataSegmentLength":
        if not value.isdigit() or not 512 <= int(value) <= 2**24 - 1:
            return "Reject", None
        return str(TARGET_MAX_RECV), int(value)
    if key == "iSCSIProtocolLevel":
        if not value.isdigit() or int(value) > 31:
            return "Reject", None
        return str(min(int(value), 1)), None
    if key == "TaskReporting":
        return "RFC3720", None
    return "NotUnderstood", None


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """CHAP with MD5 (RFC 1994): MD5(identifier || secret || challenge)."""
    return hashlib.md5(bytes([ident]) + secret + challenge, usedforsecurity=True).digest()


def decode_chap_binary(value: str) -> bytes:
    """A CHAP large binary value: 0x... (hex) or 0b... (base64), RFC 7143 §6.1."""
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:] if len(value) % 2 == 0 else "0" + value[2:])
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except ValueError as e:
        raise LoginFailed(AUTH_FAILED, f"bad CHAP binary value: {e}") from e
    raise LoginFailed(AUTH_FAILED, "CHAP binary value must start with 0x or 0b")


@dataclass
class _Chap:
    ident: int
    challenge: bytes
    step: str = "algorithm"                  # algorithm -> response -> done


@dataclass
class Login:
    """The target side of one connection's login."""

    directory: TargetDirectory
    new_tsih: Callable[[], int]
    portal_group_tag: int = 1
    random: Callable[[int], bytes] = secrets.token_bytes
    result: LoginResult | None = None
    statsn: int = 1                         # the StatSN of the next response
    failed: LoginFailed | None = None
    _first: LoginRequest | None = None
    _stage: int = STAGE_SECURITY
    _started: bool = False
    _keys: dict[str, str] = field(default_factory=dict)  # declarations seen so far
    _policy: TargetPolicy | None = None
    _auth_done: bool = False
    _chap: _Chap | None = None
    _params: SessionParams = field(default_factory=SessionParams)
    _declared_recv: bool = False
    _pending_text: bytes = b""
    _sent_tpgt: bool = False

    def handle(self, req: LoginRequest) -> LoginResponse:
        """The answer to one Login Request; never raises for bad input (the response then
        carries the failure status, and ``failed`` is set)."""
        try:
            return self._handle(req)
        except LoginFailed as e:
            self.failed = e
            return self._response(req, [], status=e.status, transit=False)
        except ProtocolError as e:
            self.failed = LoginFailed(INITIATOR_ERROR, str(e))
            return self._response(req, [], status=INITIATOR_ERROR, transit=False)

    @property
    def session_type(self) -> str:
        return self._keys.get("SessionType", "Normal")

    def _response(self, req: LoginRequest, pairs: list[tuple[str, str]], *, status: int,
                  transit: bool, nsg: int = 0) -> LoginResponse:
        first = self._first or req
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        return LoginResponse(
            transit=transit, csg=req.csg & 3, nsg=nsg if transit else 0, version_max=0,
            version_active=0, isid=first.isid,
            tsih=self.result.tsih if self.result and transit else 0, itt=req.itt,
            statsn=self.statsn - 1 & 0xFFFFFFFF, exp_cmdsn=first.cmdsn,
            max_cmdsn=first.cmdsn, status_class=status >> 8, status_detail=status & 0xFF,
            data=format_text(pairs))

    def _handle(self, req: LoginRequest) -> LoginResponse:
        if self.result is not None or self.failed is not None:
            raise LoginFailed(INVALID_DURING_LOGIN, "login already finished")
        if self._first is None:
            if req.version_min > 0:
                raise LoginFailed(UNSUPPORTED_VERSION,
                                  f"iSCSI version {req.version_min} is not supported")
            self._first = req
            self._stage = req.csg
        elif req.isid != self._first.isid or req.tsih != self._first.tsih:
            raise LoginFailed(INITIATOR_ERROR, "ISID or TSIH changed during login")
        if req.csg != self._stage or req.csg not in (STAGE_SECURITY, STAGE_OPERATIONAL):
            raise LoginFailed(INITIATOR_ERROR, f"login stage {req.csg} is not expected now")
        if req.transit and (req.nsg <= req.csg or req.nsg == 2):
            raise LoginFailed(INITIATOR_ERROR, f"cannot go from stage {req.csg} to "
                                               f"{req.nsg}")
        if req.cont:
            if req.transit:
                raise LoginFailed(INITIATOR_ERROR, "C and T bits both set")
            self._pending_text += req.data
            if len(self._pending_text) > 64 * 1024:
                raise LoginFailed(INITIATOR_ERROR, "login text too long")
            return self._response(req, [], status=SUCCESS, transit=False)
        pairs = parse_text(self._pending_text + req.data)
        self._pending_text = b""
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in _DECLARATIVE:
                self._keys[key] = value
        if not self._started:
            self._start(req)
            if self.session_type == "Normal" and not self._sent_tpgt:
                answers.append(("TargetPortalGroupTag", str(self.portal_group_tag)))
                self._sent_tpgt = True
        if req.csg == STAGE_SECURITY:
            answers += self._security(pairs)
        else:
            if self._needs_auth():
                raise LoginFailed(AUTH_FAILED, "this target requires CHAP authentication")
            answers += self._operational(pairs)
        transit = req.transit
        if req.csg == STAGE_SECURITY and not self._auth_done:
            transit = False       # CHAP is not finished: stay in the security stage
        if (transit and req.nsg == STAGE_FULL_FEATURE and not self._declared_recv
                and req.csg == STAGE_OPERATIONAL):
            # Declare our receive limit before leaving login (it defaults to 8192 otherwise).
            answers.append(("MaxRecvDataSegmentLength", str(TARGET_MAX_RECV)))
            self._declared_recv = True
        if transit:
            self._stage = req.nsg
            if req.nsg == STAGE_FULL_FEATURE:
                self._finish(req)
        return self._response(req, answers, status=SUCCESS, transit=transit, nsg=req.nsg)

    def _start(self, req: LoginRequest) -> None:
        self._started = True
        initiator = self._keys.get("InitiatorName")
        if not initiator:
            raise LoginFailed(MISSING_PARAMETER, "InitiatorName is missing")
        if self.session_type not in ("Normal", "Discovery"):
            raise LoginFailed(SESSION_TYPE_UNSUPPORTED,
                              f"session type {self.session_type!r} is not supported")
        if req.tsih != 0:
            raise LoginFailed(NO_SESSION, "adding a connection to a session is not "
                                          "supported (MaxConnections=1)")
        if self.session_type == "Discovery":
            self._policy = TargetPolicy()
            return
        target = self._keys.get("TargetName")
        if not target:
            raise LoginFailed(MISSING_PARAMETER, "TargetName is missing")
        policy = self.directory.policy(target)
        if policy is None:
            raise LoginFailed(NOT_FOUND, f"no target {target}")
        if not policy.permits(initiator):
            raise LoginFailed(AUTHORIZATION_FAILED,
                              f"initiator {initiator} may not log in to {target}")
        self._policy = policy

    def _needs_auth(self) -> bool:
        return bool(self._policy and self._policy.chap and not self._auth_done)

    def _security(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        assert self._policy is not None
        offered = dict(pairs)
        out: list[tuple[str, str]] = []
        if self._chap is None and not self._auth_done:
            methods = offered.get("AuthMethod")
            if methods is None:
                if self._policy.chap is not None:
                    raise LoginFailed(AUTH_FAILED, "this target requires CHAP")
                self._auth_done = True
            else:
                choices = methods.split(",")
                if self._policy.chap is not None and "CHAP" in choices:
                    self._chap = _Chap(ident=self.random(1)[0],
                                       challenge=self.random(CHAP_CHALLENGE_LEN))
                    out.append(("AuthMethod", "CHAP"))
                elif self._policy.chap is None and "None" in choices:
                    out.append(("AuthMethod", "None"))
                    self._auth_done = True
                else:
                    raise LoginFailed(AUTH_FAILED,
                                      f"no acceptable AuthMethod in {methods!r}")
        elif self._chap is not None and self._chap.step == "algorithm":
            algs = offered.get("CHAP_A")
            if algs is None or CHAP_MD5 not in algs.split(","):
                raise LoginFailed(AUTH_FAILED, "CHAP needs the MD5 algorithm (CHAP_A=5)")
            self._chap.step = "response"
            out += [("CHAP_A", CHAP_MD5), ("CHAP_I", str(self._chap.ident)),
                    ("CHAP_C", "0x" + self._chap.challenge.hex())]
        elif self._chap is not None and self._chap.step == "response":
            out += self._chap_verify(offered)
        for key, value in pairs:
            if key in _DECLARATIVE or key.startswith("CHAP_") or key == "AuthMethod":
                continue
            if key in _NUMERIC or key in _FIELD or key in _DIGESTS or key in (
                    "HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength"):
                # Operational keys may be offered early; negotiate them now.
                out += self._operational([(key, value)])
            else:
                out.append((key, "NotUnderstood"))
        return out

    def _chap_verify(self, offered: dict[str, str]) -> list[tuple[str, str]]:
        chap, policy = self._chap, self._policy
        assert chap is not None and policy is not None and policy.chap is not None
        name, resp = offered.get("CHAP_N"), offered.get("CHAP_R")
        if name is None or resp is None:
            raise LoginFailed(AUTH_FAILED, "CHAP_N and CHAP_R are required")
        expected = chap_response(chap.ident, policy.chap.secret, chap.challenge)
        if name != policy.chap.user or not hmac.compare_digest(decode_chap_binary(resp),
                                                                expected):
            raise LoginFailed(AUTH_FAILED, f"CHAP authentication failed for user {name!r}")
        out: list[tuple[str, str]] = []
        ident, challenge = offered.get("CHAP_I"), offered.get("CHAP_C")
        if ident is not None or challenge is not None:
            if ident is None or challenge is None or policy.mutual is None:
                raise LoginFailed(AUTH_FAILED, "mutual CHAP is not configured for this "
                                               "target, or CHAP_I/CHAP_C is missing")
            if not ident.isdigit() or int(ident) > 255:
                raise LoginFailed(AUTH_FAILED, "CHAP_I must be 0..255")
            their = decode_chap_binary(challenge)
            if not their or their == chap.challenge:
                raise LoginFailed(AUTH_FAILED, "CHAP challenge refused (empty or reflected)")
            out += [("CHAP_N", policy.mutual.user),
                    ("CHAP_R", "0x" + chap_response(int(ident), policy.mutual.secret,
                                                    their).hex())]
        elif policy.mutual is not None:
            raise LoginFailed(AUTH_FAILED, "this target requires mutual CHAP")
        chap.step = "done"
        self._auth_done = True
        return out

    def _operational(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        discovery = self.session_type == "Discovery"
        for key, value in pairs:
            if key in _DECLARATIVE:
                continue
            if key in ("AuthMethod",) or key.startswith("CHAP_"):
                raise LoginFailed(INITIATOR_ERROR, f"{key} is not allowed in the "
                                                   "operational stage")
            if key in ("SendTargets", "TargetAddress", "TargetPortalGroupTag",
                       "TargetAlias"):
                raise LoginFailed(INITIATOR_ERROR, f"{key} may not be sent by an initiator "
                                                   "during login")
            answer, value_set = negotiate_key(key, value, discovery=discovery)
            p = self._params
            if key == "MaxRecvDataSegmentLength" and isinstance(value_set, int):
                p = replace(p, max_send_data=value_set, max_recv_data=TARGET_MAX_RECV)
                self._declared_recv = True
            elif key == "HeaderDigest" and isinstance(value_set, bool):
                p = replace(p, header_digest=value_set)
            elif key == "DataDigest" and isinstance(value_set, bool):
                p = replace(p, data_digest=value_set)
            elif key in _FIELD and value_set is not None:
                changes: dict[str, Any] = {_FIELD[key]: value_set}
                p = replace(p, **changes)
            self._params = p
            out.append((key, answer))
        return out

    def _finish(self, req: LoginRequest) -> None:
        assert self._first is not None
        p = self._params
        if p.first_burst_length > p.max_burst_length:
            p = replace(p, first_burst_length=p.max_burst_length)
        if not self._declared_recv:
            p = replace(p, max_recv_data=8192)
        target = None if self.session_type == "Discovery" else self._keys["TargetName"]
        self.result = LoginResult(
            initiator=self._keys["InitiatorName"], target=target, isid=self._first.isid,
            tsih=self.new_tsih(), cid=self._first.cid, cmdsn=self._first.cmdsn, params=p,
            alias=self._keys.get("InitiatorAlias", ""))
