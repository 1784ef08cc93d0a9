"""Where a RADOS-backed pool lives: the RADOS pool, the ceph.conf and the client id (issue
24). Pure data: the registry remembers it in pools.json, the CLI and the config build it,
``Pool.create_rados``/``Pool.open_rados`` connect with it.

Invariants:

1. A target names a RADOS pool (non-empty, no NUL, at most 255 bytes) and a client id
   (non-empty, no ``.``-prefix: ``admin`` means ``client.admin``); ``parse`` refuses
   anything else with one line before anything connects.
2. ``to_json``/``from_json`` round-trip exactly; ``conf`` None means librados' own search
   (``$CEPH_CONF``, then /etc/ceph/ceph.conf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pool.errors import InvalidArgument

DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_CLIENT = "admin"


@dataclass(frozen=True, slots=True)
class RadosTarget:
    """A RADOS pool in a cluster, as one client reaches it."""

    pool: str                      # the RADOS pool's name
    conf: str | None = None        # ceph.conf path; None: librados' default search
    client: str = DEFAULT_CLIENT   # the cephx id, without "client."

    @staticmethod
    def parse(pool: str, conf: str | None = None, client: str | None = None) -> RadosTarget:
        """A checked target (invariant 1)."""
        client = client or DEFAULT_CLIENT
        if not pool or "\0" in pool or len(pool.encode()) > 255:
            raise InvalidArgument(f"bad RADOS pool name {pool!r}")
        if client.startswith("client."):
            client = client[len("client."):]
        if not client or "\0" in client or "." in client[:1]:
            raise InvalidArgument(f"bad Ceph client id {client!r} (e.g. admin)")
        if conf is not None and not conf:
            conf = None
        return RadosTarget(pool, conf, client)

    def describe(self) -> str:
        return f"rados:{self.pool} (client.{self.client}, {self.conf or DEFAULT_CONF})"

    def to_json(self) -> dict[str, Any]:
        return {"pool": self.pool, "conf": self.conf, "client": self.client}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> RadosTarget:
        return RadosTarget.parse(str(obj["pool"]), obj.get("conf"), obj.get("client"))
