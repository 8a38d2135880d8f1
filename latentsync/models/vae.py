"""Facts about the VAE LatentSync 1.0 uses (``stabilityai/sd-vae-ft-mse``, a diffusers ``AutoencoderKL``)."""

from __future__ import annotations

from typing import Any

VAE_SCALING_FACTOR = 0.18215
"""Latents are ``encode(x) * 0.18215`` and decoded from ``latents / 0.18215`` (shift factor 0)."""

VAE_LATENT_CHANNELS = 4
"""Channels of a VAE latent (the U-Net's 13 input channels are 4 + 1 + 4 + 4)."""

VAE_DOWNSAMPLE_FACTOR = 8
"""Pixels per latent cell along each axis: 256 x 256 faces become 32 x 32 latents."""


def sd_vae_ft_mse_config() -> dict[str, Any]:
    """Return the ``config.json`` fields of ``sd-vae-ft-mse`` that define its architecture (a fresh dict).

    Built with ``AutoencoderKL.from_config(sd_vae_ft_mse_config())`` this gives a randomly initialised model
    of the real size (for benchmarks); checkpoint checks compare a user's ``config.json`` against it.
    """
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": VAE_LATENT_CHANNELS,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": VAE_SCALING_FACTOR,
    }
