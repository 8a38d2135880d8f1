"""The parametric engine: its signal, its interface, and lip sync checked on re-detected output."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.engines import CHUNK_FRAMES, ChunkRequest, Engine, create_engine
from latentsync.engines.parametric import mouth_signal
from latentsync.media import decode_audio
from tests.datafiles import media_file

FPS = 25


@pytest.fixture(scope="module")
def avatar(tmp_path_factory) -> Avatar:
    cache = tmp_path_factory.getbasetemp() / "avatars"  # shared with tests/test_avatar.py
    return Avatar.prepare(media_file("video/2s_GirlMuseum_0730.mp4"), AvatarSettings(fps=FPS), cache)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return decode_audio(media_file("audio/demo1_audio.wav"), 16000).astype(np.float32) / 32768.0


def _band_rms_per_frame(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """Independent reference: 300-3000 Hz RMS over each frame's samples."""
    sos = signal.butter(4, [300, 3000], btype="bandpass", fs=16000, output="sos")
    y = signal.sosfiltfilt(sos, audio.astype(np.float64))
    edges = (np.arange(n_frames + 1) * 16000) // FPS
    bounds = zip(edges[:-1], edges[1:], strict=True)
    return np.array([np.sqrt(np.mean(y[a:b] ** 2)) if b > a else 0.0 for a, b in bounds])


def test_signal_shape_range_and_silence(speech):
    pause = np.zeros(16000, np.float32)
    audio = np.concatenate([pause, speech[:48000], pause])
    feats = mouth_signal(audio, FPS)
    assert feats.shape == (-(-len(audio) * FPS // 16000), 2) and feats.dtype == np.float32
    assert feats[:, 0].min() >= 0 and feats[:, 0].max() <= 1 and np.abs(feats[:, 1]).max() <= 1
    assert np.all(feats[:20, 0] == 0) and np.all(feats[-20:, 0] == 0)  # closed in silence
    assert feats[25:145, 0].max() > 0.5
    # Low-passed, no flicker: bounded steps, and fewer turning points than ~7 syllables/s would make.
    step = np.diff(feats[:, 0])
    assert np.abs(step).max() < 0.5
    turns = np.sum(np.diff(np.sign(step[np.abs(step) > 1e-3])) != 0)
    assert turns / (len(audio) / 16000) < 14, f"{turns} turning points"
    assert np.all(mouth_signal(np.zeros(8000, np.float32), FPS) == 0)


def test_feature_ranges_equal_the_whole_clip_rows(avatar, speech):
    engine = create_engine("parametric", None, avatar)
    engine.load()
    whole = engine.features(speech)
    for first, stop in ((0, 16), (100, 148), (len(whole) - 8, len(whole) + 8)):
        expected = whole[np.minimum(np.arange(first, stop), len(whole) - 1)]
        np.testing.assert_array_equal(engine.features(speech, first, stop), expected)


def test_engine_interface(avatar, speech):
    engine = create_engine("parametric", {"look_ahead_s": 0.04}, avatar)
    assert isinstance(engine, Engine)
    idx = np.arange(CHUNK_FRAMES) % avatar.num_frames
    with pytest.raises(RuntimeError):
        engine.generate(
            ChunkRequest(
                task_id="t", chunk_index=0, frame_indices=idx, features=np.zeros((CHUNK_FRAMES, 2), np.float32)
            )
        )
    engine.load()
    engine.load()
    feats = engine.features(speech)
    result = engine.generate(ChunkRequest(task_id="t", chunk_index=3, frame_indices=idx, features=feats[48:64]))
    assert (result.task_id, result.chunk_index) == ("t", 3)
    assert result.faces.shape == (CHUNK_FRAMES, 256, 256, 3) and result.faces.dtype == np.uint8
    assert result.generate_s > 0
    keep = np.asarray(avatar.mask) == 1.0
    assert np.array_equal(result.faces[:, keep], np.asarray(avatar.faces)[idx][:, keep])
    silent = engine.generate(
        ChunkRequest(task_id="t", chunk_index=0, frame_indices=idx, features=np.zeros((CHUNK_FRAMES, 2), np.float32))
    )
    assert np.abs(silent.faces.astype(np.int16) - np.asarray(avatar.faces)[idx]).mean() < 0.5
    engine.close()
    engine.close()
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine("nope", None, avatar)
    with pytest.raises(ValueError, match="unknown parametric"):
        create_engine("parametric", {"bogus": 1}, avatar)
    with pytest.raises(ValueError, match="feature rows"):
        ChunkRequest(task_id="t", chunk_index=0, frame_indices=idx, features=None)
    with pytest.raises(ValueError, match="15 feature rows for 16 frames"):
        ChunkRequest(task_id="t", chunk_index=0, frame_indices=idx, features=feats[:15])


@pytest.mark.slow  # face landmarks re-detected on every output frame: 4 s
def test_lip_sync_on_redetected_output(avatar, speech):
    """Mouth opening measured by a fresh face mesh on the pasted frames follows the speech."""
    import mediapipe as mp

    engine = create_engine("parametric", None, avatar)
    engine.load()
    feats = engine.features(speech)
    n = len(feats)
    frames = []
    for c in range(0, n, CHUNK_FRAMES):
        idx = np.array([avatar.frame_index(k) for k in range(c, c + CHUNK_FRAMES)])
        chunk = np.pad(feats[c : c + CHUNK_FRAMES], ((0, max(c + CHUNK_FRAMES - n, 0)), (0, 0)))
        result = engine.generate(
            ChunkRequest(task_id="lipsync", chunk_index=c // CHUNK_FRAMES, frame_indices=idx, features=chunk)
        )
        frames += [avatar.paste(i, face) for i, face in zip(idx, result.faces, strict=True)][: n - c]
    engine.close()

    opening = []
    face_mesh = mp.solutions.face_mesh
    with face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True) as mesh:
        for frame in frames:
            found = mesh.process(frame).multi_face_landmarks
            assert found, "face lost in the output"
            lm = np.array([(p.x * frame.shape[1], p.y * frame.shape[0]) for p in found[0].landmark])
            opening.append(np.linalg.norm(lm[13] - lm[14]) / np.linalg.norm(lm[10] - lm[152]))
    opening = np.array(opening)
    envelope = _band_rms_per_frame(speech, n)

    def corr(lag: int) -> float:
        a = opening[max(lag, 0) : n + min(lag, 0)]
        b = envelope[max(-lag, 0) : n - max(lag, 0)]
        return float(np.corrcoef(a, b)[0, 1])

    best = max(corr(lag) for lag in range(-2, 3))
    assert best >= 0.6, f"best correlation {best:.2f}"

    silent = envelope < 0.1 * np.percentile(envelope, 95)
    speaking_median = np.median(opening[~silent])
    runs, k = [], 0
    while k < n:
        if silent[k]:
            j = k
            while j < n and silent[j]:
                j += 1
            if (j - k) / FPS > 0.3:
                runs.append((k, j))
            k = j
        else:
            k += 1
    assert runs, "the clip should contain pauses"
    for a, b in runs:  # +-2 frames of lag at the edges
        inner = opening[a + 2 : b - 2]
        assert inner.max() < speaking_median, f"mouth open in the pause at frames {a}-{b}: {inner.round(3)}"
