"""volumes/openers.py invariants 3-5 at the VolumeManager level, on a real pool, with
fault-injecting clients (a peer that never goes away, an initiator that logs in again at
once) that the real-client tests (test_inuse.py, test_fuse.py) cannot produce on demand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pool.checker import check
from tests.kit.nbdharness import make_pool
from volumes import Busy, Opener, VolumeManager
from volumes import openers as openers_mod


async def _manager(tmp_path: Path) -> VolumeManager:
    vm = VolumeManager(await make_pool(tmp_path))
    vol = await vm.create("vol", 4 << 20)
    await vol.write(0, b"\x5a" * 65536)
    await vol.flush()
    return vm


async def test_refused_for_another_reason_disconnects_nobody(tmp_path: Path) -> None:
    """Invariant 3: the in-use check comes after the operation's own checks."""
    vm = await _manager(tmp_path)
    await vm.snapshot("vol", "s1")
    calls: list[str] = []

    async def disconnect() -> None:
        calls.append("disconnect")

    client = vm.get("vol").openers.add(Opener("NBD", "192.0.2.1:1000", disconnect))
    with pytest.raises(Busy, match="snapshot"):
        await vm.delete("vol", force=True)          # not recursive: its snapshot refuses
    with pytest.raises(Busy, match=r"in use by 1 client\(s\) \(NBD: 192\.0\.2\.1:1000\)"):
        await vm.rename("vol", "other")
    assert calls == [] and list(vm.get("vol").openers) == [client]
    assert await vm.get("vol").read(0, 65536) == b"\x5a" * 65536
    await vm.pool.close()


async def test_a_client_that_never_goes_is_waited_for_at_most_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 4: a hung peer does not hold a forced delete; the delete is complete."""
    monkeypatch.setattr(openers_mod, "DISCONNECT_GRACE", 0.3)
    vm = await _manager(tmp_path)

    async def hang() -> None:
        await trio.sleep_forever()

    vm.get("vol").openers.add(Opener("iSCSI", "iqn.2026-01.org.test:hung at ?", hang))
    with trio.fail_after(5):
        await vm.delete("vol", force=True)
    assert vm.names() == []
    report = await check(vm.pool, deep=True)
    assert report.ok, report.render()
    await vm.pool.close()


async def test_clients_that_come_back_at_once_are_disconnected_too(tmp_path: Path) -> None:
    """Invariant 5: an initiator that logs in again while the first disconnect is waited
    for is disconnected as well; the volume has no clients when the rename happens."""
    vm = await _manager(tmp_path)
    vol = vm.get("vol")
    seen: list[int] = []

    def connect(n: int) -> Opener:
        async def disconnect() -> None:
            await trio.sleep(0.01)
            vol.openers.remove(me)
            seen.append(n)
            if n < 2:
                connect(n + 1)                       # logs in again at once
        me = vol.openers.add(Opener("iSCSI", f"iqn.2026-01.org.test:x at 192.0.2.2:{n}",
                                    disconnect))
        return me

    connect(0)
    await vm.rename("vol", "renamed", force=True)
    assert seen == [0, 1, 2] and list(vol.openers) == [] and vm.names() == ["renamed"]
    await vm.pool.close()
