"""Frames decoded to disk a batch at a time, and the frame budget counted while decoding (issue 35).

Code: latentsync/media/frame_file.py (``FrameFileWriter``, ``FrameFile``), latentsync/media/video.py
(``iter_video_frames``, ``FrameBudget``, ``decode_clip_to_file``), latentsync/avatar.py (``_prepare_into``).
The memory proof (a minute of 1080p prepared under ``avatar.prepare_max_rss_mb``) is
tests/serving/api/test_hostile_media.py.
"""

from __future__ import annotations

import dataclasses
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.framing_plan import load_clip, load_clip_to_file
from latentsync.media.frame_file import FrameFile, FrameFileWriter
from latentsync.media.probe import probe_media
from latentsync.media.video import FrameBudget, MediaLimitError, decode_video_frames, iter_video_frames
from tests.datafiles import media_file

FACE_VIDEO = media_file("video/2s_GirlMuseum_0730.mp4")
#: A title tag claiming the clip is one frame long (what a forged container says of itself).
FORGED_TITLE = "Duration: 00:00:00.04, start: 0.0"


@pytest.fixture(scope="module")
def three_seconds(tmp_path_factory):
    """3 s of a test pattern at 96x64, 25 fps (75 frames), whose title claims 0.04 s."""
    path = tmp_path_factory.mktemp("budget") / "forged.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=25"]
    cmd += ["-t", "3", "-metadata", f"title={FORGED_TITLE}", "-c:v", "libx264", "-preset", "ultrafast", str(path)]
    subprocess.run(cmd, check=True, timeout=60)
    return path


def test_a_frames_file_written_in_batches_is_the_npy_numpy_writes(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (11, 6, 10, 3), dtype=np.uint8)
    with FrameFileWriter(tmp_path / "streamed.npy") as writer:
        for start in range(0, 11, 4):
            writer.write(frames[start : start + 4])
    np.save(tmp_path / "saved.npy", frames)
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()
    with FrameFile(tmp_path / "streamed.npy") as reader:
        assert len(reader) == 11 and reader.shape == (11, 6, 10, 3)
        assert all(np.array_equal(reader[i], frames[i]) for i in range(11))
        assert np.array_equal(reader[-1], frames[-1])
        with pytest.raises(IndexError):
            reader[11]
    with pytest.raises(ValueError, match="frame size changed"), FrameFileWriter(tmp_path / "bad.npy") as writer:
        writer.write(frames[:2])
        writer.write(frames[:2, :4])


def test_frames_past_the_budget_are_refused_while_decoding_whatever_the_probe_says(three_seconds):
    budget = FrameBudget.for_duration(1.0, 25, "avatar.upload_max_s")
    assert budget.max_frames == 26
    # The probe is anchored (tests/test_probe.py); here it is told the file's own claim, 0.04 s.
    lying = dataclasses.replace(probe_media(three_seconds), duration_s=0.04)
    seen = 0
    with pytest.raises(MediaLimitError, match=r"more than 26 frames at 25 fps, longer than avatar\.upload_max_s = 1 s"):
        for batch in iter_video_frames(three_seconds, 25, info=lying, budget=budget, batch_frames=4):
            seen += batch.shape[0]
    assert seen <= budget.max_frames, "FFmpeg was stopped at the budget, not at the end of the clip"
    with pytest.raises(MediaLimitError, match="avatar.upload_max_s"):
        decode_video_frames(three_seconds, 25, info=lying, budget=budget)
    # Within the budget the same frames come out, batch by batch or at once.
    whole = decode_video_frames(three_seconds, 25, budget=FrameBudget.for_duration(3.0, 25, "media.max_clip_s"))
    assert whole.shape == (75, 64, 96, 3)
    batched = np.concatenate([b.copy() for b in iter_video_frames(three_seconds, 25, batch_frames=8)])
    assert np.array_equal(batched, whole)


def test_a_preparation_over_its_frame_budget_fails_and_leaves_nothing(three_seconds, tmp_path):
    budget = FrameBudget.for_duration(1.0, 25, "avatar.upload_max_s")
    with pytest.raises(MediaLimitError, match="avatar.upload_max_s"):
        Avatar.prepare(three_seconds, AvatarSettings(fps=25), cache_dir=tmp_path, budget=budget)
    assert list(tmp_path.iterdir()) == [], "no temporary folder or frames file is left"


def test_frames_streamed_to_disk_are_the_frames_load_clip_decodes(tmp_path):
    size = (256, 256)  # another aspect than 832x1248: cover crops around the face
    held = load_clip(FACE_VIDEO, 25, 16000, size, with_audio=True, fit="cover")
    stored = load_clip_to_file(FACE_VIDEO, tmp_path / "frames.npy", 25, 16000, size, with_audio=True, fit="cover")
    assert stored.num_frames == held.num_frames == 50 and stored.size == held.size == size
    assert stored.framing == held.framing and stored.framing is not None and stored.framing.crop is not None
    assert np.array_equal(np.load(tmp_path / "frames.npy"), held.frames)
    assert held.audio is not None and stored.audio is not None and np.array_equal(stored.audio, held.audio)
