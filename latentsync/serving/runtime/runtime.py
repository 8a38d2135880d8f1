"""Runtime: builds every long-lived part of the server from one config, owns it, stops it.

The runtime owns the channels (:class:`~latentsync.serving.runtime.channel.Channel`, one live
stream each; ``main`` from the top-level ``stream``/``avatar`` keys, more from ``channels:``, from
``channels_file`` and from ``PUT /channels/<name>``) and ONE :class:`WorkerPool` they all share
(docs/channels.md).

Start order: ``main``'s stream (idle clip → EgressSink → StreamingController: on air from here)
→ every other channel's start in its own thread (stream, then avatar) → ``main``'s prepared
avatar → the shared WorkerPool → every channel whose avatar is prepared gets its TaskManager
(uploads accepted from here; a channel still preparing attaches itself when it is done). Stop
order is the reverse, and every part is stopped even when an earlier one fails.

Fault isolation (docs/architecture.md): only ``main`` failing to start stops the server. Any
other channel that fails, at any moment of its life and whichever way it came (config file,
``channels_file``, PUT), is marked ``failed`` with its error, listed so by ``GET /channels`` and
skipped by every runtime-wide operation (engine start, ``channels_file``, health, shutdown); no
operation asserts on a channel's phase.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from latentsync.avatar import Avatar
from latentsync.config import (
    DEFAULT_CHANNEL,
    PARAMETRIC_MAX_DEFAULT_WORKERS,
    AppConfig,
    ChannelConfig,
    ConfigError,
    EngineName,
    OutputConfig,
    PoolBackend,
    channel_configs,
    channel_outputs,
    local_output_clash,
    validate,
)
from latentsync.serving.avatars import AvatarStore
from latentsync.serving.compute.scheduling_pool import ClusterUnreachable, SchedulingPool
from latentsync.serving.compute.worker_pool import WorkerPool
from latentsync.serving.core.errors import public_reason
from latentsync.serving.egress.sink import EgressSink
from latentsync.serving.egress.whep import WebRtcHub
from latentsync.serving.ingest.speech_service import SpeechService
from latentsync.serving.ops.face_search import ChildFaceFinder
from latentsync.serving.ops.systemd import Watchdog
from latentsync.serving.playout.clock import StreamingController
from latentsync.serving.playout.mixer import ProgramMixer
from latentsync.serving.runtime.channel import HEALTH_TICK_STALE_S, SINK_START_TIMEOUT_S, Channel, ChannelState
from latentsync.serving.runtime.channel_rules import (
    RECORD_PATH_CONFIG_ONLY,
    allowed_rtmp_hosts,
    api_channel,
    api_media_paths,
    check_api_outputs,
)
from latentsync.serving.runtime.clips import AvatarPreparations, ClipCache, PreparationCancelled
from latentsync.serving.runtime.persistence import (
    CHANNELS_FILE_VERSION,
    LIVE_FIELDS,
    STREAM_FIELDS,
    _live_avatar,
    restore_channels,
)
from latentsync.serving.tasks.task_manager import TaskManager
from latentsync.serving.telemetry.events import EventBroadcaster
from latentsync.serving.telemetry.health import HealthSnapshot
from latentsync.serving.telemetry.metrics import ServerMetrics

if TYPE_CHECKING:
    from latentsync.serving.compute.ray_worker_pool import RayWorkerPool

logger = logging.getLogger(__name__)

__all__ = ["HEALTH_TICK_STALE_S", "SINK_START_TIMEOUT_S", "RestartNeeded", "Runtime"]

#: Seconds :meth:`Runtime.close` waits, in all, for channel starts still running (decoding a clip or
#: preparing an avatar cannot be interrupted; what they built after the close is released by them).
START_JOIN_TIMEOUT_S = 5.0
#: Seconds before the first retry of an engine start whose cluster was unreachable (doubled each
#: time up to :data:`ENGINE_RETRY_MAX_S`); the stream stays on air meanwhile.
ENGINE_RETRY_S = 5.0
ENGINE_RETRY_MAX_S = 60.0


class RestartNeeded(Exception):
    """A PUT on an existing channel asks to change what only a restart of its stream can change."""


class _PoolOptions(TypedDict):
    """What both pool backends (local and Ray) are given from the ``engine`` section."""

    on_chunk_done: Callable[[int, float], None]
    max_batch: int
    max_avatars: int
    deadline_s: float
    max_queued: int


class Runtime:
    """Owns the channels and the worker pool they share.

    The accessors of one stream (``controller``, ``sink``, ``mixer``, ``tasks``, ``webrtc``,
    ``events`` ...) are those of the default channel ``main``, as before channels.

    Args:
        config: The validated server configuration.
        after_release: Called with ``(made_at, what)`` to let the process reclaim what a channel let go
            of: on the API thread after a deleted channel was closed (``made_at``: the
            ``time.monotonic()`` at which it was built), and on the switch's thread once a channel's new
            avatar is on air (``made_at``: that moment; the outgoing avatar and its idle clip are then
            held only by the reference cycles of the tasks that played them, all made after the
            server's heap was frozen). ``what`` says which, for the log. ``infer_serv.py`` passes
            :meth:`latentsync.serving.ops.memory.HeapFreezer.release` (and logs it). None: nothing.
    """

    def __init__(self, config: AppConfig, after_release: Callable[[float, str], object] | None = None):
        self._after_release = after_release
        self._configured = {c.name for c in config.channels}  # of the config file (the rest: created by PUT)
        self._file_config = config  # main's avatar as configured, if the one kept in channels_file fails
        self._api_hosts = allowed_rtmp_hosts(config)  # where channels created through the API may push
        # what the API changed before a restart (channels_file): configured channels deleted, avatar changes
        config, self._deleted, self._live, restored = restore_channels(config)
        self._kept = set(restored)  # created channels written to channels_file: those that reached ready
        self.config = config
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False  # set under _channels_lock too: no channel or pool is published after it
        self._closing = threading.Event()  # set by close(): wakes an engine start waiting to retry
        self._engine_waiting: str | None = None  # why the engine is not started yet (a cluster unreachable)
        self._others_started = False  # main is on air: a channel added from now starts at once
        self._start_threads: list[threading.Thread] = []  # channel starts still running (close() joins them)
        self._pool: SchedulingPool | None = None
        self._connected_pool: RayWorkerPool | None = None  # a Ray pool connected before the clocks (start)
        self._speech: SpeechService | None = None  # text to speech, for every channel
        self._created_monotonic = time.monotonic()
        # cover framing's face searches, each in a child: MediaPipe never enters this process (ops/face_search.py)
        self._face_finder = ChildFaceFinder()
        self._clips = ClipCache(self._face_finder)  # channels looping the same idle video share its decoded frames
        # ... and prepare the same base video once, in the avatar store's queue (a child process)
        self._preparations = AvatarPreparations(self._prepare_in_store)
        self.channels: dict[str, Channel] = {
            name: self._new_channel(name, cfg) for name, cfg in channel_configs(config).items()
        }
        self.metrics = ServerMetrics(self.channel_snapshots)  # scrapes the channels (auto_describe: already here)
        self._watchdog = Watchdog(self._clock_alive)
        self._specs: dict[str, ChannelConfig] = {c.name: c for c in config.channels}  # all but main
        self._channels_lock = threading.Lock()  # PUT/DELETE /channels/<name>
        self.avatars = AvatarStore(config, self._avatars_in_use, self._face_finder)  # POST /avatars (docs/avatars.md)
        self.metrics.registry.register(self.avatars)

    def _prepare_in_store(self, video, settings, cache_dir, stopping) -> Avatar:
        """A channel's base video prepared in the avatar store's queue (:class:`AvatarPreparations`' runner)."""
        path = self.avatars.prepare_for_channel(video, settings, stopping)
        if path is None:
            raise PreparationCancelled(f"preparation of {Path(video).name} cancelled")
        return Avatar.load(path)

    def _new_channel(self, name: str, config: AppConfig) -> Channel:
        return Channel(
            name,
            config,
            on_ttff=self._observe_ttff,
            clips=self._clips,
            preparations=self._preparations,
            engine_waiting=lambda: self._engine_waiting,
        )

    def _observe_ttff(self, seconds: float) -> None:
        self.metrics.observe_ttff(seconds)

    # ----------------------------------------------------------------- accessors
    @property
    def main(self) -> Channel:
        """The default channel (the top-level ``stream``/``avatar`` keys; the URLs without ``/channels``)."""
        return self.channels[DEFAULT_CHANNEL]

    def channel(self, name: str) -> Channel | None:
        """The channel called ``name``, or None."""
        return self.channels.get(name)

    @property
    def exit_unsafe(self) -> bool:
        """True once :meth:`close` left a worker pool the interpreter's exit would crash on.

        The process then ends with :func:`latentsync.serving.ops.exit.exit_now`
        (``SchedulingPool.exit_unsafe``: a Ray cluster lost for good).
        """
        return self._pool is not None and self._pool.exit_unsafe

    @property
    def work_dir(self) -> Path | None:
        """The main channel's private temporary directory (see :attr:`Channel.work_dir`)."""
        return self.main.work_dir

    @property
    def stream_size(self) -> tuple[int, int] | None:
        """The main channel's ``(width, height)``, once its idle clip is decoded."""
        return self.main.stream_size

    @property
    def controller(self) -> StreamingController | None:
        """The main channel's StreamingController, once started."""
        return self.main.controller

    @property
    def sink(self) -> EgressSink | None:
        """The main channel's EgressSink (encoders and outputs), once started."""
        return self.main.sink

    @property
    def mixer(self) -> ProgramMixer | None:
        """The main channel's ProgramMixer, once started."""
        return self.main.mixer

    @property
    def webrtc(self) -> WebRtcHub | None:
        """The main channel's WHEP hub (webrtc.enabled), once its stream runs."""
        return self.main.webrtc

    @property
    def events(self) -> EventBroadcaster:
        """The main channel's ``GET /events`` subscribers."""
        return self.main.events

    @property
    def pool(self) -> SchedulingPool | None:
        """The worker pool (local processes or Ray actors) shared by every channel, once started."""
        return self._pool

    @property
    def stopped(self) -> bool:
        """True once :meth:`close` began (every channel refuses uploads from then)."""
        return self._stopped

    @property
    def tasks(self) -> TaskManager | None:
        """The main channel's TaskManager; None until the engine is ready (uploads get 503 until then)."""
        return None if self._stopped else self.main.tasks

    @property
    def speech(self) -> SpeechService | None:
        """Text to speech (``/speak``, ``text`` messages), shared by every channel; None until the engine is ready."""
        return None if self._stopped else self._speech

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Put ``main`` on air, start the other channels, then the engine side. Safe to call twice.

        Only ``main`` failing stops the start (and the server); another channel that fails is marked
        ``failed`` and skipped. A ``main`` avatar restored from ``channels_file`` that fails is
        dropped for the configured one (logged) instead, so a kept change never stops the server.

        Raises:
            latentsync.media.MediaProbeError: If ``main``'s video cannot be decoded.
            latentsync.avatar.FaceNotFoundError: If ``main``'s base video has too few faces.
            latentsync.serving.compute.scheduling_pool.WorkerPoolError: If the engine workers cannot start
                (for example a missing checkpoint file; the message names it). A Ray cluster that
                cannot be reached (``ClusterUnreachable``) is not an error: the stream stays on air,
                ``/health`` says why the engine is not ready, and the start is retried (every 5 s,
                doubling to 60 s) until it succeeds or the runtime is closed.
        """
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
        self.avatars.start()
        self._connect_cluster()
        self._start_main(prepare=False)
        with self._channels_lock:
            if self._stopped:
                return
            self._others_started = True
            for name, channel in self.channels.items():
                if name != DEFAULT_CHANNEL:
                    self._spawn_start(channel)
        self._watchdog.start()
        if self._stopped:
            self._watchdog.close()
            return
        self._start_engine()

    def _connect_cluster(self) -> None:
        """With ``pool.ray_address`` set, connect the Ray driver now, before any clock ticks.

        Ray builds the driver holding the GIL for about a second (:meth:`RayWorkerPool.connect`): done
        once the stream runs, every channel would skip that second of ticks. A cluster that does not
        answer now is left to the engine start and its retries (the stream goes on air meanwhile; that
        later connection may still cost a skipped second, logged by the clock); any other failure
        there too, where it is reported as before.
        """
        cfg = self.config
        if cfg.pool.backend is not PoolBackend.ray or not cfg.pool.ray_address:
            return  # the local pool, or a private Ray (started with the engine: the stream goes on air first)
        from latentsync.serving.compute.ray_worker_pool import RayWorkerPool  # needs the optional ray package

        pool = self._make_pool(None)
        if not isinstance(pool, RayWorkerPool):
            raise TypeError(f"pool.backend=ray made a {type(pool).__name__}")
        t = time.monotonic()
        try:
            pool.connect()
        except Exception as exc:  # ClusterUnreachable, WorkerPoolError: the engine start tries again and reports
            logger.info("Ray not connected before the stream (%s): the engine start connects", exc)
            pool.close()
            return
        logger.info(
            "Ray driver connected to %s in %.1f s, before the stream", cfg.pool.ray_address, time.monotonic() - t
        )
        with self._lock:
            if self._stopped:
                pool.close()
                return
            self._connected_pool = pool

    def _start_main(self, prepare: bool) -> None:
        """Start ``main``'s stream (``prepare`` False) or prepare its avatar (True); see :meth:`start`."""
        channel = self.main
        try:
            if prepare:
                channel.prepare_avatar()
            else:
                channel.start()
            return
        except Exception as exc:
            if DEFAULT_CHANNEL not in self._live or self._stopped:
                raise
            reason = f"{type(exc).__name__}: {exc}"
            public = public_reason(exc)
        logger.error("channel main: the avatar kept in channels_file fails (%s): back to the configured one", reason)
        channel.fail(public)
        with self._channels_lock:
            self._live.pop(DEFAULT_CHANNEL, None)
            base = self._file_config
            self.config = dataclasses.replace(self.config, avatar=base.avatar, stream=base.stream)
            channel = self._new_channel(DEFAULT_CHANNEL, channel_configs(self.config)[DEFAULT_CHANNEL])
            self.channels[DEFAULT_CHANNEL] = channel  # the key keeps its place: main is listed first
            self._persist()
        channel.start()
        if prepare:
            channel.prepare_avatar()

    def _spawn_start(self, channel: Channel) -> None:
        """Start ``channel`` (not ``main``) in its own thread (``_channels_lock`` held)."""
        self._start_threads = [t for t in self._start_threads if t.is_alive()]
        thread = threading.Thread(target=self._start_channel, args=(channel,), name=f"channel-{channel.name}-start")
        thread.daemon = True  # close() joins it (bounded); a clip still decoding must not hold the exit
        self._start_threads.append(thread)
        thread.start()

    def _start_channel(self, channel: Channel) -> None:
        """A channel's start thread: stream, avatar, then uploads once the pool runs; a failure marks it failed."""
        try:
            channel.start()
            if not channel.stopped:
                channel.prepare_avatar()
        except PreparationCancelled:
            logger.info("channel %s stopped while its avatar was being prepared", channel.name)
            return
        except Exception as exc:
            logger.error("channel %s failed to start: %s: %s", channel.name, type(exc).__name__, exc)
            channel.fail(public_reason(exc))
            return
        self._attach(channel)

    def _attach(self, channel: Channel) -> bool:
        """Give ``channel`` its TaskManager on the shared pool if it is ``starting`` with its avatar prepared.

        Called by the channel's start thread and by the engine start (whichever comes last attaches).
        A created channel that becomes ``ready`` is written to ``channels_file`` just before its state
        turns ``ready`` (so a client that saw ``ready`` finds it in the file); if it fails to attach
        instead, the file is written again without it.

        Returns:
            True when this call made the channel ``ready``.
        """
        with self._channels_lock:
            pool = self._pool
            if pool is None or self.channels.get(channel.name) is not channel:
                return False  # the pool is not running yet (the engine start attaches it), or it was deleted
            if channel.state is not ChannelState.starting or channel.avatar is None:
                return False  # still preparing (its thread attaches it), already ready, failed or closing
            name = channel.name
            kept = name != DEFAULT_CHANNEL and (name not in self._configured or name in self._deleted)
            if kept:  # written before the API can report it ready: a client that saw "ready" finds it kept
                self._kept.add(name)
                self._persist()
            if not channel.attach(pool):
                if kept:
                    self._kept.discard(name)
                    self._persist()
                return False
        logger.info("channel %s ready: uploads accepted", channel.name)
        return True

    def _clock_alive(self) -> bool:
        """What the systemd watchdog vouches for: every clock ticks and every egress supervisor loops.

        A destination that is down is never a reason to withhold it (that is reported, not
        restarted): only a clock that stopped or a supervising thread that died or deadlocked.
        """
        others = [c for name, c in list(self.channels.items()) if name != DEFAULT_CHANNEL and c.ready]
        channels = [self.main, *others]
        return all(c.clock_alive() for c in channels) and all(c.egress_alive() for c in channels)

    def _start_engine(self) -> None:
        cfg = self.config
        self._start_main(prepare=True)
        main_avatar = self.main.avatar
        if main_avatar is None or self._stopped:  # closed while preparing
            return
        t = time.monotonic()
        with self._lock:
            connected, self._connected_pool = self._connected_pool, None
        pool: SchedulingPool
        if connected is None:
            pool = self._make_pool(main_avatar.path)
        else:
            connected.set_default_avatar(main_avatar.path)
            pool = connected
        delay_s = ENGINE_RETRY_S
        while True:
            try:
                pool.start()
                break
            except ClusterUnreachable as exc:  # the stream stays on air; the engine comes when the cluster does
                pool.close()
                self._engine_waiting = f"{exc} (retrying every {delay_s:.0f} s at most)"
                logger.warning("engine: %s; the stream stays on air, retrying in %.0f s", exc, delay_s)
                if self._closing.wait(delay_s):
                    return
                delay_s = min(2 * delay_s, ENGINE_RETRY_MAX_S)
                pool = self._make_pool(main_avatar.path)
            except BaseException:
                pool.close()
                raise
        self._engine_waiting = None
        with self._channels_lock:
            published = not self._stopped  # close() closes the pool from here; before, this does
            if published:
                self._pool = pool
            channels = list(self.channels.values())
        if not published:
            pool.close()
            return
        logger.info(
            "%d %s engine worker(s) (%s) ready for %d channel(s) (%.1f s)",
            pool.stats().workers,
            cfg.engine.name.value,
            cfg.pool.backend.value,
            len(channels),
            time.monotonic() - t,
        )
        for channel in channels:  # those whose start thread finished before the pool ran
            self._attach(channel)
        self._speech = SpeechService.from_config(cfg)
        self.avatars.enforce_quota()  # every channel's avatar is known now: the rest may go

    def _make_pool(self, avatar_path: Path | None) -> SchedulingPool:
        """The worker pool the config asks for (not started), serving ``avatar_path`` by default.

        None: a Ray pool that gets it later (:meth:`RayWorkerPool.set_default_avatar`); the local pool needs it.
        """
        cfg = self.config
        engine = cfg.engine
        latentsync = engine.name is EngineName.latentsync
        options: dict[str, Any] = {"config": engine.latentsync} if latentsync else {}  # the section (picklable)
        common = _PoolOptions(
            on_chunk_done=self.metrics.observe_chunk,
            max_batch=engine.max_batch_chunks,
            max_avatars=engine.max_avatars_per_worker,
            deadline_s=engine.chunk_deadline_s,
            max_queued=engine.max_queued_jobs,
        )
        pool: SchedulingPool
        if cfg.pool.backend is PoolBackend.ray:  # each actor's device is the GPU Ray gives it
            from latentsync.serving.compute.ray_worker_pool import RayWorkerPool  # needs the optional ray package

            ray_cfg = cfg.pool
            pool = RayWorkerPool(
                engine.name.value,
                options,
                avatar_path=avatar_path,
                workers=ray_cfg.ray_workers,
                address=ray_cfg.ray_address,
                cpus_per_worker=ray_cfg.ray_cpus_per_worker,
                gpus_per_worker=ray_cfg.ray_gpus_per_worker if latentsync else None,
                namespace=ray_cfg.ray_namespace,
                object_store_mb=ray_cfg.ray_object_store_mb,
                gcs_timeout_s=ray_cfg.ray_gcs_timeout_s,
                **common,
            )
        else:
            if avatar_path is None:
                raise ValueError("the local worker pool needs its default avatar")
            devices = _engine_devices(engine.device) if latentsync else []
            if engine.workers is not None:
                workers = engine.workers
            elif latentsync:
                workers = max(1, len([d for d in devices if d.startswith("cuda")]))
            else:  # one per core: the parametric engine is CPU work
                workers = max(1, min(PARAMETRIC_MAX_DEFAULT_WORKERS, os.cpu_count() or 1))
            if latentsync:
                options["device"] = devices[0] if devices else None
            pool = WorkerPool(
                engine.name.value,
                options,
                avatar_path=avatar_path,
                workers=workers,
                devices=devices,
                nice=engine.worker_nice,
                **common,
            )
        return pool

    def close(self) -> None:
        """Stop every channel, then the shared workers; FFmpeg flushes; temp files go. Safe to call twice."""
        with self._lock, self._channels_lock:
            if self._stopped:
                return
            self._stopped = True  # from here uploads get 503, and no channel or pool is added
        self._closing.set()
        steps: list[tuple[str, Callable[[], None] | None]] = [
            ("watchdog", self._watchdog.close),
            ("avatar preparation", self.avatars.close),
            ("face searches", self._face_finder.close),
        ]
        steps += [(f"channel {name}", channel.close) for name, channel in list(self.channels.items())]
        steps.append(("channel starts", self._join_starts))
        steps.append(("workers", self._pool.close if self._pool else None))
        with self._lock:
            connected, self._connected_pool = self._connected_pool, None
        steps.append(("Ray driver", connected.close if connected else None))
        for name, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:
                logger.exception("stopping %s failed", name)
        logger.info("runtime stopped")

    def _join_starts(self) -> None:
        """Wait (at most :data:`START_JOIN_TIMEOUT_S` in all) for channel starts still running."""
        deadline = time.monotonic() + START_JOIN_TIMEOUT_S
        for thread in list(self._start_threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("%s still running at shutdown (what it builds from now is released)", thread.name)

    # ----------------------------------------------------------------- channels at run time
    def add_channel(self, spec: ChannelConfig) -> Channel:
        """Create a channel while the server runs or starts (``PUT /channels/<name>``); it starts in the background.

        The new channel is held to the API's rules (:func:`~latentsync.serving.runtime.channel_rules.api_channel`: video
        only under ``media.root``, an RTMP URL to an allowed host, no ``record_path``), then checked
        with the others exactly as at load (:func:`latentsync.config.validate`: name, unique RTMP URL,
        ``max_channels``, its stream/avatar values). Its stream goes on air
        (once ``main`` is), its avatar is prepared, then it takes uploads once the shared pool runs
        (:attr:`Channel.status` says where it is). A failure marks it ``failed``; it is written to
        ``channels_file`` only once ``ready``.

        Raises:
            latentsync.config.ConfigError: If the channel is invalid or one of that name exists.
            RuntimeError: If the runtime is stopping.
        """
        spec = api_channel(self.config, spec, self._api_hosts)
        if spec.avatar is not None:
            self.avatars.require_ready(spec.avatar)
        with self._channels_lock:
            if self._stopped:
                raise RuntimeError("the server is stopping")
            candidate = dataclasses.replace(self.config, channels=[*self._specs.values(), spec])
            validate(candidate)  # ConfigError names the key
            channel = self._new_channel(spec.name, channel_configs(candidate)[spec.name])
            self._specs[spec.name] = spec
            self.channels[spec.name] = channel
            self._live.pop(spec.name, None)
            if self._others_started:  # else start() starts it with the others, once main is on air
                self._spawn_start(channel)
        return channel

    def reconfigure_channel(self, name: str, values: dict, force: bool = False) -> tuple[Channel, bool]:
        """Change an existing channel's avatar while it streams (``PUT /channels/<name>`` on a known name).

        ``values`` holds channel fields (:class:`~latentsync.config.ChannelConfig`). ``outputs``
        replaces the channel's outputs at once (:meth:`Channel.set_outputs`: the ones that stay the
        same run on untouched). The avatar fields (:data:`LIVE_FIELDS`) change at the channel's next
        idle moment with a crossfade (:meth:`Channel.switch_avatar`); naming any of ``avatar``,
        ``idle_video``, ``video`` replaces all three (absent: null). The stream fields
        (:data:`STREAM_FIELDS`) may be given only with the channel's current values.

        Returns:
            ``(channel, switching)``: switching is True while an avatar switch it started is under way.

        Raises:
            latentsync.config.ConfigError: On an unknown field, a wrong type or an invalid value.
            RestartNeeded: If a stream field differs from the channel's current value (names them).
            latentsync.serving.avatars.AvatarError: If ``avatar`` names no avatar, or one not ready, or
                (unless ``force``) one whose face would be narrower than ``avatar.min_face_px`` on
                this channel (``face_too_small``).
            RuntimeError: If the channel is not ready (starting, failed, stopping), or (for outputs)
                its stream does not run.
            KeyError: If there is no such channel.
        """
        from latentsync.config import parse_channel

        channel = self.channels[name]
        if "record_path" in values:
            raise ConfigError(RECORD_PATH_CONFIG_ONLY)

        given = parse_channel(name, {k: v for k, v in values.items() if k != "name"})
        given = dataclasses.replace(given, **api_media_paths(self.config, lambda k: getattr(given, k)))
        current = channel.config
        effective = {
            "rtmp_url": current.stream.rtmp_url,
            "fps": current.stream.fps,
            "crossfade_frames": current.stream.crossfade_frames,
            "video_bitrate_kbps": current.stream.video_bitrate_kbps,
            "record_path": current.stream.record_path,
            "width": channel.stream_size[0] if channel.stream_size else current.stream.width,
            "height": channel.stream_size[1] if channel.stream_size else current.stream.height,
        }
        changed = [k for k in STREAM_FIELDS if k in values and getattr(given, k) != effective[k]]
        if changed:
            raise RestartNeeded(
                f"changing {', '.join(changed)} of channel {name!r} needs its stream restarted: "
                f"DELETE /channels/{name}, then PUT it again"
            )
        if "outputs" in values:
            self._set_outputs(channel, given.outputs)
            if not any(k in values for k in (*LIVE_FIELDS, *STREAM_FIELDS) if k != "outputs"):
                return channel, False
            current = channel.config
        if given.avatar is not None:
            if given.idle_video is not None or given.video is not None:
                raise ConfigError("avatar: give either an uploaded avatar or idle_video/video, not both")
            self.avatars.require_ready(given.avatar)
            if not force:
                self.avatars.check_face_size(given.avatar, channel.stream_size, current.avatar.fit)
        live = {k: getattr(given, k) for k in ("idle_audio", "idle_pingpong") if getattr(given, k) is not None}
        if any(k in values for k in ("avatar", "idle_video", "video")):  # the avatar is replaced as a whole
            live.update(avatar=given.avatar, idle_video=given.idle_video, video=given.video)
        avatar, stream = _live_avatar(self.config, live, current.avatar, current.stream)
        new = dataclasses.replace(current, avatar=avatar, stream=stream)
        if new == current:
            return channel, False
        size = {}
        if (
            channel.stream_size is not None
        ):  # the stream keeps its size, whatever the new video's (also after a restart)
            width, height = channel.stream_size
            size = {"width": width, "height": height}
            new = dataclasses.replace(new, stream=dataclasses.replace(new.stream, width=width, height=height))
        try:
            validate(new)
        except ConfigError as exc:
            raise ConfigError(f"channel {name}: {exc}") from None
        label = given.avatar or Path(avatar.video or avatar.idle_video or "default avatar").name
        live.update(size)

        def keep() -> None:  # once the switch is made: channels_file brings it back after a restart
            with self._channels_lock:
                if self.channels.get(name) is not channel:
                    return
                spec = self._specs.get(name)
                if spec is not None:
                    self._specs[name] = dataclasses.replace(spec, **live)
                if name == DEFAULT_CHANNEL or name in self._configured:
                    self._live[name] = {**self._live.get(name, {}), **live}
                self._persist()

        def switched() -> None:  # the new avatar is on air: the outgoing one's memory maps go now
            keep()
            if self._after_release is not None:
                self._after_release(time.monotonic(), f"channel {name} switched its avatar")

        with self._channels_lock:
            channel.switch_avatar(new, label, on_done=switched)
        return channel, True

    def _set_outputs(self, channel: Channel, outputs: list[OutputConfig] | None) -> None:
        """Replace a running channel's outputs (a PUT's ``outputs``) and keep them in ``channels_file``.

        Held to the API's rules (allowed hosts, names under the roots: :func:`check_api_outputs`),
        then to the config's (:func:`channel_outputs`), and no other channel may send to one of the
        same network URLs.

        Raises:
            latentsync.config.ConfigError: Naming the output.
            RuntimeError: If the channel's stream does not run.
        """
        if not outputs:
            raise ConfigError("outputs: at least one output (a channel's programme must go somewhere)")
        check_api_outputs(outputs, self._api_hosts)
        name = channel.name
        with self._channels_lock:
            new = dataclasses.replace(
                channel.config, stream=dataclasses.replace(channel.config.stream, outputs=outputs)
            )
            targets = channel_outputs(new, "outputs")
            elsewhere = {
                t.url.url
                for other_name, other in self.channels.items()
                if other_name != name and other.sink is not None and not other.stopped
                for t in other.sink.outputs()
            }
            taken = [t.name for t in targets if t.kind.networked and t.url.url in elsewhere]
            if taken:
                raise ConfigError(f"outputs: {', '.join(taken)} sends to a URL another channel sends to")
            clash = local_output_clash(
                targets,
                {n: channel_outputs(c.config) for n, c in self.channels.items() if n != name and not c.stopped},
            )
            if clash is not None:
                raise ConfigError(f"outputs: {clash}")
            started, stopped = channel.set_outputs(targets, new)
            spec = self._specs.get(name)
            if spec is not None:
                self._specs[name] = dataclasses.replace(spec, outputs=list(outputs))
            if name == DEFAULT_CHANNEL or name in self._configured:
                self._live[name] = {**self._live.get(name, {}), "outputs": [dataclasses.asdict(o) for o in outputs]}
            self._persist()
        logger.info(
            "channel %s: outputs changed through the API (started: %s; stopped: %s)",
            name,
            ", ".join(started) or "none",
            ", ".join(stopped) or "none",
        )

    def _persist(self) -> None:
        """Write ``channels_file`` (lock held): channels created (once ready), configured ones deleted, avatars."""
        if not self.config.channels_file:
            return
        created = [
            {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
            for name, spec in self._specs.items()
            if name in self._kept
        ]
        state = {
            "version": CHANNELS_FILE_VERSION,
            "created": created,
            "deleted": sorted(self._deleted),
            "live": self._live,
        }
        path = Path(self.config.channels_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)  # stream keys: 0600
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(state, indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            logger.error("channels_file %s not written (a restart will not have this change): %s", path, exc)

    def _avatars_in_use(self) -> dict[Path, list[str]]:
        """Paths every channel uses now or is switching to, with the channels' names (the avatar cache keeps them)."""
        used: dict[Path, list[str]] = {}
        for name, channel in list(self.channels.items()):
            for path in channel.uses():
                used.setdefault(path.resolve(), []).append(name)
        return used

    def remove_channel(self, name: str) -> str | None:
        """Delete a channel (``DELETE /channels/<name>``): its speech fades out, its FFmpeg flushes and exits.

        Its tasks end (cancelled), its work directory goes; the workers drop its avatar when their
        LRU evicts it (``engine.max_avatars_per_worker``). ``main`` cannot be removed. Once it is
        closed, nothing here refers to it any more, then ``after_release`` runs: its collection finds
        the channel unreachable and frees it now (its avatar's memory maps, its buffers), not at the
        next deletion's collection (issue 38's chaos soak: the last deleted channel's 10 descriptors
        outlived it).

        Returns:
            The stopped channel's status (``stopped``), or None if there is none of that name.

        Raises:
            ValueError: For ``main``.
        """
        if name == DEFAULT_CHANNEL:
            raise ValueError(f"channel {DEFAULT_CHANNEL!r} is the top-level stream: it cannot be deleted")
        with self._channels_lock:
            channel = self.channels.pop(name, None)
            self._specs.pop(name, None)
            self._kept.discard(name)
            if channel is not None:
                if name in self._configured:
                    self._deleted.add(name)
                self._live.pop(name, None)
                self._persist()
        if channel is None:
            return None
        channel.close()
        status, made_at = channel.status, channel.created_monotonic
        del channel  # the last reference here: the collection in after_release must find it unreachable
        logger.info("channel %s deleted", name)
        if self._after_release is not None:
            self._after_release(made_at, f"channel {name} deleted")
        return status

    # ----------------------------------------------------------------- health and metrics
    def uptime_s(self) -> float:
        """Seconds since the runtime was built."""
        return round(time.monotonic() - self._created_monotonic, 3)

    def health_snapshot(self) -> HealthSnapshot:
        """The main channel's typed health (cheap; ``/health``)."""
        return self.main.health_snapshot(self.uptime_s())

    def channel_snapshots(self) -> dict[str, HealthSnapshot]:
        """Every channel's typed health by name (every metrics scrape)."""
        uptime_s = self.uptime_s()
        return {name: channel.health_snapshot(uptime_s) for name, channel in list(self.channels.items())}

    def health(self) -> tuple[bool, dict]:
        """The main channel's health for ``GET /health`` (see :meth:`Channel.health`)."""
        return self.main.health(self.uptime_s())


def _engine_devices(device: str | None) -> list[str]:
    """Devices for the workers: the configured one, every visible GPU, or the CPU."""
    if device is not None:
        return [device]
    import torch  # only the latentsync engine needs it in the server process

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]
