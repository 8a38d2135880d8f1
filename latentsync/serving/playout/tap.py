"""The tick tap: every tick the mixer made, shown to observers (WHEP, frames, the event feed).

Observers take the programme, not an output's acceptance: a tick the encoders refuse (an encoder
restarting or behind) is still shown to every WHEP viewer and frames client, so no destination
can freeze the browser views (docs/outputs.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from latentsync.serving.playout.clock import TickSink

TickObserver = Callable[[int, np.ndarray, np.ndarray], None]

logger = logging.getLogger(__name__)


class TappedSink:
    """A :class:`TickSink` that forwards to ``sink`` and shows every tick to observers.

    Observers run on the controller thread and must never block (the WebRTC hub only does a
    ``put_nowait``). An observer that raises is logged once and skipped from then on.

    Args:
        sink: The real sink (the channel's :class:`~latentsync.serving.egress.sink.EgressSink`).
        observers: Callables ``(index, video, audio)``: index counts the ticks shown (0, 1, ...),
            video ``(H, W, 3) uint8``, audio ``(N,) int16`` mono.
    """

    def __init__(self, sink: TickSink, observers: list[TickObserver]):
        self._sink = sink
        self._observers = list(observers)
        self._shown = 0

    def offer(self, video: np.ndarray, audio: np.ndarray) -> bool:
        """Offer the tick to the real sink, then show it to the observers whether it took it or not.

        Returns:
            The sink's answer (False: the clock counts the tick as dropped by the encoders).
        """
        accepted = self._sink.offer(video, audio)
        index = self._shown
        self._shown += 1
        for observer in list(self._observers):
            try:
                observer(index, video, audio)
            except Exception:
                logger.exception("tick observer %r failed; removed", observer)
                self._observers.remove(observer)
        return accepted
