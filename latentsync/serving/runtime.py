"""Runtime: builds every long-lived part of the server from one config, owns it, stops it.

Start order: private work directory → idle clip → FFmpegSink → StreamingController (the stream is
on air from here) → prepared avatar → WorkerPool → TaskManager (uploads accepted from here).
Stop order is the reverse, and every part is stopped even when an earlier one fails.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soxr

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.config import AppConfig, EngineName
from latentsync.engines import ENGINE_SAMPLE_RATE_HZ
from latentsync.media.audio import decode_untrusted_audio
from latentsync.media.default_avatar import ensure_default_avatar
from latentsync.media.video import load_clip
from latentsync.serving.events import EventBroadcaster, EventFeed, TappedSink
from latentsync.serving.ffmpeg_sink import FFmpegSink, SinkSettings
from latentsync.serving.health import HealthSnapshot, StreamFormat, WorkersHealth
from latentsync.serving.metrics import ServerMetrics
from latentsync.serving.mixer import ProgramMixer
from latentsync.serving.speech_api import SpeechService
from latentsync.serving.speech_stream import DEFAULT_LOOKAHEAD_FRAMES, LOOKAHEAD_FRAMES
from latentsync.serving.streaming import IdleLoop, StreamingController, StreamState
from latentsync.serving.systemd import Watchdog
from latentsync.serving.tasks import TaskAudio, TaskManager
from latentsync.serving.webrtc import WebRtcHub
from latentsync.serving.workers import WorkerPool

logger = logging.getLogger(__name__)

HEALTH_TICK_STALE_S = 2.0  # /health reports "not streaming" when no tick was handled for this long
SINK_START_TIMEOUT_S = 5.0  # the clock starts once FFmpeg is launched (or after this many seconds)


class Runtime:
    """Owns the stream (idle loop, mixer, controller, FFmpeg sink) and the lip-sync side.

    The lip-sync side is the prepared avatar, the worker pool and the task manager.

    Args:
        config: The validated server configuration.
    """

    def __init__(self, config: AppConfig):
        self.config = config
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._work_dir: Path | None = None
        self._upload_root: Path | None = None
        self._sink: FFmpegSink | None = None
        self._controller: StreamingController | None = None
        self._mixer: ProgramMixer | None = None
        self._avatar: Avatar | None = None
        self._pool: WorkerPool | None = None
        self._tasks: TaskManager | None = None
        self._speech: SpeechService | None = None
        self._created_monotonic = time.monotonic()
        self.stream_size: tuple[int, int] | None = None
        self.webrtc: WebRtcHub | None = None  # WHEP egress (webrtc.enabled), once the stream runs
        self.metrics = ServerMetrics(self.health_snapshot)
        self._watchdog = Watchdog(self._clock_alive)
        self.events = EventBroadcaster(config.ui.max_event_clients)  # GET /events subscribers
        self._feed: EventFeed | None = None

    # ----------------------------------------------------------------- accessors
    @property
    def work_dir(self) -> Path | None:
        """Private temporary directory (mode 0700): the FIFOs and ``uploads/``; None when not running.

        Uploads never lie beside the FIFOs: each gets its own folder under ``uploads/`` (see
        :meth:`upload_path`).
        """
        return self._work_dir

    @property
    def controller(self) -> StreamingController | None:
        """The StreamingController, once started."""
        return self._controller

    @property
    def sink(self) -> FFmpegSink | None:
        """The FFmpegSink, once started."""
        return self._sink

    @property
    def mixer(self) -> ProgramMixer | None:
        """The ProgramMixer, once started."""
        return self._mixer

    @property
    def pool(self) -> WorkerPool | None:
        """The WorkerPool, once started."""
        return self._pool

    @property
    def tasks(self) -> TaskManager | None:
        """The TaskManager; None until the engine is ready (uploads get 503 until then)."""
        return None if self._stopped else self._tasks

    @property
    def speech(self) -> SpeechService | None:
        """Streamed speech (``/ws/speech``, ``/speak``); None until the engine is ready."""
        return None if self._stopped else self._speech

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start streaming the idle avatar, then prepare the engine side. Safe to call twice.

        Raises:
            latentsync.media.MediaProbeError: If a video cannot be decoded.
            latentsync.avatar.FaceNotFoundError: If the base video has too few faces.
            latentsync.serving.workers.WorkerPoolError: If the engine workers cannot start (for
                example a missing checkpoint file; the message names it).
        """
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
        self._start_stream()
        if not self._stopped:
            self._start_engine()

    def _start_stream(self) -> None:
        cfg = self.config
        s = cfg.stream
        idle_path = cfg.avatar.idle_video or ensure_default_avatar(cfg.avatar.cache_dir)
        size = (s.width, s.height) if s.width else None
        t = time.monotonic()
        clip = load_clip(idle_path, s.fps, s.audio_sample_rate, size, with_audio=s.idle_audio)
        self.stream_size = clip.size
        logger.info(
            "idle clip %s: %d frames at %d fps, %dx%d, audio %s (decoded in %.1f s)",
            Path(idle_path).name, clip.num_frames, clip.fps, *clip.size,
            "on" if clip.audio is not None else "off", time.monotonic() - t,
        )  # fmt: skip
        self._work_dir = Path(tempfile.mkdtemp(prefix="latentsync-rt-"))  # mkdtemp makes it 0700
        self._upload_root = self._work_dir / "uploads"  # one private folder per upload in here
        self._upload_root.mkdir(mode=0o700)
        self._sink = FFmpegSink(SinkSettings(s, width=clip.size[0], height=clip.size[1]), self._work_dir)
        self._mixer = ProgramMixer(IdleLoop(clip.frames, clip.audio, pingpong=s.idle_pingpong), s.crossfade_frames)
        mixer = self._mixer
        observers = []  # they see every tick the RTMP sink accepted (docs/webrtc.md)
        if cfg.webrtc.enabled:
            self.webrtc = WebRtcHub(cfg.webrtc, s.fps, s.audio_sample_rate, clip.size)
            observers.append(self.webrtc.on_tick)
        self._feed = EventFeed(self.events, lambda: mixer.state, self._tasks_json, lambda: self.health()[1],
                               self._viewer_count, cfg.ui.event_poll_s)  # fmt: skip
        observers.append(self._feed.on_tick)
        if self.webrtc is not None:
            self.webrtc.add_viewer_listener(self._feed.publish_viewers)
        self._controller = StreamingController(
            self._mixer, TappedSink(self._sink, observers), fps=s.fps, sample_rate_hz=s.audio_sample_rate,
            max_catchup_s=s.max_catchup_s,
        )
        self._sink.start()
        if not self._sink.wait_accepting(SINK_START_TIMEOUT_S):
            logger.warning("ffmpeg not accepting after %.0f s; the clock starts anyway", SINK_START_TIMEOUT_S)
        if self.webrtc is not None:
            self.webrtc.start()
        self._feed.start()
        self._controller.start()
        self._watchdog.start()
        if self._stopped:  # stop() ran while this was being built: undo what it could not see
            self._watchdog.close()
            self._feed.close()
            if self.webrtc is not None:
                self.webrtc.close()
            self._controller.close()
            self._sink.close()

    def _tasks_json(self) -> list[dict]:
        tasks = self.tasks
        return [t.to_json() for t in tasks.list()] if tasks else []

    def _viewer_count(self) -> int:
        return self.webrtc.stats().viewers if self.webrtc is not None else 0

    def _clock_alive(self) -> bool:
        c = self._controller.stats() if self._controller is not None else None
        if c is None or c.last_tick_monotonic == 0:
            return False
        return time.monotonic() - c.last_tick_monotonic < HEALTH_TICK_STALE_S

    def _start_engine(self) -> None:
        cfg = self.config
        base_video = cfg.avatar.video or cfg.avatar.idle_video or ensure_default_avatar(cfg.avatar.cache_dir)
        t = time.monotonic()
        avatar = Avatar.prepare(base_video, AvatarSettings(fps=cfg.stream.fps, size=self.stream_size),
                                cache_dir=cfg.avatar.cache_dir)  # fmt: skip
        logger.info("avatar %s: %d frames (%.1f s)", Path(base_video).name, avatar.num_frames, time.monotonic() - t)
        if self._stopped:
            return
        engine = cfg.engine
        devices = _engine_devices(engine.device) if engine.name is EngineName.latentsync else []
        workers = engine.workers or max(1, len([d for d in devices if d.startswith("cuda")]))
        options: dict = {}
        if engine.name is EngineName.latentsync:  # the config section itself (picklable), no copy of it
            options = {"config": engine.latentsync, "device": devices[0] if devices else None}
        t = time.monotonic()
        pool = WorkerPool(engine.name.value, options, avatar.path, workers, devices=devices,
                          on_chunk_done=self.metrics.observe_chunk, max_batch=engine.max_batch_chunks)  # fmt: skip
        self._pool = pool
        pool.start()
        if self._stopped:  # stop() ran while the workers were loading: it may have missed them
            pool.close()
            return
        logger.info("%d %s engine worker(s) ready (%.1f s)", workers, engine.name.value, time.monotonic() - t)
        mixer = self._mixer
        assert mixer is not None
        self._avatar = avatar
        self._tasks = TaskManager(
            pool, avatar, self._mixer.enqueue, self._mixer.interrupt, lambda: mixer.ticks, fps=cfg.stream.fps,
            sample_rate_hz=cfg.stream.audio_sample_rate, max_queued=cfg.api.max_queued,
            deadline_s=engine.chunk_deadline_s, tail_frames=cfg.stream.crossfade_frames,
            on_ttff=self.metrics.observe_ttff, generate_ahead=cfg.tasks.generate_ahead,
        )  # fmt: skip
        lookahead = LOOKAHEAD_FRAMES.get(engine.name.value, DEFAULT_LOOKAHEAD_FRAMES)
        self._speech = SpeechService.from_config(self._tasks, cfg, lookahead)

    def stop(self) -> None:
        """Stop everything in reverse order; FFmpeg flushes; temp files go. Safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True  # from here uploads get 503
        self._fade_out_speech()
        steps = [
            ("watchdog", self._watchdog.close),
            ("speech", self._speech.close if self._speech else None),
            ("tasks", self._tasks.close if self._tasks else None),
            ("controller", self._controller.close if self._controller else None),
            ("webrtc", self.webrtc.close if self.webrtc else None),
            ("events", self._feed.close if self._feed else None),
            ("ffmpeg", self._sink.close if self._sink else None),
            ("workers", self._pool.close if self._pool else None),
        ]
        for name, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:
                logger.exception("stopping %s failed", name)
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
        logger.info("runtime stopped")

    def _fade_out_speech(self, timeout_s: float = 1.0) -> None:
        """Cut the speech on air with the usual crossfade (not mid-word) before the clock stops."""
        mixer = self._mixer
        if mixer is None or mixer.current_task_id is None or self._controller is None:
            return
        task_id = mixer.current_task_id
        mixer.interrupt(task_id)
        deadline = time.monotonic() + timeout_s
        while mixer.state is not StreamState.IDLE and time.monotonic() < deadline:
            time.sleep(0.02)
        logger.info("task %s faded out for shutdown (stream %s)", task_id, mixer.state.value,
                    extra={"task_id": task_id})  # fmt: skip

    # ----------------------------------------------------------------- uploads
    def upload_path(self) -> Path:
        """A path for one upload, alone in a fresh private directory (caller calls :meth:`discard_upload`).

        The directory (mode 0700) is made for this upload only and holds nothing else, so a file
        that names a sibling (a concat list, a playlist, an MP4 data reference) finds nothing; it
        lives under ``<work_dir>/uploads/``, never beside the stream's FIFOs.

        Returns:
            ``<work_dir>/uploads/u-<random>/upload`` (not yet created).

        Raises:
            RuntimeError: If the runtime is not running.
        """
        if self._upload_root is None:
            raise RuntimeError("runtime not started")
        return Path(tempfile.mkdtemp(prefix="u-", dir=self._upload_root)) / "upload"

    def discard_upload(self, path: Path) -> None:
        """Delete an upload made by :meth:`upload_path` with its directory (never raises)."""
        folder = path.parent
        if self._upload_root is not None and folder.parent == self._upload_root:
            shutil.rmtree(folder, ignore_errors=True)

    def decode_task_audio(self, path: Path, max_duration_s: float) -> TaskAudio:
        """Decode an upload for a task: at the stream rate (on air) and at 16 kHz (engine).

        One FFmpeg decode at the stream rate; the 16 kHz copy is resampled in-process with soxr
        (saves a second FFmpeg start on the time-to-first-frame path).

        Args:
            path: The uploaded file.
            max_duration_s: Decode at most this many seconds (the caller checks the length).

        Returns:
            The :class:`TaskAudio`.

        Raises:
            latentsync.media.audio.MediaDecodeTimeout: If decoding ran past ``api.decode_timeout_s``.
            latentsync.media.MediaProbeError: If FFmpeg finds no decodable audio in an allowed format
                (:data:`latentsync.media.audio.UPLOAD_FORMATS`).
        """
        rate = self.config.stream.audio_sample_rate
        stream = decode_untrusted_audio(path, rate, max_duration_s=max_duration_s,
                                        timeout_s=self.config.api.decode_timeout_s)  # fmt: skip
        engine = soxr.resample(stream.astype(np.float32) / 32768.0, rate, ENGINE_SAMPLE_RATE_HZ, quality="HQ")
        return TaskAudio(stream, np.ascontiguousarray(engine, dtype=np.float32), rate)

    # ----------------------------------------------------------------- health and metrics
    def health_snapshot(self) -> HealthSnapshot:
        """The typed health of every part, at this moment (cheap; ``/health`` and every metrics scrape)."""
        uptime_s = round(time.monotonic() - self._created_monotonic, 3)
        state = StreamState.STOPPED if self._stopped else StreamState.STARTING
        pool, tasks, mixer = self._pool, self.tasks, self._mixer
        engine = dict(
            engine=self.config.engine.name.value,
            engine_ready=tasks is not None and pool is not None and pool.ready(),
            engine_error=pool.broken if pool is not None else None,
            playlist=mixer.pending() if mixer else 0,
            tasks_waiting=tasks.waiting() if tasks else 0,
            tasks_admitted=tasks.admitted() if tasks else 0,
            tasks_final=tasks.final_counts() if tasks else {},
        )
        if self.webrtc is not None:
            engine["webrtc"] = self.webrtc.stats()
        if pool is not None:
            p = pool.stats()
            engine["workers"] = WorkersHealth(
                count=p.workers, pids=tuple(pool.worker_pids()), rebuilds=p.rebuilds, in_flight=p.in_flight,
                queued=p.queued, retried=p.retried, failed=p.failed, completed=p.completed, dispatches=p.dispatches,
            )  # fmt: skip
        if self._controller is None or self._sink is None:
            return HealthSnapshot(state=state.value, uptime_s=uptime_s, **engine)
        c = self._controller.stats()
        k = self._sink.stats()
        ticking = self._clock_alive()
        size = self.stream_size
        return HealthSnapshot(
            state=state.value if self._stopped else c.state.value,
            uptime_s=uptime_s,
            ticking=ticking,
            streaming=ticking and k.up and not self._stopped,
            frames_emitted=c.frames_emitted,
            ticks=c.ticks,
            late_ticks=c.late_ticks,
            dropped_ticks=c.dropped_ticks,
            underrun_ticks=mixer.underrun_ticks if mixer else 0,
            max_tick_lateness_ms=round(c.max_lateness_ms, 3),
            ffmpeg_up=k.up,
            ffmpeg_restarts=k.restarts,
            ffmpeg_pid=k.pid,
            ffmpeg_last_error=k.last_error,
            on_air_task=mixer.current_task_id if mixer else None,
            stream=StreamFormat(size[0], size[1], self.config.stream.fps, self.config.stream.audio_sample_rate)
            if size else None,
            **engine,
        )  # fmt: skip

    def health(self) -> tuple[bool, dict]:
        """Stream health for ``GET /health``.

        Returns:
            ``(streaming, body)``: streaming is True when the clock ticks and FFmpeg is up; body is
            :meth:`HealthSnapshot.to_json` (the RTMP URL is never included).
        """
        snapshot = self.health_snapshot()
        return snapshot.streaming, snapshot.to_json()


def _engine_devices(device: str | None) -> list[str]:
    """Devices for the workers: the configured one, every visible GPU, or the CPU."""
    if device is not None:
        return [device]
    import torch  # only the latentsync engine needs it in the server process

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]
