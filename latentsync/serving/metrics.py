"""Prometheus metrics for ``GET /metrics`` (prometheus-client, one registry per server, no globals).

Counters the runtime already keeps (ticks, restarts, queue depths, tasks by final state) are read
at scrape time by a collector, so there is one source of truth; latencies that only exist as
events (chunk generation, time to first frame) are observed into histograms as they happen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from latentsync.serving.streaming import StreamState

#: Histogram buckets in seconds: chunk generation (CPU parametric ~0.2 s, GPU diffusion ~0.3-2 s).
CHUNK_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
#: Time-to-first-frame buckets in seconds.
TTFF_BUCKETS_S = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The server's metrics registry.

    Args:
        snapshot: Returns the runtime's current counters as a dict (see
            :meth:`latentsync.serving.runtime.Runtime.metrics_snapshot`); called at every scrape.
    """

    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.chunk_seconds = Histogram(
            "latentsync_chunk_generation_seconds", "Wall time from a chunk's dispatch to its faces coming back.",
            buckets=CHUNK_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.ttff_seconds = Histogram(
            "latentsync_time_to_first_frame_seconds", "Upload received to the task's first frame on air.",
            buckets=TTFF_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._frames_generated = 0
        self._generation_seconds = 0.0
        self.registry.register(_RuntimeCollector(snapshot, self._generation_fps))

    def observe_chunk(self, frames: int, wall_s: float) -> None:
        """Record one generated chunk (``frames`` frames in ``wall_s`` seconds)."""
        self.chunk_seconds.observe(wall_s)
        with self._lock:
            self._frames_generated += frames
            self._generation_seconds += wall_s

    def observe_ttff(self, seconds: float) -> None:
        """Record a task's time to first frame, in seconds."""
        self.ttff_seconds.observe(seconds)

    def _generation_fps(self) -> float:
        with self._lock:
            return self._frames_generated / self._generation_seconds if self._generation_seconds else 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _RuntimeCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict], generation_fps: Callable[[], float]):
        self._snapshot = snapshot
        self._generation_fps = generation_fps

    def collect(self) -> Iterator:
        s = self._snapshot()
        for name, doc, key in (
            ("latentsync_ticks_emitted", "Ticks whose frame and audio reached FFmpeg.", "frames_emitted"),
            ("latentsync_ticks_late", "Ticks handled more than half a frame late.", "late_ticks"),
            ("latentsync_ticks_dropped", "Ticks dropped whole (FFmpeg down or behind).", "dropped_ticks"),
            ("latentsync_ticks_underrun", "Ticks that held the last frame because a chunk was late.", "underrun_ticks"),
            ("latentsync_ffmpeg_restarts", "FFmpeg processes restarted.", "ffmpeg_restarts"),
            ("latentsync_worker_restarts", "Worker-pool rebuilds after a dead or hung worker.", "worker_rebuilds"),
            ("latentsync_chunks_retried", "Chunks resubmitted after a worker failure.", "chunks_retried"),
        ):
            yield CounterMetricFamily(name, doc, value=s.get(key, 0))
        state = GaugeMetricFamily("latentsync_stream_state", "1 for the state on air.", labels=["state"])
        for st in StreamState:
            state.add_metric([st.value], 1.0 if s.get("state") == st.value else 0.0)
        yield state
        up = GaugeMetricFamily("latentsync_ffmpeg_up", "1 while FFmpeg runs with both FIFOs open.")
        up.add_metric([], 1.0 if s.get("ffmpeg_up") else 0.0)
        yield up
        ready = GaugeMetricFamily("latentsync_engine_ready", "1 once uploads are accepted.")
        ready.add_metric([], 1.0 if s.get("engine_ready") else 0.0)
        yield ready
        depth = GaugeMetricFamily("latentsync_queue_depth", "Items waiting, by queue.", labels=["queue"])
        for queue in ("tasks_waiting", "playlist", "pool_queued", "pool_in_flight"):
            depth.add_metric([queue], s.get(queue, 0))
        yield depth
        tasks = CounterMetricFamily("latentsync_tasks", "Tasks that ended, by final state.", labels=["state"])
        for final, count in sorted(s.get("tasks_final", {}).items()):
            tasks.add_metric([final], count)
        yield tasks
        fps = GaugeMetricFamily("latentsync_generation_fps", "Frames generated per second of chunk wall time.")
        fps.add_metric([], self._generation_fps())
        yield fps
