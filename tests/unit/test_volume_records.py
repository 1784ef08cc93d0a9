"""Typed volume and snapshot records (volumes/records.py): stored dicts decode and encode
back identically, key order included (records invariant 1), so the on-disk format and
send/receive streams do not change and pools written before them import."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from pool import MemoryDevice, Pool
from volumes import VolumeManager
from volumes.records import ReceiveState, SnapshotRecord, VolumeRecord

MiB = 1 << 20

# As the code before the typed records stored them (volumes/manager.py, portable.py).
VOLUME = {"type": "volume", "name": "v", "size": 4 * MiB, "block_size": 65536,
          "profile": "ec:2+1", "compression": True, "map": 7, "created": 1700000000}
CLONE = {**VOLUME, "name": "c", "map": 9, "origin": 8}
PARTIAL = {**VOLUME, "name": ".receiving.x", "receiving": {
    "target": "x", "snapshot": "ab" * 16, "snapshot_name": "s1", "base": None, "seq": 12,
    "resumable": True, "header": {"volume": {"size": 4 * MiB}, "snapshot": {"name": "s1"}}}}
SNAP = {"type": "snapshot", "volume": 3, "name": "s1", "map": 8, "size": 4 * MiB,
        "block_size": 65536, "profile": "ec:2+1", "compression": True,
        "created": 1700000001, "uuid": "cd" * 16}
OLD_SNAP = {k: v for k, v in SNAP.items() if k != "uuid"}     # before send/receive
ODD = {"size": 1, "type": "volume", **VOLUME, "future_key": [1, 2]}   # other order, extra


@pytest.mark.parametrize("stored", [VOLUME, CLONE, PARTIAL, ODD])
def test_volume_records_round_trip(stored: dict[str, Any]) -> None:
    record = VolumeRecord.decode(stored)
    assert json.dumps(record.encode()) == json.dumps(stored)      # order too (invariant 1)
    assert (record.origin is not None) == ("origin" in stored)


@pytest.mark.parametrize("stored", [SNAP, OLD_SNAP])
def test_snapshot_records_round_trip(stored: dict[str, Any]) -> None:
    record = SnapshotRecord.decode(stored)
    assert json.dumps(record.encode()) == json.dumps(stored)
    assert record.uuid == stored.get("uuid")


def test_changes_are_new_records_that_keep_the_stored_shape() -> None:
    """Records invariant 2: a checkpoint of a receive and its completion, as replace()."""
    part = VolumeRecord.decode(PARTIAL)
    assert part.receiving is not None
    later = replace(part, receiving=replace(part.receiving, seq=40))
    assert part.receiving.seq == 12                                # the old one unchanged
    want = json.loads(json.dumps(PARTIAL))
    want["receiving"]["seq"] = 40
    assert json.dumps(later.encode()) == json.dumps(want)
    done = replace(later, name="x", receiving=None).encode()
    assert done == {**{k: v for k, v in PARTIAL.items() if k != "receiving"}, "name": "x"}
    with pytest.raises(AttributeError):
        part.name = "y"      # type: ignore[misc]
    assert isinstance(part.receiving, ReceiveState)


async def test_every_stored_record_decodes_and_encodes_back() -> None:
    """What the manager stores (create, snapshot, clone, rename, resize, rollback) is what
    decode/encode give back, and a reopened pool reads the same volumes."""
    devs = [MemoryDevice(128 * MiB, path=f"r{i}") for i in range(3)]
    pool = await Pool.create("r", devs, profile="ec:2+1", extent_size=4 * MiB)
    try:
        vm = VolumeManager(pool)
        vol = await vm.create("v", 4 * MiB, block_size=65536)
        await vol.write(0, b"x" * 65536)
        await vm.snapshot("v", "s1")
        await vm.clone("v", "s1", "c")
        await vm.rename("v", "w")
        await vm.resize("w", 8 * MiB)
        await vm.rollback("w", "s1")
        objects = pool.objects()
        assert {m["type"] for m in objects.values()} == {"volume", "snapshot"}
        for stored in objects.values():
            cls = VolumeRecord if stored["type"] == "volume" else SnapshotRecord
            assert json.dumps(cls.decode(stored).encode()) == json.dumps(stored)
        assert vm.get("w").size == 4 * MiB and vm.get("c").origin is not None
        # The O(1) existence checks frontends make per request agree with the listings.
        assert [n for n in ("v", "w", "c", "s1") if vm.has(n)] == ["w", "c"]
        assert vm.has_snapshot("w", "s1") and not vm.has_snapshot("w", "s2")
        assert not vm.has_snapshot("v", "s1") and not vm.has_snapshot("c", "s1")
        assert await VolumeManager(pool).get("w").read(0, 65536) == b"x" * 65536
    finally:
        await pool.close()
