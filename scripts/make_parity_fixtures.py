#!/usr/bin/env python3
"""Build the U-Net parity fixtures of ``tests/data/parity/`` from the ORIGINAL LatentSync code (issue 37).

The original ByteDance LatentSync code is never copied into this repository: this script imports it at run time
from ``--original PATH`` (a checkout, or an extract such as
``git archive <commit> latentsync configs | tar -x -C PATH``) in a separate Python process whose ``latentsync``
package is the original's, never ours, and writes what that process computed:

``tests/data/parity/<version>/``
    ``config.json``  the tiny model section, in the original yaml's keys (the version's yaml with
                     :data:`TINY_OVERRIDES` applied); ``UNet3DConfig.from_original`` reads it.
    ``unet.pt``      the original model's whole state dict (parameters and the position-encoding buffers) as
                     ``{"int8": {name: int8 tensor}, "exponent": {name: int}}``, each value being
                     ``int8 * 2**-exponent`` (:func:`quantize`, a quarter of float32's bytes): every tensor was
                     rounded to that form *before* the original ran, so :func:`dequantize` gives back exactly
                     the float32 weights that produced the reference output.
    ``io.pt``        the inputs in the same form (``sample`` (1, 13, 16, H, W) and ``audio_embeds``
                     (16, 50, 384)), ``timestep`` (a 0-d int64) and the original's float32 ``output``
                     (1, 4, 16, H, W), computed in float32 on CPU (H = W = :data:`LATENT_SIZE`).
    ``meta.json``    commit compared against, whether it was verified, torch / diffusers versions, seed, shapes,
                     the command that built it, and the relative error of our U-Net on it at build time.

Every parameter of the original model is re-randomised from a seeded ``torch.Generator`` (the zero-initialised
``conv_in`` / ``conv_out`` / motion-module ``proj_out`` included): conv and linear weights ~ N(0, 1/fan_in),
norm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), so that activations stay O(1) through the network.

The original process needs ``einops`` (pass ``--deps DIR`` for a folder made by
``pip install --target DIR --no-deps einops==0.8.2``; it is put on that process's path only). Its
``latentsync/utils/util.py`` (which imports cv2, decord, matplotlib...) is replaced in that process by a stub with
the one function ``unet.py`` imports, ``zero_rank_log`` (a logging helper, not used in a forward pass). The 1.5
and 1.6 U-Nets import cleanly with the venv's diffusers (0.42.1). 1.0's does not (it imports
``diffusers.modeling_utils`` and ``CrossAttention``, removed from diffusers long ago): for 1.0 pass a ``--deps``
folder holding its own pins, ``pip install --target DIR --no-deps diffusers==0.11.1 huggingface_hub==0.25.2
einops==0.8.2``; that process then also hides ``transformers`` (see :data:`RELEASES`). Our own side (the check
of our U-Net after the build) always runs in this process, with the venv's packages.

Example (the command that built the committed fixtures)::

    git --git-dir=<LatentSync mirror> archive 75a4a1733c7314a8f6bf092f1fbe4ced008cccd7 latentsync configs \\
        | tar -x -C /tmp/ref-1.5
    pip install --target /tmp/ref-deps --no-deps einops==0.8.2
    python scripts/make_parity_fixtures.py --original /tmp/ref-1.5 --version 1.5 --deps /tmp/ref-deps

Exit status 0 on success; a failure of the original's process is reported with its stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data" / "parity"

#: Release commit and U-Net yaml of each version this script builds fixtures for, and the git blob ids (as
#: ``git hash-object`` gives them) of the files the U-Net is built from at that commit: an extract that is not
#: a git checkout is verified against these.
RELEASES: dict[str, dict[str, Any]] = {
    "1.0": {
        "commit": "df72abbbca1b513147ecc7498a6b5cccb2f10ce7",
        "yaml": "configs/unet/second_stage.yaml",
        "blobs": {
            "configs/unet/second_stage.yaml": "430ed0c0ec6d364d64bfb8f47d08096377a45ea0",
            "latentsync/models/attention.py": "5b933823e91b8acb82e7424398aebdd3b3e76b72",
            "latentsync/models/motion_module.py": "0622c86463a7033be170d01096ee47127188ad9a",
            "latentsync/models/resnet.py": "3654ae3510a69bfb06516162a574916ac5c17fe1",
            "latentsync/models/unet.py": "1429cf37401988106c7e669d92594cbf9b479a1b",
            "latentsync/models/unet_blocks.py": "cc913a0cd7a7ed335d5e65d06af554dc018f216e",
            "latentsync/models/utils.py": "b96595ca3831950bb7dee07c234cca47e629f317",
        },
        # diffusers 0.11.1 (1.0's pin, from --deps) imports transformers when it can find it, and the venv's
        # transformers needs a newer huggingface_hub than 0.11.1's: hide transformers (the U-Net does not use it).
        "hidden_modules": ["transformers"],
    },
    "1.5": {
        "commit": "75a4a1733c7314a8f6bf092f1fbe4ced008cccd7",
        "yaml": "configs/unet/stage2.yaml",
        "blobs": {
            "configs/unet/stage2.yaml": "34a9946764fb32ad3531f0c0c5e6a957ebdafcb7",
            "latentsync/models/attention.py": "1b1aab337bf13e6acf20abd2d1e73ec3bcdf37f1",
            "latentsync/models/motion_module.py": "32721d93a14ac3362631916c8070f42df3b6937b",
            "latentsync/models/resnet.py": "0b6f28d8a5465f40250cd8b46a2f5fc34fcf9d9e",
            "latentsync/models/unet.py": "5a7516a4a30bc32eb2c9c4c0fb89f0801c4f14bc",
            "latentsync/models/unet_blocks.py": "2dfceb8d3ce7199368d392ae39388f2040830af4",
            "latentsync/models/utils.py": "b96595ca3831950bb7dee07c234cca47e629f317",
        },
    },
    "1.6": {
        "commit": "d058a6146983053d07239440fc62be16102d1e86",
        "yaml": "configs/unet/stage2_512.yaml",
        "blobs": {
            "configs/unet/stage2_512.yaml": "4f7ec05e4435fe18f0088216fc0d7180c9f0d651",
            "latentsync/models/attention.py": "8cee890695bb42fe19861513abfe3c699dedaade",
            "latentsync/models/motion_module.py": "7290493730a4fdd01e6de7a264f3de1246f4a2ea",
            "latentsync/models/resnet.py": "0b6f28d8a5465f40250cd8b46a2f5fc34fcf9d9e",
            "latentsync/models/unet.py": "13722e0bb932e1afac00905075f96178cdc47ff9",
            "latentsync/models/unet_blocks.py": "2dfceb8d3ce7199368d392ae39388f2040830af4",
            "latentsync/models/utils.py": "b96595ca3831950bb7dee07c234cca47e629f317",
        },
    },
}

#: What is shrunk in the yaml's model section; everything else (block types, 8 attention heads, 32 groups, the
#: motion-module settings, cross_attention_dim 384, in/out channels 13/4...) stays as the release has it.
#: 32 is the smallest width: every GroupNorm (the motion modules' included, fixed at 32 groups) needs a multiple
#: of 32. Four levels keep the original's level arithmetic (``res = 2 ** (3 - i)`` in the up blocks).
TINY_OVERRIDES: dict[str, Any] = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 16}

FRAMES = 16
LATENT_SIZE = 16  # 256 px faces give 32 x 32 latents, 512 px 64 x 64: the same code on fewer tokens, 4x cheaper here
AUDIO_TOKENS = 50
TIMESTEP = 951
SEEDS = {"1.0": 1000, "1.5": 1505, "1.6": 1606}
MAX_REL_ERROR = 1e-5


def relative_error(ours: Any, ref: Any) -> float:
    """``max|ours - ref| / max|ref|`` over all elements (float tensors of one shape), as a Python float."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def quantize(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Store float tensors as int8 ``k`` and a power-of-two exponent ``e`` each, the value being ``k * 2**-e``.

    ``e`` is the largest integer with ``max|t| * 2**e <= 127``, so each tensor keeps 8 significant bits (its
    largest entries) and :func:`dequantize` gives float32 values exactly (a small integer times a power of two).

    Args:
        tensors: Float tensors by name.

    Returns:
        ``{"int8": {name: int8 tensor, same shape}, "exponent": {name: int}}``.

    """
    import math

    import torch

    out: dict[str, dict[str, Any]] = {"int8": {}, "exponent": {}}
    for name, tensor in tensors.items():
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        exponent = math.floor(math.log2(127.0 / peak)) if peak > 0 else 0
        out["int8"][name] = torch.round(tensor.double() * 2.0**exponent).clamp(-127, 127).to(torch.int8).contiguous()
        out["exponent"][name] = exponent
    return out


def dequantize(stored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Inverse of :func:`quantize`: ``{name: float32 tensor}`` (exact)."""
    return {name: k.float() * 2.0 ** -stored["exponent"][name] for name, k in stored["int8"].items()}


def _worker(job_path: str) -> None:
    """Run in the original's process: build, re-randomise, run and save (see the module docstring)."""
    import importlib
    import types

    job = json.loads(Path(job_path).read_text())
    original = Path(job["original"]).resolve()
    for folder in reversed(job["deps"]):
        sys.path.insert(0, folder)
    # The original's ``latentsync`` has no __init__.py; bind the name to its folder explicitly so that no
    # other ``latentsync`` on sys.path (ours) can be picked up, and stub the one util import unet.py needs.
    package = types.ModuleType("latentsync")
    package.__path__ = [str(original / "latentsync")]
    utils = types.ModuleType("latentsync.utils")
    utils.__path__ = []
    util = types.ModuleType("latentsync.utils.util")
    util.zero_rank_log = lambda logger, message: None
    sys.modules.update({"latentsync": package, "latentsync.utils": utils, "latentsync.utils.util": util})
    for name in job["hidden_modules"]:
        sys.modules[name] = None  # find_spec() says "not installed", import raises ImportError

    import torch

    unet_module = importlib.import_module("latentsync.models.unet")
    if not Path(unet_module.__file__).resolve().is_relative_to(original):
        raise RuntimeError(f"imported {unet_module.__file__}, not the original under {original}")
    torch.manual_seed(0)  # construction draws (default inits, later overwritten) do not touch the seeded generator
    model = unet_module.UNet3DConditionModel.from_config(job["section"]).eval()

    generator = torch.Generator().manual_seed(job["seed"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.dim() > 1:  # conv / linear weight
                param.copy_(noise * param[0].numel() ** -0.5)
            elif name.endswith(".weight"):  # GroupNorm / LayerNorm scale
                param.copy_(1.0 + 0.1 * noise)
            else:  # bias
                param.copy_(0.1 * noise)
        state = model.state_dict()
        weights = quantize(state)
        for name, tensor in dequantize(weights).items():  # parameters and buffers: exactly what is stored
            state[name].copy_(tensor)

        frames, size = job["frames"], job["latent_size"]
        inputs = quantize(
            {
                "sample": torch.randn(1, 13, frames, size, size, generator=generator),
                "audio_embeds": torch.randn(
                    frames, job["audio_tokens"], job["cross_attention_dim"], generator=generator
                ),
            }
        )
        values = dequantize(inputs)
        timestep = torch.tensor(job["timestep"], dtype=torch.int64)
        output = model(values["sample"], timestep, encoder_hidden_states=values["audio_embeds"]).sample

    out = Path(job["out"])
    torch.save(weights, out / "unet.pt")
    torch.save({**inputs, "timestep": timestep, "output": output.float().contiguous()}, out / "io.pt")
    info = {
        "torch": torch.__version__,
        "diffusers": importlib.import_module("diffusers").__version__,
        "einops": importlib.import_module("einops").__version__,
        "original_module": str(Path(unet_module.__file__).resolve()),
        "state_dict_tensors": len(state),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "worker.json").write_text(json.dumps(info))


def git_blob_id(path: Path) -> str:
    """The git blob id of a file (what ``git hash-object PATH`` prints): sha1 of ``b"blob <size>\\0" + bytes``."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_original(original: Path, version: str, commit: str) -> str:
    """Check that ``original`` holds ``commit``; return how it was checked (for ``meta.json``).

    A git checkout must have ``commit`` checked out; another folder (an extract) must hold the release's files
    (:data:`RELEASES` blob ids) when ``commit`` is the release commit, and cannot be checked otherwise.

    Raises:
        ValueError: If the checkout's HEAD or an extracted file differs.

    """
    head = _git_head(original)
    if head is not None:
        if head != commit:
            raise ValueError(f"{original} is a checkout of {head}, not of {commit}")
        return "git HEAD"
    if commit != RELEASES[version]["commit"]:
        return "not verified (an extract of a commit other than the release)"
    for relative, blob in RELEASES[version]["blobs"].items():
        if not (original / relative).is_file():
            raise ValueError(f"{original / relative} is missing: {original} does not hold LatentSync {version}")
        found = git_blob_id(original / relative)
        if found != blob:
            raise ValueError(f"{original / relative} is blob {found}, not {blob} as at {commit}")
    return f"git blob ids of the {len(RELEASES[version]['blobs'])} U-Net files"


def _git_head(path: Path) -> str | None:
    result = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    # Only a checkout whose top level is ``path`` itself counts (not a repository around it, such as ours).
    top = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if Path(top.stdout.strip()).resolve() == path.resolve() else None


def tiny_section(original: Path, version: str) -> dict[str, Any]:
    """Return the model section of ``version``'s U-Net yaml under ``original`` with :data:`TINY_OVERRIDES` applied.

    Raises:
        FileNotFoundError: If the yaml is missing.

    """
    import yaml

    path = original / RELEASES[version]["yaml"]
    section = dict(yaml.safe_load(path.read_text())["model"])
    section.update(TINY_OVERRIDES)
    # PyYAML reads "1e-5" as a string; the original's OmegaConf reads a float.
    section["norm_eps"] = float(section["norm_eps"])
    return section


def build(original: Path, version: str, out_root: Path, deps: list[str], commit: str | None) -> dict[str, Any]:
    """Build one fixture into ``out_root / version`` and check our U-Net against it.

    Args:
        original: The original LatentSync at ``commit`` (a checkout or an extract).
        version: ``"1.5"`` or ``"1.6"``.
        out_root: Folder of the fixtures (``tests/data/parity``).
        deps: Folders put first on the original process's path (einops).
        commit: The commit ``original`` holds; ``None``: the version's release commit.

    Returns:
        The fixture's ``meta.json`` contents.

    Raises:
        ValueError: If ``original`` does not hold ``commit`` (:func:`verify_original`).
        RuntimeError: If the original's process fails, or our U-Net misses the parity goal on the fixture.

    """
    release = RELEASES[version]["commit"]
    commit = commit or release
    verified = verify_original(original, version, commit)
    section = tiny_section(original, version)
    out = out_root / version
    out.mkdir(parents=True, exist_ok=True)
    job = {
        "original": str(original.resolve()),
        "deps": [str(Path(d).resolve()) for d in deps],
        "section": section,
        "seed": SEEDS[version],
        "hidden_modules": RELEASES[version].get("hidden_modules", []),
        "frames": FRAMES,
        "latent_size": LATENT_SIZE,
        "audio_tokens": AUDIO_TOKENS,
        "cross_attention_dim": section["cross_attention_dim"],
        "timestep": TIMESTEP,
        "out": str(out.resolve()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        # -I: no PYTHONPATH, no user site, no current directory on sys.path; cwd is an empty folder.
        result = subprocess.run(
            [sys.executable, "-I", str(Path(__file__).resolve()), "--worker", str(job_path)],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"the original's process failed ({result.returncode}):\n{result.stderr}")
    worker = json.loads((out / "worker.json").read_text())
    (out / "worker.json").unlink()
    (out / "config.json").write_text(json.dumps(section, indent=2, sort_keys=True) + "\n")

    error = check_ours(out, version)
    if error > MAX_REL_ERROR:
        raise RuntimeError(f"our U-Net misses the parity goal on {out}: max relative error {error:.3g}")
    meta = {
        "version": version,
        "commit": commit,
        "commit_verified_by": verified,
        "release_commit": release,
        "yaml": RELEASES[version]["yaml"],
        "tiny_overrides": TINY_OVERRIDES,
        "seed": SEEDS[version],
        "frames": FRAMES,
        "latent_size": [LATENT_SIZE, LATENT_SIZE],
        "audio_tokens": AUDIO_TOKENS,
        "timestep": TIMESTEP,
        "relative_error_definition": "max|ours - ref| / max|ref| over the whole output",
        "our_max_relative_error_at_build": error,
        "command": "python scripts/make_parity_fixtures.py " + shlex.join(sys.argv[1:]),
        **worker,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def check_ours(fixture: Path, version: str) -> float:
    """Run our U-Net (strict loading, float32, CPU) on a fixture; return its max relative error to the original."""
    sys.path.insert(0, str(REPO))
    import torch

    from latentsync.models.loading import load_unet
    from latentsync.models.unet3d import UNet3DConfig

    config = UNet3DConfig.from_original(json.loads((fixture / "config.json").read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "unet.pt"
        torch.save(dequantize(torch.load(fixture / "unet.pt", weights_only=True)), weights)
        model = load_unet(weights, config=config, dtype="float32", version=version)
    io = torch.load(fixture / "io.pt", weights_only=True)
    inputs = dequantize(io)
    with torch.no_grad():
        ours = model(inputs["sample"], io["timestep"], inputs["audio_embeds"])
    return relative_error(ours, io["output"])


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", type=Path, help="the original LatentSync code at the release commit")
    parser.add_argument("--version", choices=sorted(RELEASES), help="the LatentSync version PATH holds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture folder (default tests/data/parity)")
    parser.add_argument("--deps", action="append", default=[], help="folder with einops for the original's process")
    parser.add_argument("--commit", help="the commit PATH holds (default: the version's release commit)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if args.original is None or args.version is None:
        parser.error("--original and --version are required")
    try:
        meta = build(args.original, args.version, args.out, args.deps, args.commit)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
