"""The tick tap: every tick the RTMP sink accepted, shown to observers (WHEP, the event feed)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from latentsync.serving.playout.clock import TickSink

TickObserver = Callable[[int, np.ndarray, np.ndarray], None]

logger = logging.getLogger(__name__)


class TappedSink:
    """A :class:`TickSink` that forwards to ``sink`` and shows every accepted tick to observers.

    Observers run on the controller thread and must never block (the WebRTC hub only does a
    ``put_nowait``). An observer that raises is logged once and skipped from then on.

    Args:
        sink: The real sink (the FFmpegSink).
        observers: Callables ``(index, video, audio)``: index is the emitted-frame count before this
            tick (0, 1, ...), video ``(H, W, 3) uint8``, audio ``(N,) int16`` mono.
    """

    def __init__(self, sink: TickSink, observers: list[TickObserver]):
        self._sink = sink
        self._observers = list(observers)
        self._emitted = 0

    def offer(self, video: np.ndarray, audio: np.ndarray) -> bool:
        """Offer the tick to the real sink; observers see it only when the sink accepted it."""
        if not self._sink.offer(video, audio):
            return False
        index = self._emitted
        self._emitted += 1
        for observer in list(self._observers):
            try:
                observer(index, video, audio)
            except Exception:
                logger.exception("tick observer %r failed; removed", observer)
                self._observers.remove(observer)
        return True
