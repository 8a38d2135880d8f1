"""A test engine that loads until a flag file exists (engine name ``tests.flaky_engine:create``).

Worker processes import it by name through :func:`latentsync.engines.create_engine`, so it works
with the spawn start method: a test creates the flag file, kills the worker, and the rebuilt
worker's engine fails to load, as a GPU that fell off the bus or a checkpoint deleted under a
running server would.
"""

from __future__ import annotations

from pathlib import Path

from latentsync.engines.parametric import ParametricEngine


class FlakyEngine(ParametricEngine):
    """The parametric engine, whose :meth:`load` raises while ``fail_flag`` exists."""

    def __init__(self, avatar, fail_flag: Path):
        super().__init__(avatar)
        self._fail_flag = fail_flag

    def load(self) -> None:
        if self._fail_flag.exists():
            raise RuntimeError(f"flaky test engine refuses to load ({self._fail_flag.name} exists)")
        super().load()


def create(options, avatar) -> FlakyEngine:
    """Factory for ``create_engine("tests.flaky_engine:create", {"fail_flag": path}, avatar)``."""
    return FlakyEngine(avatar, Path(options["fail_flag"]))
