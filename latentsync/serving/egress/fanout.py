"""Fanout: one encoder's FLV tags, copied to every output of that encoding without ever waiting.

The encoder's pump thread calls :meth:`Fanout.publish` for each tag; every subscribed output gets
it through its own :meth:`Subscriber.push` (an append to its own bounded queue and a wake-up:
never a blocking call), so a stalled output can slow down nothing but itself. An output that
starts calls :meth:`Fanout.subscribe` and gets what it must send first (the FLV header, the
sequence headers and the current GOP, :class:`~latentsync.serving.egress.flv.GopCache`) in the
same step that adds it, so it misses no tag and gets none twice. A new encoder run (FFmpeg
restarted) is a new stream: :meth:`Fanout.reset` tells every subscriber, which starts again.
"""

from __future__ import annotations

import threading
from typing import Protocol

from latentsync.serving.egress.flv import FlvTag, GopCache


class Subscriber(Protocol):
    """An output as the fan-out sees it (:class:`~latentsync.serving.egress.outputs.Output`)."""

    def push(self, tag: FlvTag) -> None:
        """Take one live tag; must not block (called on the encoder's pump thread)."""
        ...

    def encoder_restarted(self) -> None:
        """The encoder started a new stream: what was subscribed is over; must not block."""
        ...


class Fanout:
    """The tags of one encoder, for the outputs that share its encoding.

    Args:
        gop_max_bytes: Largest GOP kept for outputs that start (:class:`GopCache`).
    """

    def __init__(self, gop_max_bytes: int):
        self._gop_max_bytes = gop_max_bytes
        self._lock = threading.Lock()
        self._cache = GopCache(gop_max_bytes)
        self._subscribers: list[Subscriber] = []

    def reset(self) -> None:
        """A new encoder run begins: forget its predecessor's headers and GOP; every subscriber starts over."""
        with self._lock:
            self._cache = GopCache(self._gop_max_bytes)
            gone, self._subscribers = self._subscribers, []
        for subscriber in gone:
            subscriber.encoder_restarted()

    def set_header(self, header: bytes) -> None:
        """The 13-byte FLV file header of the current run."""
        with self._lock:
            self._cache.header = header

    def publish(self, tag: FlvTag) -> None:
        """One tag of the current run, in stream order: cached, and pushed to every subscriber."""
        with self._lock:
            self._cache.add(tag)
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.push(tag)

    def subscribe(self, subscriber: Subscriber) -> tuple[bytes, int] | None:
        """Start taking live tags, with what to send before them.

        Returns:
            ``(start bytes, base timestamp in ms)`` (:meth:`GopCache.start_bytes`; the live tags that
            follow are to be rebased by the same base), or None while no keyframe of the current
            run was seen yet (nothing subscribed: ask again).
        """
        with self._lock:
            if not self._cache.ready:
                return None
            start = self._cache.start_bytes()
            self._subscribers.append(subscriber)
        return start

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop pushing to ``subscriber`` (no-op if it is not subscribed)."""
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    @property
    def subscribers(self) -> int:
        """Outputs taking this encoding's tags now."""
        return len(self._subscribers)
