"""An upload decoded while it plays (latentsync/serving/generation/decoder.py) with the real, confined FFmpeg.

Progress is shown without timing: the upload is a FIFO the test writes, so the first audio is in
the utterance while the rest of the file has not even been written yet (FFmpeg needs its probe's
5 s of audio before it decodes from a pipe; an upload is a whole file on disk).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from latentsync.media.errors import MediaDecodeTimeout
from latentsync.media.probe import MediaProbeError
from latentsync.serving.ingest.upload_decoder import DecodeState, UploadDecoder
from latentsync.serving.ops import procfs
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.task import Task
from latentsync.serving.tasks.utterance import Utterance
from scripts.make_bad_inputs import lying_header_wav, wav_bytes
from tests.datafiles import media_file
from tests.fakes import FPS, RATE, settings, wait_for

SPEECH = "audio/7s_shan_0801_01.wav"  # 48 kHz mono


def utterance() -> Utterance:
    return Utterance(Task(task_id="t" * 32), fps=FPS, sample_rate_hz=RATE, limits=settings().uploaded)


def decoder(
    path: Path, u: Utterance, max_s: float = 300.0, timeout_s: float = 30.0, read_ahead_s: float = 60.0
) -> UploadDecoder:
    d = UploadDecoder(
        path, u, sample_rate_hz=RATE, max_duration_s=max_s, timeout_s=timeout_s, read_ahead_s=read_ahead_s
    )
    u.attach(d)
    return d


def speech_samples() -> np.ndarray:
    samples, rate = sf.read(media_file(SPEECH), dtype="int16")
    assert rate == RATE
    return samples


def ffmpeg_children() -> int:
    """Live (not zombie) FFmpeg processes that are children of this test process."""
    stats = procfs.process_stats()
    return sum(1 for pid in procfs.children(os.getpid(), stats) if "ffmpeg" in stats[pid].comm and stats[pid].alive)


def test_the_first_audio_is_in_the_utterance_before_the_rest_of_the_file_exists(tmp_path):
    samples = np.tile(speech_samples(), 5)[: 30 * RATE]  # 30 s
    data = wav_bytes(samples, RATE)
    fifo = tmp_path / "upload"
    os.mkfifo(fifo)
    half = 44 + 10 * RATE * 2  # the first 10 s
    released = threading.Event()

    def write() -> None:
        with open(fifo, "wb") as out:  # blocks until the decoder opens the FIFO
            out.write(data[:half])
            out.flush()
            released.wait(30)
            out.write(data[half:])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    u = utterance()
    d = decoder(fifo, u)
    d.start()
    try:
        d.wait_first(5, FPS)  # chunk 0 (4 frames) + the look-ahead
        assert d.state is DecodeState.decoding and not u.ended
        assert u.received_frames() >= 5 and u.task.audio.stream.shape[0] <= 10 * RATE
        released.set()
        wait_for(lambda: u.ended, "the end of the file ends the utterance")
        assert d.state is DecodeState.finished and u.final_frames == -(-len(samples) * FPS // RATE)
        np.testing.assert_array_equal(u.task.audio.stream[: len(samples)], samples)  # FFmpeg's s16 at the same rate
    finally:
        released.set()
        d.close()
        writer.join(5)
    assert ffmpeg_children() == 0


def test_files_refused_before_any_task_exists(tmp_path):
    cases = {
        "text.wav": (b"plain text, not a RIFF/WAVE file\n" * 50, MediaProbeError, None),
        "tiny.wav": (wav_bytes(speech_samples()[: RATE // 100], RATE), SpeechError, "too_short"),
        "long.wav": (wav_bytes(np.zeros(12 * RATE, np.int16), RATE), SpeechError, "too_long"),
    }
    for name, (content, error, code) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        u = utterance()
        d = decoder(path, u, max_s=10.0)
        d.start()
        with pytest.raises(error) as err:
            d.wait_first(5, FPS)
        assert code is None or err.value.code == code, name
        assert d.state is not DecodeState.decoding, name
    assert ffmpeg_children() == 0


def test_a_header_that_claims_too_much_is_checked_by_decoding_not_believed(tmp_path):
    samples = speech_samples()[: 2 * RATE]
    lying = tmp_path / "lying.wav"
    lying.write_bytes(lying_header_wav(samples, RATE, 0xFFFFFFFF - 64))  # claims ~12 h, holds 2 s
    u = utterance()
    d = decoder(lying, u, max_s=10.0)
    d.start()
    d.wait_first(5, FPS)  # no too_long: the decode ended at 2 s
    wait_for(lambda: u.ended, "the end")
    assert u.final_frames == 2 * FPS
    d.close()


def test_close_kills_a_decode_that_waits_for_input_and_a_timeout_refuses_it(tmp_path):
    fifo = tmp_path / "upload"
    os.mkfifo(fifo)
    stop = threading.Event()

    def write() -> None:
        with open(fifo, "wb") as out:
            out.write(wav_bytes(np.zeros(10, np.int16), RATE)[:44])  # a header, then nothing
            out.flush()
            stop.wait(30)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    u = utterance()
    d = decoder(fifo, u, timeout_s=1.0)
    d.start()
    started = time.monotonic()
    with pytest.raises(MediaDecodeTimeout):
        d.wait_first(5, FPS)
    assert time.monotonic() - started < 10
    assert d.state is DecodeState.failed and ffmpeg_children() == 0
    stop.set()
    writer.join(5)


class Played:
    """What a program tells the utterance: content frames played (the decoder paces itself on it)."""

    def __init__(self):
        self.frames = 0

    def content_frames_played(self) -> int:
        return self.frames


def test_decoding_stays_a_few_seconds_ahead_of_playback(tmp_path):
    samples = np.tile(speech_samples(), 5)[: 30 * RATE]  # 30 s
    path = tmp_path / "upload.wav"
    path.write_bytes(wav_bytes(samples, RATE))
    u = utterance()
    played = Played()
    u.program = played  # type: ignore[assignment]
    d = decoder(path, u, read_ahead_s=3.0)
    d.start()
    try:
        d.wait_first(5, FPS)
        wait_for(lambda: u.buffered_s() >= 3.0, "3 s decoded ahead")
        time.sleep(0.5)  # were it not paced, 30 s of WAV would be decoded by now
        ahead = u.task.audio.duration_s
        assert ahead < 6.0 and not u.ended  # 3 s + what FFmpeg's pipe holds
        played.frames = 28 * FPS  # 28 s played: the decoder catches up, then the end of the file ends it
        wait_for(lambda: u.ended, "the rest decoded once played")
        assert u.final_frames == 30 * FPS
    finally:
        d.close()
    assert ffmpeg_children() == 0
