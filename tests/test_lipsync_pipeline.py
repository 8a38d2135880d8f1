"""LipsyncPipeline glue with tiny random models: channel order, DDIM schedule, CFG batching, checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from latentsync.face import make_keep_mask
from latentsync.models.unet3d import UNet3DConditionModel, UNet3DConfig
from latentsync.pipelines import LipsyncPipeline, initial_noise, load_scheduler

REPO = Path(__file__).resolve().parents[1]
FRAMES = 2


def tiny_configs():
    path = REPO / "scripts" / "make_tiny_checkpoints.py"
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.TINY_UNET_MODEL, module.TINY_VAE_CONFIG


@pytest.fixture(scope="module")
def pipeline() -> LipsyncPipeline:
    unet_model, vae_config = tiny_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet3DConditionModel(UNet3DConfig.from_original(unet_model)).eval().requires_grad_(False)
        vae = AutoencoderKL(**vae_config).eval().requires_grad_(False)
    return LipsyncPipeline(unet, vae, load_scheduler(REPO / "configs/scheduler_config.json"))


@pytest.fixture(scope="module")
def inputs(pipeline) -> dict:
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (FRAMES, 256, 256, 3), dtype=np.uint8)
    mask = make_keep_mask()
    reference, masked = pipeline.encode_faces(faces, mask, seed=7)
    return {
        "faces": faces,
        "reference_latents": reference,
        "masked_latents": masked,
        "keep_mask": mask,
        "audio_features": rng.standard_normal((FRAMES, 50, 384)).astype(np.float32),
        "noise": initial_noise(11, 32, 32),
    }


class Spy:
    """Records what the U-Net is called with, then runs it."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, sample, timestep, audio):
        self.calls.append((sample.clone(), timestep.clone(), audio.clone()))
        return self.unet(sample, timestep, audio)


def test_second_stage_yaml_is_latentsync_1_0():
    model = OmegaConf.to_container(OmegaConf.load(REPO / "configs/unet/second_stage.yaml").model)
    assert UNet3DConfig.from_original(model) == UNet3DConfig()


def test_scheduler_timesteps():
    scheduler = load_scheduler(REPO / "configs/scheduler_config.json")
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == list(range(951, 0, -50))
    with pytest.raises(FileNotFoundError):
        load_scheduler(REPO / "configs/missing.json")


def test_initial_noise_is_seeded():
    a = initial_noise(3, 32, 32)
    assert a.shape == (1, 4, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, initial_noise(3, 32, 32)) and not torch.equal(a, initial_noise(4, 32, 32))


def test_encode_faces_independent_of_batching(pipeline, inputs):
    faces, mask = inputs["faces"], inputs["keep_mask"]
    assert inputs["reference_latents"].shape == (FRAMES, 4, 32, 32)
    first, first_masked = pipeline.encode_faces(faces[:1], mask, seed=7)
    second, second_masked = pipeline.encode_faces(faces[1:], mask, seed=7, first_index=1)
    np.testing.assert_allclose(np.concatenate([first, second]), inputs["reference_latents"], atol=1e-5)
    np.testing.assert_allclose(np.concatenate([first_masked, second_masked]), inputs["masked_latents"], atol=1e-5)
    assert not np.allclose(inputs["reference_latents"], inputs["masked_latents"])


def test_unet_input_channel_order_and_schedule(pipeline, inputs, monkeypatch):
    spy = Spy(pipeline.unet)
    monkeypatch.setattr(pipeline, "_unet_forward", spy)
    out = pipeline(**inputs, num_inference_steps=3)
    assert out.faces.shape == (FRAMES, 256, 256, 3) and out.faces.dtype == np.uint8
    assert [int(t) for _, t, _ in spy.calls] == [667, 334, 1]
    sample, _, audio = spy.calls[0]
    assert sample.shape == (1, 13, FRAMES, 32, 32)
    noise = inputs["noise"].expand(1, 4, FRAMES, 32, 32)
    torch.testing.assert_close(sample[:, :4], noise)  # DDIM's init_noise_sigma is 1
    mask_latent = torch.from_numpy(inputs["keep_mask"][::8, ::8].copy())  # nearest: rows/cols 0, 8, 16...
    assert torch.equal(sample[0, 4], mask_latent.expand(FRAMES, 32, 32))
    torch.testing.assert_close(sample[0, 5:9], torch.from_numpy(inputs["masked_latents"]).transpose(0, 1))
    torch.testing.assert_close(sample[0, 9:13], torch.from_numpy(inputs["reference_latents"]).transpose(0, 1))
    torch.testing.assert_close(audio, torch.from_numpy(inputs["audio_features"])[None])
    keep = inputs["keep_mask"] == 1
    np.testing.assert_array_equal(out.faces[:, keep], inputs["faces"][:, keep])
    assert set(out.timings_s) == {"inputs", "unet", "vae_decode", "compose"}


def test_cfg_batches_both_branches_in_one_call(pipeline, inputs, monkeypatch):
    spy = Spy(pipeline.unet)
    monkeypatch.setattr(pipeline, "_unet_forward", spy)
    guided = pipeline(**inputs, num_inference_steps=2, guidance_scale=2.0).faces
    assert len(spy.calls) == 2
    sample, _, audio = spy.calls[0]
    assert sample.shape[0] == 2 and torch.equal(sample[0], sample[1])
    assert torch.count_nonzero(audio[0]) == 0 and torch.equal(audio[1], torch.from_numpy(inputs["audio_features"]))
    plain = pipeline(**inputs, num_inference_steps=2).faces
    assert not np.array_equal(guided, plain)
    np.testing.assert_array_equal(plain, pipeline(**inputs, num_inference_steps=2).faces)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"faces": np.zeros((FRAMES, 256, 256, 3), np.float32)}, "uint8, got float32"),
        ({"faces": np.zeros((FRAMES, 250, 256, 3), np.uint8)}, "not a multiple of 8"),
        ({"reference_latents": np.zeros((FRAMES + 1, 4, 32, 32), np.float32)}, r"reference_latents .*\(3, 4, 32, 32\)"),
        ({"keep_mask": np.ones((32, 32), np.float32)}, r"keep_mask .*\(32, 32\)"),
        ({"audio_features": np.zeros((FRAMES, 50, 128), np.float32)}, r"audio_features .*\(2, 50, 128\)"),
        ({"noise": torch.zeros(1, 4, 2, 32, 32)}, r"noise .*\(1, 4, 2, 32, 32\)"),
        ({"num_inference_steps": 0}, "num_inference_steps .* got 0"),
        ({"num_inference_steps": 2.5}, "num_inference_steps .* got 2.5"),
        ({"guidance_scale": 0.5}, "guidance_scale .* got 0.5"),
        ({"guidance_scale": float("nan")}, "guidance_scale .* got nan"),
    ],
)
def test_check_inputs_quotes_bad_values(pipeline, inputs, change, match):
    with pytest.raises(ValueError, match=match):
        pipeline(**{**inputs, **change})
