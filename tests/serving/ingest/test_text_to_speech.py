"""Text to speech: sentence splitting, the real espeak-ng, and the feeder that streams it into an utterance."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from latentsync.serving.ingest.text_to_speech import EspeakNg, SpeechFeeder, split_sentences
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.task import TaskKind
from tests.fakes import FPS, RATE, FakePool, FramesAvatar, fake_manager, wait_for


@pytest.fixture
def espeak() -> EspeakNg:
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is missing (scripts/tts.sh install)")
        pytest.skip("espeak-ng is missing (scripts/tts.sh install)")
    return EspeakNg("en", 175, timeout_s=10.0)


def test_split_sentences():
    assert split_sentences("Hello there.  How are you?\nFine!  ") == ["Hello there.", "How are you?", "Fine!"]
    long = " ".join(["word"] * 100)  # 499 characters, no punctuation
    parts = split_sentences(long, max_chars=200)
    assert all(len(p) <= 200 for p in parts) and " ".join(parts) == long
    assert split_sentences("   ") == []


def test_espeak_speaks_each_sentence_and_refuses_unknown_voices(espeak):
    chunks = list(espeak.synthesize("One. Two two two. Three.", voice="en-us", rate_wpm=200))
    assert len(chunks) == 3 and all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    assert all(np.abs(c).max() > 1000 for c in chunks)  # speech, not silence
    assert 0.2 < len(chunks[1]) / espeak.sample_rate_hz < 3.0
    with pytest.raises(SpeechError) as err:
        list(espeak.synthesize("Hello.", voice="no-such-voice"))
    assert err.value.code == "unknown_voice"
    assert "en" in espeak.voices() and "de" in espeak.voices()


def test_feeder_streams_text_then_pcm_in_order_and_ends(espeak):
    pool = FakePool()
    manager, playlist = fake_manager(pool, FramesAvatar())
    errors = []
    try:
        u = manager.open(TaskKind.speak)
        feeder = SpeechFeeder(
            u, espeak, on_error=lambda code, message: errors.append(code), cancel=manager.cancel, max_items=8
        )
        feeder.start()
        feeder.push_text("Hello. World.")
        tone = np.full(RATE // 10, 0.25, np.float32)  # 100 ms after the text
        feeder.push_pcm(tone, RATE)
        feeder.end()
        wait_for(lambda: u.ended, "the feeder ends the utterance")
        wait_for(lambda: not feeder.alive, "the feeder's thread ends")
        assert errors == []
        stream = u.task.audio.stream
        assert u.final_frames == -(-len(stream) * FPS // RATE) and len(stream) / RATE > 0.8
        np.testing.assert_array_equal(stream[-RATE // 20 :], np.full(RATE // 20, 8192, np.int16))  # PCM came last
        with pytest.raises(SpeechError) as err:
            feeder.push_pcm(tone, RATE)
        assert err.value.code == "not_open"
    finally:
        manager.close()


def test_the_feeder_refuses_what_would_pass_its_byte_cap():
    pool = FakePool()
    manager, _ = fake_manager(pool, FramesAvatar())
    try:
        u = manager.open(TaskKind.stream)
        block = np.zeros(16_000, np.float32)  # 64 000 bytes
        feeder = SpeechFeeder(
            u, None, on_error=lambda code, message: None, cancel=manager.cancel, max_items=512, max_bytes=200_000
        )
        for _ in range(3):  # not started: items wait (192 000 bytes)
            feeder.push_pcm(block, RATE)
        with pytest.raises(SpeechError) as err:
            feeder.push_pcm(block, RATE)
        assert err.value.code == "buffer_full" and "max_feeder_bytes" in err.value.message
        feeder.push_pcm(np.zeros(2_000, np.float32), RATE)  # 8 000 more still fit: 200 000 in all
        with pytest.raises(SpeechError):
            feeder.push_pcm(np.zeros(1, np.float32), RATE)
        manager.cancel(u.task_id)
    finally:
        manager.close()


def test_cancelling_the_task_closes_its_feeder_and_empties_its_queue():
    pool = FakePool()
    manager, _ = fake_manager(pool, FramesAvatar())
    try:
        u = manager.open(TaskKind.stream)
        feeder = SpeechFeeder(  # not started: items wait
            u, None, on_error=lambda code, message: None, cancel=manager.cancel, max_items=4
        )
        for _ in range(4):
            feeder.push_pcm(np.zeros(480, np.float32), RATE)
        with pytest.raises(SpeechError) as err:
            feeder.push_pcm(np.zeros(480, np.float32), RATE)
        assert err.value.code == "buffer_full"
        manager.cancel(u.task_id)  # one call: the feeder is the utterance's source
        assert feeder._items.empty()
        with pytest.raises(SpeechError) as err:
            feeder.push_pcm(np.zeros(480, np.float32), RATE)
        assert err.value.code == "not_open"
    finally:
        manager.close()
