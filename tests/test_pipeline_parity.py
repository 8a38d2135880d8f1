"""Numerical parity of our denoising loop with the ORIGINAL ByteDance LatentSync pipeline (issue 37).

The fixtures ``tests/data/parity/<version>/pipeline.pt`` were computed by the original ``LipsyncPipeline.__call__``
at the version's release commit (``scripts/make_parity_fixtures.py --what pipeline``, which imports the original
code at run time from a path outside this repository; the fixture README says how to rebuild them): one chunk of
16 frames of 16x16 latents, the tiny U-Net of the same folder's U-Net fixture, 5 DDIM steps of the original's
scheduler config, guidance 1.5 (so the zero-audio branch runs in the same batch), float32 on CPU. The original's
helpers for files, faces, Whisper and the VAE were stubs that handed over the stored inputs as they are, so its
U-Net saw exactly the stored noise, mask and latents (the script checks that on the first U-Net call).

Here our ``LipsyncPipeline.denoise_batch`` (the denoising loop of ``generate_batch``) runs on the same inputs with
our own ``configs/scheduler_config.json``; no original code is needed. Relative error, as asserted:
``max|ours - ref| / max|ref|`` over the final latents (1, 4, 16, 16, 16).
"""

from __future__ import annotations

import json

import pytest
import torch

from latentsync.pipelines import load_scheduler
from tests.datafiles import DATA, data_file, load_script
from tests.torchtools import one_thread  # noqa: F401  (autouse: one torch thread for this module)

PARITY = DATA / "parity"
VERSIONS = ("1.0", "1.5", "1.6")
MAX_RELATIVE_ERROR = 1e-4
REPO = DATA.parents[1]


@pytest.fixture(scope="module")
def fixtures():
    return load_script("make_parity_fixtures")


def stored(version: str) -> dict:
    return torch.load(data_file(f"parity/{version}/pipeline.pt"), weights_only=True)


@pytest.mark.parametrize(
    "version", [pytest.param(v, marks=pytest.mark.slow if v != "1.0" else ()) for v in VERSIONS]
)  # 3-5 s each on the CPU: make test-fast keeps 1.0's, make test runs all three
def test_denoising_loop_matches_original(version, fixtures):
    meta = json.loads(data_file(f"parity/{version}/pipeline.json").read_text())
    assert meta["version"] == version and meta["commit"] == meta["release_commit"]
    assert meta["commit_verified_by"].startswith("git")  # the original's files were those of the release commit
    ref = stored(version)
    assert ref["guidance_scale"] > 1 and ref["steps"] >= 4 and meta["full_steps"] == ref["steps"]
    ours = fixtures.run_our_pipeline(PARITY / version, version)
    assert ours.shape == ref["latents"].shape == (1, 4, 16, 16, 16) and ours.dtype == torch.float32
    assert ref["latents"].abs().max() > 0.5  # O(1) latents: the relative error means something
    error = fixtures.relative_error(ours, ref["latents"])
    assert error <= MAX_RELATIVE_ERROR, f"max relative error {error:.3g} > {MAX_RELATIVE_ERROR:g} for {version}"


@pytest.mark.slow  # 4 s
def test_contiguous_layout_matches_too(fixtures):
    """load_unet's other memory layout (contiguous weights), on the 1.6 network."""
    ours = fixtures.run_our_pipeline(PARITY / "1.6", "1.6", channels_last=False)
    assert fixtures.relative_error(ours, stored("1.6")["latents"]) <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("version", VERSIONS)
def test_our_scheduler_is_the_originals(version):
    """Our configs/scheduler_config.json builds the original's DDIM: same config values, same timesteps."""
    original = json.loads(data_file(f"parity/{version}/pipeline.json").read_text())["scheduler_config"]
    ours = load_scheduler(REPO / "configs" / "scheduler_config.json")
    # Keys a DDIMScheduler does not take (skip_prk_steps, for PNDM) are unused on both sides.
    common = original.keys() & ours.config.keys()
    assert {"beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset"} <= common
    assert {"clip_sample", "set_alpha_to_one", "prediction_type"} <= common
    assert {key: ours.config[key] for key in common} == {key: original[key] for key in common}
    ref = stored(version)
    ours.set_timesteps(ref["steps"])
    assert torch.equal(ours.timesteps, ref["timesteps"])
