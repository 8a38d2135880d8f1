"""Every way speech arrives is a source opened by TaskManager.open_source: refused early, nothing left behind.

UploadSource runs the real, confined FFmpeg decoder on stored files; TextSource and StreamSource
their feeders (no TTS needed: texts are refused before anything is built when none is installed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from latentsync.serving.core.errors import ServingError
from latentsync.serving.ingest.speech_service import SpeechService
from latentsync.serving.ingest.speech_sources import StreamSource, TextSource
from latentsync.serving.ingest.upload_source import UploadSource
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.task import TaskKind
from scripts.make_bad_inputs import wav_bytes
from tests.fakes import RATE, FakePool, FramesAvatar, fake_manager, speech, wait_for


class Body:
    """What werkzeug's FileStorage offers a source: ``save(path)``; counts its calls."""

    def __init__(self, data: bytes):
        self.data = data
        self.saves = 0

    def save(self, dst) -> None:
        self.saves += 1
        Path(dst).write_bytes(self.data)


def wav(seconds: float) -> bytes:
    pcm = (speech(seconds) * 32767).astype(np.int16)
    return wav_bytes(pcm, RATE)


def upload(body: Body, root: Path, max_audio_s: float = 300.0) -> UploadSource:
    return UploadSource(
        body=body, upload_root=root, seed=7, guidance_scale=None, max_audio_s=max_audio_s, decode_timeout_s=30.0
    )


def service() -> SpeechService:
    return SpeechService(None, max_text_chars=100, max_feeder_items=16)


def test_an_upload_is_stored_decoded_and_accepted_and_its_folder_is_gone(tmp_path):
    manager, playlist = fake_manager(FakePool(), FramesAvatar())
    try:
        body = Body(wav(3.0))
        opened = manager.open_source(upload(body, tmp_path), received=None)
        task = opened.utterance.task
        assert opened.position == 0 and task.kind is TaskKind.upload and task.seed == 7
        assert manager.get(task.task_id) is task and len(playlist.programs) == 1
        assert body.saves == 1 and os.listdir(tmp_path) == []  # FFmpeg reads it through its own descriptor
        wait_for(lambda: opened.utterance.ended, "the whole upload decoded")
        assert abs(opened.utterance.received_s() - 3.0) < 0.05
    finally:
        manager.close()


@pytest.mark.parametrize(
    ("data", "max_audio_s", "code"),
    [(b"", 300.0, "empty_file"), (b"not audio at all" * 100, 300.0, "not_audio"), (None, 1.0, "too_long")],
)
def test_a_refused_upload_leaves_no_task_no_file_and_no_ffmpeg(tmp_path, data, max_audio_s, code):
    manager, playlist = fake_manager(FakePool(), FramesAvatar())
    try:
        source = upload(Body(wav(3.0) if data is None else data), tmp_path, max_audio_s)
        with pytest.raises(ServingError) as err:
            manager.open_source(source)
        assert err.value.code == code
        assert manager.list() == [] and playlist.programs == [] and os.listdir(tmp_path) == []
    finally:
        manager.close()


def test_a_full_queue_refuses_an_upload_before_its_body_is_stored(tmp_path):
    manager, _ = fake_manager(FakePool(), FramesAvatar(), "api.max_queued=1")
    try:
        manager.open_source(upload(Body(wav(2.0)), tmp_path))
        body = Body(wav(2.0))
        with pytest.raises(SpeechError) as err:
            manager.open_source(upload(body, tmp_path))
        assert err.value.code == "queue_full" and body.saves == 0 and len(manager.list()) == 1
    finally:
        manager.close()


def test_a_stream_source_gives_its_socket_a_feeder_and_too_many_streams_start_none():
    manager, _ = fake_manager(FakePool(), FramesAvatar(), "speech_stream.max_open=1")
    try:
        first = StreamSource.from_message(service(), {"sample_rate": 16000, "seed": 3}, lambda c, m: None)
        opened = manager.open_source(first)
        assert first.feeder is not None and opened.utterance.task.kind is TaskKind.stream
        assert opened.utterance.task.seed == 3 and first.fmt.sample_rate_hz == 16000
        first.feeder.push_pcm(np.zeros(1600, np.float32), 16000)
        second = StreamSource.from_message(service(), {"sample_rate": 16000}, lambda c, m: None)
        with pytest.raises(SpeechError) as err:
            manager.open_source(second)
        assert err.value.code == "too_many_streams" and second.feeder is None and len(manager.list()) == 1
    finally:
        manager.close()


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({}, "bad_sample_rate"),
        ({"sample_rate": 16000, "encoding": "mp3"}, "bad_encoding"),
        ({"sample_rate": 16000, "seed": -1}, "bad_parameter"),
    ],
)
def test_a_bad_start_message_is_refused_before_a_task_is_built(msg, code):
    with pytest.raises(SpeechError) as err:
        StreamSource.from_message(service(), msg, lambda c, m: None)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("body", "code"), [(None, "bad_json"), ([1], "bad_json"), ({"text": "Hello."}, "tts_unavailable")]
)
def test_a_text_request_is_checked_when_its_source_is_made(body, code):
    with pytest.raises(SpeechError) as err:
        TextSource.from_request(service(), body)
    assert err.value.code == code


def test_stored_uploads_never_use_the_clients_name_and_empty_bodies_are_refused(tmp_path):
    from latentsync.serving.core.uploads import stored_upload

    with stored_upload(Body(b"x"), tmp_path / "root") as path:
        assert path.name == "upload" and path.parent.parent == tmp_path / "root"
        assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert os.listdir(tmp_path / "root") == []
    with pytest.raises(ServingError) as err, stored_upload(Body(b""), tmp_path / "root"):
        pass
    assert err.value.code == "empty_file" and os.listdir(tmp_path / "root") == []
