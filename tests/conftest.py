from __future__ import annotations

import pytest

from tests.raycluster import RayCluster, require_ray
from tests.streamtools import RtmpServer, require_rtmp_tools


@pytest.fixture(scope="session")
def rtmp_server(tmp_path_factory):
    """A private nginx-rtmp server for the whole test session."""
    require_rtmp_tools()
    server = RtmpServer(tmp_path_factory.mktemp("rtmp"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_cluster():
    """A real two-node Ray cluster on loopback (:class:`tests.raycluster.RayCluster`), one per test module."""
    require_ray()
    cluster = RayCluster().start()
    yield cluster
    cluster.stop()
