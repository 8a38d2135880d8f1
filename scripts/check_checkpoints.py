"""Check a user's LatentSync checkpoint files (1.0, 1.5 or 1.6) without running any model.

Reads only what it needs: the U-Net is memory-mapped (shapes come from the file's index, its 3.4 GB (1.0) or
5.1 GB (1.5 / 1.6) are not read), the Whisper file is small, the VAE is checked through its config.json and
the index of its weight file. Says which LatentSync version the U-Net is (told from its tensors: 1.0, or 1.5
or 1.6, which have the same tensors), prints a report and exits 1 if anything is wrong (0 if all is well).

    python scripts/check_checkpoints.py [--unet PATH] [--whisper PATH] [--vae DIR] [--version 1.0|1.5|1.6]

``--version`` also fails a U-Net of the other family (what ``engine.latentsync.version`` would refuse).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentsync.models.loading import (  # noqa: E402
    CheckpointError,
    check_state_dict,
    check_version,
    describe_version,
    detect_version,
    read_checkpoint,
)
from latentsync.models.unet3d import VERSIONS, UNet3DConditionModel, UNet3DConfig  # noqa: E402
from latentsync.models.vae import sd_vae_ft_mse_config  # noqa: E402
from latentsync.models.whisper_features import (  # noqa: E402
    WhisperCheckpointError,
    WhisperDims,
    load_whisper_encoder,
)

VAE_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# Attention names of diffusers < 0.14 VAE files, which diffusers still converts on load.
LEGACY_VAE_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


@dataclass
class Report:
    name: str
    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def print(self) -> None:
        status = "FAIL" if self.problems else "OK"
        print(f"[{status}] {self.name}: {self.path}")
        for line in self.notes:
            print(f"       {line}")
        for line in self.problems:
            print(f"   !!  {line}")


def check_unet(path: Path, version: str | None = None) -> Report:
    """Check the U-Net file; ``version`` None accepts either family and says which one it is."""
    report = Report("U-Net", path)
    try:
        checkpoint = read_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as exc:
        report.problems.append(str(exc))
        return report
    state_dict = checkpoint.state_dict
    found = detect_version(state_dict)
    report.notes.append(f"holds {describe_version(state_dict)}")
    try:
        if version is not None:
            check_version(state_dict, version, str(path), "--version")
        family = version or found
        expected = {
            k: v.shape
            for k, v in UNet3DConditionModel(UNet3DConfig.for_version(family), device="meta").state_dict().items()
        }
        model_name = "the LatentSync 1.0 U-Net" if family == "1.0" else "the LatentSync 1.5 / 1.6 U-Net"
        extra = check_state_dict(state_dict, expected, str(path), model_name)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    layout = "bare state dict" if checkpoint.global_step is None else f"global_step {checkpoint.global_step}"
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values()})
    count = sum(state_dict[k].numel() for k in expected)
    report.notes.append(f"{len(expected)} tensors, {count:,} parameters, {'/'.join(dtypes)}, {layout}")
    if extra:
        report.notes.append(f"{len(extra)} extra tensor(s) will be ignored, first: {', '.join(extra[:5])}")
    bad = [k for k in expected if not state_dict[k].is_floating_point()]
    if bad:
        report.problems.append(f"non-float tensors: {', '.join(bad[:5])}")
    return report


def check_whisper(path: Path) -> Report:
    report = Report("Whisper", path)
    try:
        encoder = load_whisper_encoder(path)
    except (FileNotFoundError, WhisperCheckpointError) as exc:
        report.problems.append(str(exc))
        return report
    if encoder.dims != WhisperDims():
        report.problems.append(
            f"not Whisper tiny: encoder dims {encoder.dims}, every LatentSync version needs {WhisperDims()}"
        )
    else:
        report.notes.append(f"tiny encoder: {encoder.dims}")
    return report


def _vae_weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_vae(folder: Path) -> Report:
    report = Report("VAE", folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        report.problems.append(f"missing {config_path} (a diffusers AutoencoderKL folder, e.g. sd-vae-ft-mse)")
        return report
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        report.problems.append(f"cannot parse {config_path}: {exc}")
        return report
    reference = sd_vae_ft_mse_config()
    for key in (
        "_class_name",
        "in_channels",
        "out_channels",
        "latent_channels",
        "block_out_channels",
        "layers_per_block",
        "norm_num_groups",
        "down_block_types",
        "up_block_types",
        "act_fn",
    ):
        if config.get(key, reference[key] if key == "act_fn" else None) != reference[key]:
            report.problems.append(f"config.json {key} = {config.get(key)!r}, expected {reference[key]!r}")
    scaling = config.get("scaling_factor")
    if scaling is None:
        report.notes.append(
            f"no scaling_factor in config.json: diffusers' default {reference['scaling_factor']} applies"
        )
    elif abs(float(scaling) - reference["scaling_factor"]) > 1e-9:
        report.problems.append(f"scaling_factor {scaling}, LatentSync uses {reference['scaling_factor']}")
    if config.get("shift_factor") not in (None, 0, 0.0):
        report.problems.append(f"shift_factor {config['shift_factor']}, LatentSync uses none (0)")
    weights = next((folder / name for name in VAE_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        report.problems.append(f"no weight file in {folder} (expected one of {', '.join(VAE_WEIGHT_FILES)})")
        return report
    if report.problems:
        return report
    try:
        shapes = _vae_weight_shapes(weights)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file with its name
        report.problems.append(f"cannot read {weights}: {type(exc).__name__}: {exc}")
        return report
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renamed = {}
    for key, shape in shapes.items():
        for old, new in LEGACY_VAE_NAMES.items():
            if "attentions" in key:
                key = key.replace(old, new)
        renamed[key] = shape
    missing = [k for k in expected if k not in renamed]
    mismatched = [
        f"{k}: file {renamed[k]} != model {expected[k]}"
        for k in expected
        if k in renamed and tuple(d for d in renamed[k] if d != 1) != tuple(d for d in expected[k] if d != 1)
    ]
    if missing:
        report.problems.append(f"{weights.name}: {len(missing)} missing tensor(s), first: {', '.join(missing[:5])}")
    if mismatched:
        report.problems.append(
            f"{weights.name}: {len(mismatched)} shape mismatch(es), first: {'; '.join(mismatched[:5])}"
        )
    if not report.problems:
        report.notes.append(f"{weights.name}: {len(expected)} tensors match the AutoencoderKL of config.json")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", type=Path, default=Path("checkpoints/latentsync_unet.pt"))
    parser.add_argument("--whisper", type=Path, default=Path("checkpoints/whisper/tiny.pt"))
    parser.add_argument("--vae", type=Path, default=Path("checkpoints/sd-vae-ft-mse"))
    parser.add_argument("--version", choices=VERSIONS, default=None, help="expected version (default: any)")
    args = parser.parse_args(argv)
    reports = [check_unet(args.unet, args.version), check_whisper(args.whisper), check_vae(args.vae)]
    for report in reports:
        report.print()
    failed = [r.name for r in reports if r.problems]
    print(f"\n{'problems with: ' + ', '.join(failed) if failed else 'all checkpoints look right'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
