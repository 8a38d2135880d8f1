"""Runtime: builds every long-lived part of the server from one config, owns it, stops it.

Start order: private work directory → idle clip → FFmpegSink → StreamingController (the stream is
on air from here) → prepared avatar → WorkerPool → TaskManager (uploads accepted from here).
Stop order is the reverse, and every part is stopped even when an earlier one fails.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soxr

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.config import AppConfig, EngineName
from latentsync.media.audio import decode_audio
from latentsync.media.default_avatar import ensure_default_avatar
from latentsync.media.video import load_clip
from latentsync.serving.events import EventBroadcaster, EventFeed, TappedSink
from latentsync.serving.ffmpeg_sink import FFmpegSink, SinkSettings
from latentsync.serving.metrics import ServerMetrics
from latentsync.serving.mixer import ProgramMixer
from latentsync.serving.streaming import IdleLoop, StreamingController, StreamState
from latentsync.serving.systemd import Watchdog
from latentsync.serving.tasks import TaskAudio, TaskManager
from latentsync.serving.webrtc import WebRtcHub
from latentsync.serving.workers import WorkerPool

logger = logging.getLogger(__name__)

HEALTH_TICK_STALE_S = 2.0  # /health reports "not streaming" when no tick was handled for this long
SINK_START_TIMEOUT_S = 5.0  # the clock starts once FFmpeg is launched (or after this many seconds)
ENGINE_SAMPLE_RATE_HZ = 16000  # engines analyse 16 kHz audio (Whisper's rate)


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
        self._sink: FFmpegSink | None = None
        self._controller: StreamingController | None = None
        self._mixer: ProgramMixer | None = None
        self._avatar: Avatar | None = None
        self._pool: WorkerPool | None = None
        self._tasks: TaskManager | None = None
        self._created_monotonic = time.monotonic()
        self.stream_size: tuple[int, int] | None = None
        self.metrics = ServerMetrics(self.metrics_snapshot)
        self._watchdog = Watchdog(self._clock_alive)
        self.webrtc: WebRtcHub | None = None  # WHEP egress (webrtc.enabled), once the stream runs
        self.events = EventBroadcaster(config.ui.max_event_clients)  # GET /events subscribers
        self._feed: EventFeed | None = None

    # ----------------------------------------------------------------- accessors
    @property
    def work_dir(self) -> Path | None:
        """Private temporary directory (mode 0700): FIFOs and uploads; None when not running."""
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
        settings = SinkSettings(
            rtmp_url=s.rtmp_url, width=clip.size[0], height=clip.size[1], fps=s.fps,
            sample_rate_hz=s.audio_sample_rate, audio_channels=s.audio_channels,
            video_bitrate_kbps=s.video_bitrate_kbps, audio_bitrate_kbps=s.audio_bitrate_kbps,
            x264_preset=s.x264_preset, keyframe_interval_s=s.keyframe_interval_s,
            queue_frames=max(2, round(s.sink_queue_s * s.fps)),
            backoff_min_s=s.restart_backoff_min_s, backoff_max_s=s.restart_backoff_max_s,
            record_path=s.record_path,
        )  # fmt: skip
        self._sink = FFmpegSink(settings, self._work_dir)
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
        if engine.name is EngineName.latentsync:
            ls = engine.latentsync
            options = {
                "unet_path": ls.unet_path, "unet_config": ls.unet_config, "whisper_path": ls.whisper_path,
                "vae_path": ls.vae_path, "scheduler_config": ls.scheduler_config, "dtype": ls.dtype.value,
                "inference_steps": ls.inference_steps, "guidance_scale": ls.guidance_scale, "seed": ls.seed,
                "compile": ls.compile, "device": devices[0] if devices else None,
            }  # fmt: skip
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
            on_ttff=self.metrics.observe_ttff,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop everything in reverse order; FFmpeg flushes; temp files go. Safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True  # from here uploads get 503
        self._fade_out_speech()
        steps = [
            ("watchdog", self._watchdog.close),
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
    def upload_path(self, suffix: str = ".upload") -> Path:
        """A fresh, private temporary file path for an upload (caller deletes it).

        Raises:
            RuntimeError: If the runtime is not running.
        """
        if self._work_dir is None:
            raise RuntimeError("runtime not started")
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=self._work_dir)
        os.close(fd)
        return Path(name)

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
            latentsync.media.MediaProbeError: If FFmpeg finds no decodable audio.
        """
        rate = self.config.stream.audio_sample_rate
        stream = decode_audio(path, rate, max_duration_s=max_duration_s)
        engine = soxr.resample(stream.astype(np.float32) / 32768.0, rate, ENGINE_SAMPLE_RATE_HZ, quality="HQ")
        return TaskAudio(stream, np.ascontiguousarray(engine, dtype=np.float32), rate)

    # ----------------------------------------------------------------- health and metrics
    def metrics_snapshot(self) -> dict:
        """Current counters for the metrics collector (cheap; called at every scrape)."""
        _, h = self.health()
        pool = self._pool.stats() if self._pool is not None else None
        tasks = self.tasks
        return {
            **{k: h.get(k, 0) for k in ("frames_emitted", "late_ticks", "dropped_ticks", "underrun_ticks",
                                        "ffmpeg_restarts")},
            "state": h.get("state"),
            "ffmpeg_up": h.get("ffmpeg_up", False),
            "engine_ready": h.get("engine_ready", False),
            "worker_rebuilds": pool.rebuilds if pool else 0,
            "chunks_retried": pool.retried if pool else 0,
            "pool_queued": pool.queued if pool else 0,
            "pool_in_flight": pool.in_flight if pool else 0,
            "playlist": self._mixer.pending() if self._mixer else 0,
            "tasks_waiting": tasks.waiting() if tasks else 0,
            "tasks_final": tasks.final_counts() if tasks else {},
        }  # fmt: skip

    def health(self) -> tuple[bool, dict]:
        """Stream health for ``GET /health``.

        Returns:
            ``(streaming, body)``: streaming is True when the clock ticks and FFmpeg is up;
            body is a JSON-ready dict (state, frames emitted, late/dropped/underrun ticks, FFmpeg
            restarts, uptime in seconds, engine readiness). The RTMP URL is never included.
        """
        uptime_s = round(time.monotonic() - self._created_monotonic, 3)
        body: dict = {"state": StreamState.STARTING.value, "uptime_s": uptime_s, "engine_ready": False}
        if self._stopped:
            body["state"] = StreamState.STOPPED.value
        if self._controller is None or self._sink is None:
            return False, body
        c = self._controller.stats()
        k = self._sink.stats()
        mixer = self._mixer
        body.update(
            state=c.state.value,
            frames_emitted=c.frames_emitted,
            ticks=c.ticks,
            late_ticks=c.late_ticks,
            underrun_ticks=mixer.underrun_ticks if mixer else 0,
            dropped_ticks=c.dropped_ticks,
            max_tick_lateness_ms=round(c.max_lateness_ms, 3),
            ffmpeg_up=k.up,
            ffmpeg_restarts=k.restarts,
            ffmpeg_pid=k.pid,
            ffmpeg_last_error=k.last_error,
            engine_ready=self.tasks is not None,
            engine=self.config.engine.name.value,
            on_air_task=mixer.current_task_id if mixer else None,
            stream={"width": self.stream_size[0], "height": self.stream_size[1], "fps": self.config.stream.fps,
                    "audio_sample_rate": self.config.stream.audio_sample_rate} if self.stream_size else None,
        )  # fmt: skip
        if self.webrtc is not None:
            w = self.webrtc.stats()
            body["webrtc"] = {"viewers": w.viewers, "viewers_total": w.viewers_total, "codec": w.codec,
                              "width": w.width, "height": w.height, "frames_encoded": w.frames_encoded,
                              "keyframes": w.keyframes, "inbox_dropped_ticks": w.inbox_dropped_ticks,
                              "viewer_dropped_packets": w.viewer_dropped_packets}  # fmt: skip
        if self._pool is not None:
            p = self._pool.stats()
            body["workers"] = {"count": p.workers, "pids": self._pool.worker_pids(), "rebuilds": p.rebuilds,
                               "in_flight": p.in_flight, "queued": p.queued}  # fmt: skip
        ticking = self._clock_alive()
        body["ticking"] = ticking
        return (ticking and k.up and not self._stopped), body


def _engine_devices(device: str | None) -> list[str]:
    """Devices for the workers: the configured one, every visible GPU, or the CPU."""
    if device is not None:
        return [device]
    import torch  # only the latentsync engine needs it in the server process

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]
