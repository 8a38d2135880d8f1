"""The speech-stream API (latentsync/serving/generation/utterance.py) with the fakes of tests/serving/generation/test_tasks.py.

The pool and the playlist are fakes (their seams); the utterance, its processor and its program are
the real ones. No timing assertions: every wait is for a condition with a generous timeout.
"""

from __future__ import annotations

import numpy as np
import pytest

from latentsync.engines import CHUNK_FRAMES, ChunkResult
from latentsync.serving.generation.speech import SpeechStreams, StreamLimits
from latentsync.serving.generation.task import TaskState
from latentsync.serving.generation.utterance import PcmFormat, SpeechStreamError
from tests.fakes import FPS, RATE, FakeAvatar, FakePool, FramesAvatar, fake_manager, wait_for

LOOKAHEAD = 2
SAMPLES_PER_FRAME = RATE // FPS


@pytest.fixture
def streams():
    pool = FakePool()
    manager, _ = fake_manager(pool, FramesAvatar())
    yield SpeechStreams(manager, StreamLimits(max_open=2, max_buffered_s=4.0, idle_timeout_s=30.0), LOOKAHEAD), pool
    manager.close()


def tone(frames: int, start_frame: int = 0) -> np.ndarray:
    """``frames`` frames of a 220 Hz tone at 48 kHz, continuing from ``start_frame``."""
    n0 = start_frame * SAMPLES_PER_FRAME
    t = (np.arange(frames * SAMPLES_PER_FRAME) + n0) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def faces(chunk: int) -> ChunkResult:
    """A chunk whose face ``k`` is filled with ``100 + k`` (what frame() returns through the fake paste)."""
    data = (100 + np.arange(CHUNK_FRAMES, dtype=np.uint8)).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    return ChunkResult("t", chunk, np.arange(CHUNK_FRAMES), data, 0.0)


def complete(pool: FakePool, task_id: str, kind: str) -> object:
    wait_for(lambda: any(j.kind == kind for j in pool.of(task_id)), f"a {kind} job")
    job = next(j for j in pool.of(task_id) if j.kind == kind)
    pool.take(job)
    if kind == "features":
        start, end = job.frames
        job.on_done(np.zeros((end - start, 2), np.float32))
    else:
        job.on_done(faces(job.request.chunk_index))
    return job


def test_pcm_formats_are_validated_and_decoded():
    for bad, code in [
        (dict(sample_rate_hz=16000, encoding="mp3"), "bad_encoding"),
        (dict(sample_rate_hz=100), "bad_sample_rate"),
        (dict(sample_rate_hz=16000.5), "bad_sample_rate"),
        (dict(sample_rate_hz=16000, channels=0), "bad_channels"),
        (dict(sample_rate_hz=16000, channels=9), "bad_channels"),
    ]:
        with pytest.raises(SpeechStreamError) as err:
            PcmFormat(**bad)
        assert err.value.code == code
    stereo = PcmFormat(16000, 2, "s16le")
    with pytest.raises(SpeechStreamError, match="whole number") as err:
        stereo.decode(b"\x00\x01\x02")
    assert err.value.code == "odd_length"
    pcm = np.array([[16384, -16384], [8192, 8192]], "<i2").tobytes()
    np.testing.assert_allclose(stereo.decode(pcm), [0.0, 0.25])
    floats = PcmFormat(8000, 1, "f32le")
    np.testing.assert_allclose(floats.decode(np.array([0.5, 2.0], "<f4").tobytes()), [0.5, 1.0])
    with pytest.raises(SpeechStreamError) as err:
        floats.decode(np.array([np.nan], "<f4").tobytes())
    assert err.value.code == "bad_samples"


def test_each_chunk_starts_once_its_audio_and_the_lookahead_are_in(streams):
    speech, pool = streams
    u = speech.open(seed=3)
    u.push(tone(CHUNK_FRAMES + LOOKAHEAD - 1), RATE)  # one frame short of chunk 0's look-ahead
    wait_for(lambda: u.task.state is TaskState.preparing, "preparing")
    assert pool.of(u.task_id) == []
    u.push(tone(2, CHUNK_FRAMES + LOOKAHEAD - 1), RATE)
    job = complete(pool, u.task_id, "features")
    assert job.frames == (0, CHUNK_FRAMES)
    chunk = complete(pool, u.task_id, "chunk")
    assert chunk.request.chunk_index == 0 and chunk.request.seed == 3
    assert u.task.state is TaskState.generating
    assert pool.of(u.task_id) == []  # chunk 1 needs frames up to 32 + look-ahead
    u.push(tone(2 * CHUNK_FRAMES, CHUNK_FRAMES + LOOKAHEAD + 1), RATE)
    assert complete(pool, u.task_id, "features").frames == (CHUNK_FRAMES, 2 * CHUNK_FRAMES)
    assert complete(pool, u.task_id, "chunk").request.chunk_index == 1
    u.end()  # 51 frames + tail 0: chunks 2 and 3 without waiting for more audio
    assert complete(pool, u.task_id, "features").frames == (2 * CHUNK_FRAMES, 3 * CHUNK_FRAMES)
    assert complete(pool, u.task_id, "chunk").request.chunk_index == 2
    assert complete(pool, u.task_id, "features").frames == (3 * CHUNK_FRAMES, 4 * CHUNK_FRAMES)
    last = complete(pool, u.task_id, "chunk").request
    assert last.chunk_index == 3 and u.task.num_frames == 3 * CHUNK_FRAMES + LOOKAHEAD + 1
    assert last.frame_indices[-1] == (u.task.num_frames - 1) % FakeAvatar.num_frames  # padded, never dropped
    wait_for(lambda: u.program is not None and u.program.ready_to_start(), "ready once everything is generated")


def test_bad_pushes_and_limits(streams):
    speech, pool = streams
    empty = speech.open()
    empty.end()
    wait_for(lambda: empty.task.state is TaskState.failed, "the empty utterance fails")
    assert "empty" in empty.task.error
    with pytest.raises(SpeechStreamError) as err:
        empty.push(tone(1), RATE)
    assert err.value.code == "not_open"
    a, b = speech.open(), speech.open()
    with pytest.raises(SpeechStreamError) as err:
        speech.open()
    assert err.value.code == "too_many_streams"
    b.push(tone(FPS * 3), RATE)  # 3 s buffered of the 4 s allowed
    with pytest.raises(SpeechStreamError) as err:
        b.push(tone(FPS * 2), RATE)
    assert err.value.code == "buffer_full"
    assert not b.wait_for_room(2.0, timeout_s=0.05)
    assert speech.manager.cancel(a.task_id).state is TaskState.cancelled
    with pytest.raises(SpeechStreamError) as err:
        a.push(tone(1), RATE)
    assert err.value.code == "not_open"
    speech.open()  # a cancelled utterance no longer counts as open


def test_starved_audio_inserts_moving_gap_frames_and_speech_resumes_in_sync(streams):
    speech, pool = streams
    u = speech.open()
    u.push(tone(CHUNK_FRAMES + LOOKAHEAD + 1), RATE)  # + 1: the 16 kHz copy lags by the resampler's delay
    complete(pool, u.task_id, "features")
    complete(pool, u.task_id, "chunk")
    program = u.program
    wait_for(lambda: program._ready_chunks == 1, "chunk 0 in the program")
    played = [program.frame(i) for i in range(CHUNK_FRAMES)]
    audio0 = program.audio(0, SAMPLES_PER_FRAME)
    assert all(f is not None for f in played)
    np.testing.assert_array_equal(audio0, u.task.audio.stream[:SAMPLES_PER_FRAME])
    # chunk 1's audio has not arrived: the next ticks are gap frames, base video moving, silent
    gap_bases = []
    for i in range(CHUNK_FRAMES, CHUNK_FRAMES + 4):
        frame = program.frame(i)
        assert frame is not None
        gap_bases.append(int(frame[0, 0, 0]))
        assert not program.audio(i * SAMPLES_PER_FRAME, SAMPLES_PER_FRAME).any()
    assert gap_bases == [16, 15, 16, 17]  # swings out and back from where speech paused (base frame 15), growing
    assert program.underrun_ticks == 4
    u.push(tone(CHUNK_FRAMES + 4, CHUNK_FRAMES + LOOKAHEAD + 1), RATE)
    complete(pool, u.task_id, "features")
    complete(pool, u.task_id, "chunk")
    wait_for(lambda: program._ready_chunks == 2, "chunk 1 in the program")
    index = CHUNK_FRAMES + 4
    while True:  # the swing (1, 0, 1, 2, 1, 0) goes back to base frame 15, then speech resumes with content frame 16
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
    u.push(tone(CHUNK_FRAMES, 2 * CHUNK_FRAMES + 5), RATE)
    complete(pool, u.task_id, "features")
    complete(pool, u.task_id, "chunk")
    wait_for(lambda: program._ready_chunks == 3, "chunk 2 in the program")
    assert int(program.frame(index + 1)[0, 0, 0]) == 31  # back to rest: a short hiccup costs 2 frames
    assert int(program.frame(index + 2)[0, 0, 0]) == 100
    assert program.underrun_ticks == gap + 2
    u.end()
    assert program.num_frames == u.final_frames + gap + 2  # the mixer's DONE counts the gap frames too


def test_jitter_buffer_uses_the_arrival_rate():
    now = [100.0]
    pool = FakePool()
    manager, playlist = fake_manager(pool, FramesAvatar())
    speech = SpeechStreams(manager, StreamLimits(idle_timeout_s=60.0), LOOKAHEAD)
    try:
        u = speech.open()
        program = u.program
        program._clock = u._clock = lambda: now[0]
        u.first_byte_monotonic = 100.0
        u.push(tone(200), RATE)  # 8 s of audio known
        program.chunk_audio_at[0] = 100.0
        program._started_monotonic = 100.0
        program.add_chunk(faces(0))
        program._first_chunk_monotonic = 100.05  # chunk 0 took 50 ms
        known = u.received_frames()  # 199: the 16 kHz copy lags by the resampler's delay
        assert known == 199
        # arrival: 7.98 s received in 12 s = 16.6 fps: needs (199 - 1) * (1 - 16.6 / 25) + 8 = 74.3 frames
        now[0] = 112.0
        program._started_monotonic = 111.0  # generating for 1 s: 64 fps and more, the arrivals decide
        for c in range(1, 4):
            program.add_chunk(faces(c))
        assert not program.ready_to_start()  # 64 frames
        program.add_chunk(faces(4))
        assert program.ready_to_start()  # 80 frames
        # faster than real time: the frame rule needs nothing more, the next chunk's prediction decides
        u2 = speech.open()
        p2 = u2.program
        p2._clock = u2._clock = lambda: now[0]
        now[0] = 200.0
        u2.push(tone(36), RATE)  # 35 whole frames at both rates
        u2.first_byte_monotonic = 199.3
        p2.chunk_audio_at[0] = 199.3
        p2._started_monotonic = 199.3
        p2.add_chunk(faces(0))
        p2._first_chunk_monotonic = 199.35  # chunk 0 took 50 ms
        # arrival ~1.4 s / 0.7 s = 2x: chunk 1 due at 199.3 + 34 / 50 + 0.05 = 200.03; needed at now + 0.64
        assert p2.ready_to_start()
        u2.first_byte_monotonic = 198.0  # ~1.4 s in 2 s = 0.7x: the frame rule waits for more chunks
        assert not p2.ready_to_start()
    finally:
        manager.close()


def test_idle_utterance_is_ended_and_plays_what_it_has(streams):
    speech, pool = streams
    speech.limits = StreamLimits(idle_timeout_s=0.2)
    u = speech.open()
    u.idle_timeout_s = 0.2
    u.push(tone(10), RATE)
    wait_for(lambda: u.ended, "the idle timeout ends the utterance")
    assert u.end_reason == "idle_timeout" and u.final_frames == 10
    complete(pool, u.task_id, "features")
    assert complete(pool, u.task_id, "chunk").request.chunk_index == 0


def test_utterances_queue_with_uploads_in_order(streams):
    from tests.fakes import speech as upload_audio

    speech, pool = streams
    manager = speech.manager
    first = speech.open()
    upload, position = manager.submit(upload_audio(1.0), None, None)
    second = speech.open()
    playlist = manager._enqueue.__self__.programs
    assert [p.task_id for p in playlist] == [first.task_id, upload.task_id, second.task_id]
    assert position == 1
    wait_for(lambda: manager.admitted() == 2, "the first two admitted (generate_ahead 1)")
    assert second.task.state is TaskState.queued  # waits its turn holding only its audio
    manager.cancel(first.task_id)
    wait_for(lambda: second.task.state is TaskState.preparing, "the next admitted after a cancel")
