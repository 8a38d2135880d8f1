"""Avatar preparation on the real videos, the on-disk cache and ping-pong indexing."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from latentsync.avatar import (
    PREPARATION_VERSION,
    Avatar,
    AvatarSettings,
    cache_key,
    file_digest,
    frames_to_nearest_face,
    pasteable_frames,
    pingpong_index,
)
from latentsync.face import FACE_SIZE, face_keep_mask, template_to_face_affine, transform_points
from tests.datafiles import media_file

VIDEOS = [
    "2s_GirlMuseum_0730.mp4",
    pytest.param("10s_girl_0729_00_formal.mp4", marks=pytest.mark.slow),  # 10 s of face tracking: ~7 s
    "20250106_124532_sig.mp4",
    "nanmote002.mp4",
]


def _video(name: str) -> Path:
    return media_file(f"video/{name}")


@pytest.fixture(scope="session")
def avatar_cache(tmp_path_factory) -> Path:
    # Shared with tests/test_parametric.py through the session's base temp dir.
    return tmp_path_factory.getbasetemp() / "avatars"


@pytest.fixture(scope="module", params=VIDEOS)
def prepared(request, avatar_cache) -> tuple[str, Avatar]:
    return request.param, Avatar.prepare(_video(request.param), AvatarSettings(fps=25), avatar_cache)


def test_pingpong_index():
    assert [pingpong_index(i, 4) for i in range(12)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert [pingpong_index(i, 1) for i in range(3)] == [0, 0, 0]
    assert [pingpong_index(i, 2) for i in range(5)] == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError):
        pingpong_index(0, 0)


def test_pasteable_frames_fill_gaps_inside_the_clip_but_not_past_its_first_or_last_face():
    found = np.zeros(40, bool)
    found[[5, 6, 20, 30]] = True
    got = pasteable_frames(found, max_gap_frames=4, edge_frames=2)
    want = np.zeros(40, bool)
    want[3:11] = True  # 2 before the first face (edge), the face, 4 after (inside the clip)
    want[16:25] = True  # 4 either side of 20
    want[26:33] = True  # 4 before 30 (inside), 2 after the last face (edge)
    assert got.tolist() == want.tolist()
    assert not pasteable_frames(np.zeros(5, bool), 4).any()
    assert pasteable_frames(np.ones(5, bool), 0).all()


def test_frames_to_nearest_face_matches_the_pairwise_distances():
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 17, 300):
        for fraction in (0.0, 0.05, 0.5, 1.0):
            found = rng.random(n) < fraction
            faces = np.flatnonzero(found)
            if faces.size:
                pairwise = np.abs(np.arange(n)[:, None] - faces[None, :]).min(axis=1)
            else:
                pairwise = np.full(n, n)
            got = frames_to_nearest_face(found)
            assert got.dtype == np.int64 and got.shape == (n,)
            np.testing.assert_array_equal(got, pairwise, err_msg=f"n={n} found={found.astype(int)}")
    # a long clip costs O(n) memory: 200 000 frames with one face at the end
    found = np.zeros(200_000, dtype=bool)
    found[-1] = True
    assert frames_to_nearest_face(found)[0] == 199_999


def test_settings_are_validated_and_keyed(tmp_path):
    with pytest.raises(ValueError, match="fps"):
        AvatarSettings(fps=0)
    video = _video("nanmote002.mp4")
    assert cache_key(video, AvatarSettings(fps=25)) != cache_key(video, AvatarSettings(fps=24))
    assert cache_key(video, AvatarSettings()) == cache_key(video, AvatarSettings())
    with pytest.raises(FileNotFoundError):
        Avatar.prepare(tmp_path / "missing.mp4", AvatarSettings(), tmp_path)


def test_every_video_prepares_with_a_face_on_most_frames(prepared):
    name, avatar = prepared
    n = avatar.num_frames
    w, h = avatar.frame_size
    assert avatar.frames.shape == (n, h, w, 3) and avatar.frames.dtype == np.uint8
    assert avatar.faces.shape == (n, FACE_SIZE, FACE_SIZE, 3) and avatar.faces.dtype == np.uint8
    assert avatar.affines.shape == (n, 2, 3) and avatar.landmarks.shape == (n, 68, 2)
    assert avatar.mask.shape == (256, 256)
    assert avatar.found.mean() >= 0.95, f"{name}: face on {avatar.found.sum()}/{n} frames"
    widths = avatar.boxes[:, 2] - avatar.boxes[:, 0]
    assert 40 < np.median(widths) < 400


def test_aligned_faces_are_stable(prepared):
    name, avatar = prepared
    pairs = zip(_smoothed(avatar), avatar.affines, strict=True)
    smoothed_aligned = np.stack([transform_points(lm, template_to_face_affine(a)) for lm, a in pairs])
    jitter = np.linalg.norm(np.diff(smoothed_aligned, axis=0), axis=2).mean()
    assert jitter < 1.5, f"{name}: mean landmark jitter {jitter:.2f} px in the aligned crop"
    # Raw detections of the rigid nose, not smoothed: the alignment itself holds still.
    nose = np.asarray(avatar.aligned_landmarks)[:, 27:36]
    nose_jitter = np.linalg.norm(np.diff(nose, axis=0), axis=2).mean()
    assert nose_jitter < 1.5, f"{name}: raw nose jitter {nose_jitter:.2f} px in the aligned crop"


def _smoothed(avatar: Avatar) -> np.ndarray:
    from latentsync.face import smooth_landmarks

    return smooth_landmarks(np.asarray(avatar.landmarks))


def test_cache_reload_is_identical_and_fast(prepared, avatar_cache):
    name, avatar = prepared
    t0 = time.monotonic()
    again = Avatar.prepare(_video(name), AvatarSettings(fps=25), avatar_cache)
    elapsed = time.monotonic() - t0
    minutes = avatar.num_frames / avatar.fps / 60
    assert elapsed < max(1.0 * minutes, 0.5), f"{name}: reload took {elapsed:.2f} s"
    assert again.path == avatar.path and again.key == avatar.key
    for field in ("frames", "faces", "affines", "landmarks", "aligned_landmarks", "boxes", "found", "mask"):
        assert np.array_equal(np.asarray(getattr(again, field)), np.asarray(getattr(avatar, field))), field
    assert isinstance(again.frames, np.memmap)


def test_paste_changes_only_the_face_box(prepared):
    _, avatar = prepared
    i = avatar.num_frames // 2
    base = np.asarray(avatar.frames[i])
    out = avatar.paste(i, np.zeros((256, 256, 3), np.uint8))
    x0, y0, x1, y1 = avatar.paste_geometry(i).box
    changed = np.argwhere((out != base).any(axis=2))
    assert len(changed) > 0
    assert changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
    assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
    # Pasting the frame's own aligned face back changes little (two resamplings).
    same = avatar.paste(i, np.asarray(avatar.faces[i]))
    assert np.abs(same[y0:y1, x0:x1].astype(np.int16) - base[y0:y1, x0:x1]).mean() < 4.0


def test_settings_key_the_face_size_and_256_keeps_its_old_key():
    video = _video("nanmote002.mp4")
    with pytest.raises(ValueError, match="face_size"):
        AvatarSettings(face_size=0)
    at_256, at_512 = AvatarSettings(fps=25), AvatarSettings(fps=25, face_size=512)
    assert at_256.face_size == FACE_SIZE == 256
    assert cache_key(video, at_512) != cache_key(video, at_256)
    # The key of a 256 preparation is the one it had before face sizes existed: caches prepared then stay valid.
    before = {k: v for k, v in at_256.to_json().items() if k != "face_size"}
    payload = json.dumps(
        {"video": file_digest(video), "settings": before, "version": PREPARATION_VERSION}, sort_keys=True
    )
    assert cache_key(video, at_256) == hashlib.sha256(payload.encode()).hexdigest()[:24]


@pytest.mark.slow  # a second preparation at 512 px: ~6 s
def test_an_avatar_prepared_at_512_has_512_faces_in_its_own_folder(avatar_cache):
    """LatentSync 1.6's avatar: the same tracking and affines as at 256, faces and mask at 512."""
    video = _video("nanmote002.mp4")
    small = Avatar.prepare(video, AvatarSettings(fps=25), avatar_cache)
    big = Avatar.prepare(video, AvatarSettings(fps=25, face_size=512), avatar_cache)
    n = big.num_frames
    assert big.key != small.key and big.path != small.path
    assert big.face_size == 512 and small.face_size == 256
    assert big.faces.shape == (n, 512, 512, 3) and big.faces.dtype == np.uint8
    assert np.array_equal(np.asarray(big.mask), face_keep_mask(512))
    assert np.array_equal(np.asarray(big.affines), np.asarray(small.affines))  # one affine serves both sizes
    # Aligned landmarks in 512 pixels: twice the 256 ones, up to the resize's pixel-centre offset.
    offset = 0.5 - 0.5 * np.array([256 / 210, 256 / 280])  # template -> face resize scale, x and y
    twice = 2 * np.asarray(small.aligned_landmarks) + offset
    np.testing.assert_allclose(np.asarray(big.aligned_landmarks), twice, atol=1e-3)
    down = np.stack([cv2.resize(np.asarray(f), (256, 256), interpolation=cv2.INTER_AREA) for f in big.faces[:8]])
    assert np.abs(down.astype(np.int16) - np.asarray(small.faces[:8])).mean() < 3.0
    assert Avatar.load(big.path).face_size == 512
    # Paste-back at 512: only the face's box changes, the frame's own face pasted back changes little.
    i = n // 2
    base = np.asarray(big.frames[i])
    x0, y0, x1, y1 = big.paste_geometry(i).box
    assert (x0, y0, x1, y1) == small.paste_geometry(i).box
    out = big.paste(i, np.zeros((512, 512, 3), np.uint8))
    changed = np.argwhere((out != base).any(axis=2))
    assert len(changed) > 0 and changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
    assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
    same = big.paste(i, np.asarray(big.faces[i]))
    assert np.abs(same[y0:y1, x0:x1].astype(np.int16) - base[y0:y1, x0:x1]).mean() < 4.0
    with pytest.raises(ValueError, match="paste geometry is for 512 px"):
        big.paste(i, np.zeros((256, 256, 3), np.uint8))
