"""``python -m storaged``: bring up the embedded demo pool and serve it over NBD.

The full daemon (config file, control API, storagectl, metrics) arrives with the daemon
issue; until then ``--demo`` creates (or imports) a demo pool on sparse files under the
state directory, makes sure a demo volume exists, verifies a write/flush/read round trip,
prints the pool's status and exports every volume over NBD until SIGINT/SIGTERM, when it
flushes and closes the pool cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from nbd.exports import VolumeCatalog
from nbd.server import NBDConfig, NBDServer
from pool import FileDevice, Pool
from pool.errors import StorageError
from volumes import VolumeManager

log = logging.getLogger("storaged")
DEMO_DEVICES = 3
DEMO_DEVICE_SIZE = 1 << 30


async def demo(state_dir: str, nbd_listen: str | None) -> None:
    base = trio.Path(state_dir)
    await base.mkdir(parents=True, exist_ok=True)
    paths = [os.path.join(state_dir, f"demo-disk{i}.img") for i in range(DEMO_DEVICES)]
    fresh = not all([await trio.Path(p).exists() for p in paths])
    devices = [FileDevice(p, create_size=DEMO_DEVICE_SIZE) for p in paths]
    if fresh:
        pool = await Pool.create("demo", devices, profile="ec:2+1", extent_size=16 << 20,
                                 force=True)
    else:
        pool = await Pool.open(devices)
    try:
        vm = VolumeManager(pool)
        if "disk0" not in vm.names():
            await vm.create("disk0", 10 << 30)
        # Self-test on a scratch volume of its own, so no user data is ever touched.
        if "selftest" in vm.names():
            await vm.delete("selftest")
        vol = await vm.create("selftest", 1 << 20)
        probe = os.urandom(vol.block_size)
        await vol.write(0, probe, fua=True)
        if await vol.read(0, len(probe)) != probe:
            raise StorageError("demo round trip read back different bytes")
        await vm.delete("selftest")
        st = pool.statistics()
        print(f"pool {st.name} ({st.uuid}): {st.state}, profile {st.profile}, "
              f"{len(st.members)} devices under {state_dir}")
        print(f"  capacity {st.capacity_bytes >> 20} MiB, allocated {st.allocated_bytes >> 20}"
              f" MiB, free {st.free_bytes >> 20} MiB, txg {st.txg}")
        for v in vm.list():
            print(f"  volume {v.name}: {v.size >> 20} MiB virtual, "
                  f"{v.mapped_bytes >> 10} KiB mapped, {v.stored_bytes >> 10} KiB stored "
                  f"({v.profile}{', lz4' if v.compression else ''})")
        print("storage engine round trip OK")
        if nbd_listen is None:
            return
        host, _, port = nbd_listen.rpartition(":")
        server = NBDServer(VolumeCatalog({pool.name: vm}),
                           NBDConfig(host=host or "127.0.0.1", port=int(port)))
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(server.serve)
                bound = listeners[0].socket.getsockname()
                for name in vm.names():
                    print(f"  exported nbd://{bound[0]}:{bound[1]}/{pool.name}/{name}")
                print("serving; Ctrl-C or SIGTERM stops, flushing everything first",
                      flush=True)
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="storaged")
    ap.add_argument("--state-dir", default=".storaged")
    ap.add_argument("--demo", action="store_true", help="bring up the embedded demo pool")
    ap.add_argument("--nbd-listen", default="127.0.0.1:10809", metavar="HOST:PORT",
                    help="where to serve NBD ('off' to only run the round trip and exit)")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        trio.run(demo, args.state_dir, None if args.nbd_listen == "off" else args.nbd_listen)
    except StorageError as e:
        print(f"storaged: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
