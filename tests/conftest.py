"""Shared fixtures, and the test tiers (pyproject.toml [tool.pytest.ini_options] ``markers``).

A test that carries none of :data:`HEAVY_MARKERS` is in the ``unit`` tier (``make test-fast``,
``pytest -m unit``): no server, no FFmpeg pushing or recording, no browser, no Ray, no engine
worker processes. Tests that use the ``rtmp_server`` or ``ray_cluster`` fixture get their markers
from :data:`FIXTURE_MARKERS`; the rest are marked in their modules. A ``unit`` test that starts a
server process, nginx-rtmp or a Ray cluster through the helpers of ``tests/`` fails, naming the
marker it lacks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.raycluster import RayCluster, require_ray
from tests.streamtools import RtmpServer, ServerProcess, require_rtmp_tools

# The client package (clients/python, ``latentsync_client``) of THIS checkout comes first: requirements.txt installs
# it editable into .venv, and a worktree sharing another checkout's .venv would import that checkout's copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python" / "src"))

#: Markers that put a test outside the unit tier.
HEAVY_MARKERS = ("slow", "rtmp", "server", "ffmpeg", "workers", "ray", "browser", "gpu")
#: Markers a test gets from a fixture it uses.
FIXTURE_MARKERS = {"rtmp_server": ("rtmp",), "ray_cluster": ("ray", "slow")}
#: What a unit test may not start, and the marker that would move it out of the unit tier.
FORBIDDEN_IN_UNIT = ((ServerProcess, "server"), (RtmpServer, "rtmp"), (RayCluster, "ray"))


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the markers added here must count
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, markers in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames:
                for name in markers:
                    item.add_marker(name)
        if not any(item.get_closest_marker(name) for name in HEAVY_MARKERS):
            item.add_marker("unit")


def _refuse(helper: type, marker: str):
    def start(*args, **kwargs):
        pytest.fail(f"a unit-tier test starts {helper.__name__}: mark it {marker!r} (tests/conftest.py)")

    return start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """In the unit tier, starting a server, nginx-rtmp or a Ray cluster (fixtures included) fails the test."""
    if item.get_closest_marker("unit") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        for helper, marker in FORBIDDEN_IN_UNIT:
            patch.setattr(helper, "start", _refuse(helper, marker))
        yield


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
