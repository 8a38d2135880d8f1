"""Fixtures for the tests that compare float32 numbers computed by torch on the CPU.

A module uses one by importing it (``from tests.torchtools import one_thread  # noqa: F401``): pytest finds
fixtures in a test module's namespace, and ``autouse`` applies it to every test there.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for the module's tests, then the number there was before.

    The same sums in the same order on any host (parity against stored references), and no two-thread
    stall on a busy two-core host (a tiny U-Net forward: 0.3 s alone; several seconds with two threads
    beside another process).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
