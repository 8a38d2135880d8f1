"""Write tiny RANDOM LatentSync checkpoints in the official file formats, for tests and demos.

Nothing here is a trained model: the lips these weights "generate" are noise. They exist so that the whole
``engine.name=latentsync`` path (file checks, loaders, latent cache, Whisper features, DDIM loop, VAE decode,
mask compositing, the server around it) runs end to end on a CPU in well under a second per chunk.

    python scripts/make_tiny_checkpoints.py OUT_DIR [--seed 0] [--version 1.0|1.5|1.6]

Writes (seeded, deterministic):

    OUT_DIR/latentsync_unet.pt   {"global_step": 0, "state_dict": ...} of a two-level UNet3D (16/32 channels)
                                 in the version's format: 1.5 and 1.6 add the temporal layers (motion modules,
                                 their zero-initialised output projections re-randomised so that they act) and
                                 name the audio layers attn2 / norm2
    OUT_DIR/unet.yaml            its ``model`` section, in the original yaml's keys (second_stage.yaml for 1.0,
                                 stage2.yaml / stage2_512.yaml for 1.5 / 1.6)
    OUT_DIR/whisper/tiny.pt      OpenAI format {"dims", "model_state_dict"}; real tiny dims (384 wide,
                                 4 layers: ~8M parameters) so features are (F, 50, 384) as with the real file
    OUT_DIR/vae/                 diffusers AutoencoderKL folder (config.json + safetensors): 4 blocks
                                 (4/8/8/16 channels), i.e. 3 downsamplings: 256 px faces -> 32x32x4 latents

and prints the ``engine.latentsync.*`` overrides that point the server at them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentsync.models.unet3d import UNet3DConditionModel, UNet3DConfig  # noqa: E402
from latentsync.models.vae import VAE_LATENT_CHANNELS, VAE_SCALING_FACTOR  # noqa: E402
from latentsync.models.whisper_features import WHISPER_TINY_DIMS, WhisperAudioEncoder, WhisperDims  # noqa: E402

# Model section of the tiny U-Net, in the original yaml's keys. Attention only on the coarser level and
# one ResNet per block keep a 16-frame step at ~0.07 s on two CPU cores.
TINY_UNET_MODEL = {
    "act_fn": "silu",
    "add_audio_layer": True,
    "audio_condition_method": "cross_attn",
    "attention_head_dim": 2,
    "block_out_channels": [16, 32],
    "cross_attention_dim": 384,
    "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D"],
    "up_block_types": ["CrossAttnUpBlock3D", "UpBlock3D"],
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "in_channels": 1 + 3 * VAE_LATENT_CHANNELS,
    "out_channels": VAE_LATENT_CHANNELS,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "norm_eps": 1.0e-5,
    "sample_size": 32,
    "use_motion_module": False,
}

# 1.5 / 1.6: the same tiny U-Net with the temporal layers, keys as in stage2.yaml (2 heads instead of 8, and our
# ``norm_num_groups`` in motion_module_kwargs: the original fixes 32 groups, more than 16 channels allow).
TINY_UNET_MODEL_TEMPORAL = {
    **{k: v for k, v in TINY_UNET_MODEL.items() if k not in ("audio_condition_method",)},
    "use_motion_module": True,
    "motion_module_resolutions": [1, 2, 4, 8],
    "motion_module_mid_block": False,
    "motion_module_decoder_only": False,
    "motion_module_type": "Vanilla",
    "motion_module_kwargs": {
        "num_attention_heads": 2,
        "num_transformer_block": 1,
        "attention_block_types": ["Temporal_Self", "Temporal_Self"],
        "temporal_position_encoding": True,
        "temporal_position_encoding_max_len": 24,
        "temporal_attention_dim_div": 1,
        "zero_initialize": True,
        "norm_num_groups": 4,
    },
}

#: Face resolution in pixels per version (the ``data.resolution`` of its yaml).
RESOLUTION = {"1.0": 256, "1.5": 256, "1.6": 512}


def tiny_unet_model(version: str = "1.0") -> dict:
    """Return the tiny U-Net's ``model`` section for a LatentSync version (``"1.0"``, ``"1.5"``, ``"1.6"``)."""
    if version not in RESOLUTION:
        raise ValueError(f"unknown LatentSync version {version!r}; expected one of {sorted(RESOLUTION)}")
    return dict(TINY_UNET_MODEL if version == "1.0" else TINY_UNET_MODEL_TEMPORAL)


def randomize_zero_initialized(unet: UNet3DConditionModel, std: float = 0.02) -> None:
    """Give the motion modules' zero-initialised ``proj_out`` random weights (else the layers do nothing)."""
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".motion_modules." in name and ".temporal_transformer.proj_out." in name:
                param.normal_(0.0, std)


# A 4-block AutoencoderKL: diffusers downsamples in every block but the last, so 256 -> 32 as in sd-vae-ft-mse.
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [4, 8, 8, 16],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": VAE_LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 256,
    "scaling_factor": VAE_SCALING_FACTOR,
}


def make_tiny_checkpoints(out_dir: str | Path, seed: int = 0, version: str = "1.0") -> dict[str, Path]:
    """Write the tiny checkpoints into ``out_dir`` (created if needed; files are overwritten).

    Args:
        out_dir: Output folder.
        seed: Seed of the random weights (the global torch RNG is restored afterwards).
        version: LatentSync version whose U-Net format to write: ``"1.0"``, ``"1.5"`` or ``"1.6"`` (1.5 and
            1.6 write the same tensors; their yamls differ in ``data.resolution``).

    Returns:
        Paths by ``engine.latentsync`` option name: ``unet_path``, ``unet_config``, ``whisper_path``,
        ``vae_path``.

    """
    from diffusers import AutoencoderKL

    out = Path(out_dir)
    (out / "whisper").mkdir(parents=True, exist_ok=True)
    paths = {
        "unet_path": out / "latentsync_unet.pt",
        "unet_config": out / "unet.yaml",
        "whisper_path": out / "whisper" / "tiny.pt",
        "vae_path": out / "vae",
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_section = tiny_unet_model(version)
        unet = UNet3DConditionModel(UNet3DConfig.from_original(model_section))
        randomize_zero_initialized(unet)
        torch.save({"global_step": 0, "state_dict": unet.state_dict()}, paths["unet_path"])
        paths["unet_config"].write_text(
            f"# Tiny random U-Net in LatentSync {version}'s format, for tests (scripts/make_tiny_checkpoints.py).\n"
            + yaml.safe_dump(
                {"data": {"resolution": RESOLUTION[version]}, "model": model_section},
                sort_keys=False,
            )
        )

        torch.manual_seed(seed + 1)
        encoder = WhisperAudioEncoder(WhisperDims.from_checkpoint_dims(WHISPER_TINY_DIMS))
        state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
        torch.save({"dims": dict(WHISPER_TINY_DIMS), "model_state_dict": state}, paths["whisper_path"])

        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        vae.save_pretrained(paths["vae_path"], safe_serialization=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", choices=sorted(RESOLUTION), default="1.0")
    args = parser.parse_args(argv)
    paths = make_tiny_checkpoints(args.out_dir, args.seed, args.version)
    print(f"tiny random checkpoints written to {args.out_dir} (NOT a trained model). Server overrides:")
    overrides = [f"engine.latentsync.{k}={v}" for k, v in paths.items()]
    print(" ".join(["engine.name=latentsync", f"engine.latentsync.version={args.version}", *overrides]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
