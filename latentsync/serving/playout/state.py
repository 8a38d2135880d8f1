"""What a channel puts on air: the stream state shared by the clock, the mixer and the telemetry."""

from __future__ import annotations

import enum


class StreamState(str, enum.Enum):
    """What the controller is putting on air."""

    STARTING = "starting"
    IDLE = "idle"
    FADE_IN = "fade_in"
    SPEAKING = "speaking"
    FADE_OUT = "fade_out"
    STOPPED = "stopped"
