"""QoS token buckets and settings (volumes/qos.py, DESIGN §9): the Throttle under trio's
virtual clock (autojump, so seconds of limited I/O take milliseconds), the settings'
validation (qos invariant 5, DESIGN invariant 9), and a Volume whose NBD-, iSCSI- and
FUSE-facing entry points all draw from one budget."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pool import MemoryDevice, Pool
from volumes import InvalidArgument, VolumeManager
from volumes.qos import READ, WRITE, QosSettings, Throttle, WeightedDispatcher

MiB = 1 << 20


async def _run(throttle: Throttle, n: int, *, op: int = WRITE, nbytes: int = 4096,
               clients: int = 8) -> list[float]:
    """Admit ``n`` requests from ``clients`` concurrent tasks; their admission times."""
    times: list[float] = []
    left = [n]

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            await throttle.admit(op, nbytes)
            times.append(trio.current_time())
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    return [t - start for t in times]


def _max_in_window(times: list[float], window: float, after: float = 0.0) -> int:
    ts = sorted(t for t in times if t >= after)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while ts[lo] < t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def test_iops_limit_holds_and_is_reached(autojump_clock: trio.testing.MockClock
                                               ) -> None:
    """200 IOPS asked 1,000 IOs: never more than 200 * 2 * 1.1 in any 2 s window (qos
    invariant 1: all are admitted, none failed), and the whole run at >= 80% of 200/s."""
    t = Throttle(QosSettings(iops=200))
    times = await _run(t, 1000)
    assert len(times) == 1000
    assert _max_in_window(times, 2.0) <= 440
    assert max(times) <= 1000 / (0.8 * 200)
    s = t.statistics()
    assert s.waiting == 0 and s.throttled > 900 and s.throttled_seconds > 0


async def test_bps_limit_and_iops_size(autojump_clock: trio.testing.MockClock) -> None:
    """1 MiB/s with 64 KiB writes: 64 MiB take about 64 s; with iops=10 and iops_size
    64K, a 1 MiB request costs 16 IOs, so 20 of them take about 32 s."""
    t = Throttle(QosSettings(bps=MiB))
    times = await _run(t, 1024, nbytes=64 << 10)
    assert 0.8 * 64 <= max(times) <= 64 / 0.9
    t = Throttle(QosSettings(iops=10, iops_size=64 << 10))
    times = await _run(t, 20, nbytes=MiB, clients=2)
    assert 0.8 * 32 <= max(times) <= 32 / 0.9


async def test_burst_then_limit(autojump_clock: trio.testing.MockClock) -> None:
    """iops=100, burst 500 for 2 s: from idle the first 2 s run at about 500/s (never
    above it by more than 10%), then the rate falls back to 100/s."""
    t = Throttle(QosSettings(iops=100, burst_iops=500, burst_seconds=2.0))
    times = await _run(t, 1600)
    early = sum(1 for x in times if x < 2.0)
    assert 0.8 * 1000 <= early <= 1.1 * 1000
    assert _max_in_window(times, 1.0) <= 550
    # After the burst is spent: <= 100 * 2 * 1.1 per 2 s window.
    assert _max_in_window(times, 2.0, after=2.5) <= 220
    late = [x for x in times if x >= 3.0]
    assert len(late) / (max(times) - 3.0) >= 80


async def test_reads_and_writes_queue_apart(autojump_clock: trio.testing.MockClock
                                            ) -> None:
    """qos invariant 2: a write limit does not hold reads back."""
    t = Throttle(QosSettings(write_iops=10))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run, t, 100)            # 10 s of writes
        await trio.sleep(0.5)
        start = trio.current_time()
        await _run(t, 1000, op=READ)
        assert trio.current_time() == start         # reads: unlimited, no wait at all
        nursery.cancel_scope.cancel()


async def test_change_applies_to_waiting_requests(autojump_clock: trio.testing.MockClock
                                                  ) -> None:
    """qos invariant 3: waiting requests see a new limit at once; a cleared limit lets
    them all through; a cancelled waiter leaves the queue consistent (invariant 1)."""
    t = Throttle(QosSettings(iops=10))
    done: list[float] = []
    async with trio.open_nursery() as nursery:
        async def go() -> None:
            done.extend(await _run(t, 1000))
        nursery.start_soon(go)
        await trio.sleep(2.0)
        assert t.statistics().waiting == 8
        t.configure(QosSettings(iops=1000))
    # 20 in the first 2 s, the rest at 1000/s: about 3 s in all instead of 100 s.
    assert max(done) < 3.2
    t.configure(QosSettings(iops=1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run, t, 50)
        await trio.sleep(1.0)
        with trio.move_on_after(0.5):
            await t.admit(WRITE, 0)                 # queued behind the others: cancelled
        assert t.statistics().waiting == 8
        t.configure(QosSettings())                  # cleared: all through, now
    assert t.statistics().waiting == 0


def test_settings_validation() -> None:
    """qos invariant 5 / DESIGN invariant 9: bad values raise and change nothing."""
    s = QosSettings(iops=100)
    for bad in ({"iops": -1}, {"bps": "10"}, {"read_iops": 1.5}, {"iops": True},
                {"burst_iops": 50}, {"burst_bps": 10}, {"burst_seconds": 0},
                {"burst_seconds": float("nan")}, {"weight": 0}, {"weight": 10_001},
                {"group": "bad name"}, {"colour": 1}):
        with pytest.raises(InvalidArgument):
            s.updated(bad)
    assert s == QosSettings(iops=100)
    t = s.updated({"burst_iops": 300, "burst_seconds": 5, "group": "tenant-a"})
    assert t.encode() == {"iops": 100, "burst_iops": 300, "burst_seconds": 5.0,
                          "group": "tenant-a"}
    assert QosSettings.decode(t.encode()) == t
    assert t.updated({"group": None, "iops": 0, "burst_iops": 0}).encode() == {
        "burst_seconds": 5.0}
    assert not QosSettings(weight=300).limited and QosSettings(read_bps=1).limited


async def test_volume_entry_points_share_one_budget() -> None:
    """Every request-path entry point (read, read_sparse, read_vectored, write,
    write_zeroes, trim) draws from the volume's one budget, and the nowait paths step
    aside (qos invariant 4 without limits: they answer at once). Real clock, RAM disks."""
    pool = await Pool.create("q", [MemoryDevice(64 * MiB, path="q0")], profile="plain",
                             extent_size=4 * MiB)
    vol = await VolumeManager(pool).create("v", 4 * MiB, block_size=4096)
    await vol.write(0, b"x" * 4096)
    assert vol.read_sparse_nowait(0, 4096) is not None
    vol.set_qos(QosSettings(iops=50))
    assert vol.read_sparse_nowait(0, 4096) is None
    assert vol.read_vectored_nowait(0, 4096) is None
    assert not vol.write_nowait(0, b"y" * 4096)
    start = trio.current_time()
    for _ in range(10):
        await vol.read(0, 4096)
        await vol.read_sparse(0, 4096)
        await vol.read_vectored(0, 4096)
        await vol.write(4096, b"z" * 4096)
        await vol.write_zeroes(8192, 4096)
        await vol.trim(12288, 4096)
    elapsed = trio.current_time() - start
    # 60 requests, 5 allowed at once (a tenth of a second), then 50/s: about 1.1 s.
    assert 0.9 <= elapsed <= 2.0
    assert await vol.read(0, 8192) == b"x" * 4096 + b"z" * 4096
    vol.set_qos(QosSettings())
    assert vol.read_sparse_nowait(0, 4096) is not None
    assert vol.throttle_statistics().throttled > 0


async def test_readinto_keeps_to_the_limits() -> None:
    """``Volume.readinto`` (a send's reads, volumes/portable.py) draws from the volume's
    budget like every awaited read: four 4 MiB reads at 16 MiB/s take 0.65 s (without
    the gate they took a few milliseconds), and what it read is byte-exact. Real clock."""
    pool = await Pool.create("q", [MemoryDevice(64 * MiB, path="q0")], profile="plain",
                             extent_size=4 * MiB)
    vol = await VolumeManager(pool).create("v", 8 * MiB, block_size=65536)
    data = bytes(range(256)) * (4 * MiB // 256)
    await vol.write(0, data)
    vol.set_qos(QosSettings(read_bps=16 * MiB))
    buf = bytearray(4 * MiB)
    start = trio.current_time()
    for _ in range(4):
        await vol.readinto(0, buf)
        assert buf == data
    elapsed = trio.current_time() - start
    # The first read goes at once (a tenth of a second's worth is allowed at once, and a
    # request larger than that runs the budget into debt), the other 12 MiB at 16 MiB/s.
    assert 0.5 <= elapsed <= 3.0
    assert vol.throttle_statistics().throttled > 0


class _Vol:
    def __init__(self, weight: int) -> None:
        self.weight = weight
        self.finish_tag = 0.0
        self.done = 0
        self.worst = 0.0


async def test_weights_divide_a_saturated_dispatcher(autojump_clock: trio.testing.MockClock
                                                     ) -> None:
    """qos invariants 6-7: two volumes that each keep 16 requests waiting on a pool that
    serves 4 at a time (1 ms each) get service in proportion to their weights 100:300;
    a third that asks one request per 20 ms (far under its share) is served at once
    each time (never waits behind the others' queues for more than one service time)."""
    d = WeightedDispatcher(depth=4)
    a, b, light = _Vol(100), _Vol(300), _Vol(100)

    async def greedy(v: _Vol) -> None:
        while True:
            await d.acquire(v, 1)
            try:
                await trio.sleep(0.001)
                v.done += 1
            finally:
                d.release()

    async def sparse(v: _Vol) -> None:
        while True:
            await trio.sleep(0.02)
            t0 = trio.current_time()
            await d.acquire(v, 1)
            try:
                v.worst = max(v.worst, trio.current_time() - t0)
                await trio.sleep(0.001)
                v.done += 1
            finally:
                d.release()

    async with trio.open_nursery() as nursery:
        for v in (a, b):
            for _ in range(16):
                nursery.start_soon(greedy, v)
        nursery.start_soon(sparse, light)
        await trio.sleep(5.0)
        assert d.contended
        nursery.cancel_scope.cancel()
    assert 2.5 <= b.done / a.done <= 3.5, (a.done, b.done)
    assert light.done >= 5.0 / 0.022 and light.worst <= 0.0011
    # Every slot came back (invariant 7): nothing in service, nobody waiting.
    assert d.in_service == 0 and not d.contended


async def test_dispatcher_uncontended_goes_at_once() -> None:
    """qos invariant 6: under the depth, requests are not held or reordered."""
    d = WeightedDispatcher(depth=2)
    v = _Vol(100)
    await d.acquire(v, 1)
    await d.acquire(v, 1)
    assert d.in_service == 2 and not d.contended
    with trio.move_on_after(0.05):
        await d.acquire(v, 1)               # a third waits, then gives up (invariant 7)
    assert not d.contended
    d.release()
    d.release()
    assert d.in_service == 0


async def test_manager_settings_groups_and_reopen() -> None:
    """The manager's QoS verbs: refusals change nothing (qos invariant 5, qosbook
    invariant 1), a group's limit applies to its members at once, and everything comes
    back from the pool's metadata in a new manager (as after a restart); the stored
    record decodes and encodes to the same dict (records invariant 1)."""
    from volumes.records import VolumeRecord  # noqa: PLC0415
    pool = await Pool.create("q", [MemoryDevice(64 * MiB, path="q1")], profile="plain",
                             extent_size=4 * MiB)
    vm = VolumeManager(pool)
    await vm.create("v", 4 * MiB)
    await vm.create("w", 4 * MiB)
    for bad in ({"group": "nosuch"}, {"iops": -1}, {"burst_iops": 5}):
        with pytest.raises(InvalidArgument):
            await vm.set_qos("v", bad)
    assert vm.get("v").qos == QosSettings()
    await vm.set_qos_group("g", {"iops": 100})
    await vm.set_qos("v", {"group": "g", "read_bps": MiB})
    await vm.set_qos("w", {"group": "g"})
    assert vm.get("w")._throttles and vm.get("w").read_sparse_nowait(0, 10) is None
    with pytest.raises(InvalidArgument):
        await vm.set_qos_group("g", {"weight": 5})
    with pytest.raises(Exception, match="in use by v, w"):
        await vm.delete_qos_group("g")
    await vm.set_qos_group("g", {"iops": 0})          # the group limits nothing now
    assert not vm.get("w")._throttles
    await vm.set_qos_group("g", {"iops": 300})
    await vm.set_qos_defaults({"write_iops": 7})
    again = VolumeManager(pool)
    assert again.get("v").qos == QosSettings(read_bps=MiB, group="g")
    assert again.qos.groups == {"g": QosSettings(iops=300)}
    assert len(again.get("w")._throttles) == 1        # the group's
    assert (await again.create("x", MiB)).qos == QosSettings(write_iops=7)
    stored = next(o for o in pool.objects().values() if o.get("name") == "v")
    assert VolumeRecord.decode(stored).encode() == stored
    assert list(stored) == list(VolumeRecord.decode(stored).encode())
