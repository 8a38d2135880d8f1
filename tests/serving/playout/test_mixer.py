"""ProgramMixer: crossfades, speech audio on its first frame, underruns, back-to-back programs, interrupts."""

from __future__ import annotations

import numpy as np
import pytest

from latentsync.serving.playout.idle import IdleLoop
from latentsync.serving.playout.mixer import ProgramMixer
from latentsync.serving.playout.state import StreamState

N = 1920  # samples per tick (48 kHz at 25 fps)
FADE = 5


def idle_loop() -> IdleLoop:
    frames = np.zeros((10, 4, 4, 3), dtype=np.uint8)  # black
    audio = np.full(10 * N, 1000, dtype=np.int16)  # constant idle hum
    return IdleLoop(frames, audio)


class FakeProgram:
    """Frames are flat grey at 200 with the frame index in pixel (0, 0); audio sample i is i % 30000."""

    def __init__(self, task_id: str, num_frames: int, available: int | None = None, ready: bool = True):
        self.task_id = task_id
        self.num_frames = num_frames
        self.available = num_frames if available is None else available
        self.ready = ready
        self.cancelled = False
        self.events: list[tuple[str, int]] = []
        self.audio_track = (np.arange(num_frames * N) % 30000).astype(np.int16)

    def ready_to_start(self):
        return self.ready

    def frame(self, index):
        if index >= self.available:
            return None
        f = np.full((4, 4, 3), 200, dtype=np.uint8)
        f[0, 0, 0] = index % 200
        return f

    def continuation_frame(self, index):
        return np.full((4, 4, 3), 100, dtype=np.uint8)

    def audio(self, start, count):
        out = np.zeros(count, dtype=np.int16)
        chunk = self.audio_track[start : start + count]
        out[: len(chunk)] = chunk
        return out

    def is_cancelled(self):
        return self.cancelled

    def on_air(self, event, frames):
        self.events.append((event, frames))

    def abort(self, reason):
        self.aborted = reason


class BrokenProgram(FakeProgram):
    """A FakeProgram whose ``method`` raises (or, for ``frame``, returns ``bad``) from call ``after`` on."""

    def __init__(self, task_id, num_frames, method, after=0, bad=None):
        super().__init__(task_id, num_frames)
        self.method, self.after, self.bad, self.calls = method, after, bad, 0
        self.aborted = None

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name != object.__getattribute__(self, "method"):
            return attr

        def broken(*args):
            self.calls += 1
            if self.calls > self.after:
                if self.bad is not None:
                    return self.bad
                raise RuntimeError(f"{name} exploded")
            return attr(*args)

        return broken


def run(mixer: ProgramMixer, ticks: int):
    out = []
    for _ in range(ticks):
        frame, audio = mixer.next(N)
        out.append((mixer.state, frame.copy(), audio.copy()))
    return out


def test_idle_fade_in_speech_fade_out_idle():
    mixer = ProgramMixer(idle_loop(), FADE)
    assert [s for s, _, _ in run(mixer, 3)] == [StreamState.IDLE] * 3
    program = FakeProgram("a", 20)
    assert mixer.enqueue(program)
    ticks = run(mixer, 20 + FADE + 3)
    states = [mixer_state for mixer_state, _, _ in ticks]
    # A crossfade of FADE frames: FADE - 1 blends, then on its FADE-th frame what comes in, alone.
    # Fade in (the program already plays), speak, fade out, idle.
    assert states[: FADE - 1] == [StreamState.FADE_IN] * (FADE - 1)
    assert states[FADE - 1 : 20] == [StreamState.SPEAKING] * (20 - FADE + 1)
    assert states[20 : 20 + FADE - 1] == [StreamState.FADE_OUT] * (FADE - 1)
    assert states[20 + FADE - 1 :] == [StreamState.IDLE] * 4
    # Video: blended from black towards the program's grey, strictly increasing, then pure.
    grey = [int(f[1, 1, 0]) for _, f, _ in ticks]
    assert grey[: FADE - 1] == sorted(grey[: FADE - 1]) and 0 < grey[0] < grey[FADE - 2] < 200
    assert grey[FADE - 1 : 20] == [200] * (20 - FADE + 1)
    # The program's own frames play in order from its first frame, none skipped.
    assert [int(f[0, 0, 0]) for _, f, _ in ticks[FADE - 1 : 20]] == list(range(FADE - 1, 20))
    # Audio: the speech starts on the program's first frame at full level; the idle hum fades out under it.
    speech = np.concatenate([a for _, _, a in ticks[:20]]).astype(np.int64)
    hum = speech - program.audio_track[: 20 * N]
    assert hum[0] > 0 and np.all(np.diff(hum[::N][:FADE]) < 0) and np.all(hum[(FADE - 1) * N :] == 0)
    # After the program: hum fades back in, at full level on the fade's FADE-th frame.
    tail = [int(a[0]) for _, _, a in ticks[20:]]
    assert tail == sorted(tail) and tail[FADE - 2] < 1000 == tail[FADE - 1]
    assert program.events == [("first_frame", 0), ("done", 20), ("off_air", 20 + FADE - 1)]
    assert mixer.programs_finished == 1 and mixer.underrun_ticks == 0


def test_underrun_holds_the_last_frame_in_silence_and_keeps_sync():
    mixer = ProgramMixer(idle_loop(), 0)
    program = FakeProgram("a", 30, available=10)
    mixer.enqueue(program)
    first = run(mixer, 14)
    assert [int(f[0, 0, 0]) for _, f, _ in first[:10]] == list(range(10))
    for _, frame, audio in first[10:]:  # underrun: last frame held, silence
        assert int(frame[0, 0, 0]) == 9 and not audio.any()
    assert mixer.underrun_ticks == 4
    program.available = 30  # the next chunk arrives
    rest = run(mixer, 21)  # its frames 10..29, then idle (a cut: off air on the first idle tick)
    # Frame 10 comes with audio of frame 10: the pause did not shift speech against video.
    assert int(rest[0][1][0, 0, 0]) == 10
    np.testing.assert_array_equal(rest[0][2], program.audio_track[10 * N : 11 * N])
    assert program.events[-1] == ("off_air", 30) and rest[-1][0] is StreamState.IDLE


def test_back_to_back_programs_never_return_to_idle():
    mixer = ProgramMixer(idle_loop(), FADE)
    a, b = FakeProgram("a", 12), FakeProgram("b", 12)
    mixer.enqueue(a)
    mixer.enqueue(b)
    states = [s for s, _, _ in run(mixer, 24 + FADE)]
    assert StreamState.IDLE not in states[:24]
    assert states[12 : 12 + FADE - 1] == [StreamState.FADE_IN] * (FADE - 1)  # speech→speech crossfade
    assert states[12 + FADE - 1] is StreamState.SPEAKING
    assert a.events == [("first_frame", 0), ("done", 12), ("off_air", 12 + FADE - 1)]  # faded under b's start
    assert b.events[-2:] == [("done", 12), ("off_air", 12 + FADE - 1)]


def test_program_waits_for_the_jitter_buffer():
    mixer = ProgramMixer(idle_loop(), FADE)
    program = FakeProgram("a", 10, ready=False)
    mixer.enqueue(program)
    assert {s for s, _, _ in run(mixer, 5)} == {StreamState.IDLE}
    program.ready = True
    assert run(mixer, 1)[0][0] is StreamState.FADE_IN


def test_interrupt_on_air_fades_out_within_crossfade_frames():
    mixer = ProgramMixer(idle_loop(), FADE)
    program = FakeProgram("a", 100)
    mixer.enqueue(program)
    run(mixer, 20)
    mixer.interrupt("a")
    ticks = run(mixer, FADE + 1)
    assert [s for s, _, _ in ticks[: FADE - 1]] == [StreamState.FADE_OUT] * (FADE - 1)
    assert [s for s, _, _ in ticks[FADE - 1 :]] == [StreamState.IDLE] * 2
    # Interrupted at frame 20; off air (idle back) on the FADE-th tick, after FADE - 1 blended frames.
    assert program.events[-2:] == [("interrupted", 20), ("off_air", 20 + FADE - 1)]
    # The speech fades out under the returning hum instead of being cut.
    speech_level = [np.abs(a.astype(np.int64) - 1000).mean() for _, _, a in ticks[:FADE]]
    assert speech_level == sorted(speech_level, reverse=True)
    assert mixer.programs_interrupted == 1


@pytest.mark.parametrize("fade", [0, 1, 2, 3, FADE])
def test_a_crossfade_of_n_frames_reaches_its_target_on_its_nth_frame(fade):
    """Fade-in and fade-out on interrupt: n - 1 blends (weights k / n), then the target alone on tick n; 0, 1: cuts."""
    n = max(fade, 1)
    mixer = ProgramMixer(flat_loop(0, 1000), fade)
    run(mixer, 2)
    program = FakeProgram("a", 100)
    mixer.enqueue(program)
    # Fade-in, from the program's first tick S: S .. S+n-2 blends of black into its grey 200, S+n-1 its frame alone.
    fade_in = run(mixer, n)
    assert [s for s, _, _ in fade_in] == [StreamState.FADE_IN] * (n - 1) + [StreamState.SPEAKING]
    speech_weight = [int(f[1, 1, 0]) / 200 for _, f, _ in fade_in[:-1]]
    assert np.all(np.diff(speech_weight) > 0)
    np.testing.assert_allclose(speech_weight, [k / n for k in range(1, n)], atol=0.01)
    np.testing.assert_array_equal(fade_in[-1][1], program.frame(n - 1))
    np.testing.assert_array_equal(fade_in[-1][2], program.audio((n - 1) * N, N))
    run(mixer, 3)
    on_air = n + 3  # frames of the program played so far
    # Interrupt applied at tick T: T .. T+n-2 blends of its continuation (grey 100) into black, T+n-1 idle alone,
    # the program off air on that very tick.
    mixer.interrupt("a")
    idle_weight = []
    for _ in range(n - 1):
        state, frame, _ = run(mixer, 1)[0]
        assert state is StreamState.FADE_OUT and mixer.tick_task_id == "a"
        assert program.events[-1] == ("interrupted", on_air)  # not off air yet
        idle_weight.append(1 - int(frame[1, 1, 0]) / 100)
    assert np.all(np.diff(idle_weight) > 0)
    np.testing.assert_allclose(idle_weight, [k / n for k in range(1, n)], atol=0.01)
    state, frame, audio = run(mixer, 1)[0]
    assert state is StreamState.IDLE and mixer.tick_task_id is None
    assert not frame.any() and (audio == 1000).all()  # the pure idle frame and hum
    assert program.events[-1] == ("off_air", on_air + n - 1)


def test_interrupt_or_cancel_of_a_queued_program_drops_it():
    mixer = ProgramMixer(idle_loop(), 0)
    a, b, c = FakeProgram("a", 5), FakeProgram("b", 5), FakeProgram("c", 5)
    for p in (a, b, c):
        mixer.enqueue(p)
    mixer.interrupt("b")
    c.cancelled = True
    run(mixer, 20)
    assert a.events[-2:] == [("done", 5), ("off_air", 5)]
    assert b.events == [] and c.events == []
    assert mixer.pending() == 0


def test_failed_generation_fades_out_instead_of_holding_forever():
    mixer = ProgramMixer(idle_loop(), FADE)
    program = FakeProgram("a", 40, available=16)
    mixer.enqueue(program)
    run(mixer, 16)
    program.cancelled = True  # what SpeechProgram reports once the missing chunk will never come
    ticks = run(mixer, FADE + 1)
    assert [s for s, _, _ in ticks] == [StreamState.FADE_OUT] * (FADE - 1) + [StreamState.IDLE] * 2
    assert mixer.underrun_ticks == 0


def test_playlist_is_bounded():
    mixer = ProgramMixer(idle_loop(), FADE, max_programs=2)
    assert mixer.enqueue(FakeProgram("a", 5, ready=False))
    assert mixer.enqueue(FakeProgram("b", 5))
    assert not mixer.enqueue(FakeProgram("c", 5))


def test_finished_tasks_release_their_audio():
    from latentsync.serving.playout.mixer import ProgramEvent
    from latentsync.serving.tasks.speech_program import SpeechProgram
    from latentsync.serving.tasks.task import Task, TaskState
    from latentsync.serving.tasks.utterance import Utterance
    from tests.fakes import settings

    task = Task(task_id="t")
    utterance = Utterance(task, fps=25, sample_rate_hz=48000, limits=settings().uploaded)
    utterance.push(np.full(10 * N, 1 / 32768, np.float32), 48000)
    utterance.end()
    task.transition(TaskState.preparing)
    task.transition(TaskState.generating)
    program = SpeechProgram(
        task,
        utterance,
        avatar=None,
        fps=25,
        lookahead_frames=1,
        min_chunk_frames=4,
        max_frames_ahead=768,
        start_margin_s=0.04,
    )
    assert program.audio(0, 4).tolist() == [1, 1, 1, 1]
    program.on_air(ProgramEvent.FIRST_FRAME, 0)
    program.on_air(ProgramEvent.DONE, 10)
    assert task.state is TaskState.done
    assert task.history == [
        TaskState.queued,
        TaskState.preparing,
        TaskState.generating,
        TaskState.streaming,
        TaskState.done,
    ]
    program.on_air(ProgramEvent.OFF_AIR, 15)  # the fade back to idle is over
    assert task.audio is None and task.to_json()["audio_duration_s"] == 0.4
    assert program.audio(0, 4).tolist() == [0, 0, 0, 0]


def flat_loop(value: int, hum: int) -> IdleLoop:
    return IdleLoop(np.full((10, 4, 4, 3), value, dtype=np.uint8), np.full(10 * N, hum, dtype=np.int16))


def test_an_idle_switch_waits_for_the_idle_moment_then_crossfades_old_loop_into_new():
    mixer = ProgramMixer(flat_loop(0, 1000), FADE)
    mixer.enqueue(FakeProgram("a", 8))  # on air on ticks 1..8, fading back to idle on ticks 9..12, idle on 13
    ticks = run(mixer, 2)
    switched = []
    mixer.switch_idle(flat_loop(250, 3000), lambda: switched.append(mixer.ticks))
    ticks += run(mixer, 8 + FADE + FADE + 2 - 2)
    states = [s for s, _, _ in ticks]
    grey = [int(f[1, 1, 0]) for _, f, _ in ticks]
    # The speech and its fade-out back to the old (black) loop are untouched by the waiting switch.
    assert states[:8] == [StreamState.FADE_IN] * (FADE - 1) + [StreamState.SPEAKING] * (8 - FADE + 1)
    fade_back = grey[8 : 8 + FADE - 1]
    assert states[8 : 8 + FADE - 1] == [StreamState.FADE_OUT] * (FADE - 1)
    assert fade_back == sorted(fade_back, reverse=True) and 0 < fade_back[-1] < fade_back[0] < 200
    assert states[8 + FADE - 1] is StreamState.IDLE and grey[8 + FADE - 1] == 0  # the old loop alone
    assert switched == [8 + FADE + 1], "the switch begins on the first tick after the fade-out ended"
    # Then the old loop crossfades into the new one (the hum too), strictly increasing, then the new loop.
    switch = grey[8 + FADE : 8 + 2 * FADE - 1]
    assert states[8 + FADE : 8 + 2 * FADE - 1] == [StreamState.FADE_OUT] * (FADE - 1)
    assert switch == sorted(switch) and 0 < switch[0] < switch[-1] < 250
    hums = [int(a[0]) for _, _, a in ticks[8 + FADE : 8 + 2 * FADE - 1]]
    assert hums == sorted(hums) and 1000 < hums[0] < hums[-1] < 3000
    assert grey[8 + 2 * FADE - 1 :] == [250] * 3 and int(ticks[8 + 2 * FADE - 1][2][0]) == 3000
    assert states[8 + 2 * FADE - 1 :] == [StreamState.IDLE] * 3
    assert not mixer.idle_switch_pending and mixer.idle_switches == 1


def test_a_program_queued_after_a_switch_request_brings_the_new_loop_with_it():
    mixer = ProgramMixer(flat_loop(0, 1000), FADE)
    mixer.enqueue(FakeProgram("old", 6))
    run(mixer, 3)  # the old avatar's program is on air
    mixer.switch_idle(flat_loop(250, 3000))
    mixer.enqueue(FakeProgram("new", 6))  # back to back: there is no idle moment in between
    ticks = run(mixer, 3 + 6 + FADE + 2)
    assert mixer.idle_switches == 1 and mixer.programs_finished == 2
    # After the new program the stream fades out into the new loop, never back to the old one.
    assert [int(f[1, 1, 0]) for _, f, _ in ticks[-2:]] == [250, 250]
    assert all(s is not StreamState.IDLE for s, _, _ in ticks[: 3 + 6])


def test_a_program_whose_frame_raises_is_dropped_with_a_reason_and_idle_follows():
    mixer = ProgramMixer(idle_loop(), FADE)
    program = BrokenProgram("a", 40, "frame", after=10)
    mixer.enqueue(program)
    ticks = run(mixer, 10 + 1 + FADE + 5)  # 10 frames, then its 11th raises
    assert [s for s, _, _ in ticks[:10]] == [StreamState.FADE_IN] * (FADE - 1) + [StreamState.SPEAKING] * (
        10 - FADE + 1
    )
    assert program.aborted == "playout of task a failed: RuntimeError: frame exploded"
    assert mixer.programs_failed == 1 and mixer.current_task_id is None
    # The last frame on air (its frame 9) fades to idle, in the idle hum, then idle goes on.
    assert [s for s, _, _ in ticks[10 : 10 + FADE - 1]] == [StreamState.FADE_OUT] * (FADE - 1)
    held = [int(f[1, 1, 0]) for _, f, _ in ticks[10 : 10 + FADE - 1]]
    assert held == sorted(held, reverse=True) and held[0] < 200 and held[-1] > 0
    assert [s for s, _, _ in ticks[10 + FADE - 1 :]] == [StreamState.IDLE] * 7
    assert not ticks[-1][1].any() and (ticks[-1][2] == 1000).all()
    assert program.calls == 11  # never asked again


def test_a_program_whose_frame_is_not_the_streams_is_dropped_and_the_next_one_plays():
    mixer = ProgramMixer(idle_loop(), 0)
    wrong = BrokenProgram("wrong", 20, "frame", after=3, bad=np.zeros((8, 8, 3), np.uint8))
    nxt = FakeProgram("next", 5)
    mixer.enqueue(wrong)
    mixer.enqueue(nxt)
    ticks = run(mixer, 10)
    assert "frame is (8, 8, 3) uint8, the stream's are (4, 4, 3) uint8" in wrong.aborted
    # Its 3 frames, then the next program cuts in at once: every tick is (4, 4, 3).
    assert [int(f[0, 0, 0]) for _, f, _ in ticks[:8]] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert {f.shape for _, f, _ in ticks} == {(4, 4, 3)}
    assert nxt.events[0] == ("first_frame", 0) and ("done", 5) in nxt.events


@pytest.mark.parametrize(
    ("method", "fade"),
    [
        (method, fade)
        for method in ("audio", "on_air", "ready_to_start", "is_cancelled", "continuation_frame")
        for fade in (0, FADE)
        if method != "continuation_frame" or fade  # without a crossfade nothing asks for a continuation frame
    ],
)
def test_a_program_whose_audio_or_callback_or_jitter_check_raises_is_dropped_and_ticks_go_on(method, fade, caplog):
    mixer = ProgramMixer(idle_loop(), fade)
    run(mixer, 2)
    program = BrokenProgram("a", 6, method)
    after = FakeProgram("b", 4)
    mixer.enqueue(program)
    mixer.enqueue(after)
    ticks = run(mixer, 30)
    assert ticks[-1][0] is StreamState.IDLE
    assert program.aborted == f"playout of task a failed: RuntimeError: {method} exploded"
    assert mixer.pending() == 0 and mixer.programs_failed == 1
    assert ("done", 4) in after.events  # the next program plays
    assert "illegal move" not in caplog.text
