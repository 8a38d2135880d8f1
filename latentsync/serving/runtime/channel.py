"""Channels: one live stream each (idle loop, mixer, clock, FFmpeg push, tasks, WHEP, events).

A :class:`Channel` wires everything of one stream; the :class:`~latentsync.serving.runtime.runtime.Runtime`
owns the channels and ONE :class:`~latentsync.serving.compute.scheduling_pool.WorkerPool` they all share
(docs/channels.md). Every job names its avatar, so the pool's queue is earliest-deadline-first over
every channel's jobs, all on the same ``time.monotonic()`` clock: a channel's chunk due on air soon
runs before another channel's chunk due later, whatever the uploads' lengths.

Phases (:class:`ChannelState`, the state-machine style of tasks): ``created`` → ``starting``
(private work directory → idle clip → EgressSink (encoders, outputs) → StreamingController: on air
from here →
prepared avatar) → ``ready`` (its TaskManager on the shared pool: uploads and streamed speech
accepted) → ``stopping`` → ``stopped``; a start that fails ends ``failed`` (what of it ran is
stopped). Stop order is the reverse of start, every part stopped even when an earlier one fails.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.config import AppConfig, OutputTarget, channel_outputs, engine_face_size
from latentsync.media.default_avatar import ensure_default_avatar
from latentsync.media.framing import capped_size
from latentsync.media.probe import probe_media
from latentsync.media.video import VIDEO_FORMATS, ClipLimits, VideoClip, check_clip_limits, display_size
from latentsync.serving.compute.scheduling_pool import SchedulingPool
from latentsync.serving.core.errors import public_reason
from latentsync.serving.core.states import StateMachine, check_table
from latentsync.serving.egress.frames import FramesHub
from latentsync.serving.egress.sink import EgressSink
from latentsync.serving.egress.whep import WebRtcHub
from latentsync.serving.playout.clock import StreamingController
from latentsync.serving.playout.idle import IdleLoop
from latentsync.serving.playout.mixer import ProgramMixer
from latentsync.serving.playout.state import StreamState
from latentsync.serving.playout.tap import TappedSink, TickObserver
from latentsync.serving.runtime.clips import AvatarPreparations, ClipCache, clip_limits
from latentsync.serving.tasks.task_manager import TaskManager, TaskSettings
from latentsync.serving.telemetry.events import EventBroadcaster, EventFeed
from latentsync.serving.telemetry.health import HealthSnapshot, StreamFormat, WorkersHealth

logger = logging.getLogger(__name__)

HEALTH_TICK_STALE_S = 2.0  # /health reports "not streaming" when no tick was handled for this long
SINK_START_TIMEOUT_S = 5.0  # the clock starts once the encoders are launched (or after this many seconds)


def own_size(video: str | Path, max_side: int, fps: int, limits: ClipLimits) -> tuple[int, int] | None:
    """The size of a channel without a configured one (docs/channels.md).

    None (the video's own size), or the video's aspect ratio with the longest side ``max_side``
    (``stream.max_side``) when it is larger. The video's own size must fit ``limits`` (pixel rate
    among them) before anything is decoded: a source too large to decode is refused, not scaled.

    Raises:
        latentsync.media.MediaProbeError: If the video cannot be probed or decoded.
        latentsync.media.video.MediaLimitError: If it is over one of ``limits`` at its own size.
    """
    info = probe_media(video, formats=VIDEO_FORMATS)
    check_clip_limits(info, fps, None, limits, "idle video")
    if max(info.width, info.height) <= max_side:
        return None
    return capped_size(display_size(video, (info.width, info.height)), max_side)


def avatar_settings(config: AppConfig, size: tuple[int, int] | None) -> AvatarSettings:
    """How a channel prepares its base video: at its fps and ``size``, framed as ``avatar.fit`` says.

    Its aligned faces are of the engine's size (:func:`latentsync.config.engine_face_size`: 512 for
    LatentSync 1.6, else 256), as the avatar store's uploads are, so both find the same cache folder.
    """
    a = config.avatar
    return AvatarSettings(
        fps=config.stream.fps,
        size=size,
        min_face_fraction=a.min_face_fraction,
        fit=a.fit,
        background=a.background,
        face_fraction=a.face_fraction,
        min_face_px=a.min_face_px,
        face_size=engine_face_size(config.engine),
    )


class ChannelState(str, enum.Enum):
    """Phases of a channel (``status`` in ``GET /channels``)."""

    created = "created"
    starting = "starting"
    ready = "ready"
    failed = "failed"
    stopping = "stopping"
    stopped = "stopped"


#: The moves of a channel's phase; ``stopped`` is final.
CHANNEL_MOVES: dict[ChannelState, frozenset[ChannelState]] = {
    ChannelState.created: frozenset({ChannelState.starting, ChannelState.failed, ChannelState.stopping}),
    ChannelState.starting: frozenset({ChannelState.ready, ChannelState.failed, ChannelState.stopping}),
    ChannelState.ready: frozenset({ChannelState.stopping}),
    ChannelState.failed: frozenset({ChannelState.stopping}),
    ChannelState.stopping: frozenset({ChannelState.stopped}),
    ChannelState.stopped: frozenset(),
}
check_table(ChannelState, CHANNEL_MOVES)


class SwitchState(str, enum.Enum):
    """Phases of an avatar switch (``switch.state`` in ``GET /channels/<name>``)."""

    preparing = "preparing"
    waiting_for_idle = "waiting_for_idle"
    done = "done"
    failed = "failed"


#: The moves of an avatar switch; a newer switch replaces one still running (its own machine).
SWITCH_MOVES: dict[SwitchState, frozenset[SwitchState]] = {
    SwitchState.preparing: frozenset({SwitchState.waiting_for_idle, SwitchState.failed}),
    SwitchState.waiting_for_idle: frozenset({SwitchState.done, SwitchState.failed}),
    SwitchState.done: frozenset(),
    SwitchState.failed: frozenset(),
}
check_table(SwitchState, SWITCH_MOVES)


class Channel:
    """One live stream and its tasks; the worker pool is the runtime's, shared.

    Args:
        name: The channel's name (``main`` for the top-level ``stream``/``avatar`` keys).
        config: The channel's configuration (:func:`latentsync.config.channel_configs`): its
            ``stream`` and ``avatar`` sections are this channel's.
        on_ttff: Called with each task's time to first frame in seconds (metrics), or None.
        clips: Decoded idle clips shared with the other channels (None: decode its own).
        preparations: Avatar preparations shared with the other channels (None: its own).
        engine_waiting: Why the shared engine is not started yet (a cluster unreachable at start,
            retried), or None; ``/health`` reports it as ``engine_error`` until the pool runs.
    """

    def __init__(
        self,
        name: str,
        config: AppConfig,
        *,
        on_ttff: Callable[[float], None] | None = None,
        clips: ClipCache | None = None,
        preparations: AvatarPreparations | None = None,
        engine_waiting: Callable[[], str | None] | None = None,
    ):
        self.name = name
        self._engine_waiting = engine_waiting or (lambda: None)
        self.config = config
        self._on_ttff = on_ttff
        self._clips = clips or ClipCache()
        self._preparations = preparations or AvatarPreparations()
        self._clip: VideoClip | None = None  # held while the channel lives (the cache's entries are weak)
        self._machine = StateMachine(ChannelState.created, CHANNEL_MOVES, f"channel {name}")
        self._work_dir: Path | None = None
        self._upload_root: Path | None = None
        self.sink: EgressSink | None = None  # the encoders and outputs, once the stream runs
        self.controller: StreamingController | None = None
        self._tap: TappedSink | None = None  # the sink with the tick observers, as the clock sees it
        self.mixer: ProgramMixer | None = None
        self.avatar: Avatar | None = None
        self.pool: SchedulingPool | None = None
        self._tasks: TaskManager | None = None
        self.stream_size: tuple[int, int] | None = None
        self.webrtc: WebRtcHub | None = None  # WHEP egress (webrtc.enabled), once the stream runs
        self.frames: FramesHub | None = None  # frames WebSocket egress (frames.enabled), once the stream runs
        self.events = EventBroadcaster(config.ui.max_event_clients, config.ui.event_queue_events)  # GET /events
        self._feed: EventFeed | None = None
        self._created_monotonic = time.monotonic()
        self._stop_event = threading.Event()
        self._release_lock = threading.Lock()  # close()/fail() and a start() still running both release
        self._switch_lock = threading.Lock()
        self._switch: tuple[StateMachine[SwitchState], str] | None = None  # the last avatar switch and its label
        self._switch_generation = 0  # a newer PUT supersedes a switch still waiting
        self._pending_avatar: tuple[Avatar, Path] | None = None  # prepared for a switch not yet made
        # (generation, videos) of the switch under way: in use from the PUT on, so an avatar cannot
        # be deleted while it is being prepared for this channel (issue 35)
        self._switch_videos: tuple[int, list[Path]] | None = None
        self._outputs_were_live = False  # every required output has been live at least once (reported_status)

    # ----------------------------------------------------------------- accessors
    @property
    def created_monotonic(self) -> float:
        """When this channel was built (``time.monotonic()`` seconds): its objects are at least that old."""
        return self._created_monotonic

    @property
    def work_dir(self) -> Path | None:
        """Private temporary directory (mode 0700): the FIFOs and ``uploads/``; None when not running."""
        return self._work_dir

    @property
    def state(self) -> ChannelState:
        """The channel's phase."""
        return self._machine.state

    @property
    def error(self) -> str | None:
        """Why it failed (``failed``), else None."""
        return self._machine.reason if ChannelState.failed in self._machine.history else None

    @property
    def tasks(self) -> TaskManager | None:
        """The TaskManager while ``ready``; None before (uploads get 503 until then), once failed or closing."""
        return self._tasks if self._machine.state is ChannelState.ready else None

    @property
    def stopped(self) -> bool:
        """True once it failed or :meth:`close` began: it will not take work any more."""
        return self._machine.state in (ChannelState.failed, ChannelState.stopping, ChannelState.stopped)

    @property
    def ready(self) -> bool:
        """True while its stream is on air (starting with its clock running, or ready): the watchdog counts it."""
        return self.controller is not None and self._machine.state in (ChannelState.starting, ChannelState.ready)

    @property
    def status(self) -> str:
        """The phase's name: ``created``, ``starting``, ``ready``, ``failed``, ``stopping``, ``stopped``."""
        return self._machine.state.value

    def fail(self, reason: str) -> None:
        """Mark the channel failed (it could not start) and stop what of it runs; it stays listed as failed.

        Only a channel that is ``created`` or ``starting`` can fail; on a channel already closing
        (or ready, or failed) this does nothing.
        """
        if self._machine.move(ChannelState.failed, reason, quiet=True) is None:
            return  # closing or closed meanwhile: close() releases what runs
        self._stop_event.set()
        self._shutdown()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Put the idle loop on air: idle clip, egress (encoders, outputs), mixer, WHEP hub, events feed, clock.

        A :meth:`close` or :meth:`fail` that runs meanwhile (from another thread) wins: what this
        call built after that moment is released before it returns, so nothing of the channel
        outlives it (FFmpeg, threads, the work directory).

        Raises:
            latentsync.media.MediaProbeError: If the idle video cannot be decoded.
        """
        if self._machine.move(ChannelState.starting, quiet=True) is None:
            return  # closed before it started
        try:
            self._build_stream()
        finally:
            if self.stopped:  # close() or fail() ran while this was being built: undo what it could not see
                self._release()

    def _build_stream(self) -> None:
        cfg = self.config
        s = cfg.stream
        idle_path = cfg.avatar.idle_video or cfg.avatar.video or ensure_default_avatar(cfg.avatar.cache_dir)
        size = (s.width, s.height) if s.width and s.height else own_size(idle_path, s.max_side, s.fps, clip_limits(cfg))
        t = time.monotonic()
        a = cfg.avatar
        clip = self._clips.load(
            idle_path,
            s.fps,
            s.audio_sample_rate,
            size,
            s.idle_audio,
            clip_limits(cfg),
            a.fit,
            a.background,
            a.face_fraction,
            a.min_face_px,
        )
        self._clip = clip
        self.stream_size = clip.size
        logger.info(
            "channel %s: idle clip %s: %d frames at %d fps, %dx%d, audio %s (decoded in %.1f s)",
            self.name,
            Path(idle_path).name,
            clip.num_frames,
            clip.fps,
            *clip.size,
            "on" if clip.audio is not None else "off",
            time.monotonic() - t,
        )
        if self.stopped:
            return
        self._work_dir = Path(tempfile.mkdtemp(prefix=f"latentsync-rt-{self.name}-"))  # mkdtemp makes it 0700
        self._upload_root = self._work_dir / "uploads"  # one private folder per upload in here
        self._upload_root.mkdir(mode=0o700)
        self.sink = EgressSink(
            s,
            egress=cfg.egress,
            width=clip.size[0],
            height=clip.size[1],
            outputs=channel_outputs(cfg),
            work_dir=self._work_dir,
            channel=self.name,
        )
        # the playlist holds the tasks not yet on air, which api.max_queued bounds (twice that: programs of
        # tasks cancelled since the last tick still count until it drops them)
        self.mixer = ProgramMixer(
            IdleLoop(clip.frames, clip.audio, pingpong=s.idle_pingpong),
            s.crossfade_frames,
            max_programs=2 * cfg.api.max_queued,
        )
        mixer = self.mixer
        observers: list[
            TickObserver
        ] = []  # they see every tick the mixer made, whatever the outputs do (docs/outputs.md)
        if cfg.webrtc.enabled:
            self.webrtc = WebRtcHub(cfg.webrtc, s.fps, s.audio_sample_rate, clip.size)
            observers.append(self.webrtc.on_tick)
        if cfg.frames.enabled:
            self.frames = FramesHub(
                cfg.frames,
                fps=s.fps,
                sample_rate_hz=s.audio_sample_rate,
                frame_size=clip.size,
                on_air=lambda: (mixer.state.value, mixer.tick_task_id),
            )
            observers.append(self.frames.on_tick)
        self._feed = EventFeed(
            self.events,
            state=lambda: mixer.state,
            tasks=self._tasks_json,
            health=lambda: self.health()[1],
            viewers=self._viewer_count,
            poll_s=cfg.ui.event_poll_s,
        )
        observers.append(self._feed.on_tick)
        if self.webrtc is not None:
            self.webrtc.add_viewer_listener(self._feed.publish_viewers)
        self._tap = TappedSink(self.sink, observers)
        self.controller = StreamingController(
            self.mixer,
            self._tap,
            fps=s.fps,
            sample_rate_hz=s.audio_sample_rate,
            max_catchup_s=s.max_catchup_s,
            nice=s.clock_nice,
            rt_priority=s.clock_rt_priority,
        )
        with self._release_lock:  # a part is started only while close() cannot be releasing the parts
            if self.stopped:
                return
            self.sink.start()
        if not self.sink.wait_accepting(SINK_START_TIMEOUT_S) and not self.stopped:
            logger.warning(
                "channel %s: ffmpeg not accepting after %.0f s; the clock starts anyway",
                self.name,
                SINK_START_TIMEOUT_S,
            )
        with self._release_lock:
            if self.stopped:
                return
            if self.webrtc is not None:
                self.webrtc.start()
            if self.frames is not None:
                self.frames.start()
            self._feed.start()
            self.controller.start()

    def prepare_avatar(self) -> Avatar:
        """Prepare (or load from the cache) the channel's base video as an avatar at the stream's size.

        Waits for a preparation of the same video that another channel runs (:class:`AvatarPreparations`).

        Raises:
            latentsync.media.MediaProbeError: If the base video cannot be decoded.
            latentsync.avatar.FaceNotFoundError: If the base video has too few faces.
            latentsync.serving.runtime.clips.PreparationCancelled: If the channel closed meanwhile.
        """
        cfg = self.config
        base_video = cfg.avatar.video or cfg.avatar.idle_video or ensure_default_avatar(cfg.avatar.cache_dir)
        t = time.monotonic()
        avatar = self._preparations.prepare(
            base_video, self._avatar_settings(), cfg.avatar.cache_dir, lambda: self.stopped, clip_limits(cfg)
        )
        logger.info(
            "channel %s: avatar %s: %d frames (%.1f s)",
            self.name,
            Path(base_video).name,
            avatar.num_frames,
            time.monotonic() - t,
        )
        self.avatar = avatar
        return avatar

    def _avatar_settings(self) -> AvatarSettings:
        cfg = self.config
        return avatar_settings(cfg, self.stream_size)

    # ----------------------------------------------------------------- avatar switch
    def switch_avatar(self, config: AppConfig, label: str, on_done: Callable[[], None] | None = None) -> None:
        """Put another avatar on this channel at its next idle moment (``PUT /channels/<name>``).

        In a background thread: decode the new idle video and prepare the new base video at the
        channel's size and fps (cached), then wait until no task of the channel is unfinished;
        at that moment tasks accepted from then on use the new avatar and the mixer crossfades
        from the old idle loop to the new one (:meth:`ProgramMixer.switch_idle`). Speech on air
        or queued is never cut: it plays with the avatar it was generated for. A failure (no face,
        undecodable video) leaves the old avatar on air and is reported in :meth:`describe`
        (``switch.state`` ``failed``). A later call supersedes a switch that is still waiting.

        Args:
            config: The channel's configuration with the new ``avatar`` section (same stream format).
            label: What the switch names in :meth:`describe` (an avatar id or a file name).
            on_done: Called (in the switch's thread) once the new avatar is on air, or None.

        Raises:
            RuntimeError: If the channel does not take uploads yet (starting), failed or stopped.
        """
        if self._machine.state is not ChannelState.ready or self.pool is None:
            raise RuntimeError(f"channel {self.name} is {self.status}; an avatar can be switched once it is ready")
        with self._switch_lock:
            self._switch_generation += 1
            generation = self._switch_generation
            machine = StateMachine(SwitchState.preparing, SWITCH_MOVES, f"channel {self.name} avatar switch")
            self._switch = (machine, label)
            videos = [Path(p) for p in (config.avatar.idle_video, config.avatar.video) if p]
            self._switch_videos = (generation, videos)
        threading.Thread(
            target=self._run_switch,
            args=(config, generation, on_done),
            name=f"channel-{self.name}-switch",
            daemon=True,
        ).start()

    def _set_switch(self, generation: int, to: SwitchState, reason: str | None = None) -> bool:
        """Move switch ``generation`` to ``to``; False when a newer switch superseded it."""
        with self._switch_lock:
            if generation != self._switch_generation or self._switch is None:
                return False
            machine = self._switch[0]
        return machine.move(to, reason) is not None

    def _run_switch(self, config: AppConfig, generation: int, on_done: Callable[[], None] | None) -> None:
        try:
            self._switch_to(config, generation, on_done)
        finally:
            with self._switch_lock:  # done, failed or superseded: its videos are no longer this switch's
                if self._switch_videos is not None and self._switch_videos[0] == generation:
                    self._switch_videos = None

    def _switch_to(self, config: AppConfig, generation: int, on_done: Callable[[], None] | None) -> None:
        s, a = config.stream, config.avatar
        try:
            idle_path = a.idle_video or a.video or ensure_default_avatar(a.cache_dir)  # a base video alone: idle too
            base_video = a.video or idle_path
            t = time.monotonic()
            clip = self._clips.load(
                idle_path,
                s.fps,
                s.audio_sample_rate,
                self.stream_size,
                s.idle_audio,
                clip_limits(config),
                a.fit,
                a.background,
                a.face_fraction,
                a.min_face_px,
            )
            settings = avatar_settings(config, self.stream_size)
            avatar = self._preparations.prepare(
                base_video,
                settings,
                a.cache_dir,
                lambda: self._stop_event.is_set() or generation != self._switch_generation,
                clip_limits(config),
            )
        except Exception as exc:
            logger.warning("channel %s: avatar switch failed: %s: %s", self.name, type(exc).__name__, exc)
            self._set_switch(generation, SwitchState.failed, public_reason(exc))
            return
        logger.info(
            "channel %s: new avatar %s ready (%.1f s); switching at the next idle moment",
            self.name,
            Path(base_video).name,
            time.monotonic() - t,
        )
        mixer = self.mixer
        if mixer is None:  # only a ready channel switches, and a ready channel has its mixer
            self._set_switch(generation, SwitchState.failed, f"channel {self.name} has no stream")
            return
        loop = IdleLoop(clip.frames, clip.audio, pingpong=s.idle_pingpong)
        self._pending_avatar = (avatar, Path(idle_path))
        if not self._set_switch(generation, SwitchState.waiting_for_idle):
            self._pending_avatar = None
            return
        while True:
            if self._stop_event.is_set() or generation != self._switch_generation:
                return
            tasks = self.tasks
            if tasks is not None and tasks.switch_avatar(avatar, lambda: mixer.switch_idle(loop)):
                break
            self._stop_event.wait(0.05)
        # the outputs may have changed since the PUT that asked for this switch: they stay as they are now
        outputs = self.config.stream.outputs
        self.config = dataclasses.replace(config, stream=dataclasses.replace(config.stream, outputs=outputs))
        self.avatar = avatar
        self._clip = clip
        self._pending_avatar = None
        while mixer.idle_switch_pending and not self._stop_event.wait(0.02):
            pass  # the crossfade begins on the channel's next idle tick
        self._set_switch(generation, SwitchState.done)
        logger.info("channel %s: avatar switched to %s", self.name, Path(base_video).name)
        if on_done is not None:
            on_done()

    def uses(self) -> list[Path]:
        """Files and prepared-avatar folders this channel uses now or is switching to (the cache keeps them)."""
        if self.stopped:
            return []
        paths = [Path(p) for p in (self.config.avatar.idle_video, self.config.avatar.video) if p]
        if self.avatar is not None:
            paths.append(Path(self.avatar.path))
        pending = self._pending_avatar
        if pending is not None:
            paths += [Path(pending[0].path), pending[1]]
        switching = self._switch_videos
        if switching is not None:
            paths += switching[1]
        return list(dict.fromkeys(paths))

    def attach(self, pool: SchedulingPool) -> bool:
        """Start taking uploads and streamed speech: a TaskManager whose jobs go to the shared pool.

        Returns:
            True when the channel is ``ready`` now; False when it is not ``starting`` with its
            stream on air and its avatar prepared (it failed or is closing): nothing is attached.
        """
        mixer, avatar = self.mixer, self.avatar
        if self._machine.state is not ChannelState.starting or mixer is None or avatar is None:
            return False
        self.pool = pool
        manager = TaskManager(
            pool, mixer, avatar=avatar, settings=TaskSettings.from_config(self.config), on_ttff=self._on_ttff
        )
        self._tasks = manager
        if self._machine.move(ChannelState.ready, quiet=True) is None:  # failed or closed meanwhile
            manager.close()
            return False
        return True

    def close(self) -> None:
        """Fade the speech out, stop the tasks, the clock, WHEP, events and FFmpeg; temp files go.

        The shared pool is not stopped here (the runtime owns it). Safe to call twice, and on a
        channel that failed (it then leaves ``failed`` for ``stopped``).
        """
        if self._machine.move(ChannelState.stopping, quiet=True) is None:
            return
        self._stop_event.set()
        self._shutdown()
        self._machine.move(ChannelState.stopped)

    def _shutdown(self) -> None:
        """Stop every part that runs (speech faded out first); the work directory goes."""
        self._fade_out_speech()
        if self._tasks is not None:
            try:
                self._tasks.close()
            except Exception:
                logger.exception("channel %s: stopping tasks failed", self.name)
        self._release()

    def _release(self) -> None:
        """Stop the stream's parts and remove the work directory (each step safe to repeat, one caller at a time)."""
        with self._release_lock:
            self._close_stream()
            if self._work_dir is not None:
                shutil.rmtree(self._work_dir, ignore_errors=True)

    def _close_stream(self) -> None:
        steps = [
            ("controller", self.controller.close if self.controller else None),
            ("webrtc", self.webrtc.close if self.webrtc else None),
            ("frames", self.frames.close if self.frames else None),
            ("events", self._feed.close if self._feed else None),
            ("egress", self.sink.close if self.sink else None),
        ]
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:
                logger.exception("channel %s: stopping %s failed", self.name, what)

    def _fade_out_speech(self, timeout_s: float = 1.0) -> None:
        """Cut the speech on air with the usual crossfade (not mid-word) before the clock stops."""
        mixer = self.mixer
        if mixer is None or mixer.current_task_id is None or self.controller is None:
            return
        task_id = mixer.current_task_id
        mixer.interrupt(task_id)
        deadline = time.monotonic() + timeout_s
        while mixer.state is not StreamState.IDLE and time.monotonic() < deadline:
            time.sleep(0.02)
        logger.info(
            "channel %s: task %s faded out for shutdown (stream %s)",
            self.name,
            task_id,
            mixer.state.value,
            extra={"task_id": task_id},
        )

    def _tasks_json(self) -> list[dict]:
        tasks = self.tasks
        return [t.to_json() for t in tasks.list()] if tasks else []

    def _viewer_count(self) -> int:
        return self.webrtc.stats().viewers if self.webrtc is not None else 0

    def clock_alive(self) -> bool:
        """True while the channel's output clock handled a tick in the last :data:`HEALTH_TICK_STALE_S`."""
        c = self.controller.stats() if self.controller is not None else None
        if c is None or c.last_tick_monotonic == 0:
            return False
        return time.monotonic() - c.last_tick_monotonic < HEALTH_TICK_STALE_S

    def egress_alive(self) -> bool:
        """True unless a thread supervising an encoder or an output died or deadlocked (the watchdog asks).

        A destination that is down is not a dead supervisor: its output backs off and retries,
        reported in ``/health``; only a supervisor that stopped looping makes this False.
        """
        sink = self.sink
        return sink is None or self.stopped or sink.alive()

    def set_outputs(self, outputs: list[OutputTarget], config: AppConfig) -> tuple[list[str], list[str]]:
        """Make the channel's outputs these while it streams (``PUT /channels/<name>`` with ``outputs``).

        Outputs that stay the same keep running untouched; the others start or stop
        (:meth:`EgressSink.set_outputs`).

        Args:
            outputs: The outputs, checked (:func:`latentsync.config.channel_outputs` of ``config``).
            config: The channel's configuration with those outputs (kept as :attr:`config`).

        Returns:
            ``(started, stopped)`` output names.

        Raises:
            RuntimeError: If the channel's stream is not running (starting, failed or stopped).
        """
        sink = self.sink
        if sink is None or self.stopped:
            raise RuntimeError(f"channel {self.name} is {self.status}; its outputs change while it streams")
        changed = sink.set_outputs(outputs)
        self.config = config
        return changed

    # ----------------------------------------------------------------- uploads
    @property
    def upload_root(self) -> Path:
        """Where this channel's uploads are stored, one private folder each (``<work_dir>/uploads/``).

        Never beside the stream's FIFOs; :func:`latentsync.serving.core.uploads.stored_upload`
        makes and deletes each upload's folder in it.

        Raises:
            RuntimeError: If the channel is not running.
        """
        if self._upload_root is None:
            raise RuntimeError(f"channel {self.name} not started")
        return self._upload_root

    # ----------------------------------------------------------------- health
    def health_snapshot(self, uptime_s: float | None = None) -> HealthSnapshot:
        """The typed health of this channel (and of the shared pool), at this moment (cheap).

        Args:
            uptime_s: Seconds since the server started (None: since this channel was built).
        """
        if uptime_s is None:
            uptime_s = round(time.monotonic() - self._created_monotonic, 3)
        state = StreamState.STOPPED if self.stopped else StreamState.STARTING
        pool, tasks, mixer = self.pool, self.tasks, self.mixer
        workers = None
        if pool is not None:
            p = pool.stats()
            workers = WorkersHealth(
                count=p.workers,
                pids=tuple(pool.worker_pids()),
                rebuilds=p.rebuilds,
                in_flight=p.in_flight,
                queued=p.queued,
                retried=p.retried,
                failed=p.failed,
                completed=p.completed,
                dispatches=p.dispatches,
                backend=self.config.pool.backend.value,
                actors=tuple(pool.worker_stats()),
            )
        snapshot = HealthSnapshot(
            state=state.value,
            uptime_s=uptime_s,
            engine=self.config.engine.name.value,
            engine_ready=tasks is not None and pool is not None and pool.ready(),
            engine_error=pool.problem if pool is not None else self._engine_waiting(),
            playlist=mixer.pending() if mixer else 0,
            tasks_waiting=tasks.waiting() if tasks else 0,
            tasks_admitted=tasks.admitted() if tasks else 0,
            tasks_final=tasks.final_counts() if tasks else {},
            webrtc=self.webrtc.stats() if self.webrtc is not None else None,
            frames=self.frames.stats() if self.frames is not None else None,
            workers=workers,
        )
        if self.controller is None or self.sink is None:
            return snapshot
        c = self.controller.stats()
        k = self.sink.stats()
        ticking = self.clock_alive()
        size = self.stream_size
        required_live = all(o.live for o in k.outputs if o.required)
        return dataclasses.replace(
            snapshot,
            state=state.value if self.stopped else c.state.value,
            ticking=ticking,
            streaming=ticking and k.up and required_live and not self.stopped,
            frames_emitted=c.frames_emitted,
            ticks=c.ticks,
            late_ticks=c.late_ticks,
            dropped_ticks=c.dropped_ticks,
            underrun_ticks=mixer.underrun_ticks if mixer else 0,
            tick_errors=c.tick_errors + (self._tap.observer_errors + self._tap.sink_errors if self._tap else 0),
            programs_failed=mixer.programs_failed if mixer else 0,
            max_tick_lateness_ms=round(c.max_lateness_ms, 3),
            ffmpeg_up=k.up,
            ffmpeg_restarts=k.restarts,
            ffmpeg_pid=k.pid,
            ffmpeg_last_error=k.last_error,
            outputs=k.outputs,
            on_air_task=mixer.current_task_id if mixer else None,
            stream=StreamFormat(size[0], size[1], self.config.stream.fps, self.config.stream.audio_sample_rate)
            if size
            else None,
        )

    def health(self, uptime_s: float | None = None) -> tuple[bool, dict]:
        """Stream health for ``GET /health`` (``main``) and ``GET /channels/<name>/health``.

        Returns:
            ``(streaming, body)``: streaming is True when the clock ticks, the encoders run and every
            required output is live (docs/architecture.md "Health"); body is
            :meth:`HealthSnapshot.to_json` plus ``channel`` (no stream key or token is included).
        """
        snapshot = self.health_snapshot(uptime_s)
        body = snapshot.to_json()
        body["channel"] = self.name
        return snapshot.streaming, body

    def reported_status(self, outputs: list[dict]) -> str:
        """The phase as ``GET /channels`` reports it: ``ready`` only once the stream has reached its destinations.

        A channel ``ready`` (uploads accepted) while one of its required outputs has never been live
        (refused from the start: a wrong URL or key, a local nginx-rtmp without ``?secret=``) is
        reported ``starting``; from the first moment every required output has been live it is
        ``ready``, whatever its outputs do later (``/health`` tells those).

        Args:
            outputs: The channel's outputs as ``/health`` gives them (``required``, ``last_progress_s``:
                None while no byte has left).

        Returns:
            One of :class:`ChannelState`'s values.
        """
        status = self.status
        if status != ChannelState.ready.value or self._outputs_were_live:
            return status
        if any(o.get("required") and o.get("last_progress_s") is None for o in outputs):
            return ChannelState.starting.value
        self._outputs_were_live = True
        return status

    def describe(self) -> dict:
        """The channel for ``GET /channels``: name, state, format, on-air task, outputs (URLs without keys).

        ``status`` is :meth:`reported_status`: ``starting`` until every required output has been live once.
        """
        streaming, body = self.health()
        return {
            "name": self.name,
            "status": self.reported_status(body.get("outputs", [])),
            "error": self.error,
            "state": body.get("state"),
            "streaming": streaming,
            "engine_ready": body.get("engine_ready", False),
            "stream": body.get("stream"),
            "on_air_task": body.get("on_air_task"),
            "tasks_waiting": body.get("tasks_waiting", 0),
            "avatar": Path(self.avatar.path).name if self.avatar is not None else None,
            "switch": self.switch_status(),
            "outputs": [
                {k: o[k] for k in ("name", "kind", "url", "required", "state", "last_error")}
                for o in body.get("outputs", [])
            ],
        }

    def switch_status(self) -> dict | None:
        """The last avatar switch (``PUT /channels/<name>``), or None if there was none.

        Returns:
            ``{"state", "avatar", "error"}``; state is ``preparing``, ``waiting_for_idle``,
            ``done`` or ``failed`` (then ``error`` says why).
        """
        with self._switch_lock:
            if self._switch is None:
                return None
            machine, label = self._switch
        state = machine.state
        return {"state": state.value, "avatar": label, "error": machine.reason if state is SwitchState.failed else None}
