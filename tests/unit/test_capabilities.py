"""``Volume.capabilities()``: one frozen value the frontends derive their flags from
(issue 23). A writable volume offers everything; a read-only snapshot view of it is the same
volume (thin, zeroes unmapped, same block sizes) that cannot write, trim or zero, and its
refusals match what it claims: a trim or zero it does not offer is refused and changes
nothing."""

from __future__ import annotations

import dataclasses
import os

import pytest

from nbd import proto
from nbd.exports import VolumeCatalog
from pool import FileDevice, Pool
from volumes import Capabilities, ReadOnly, VolumeManager

BS = 16384


async def test_capabilities_of_a_volume_and_of_its_snapshot_view(tmp_path: object) -> None:
    pool = await Pool.create("d", [FileDevice(os.path.join(str(tmp_path), "d0"),
                                              create_size=32 << 20)],
                             extent_size=256 << 10, meta_size=4 << 20)
    vm = VolumeManager(pool)
    vol = await vm.create("v", 1 << 20, block_size=BS)
    data = os.urandom(3 * BS)
    await vol.write(0, data)
    await vm.snapshot("v", "s")
    view = vm.snapshot_volume("v", "s")

    caps = vol.capabilities()
    assert caps == Capabilities(
        read_only=False, volatile_cache=True, can_flush=True, can_fua=True, can_trim=True,
        can_zero=True, can_fast_zero=True, can_cache=True, can_extents=True,
        can_multi_conn=True, thin=True, zeroes_unmapped=True, rotational=False,
        minimum_block=1, preferred_block=BS, maximum_block=None, unmap_granularity=BS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.read_only = True  # type: ignore[misc]

    ro = view.capabilities()
    assert ro == dataclasses.replace(caps, read_only=True, can_trim=False, can_zero=False,
                                     can_fast_zero=False)

    # What the view does not offer, it refuses, and nothing changes.
    with pytest.raises(ReadOnly):
        await view.trim(0, BS)
    with pytest.raises(ReadOnly):
        await view.write_zeroes(0, BS)
    with pytest.raises(ReadOnly):
        await view.write(0, b"x")
    await view.flush()                       # offered: a no-op on a view
    assert await view.read(0, 3 * BS) == data
    assert await vol.read(0, 3 * BS) == data
    # The value is computed on each call: the volume's own is unchanged by the view's.
    assert vol.capabilities() == caps

    # The NBD flags derived from it are the ones the server always sent (behaviour
    # unchanged): everything but write commands on the view, and the block sizes.
    base = (proto.TF_HAS_FLAGS | proto.TF_SEND_FLUSH | proto.TF_SEND_FUA | proto.TF_SEND_DF
            | proto.TF_CAN_MULTI_CONN | proto.TF_SEND_CACHE)
    rw, rov = VolumeCatalog.info("d/v", vol), VolumeCatalog.info("d/v@s", view)
    assert rw.transmission_flags == base | (proto.TF_SEND_TRIM | proto.TF_SEND_WRITE_ZEROES
                                            | proto.TF_SEND_FAST_ZERO)
    assert rov.transmission_flags == base | proto.TF_READ_ONLY
    for e in (rw, rov):
        assert (e.min_block, e.preferred_block, e.max_block) == (1, BS, proto.MAX_PAYLOAD)
    await pool.close()
