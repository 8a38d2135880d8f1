"""The tick tap: every tick the mixer made, shown to observers (WHEP, frames, the event feed).

Observers take the programme, not an output's acceptance: a tick the encoders refuse (an encoder
restarting or behind) is still shown to every WHEP viewer and frames client, so no destination
can freeze the browser views (docs/outputs.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from latentsync.serving.playout.clock import ThrottledErrors, TickSink

TickObserver = Callable[[int, np.ndarray, np.ndarray], None]


class TappedSink:
    """A :class:`TickSink` that forwards to ``sink`` and shows every tick to observers.

    Observers run on the controller thread and must never block (the WebRTC hub only does a
    ``put_nowait``). An observer that raises is logged (at most once per
    :data:`~latentsync.serving.playout.clock.ERROR_LOG_INTERVAL_S`, with a count) and shown the next
    ticks all the same: one bad tick never blinds a viewer for good, and never stops the clock.

    Args:
        sink: The real sink (the channel's :class:`~latentsync.serving.egress.sink.EgressSink`).
        observers: Callables ``(index, video, audio)``: index counts the ticks shown (0, 1, ...),
            video ``(H, W, 3) uint8``, audio ``(N,) int16`` mono.
    """

    def __init__(self, sink: TickSink, observers: list[TickObserver]):
        self._sink = sink
        self._observers = list(observers)
        self._errors = [ThrottledErrors(f"tick observer {observer!r}") for observer in self._observers]
        self._sink_errors = ThrottledErrors("tick sink")
        self._shown = 0

    @property
    def observer_errors(self) -> int:
        """Ticks an observer raised on, all observers together."""
        return sum(errors.count for errors in self._errors)

    @property
    def sink_errors(self) -> int:
        """Ticks the real sink raised on (counted dropped by the clock)."""
        return self._sink_errors.count

    def offer(self, video: np.ndarray, audio: np.ndarray) -> bool:
        """Offer the tick to the real sink, then show it to the observers whether it took it or not.

        Returns:
            The sink's answer (False: the clock counts the tick as dropped by the encoders).
        """
        try:
            accepted = self._sink.offer(video, audio)
        except Exception as exc:  # the observers are shown the tick all the same; the clock counts it dropped
            self._sink_errors.error(exc)
            accepted = False
        index = self._shown
        self._shown += 1
        for observer, errors in zip(self._observers, self._errors, strict=True):
            try:
                observer(index, video, audio)
            except Exception as exc:
                errors.error(exc)
        return accepted
