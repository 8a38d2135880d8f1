"""Face geometry: mask, alignment maths, landmark tracking, paste-back equivalence."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from latentsync.face import (
    MESH_TO_68,
    TEMPLATE_POINTS,
    FaceNotFoundError,
    FaceTracker,
    PasteGeometry,
    PasteScratch,
    alignment_points,
    compute_affines,
    make_keep_mask,
    paste_face,
    paste_face_reference,
    similarity_transform,
    smooth_landmarks,
    track_face,
    transform_points,
    warp_face,
)
from latentsync.framing_plan import load_clip
from tests.datafiles import media_file


def _video(name: str) -> Path:
    return media_file(f"video/{name}")


@pytest.fixture(scope="module")
def museum_frames() -> np.ndarray:
    return load_clip(_video("2s_GirlMuseum_0730.mp4"), 25, 16000, with_audio=False).frames[:12]


def test_mask_geometry_matches_the_documented_one():
    mask = make_keep_mask()
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    generated = 1.0 - mask
    assert abs(generated.mean() - 0.407) < 0.005
    assert mask[:95].min() == 1.0 and mask[246:].min() == 1.0
    assert mask[110, 78:178].min() == 1.0  # the nose stays
    assert generated[110, 9:78].min() == 1.0 and generated[110, 178:247].min() == 1.0
    for row, x0, x1 in [(128, 9, 247), (176, 15, 240), (208, 40, 216), (240, 104, 160)]:
        cols = np.flatnonzero(generated[row])
        assert (cols[0], cols[-1]) == (x0, x1)
    assert make_keep_mask(32).shape == (32, 32)


def test_mesh_mapping_has_68_distinct_points():
    assert len(MESH_TO_68) == 68 and len(set(MESH_TO_68)) == 68 and max(MESH_TO_68) < 478


def test_similarity_transform_recovers_a_known_similarity():
    angle, scale, shift = 0.2, 1.7, np.array([12.0, -5.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.array([[10.0, 20.0], [50.0, 22.0], [31.0, 60.0]])
    dst = src @ rot.T + shift
    affine = similarity_transform(src, dst)
    np.testing.assert_allclose(transform_points(src, affine), dst, atol=1e-9)
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((3, 2)), dst)


def test_smoothing_freezes_jitter_and_follows_motion():
    rng = np.random.default_rng(0)
    base = rng.uniform(100, 300, (68, 2))
    base[:17, 0] = np.linspace(100, 300, 17)  # jaw: 200 px face
    jitter = base + rng.normal(0, 0.3, (30, 68, 2))
    smoothed = smooth_landmarks(jitter)
    assert np.abs(np.diff(smoothed, axis=0)).mean() < 0.2 * np.abs(np.diff(jitter, axis=0)).mean()
    moved = np.stack([base, base + 40.0])
    assert np.abs(smooth_landmarks(moved)[1] - (base + 40.0)).max() < 1e-6


def test_affines_put_alignment_points_on_the_template(museum_frames):
    track = track_face(museum_frames)
    assert track.found.all()
    affines = compute_affines(smooth_landmarks(track.landmarks))
    pts = transform_points(alignment_points(smooth_landmarks(track.landmarks)[0]), affines[0])
    # Least squares: the centroids coincide, the points land near (not on) the template.
    np.testing.assert_allclose(pts.mean(axis=0), TEMPLATE_POINTS.mean(axis=0), atol=1e-6)
    assert np.abs(pts - TEMPLATE_POINTS).max() < 12.0
    face = warp_face(museum_frames[0], affines[0])
    assert face.shape == (256, 256, 3) and face.dtype == np.uint8


def test_tracker_finds_a_tiny_face_in_a_large_frame(museum_frames):
    # Face ~60 px wide in a 1920x1080 frame: too small for the detector on the whole frame.
    frame = museum_frames[0]
    small = cv2.resize(frame, None, fx=0.35, fy=0.35, interpolation=cv2.INTER_AREA)
    canvas = np.full((1080, 1920, 3), 90, np.uint8)
    canvas[600 : 600 + small.shape[0], 1300 : 1300 + small.shape[1]] = small
    with FaceTracker() as tracker:
        det = tracker.detect(canvas)
    assert det is not None
    assert 1300 < det.center[0] < 1300 + small.shape[1] and 600 < det.center[1] < 600 + small.shape[0]


def test_missing_faces_are_interpolated_and_too_few_fail(museum_frames):
    frames = museum_frames.copy()
    frames[4:6] = 0  # no face
    track = track_face(frames)
    assert track.found.tolist() == [True] * 4 + [False] * 2 + [True] * 6
    expected = track.landmarks[3] + (track.landmarks[6] - track.landmarks[3]) / 3
    np.testing.assert_allclose(track.landmarks[4], expected, atol=1e-3)
    frames[:9] = 0
    with pytest.raises(FaceNotFoundError, match=r"only 3 of 12 frames.*0-8"):
        track_face(frames)


@pytest.mark.parametrize("size", [(832, 1248), (1080, 1920)])
def test_box_paste_equals_full_frame_reference(size):
    rng = np.random.default_rng(1)
    w, h = size
    frame = rng.integers(0, 256, (h, w, 3), np.uint8)
    face = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), np.uint8), (0, 0), 2)
    for centre, face_w in [((w * 0.5, h * 0.3), 90.0), ((25.0, h * 0.5), 60.0), ((w * 0.7, 20.0), 200.0)]:
        cx, cy = centre
        src = np.array([[cx - face_w / 2, cy], [cx + face_w / 2, cy + 4], [cx, cy + face_w / 2]])
        affine = similarity_transform(src, TEMPLATE_POINTS)
        ref = paste_face_reference(frame, face, affine)
        ours = paste_face(frame, face, affine)
        x0, y0, x1, y1 = PasteGeometry.from_affine(affine, (w, h)).box
        outside = np.ones((h, w), bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(ref[outside], ours[outside]) and np.array_equal(ours[outside], frame[outside])
        diff = np.abs(ref[y0:y1, x0:x1].astype(np.int16) - ours[y0:y1, x0:x1])
        assert diff.mean() < 1.0
        assert (x1 - x0) * (y1 - y0) < 0.2 * w * h


def test_paste_with_a_scratch_buffer_equals_paste_without_it():
    """One PasteScratch across boxes of different sizes (grown, then used as a smaller view), in place."""
    rng = np.random.default_rng(2)
    w, h = 832, 1248
    frame = rng.integers(0, 256, (h, w, 3), np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), np.uint8)
    scratch = PasteScratch()
    for cx, cy, face_w in [(400.0, 300.0, 90.0), (420.0, 500.0, 300.0), (100.0, 900.0, 60.0)]:
        src = np.array([[cx - face_w / 2, cy], [cx + face_w / 2, cy + 4], [cx, cy + face_w / 2]])
        affine = similarity_transform(src, TEMPLATE_POINTS)
        expected = paste_face(frame, face, affine)
        target = frame.copy()
        out = paste_face(target, face, affine, inplace=True, scratch=scratch)
        assert out is target and np.array_equal(out, expected)
    assert scratch.view(10, 10).base is not None  # a view of the grown buffer, not a fresh array
