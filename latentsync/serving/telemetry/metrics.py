"""Prometheus metrics for ``GET /metrics`` (prometheus-client, one registry per server, no globals).

Counters the runtime already keeps (ticks, restarts, queue depths, tasks by final state) are read
at scrape time by a collector, so there is one source of truth; latencies that only exist as
events (chunk generation, time to first frame) are observed into histograms as they happen.

Every per-stream series carries a ``channel`` label (``channel="main"`` for the default channel,
docs/channels.md); the shared worker pool's series and the server's uptime and engine have none
(:data:`SERVER_WIDE`). The pool's rows of ``latentsync_queue_depth`` have ``channel=""``, which
PromQL treats as no label.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from latentsync.serving.egress.outputs import OutputState
from latentsync.serving.playout.state import StreamState
from latentsync.serving.telemetry.health import HealthSnapshot

#: Histogram buckets in seconds: chunk generation (CPU parametric ~0.2 s, GPU diffusion ~0.3-2 s).
CHUNK_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
#: Time-to-first-frame buckets in seconds.
TTFF_BUCKETS_S = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The server's metrics registry.

    Args:
        snapshot: Returns every channel's :class:`HealthSnapshot` by channel name (see
            :meth:`latentsync.serving.runtime.Runtime.channel_snapshots`), or one snapshot (exported
            as channel ``main``); called at every scrape.
    """

    def __init__(self, snapshot: Callable[[], HealthSnapshot | Mapping[str, HealthSnapshot]]):
        self.registry = CollectorRegistry(auto_describe=True)
        # The server process's resident memory, descriptors, CPU seconds and start time (prometheus-client reads
        # /proc/self; nothing on a system without /proc): process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=self.registry)
        self.chunk_seconds = Histogram(
            "latentsync_chunk_generation_seconds",
            "Wall time from a chunk's dispatch to its faces coming back.",
            buckets=CHUNK_BUCKETS_S,
            registry=self.registry,
        )
        self.ttff_seconds = Histogram(
            "latentsync_time_to_first_frame_seconds",
            "Upload received to the task's first frame on air.",
            buckets=TTFF_BUCKETS_S,
            registry=self.registry,
        )
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


#: Counters: (snapshot attribute path, metric name, help).
COUNTERS = (
    ("frames_emitted", "latentsync_ticks_emitted", "Ticks whose frame and audio every encoder took."),
    ("ticks", "latentsync_ticks_handled", "Ticks the output clock handled."),
    ("late_ticks", "latentsync_ticks_late", "Ticks handled more than half a frame late."),
    (
        "dropped_ticks",
        "latentsync_ticks_dropped",
        "Ticks an encoder refused (down, restarting or behind): not encoded.",
    ),
    ("underrun_ticks", "latentsync_ticks_underrun", "Ticks that held the last frame because a chunk was late."),
    (
        "tick_errors",
        "latentsync_tick_errors",
        "Ticks on which the mixer, the sink or a tick observer raised (the clock went on).",
    ),
    ("programs_failed", "latentsync_programs_failed", "Programs dropped because making their tick raised."),
    ("ffmpeg_restarts", "latentsync_ffmpeg_restarts", "Encoder FFmpeg processes restarted."),
    ("workers.rebuilds", "latentsync_worker_restarts", "Worker-pool rebuilds after a dead or hung worker."),
    ("workers.retried", "latentsync_chunks_retried", "Chunks resubmitted after a worker failure."),
    ("workers.failed", "latentsync_pool_jobs_failed", "Pool jobs that failed for good."),
    ("workers.completed", "latentsync_pool_jobs_completed", "Pool jobs finished."),
    ("workers.dispatches", "latentsync_pool_dispatches", "Calls sent to engine workers (a batch is one)."),
    ("webrtc.viewers_total", "latentsync_webrtc_viewers", "WHEP sessions answered."),
    ("webrtc.frames_encoded", "latentsync_webrtc_frames_encoded", "Video frames encoded once for all WHEP viewers."),
    ("webrtc.keyframes", "latentsync_webrtc_keyframes", "Keyframes among the WHEP video frames."),
    ("webrtc.inbox_dropped_ticks", "latentsync_webrtc_ticks_skipped", "Ticks the WHEP encoder could not take."),
    (
        "webrtc.viewer_dropped_packets",
        "latentsync_webrtc_viewer_packets_dropped",
        "Video packets dropped from slow WHEP viewers' queues.",
    ),
    (
        "webrtc.dropped_candidates",
        "latentsync_webrtc_candidates_dropped",
        "Viewers' ICE candidates ignored: outside webrtc.allowed_candidate_networks or malformed.",
    ),
    ("frames.clients_total", "latentsync_frames_clients", "Frames WebSocket clients ever subscribed."),
    ("frames.frames_encoded", "latentsync_frames_encoded", "Frames payloads encoded (once per format and size)."),
    ("frames.ticks_sent", "latentsync_frames_ticks_sent", "Tick messages sent to frames clients (all together)."),
    (
        "frames.client_dropped_ticks",
        "latentsync_frames_client_ticks_dropped",
        "Ticks lost by slow frames clients (counted in their next header).",
    ),
    ("frames.inbox_dropped_ticks", "latentsync_frames_ticks_skipped", "Ticks the frames encoder could not take."),
)
#: Gauges: (snapshot attribute path, metric name, help); booleans export as 0/1.
GAUGES = (
    ("uptime_s", "latentsync_uptime_seconds", "Seconds since the server started."),
    ("ticking", "latentsync_clock_ticking", "1 while the output clock ticks (liveness)."),
    (
        "streaming",
        "latentsync_streaming",
        "1 while the clock ticks, the encoders run and every required output is live.",
    ),
    ("max_tick_lateness_ms", "latentsync_max_tick_lateness_seconds", "Worst tick lateness, in seconds."),
    ("ffmpeg_up", "latentsync_ffmpeg_up", "1 while every encoder FFmpeg runs with both FIFOs open."),
    ("engine_ready", "latentsync_engine_ready", "1 once uploads are accepted and the worker pool is not broken."),
    ("workers.count", "latentsync_workers", "Engine worker processes."),
    ("tasks_admitted", "latentsync_tasks_admitted", "Unfinished tasks admitted to generate."),
    ("webrtc.viewers", "latentsync_webrtc_viewers_connected", "WHEP sessions open now."),
    ("frames.clients", "latentsync_frames_clients_connected", "Frames WebSocket clients connected now."),
    ("frames.encoders", "latentsync_frames_encoders", "Frames encodings running (one per format and size)."),
)
#: Snapshot fields kept in another unit than the metric's, and the factor to its base unit: Prometheus names carry
#: base units (seconds, bytes; https://prometheus.io/docs/practices/naming/), ``/health`` keeps milliseconds.
TO_BASE_UNIT = {"max_tick_lateness_ms": 1e-3}
#: Queue depths, one ``latentsync_queue_depth`` series each: (snapshot attribute path, ``queue`` label).
QUEUES = (
    ("tasks_waiting", "tasks_waiting"),
    ("playlist", "playlist"),
    ("workers.queued", "pool_queued"),
    ("workers.in_flight", "pool_in_flight"),
)
#: Snapshot fields that describe the server, not one channel: exported once, without a ``channel`` label.
SERVER_WIDE = frozenset({"uptime_s", "engine", "engine_error"})


def server_wide(path: str) -> bool:
    """Whether the snapshot field ``path`` is the server's (the shared pool's), not one channel's."""
    return path in SERVER_WIDE or path.startswith("workers.")


#: Snapshot fields exported another way than by value, and why (the test checks nothing is left out).
SPECIAL = {
    "state": "latentsync_stream_state{state}",
    "tasks_final": "latentsync_tasks{state}",
    "engine": "latentsync_engine_info{engine}",
    "engine_error": "latentsync_engine_broken (1 when set)",
    "on_air_task": "latentsync_task_on_air (1 when set; task ids are not labels)",
    "ffmpeg_pid": "/health only: a process id is not a measurement",
    "ffmpeg_last_error": "/health only: free text",
    "outputs": "latentsync_output_{state,required,bytes,frames,restarts,stalls,last_progress_age_seconds}{output}",
    "stream": "latentsync_stream_format{width,height,fps,audio_sample_rate}",
    "workers.pids": "/health only: process ids are not measurements",
    "workers.backend": "latentsync_pool_info{backend}",
    "workers.actors": "latentsync_pool_worker_{jobs,failures,restarts,latency_seconds,ready}{worker,node}",
    "webrtc.codec": "/health only: configuration, not a measurement",
    "webrtc.width": "/health only: configuration, not a measurement",
    "webrtc.height": "/health only: configuration, not a measurement",
}


def snapshot_value(snapshot: HealthSnapshot, path: str) -> float:
    """The numeric value of ``path`` (``"ticks"``, ``"workers.queued"``) in a snapshot; 0 where absent.

    Raises:
        AttributeError: If ``path`` names no field (a renamed field fails loudly, never exports 0).
    """
    value: Any = snapshot  # a field of it, then a field of that ...
    for name in path.split("."):
        if value is None:
            return 0.0
        value = getattr(value, name)
    return float(value or 0)


class _RuntimeCollector(Collector):
    def __init__(
        self, snapshot: Callable[[], HealthSnapshot | Mapping[str, HealthSnapshot]], generation_fps: Callable[[], float]
    ):
        self._snapshot = snapshot
        self._generation_fps = generation_fps

    def _snapshots(self) -> dict[str, HealthSnapshot]:
        got = self._snapshot()
        return {"main": got} if isinstance(got, HealthSnapshot) else dict(got)

    def collect(self) -> Iterator:
        snaps = self._snapshots()
        server = next(iter(snaps.values()))  # the pool, uptime and engine are the same in every snapshot
        by_channel = sorted(snaps.items())
        for kind, table in ((CounterMetricFamily, COUNTERS), (GaugeMetricFamily, GAUGES)):
            for path, name, doc in table:
                scale = TO_BASE_UNIT.get(path, 1.0)
                if server_wide(path):
                    yield kind(name, doc, value=scale * snapshot_value(server, path))
                    continue
                family = kind(name, doc, labels=["channel"])
                for channel, s in by_channel:
                    family.add_metric([channel], scale * snapshot_value(s, path))
                yield family
        depth = GaugeMetricFamily("latentsync_queue_depth", "Items waiting, by queue.", labels=["channel", "queue"])
        for path, label in QUEUES:
            if server_wide(path):
                depth.add_metric(["", label], snapshot_value(server, path))
            else:
                for channel, s in by_channel:
                    depth.add_metric([channel, label], snapshot_value(s, path))
        yield depth
        state = GaugeMetricFamily("latentsync_stream_state", "1 for the state on air.", labels=["channel", "state"])
        tasks = CounterMetricFamily(
            "latentsync_tasks", "Tasks that ended, by final state.", labels=["channel", "state"]
        )
        on_air = GaugeMetricFamily("latentsync_task_on_air", "1 while a task is on air.", labels=["channel"])
        fmt = GaugeMetricFamily(
            "latentsync_stream_format", "Output format, by dimension.", labels=["channel", "dimension"]
        )
        for channel, s in by_channel:
            for st in StreamState:
                state.add_metric([channel, st.value], 1.0 if s.state == st.value else 0.0)
            for final, count in sorted(s.tasks_final.items()):
                tasks.add_metric([channel, final], count)
            on_air.add_metric([channel], 1.0 if s.on_air_task else 0.0)
            if s.stream is not None:
                for key, value in dataclasses.asdict(s.stream).items():
                    fmt.add_metric([channel, key], value)
        yield from (state, tasks, on_air, fmt)
        yield from _output_families(by_channel)
        info = GaugeMetricFamily("latentsync_engine_info", "1, labelled with the engine's name.", labels=["engine"])
        info.add_metric([server.engine], 1.0)
        yield info
        yield GaugeMetricFamily(
            "latentsync_engine_broken",
            "1 when the worker pool cannot load its engine.",
            value=1.0 if server.engine_error else 0.0,
        )
        yield from _pool_families(server)
        fps = GaugeMetricFamily("latentsync_generation_fps", "Frames generated per second of chunk wall time.")
        fps.add_metric([], self._generation_fps())
        yield fps


def _output_families(by_channel: list[tuple[str, HealthSnapshot]]) -> Iterator:
    """Each output of each channel (docs/outputs.md), labelled ``channel`` and ``output``."""
    labels = ["channel", "output"]
    state = GaugeMetricFamily(
        "latentsync_output_state", "1 for the state an output is in.", labels=[*labels, "kind", "state"]
    )
    required = GaugeMetricFamily("latentsync_output_required", "1 for an output the channel needs live.", labels=labels)
    sent = CounterMetricFamily("latentsync_output_bytes", "Bytes an output sent to its destination.", labels=labels)
    frames = CounterMetricFamily("latentsync_output_frames", "Video frames an output sent.", labels=labels)
    restarts = CounterMetricFamily(
        "latentsync_output_restarts", "Times an output's relay was restarted.", labels=labels
    )
    stalls = CounterMetricFamily("latentsync_output_stalls", "Times an output was found stalled.", labels=labels)
    age = GaugeMetricFamily(
        "latentsync_output_last_progress_age_seconds",
        "Seconds since an output's bytes last left (absent before the first).",
        labels=labels,
    )
    for channel, snapshot in by_channel:
        for o in snapshot.outputs:
            key = [channel, o.name]
            for st in OutputState:
                state.add_metric([*key, o.kind, st.value], 1.0 if o.state == st.value else 0.0)
            required.add_metric(key, 1.0 if o.required else 0.0)
            sent.add_metric(key, o.bytes_out)
            frames.add_metric(key, o.frames_out)
            restarts.add_metric(key, o.restarts)
            stalls.add_metric(key, o.stalls)
            if o.last_progress_s is not None:
                age.add_metric(key, o.last_progress_s)
    yield from (state, required, sent, frames, restarts, stalls, age)


def _pool_families(server: HealthSnapshot) -> Iterator:
    """The pool's backend, and one series per worker where the backend tracks workers (Ray actors)."""
    workers = server.workers
    info = GaugeMetricFamily("latentsync_pool_info", "1, labelled with the worker pool's backend.", labels=["backend"])
    info.add_metric([workers.backend if workers is not None else "local"], 1.0)
    yield info
    labels = ["worker", "node"]
    jobs = CounterMetricFamily("latentsync_pool_worker_jobs", "Chunk jobs a worker finished.", labels=labels)
    failures = CounterMetricFamily(
        "latentsync_pool_worker_failures", "Calls lost with a worker (died, node lost, deadline).", labels=labels
    )
    restarts = CounterMetricFamily("latentsync_pool_worker_restarts", "Times a worker was restarted.", labels=labels)
    latency = GaugeMetricFamily(
        "latentsync_pool_worker_latency_seconds",
        "Median seconds, dispatch to result, of a worker's calls.",
        labels=labels,
    )
    ready = GaugeMetricFamily("latentsync_pool_worker_ready", "1 while a worker takes jobs.", labels=labels)
    for actor in workers.actors if workers is not None else ():
        key = [str(actor.index), actor.node]
        jobs.add_metric(key, actor.jobs)
        failures.add_metric(key, actor.failures)
        restarts.add_metric(key, actor.restarts)
        latency.add_metric(key, actor.latency_ms / 1000.0)
        ready.add_metric(key, 1.0 if actor.state == "ready" else 0.0)
    yield from (jobs, failures, restarts, latency, ready)
