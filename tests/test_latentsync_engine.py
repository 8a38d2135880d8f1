"""The ``latentsync`` engine end to end on CPU, with tiny random checkpoints and a real prepared avatar."""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
import torch

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.engines import ChunkRequest, Engine, create_engine, num_output_frames
from tests.datafiles import load_script, media_file

REPO = Path(__file__).resolve().parents[1]

#: The engine loads (tiny checkpoints, an avatar's latents) in ~20 s and each generation takes seconds on the CPU:
#: make test runs the module in its unit tier, make test-fast leaves it out.
pytestmark = pytest.mark.slow


def speech_16k(name: str = "7s_shan_0801_01.wav") -> np.ndarray:
    audio, rate = soundfile.read(media_file(f"audio/{name}"), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != 16000:
        audio = librosa.resample(audio, orig_sr=rate, target_sr=16000)
    return audio.astype(np.float32)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    return load_script("make_tiny_checkpoints").make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def avatar(tmp_path_factory) -> Avatar:
    video = media_file("video/nanmote002.mp4")
    return Avatar.prepare(video, AvatarSettings(fps=25), cache_dir=tmp_path_factory.mktemp("avatars"))


def options(tiny_files, **overrides) -> dict:
    values = {k: str(v) for k, v in tiny_files.items()}
    values.update(
        scheduler_config="configs/scheduler_config.json",
        dtype="float16",  # ignored on CPU (float32), as the server passes it
        inference_steps=2,
        guidance_scale=1.0,
        seed=1247,
        compile=False,
        device="cpu",
    )
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def engine(tiny_files, avatar):
    engine = create_engine("latentsync", options(tiny_files), avatar)
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def speech_features(engine):
    return engine.features(speech_16k())


def chunk(features: np.ndarray, k: int = 0, **kwargs) -> ChunkRequest:
    rows = slice(16 * k, 16 * k + 16)
    return ChunkRequest(
        task_id="task",
        chunk_index=k,
        frame_indices=np.arange(16, dtype=np.int64) + 16 * k,
        features=features[rows],
        **kwargs,
    )


def test_engine_protocol_and_load(engine, avatar):
    assert isinstance(engine, Engine)
    assert engine.name == "latentsync"
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert set(engine.load_timings_s) == {"check", "unet", "whisper", "vae", "latents"}
    engine.load()  # second call: no-op


def test_features_shape_on_real_audio(engine, speech_features):
    audio = speech_16k()
    assert speech_features.shape == (num_output_frames(len(audio), 25), 50, 384)
    assert speech_features.dtype == np.float32 and np.isfinite(speech_features).all()
    assert engine.features(audio[:100]).shape == (1, 50, 384)  # shorter than one mel frame: padded
    assert engine.features(np.zeros(0, np.float32)).shape == (0, 50, 384)
    int16 = (audio[:16000] * 32767).astype(np.int16)
    np.testing.assert_allclose(engine.features(int16), engine.features(audio[:16000]), atol=2e-2)


def test_generate_keeps_masked_pixels_exactly(engine, avatar, speech_features):
    result = engine.generate(chunk(speech_features, 1))
    assert result.faces.shape == (16, 256, 256, 3) and result.faces.dtype == np.uint8
    assert result.task_id == "task" and result.chunk_index == 1
    np.testing.assert_array_equal(result.frame_indices, np.arange(16, 32))
    faces = np.asarray(avatar.faces[16:32])
    keep = np.asarray(avatar.mask) == 1
    np.testing.assert_array_equal(result.faces[:, keep], faces[:, keep])
    assert (result.faces[:, ~keep] != faces[:, ~keep]).any()
    assert {"features", "unet", "vae_decode", "compose"} <= set(result.timings_s)
    assert result.generate_s > 0


def test_same_seed_same_output_other_seed_differs(engine, speech_features):
    a = engine.generate(chunk(speech_features, seed=5)).faces
    b = engine.generate(chunk(speech_features, seed=5)).faces
    c = engine.generate(chunk(speech_features, seed=6)).faces
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    default = engine.generate(chunk(speech_features)).faces  # seed None -> options seed 1247
    np.testing.assert_array_equal(default, engine.generate(chunk(speech_features, seed=1247)).faces)


def test_feature_ranges_equal_the_whole_clip_rows(engine):
    audio = np.tile(speech_16k(), 6)[: 16000 * 40]  # 40 s: two Whisper windows
    whole = engine.features(audio)
    assert whole.shape == (1000, 50, 384)
    for first, stop in ((0, 16), (736, 768), (740, 760)):  # start, across the window boundary
        np.testing.assert_allclose(engine.features(audio, first, stop), whole[first:stop], atol=1e-5)
    # Past the end, frames clamp the encoder positions (as the original): a range agrees with a longer range.
    tail = engine.features(audio, 984, 1008)
    assert tail.shape == (24, 50, 384)
    np.testing.assert_allclose(tail, engine.features(audio, 0, 1008)[984:], atol=1e-5)
    np.testing.assert_allclose(tail[:16], whole[984:], atol=1e-5)


def test_batched_chunks_equal_chunks_generated_alone(engine, speech_features):
    # Two tasks (different seeds, frames and audio) and a different guidance in one call: batched by
    # (steps, guidance), each result as if generated alone.
    requests = [
        chunk(speech_features, 0, seed=1),
        chunk(speech_features, 1, seed=2),
        chunk(speech_features, 2, seed=3, guidance_scale=1.5),
    ]
    batched = engine.generate_batch(requests)
    assert [r.chunk_index for r in batched] == [0, 1, 2]
    assert [r.timings_s["batch"] for r in batched] == [2.0, 2.0, 1.0]
    for request, result in zip(requests, batched, strict=True):
        alone = engine.generate(request)
        np.testing.assert_array_equal(result.frame_indices, alone.frame_indices)
        diff = np.abs(result.faces.astype(int) - alone.faces.astype(int))
        assert diff.max() <= 1, diff.max()  # float rounding of a bigger batch, at most one grey level


def test_classifier_free_guidance_runs(engine, speech_features):
    plain = engine.generate(chunk(speech_features, seed=3)).faces
    guided = engine.generate(chunk(speech_features, seed=3, guidance_scale=1.5))
    assert guided.faces.shape == (16, 256, 256, 3)
    assert not np.array_equal(plain, guided.faces)


def test_frame_index_outside_the_avatar(engine, avatar):
    with pytest.raises(ValueError, match="out of range"):
        engine.generate(
            ChunkRequest(
                task_id="t", chunk_index=0, frame_indices=np.array([0, len(avatar)]), features=np.zeros((2, 50, 384))
            )
        )


def test_latent_cache_written_once_and_reused(engine, tiny_files, avatar):
    path = engine.latent_cache_path
    assert path is not None and path.parent == Path(avatar.path) and path.name.startswith("latents-")
    latents = np.load(path, mmap_mode="r")
    assert latents.shape == (len(avatar), 2, 4, 32, 32) and latents.dtype == np.float32
    mtime = path.stat().st_mtime_ns
    again = create_engine("latentsync", options(tiny_files), avatar)
    again.load()
    try:
        assert again.latents_computed is False
        assert again.latent_cache_path == path and path.stat().st_mtime_ns == mtime
        assert sorted(p.name for p in Path(avatar.path).glob("*latents-*")) == [path.name]  # no temp leftovers
    finally:
        again.close()


def test_missing_file_names_file_and_key(tiny_files, avatar, tmp_path):
    missing = tmp_path / "nowhere" / "latentsync_unet.pt"
    engine = create_engine("latentsync", options(tiny_files, unet_path=str(missing)), avatar)
    with pytest.raises(FileNotFoundError) as info:
        engine.load()
    message = str(info.value)
    assert "engine.latentsync.unet_path" in message and str(missing) in message
    assert "never downloaded" in message and "checkpoints/README.md" in message
    assert "chunyu-li/LatentSync" in message and "ByteDance/LatentSync-1.5" in message
    assert "stabilityai/sd-vae-ft-mse" in message and "hf download" in message
    assert not engine.loaded and engine.load_timings_s == {}
    for key in ("whisper_path", "vae_path", "unet_config", "scheduler_config"):
        engine = create_engine("latentsync", options(tiny_files, **{key: str(tmp_path / "gone")}), avatar)
        with pytest.raises(FileNotFoundError, match=f"engine.latentsync.{key}: .*gone"):
            engine.load()
    empty_vae = tmp_path / "vae"
    empty_vae.mkdir()
    (empty_vae / "config.json").write_text("{}")
    engine = create_engine("latentsync", options(tiny_files, vae_path=str(empty_vae)), avatar)
    with pytest.raises(FileNotFoundError, match="vae_path: .*diffusion_pytorch_model.safetensors"):
        engine.load()


def test_options_are_validated(tiny_files, avatar):
    with pytest.raises(ValueError, match="bogus"):
        create_engine("latentsync", {"bogus": 1}, avatar)
    with pytest.raises(ValueError, match="dtype.*'float8'"):
        create_engine("latentsync", {"dtype": "float8"}, avatar)
    with pytest.raises(ValueError, match="inference_steps.*0"):
        create_engine("latentsync", {"inference_steps": 0}, avatar)
    with pytest.raises(ValueError, match="guidance_scale.*0.5"):
        create_engine("latentsync", {"guidance_scale": 0.5}, avatar)
    engine = create_engine("latentsync", None, avatar)  # defaults: the server's config values
    assert engine.options.unet_path == "checkpoints/latentsync_unet.pt" and engine.options.inference_steps == 20
    with pytest.raises(RuntimeError, match="before load"):
        engine.generate(
            ChunkRequest(
                task_id="t", chunk_index=0, frame_indices=np.arange(16), features=np.zeros((16, 50, 384), np.float32)
            )
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_gpu_half_precision(tiny_files, avatar):
    engine = create_engine("latentsync", options(tiny_files, device="cuda", dtype="float16"), avatar)
    engine.load()
    try:
        assert engine.dtype == torch.float16
        result = engine.generate(chunk(engine.features(speech_16k()[:48000])))
        keep = np.asarray(avatar.mask) == 1
        np.testing.assert_array_equal(result.faces[:, keep], np.asarray(avatar.faces[:16])[:, keep])
    finally:
        engine.close()


def test_with_avatar_shares_models_and_matches_a_fresh_engine(engine, tiny_files, avatar, tmp_path):
    """A second avatar in the same worker: same models (one copy), its own latents, same faces as alone."""
    other_avatar = Avatar.prepare(
        media_file("video/nanmote002.mp4"), AvatarSettings(fps=25, size=(228, 406)), cache_dir=tmp_path
    )
    assert other_avatar.key != avatar.key
    shared = engine.with_avatar(other_avatar)
    assert shared._pipeline is engine._pipeline and shared._whisper is engine._whisper
    assert shared.latent_cache_path is not None and shared.latent_cache_path.parent == Path(other_avatar.path)
    alone = create_engine("latentsync", options(tiny_files), other_avatar)
    alone.load()
    try:
        features = alone.features(speech_16k())
        request = chunk(features, 1, seed=3)
        np.testing.assert_array_equal(shared.generate(request).faces, alone.generate(request).faces)
    finally:
        alone.close()
    shared.close()
    assert engine.loaded  # closing the shared one leaves the models in place


@pytest.fixture(scope="module")
def tiny_files_1_5(tmp_path_factory) -> dict[str, Path]:
    return load_script("make_tiny_checkpoints").make_tiny_checkpoints(tmp_path_factory.mktemp("tiny15"), version="1.5")


def test_version_1_5_generates_with_its_temporal_u_net(tiny_files_1_5, avatar):
    engine = create_engine("latentsync", options(tiny_files_1_5, version=1.5), avatar)  # a number, as YAML reads it
    assert engine.options.version == "1.5"
    engine.load()
    try:
        assert engine._pipeline.unet.config.use_motion_module
        features = engine.features(speech_16k()[:16000])
        result = engine.generate(chunk(np.concatenate([features, features[:-9]]), 0))
        keep = np.asarray(avatar.mask) == 1
        assert result.faces.shape == (16, 256, 256, 3)
        np.testing.assert_array_equal(result.faces[:, keep], np.asarray(avatar.faces[:16])[:, keep])
    finally:
        engine.close()


def test_a_version_mismatch_is_a_clear_start_error(tiny_files, tiny_files_1_5, avatar):
    from latentsync.models.loading import CheckpointVersionError

    engine = create_engine("latentsync", options(tiny_files, version="1.6"), avatar)  # 1.0 yaml and file
    with pytest.raises(
        ValueError, match=r"unet_config: .*unet\.yaml describes a LatentSync 1\.0 U-Net .*latentsync\.version is 1\.6"
    ):
        engine.load()
    mixed = options(tiny_files_1_5, version="1.5", unet_path=str(tiny_files["unet_path"]))  # 1.5 yaml, 1.0 file
    with pytest.raises(CheckpointVersionError) as info:
        create_engine("latentsync", mixed, avatar).load()
    assert str(info.value).startswith(
        f"{tiny_files['unet_path']} holds a LatentSync 1.0 U-Net (no motion-module tensors) "
        "but engine.latentsync.version is 1.5"
    )
    engine = create_engine("latentsync", options(tiny_files_1_5, version="1.6"), avatar)  # 1.5's yaml: 256
    with pytest.raises(
        ValueError, match=r"unet_config: .*unet\.yaml has data\.resolution 256 but .*version is 1\.6, .* 512x512 faces"
    ):
        engine.load()
    with pytest.raises(ValueError, match=r"version.*'2\.0'"):
        create_engine("latentsync", {"version": "2.0"}, avatar)
    assert not engine.loaded


@pytest.fixture(scope="module")
def tiny_files_1_6(tmp_path_factory) -> dict[str, Path]:
    return load_script("make_tiny_checkpoints").make_tiny_checkpoints(tmp_path_factory.mktemp("tiny16"), version="1.6")


@pytest.fixture(scope="module")
def avatar_512(tmp_path_factory) -> Avatar:
    """nanmote002 prepared at 512 (LatentSync 1.6), in the cache tests/test_avatar.py uses too."""
    video = media_file("video/nanmote002.mp4")
    return Avatar.prepare(video, AvatarSettings(fps=25, face_size=512), tmp_path_factory.getbasetemp() / "avatars")


def first_frames(avatar: Avatar, n: int, folder: Path) -> Avatar:
    """An engine's view of ``avatar`` cut to its first ``n`` frames (fewer faces to VAE-encode at load)."""
    payload = avatar.engine_payload()
    payload["arrays"] = {k: v if k == "mask" else v[:n] for k, v in payload["arrays"].items()}
    return Avatar.from_engine_payload(payload, folder)


def test_version_1_6_generates_512_faces_that_paste_back(tiny_files_1_6, avatar_512, avatar, tmp_path):
    from latentsync.serving.playout.paste import FramePaster

    engine = create_engine("latentsync", options(tiny_files_1_6, version="1.6"), first_frames(avatar_512, 16, tmp_path))
    assert engine.face_size == 512
    engine.load()
    try:
        assert engine._pipeline.unet.config.use_motion_module
        assert np.load(engine.latent_cache_path, mmap_mode="r").shape == (16, 2, 4, 64, 64)  # 64x64 latents
        features = engine.features(speech_16k()[:16000])
        result = engine.generate(chunk(np.concatenate([features, features[:-9]]), 0))
        assert result.faces.shape == (16, 512, 512, 3) and result.faces.dtype == np.uint8
        keep = np.asarray(avatar_512.mask) == 1
        faces = np.asarray(avatar_512.faces[:16])
        np.testing.assert_array_equal(result.faces[:, keep], faces[:, keep])
        assert (result.faces[:, ~keep] != faces[:, ~keep]).any()
        with pytest.raises(ValueError, match=r"holds faces of shape \(256, 256, 3\) .*version is 1\.6.* 512x512"):
            engine.with_avatar(avatar)
    finally:
        engine.close()
    # Paste-back at 512 on the clock thread's side: the program's FramePaster into the base frame.
    i = 3
    pasted = FramePaster(avatar_512).paste(i, result.faces[i])
    base = np.asarray(avatar_512.frames[i])
    assert pasted.shape == base.shape and np.array_equal(pasted, avatar_512.paste(i, result.faces[i]))
    x0, y0, x1, y1 = avatar_512.paste_geometry(i).box
    changed = np.argwhere((pasted != base).any(axis=2))
    assert len(changed) > 0 and changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
    assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
    # A 1.6 engine refuses a 256 avatar at start, before loading a model.
    wrong = create_engine("latentsync", options(tiny_files_1_6, version="1.6"), avatar)
    with pytest.raises(ValueError, match=r"prepare the avatar with face_size=512"):
        wrong.load()
    assert not wrong.loaded


def test_a_512_job_takes_512_faces_only():
    from latentsync.engines import ChunkResult
    from latentsync.serving.compute.jobs import ChunkJob, result_problem

    job = ChunkJob(
        task_id="t",
        chunk_index=0,
        avatar="a",
        audio_16k=np.zeros(640, np.float32),
        rows=(0, 16),
        frame_indices=np.arange(16, dtype=np.int64),
        due_at=0.0,
        face_size=512,
    )

    def answer(side: int) -> ChunkResult:
        faces = np.zeros((16, side, side, 3), np.uint8)
        return ChunkResult(task_id="t", chunk_index=0, frame_indices=job.frame_indices, faces=faces, generate_s=0.0)

    assert result_problem(job, answer(512)) is None
    assert "expected (16, 512, 512, 3) uint8" in result_problem(job, answer(256))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", ["1.5", "1.6"])
def test_versions_generate_on_gpu_half_precision(version, request, avatar, tmp_path):
    """1.5 (temporal U-Net, 256 px faces) and 1.6 (512 px faces, 64x64 latents) on CUDA in float16, as for 1.0."""
    files = request.getfixturevalue("tiny_files_1_5" if version == "1.5" else "tiny_files_1_6")
    prepared = avatar if version == "1.5" else request.getfixturevalue("avatar_512")
    size = 256 if version == "1.5" else 512
    engine = create_engine(
        "latentsync",
        options(files, version=version, device="cuda", dtype="float16"),
        first_frames(prepared, 16, tmp_path),
    )
    engine.load()
    try:
        assert engine.dtype == torch.float16
        result = engine.generate(chunk(engine.features(speech_16k()[:48000])))
        assert result.faces.shape == (16, size, size, 3) and result.faces.dtype == np.uint8
        keep = np.asarray(prepared.mask) == 1
        np.testing.assert_array_equal(result.faces[:, keep], np.asarray(prepared.faces[:16])[:, keep])
    finally:
        engine.close()
