"""Shared fixtures, and the test tiers (pyproject.toml [tool.pytest.ini_options] ``markers``).

A test that carries none of :data:`PROCESS_MARKERS` is in the ``unit`` tier (``pytest -m unit``): no
server, no FFmpeg pushing or recording, no browser, no Ray, no engine worker processes. ``make test``
runs that tier first, on both cores; ``make test-fast`` (the edit loop) runs it without the tests
marked ``slow`` (each over a few seconds of CPU: the CPU ``latentsync`` engine, the 512 px and 1080p
preparations, the 1.5/1.6 parity runs). Tests that use the ``rtmp_server`` or ``ray_cluster`` fixture get their markers
from :data:`FIXTURE_MARKERS`; the rest are marked in their modules. A ``unit`` test that starts a
server process, nginx-rtmp or a Ray cluster through the helpers of ``tests/`` fails, naming the
marker it lacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.raycluster import RayCluster, require_ray
from tests.streamtools import RtmpServer, ServerProcess, require_rtmp_tools

# The client package (clients/python, ``latentsync_client``) of THIS checkout comes first: requirements.txt installs
# it editable into .venv, and a worktree sharing another checkout's .venv would import that checkout's copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python" / "src"))

#: Markers that put a test outside the unit tier: what it starts (``slow`` does not: a slow unit test runs in
#: make test's unit tier, and only make test-fast leaves it out).
PROCESS_MARKERS = ("rtmp", "server", "ffmpeg", "workers", "ray", "browser", "gpu")
#: Markers a test gets from a fixture it uses.
FIXTURE_MARKERS = {"rtmp_server": ("rtmp",), "ray_cluster": ("ray", "slow")}
#: make test runs each tier under pytest-xdist (``-n 2 --dist loadscope --no-loadscope-reorder``) with the groups of
#: :func:`worker_group`: the tests of one module run on one worker, one after the other, sharing module-scoped
#: servers; the Ray modules are one group, so that two local Ray clusters never run at once.
RAY_MODULES = ("tests/serving/test_ray_e2e.py", "tests/serving/compute/test_ray_pool.py")
#: Modules marked ``solo``: make test runs them after the parallel tiers, one test at a time, nothing beside them.
#: Each either loads the 2 cores for a minute or more (a two-node Ray cluster and its actors; the latentsync
#: engine on the CPU) or measures against the clock what a neighbour on the other core moves (time to first
#: frame, underrun ticks, a browser's microphone on air within 10-15 s). Every one of them failed at least once on a
#: bare-clone run of 2026-12-06/07 with a CPU-heavy module on the other xdist worker, and passed alone (the
#: browser's channel page: CI run of 2026-12-07, its live microphone not on air within 15 s; PCM streamed at real
#: time: 24 underrun ticks on a CI run of 2026-12-07, 0 alone; two channels' fairness: hall 36 and main 32 underrun
#: ticks on a CI run of 2026-12-07, 0 alone).
SOLO_MODULES = (
    *RAY_MODULES,
    "tests/serving/test_latentsync_server_e2e.py",
    "tests/serving/test_speech_e2e.py",
    "tests/serving/test_speech_stream_e2e.py",
    "tests/serving/runtime/test_channels.py",
    "tests/serving/api/test_browser.py",
    "tests/serving/api/test_browser_channels.py",
)
#: Groups listed here start first, longest first (wall seconds of the group on a 2-core machine, ``pytest
#: --durations=0`` summed per module, rounded; the unit tier's modules measured with -m unit); the others follow in
#: collection order. test_hostile_media.py's 1080p preparation (127 s) is a unit test: it starts the unit tier.
LONG_GROUPS_S = {
    "tests/serving/api/test_hostile_media.py": 130.0,
    "tests/serving/egress/test_outputs.py": 117.0,
    "tests/serving/api/test_hostile.py": 114.0,
    "tests/serving/test_leaks.py": 84.0,
    "tests/serving/test_stream_e2e.py": 78.0,
    "tests/serving/runtime/test_channel_faults.py": 67.0,
    "tests/serving/runtime/test_channels.py": 63.0,
    "tests/serving/egress/test_frames.py": 58.0,
    "tests/serving/api/test_service.py": 50.0,
    "tests/serving/test_speech_stream_e2e.py": 49.0,
    "tests/serving/api/test_browser_channels.py": 36.0,
    "tests/test_latentsync_engine.py": 66.0,
    "tests/test_unet_parity.py": 55.0,
    "tests/test_framing.py": 27.0,
    "tests/test_avatar.py": 16.0,
    "tests/serving/avatars/test_avatars.py": 15.0,
    "tests/test_pipeline_parity.py": 12.0,
    "tests/serving/runtime/test_channels_units.py": 10.0,
}
#: What a unit test may not start, and the marker that would move it out of the unit tier.
FORBIDDEN_IN_UNIT = ((ServerProcess, "server"), (RtmpServer, "rtmp"), (RayCluster, "ray"))


def pytest_configure(config):
    """Under pytest-xdist each worker's torch takes one thread: two workers on two cores, not four threads."""
    if os.environ.get("PYTEST_XDIST_WORKER") and config.getoption("markexpr").startswith("unit"):
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the markers added here must count
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, markers in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames:
                for name in markers:
                    item.add_marker(name)
        if not any(item.get_closest_marker(name) for name in PROCESS_MARKERS):
            item.add_marker("unit")
        if item.nodeid.split("::", 1)[0] in SOLO_MODULES:
            item.add_marker("solo")
    # Longest first (a stable sort: the rest keep their order), so no worker is left with a long module at the end.
    items.sort(key=lambda item: -LONG_GROUPS_S.get(worker_group(item.nodeid), 0.0))


def worker_group(nodeid: str) -> str:
    """The group of a test under pytest-xdist (:func:`pytest_xdist_make_scheduler`): its module's path
    (module-scoped servers are shared), or ``ray`` for the modules in :data:`RAY_MODULES`."""
    module = nodeid.split("::", 1)[0]
    return "ray" if module in RAY_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadscope``, one work unit per :func:`worker_group`, handed out in collection order.

    Ours, not ``--dist loadgroup``: pytest-xdist 3.8 names a group by rewriting ``item._nodeid``, which pytest
    9 no longer reads, so its groups are silently ignored.
    """
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)


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
