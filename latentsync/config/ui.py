"""The ``ui`` section: the control page and its event feed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class UiConfig:
    """The control page at ``/`` and its Server-Sent Events feed (``GET /events``).

    ``max_event_clients``: open ``/events`` streams at once (each holds a server thread; keep it
    below gunicorn's ``threads``); one more gets 503. ``event_poll_s``: how often task progress,
    viewers and health are sampled for the feed. ``event_queue_events``: events one client may
    have waiting; one further behind loses events.
    """

    page: bool = True
    max_event_clients: int = 4
    event_poll_s: float = 0.25
    event_queue_events: int = 256
