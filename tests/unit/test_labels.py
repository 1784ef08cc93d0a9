"""Member labels (pool.labels invariants 1-4; DESIGN invariants 4, 5, 9, 10), on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from pool import FileDevice
from pool import owner as owners
from pool.deadlines import Deadlines
from pool.errors import ImportFailed, InvalidArgument
from pool.faults import FaultyDevice
from pool.labels import (
    label_copies,
    read_label,
    refuse_labelled,
    refuse_same_device,
    wipe,
    wipe_quietly,
    write_label,
)
from pool.layout import LABEL_SIZE, Label, Layout, new_uuid

SIZE = 16 << 20
DL = Deadlines()


def _labelled(path: Path) -> tuple[FileDevice, Label]:
    dev = FileDevice(str(path), create_size=SIZE)
    lab = Label(new_uuid(), "tank", new_uuid(), 0, 1, SIZE, Layout.choose(SIZE, 1 << 20, None))
    write_label(dev, lab)
    return dev, lab


def _garble(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        f.write(b"\xff" * 8)


def test_two_copies_and_the_backup_serves_when_the_primary_is_bad(tmp_path: Path) -> None:
    """Invariants 1 and 2: both copies hold the label; a garbled primary is not used (its
    checksum fails) and the backup is read; with both garbled the device is refused."""
    dev, lab = _labelled(tmp_path / "d0")
    assert [c for _, c in label_copies(dev, DL)] == [lab, lab]
    _garble(tmp_path / "d0", 0)
    copies = dict(label_copies(dev, DL))
    assert isinstance(copies["primary"], str) and copies["backup"] == lab
    assert read_label(dev, DL) == lab
    _garble(tmp_path / "d0", SIZE - LABEL_SIZE)
    with pytest.raises(ImportFailed, match="not a storaged pool member"):
        read_label(dev, DL)
    dev.close()


def test_a_truncated_device_is_refused(tmp_path: Path) -> None:
    """Invariant 2: a device shorter than its label says is refused, not read."""
    dev, _ = _labelled(tmp_path / "d0")
    dev.close()
    os.truncate(tmp_path / "d0", SIZE - (1 << 20))
    dev = FileDevice(str(tmp_path / "d0"))
    with pytest.raises(ImportFailed, match="truncated"):
        read_label(dev, DL)
    dev.close()


def test_labelled_and_doubled_devices_are_refused_changing_nothing(tmp_path: Path) -> None:
    """Invariant 3 (DESIGN 9): a labelled device and two paths to one file are refused,
    and the refusal writes nothing."""
    dev, _ = _labelled(tmp_path / "d0")
    blank = FileDevice(str(tmp_path / "d1"), create_size=SIZE)
    before = (tmp_path / "d0").read_bytes()
    with pytest.raises(InvalidArgument, match="already member 0 of pool 'tank'"):
        refuse_labelled([blank, dev], DL)
    refuse_labelled([blank], DL)
    os.symlink(tmp_path / "d0", tmp_path / "alias")
    again = FileDevice(str(tmp_path / "alias"))
    with pytest.raises(InvalidArgument, match="are the same device"):
        refuse_same_device([dev, blank, again])
    assert (tmp_path / "d0").read_bytes() == before
    for d in (dev, blank, again):
        d.close()


def test_wipe_leaves_no_member_and_wipe_quietly_never_raises(tmp_path: Path) -> None:
    """Invariant 4 (DESIGN 10): a wiped device has no label copy and no owner record; a
    device that fails every write is closed without an error."""
    dev, _ = _labelled(tmp_path / "d0")
    claim = owners.Claim(owners.Owner("h", "host", "i", 1), 2.0, 10.0)
    owners.write_record(dev, claim.record("u", 1))
    wipe(dev)
    assert all(isinstance(c, str) for _, c in label_copies(dev, DL))
    assert owners.read_record(dev) is None
    broken, _ = _labelled(tmp_path / "d1")
    faulty = FaultyDevice(broken)
    faulty.gone = True
    trio.run(wipe_quietly, faulty, DL)
    reopened = FileDevice(str(tmp_path / "d1"))
    assert read_label(reopened, DL).pool_name == "tank"
    for d in (dev, reopened):
        d.close()
