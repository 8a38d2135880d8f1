"""Speech that streams in (tasks/utterance.py, speech_program.py, task_processor.py) on the fakes of tests/fakes.py.

The job queue and the playout are fakes (their seams); the utterance, its processor and its
program are the real ones. No timing assertions: every wait is for a condition with a generous
timeout, and "no job yet" is only asserted where the processor cannot have made one.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from latentsync.engines import CHUNK_FRAMES
from latentsync.serving.playout.mixer import ProgramEvent
from latentsync.serving.tasks.speech_audio import PcmFormat, SpeechError
from latentsync.serving.tasks.task import TaskKind, TaskState
from tests.fakes import (
    FPS,
    RATE,
    SAMPLES_PER_FRAME,
    FakeAvatar,
    FakePool,
    FramesAvatar,
    fake_manager,
    speech,
    submit_upload,
    tone,
    wait_for,
)

LOOKAHEAD = 1  # the parametric engine's (latentsync.engines.LOOKAHEAD_FRAMES)


@pytest.fixture
def streams():
    pool = FakePool()
    manager, playlist = fake_manager(
        pool,
        FramesAvatar(),
        "speech_stream.max_open=2",
        "speech_stream.max_buffered_s=4",
        "speech_stream.idle_timeout_s=30",
    )
    yield manager, pool, playlist
    manager.close()


def push_until(u, frames: int, start_frame: int) -> int:
    """Push tone frame by frame from ``start_frame`` until ``frames`` whole frames are received; the next frame."""
    while u.received_frames() < frames:
        u.push(tone(1, start_frame), RATE)
        start_frame += 1
    return start_frame


def test_pcm_formats_are_validated_and_decoded():
    for bad, code in [
        (dict(sample_rate_hz=16000, encoding="mp3"), "bad_encoding"),
        (dict(sample_rate_hz=100), "bad_sample_rate"),
        (dict(sample_rate_hz=16000.5), "bad_sample_rate"),
        (dict(sample_rate_hz=16000, channels=0), "bad_channels"),
        (dict(sample_rate_hz=16000, channels=9), "bad_channels"),
    ]:
        with pytest.raises(SpeechError) as err:
            PcmFormat(**bad)
        assert err.value.code == code
    stereo = PcmFormat(16000, 2, "s16le")
    with pytest.raises(SpeechError, match="whole number") as err:
        stereo.decode(b"\x00\x01\x02")
    assert err.value.code == "odd_length"
    pcm = np.array([[16384, -16384], [8192, 8192]], "<i2").tobytes()
    np.testing.assert_allclose(stereo.decode(pcm), [0.0, 0.25])
    floats = PcmFormat(8000, 1, "f32le")
    np.testing.assert_allclose(floats.decode(np.array([0.5, 2.0], "<f4").tobytes()), [0.5, 1.0])
    with pytest.raises(SpeechError) as err:
        floats.decode(np.array([np.nan], "<f4").tobytes())
    assert err.value.code == "bad_samples"


def test_each_chunk_starts_once_its_audio_and_the_lookahead_are_in_and_stays_short_at_real_time(streams):
    manager, pool, _ = streams
    u = manager.open(TaskKind.stream, seed=3)
    sent = push_until(u, 4 + LOOKAHEAD - 1, 0)  # one frame short of chunk 0 (4 frames) + its look-ahead
    wait_for(lambda: u.task.state is TaskState.preparing, "preparing")
    assert pool.of(u.task_id) == []  # cannot exist: the audio is not there
    sent = push_until(u, 4 + LOOKAHEAD, sent)
    first = pool.next_of(u.task_id)
    assert (first.chunk_index, first.job.rows, first.job.seed) == (0, (0, 4), 3)
    assert u.task.state is TaskState.generating
    # at real time a later chunk takes what has arrived, never fewer frames than the first
    sent = push_until(u, 4 + 3 + LOOKAHEAD, sent)
    assert pool.of(u.task_id) == []
    sent = push_until(u, 8 + LOOKAHEAD, sent)
    second = pool.next_of(u.task_id)
    assert (second.chunk_index, second.job.rows) == (1, (4, 8))
    # audio in hand (a burst): the chunks double (8, 16) while audio is there to fill them
    u.push(tone(24, sent), RATE)
    sent += 24
    third = pool.next_of(u.task_id)
    assert (third.chunk_index, third.frames, third.job.rows[0]) == (2, 8, 8)
    fourth = pool.next_of(u.task_id)
    assert (fourth.chunk_index, fourth.frames, fourth.job.rows[0]) == (3, 16, 16)
    assert u.received_frames() - LOOKAHEAD - 32 < 4 and pool.of(u.task_id) == []  # the rest waits for audio
    u.end()  # the rest without waiting for more audio (no tail: stream.crossfade_frames is 0 here)
    total = u.final_frames
    planned = 32
    lengths = []
    while planned < total:
        job = pool.next_of(u.task_id)
        lengths.append(job.frames)
        planned += job.frames
    assert planned == total and lengths and all(n == CHUNK_FRAMES for n in lengths[:-1])
    assert u.task.state is TaskState.generating and u.task.chunks_total == u.task.chunks_planned


def test_bad_pushes_and_limits(streams):
    manager, pool, _ = streams
    empty = manager.open(TaskKind.stream)
    empty.end()
    wait_for(lambda: empty.task.state is TaskState.failed, "the empty utterance fails")
    assert "empty" in empty.task.error
    with pytest.raises(SpeechError) as err:
        empty.push(tone(1), RATE)
    assert err.value.code == "not_open"
    a, b = manager.open(TaskKind.stream), manager.open(TaskKind.speak)
    with pytest.raises(SpeechError) as err:
        manager.open(TaskKind.stream)
    assert err.value.code == "too_many_streams"
    submit_upload(manager, 0.5)  # an upload is not a stream: it does not count toward max_open
    b.push(tone(FPS * 3), RATE)  # 3 s buffered of the 4 s allowed
    with pytest.raises(SpeechError) as err:
        b.push(tone(FPS * 2), RATE)
    assert err.value.code == "buffer_full"
    assert not b.wait_for_room(2.0, timeout_s=0.05)
    assert manager.cancel(a.task_id).state is TaskState.cancelled
    with pytest.raises(SpeechError) as err:
        a.push(tone(1), RATE)
    assert err.value.code == "not_open"
    manager.open(TaskKind.stream)  # a cancelled utterance no longer counts as open


def test_starved_audio_inserts_moving_gap_frames_and_speech_resumes_in_sync():
    pool = FakePool()
    manager, _ = fake_manager(pool, FramesAvatar(), "engine.first_chunk_frames=16", "speech_stream.idle_timeout_s=30")
    try:
        u = manager.open(TaskKind.stream)
        sent = push_until(u, CHUNK_FRAMES + LOOKAHEAD, 0)
        pool.complete(pool.next_of(u.task_id))
        program = u.program
        wait_for(lambda: program._ready_frames == CHUNK_FRAMES, "chunk 0 in the program")
        played = [program.frame(i) for i in range(CHUNK_FRAMES)]
        audio0 = program.audio(0, SAMPLES_PER_FRAME)
        assert all(f is not None for f in played) and not program.in_gap
        np.testing.assert_array_equal(audio0, u.task.audio.stream[:SAMPLES_PER_FRAME])
        # chunk 1's audio has not arrived: the next ticks are gap frames, base video moving, silent
        gap_bases = []
        for i in range(CHUNK_FRAMES, CHUNK_FRAMES + 4):
            frame = program.frame(i)
            assert frame is not None and program.in_gap
            gap_bases.append(int(frame[0, 0, 0]))
            assert not program.audio(i * SAMPLES_PER_FRAME, SAMPLES_PER_FRAME).any()
        assert gap_bases == [16, 15, 16, 17]  # swings out and back from where speech paused (base frame 15), growing
        assert program.underrun_ticks == 4
        sent = push_until(u, 2 * CHUNK_FRAMES + LOOKAHEAD, sent)
        pool.complete(pool.next_of(u.task_id))
        wait_for(lambda: program._ready_frames == 2 * CHUNK_FRAMES, "chunk 1 in the program")
        index = CHUNK_FRAMES + 4
        while (
            True
        ):  # the swing (1, 0, 1, 2, 1, 0) goes back to base frame 15, then speech resumes with content frame 16
            frame = program.frame(index)
            if int(frame[0, 0, 0]) >= 100:
                break
            assert not program.audio(index * SAMPLES_PER_FRAME, SAMPLES_PER_FRAME).any()
            index += 1
        gap = index - CHUNK_FRAMES
        assert gap == 6 and program.underrun_ticks == gap
        assert int(frame[0, 0, 0]) == 100  # face 0 of chunk 1 = content frame 16
        resumed = program.audio(index * SAMPLES_PER_FRAME, SAMPLES_PER_FRAME)
        start = CHUNK_FRAMES * SAMPLES_PER_FRAME  # content frame 16's own audio: in sync
        np.testing.assert_array_equal(resumed, u.task.audio.stream[start : start + SAMPLES_PER_FRAME])
        for i in range(index + 1, index + CHUNK_FRAMES):  # the rest of chunk 1
            assert int(program.frame(i)[0, 0, 0]) == 100 + i - index
        index += CHUNK_FRAMES
        assert int(program.frame(index)[0, 0, 0]) == 32  # chunk 2 late: a gap, base frame 31 + 1
        push_until(u, 3 * CHUNK_FRAMES + LOOKAHEAD, sent)
        pool.complete(pool.next_of(u.task_id))
        wait_for(lambda: program._ready_frames == 3 * CHUNK_FRAMES, "chunk 2 in the program")
        assert int(program.frame(index + 1)[0, 0, 0]) == 31  # back to rest: a short hiccup costs 2 frames
        assert int(program.frame(index + 2)[0, 0, 0]) == 100
        assert program.underrun_ticks == gap + 2
        u.end()
        assert program.num_frames == u.final_frames + gap + 2  # the mixer's DONE counts the gap frames too
    finally:
        manager.close()


def test_jitter_buffer_uses_the_arrival_rate():
    now = [100.0]
    pool = FakePool()
    manager, _ = fake_manager(pool, FramesAvatar(), "engine.first_chunk_frames=16", "speech_stream.idle_timeout_s=60")
    try:
        u = manager.open(TaskKind.stream)
        program = u.program
        program._clock = u._clock = lambda: now[0]
        u.first_byte_monotonic = 100.0
        u.push(tone(200), RATE)  # 8 s of audio known
        program.chunk_audio_at[0] = 100.0
        program._started_monotonic = 100.0
        jobs = [pool.next_of(u.task_id) for _ in range(5)]  # 16-frame chunks: their audio is there
        for k in range(len(program._ends)):
            program.chunk_audio_at[k] = 100.0  # on the test's clock: every planned chunk's audio came at once
        pool.complete(jobs[0])
        program._first_chunk_monotonic = 100.05  # chunk 0 took 50 ms
        known = u.received_frames()  # 199: the 16 kHz copy lags by the resampler's delay
        assert known == 199
        # arrival: 7.98 s received in 12 s = 16.6 fps: needs (199 - 1) * (1 - 16.6 / 25) + 8 = 74.3 frames
        now[0] = 112.0
        for job in jobs[1:4]:
            pool.complete(job)
        program._busy_s = 1.0  # the pool spent 1 s on them: 64 fps and more, the arrivals decide
        assert not program.ready_to_start()  # 64 frames
        pool.complete(jobs[4])
        program._busy_s = 1.0
        assert program.ready_to_start()  # 80 frames
        # faster than real time: the frame rule needs nothing more, the next chunk's prediction decides
        u2 = manager.open(TaskKind.stream)
        p2 = u2.program
        p2._clock = u2._clock = lambda: now[0]
        p2._chunk_times = None  # the first utterance's chunks took 12 s of this test's clock: not evidence here
        now[0] = 200.0
        u2.push(tone(36), RATE)  # 35 whole frames at both rates
        u2.first_byte_monotonic = 199.3
        p2.chunk_audio_at[0] = 199.3
        p2._started_monotonic = 199.3
        pool.complete(pool.next_of(u2.task_id))
        wait_for(lambda: len(p2._ends) == 2, "chunk 1 planned (its audio is there)")
        p2.chunk_audio_at[1] = 199.96  # its audio, 33 frames + the look-ahead, complete at 2x real time
        p2._first_chunk_monotonic = 199.35  # chunk 0 took 50 ms
        # arrival ~1.4 s / 0.7 s = 2x: chunk 1 processed from 199.96 for 2 x 50 ms; needed at now + 0.64
        assert p2.ready_to_start()
        u2.first_byte_monotonic = 198.0  # ~1.4 s in 2 s = 0.7x: the frame rule waits for more chunks
        assert not p2.ready_to_start()
    finally:
        manager.close()


def test_idle_utterance_is_ended_and_plays_what_it_has():
    pool = FakePool()
    manager, _ = fake_manager(pool, FakeAvatar(), "speech_stream.idle_timeout_s=0.5")
    try:
        u = manager.open(TaskKind.stream)
        u.push(tone(10), RATE)
        wait_for(lambda: u.ended, "the idle timeout ends the utterance")
        assert u.end_reason == "idle_timeout" and u.final_frames == 10
        lengths = []
        while sum(lengths) < 10:
            lengths.append(pool.next_of(u.task_id).frames)
        assert sum(lengths) == 10 and lengths[0] == 4
    finally:
        manager.close()


def test_a_trickling_utterance_ends_too_slow_and_the_queue_moves_on():
    pool = FakePool()
    manager, playlist = fake_manager(
        pool,
        FakeAvatar(),
        "speech_stream.idle_timeout_s=30",
        "speech_stream.starve_timeout_s=0.5",
        "speech_stream.min_arrival_ratio=0.5",
    )
    try:
        u = manager.open(TaskKind.stream)
        u.push(tone(5), RATE)  # 0.2 s, then 10 ms every 100 ms: a tenth of real time, never idle
        start = time.monotonic()
        sent = 0
        while not u.ended and time.monotonic() - start < 10:
            try:
                u.push(tone(1)[: RATE // 100], RATE)
            except SpeechError as exc:  # it ended between the check and the push: what a client sees
                assert exc.code == "not_open" and u.ended, exc
                break
            sent += 1
            time.sleep(0.1)
        assert u.end_reason == "too_slow", u.end_reason
        assert time.monotonic() - start < 5  # ended after starve_timeout_s, not after the 30 s idle timeout
        assert u.task.state not in (TaskState.failed, TaskState.cancelled) and u.final_frames >= 5
        # what it received plays, then the queue moves on: its program has an end now
        assert playlist.programs[0].num_frames == u.final_frames
    finally:
        manager.close()


def test_an_utterance_open_longer_than_max_utterance_s_ends():
    pool = FakePool()
    manager, _ = fake_manager(
        pool, FakeAvatar(), "speech_stream.idle_timeout_s=30", "speech_stream.max_utterance_s=0.5"
    )
    try:
        u = manager.open(TaskKind.stream)
        start = time.monotonic()
        frame = 0
        while not u.ended and time.monotonic() - start < 10:  # at real time: neither idle nor slow, only open too long
            u.push(tone(1, frame), RATE)
            frame += 1
            time.sleep(1 / FPS)
        assert u.end_reason == "utterance_timeout" and 1 <= u.final_frames <= frame
        assert time.monotonic() - start < 5
    finally:
        manager.close()


def test_utterances_queue_with_uploads_in_order(streams):
    manager, pool, playlist = streams
    first = manager.open(TaskKind.stream)
    upload, position = submit_upload(manager, 1.0)
    second = manager.open(TaskKind.stream)
    assert [p.task_id for p in playlist.programs] == [first.task_id, upload.task_id, second.task_id]
    assert position == 1
    wait_for(lambda: manager.admitted() == 2, "the first two admitted (generate_ahead 1)")
    assert second.task.state is TaskState.queued  # waits its turn holding only its audio
    manager.cancel(first.task_id)
    wait_for(lambda: second.task.state is TaskState.preparing, "the next admitted after a cancel")


def test_a_speech_burst_then_real_time_fills_the_stream_without_a_hole():
    """The frames planned cover the audio exactly once, whatever the push pattern (a seeded random one)."""
    rng = np.random.default_rng(3)
    pool = FakePool()
    manager, _ = fake_manager(pool, FakeAvatar(), "speech_stream.max_buffered_s=60")
    try:
        u = manager.open(TaskKind.stream)
        audio = speech(6.0)
        at = 0
        while at < audio.shape[0]:
            n = int(rng.integers(1, 5 * SAMPLES_PER_FRAME))
            u.push(audio[at : at + n], RATE)
            at += n
        u.end()
        lengths: list[int] = []
        while sum(lengths) < u.final_frames:
            lengths.append(pool.next_of(u.task_id).frames)
        assert sum(lengths) == u.final_frames == 150
        assert all(1 <= n <= CHUNK_FRAMES for n in lengths) and lengths[0] == 4
    finally:
        manager.close()


class PastingAvatar(FramesAvatar):
    """Pastes like the real avatar: into the frame it is given (a pooled buffer), in place."""

    def paste(self, base_index, faces, frame=None, scratch=None):
        frame[...] = faces
        return frame


def test_speech_frames_reuse_buffers_only_once_off_air():
    pool = FakePool()
    manager, _ = fake_manager(pool, PastingAvatar(), "engine.first_chunk_frames=16", "speech_stream.idle_timeout_s=30")
    try:
        u = manager.open(TaskKind.stream)
        push_until(u, 2 * CHUNK_FRAMES + LOOKAHEAD, 0)
        pool.complete(pool.next_of(u.task_id))
        pool.complete(pool.next_of(u.task_id), fill=200)
        program = u.program
        wait_for(lambda: program._ready_frames == 2 * CHUNK_FRAMES, "two chunks in the program")
        held = [program.frame(i) for i in range(CHUNK_FRAMES)]  # all still referenced (queued, say)
        assert [int(f[0, 0, 0]) for f in held] == [100 + k for k in range(CHUNK_FRAMES)]  # none overwritten
        allocated = program._paster.allocated
        assert allocated == CHUNK_FRAMES
        del held
        for i in range(CHUNK_FRAMES, 2 * CHUNK_FRAMES):  # each frame let go before the next tick
            assert int(program.frame(i)[0, 0, 0]) == 200 + i - CHUNK_FRAMES
        assert program._paster.allocated == allocated  # every one of them a reused buffer
        program.on_air(ProgramEvent.OFF_AIR, 2 * CHUNK_FRAMES)
        assert not program._paster.holding  # a finished task holds no buffers
    finally:
        manager.close()
