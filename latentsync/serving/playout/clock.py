"""StreamingController: the output clock that emits one frame and its audio every tick, forever.

Frame ``k`` is due at ``t0 + k / fps`` on the monotonic clock (a fixed schedule, so timing errors
never accumulate). At every tick the controller emits *something* and never waits on a producer.
The audio that rides with the ``n``-th emitted frame is exactly
``floor((n + 1) * sr / fps) - floor(n * sr / fps)`` samples, so the two FIFOs always carry the same
number of ticks and FFmpeg's count-derived PTS keep A/V in sync forever.

Nothing raised while a tick is made stops the clock: a source that raises (the mixer drops a
failing program itself; this guards against the rest) gets the last frame on air with silence
instead, a sink that raises counts the tick as dropped, and both are logged at most once per
:data:`ERROR_LOG_INTERVAL_S` with a count (:class:`ThrottledErrors`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from latentsync.media.timing import samples_in_frame
from latentsync.serving.ops.systemd import name_this_thread
from latentsync.serving.ops.threads import make_this_thread_realtime, renice_this_thread
from latentsync.serving.playout.state import StreamState

logger = logging.getLogger(__name__)

LATE_FRACTION = 0.5  # a tick emitted more than half a frame period after its due time is "late"
ERROR_LOG_INTERVAL_S = 10.0  # an error repeated every tick is logged at most this often


class ThrottledErrors:
    """Logs an error that may repeat at every tick: the first with its traceback, then one line per interval.

    Args:
        what: How the log names the failing thing (``"tick source"``, ``"tick observer <name>"``).
        interval_s: Seconds between two lines about it (the repeats meanwhile are counted in the next).
        clock: Monotonic clock in seconds.
    """

    def __init__(
        self, what: str, interval_s: float = ERROR_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ):
        self._what = what
        self._interval_s = float(interval_s)
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0
        self.count = 0  # errors seen

    def error(self, exc: BaseException) -> None:
        """Count ``exc``; log it unless a line about this thing was logged less than an interval ago."""
        self.count += 1
        now = self._clock()
        if self._logged_at is None:
            logger.error("%s failed: %s: %s", self._what, type(exc).__name__, exc, exc_info=exc)
        elif now - self._logged_at >= self._interval_s:
            logger.error(
                "%s failed %d more times in %.0f s; the last: %s: %s",
                self._what,
                self._unlogged + 1,
                now - self._logged_at,
                type(exc).__name__,
                exc,
            )
        else:
            self._unlogged += 1
            return
        self._logged_at = now
        self._unlogged = 0


class TickSink(Protocol):
    """Where ticks go (the channel's EgressSink behind the TappedSink, or a test double)."""

    def offer(self, video: np.ndarray, audio: np.ndarray) -> bool:
        """Queue ``(H, W, 3) uint8`` video + ``(N,) int16`` audio without blocking; False = refused."""
        ...


class TickSource(Protocol):
    """What the controller asks for one tick's content (the IdleLoop, or the ProgramMixer)."""

    @property
    def state(self) -> StreamState:
        """What the source is putting on air."""
        ...

    def next(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the next ``(H, W, 3) uint8`` frame and ``(num_samples,) int16`` audio; never blocks."""
        ...


@dataclass(frozen=True, kw_only=True)
class ControllerStats:
    """Tick accounting since the controller started.

    Attributes:
        state: Current :class:`StreamState`.
        ticks: Clock ticks that have come due (``frames_emitted + dropped_ticks``).
        frames_emitted: Ticks whose frame + audio the sink accepted (every encoder took them).
        dropped_ticks: Ticks refused by the sink, or skipped after a stall longer than
            ``max_catchup_s`` (video and audio always dropped together).
        late_ticks: Ticks handled more than half a frame period after their due time.
        max_lateness_ms: Largest lateness of any tick, in milliseconds.
        last_tick_monotonic: ``time.monotonic()`` of the last handled tick (0 before the first).
        uptime_s: Seconds since the clock started (0 before start).
        tick_errors: Ticks whose source or sink raised (logged, throttled): the source's got the last
            frame with silence, the sink's were counted dropped.
    """

    state: StreamState
    ticks: int
    frames_emitted: int
    dropped_ticks: int
    late_ticks: int
    max_lateness_ms: float
    last_tick_monotonic: float
    uptime_s: float
    tick_errors: int = 0


class StreamingController:
    """Owns the output clock thread.

    Args:
        source: What each tick shows and sounds (the ProgramMixer, or a bare IdleLoop).
        sink: Where each tick's frame and audio go.
        fps: Frames per second of the output.
        sample_rate_hz: Audio samples per second of the output.
        max_catchup_s: After a stall longer than this (seconds), the clock is re-anchored to now and
            the missed ticks are counted as dropped instead of being emitted in a burst.
        nice: Niceness added to the clock thread when it starts (negative: ahead of the process's
            other threads and of FFmpeg's encoder threads when a core frees up; see
            :func:`latentsync.serving.ops.threads.renice_this_thread`). When the system refuses
            (no ``CAP_SYS_NICE``, ``RLIMIT_NICE`` too low) the clock logs a warning and runs at the
            process's niceness. 0: left alone.
        rt_priority: ``SCHED_FIFO`` priority (1..99) the clock thread asks for after ``nice``: woken,
            it then waits for no ordinary thread (:func:`latentsync.serving.ops.threads.make_this_thread_realtime`).
            Refused, it logs a warning and keeps ``nice``. 0: ordinary scheduling only.
        clock: Monotonic clock in seconds (default ``time.monotonic``; tests inject a virtual one).
        wait: ``wait(timeout_s) -> bool`` blocks up to ``timeout_s`` seconds and returns True when the
            clock must stop (default: the controller's own stop event, so :meth:`close` wakes it at
            once). Tests inject one that advances a virtual clock instead of sleeping.
    """

    def __init__(
        self,
        source: TickSource,
        sink: TickSink,
        *,
        fps: int,
        sample_rate_hz: int,
        max_catchup_s: float = 1.0,
        nice: int = 0,
        rt_priority: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ):
        self._source = source
        self._sink = sink
        self._fps = int(fps)
        self._sample_rate_hz = int(sample_rate_hz)
        self._max_catchup_s = float(max_catchup_s)
        self._nice = int(nice)
        self._rt_priority = int(rt_priority)
        self._clock = clock
        self._stop = threading.Event()
        self._wait = wait if wait is not None else self._stop.wait
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()  # start() and close() may race (a channel deleted while it starts)
        self._state = StreamState.STARTING
        self._t0 = 0.0
        self._started = False
        self._ticks = 0
        self._emitted = 0
        self._dropped = 0
        self._late = 0
        self._max_lateness_s = 0.0
        self._last_tick = 0.0
        self._last_video: np.ndarray | None = (
            None  # the last frame the source gave (a source that raises gets it again)
        )
        self._source_errors = ThrottledErrors("tick source", clock=clock)
        self._sink_errors = ThrottledErrors("tick sink", clock=clock)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the clock thread. Safe to call twice, and a no-op once :meth:`close` was called."""
        with self._lifecycle:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="streaming-controller", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the clock thread (waits at most ``timeout_s`` seconds).

        Safe to call twice, before start, and from the clock thread itself (a sink or source may stop
        the stream; the loop then ends after the current tick without joining itself).
        """
        with self._lifecycle:
            self._stop.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self._state = StreamState.STOPPED

    @property
    def native_thread_id(self) -> int | None:
        """OS thread id of the clock thread (for per-thread CPU accounting), or None before start."""
        return self._thread.native_id if self._thread is not None else None

    def stats(self) -> ControllerStats:
        """Return a snapshot of the tick accounting."""
        return ControllerStats(
            state=self._source.state if self._state is not StreamState.STOPPED and self._started else self._state,
            ticks=self._ticks,
            frames_emitted=self._emitted,
            dropped_ticks=self._dropped,
            late_ticks=self._late,
            max_lateness_ms=self._max_lateness_s * 1000.0,
            last_tick_monotonic=self._last_tick,
            uptime_s=(self._clock() - self._t0) if self._started else 0.0,
            tick_errors=self._source_errors.count + self._sink_errors.count,
        )

    # ----------------------------------------------------------------- clock
    def _run(self) -> None:
        name_this_thread("ls-clock")  # the thread systemd's watchdog vouches for, findable by name
        if self._nice:
            # Woken on time but queued behind runnable threads, a clock at the process's niceness was
            # up to 20 ms late with the cores half idle (docs/performance.md "Clock priority").
            niceness = renice_this_thread(self._nice)
            if niceness is None:
                logger.warning(
                    "clock thread: niceness %+d refused (needs CAP_SYS_NICE or RLIMIT_NICE, e.g. systemd "
                    "LimitNICE=30); it runs at the process's niceness",
                    self._nice,
                )
            else:
                logger.info("clock thread at niceness %d", niceness)
        if self._rt_priority:
            # At niceness -10 a woken clock still waited up to 11 ms for a core behind ordinary
            # threads; under SCHED_FIFO it waited none (docs/performance.md "Clock priority").
            if make_this_thread_realtime(self._rt_priority):
                logger.info("clock thread under SCHED_FIFO at priority %d", self._rt_priority)
            else:
                logger.warning(
                    "clock thread: SCHED_FIFO priority %d refused (needs CAP_SYS_NICE or RLIMIT_RTPRIO, e.g. "
                    "systemd LimitRTPRIO=10 with RestrictRealtime=false); it keeps ordinary scheduling",
                    self._rt_priority,
                )
        period_s = 1.0 / self._fps
        self._t0 = self._clock()
        self._started = True
        self._state = StreamState.IDLE
        tick = 0  # clock tick index k: due at t0 + k / fps
        while not self._stop.is_set():
            due = self._t0 + tick * period_s
            now = self._clock()
            if now < due:
                if self._wait(due - now):
                    break
                continue
            lateness = now - due
            if lateness > self._max_catchup_s:
                missed = int(lateness / period_s)
                logger.warning("controller stalled %.0f ms: skipping %d ticks", lateness * 1000, missed)
                self._dropped += missed
                self._ticks += missed
                tick += missed
                continue
            self._emit_one()
            self._ticks += 1
            self._max_lateness_s = max(self._max_lateness_s, lateness)
            if lateness > LATE_FRACTION * period_s:
                self._late += 1
            self._last_tick = now
            tick += 1

    def _emit_one(self) -> None:
        num_samples = samples_in_frame(self._emitted, self._sample_rate_hz, self._fps)
        try:
            video, audio = self._source.next(num_samples)
            self._last_video = video
        except Exception as exc:  # the clock outlives any one bad tick
            self._source_errors.error(exc)
            if self._last_video is None:
                self._dropped += 1
                return
            video, audio = self._last_video, np.zeros(num_samples, dtype=np.int16)
        try:
            accepted = self._sink.offer(video, audio)
        except Exception as exc:
            self._sink_errors.error(exc)
            accepted = False
        if accepted:
            self._emitted += 1
        else:
            self._dropped += 1
