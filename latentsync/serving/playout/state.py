"""What a channel puts on air: the stream state shared by the clock, the mixer and the telemetry."""

from __future__ import annotations

import enum

from latentsync.serving.core.states import check_table


class StreamState(str, enum.Enum):
    """What the controller is putting on air (docs/architecture.md, "The stream state machine")."""

    STARTING = "starting"
    IDLE = "idle"
    FADE_IN = "fade_in"
    SPEAKING = "speaking"
    FADE_OUT = "fade_out"
    STOPPED = "stopped"


_S = StreamState
#: The moves between two ticks: speech fades in (or cuts in with ``crossfade_frames`` 0 or 1), plays,
#: fades out (finished, interrupted, or an idle loop switching), and the next program may start
#: during a fade-out or right after the last frame of another (speech to speech); a fade's last
#: frame is what comes in, alone (so with ``crossfade_frames`` 2 a fade-out goes straight to speech).
STREAM_MOVES: dict[StreamState, frozenset[StreamState]] = {
    _S.STARTING: frozenset({_S.IDLE, _S.STOPPED}),
    _S.IDLE: frozenset({_S.FADE_IN, _S.SPEAKING, _S.FADE_OUT, _S.STOPPED}),
    _S.FADE_IN: frozenset({_S.SPEAKING, _S.FADE_OUT, _S.STOPPED}),
    _S.SPEAKING: frozenset({_S.FADE_IN, _S.FADE_OUT, _S.IDLE, _S.STOPPED}),
    _S.FADE_OUT: frozenset({_S.IDLE, _S.FADE_IN, _S.SPEAKING, _S.STOPPED}),
    _S.STOPPED: frozenset(),
}
check_table(StreamState, STREAM_MOVES)
