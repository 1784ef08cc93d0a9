"""Shared harness for the iSCSI end-to-end tests: a real pool on sparse files, volumes,
and a real ``ISCSIServer`` (and optionally an ``NBDServer`` on the same volumes) on
ephemeral loopback ports, inside the test's trio run.

Run as a script (``python -m tests.kit.iscsiharness DIR``) it serves a pool until killed,
which is handy for poking at the target with libiscsi's tools by hand.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from iscsi.login import TargetPolicy
from iscsi.server import ISCSIConfig, ISCSIServer, SharedExclusive
from iscsi.targets import TargetCatalog
from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer
from pool import FileDevice, Pool
from volumes import VolumeManager

POOL = "tank"
BASE = "iqn.2026-11.org.storaged"


@dataclass
class Served:
    server: ISCSIServer
    port: int
    nbd_port: int
    vm: VolumeManager
    host: str = "127.0.0.1"

    def iqn(self, vol: str = "vol", snap: str | None = None) -> str:
        return self.server.catalog.target_name(POOL, vol, snap)

    def url(self, vol: str = "vol", snap: str | None = None, *, lun: int = 0,
            auth: str = "") -> str:
        return f"iscsi://{auth}{self.host}:{self.port}/{self.iqn(vol, snap)}/{lun}"


@asynccontextmanager
async def served_pool(where: Path, vols: Mapping[str, int] | None = None, *,
                      policies: Callable[[str], TargetPolicy] | None = None,
                      nop_interval: float = 15.0, profile: str = "plain",
                      devices: int = 1, device_size: int = 1 << 30,
                      max_connections: int = 256, login_timeout: float = 30.0
                      ) -> AsyncIterator[Served]:
    await trio.Path(where).mkdir(parents=True, exist_ok=True)
    devs = [FileDevice(str(where / f"d{i}"), create_size=device_size) for i in range(devices)]
    pool = await Pool.create(POOL, devs, profile=profile, extent_size=4 << 20)
    try:
        vm = VolumeManager(pool)
        for name, size in (vols if vols is not None else {"vol": 64 << 20}).items():
            await vm.create(name, size)
        catalog = TargetCatalog({POOL: vm}, SharedExclusive, base_iqn=BASE,
                                policies=policies)
        server = ISCSIServer(catalog, ISCSIConfig(host="127.0.0.1", port=0,
                                                  nop_interval=nop_interval,
                                                  max_connections=max_connections,
                                                  login_timeout=login_timeout))
        nbd = NBDServer(VolumeCatalog({POOL: vm}), NBDConfig(host="127.0.0.1", port=0))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve)
            nbd_listeners = await nursery.start(nbd.serve)
            try:
                yield Served(server, listeners[0].socket.getsockname()[1],
                             nbd_listeners[0].socket.getsockname()[1], vm)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await pool.close()


async def _main(where: str, port: int) -> None:
    async with served_pool(Path(where), {"vol": 256 << 20}) as srv:
        print(f"serving {srv.url()} (nbd port {srv.nbd_port})", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    import logging
    logging.basicConfig(level="INFO")
    trio.run(_main, sys.argv[1], 0)
