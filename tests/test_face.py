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
    affine_at_face_size,
    alignment_points,
    compute_affines,
    face_keep_mask,
    face_size_of,
    make_keep_mask,
    paste_face,
    paste_face_reference,
    similarity_transform,
    smooth_landmarks,
    template_size,
    template_to_face_affine,
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


# ----------------------------------------------------------------------------- face sizes (LatentSync 1.6: 512)


def _face_affine(cx: float = 300.0, cy: float = 260.0, face_w: float = 120.0) -> np.ndarray:
    """A frame-to-template affine (256 template) of a slightly tilted face centred near ``(cx, cy)``."""
    src = np.array([[cx - face_w / 2, cy], [cx + face_w / 2, cy + 6], [cx + 2, cy + face_w / 2]])
    return similarity_transform(src, TEMPLATE_POINTS)


def _smooth_frame(h: int = 540, w: int = 600, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), np.uint8), (0, 0), 3)


def test_template_and_affines_scale_with_the_face_size_and_256_is_unchanged():
    # The original: ratio = size / 256 * 2.8, crop (int(75 ratio), int(100 ratio)), points [[17, 20], [58, 20],
    # [37.5, 40]] * ratio.
    assert template_size(256) == (210, 280) and template_size(512) == (420, 560)
    np.testing.assert_allclose(TEMPLATE_POINTS, np.array([[17, 20], [58, 20], [37.5, 40]]) * 2.8, atol=1e-12)
    affine = _face_affine()
    assert np.array_equal(affine_at_face_size(affine, 256), affine)
    src = transform_points(TEMPLATE_POINTS, cv2.invertAffineTransform(affine))  # frame points on the template
    np.testing.assert_allclose(transform_points(src, affine_at_face_size(affine, 512)), 2 * TEMPLATE_POINTS, atol=1e-9)
    # In aligned-face pixels (the resize's pixel-centre convention): template x -> x * 512 / 420 + offset.
    sx, sy = 512 / 420, 512 / 560
    expected = 2 * TEMPLATE_POINTS * (sx, sy) + (0.5 * sx - 0.5, 0.5 * sy - 0.5)
    np.testing.assert_allclose(transform_points(src, template_to_face_affine(affine, 512)), expected, atol=1e-9)
    with pytest.raises(ValueError, match="face_size"):
        warp_face(_smooth_frame(), affine, 0)


def test_warp_at_256_is_bit_identical_to_the_1_0_warp():
    frame, affine = _smooth_frame(), _face_affine()
    crop = cv2.warpAffine(
        frame, affine, (210, 280), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_CONSTANT, borderValue=(127,) * 3
    )
    one_zero = cv2.resize(crop, (256, 256), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(warp_face(frame, affine), one_zero)
    assert np.array_equal(warp_face(frame, affine, 256), one_zero)


def test_warp_at_512_puts_the_template_points_where_expected():
    affine = _face_affine()
    frame = np.zeros((540, 600, 3), np.uint8)
    points = transform_points(TEMPLATE_POINTS, cv2.invertAffineTransform(affine))  # brows, nose in the frame
    for x, y in points:
        cv2.circle(frame, (int(round(x)), int(round(y))), 2, (255, 255, 255), -1)
    frame = cv2.GaussianBlur(frame, (0, 0), 1.5)
    face = warp_face(frame, affine, 512)
    assert face.shape == (512, 512, 3) and face.dtype == np.uint8
    where = transform_points(points, template_to_face_affine(affine, 512))
    grey = face[..., 0].astype(np.float32)
    for x, y in where:
        x0, y0 = int(x) - 12, int(y) - 12
        window = grey[y0 : y0 + 25, x0 : x0 + 25]
        peak_y, peak_x = np.unravel_index(np.argmax(window), window.shape)
        assert abs(x0 + peak_x - x) <= 2.0 and abs(y0 + peak_y - y) <= 2.0, (x, y, x0 + peak_x, y0 + peak_y)
    # The same crop as at 256, sampled twice as finely.
    small = cv2.resize(warp_face(_smooth_frame(), affine, 512), (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(np.int16) - warp_face(_smooth_frame(), affine)).mean() < 2.0


def test_keep_mask_at_512_is_the_256_geometry_resized():
    assert np.array_equal(face_keep_mask(256), make_keep_mask())
    mask = face_keep_mask(512)
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert abs((1.0 - mask).mean() - (1.0 - make_keep_mask()).mean()) < 0.005
    # Away from the edges (Lanczos reaches 4 source pixels), rows 0-94 and 246+ of the 256 grid and the nose keep.
    assert mask[:180].min() == 1.0 and mask[500:].min() == 1.0
    assert mask[220, 170:340].min() == 1.0
    # A soft edge (Lanczos, as the original: 3.5 % of the pixels, within 7 px of an edge; 1.3 % in 0.05-0.95).
    assert 0 < ((mask > 0) & (mask < 1)).mean() < 0.04 and ((mask > 0.05) & (mask < 0.95)).mean() < 0.015
    binary = (mask[::2, ::2] >= 0.5).astype(np.float32)
    assert (binary != make_keep_mask()).mean() < 0.01


def test_a_512_face_pastes_like_a_256_face():
    rng = np.random.default_rng(4)
    w, h = 600, 540
    frame = rng.integers(0, 256, (h, w, 3), np.uint8)
    face256 = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), np.uint8), (0, 0), 3)
    face512 = cv2.resize(face256, (512, 512), interpolation=cv2.INTER_CUBIC)
    affine = _face_affine()
    assert face_size_of(face512) == 512 and face_size_of(np.zeros((560, 420, 3), np.uint8)) == 512
    assert face_size_of(face256) == 256 and face_size_of(np.zeros((280, 210, 3), np.uint8)) == 256
    with pytest.raises(ValueError, match="square"):
        face_size_of(np.zeros((300, 200, 3), np.uint8))
    geometry = PasteGeometry.from_affine(affine, (w, h), 512)
    assert geometry.face_size == 512 and geometry.box == PasteGeometry.from_affine(affine, (w, h)).box
    ours = paste_face(frame, face512, geometry=geometry)
    assert np.array_equal(ours, paste_face(frame, face512, affine))
    ref = paste_face_reference(frame, face512, affine)
    x0, y0, x1, y1 = geometry.box
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(ours[outside], frame[outside]) and np.array_equal(ref[outside], frame[outside])
    assert np.abs(ref[y0:y1, x0:x1].astype(np.int16) - ours[y0:y1, x0:x1]).mean() < 1.0
    at_256 = paste_face(frame, face256, affine)
    assert np.abs(at_256[y0:y1, x0:x1].astype(np.int16) - ours[y0:y1, x0:x1]).mean() < 2.0
    with pytest.raises(ValueError, match="512 px face, the paste geometry is for 256 px"):
        paste_face(frame, face512, geometry=PasteGeometry.from_affine(affine, (w, h)))
