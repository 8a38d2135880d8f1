"""The ``tasks`` section: how accepted tasks are scheduled (docs/scheduling.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class TasksConfig:
    """Scheduling of accepted tasks (docs/scheduling.md).

    ``generate_ahead``: tasks after the one on air that may generate at once; later tasks wait
    holding only their decoded audio (bounded memory per waiting task). ``max_frames_ahead``:
    frames a task may have generated or in flight ahead of the frame on air (768 = 48 chunks of
    16, ~30 s at 25 fps; 196 kB per 256x256 face, 786 kB per 512x512 one). ``max_finished``: finished
    tasks kept for ``GET /tasks``.
    """

    generate_ahead: int = 1
    max_frames_ahead: int = 768
    max_finished: int = 200
