"""The task side's seam toward playout: where a task's program goes on air.

:class:`Playout` is implemented by :class:`latentsync.serving.playout.mixer.ProgramMixer`; tests
put a fake here (tests/fakes.py).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from latentsync.serving.playout.mixer import Program


@runtime_checkable
class Playout(Protocol):
    """Where programs go on air, in order (one per channel)."""

    @property
    def ticks(self) -> int:
        """Ticks produced so far (interrupt latency is measured in them)."""
        ...

    def enqueue(self, program: Program) -> bool:
        """Append a program to the playlist; False when the playlist is full."""
        ...

    def interrupt(self, task_id: str) -> None:
        """Fade the program of ``task_id`` out within the crossfade if on air, or drop it from the playlist."""
        ...
