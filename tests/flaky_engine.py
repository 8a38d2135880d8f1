"""A test engine that fails to load, stalls, or answers wrong faces, on a flag file (``tests.flaky_engine:create``).

Worker processes (and Ray actors) import it by name through :func:`latentsync.engines.create_engine`,
so it works with the spawn start method and on any Ray node. With ``fail_flag``: a test creates the
flag file, kills the worker, and the rebuilt worker's engine fails to load, as a GPU that fell off
the bus or a checkpoint deleted under a running server would. With ``hold_flag`` (and
``hold_node``): while the flag exists, a worker on that Ray node (``LSR_TEST_NODE``, set by
:class:`tests.raycluster.RayCluster`) stalls in :meth:`generate` after creating
``<hold_flag>.held``, so a test knows a call is in flight there before it takes the node away.
With ``wrong_flag``: while the flag exists, :meth:`generate` returns faces of half the avatar's
side, as a worker running another build of the engine (another face size) would; the pool must
fail that job with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from latentsync.engines.parametric import ParametricEngine

#: Longest a held call stalls (seconds): a test that forgets its flag still ends.
HOLD_MAX_S = 120.0


class FlakyEngine(ParametricEngine):
    """The parametric engine, whose :meth:`load` raises while ``fail_flag`` exists, whose :meth:`generate`
    stalls while ``hold_flag`` exists on node ``hold_node`` and answers ``(n, S/2, S/2, 3) uint8`` faces
    (``S`` the avatar's face side) while ``wrong_flag`` exists."""

    def __init__(
        self,
        avatar,
        fail_flag: Path | None = None,
        hold_flag: Path | None = None,
        hold_node: str = "",
        wrong_flag: Path | None = None,
    ):
        super().__init__(avatar)
        self._fail_flag = fail_flag
        self._wrong_flag = wrong_flag
        self._hold_flag = hold_flag
        self._hold_here = bool(hold_node) and os.environ.get("LSR_TEST_NODE") == hold_node

    def load(self) -> None:
        if self._fail_flag is not None and self._fail_flag.exists():
            raise RuntimeError(f"flaky test engine refuses to load ({self._fail_flag.name} exists)")
        super().load()

    def generate(self, request):
        if self._hold_here and self._hold_flag is not None and self._hold_flag.exists():
            Path(f"{self._hold_flag}.held").touch()
            deadline = time.monotonic() + HOLD_MAX_S
            while self._hold_flag.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        result = super().generate(request)
        if self._wrong_flag is not None and self._wrong_flag.exists():
            result = dataclasses.replace(result, faces=np.ascontiguousarray(result.faces[:, ::2, ::2]))
        return result


def create(options, avatar) -> FlakyEngine:
    """Factory for ``create_engine("tests.flaky_engine:create", {"fail_flag": path, ...}, avatar)``."""
    optional = {key: Path(options[key]) for key in ("fail_flag", "hold_flag", "wrong_flag") if options.get(key)}
    return FlakyEngine(avatar, hold_node=options.get("hold_node", ""), **optional)
