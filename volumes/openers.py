"""Who has a volume open: the clients of every frontend, kept where the volumes layer can
see them, so that it refuses to delete, rename or roll back a volume in use (DESIGN
invariant 10), as ``rbd rm`` refuses an image with watchers and LVM a logical volume in use,
and disconnects them first when the operator forces it.

Frontends register a client with its protocol, a description for the operator (an NBD peer
address, an iSCSI initiator name and address, a count of FUSE handles) and a way to
disconnect it. They import this from ``volumes``; the pool layer knows nothing of clients.

Invariants (tests cite them as "openers N"):

1. A client is registered with the ``Openers`` of the volume (or snapshot) it uses from the
   moment its frontend hands it that ``Volume`` until it is gone: a frontend registers
   before the first request is served and unregisters when the connection, session or last
   handle ends (in a ``finally``).
2. The ``Openers`` of a snapshot are one object per snapshot, shared by every read-only view
   of it (``VolumeManager.snapshot_volume`` makes a new view per lookup).
3. A refused operation changes nothing: the in-use check runs after the operation's other
   checks and before any state changes or any client is disconnected.
4. ``evict`` returns when every client it disconnected has unregistered, or after
   ``DISCONNECT_GRACE`` seconds (a peer that stopped reading must not hold the operator's
   command forever); the operation then proceeds, and a straggler's next request fails
   (the volume is gone or was changed under it), never the daemon.
5. A client that registers while ``evict`` waits (an initiator logging in again at once,
   as libiscsi does) is disconnected too, for up to ``EVICT_ROUNDS`` rounds; ``evict``
   returns with no await after its last check, so an operation that acts synchronously
   after it (delete, rename) acts on a volume with no clients but stragglers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

import trio

from pool.errors import Busy

log = logging.getLogger(__name__)
DISCONNECT_GRACE = 10.0   # seconds to wait for forced clients to be gone
EVICT_ROUNDS = 5          # rounds of disconnecting clients that keep coming back


@dataclass(eq=False, slots=True)
class Opener:
    """One client of a volume. ``client`` may change (FUSE counts its handles);
    ``disconnect`` ends the client cleanly and returns once it is gone (or gives up)."""

    protocol: str                          # "NBD", "iSCSI", "FUSE"
    client: str                            # "127.0.0.1:40112", "iqn... at 10.0.0.5:5120"
    disconnect: Callable[[], Awaitable[None]]

    def describe(self) -> str:
        return f"{self.protocol}: {self.client}"

    def to_json(self) -> dict[str, str]:
        return {"protocol": self.protocol.lower(), "client": self.client}


class Openers:
    """The clients of one volume or one snapshot (invariants 1, 2)."""

    def __init__(self) -> None:
        self._open: list[Opener] = []
        self._changed = trio.Event()

    def add(self, opener: Opener) -> Opener:
        self._open.append(opener)
        return opener

    def remove(self, opener: Opener) -> None:
        if opener in self._open:
            self._open.remove(opener)
            self._changed.set()
            self._changed = trio.Event()

    def __iter__(self) -> Iterator[Opener]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    async def _gone(self, openers: Iterable[Opener]) -> None:
        wanted = set(openers)
        while wanted & set(self._open):
            await self._changed.wait()


def in_use(groups: Iterable[Openers], *,
           ignore: Iterable[Opener] = ()) -> list[Opener]:
    """The clients of ``groups`` other than ``ignore``."""
    skip = set(ignore)
    return [o for g in groups for o in g if o not in skip]


def refuse_in_use(what: str, clients: list[Opener], action: str) -> None:
    """Busy (EBUSY) naming the clients, if there are any (invariant 3)."""
    if clients:
        raise Busy(f"{what} is in use by {len(clients)} client(s) "
                   f"({'; '.join(o.describe() for o in clients)}): cannot {action}; "
                   f"disconnect them or use --force")


async def evict(what: str, groups: Iterable[Openers], ignore: Iterable[Opener] = ()
                ) -> bool:
    """Disconnect every client of ``groups`` but ``ignore``, and those that come back while
    it waits (invariants 4, 5). True if there were any."""
    groups = list(groups)
    skip = set(ignore)
    clients = in_use(groups, ignore=skip)
    if not clients:
        return False
    for _round in range(EVICT_ROUNDS):
        await _disconnect_all(what, groups, clients)
        skip.update(o for g in groups for o in g if o in clients)   # stragglers
        clients = in_use(groups, ignore=skip)
        if not clients:
            break
    return True


async def _disconnect_all(what: str, groups: list[Openers], clients: list[Opener]) -> None:
    """Disconnect ``clients`` (all at once) and wait until they are gone (invariant 4)."""
    log.warning("%s: disconnecting %d client(s) (forced): %s", what, len(clients),
                "; ".join(o.describe() for o in clients))
    with trio.move_on_after(DISCONNECT_GRACE) as waited:
        async with trio.open_nursery() as nursery:
            for opener in clients:
                nursery.start_soon(opener.disconnect)
            for group in groups:
                nursery.start_soon(group._gone, clients)
    if waited.cancelled_caught:
        left = [o.describe() for g in groups for o in g if o in clients]
        log.warning("%s: %d client(s) still there after %.0f s, going on: %s", what,
                    len(left), DISCONNECT_GRACE, "; ".join(left))
