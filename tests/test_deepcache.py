"""DeepCache (``engine.latentsync.deepcache_interval``): our own implementation, equal to the original 1.6's.

The original LatentSync 1.6 (``d058a61``) enables the ``DeepCache`` package's ``DeepCacheSDHelper`` with
``cache_interval=3, cache_branch_id=0`` in its ``scripts/inference.py``. ``tests/data/parity/1.6/pipeline.pt``
holds, besides the plain run (``tests/test_pipeline_parity.py``), the original pipeline's final latents with that
helper enabled (``scripts/make_parity_fixtures.py --what pipeline --deepcache-interval 3``); ours must give them
within 1e-5 (max relative error). The other tests pin the semantics on tiny random U-Nets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from latentsync.config import ConfigError, LatentSyncConfig, validate_latentsync
from latentsync.face import make_keep_mask
from latentsync.models.unet3d import UNet3DConditionModel, UNet3DConfig
from latentsync.pipelines import LipsyncChunk, LipsyncPipeline, initial_noise, load_scheduler
from tests.datafiles import DATA, data_file, load_script
from tests.torchtools import one_thread  # noqa: F401  (autouse: one torch thread for this module)

PARITY = DATA / "parity"
MAX_RELATIVE_ERROR = 1e-5
REPO = DATA.parents[1]
FRAMES = 4


@pytest.mark.slow  # 3.5 s; test_forward_deepcache_full_and_cached_steps stays in make test-fast
def test_deepcache_matches_original_1_6():
    fixtures = load_script("make_parity_fixtures")
    meta = json.loads(data_file("parity/1.6/pipeline.json").read_text())
    ref = torch.load(data_file("parity/1.6/pipeline.pt"), weights_only=True)
    interval = ref["deepcache_interval"]
    assert interval == meta["deepcache_interval"] == 3 and meta["deepcache_branch_id"] == 0
    # The original ran the deep layers at steps 0 and 3 of 5 only: the helper did cache.
    assert ref["steps"] == 5 and meta["deepcache_full_steps"] == 2 and meta["full_steps"] == 5
    ours = fixtures.run_our_pipeline(PARITY / "1.6", "1.6", deepcache_interval=interval)
    error = fixtures.relative_error(ours, ref["latents_deepcache"])
    assert error <= MAX_RELATIVE_ERROR, f"max relative error {error:.3g} > {MAX_RELATIVE_ERROR:g}"
    # DeepCache changes the result (else this test would prove nothing).
    assert fixtures.relative_error(ref["latents"], ref["latents_deepcache"]) > 100 * MAX_RELATIVE_ERROR


def tiny_unet(version: str) -> UNet3DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        temporal = {"use_motion_module": True, "audio_layer_names": "attn2"} if version != "1.0" else {}
        unet = UNet3DConditionModel(UNet3DConfig.tiny(**temporal)).eval().requires_grad_(False)
        for name, param in unet.named_parameters():  # the zero-initialised layers too
            if name.endswith("weight") and param.dim() > 1:
                param.normal_(0.0, param[0].numel() ** -0.5)
    return unet


@pytest.mark.parametrize("version", ["1.0", "1.6"])
def test_forward_deepcache_full_and_cached_steps(version):
    unet = tiny_unet(version)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 13, FRAMES, 16, 16, generator=generator)
    audio = torch.randn(2, FRAMES, 50, 384, generator=generator)
    with torch.no_grad():
        plain = unet(sample, 951, audio)
        full, deep = unet.forward_deepcache(sample, 951, audio)
        assert torch.equal(full, plain)
        assert deep.shape == (2 * FRAMES, unet.config.block_out_channels[0], 16, 16)

        calls = []
        hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in (unet.mid_block, *unet.down_blocks)]
        # Same input and timestep: the shallow pass recomputes the last layer on the same values.
        cached, kept = unet.forward_deepcache(sample, 951, audio, deep)
        assert calls == [] and kept is deep  # no down block, no mid block
        torch.testing.assert_close(cached, plain, rtol=0, atol=1e-6)
        # Another step: only conv_in's skip and the time embedding change; the deep input stays.
        other, _ = unet.forward_deepcache(sample * 0.5, 801, audio, deep)
        assert not torch.allclose(other, plain)
        for hook in hooks:
            hook.remove()
        with pytest.raises(ValueError, match="deep_features must be"):
            unet.forward_deepcache(sample, 951, audio, deep[:, :, :8])


class Spy:
    """Records whether each U-Net call is a full step, then runs it."""

    def __init__(self, unet):
        self.unet, self.full = unet, []

    def __call__(self, sample, timestep, audio, deep=None):
        self.full.append(deep is None)
        return self.unet.forward_deepcache(sample, timestep, audio, deep)


@pytest.fixture(scope="module")
def chunk_inputs():
    rng = np.random.default_rng(0)
    return {
        "faces": np.zeros((FRAMES, 128, 128, 3), np.uint8),
        "reference_latents": rng.standard_normal((FRAMES, 4, 16, 16)).astype(np.float32),
        "masked_latents": rng.standard_normal((FRAMES, 4, 16, 16)).astype(np.float32),
        "audio_features": rng.standard_normal((FRAMES, 50, 384)).astype(np.float32),
        "noise": initial_noise(3, 16, 16),
    }


def make_pipeline(unet, interval: int) -> LipsyncPipeline:
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[4, 4, 4, 4],
        norm_num_groups=4,
    )
    return LipsyncPipeline(
        unet, vae, load_scheduler(REPO / "configs/scheduler_config.json"), deepcache_interval=interval
    )


@pytest.mark.slow  # 4 s
def test_pipeline_runs_the_whole_unet_every_interval_steps(chunk_inputs, monkeypatch):
    unet = tiny_unet("1.5")
    keep = make_keep_mask(128)
    chunk = LipsyncChunk(**chunk_inputs)
    plain = make_pipeline(unet, 0).denoise_batch([chunk], keep, num_inference_steps=7, guidance_scale=1.5)
    assert torch.equal(make_pipeline(unet, 1).denoise_batch([chunk], keep, 7, 1.5), plain)  # 1: off too
    pipeline = make_pipeline(unet, 3)
    spy = Spy(unet)
    monkeypatch.setattr(pipeline, "_unet_deepcache", spy)
    cached = pipeline.denoise_batch([chunk], keep, num_inference_steps=7, guidance_scale=1.5)
    assert spy.full == [True, False, False, True, False, False, True]  # steps 0, 3, 6 (as the original)
    assert not torch.allclose(cached, plain)
    # A second chunk starts again from a full step (the cache never crosses chunks).
    spy.full.clear()
    again = pipeline.denoise_batch([chunk], keep, num_inference_steps=4, guidance_scale=1.0)
    assert spy.full == [True, False, False, True] and again.shape == (1, 4, FRAMES, 16, 16)


def test_interval_is_validated():
    validate_latentsync(LatentSyncConfig(deepcache_interval=3))
    assert LatentSyncConfig().deepcache_interval == 0  # off by default
    for bad in (-1, True, 2.0, "3"):
        with pytest.raises(ConfigError, match="engine.latentsync.deepcache_interval"):
            validate_latentsync(LatentSyncConfig(deepcache_interval=bad))
    with pytest.raises(ValueError, match="deepcache_interval must be an int >= 0"):
        make_pipeline(tiny_unet("1.0"), -1)


def test_server_yaml_documents_the_key():
    text = (REPO / "configs" / "server.yaml").read_text()
    assert "    deepcache_interval: 0  #" in text


def test_engine_checks_the_interval():
    from latentsync.engines.latentsync import LatentSyncEngine

    assert LatentSyncEngine(None, LatentSyncConfig(deepcache_interval=3)).options.deepcache_interval == 3
    with pytest.raises(ConfigError, match="engine.latentsync.deepcache_interval: -1 is invalid"):
        LatentSyncEngine(None, LatentSyncConfig(deepcache_interval=-1))
