"""StreamingController tick accounting against test sinks (the sink is the seam we fake here)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from latentsync.media.timing import samples_before_frame
from latentsync.serving.streaming import IdleLoop, StreamingController, StreamState

FPS = 50
RATE = 44100  # 882 samples per frame at 50 fps; with 30 fps below, fractional


def make_idle(frames: int = 7, with_audio: bool = True) -> IdleLoop:
    video = np.zeros((frames, 8, 8, 3), dtype=np.uint8)
    video[:, 0, 0, 0] = np.arange(frames)  # frame id in pixel (0, 0)
    audio = (np.arange(frames * 1000) % 30000).astype(np.int16) if with_audio else None
    return IdleLoop(video, audio)


class RecordingSink:
    """Accepts everything, optionally slowly, optionally refusing some ticks."""

    def __init__(self, delay_s: float = 0.0, refuse_every: int = 0):
        self.delay_s = delay_s
        self.refuse_every = refuse_every
        self.offers = 0
        self.frames: list[int] = []
        self.samples: list[int] = []
        self.audio: list[np.ndarray] = []
        self.lock = threading.Lock()

    def offer(self, video, audio):
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.lock:
            self.offers += 1
            if self.refuse_every and self.offers % self.refuse_every == 0:
                return False
            self.frames.append(int(video[0, 0, 0]))
            self.samples.append(len(audio))
            self.audio.append(audio.copy())
            return True


def run_for(controller: StreamingController, seconds: float):
    controller.start()
    time.sleep(seconds)
    controller.close()
    return controller.stats()


def test_emits_every_tick_on_schedule_with_exact_audio():
    sink = RecordingSink()
    stats = run_for(StreamingController(make_idle(), sink, fps=30, sample_rate_hz=RATE), 1.0)
    assert stats.state == StreamState.STOPPED
    assert stats.frames_emitted == len(sink.frames) == stats.ticks
    assert 20 <= stats.ticks <= 40  # one second at 30 fps (wide: CI machines are shared)
    assert stats.dropped_ticks == 0
    # Audio per emitted frame n is floor((n+1)*sr/fps) - floor(n*sr/fps): 1470 each at 44.1 kHz / 30 fps.
    assert sum(sink.samples) == samples_before_frame(len(sink.samples), RATE, 30)
    # The idle video loops frame by frame, the audio sample-continuously across the wrap.
    assert sink.frames[:9] == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    stream = np.concatenate(sink.audio)
    expected = (np.arange(len(stream)) % 7000 % 30000).astype(np.int16)
    np.testing.assert_array_equal(stream, expected)


def test_refused_ticks_are_counted_dropped_and_the_clock_keeps_going():
    sink = RecordingSink(refuse_every=4)
    stats = run_for(StreamingController(make_idle(), sink, fps=FPS, sample_rate_hz=RATE), 1.0)
    assert stats.ticks >= 45
    assert stats.dropped_ticks == sink.offers // 4
    assert stats.frames_emitted == len(sink.frames) == stats.ticks - stats.dropped_ticks
    # Dropped ticks take no audio with them: what was emitted stays exact.
    assert sum(sink.samples) == samples_before_frame(stats.frames_emitted, RATE, FPS)


def test_slow_sink_makes_ticks_late_but_never_stops_the_clock():
    # Each offer takes 1.5 frame periods: the clock falls behind, counts late ticks, and re-anchors
    # after max_catchup_s, counting the skipped ticks as dropped instead of bursting them.
    sink = RecordingSink(delay_s=1.5 / FPS)
    controller = StreamingController(make_idle(), sink, fps=FPS, sample_rate_hz=RATE, max_catchup_s=0.2)
    stats = run_for(controller, 1.5)
    assert stats.late_ticks > 0
    assert stats.max_lateness_ms > 1000 / FPS / 2
    assert stats.max_lateness_ms <= 200 + 2 * 1.5 * 1000 / FPS  # bounded by the catch-up limit
    assert stats.dropped_ticks > 0
    assert stats.ticks == stats.frames_emitted + stats.dropped_ticks
    # The schedule is kept: ticks due over 1.5 s are all accounted for (emitted or dropped).
    assert stats.ticks == pytest.approx(1.5 * FPS, abs=15)


def test_pingpong_and_silence():
    sink = RecordingSink()
    idle = IdleLoop(make_idle(4).frames, None, pingpong=True)
    run_for(StreamingController(idle, sink, fps=FPS, sample_rate_hz=RATE), 0.4)
    assert sink.frames[:8] == [0, 1, 2, 3, 2, 1, 0, 1]
    assert all(not a.any() for a in sink.audio)


def test_close_is_idempotent_and_safe_before_start():
    controller = StreamingController(make_idle(), RecordingSink(), fps=FPS, sample_rate_hz=RATE)
    controller.close()
    controller.close()
    controller.start()  # a closed controller does not start again
    assert controller.stats().ticks == 0


def test_idle_loop_rejects_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        IdleLoop(np.zeros((3, 8, 8, 3), dtype=np.float32), None)
