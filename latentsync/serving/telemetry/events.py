"""The tick tap and the live event feed behind ``GET /events`` (Server-Sent Events).

:class:`~latentsync.serving.playout.tap.TappedSink` sits between the StreamingController and the
channel's egress: every tick the mixer made is also handed to the observers (the WebRTC hub, the
frames hub, the stream-state watcher), whatever the encoders and outputs do.
:class:`EventBroadcaster` fans small JSON events out to a bounded number of subscribers, each through
its own bounded queue; :class:`EventFeed` samples task progress, viewers and health on a thread of
its own and publishes what changed.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable

import numpy as np

from latentsync.serving.playout.state import StreamState

logger = logging.getLogger(__name__)


class Subscription:
    """One SSE client's bounded queue of encoded events (``bytes``, ``text/event-stream`` framing)."""

    def __init__(self, broadcaster: EventBroadcaster, queue_events: int):
        self._broadcaster = broadcaster
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_events)
        self.lost = 0

    def get(self, timeout_s: float) -> bytes | None:
        """The next event, ``b""`` after ``timeout_s`` seconds without one, None when the feed closed."""
        try:
            return self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return b""

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        self._broadcaster.unsubscribe(self)


class EventBroadcaster:
    """Publishes named JSON events to at most ``max_clients`` subscribers.

    Args:
        max_clients: Subscribers at once; :meth:`subscribe` returns None past it (``ui.max_event_clients``).
        queue_events: Events one subscriber may have waiting; one further behind loses events
            (``ui.event_queue_events``).
    """

    def __init__(self, max_clients: int, queue_events: int = 256):
        self.max_clients = max_clients
        self.queue_events = queue_events
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._latest: dict[str, bytes] = {}
        self._closed = False

    @property
    def clients(self) -> int:
        """Subscribers now."""
        return len(self._subscribers)

    def subscribe(self) -> Subscription | None:
        """A new subscription primed with the latest event of every name, or None when full/closed."""
        with self._lock:
            if self._closed or len(self._subscribers) >= self.max_clients:
                return None
            sub = Subscription(self, self.queue_events)
            general = [d for k, d in self._latest.items() if not k.startswith("task:")]
            tasks = [d for k, d in self._latest.items() if k.startswith("task:")]
            for data in general + tasks[len(general) - self.queue_events // 2 :]:  # newest tasks
                sub.queue.put_nowait(data)
            self._subscribers.append(sub)
            return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget ``sub`` (idempotent)."""
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    def publish(self, name: str, payload: dict, key: str | None = None) -> None:
        """Send ``payload`` as event ``name`` to every subscriber. Never blocks.

        Args:
            name: SSE event name (``state``, ``task``, ``viewers``, ``health``).
            payload: JSON-serialisable body.
            key: Remembered as the latest of its kind under this key (default ``name``) for new
                subscribers; tasks use one key per task id.
        """
        data = f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
        with self._lock:
            self._latest[key or name] = data
            if len(self._latest) > 4 * self.queue_events:  # forget the oldest remembered tasks
                for old in list(self._latest)[: len(self._latest) // 2]:
                    if old.startswith("task:"):
                        del self._latest[old]
            subscribers = list(self._subscribers)
        for sub in subscribers:
            try:
                sub.queue.put_nowait(data)
            except queue.Full:
                sub.lost += 1

    def close(self) -> None:
        """End every subscription (their streams finish). Idempotent."""
        with self._lock:
            self._closed = True
            subscribers, self._subscribers = self._subscribers, []
        for sub in subscribers:
            try:
                sub.queue.put_nowait(None)
            except queue.Full:
                pass


class EventFeed:
    """Publishes stream-state changes (from the tick tap) and sampled tasks, viewers and health.

    Args:
        broadcaster: Where events go.
        state: Returns the stream state now (the mixer's).
        tasks: Returns the task list as JSON dicts (``Task.to_json()``).
        health: Returns the health body (``Runtime.health()[1]``).
        viewers: Returns the WebRTC viewer count.
        poll_s: Sampling period in seconds.
    """

    def __init__(
        self,
        broadcaster: EventBroadcaster,
        *,
        state: Callable[[], StreamState],
        tasks: Callable[[], list[dict]],
        health: Callable[[], dict],
        viewers: Callable[[], int],
        poll_s: float,
    ):
        self._broadcaster = broadcaster
        self._state = state
        self._tasks = tasks
        self._health = health
        self._viewers = viewers
        self._poll_s = poll_s
        self._last_state: StreamState | None = None
        self._last_tasks: dict[str, tuple] = {}
        self._last_viewers: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the sampling thread. Safe to call twice."""
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="event-feed", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and end every SSE stream. Safe to call twice or before start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._broadcaster.close()

    def on_tick(self, _index: int, _video: np.ndarray, _audio: np.ndarray) -> None:
        """Tick observer: publish the stream state the moment it changes (controller thread)."""
        state = self._state()
        if state is not self._last_state:
            self._last_state = state
            self._broadcaster.publish("state", {"state": state.value})

    def publish_viewers(self, count: int) -> None:
        """Viewer listener: publish the WebRTC viewer count."""
        if count != self._last_viewers:
            self._last_viewers = count
            self._broadcaster.publish("viewers", {"viewers": count})

    def _run(self) -> None:
        health_every = max(1, round(1.0 / self._poll_s))
        n = 0
        while not self._stop.wait(self._poll_s):
            try:
                self._sample(n % health_every == 0)
            except Exception:
                logger.exception("event feed sampling failed")
            n += 1

    def _sample(self, with_health: bool) -> None:
        for task in self._tasks():
            sig = (task.get("status"), task.get("frames_streamed"), task.get("chunks_generated"))
            if self._last_tasks.get(task["task_id"]) != sig:
                self._last_tasks[task["task_id"]] = sig
                self._broadcaster.publish("task", task, key=f"task:{task['task_id']}")
        if len(self._last_tasks) > 1000:
            self._last_tasks.clear()
        if self._broadcaster.clients == 0:
            return
        self.publish_viewers(self._viewers())
        if with_health:
            self._broadcaster.publish("health", self._health())
