from __future__ import annotations

import pytest

from tests.streamtools import RtmpServer, require_rtmp_tools


@pytest.fixture(scope="session")
def rtmp_server(tmp_path_factory):
    """A private nginx-rtmp server for the whole test session."""
    require_rtmp_tools()
    server = RtmpServer(tmp_path_factory.mktemp("rtmp"))
    server.start()
    yield server
    server.stop()
