"""The upload decoder against hostile files, without a server: every payload of the bad-input corpus
reads its target through a permissive FFmpeg (so it is a live payload) and nothing through ours;
a FIFO beside the upload keeps every byte; what browsers record (WebM/Opus) decodes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from latentsync.media.audio import decode_audio, decode_untrusted_audio
from latentsync.media.errors import MediaDecodeTimeout
from latentsync.media.probe import MediaProbeError
from scripts.make_bad_inputs import SHORT_SPEECH, SPEECH, make_corpus
from tests.datafiles import media_file

RATE_HZ = 48000
#: Options that let a permissive FFmpeg follow each payload (concat's absolute paths, MP4 data refs).
PERMISSIVE = {".txt": ["-safe", "0"], ".ffconcat": ["-safe", "0"], ".mp4": ["-enable_drefs", "1"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    data_dir = media_file(SPEECH).parents[1]
    media_file(SHORT_SPEECH)
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, 1, data_dir)  # the 1 MB "large" file is not used here
    return out, json.loads((out / "manifest.json").read_text())["files"]


def hostile(entries: list[dict]) -> list[dict]:
    return [
        e
        for e in entries
        if e["status"] == 400
        and e["code"] == "not_audio"
        and e["file"].endswith((".txt", ".ffconcat", ".mpd", ".m3u8", ".mp4"))
    ]


def permissive_decode(path: Path) -> int:
    """Samples a default FFmpeg (any protocol, any demuxer) decodes from ``path``."""
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        *PERMISSIVE.get(path.suffix, []),
        "-i",
        path.name,
        "-t",
        "10",
        "-map",
        "0:a:0",
        "-ac",
        "1",
        "-ar",
        str(RATE_HZ),
        "-f",
        "s16le",
        "pipe:1",
    ]
    proc = subprocess.run(cmd, capture_output=True, cwd=path.parent, timeout=60, check=False)
    return len(proc.stdout) // 2


def test_every_hostile_payload_is_live_yet_reads_nothing_through_our_decoder(corpus):
    folder, entries = corpus
    payloads = hostile(entries)
    assert len(payloads) >= 8
    for entry in payloads:
        path = folder / entry["file"]
        if entry["reads"]:  # the payload works: a permissive FFmpeg decodes its target's ~7 s of audio
            assert permissive_decode(path) > 5 * RATE_HZ, entry
        with pytest.raises(MediaProbeError) as caught:
            decode_untrusted_audio(path, RATE_HZ, max_duration_s=10.0)
        assert not isinstance(caught.value, MediaDecodeTimeout), entry


def test_accepted_formats_decode_including_webm_opus(corpus):
    folder, entries = corpus
    for name in ("good.webm", "good.ogg", "good.m4a", "good.aac", "good.mp3", "good.flac", "float32.wav"):
        entry = next(e for e in entries if e["file"] == name)
        samples = decode_untrusted_audio(folder / name, RATE_HZ)
        assert samples.dtype == np.int16 and abs(len(samples) / RATE_HZ - entry["audio_s"]) <= 0.05, name


def _fifo_with(path: Path, content: bytes) -> int:
    """A FIFO holding ``content``, kept open read-write (so opening it never blocks); returns the fd."""
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    os.write(fd, content)
    return fd


def _left_in(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def test_a_fifo_beside_the_upload_keeps_every_byte(tmp_path):
    """Issue 10's payload, worst case: the list names a FIFO in the upload's own folder."""
    content = np.random.default_rng(10).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    fd = _fifo_with(tmp_path / "video-0.fifo", content)
    try:
        upload = tmp_path / "upload"
        upload.write_bytes(b"ffconcat version 1.0\nfile video-0.fifo\n")
        with pytest.raises(MediaProbeError):
            decode_untrusted_audio(upload, RATE_HZ, timeout_s=10.0)
        assert _left_in(fd) == content, "the decoder read from the FIFO"
        os.write(fd, content)
        with pytest.raises(subprocess.TimeoutExpired):  # control: the plain decoder drains it, then blocks
            decode_audio(upload, RATE_HZ, timeout_s=3.0)
        assert _left_in(fd) != content
    finally:
        os.close(fd)


def test_symlinked_upload_is_refused_and_timeouts_are_their_own_error(tmp_path):
    link = tmp_path / "upload"
    link.symlink_to(media_file(SPEECH))
    with pytest.raises(OSError):
        decode_untrusted_audio(link, RATE_HZ)
    slow = tmp_path / "slow.wav"
    slow.write_bytes(media_file(SPEECH).read_bytes())
    with pytest.raises(MediaDecodeTimeout):
        decode_untrusted_audio(slow, RATE_HZ, timeout_s=1e-3)
