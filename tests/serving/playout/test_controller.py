"""StreamingController tick accounting against test sinks (the sink is the seam we fake here)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import numpy as np
import pytest

from latentsync.media.timing import samples_before_frame
from latentsync.serving.playout.clock import ControllerStats, StreamingController
from latentsync.serving.playout.idle import IdleLoop
from latentsync.serving.playout.state import StreamState
from tests.streamtools import may_use_fifo, sched_policy, thread_niceness

FPS = 32  # binary-exact frame period (1/32 s): virtual times add up exactly
RATE = 44100  # 1378.125 samples per frame: the fractional remainder must be carried
PERIOD = 1.0 / FPS


def make_idle(frames: int = 7, with_audio: bool = True) -> IdleLoop:
    video = np.zeros((frames, 8, 8, 3), dtype=np.uint8)
    video[:, 0, 0, 0] = np.arange(frames)  # frame id in pixel (0, 0)
    audio = (np.arange(frames * 1000) % 30000).astype(np.int16) if with_audio else None
    return IdleLoop(video, audio)


class VirtualClock:
    """A monotonic clock that only moves when the controller waits or a sink spends time.

    ``wait(timeout_s)`` jumps ahead instead of sleeping and reports "stop" once the run length is
    reached, so the controller thread runs exactly the ticks due in ``[0, run_s)``.
    """

    def __init__(self, run_s: float = float("inf")):
        self.now = 0.0
        self.run_s = run_s
        self.finished = threading.Event()

    def __call__(self) -> float:
        return self.now

    def wait(self, timeout_s: float) -> bool:
        if self.now + timeout_s >= self.run_s:
            self.now = self.run_s
            self.finished.set()
            return True
        self.now += timeout_s
        return False


class RecordingSink:
    """Accepts everything; optionally spends virtual time per offer, refuses every n-th offer, or
    stops the controller after a number of offers."""

    def __init__(
        self, clock: VirtualClock | None = None, delay_s: float = 0.0, refuse_every: int = 0, stop_after: int = 0
    ):
        self.clock = clock
        self.delay_s = delay_s
        self.refuse_every = refuse_every
        self.stop_after = stop_after
        self.controller: StreamingController | None = None
        self.offers = 0
        self.frames: list[int] = []
        self.samples: list[int] = []
        self.audio: list[np.ndarray] = []

    def offer(self, video, audio):
        self.offers += 1
        if self.delay_s:
            self.clock.now += self.delay_s
        if self.stop_after and self.offers == self.stop_after:
            self.controller.close()  # from the clock thread: ends the loop after this tick
            self.clock.finished.set()
        if self.refuse_every and self.offers % self.refuse_every == 0:
            return False
        self.frames.append(int(video[0, 0, 0]))
        self.samples.append(len(audio))
        self.audio.append(audio.copy())
        return True


def run_virtual(source, sink: RecordingSink, clock: VirtualClock, **kwargs) -> ControllerStats:
    """Run the real clock thread on virtual time until the clock or the sink ends it."""
    controller = StreamingController(source, sink, fps=FPS, sample_rate_hz=RATE, clock=clock, wait=clock.wait, **kwargs)
    sink.controller = controller
    controller.start()
    assert clock.finished.wait(10), "the controller thread did not reach the end of the virtual run"
    controller.close()
    return controller.stats()


def test_emits_every_tick_on_schedule_with_exact_audio():
    clock = VirtualClock(run_s=1.0)
    sink = RecordingSink()
    stats = run_virtual(make_idle(), sink, clock)
    assert stats.state == StreamState.STOPPED
    # Ticks due at 0, 1/32, ..., 31/32 s: exactly 32 in one second, none late, none dropped.
    assert stats.ticks == stats.frames_emitted == len(sink.frames) == 32
    assert (stats.dropped_ticks, stats.late_ticks, stats.max_lateness_ms) == (0, 0, 0.0)
    assert stats.uptime_s == 1.0
    # Audio per emitted frame n is floor((n+1)*sr/fps) - floor(n*sr/fps): 1378 or 1379 at 44.1 kHz / 32 fps,
    # exactly 44100 over the second.
    assert sum(sink.samples) == samples_before_frame(32, RATE, FPS) == RATE
    assert set(sink.samples) == {1378, 1379}
    # The idle video loops frame by frame, the audio sample-continuously across the wrap.
    assert sink.frames[:9] == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    stream = np.concatenate(sink.audio)
    expected = (np.arange(len(stream)) % 7000 % 30000).astype(np.int16)
    np.testing.assert_array_equal(stream, expected)


def test_refused_ticks_are_counted_dropped_and_the_clock_keeps_going():
    clock = VirtualClock(run_s=1.0)
    sink = RecordingSink(refuse_every=4)
    stats = run_virtual(make_idle(), sink, clock)
    assert (stats.ticks, stats.dropped_ticks, stats.frames_emitted) == (32, 8, 24)
    assert len(sink.frames) == 24
    # Dropped ticks take no audio with them: what was emitted stays exact.
    assert sum(sink.samples) == samples_before_frame(24, RATE, FPS)


def test_slow_sink_makes_ticks_late_but_never_stops_the_clock():
    # Each offer takes 1.5 frame periods, so tick k is handled k/2 periods late. Ticks 2..16 are late
    # (lateness > half a period); tick 17 would be 8.5 periods late, over max_catchup_s (8 periods):
    # the clock re-anchors, counting ticks 17..24 as dropped, and resumes at tick 25 (half a period
    # late, not counted late), 26 and 27 (late). The sink ends the run at its 20th offer.
    clock = VirtualClock()
    sink = RecordingSink(clock, delay_s=1.5 * PERIOD, stop_after=20)
    stats = run_virtual(make_idle(), sink, clock, max_catchup_s=8 * PERIOD)
    assert stats.frames_emitted == 20
    assert stats.dropped_ticks == 8
    assert stats.ticks == 28 == stats.frames_emitted + stats.dropped_ticks
    assert stats.late_ticks == 15 + 2
    assert stats.max_lateness_ms == 8 * PERIOD * 1000  # tick 16; the skipped stall is not a late tick
    # The frames keep their order across the skip: the source is asked only for emitted ticks.
    assert sink.frames[:9] == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert sum(sink.samples) == samples_before_frame(20, RATE, FPS)


def test_pingpong_and_silence():
    clock = VirtualClock(run_s=8 * PERIOD)
    sink = RecordingSink()
    idle = IdleLoop(make_idle(4).frames, None, pingpong=True)
    stats = run_virtual(idle, sink, clock)
    assert stats.ticks == 8
    assert sink.frames == [0, 1, 2, 3, 2, 1, 0, 1]
    assert all(not a.any() for a in sink.audio)


def test_close_wakes_a_waiting_clock_at_once():
    # The default wait is the stop event: close() ends a clock that is waiting for its next tick (here
    # forever: the injected clock stands still a whole frame period before tick 1) without sleeping it out.
    controller = StreamingController(make_idle(), RecordingSink(), fps=1, sample_rate_hz=RATE, clock=lambda: 0.0)
    controller.start()
    deadline = time.monotonic() + 10
    while controller.stats().frames_emitted < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert controller.stats().frames_emitted == 1  # tick 0 is due at once
    controller.close(timeout_s=0.5)  # half the 1 s wait for tick 1
    assert not controller._thread.is_alive()
    assert controller.stats().frames_emitted == 1


def test_close_is_idempotent_and_safe_before_start():
    controller = StreamingController(make_idle(), RecordingSink(), fps=FPS, sample_rate_hz=RATE)
    controller.close()
    controller.close()
    controller.start()  # a closed controller does not start again
    assert controller.stats().ticks == 0


def test_idle_loop_rejects_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        IdleLoop(np.zeros((3, 8, 8, 3), dtype=np.float32), None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_the_clock_thread_runs_at_its_own_niceness_and_the_rest_of_the_process_does_not():
    class NicenessSink(RecordingSink):
        def offer(self, video, audio):
            self.niceness = thread_niceness()  # called on the clock thread
            return super().offer(video, audio)

    base = thread_niceness()
    sink = NicenessSink()
    stats = run_virtual(make_idle(), sink, VirtualClock(run_s=0.25), nice=3)  # raising needs no privilege
    assert stats.frames_emitted == 8
    assert sink.niceness == min(19, base + 3)
    assert thread_niceness() == base


def test_a_refused_niceness_is_a_warning_and_the_clock_still_ticks(monkeypatch, caplog):
    import latentsync.serving.playout.clock as clock_module

    asked = []
    # The seam: the kernel refusing (no CAP_SYS_NICE, RLIMIT_NICE 0) cannot be reached in a root test process.
    monkeypatch.setattr(clock_module, "renice_this_thread", lambda offset: asked.append(offset))
    with caplog.at_level(logging.WARNING, logger=clock_module.__name__):
        stats = run_virtual(make_idle(), RecordingSink(), VirtualClock(run_s=1.0), nice=-10)
    assert asked == [-10]
    assert stats.frames_emitted == 32 and stats.dropped_ticks == 0
    assert any("niceness -10 refused" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_FIFO per thread is Linux's")
def test_the_clock_thread_runs_under_sched_fifo_where_allowed_and_the_rest_of_the_process_does_not():
    class PolicySink(RecordingSink):
        def offer(self, video, audio):
            self.policy = sched_policy(), os.sched_getparam(0).sched_priority
            return super().offer(video, audio)

    sink = PolicySink()
    stats = run_virtual(make_idle(), sink, VirtualClock(run_s=0.25), rt_priority=5)
    assert stats.frames_emitted == 8
    assert sink.policy == ((os.SCHED_FIFO, 5) if may_use_fifo(5) else (os.SCHED_OTHER, 0))
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # this thread (and so the process's others) kept theirs


def test_a_refused_sched_fifo_is_a_warning_and_the_clock_still_ticks(monkeypatch, caplog):
    import latentsync.serving.playout.clock as clock_module

    asked = []
    # The seam: the kernel refusing (no CAP_SYS_NICE, RLIMIT_RTPRIO 0) cannot be reached in a root test process.
    monkeypatch.setattr(clock_module, "make_this_thread_realtime", lambda priority: asked.append(priority) or False)
    with caplog.at_level(logging.WARNING, logger=clock_module.__name__):
        stats = run_virtual(make_idle(), RecordingSink(), VirtualClock(run_s=1.0), rt_priority=10)
    assert asked == [10]
    assert stats.frames_emitted == 32 and stats.dropped_ticks == 0
    assert any("SCHED_FIFO priority 10 refused" in r.getMessage() for r in caplog.records)


class _Program:
    """A speech program of grey 8x8 frames whose ``frame()`` raises from frame ``breaks_at`` on."""

    def __init__(self, breaks_at: int):
        self.task_id = "t"
        self.in_gap = False
        self.num_frames = 10_000
        self.breaks_at = breaks_at
        self.asked = 0
        self.aborted: str | None = None

    def ready_to_start(self):
        return True

    def frame(self, index):
        self.asked += 1
        if index >= self.breaks_at:
            raise ValueError("faces of the wrong shape")
        return np.full((8, 8, 3), 200, np.uint8)

    def continuation_frame(self, index):
        return np.full((8, 8, 3), 100, np.uint8)

    def audio(self, start, count):
        return np.full(count, 7, np.int16)

    def is_cancelled(self):
        return False

    def on_air(self, event, frames):
        pass

    def abort(self, reason):
        self.aborted = reason


def test_a_program_that_raises_on_the_clock_thread_fails_and_the_clock_keeps_its_rate():
    from latentsync.serving.playout.mixer import ProgramMixer

    mixer = ProgramMixer(make_idle(), 0)
    program = _Program(breaks_at=8)
    mixer.enqueue(program)
    clock = VirtualClock(run_s=1.0)
    sink = RecordingSink()
    stats = run_virtual(mixer, sink, clock)
    assert stats.ticks == stats.frames_emitted == 32 and stats.tick_errors == 0  # every tick, on time
    assert program.aborted == "playout of task t failed: ValueError: faces of the wrong shape"
    assert program.asked == 9  # dropped at its first failure
    assert sink.frames[:8] == [200] * 8  # its speech, then the idle loop (frame ids 0..6) from the next tick
    assert sink.frames[8:15] == [0, 1, 2, 3, 4, 5, 6]
    assert all((a == 7).all() for a in sink.audio[:8]) and not any((a == 7).all() for a in sink.audio[8:])


class _Flaky:
    """A tick source that raises on the ticks in ``bad`` (every one from ``bad_from`` on)."""

    def __init__(self, bad: set[int], bad_from: int | None = None):
        self.idle = make_idle()
        self.bad, self.bad_from, self.calls = bad, bad_from, 0
        self.state = StreamState.IDLE

    def next(self, num_samples):
        self.calls += 1
        if self.calls - 1 in self.bad or (self.bad_from is not None and self.calls > self.bad_from):
            raise RuntimeError("mixer bug")
        return self.idle.next(num_samples)


def test_a_source_that_raises_gets_the_last_frame_in_silence_and_errors_are_logged_throttled(caplog):
    clock = VirtualClock(run_s=2.0)
    sink = RecordingSink()
    with caplog.at_level(logging.ERROR, logger="latentsync.serving.playout.clock"):
        stats = run_virtual(_Flaky(set(), bad_from=5), sink, clock)
    assert stats.ticks == stats.frames_emitted == 64  # the clock never stopped
    assert stats.tick_errors == 59
    assert sink.frames[:5] == [0, 1, 2, 3, 4] and set(sink.frames[5:]) == {4}  # the last frame, held
    assert not np.concatenate(sink.audio[5:]).any()  # in silence
    assert sum(sink.samples) == samples_before_frame(64, RATE, FPS)  # audio stays exact
    assert len([r for r in caplog.records if "tick source failed" in r.getMessage()]) == 1  # not once per tick


def test_a_sink_that_raises_counts_the_tick_dropped_and_the_clock_goes_on():
    class Raising(RecordingSink):
        def offer(self, video, audio):
            if self.offers in (3, 4):
                self.offers += 1
                raise OSError("pipe gone")
            return super().offer(video, audio)

    clock = VirtualClock(run_s=1.0)
    sink = Raising()
    stats = run_virtual(make_idle(), sink, clock)
    assert (stats.ticks, stats.frames_emitted, stats.dropped_ticks, stats.tick_errors) == (32, 30, 2, 2)


def test_an_observer_that_raises_is_logged_and_still_shown_the_next_ticks(caplog):
    from latentsync.serving.playout.tap import TappedSink

    seen: list[int] = []

    def observer(index, video, audio):
        if index < 3:
            raise RuntimeError("viewer hiccup")
        seen.append(index)

    clock = VirtualClock(run_s=1.0)
    inner = RecordingSink()
    tap = TappedSink(inner, [observer])
    with caplog.at_level(logging.ERROR):
        stats = run_virtual(make_idle(), tap, clock)  # type: ignore[arg-type]
    assert stats.ticks == stats.frames_emitted == 32
    assert seen == list(range(3, 32))  # shown every tick after its failures
    assert tap.observer_errors == 3
    assert len([r for r in caplog.records if "tick observer" in r.getMessage()]) == 1
