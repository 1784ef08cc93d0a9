"""The throwaway Ceph cluster the RADOS tests share (tests/kit/cephkit.py): one per test
session (per xdist worker), in a scratch directory, stopped and removed at the session's
end. Each test module gets the pool TEST_POOL new and empty (``Cluster.renew_pool``), so
no module sees another's objects, quota or snapshots: the modules stay independent of
each other and of their order, as with a cluster of their own, without its start (about
4 s against 0.2 s for a new pool)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kit.cephkit import Cluster, why_not


@pytest.fixture(scope="session")
def ceph_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Cluster]]:
    """An empty list, or the worker's cluster once a module asked for one (started on
    first use: a worker that runs no RADOS module starts none)."""
    started: list[Cluster] = []
    try:
        yield started
    finally:
        for cluster in started:
            cluster.stop()


@pytest.fixture(scope="module")
def ceph(ceph_session: list[Cluster], tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    if not ceph_session:
        ceph_session.append(Cluster.start(tmp_path_factory.mktemp("ceph")))
    else:
        ceph_session[0].renew_pool()
    return ceph_session[0]
