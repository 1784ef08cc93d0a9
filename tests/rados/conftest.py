"""The throwaway Ceph cluster the RADOS tests share (tests/kit/cephkit.py): one per test
module, in a scratch directory, stopped and removed at the module's end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kit.cephkit import Cluster, why_not


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    cluster = Cluster.start(tmp_path_factory.mktemp("ceph"))
    try:
        yield cluster
    finally:
        cluster.stop()
