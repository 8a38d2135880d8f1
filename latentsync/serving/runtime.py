"""Runtime: builds every long-lived part of the server from one config, owns it, stops it.

Start order: private FIFO directory → idle clip → FFmpegSink → StreamingController.
Stop order is the reverse, and every part is stopped even when an earlier one fails.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from latentsync.config import AppConfig
from latentsync.media.default_avatar import ensure_default_avatar
from latentsync.media.video import load_clip
from latentsync.serving.ffmpeg_sink import FFmpegSink, SinkSettings
from latentsync.serving.mixer import ProgramMixer
from latentsync.serving.streaming import IdleLoop, StreamingController, StreamState

logger = logging.getLogger(__name__)

HEALTH_TICK_STALE_S = 2.0  # /health reports "not streaming" when no tick was handled for this long
SINK_START_TIMEOUT_S = 5.0  # the clock starts once FFmpeg is launched (or after this many seconds)


class Runtime:
    """Owns the stream: idle loop, StreamingController and FFmpegSink.

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
        self._created_monotonic = time.monotonic()
        self.stream_size: tuple[int, int] | None = None

    @property
    def work_dir(self) -> Path | None:
        """Private temporary directory (mode 0700) holding the FIFOs, or None when not running."""
        return self._work_dir

    def start(self) -> None:
        """Decode the idle avatar and start streaming. Safe to call twice.

        Raises:
            latentsync.media.MediaProbeError: If the idle video cannot be decoded.
        """
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
        cfg = self.config
        idle_path = cfg.avatar.idle_video or ensure_default_avatar(cfg.avatar.cache_dir)
        size = (cfg.stream.width, cfg.stream.height) if cfg.stream.width else None
        t = time.monotonic()
        clip = load_clip(
            idle_path, cfg.stream.fps, cfg.stream.audio_sample_rate, size, with_audio=cfg.stream.idle_audio
        )
        self.stream_size = clip.size
        logger.info(
            "idle clip %s: %d frames at %d fps, %dx%d, audio %s (decoded in %.1f s)",
            Path(idle_path).name, clip.num_frames, clip.fps, *clip.size,
            "on" if clip.audio is not None else "off", time.monotonic() - t,
        )  # fmt: skip
        self._work_dir = Path(tempfile.mkdtemp(prefix="latentsync-rt-"))  # mkdtemp makes it 0700
        s = cfg.stream
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
        self._controller = StreamingController(
            self._mixer,
            self._sink, fps=s.fps, sample_rate_hz=s.audio_sample_rate, max_catchup_s=s.max_catchup_s,
        )  # fmt: skip
        self._sink.start()
        if not self._sink.wait_accepting(SINK_START_TIMEOUT_S):
            logger.warning("ffmpeg not accepting after %.0f s; the clock starts anyway", SINK_START_TIMEOUT_S)
        self._controller.start()

    def stop(self) -> None:
        """Stop the controller, flush and stop FFmpeg, remove the FIFO directory. Safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._controller is not None:
            self._controller.close()
        if self._sink is not None:
            self._sink.close()
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
        logger.info("runtime stopped")

    @property
    def controller(self) -> StreamingController | None:
        """The StreamingController, once started."""
        return self._controller

    @property
    def sink(self) -> FFmpegSink | None:
        """The FFmpegSink, once started."""
        return self._sink

    def health(self) -> tuple[bool, dict]:
        """Stream health for ``GET /health``.

        Returns:
            ``(streaming, body)``: streaming is True when the clock ticks and FFmpeg is up;
            body is a JSON-ready dict (state, frames emitted, late/dropped ticks, FFmpeg restarts,
            uptime in seconds). The RTMP URL is never included.
        """
        uptime_s = round(time.monotonic() - self._created_monotonic, 3)
        body: dict = {"state": StreamState.STARTING.value, "uptime_s": uptime_s}
        if self._stopped:
            body["state"] = StreamState.STOPPED.value
        if self._controller is None or self._sink is None:
            return False, body
        c = self._controller.stats()
        k = self._sink.stats()
        body.update(
            state=c.state.value,
            frames_emitted=c.frames_emitted,
            ticks=c.ticks,
            late_ticks=c.late_ticks,
            underrun_ticks=self._mixer.underrun_ticks if self._mixer else 0,
            dropped_ticks=c.dropped_ticks,
            max_tick_lateness_ms=round(c.max_lateness_ms, 3),
            ffmpeg_up=k.up,
            ffmpeg_restarts=k.restarts,
            ffmpeg_pid=k.pid,
            ffmpeg_last_error=k.last_error,
            stream={"width": self.stream_size[0], "height": self.stream_size[1], "fps": self.config.stream.fps,
                    "audio_sample_rate": self.config.stream.audio_sample_rate} if self.stream_size else None,
        )  # fmt: skip
        ticking = c.last_tick_monotonic > 0 and time.monotonic() - c.last_tick_monotonic < HEALTH_TICK_STALE_S
        return (ticking and k.up and not self._stopped), body


__all__ = ["Runtime"]
