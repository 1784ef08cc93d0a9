"""The throwaway cluster itself (tests/cephkit.py): it serves I/O, and stop leaves no
daemon and no file behind."""

from __future__ import annotations

from pathlib import Path

from tests.cephkit import TEST_POOL, Cluster, _alive, why_not


def test_cluster_serves_io(ceph: Cluster) -> None:
    with ceph.client() as r:
        io = r.open_ioctx(TEST_POOL)
        io.write_full("kit", b"x" * 5000)
        assert io.read("kit", 10000) == b"x" * 5000
        io.remove_object("kit")
        io.close()
        assert r.get_fsid() in ceph.conf.read_text()


def test_stop_kills_and_removes(tmp_path: Path) -> None:
    assert why_not() is None, why_not()
    c = Cluster.start(tmp_path / "c")
    pids = c.pids()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    c.stop()
    assert not any(_alive(p) for p in pids)
    assert not (tmp_path / "c").exists()
