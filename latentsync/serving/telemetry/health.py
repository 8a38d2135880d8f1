"""The server's typed health snapshot: one frozen value feeds ``GET /health`` and ``GET /metrics``.

:meth:`latentsync.serving.runtime.Runtime.health_snapshot` builds it from the controller, sink, pool,
mixer and task stats; :meth:`HealthSnapshot.to_json` is the ``/health`` body and
:mod:`latentsync.serving.metrics` exports its fields by attribute (a renamed field breaks at import or
in the tests, never silently as a 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from latentsync.serving.egress.frames import FramesHealth
from latentsync.serving.egress.outputs import OutputHealth
from latentsync.serving.egress.whep import WebRtcHealth


@dataclass(frozen=True)
class StreamFormat:
    """The output stream's format.

    Attributes:
        width: Frame width in pixels.
        height: Frame height in pixels.
        fps: Frames per second.
        audio_sample_rate: Audio rate in Hz.
    """

    width: int
    height: int
    fps: int
    audio_sample_rate: int


@dataclass(frozen=True, kw_only=True)
class WorkersHealth:
    """The engine worker pool (see :class:`latentsync.serving.workers.PoolStats`).

    Attributes:
        count: Worker processes.
        pids: Their process ids.
        rebuilds: Pool rebuilds after a dead or hung worker.
        in_flight: Jobs running in a worker.
        queued: Jobs waiting in the pool's priority queue.
        retried: Jobs resubmitted after a failure.
        failed: Jobs that failed for good.
        completed: Jobs finished.
        dispatches: Calls sent to workers.
        backend: ``local`` (processes on this host) or ``ray`` (actors on a Ray cluster).
        actors: Per-worker figures where the backend tracks them (Ray: node, pid, state, jobs,
            failures, restarts, median latency in ms; see
            :class:`latentsync.serving.compute.ray_worker_pool.ActorStats`); empty for ``local``.
    """

    count: int
    pids: tuple[int, ...]
    rebuilds: int
    in_flight: int
    queued: int
    retried: int
    failed: int
    completed: int
    dispatches: int
    backend: str = "local"
    actors: tuple = ()


@dataclass(frozen=True, kw_only=True)
class HealthSnapshot:
    """Everything ``/health`` reports and ``/metrics`` exports, at one moment.

    Attributes:
        state: Stream state on air (``starting``, ``idle``, ``fade_in``, ``speaking``, ``fade_out``,
            ``stopped``).
        uptime_s: Seconds since the runtime was built.
        ticking: The output clock handled a tick recently (liveness).
        streaming: Ticking, the encoders up, every required output live and not stopping (the plain
            ``/health`` answer; docs/architecture.md "Health").
        frames_emitted: Ticks whose frame and audio every encoder took.
        ticks: Ticks the clock handled.
        late_ticks: Ticks handled more than half a frame late.
        dropped_ticks: Ticks an encoder refused (down, restarting or behind): not encoded (the
            taps still showed them).
        underrun_ticks: Ticks that held the last frame because a chunk was late.
        tick_errors: Ticks on which the mixer, the sink or a tick observer raised (logged, throttled;
            the clock went on).
        programs_failed: Programs the mixer dropped because making their tick raised (their tasks failed).
        max_tick_lateness_ms: Worst tick lateness in milliseconds.
        ffmpeg_up: Every encoder FFmpeg runs with both FIFOs open.
        ffmpeg_restarts: Encoder FFmpeg processes restarted.
        ffmpeg_pid: The (first) encoder FFmpeg's pid, or None.
        ffmpeg_last_error: What an encoder FFmpeg last printed before exiting.
        outputs: Every output's state and counters (:class:`OutputHealth`), in the channel's order.
        engine: Engine name.
        engine_ready: Uploads are accepted and the worker pool is not broken (readiness).
        engine_error: Why the engine cannot serve (a rebuilt worker could not load), or None.
        on_air_task: Id of the task on air, or None.
        stream: The output format, once known.
        workers: The worker pool, once started.
        webrtc: WHEP egress counters, when ``webrtc.enabled``.
        frames: Frames WebSocket egress counters, when ``frames.enabled``.
        playlist: Programs waiting in the mixer's playlist.
        tasks_waiting: Tasks accepted and not on air yet.
        tasks_admitted: Unfinished tasks admitted to generate (on air + ``tasks.generate_ahead``).
        tasks_final: Tasks ended since start, by final state (``done``, ``failed``, ``cancelled``).
    """

    state: str
    uptime_s: float
    ticking: bool = False
    streaming: bool = False
    frames_emitted: int = 0
    ticks: int = 0
    late_ticks: int = 0
    dropped_ticks: int = 0
    underrun_ticks: int = 0
    tick_errors: int = 0
    programs_failed: int = 0
    max_tick_lateness_ms: float = 0.0
    ffmpeg_up: bool = False
    ffmpeg_restarts: int = 0
    ffmpeg_pid: int | None = None
    ffmpeg_last_error: str = ""
    outputs: tuple[OutputHealth, ...] = ()
    engine: str = ""
    engine_ready: bool = False
    engine_error: str | None = None
    on_air_task: str | None = None
    stream: StreamFormat | None = None
    workers: WorkersHealth | None = None
    webrtc: WebRtcHealth | None = None
    frames: FramesHealth | None = None
    playlist: int = 0
    tasks_waiting: int = 0
    tasks_admitted: int = 0
    tasks_final: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The ``GET /health`` body: every field by name (``workers``/``webrtc``/``frames`` left out while absent)."""
        body = dataclasses.asdict(self)
        body["outputs"] = list(body["outputs"])
        if self.webrtc is None:
            del body["webrtc"]
        if self.frames is None:
            del body["frames"]
        if self.workers is None:
            del body["workers"]
        else:
            body["workers"]["pids"] = list(self.workers.pids)
        return body
