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
                     (1, 4, 16, H, W), computed in float32 on CPU (H = W = the version's :data:`LATENT_SIZES`).
    ``meta.json``    commit compared against, whether it was verified, torch / diffusers versions, seed, shapes,
                     the command that built it, and the relative error of our U-Net on it at build time.
    ``pipeline.pt``  (``--what pipeline``, after the above) the original ``LipsyncPipeline.__call__`` denoising one
                     chunk with that U-Net (:func:`_pipeline_worker`): inputs (int8 form), keep-mask, noise, steps,
                     guidance, timesteps and the original's final latents; with ``--deepcache-interval N`` also
                     ``latents_deepcache``, the same call with ``DeepCacheSDHelper`` (1.6). ``pipeline.json``
                     says how it was made and our errors at build time (:func:`check_pipeline_ours`).

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

The pipeline fixtures (``DeepCache`` from ``pip install --target /tmp/ref-deps-dc --no-deps DeepCache==0.1.1``)::

    python scripts/make_parity_fixtures.py --what pipeline --original /tmp/ref-1.5 --version 1.5 --deps /tmp/ref-deps
    python scripts/make_parity_fixtures.py --what pipeline --original /tmp/ref-1.6 --version 1.6 \\
        --deps /tmp/ref-deps --deps /tmp/ref-deps-dc --deepcache-interval 3

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
#: ``git hash-object`` gives them) of the files the U-Net is built from at that commit (``blobs``) and of those
#: the pipeline fixture runs besides (``pipeline_blobs``): an extract that is not a git checkout is verified
#: against these.
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
        "pipeline_blobs": {
            "configs/scheduler_config.json": "3a6a9a51b8ea8eb2b0c55e2811e608f2eca3ffd2",
            "latentsync/pipelines/lipsync_pipeline.py": "46db2404eda8e5b9d42bb616e1e6ffbc301c9d3c",
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
        "pipeline_blobs": {
            "configs/scheduler_config.json": "d58bec6d68e03c075d820699a9e98d1d84cc1ae2",
            "latentsync/pipelines/lipsync_pipeline.py": "2e31b890b6352d1b7897ef4bd58dcbf44c36a778",
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
        "pipeline_blobs": {
            "configs/scheduler_config.json": "d58bec6d68e03c075d820699a9e98d1d84cc1ae2",
            "latentsync/pipelines/lipsync_pipeline.py": "c315d04f7e618f55faac46eae45ab99785f30b20",
        },
    },
}

#: What is shrunk in the yaml's model section; everything else (block types, 8 attention heads, 32 groups, the
#: motion-module settings, cross_attention_dim 384, in/out channels 13/4...) stays as the release has it.
#: 32 is the smallest width: every GroupNorm (the motion modules' included, fixed at 32 groups) needs a multiple
#: of 32. Four levels keep the original's level arithmetic (``res = 2 ** (3 - i)`` in the up blocks).
#: ``sample_size`` is set to the version's latent size (:data:`LATENT_SIZES`).
TINY_OVERRIDES: dict[str, Any] = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}

FRAMES = 16
#: Latents of each version's face resolution (the release yaml's ``data.resolution`` / 8, the VAE's factor): 256 px
#: faces (1.0, 1.5) give 32 x 32, 512 px (1.6) 64 x 64. Also the tiny section's ``sample_size``.
LATENT_SIZES = {"1.0": 32, "1.5": 32, "1.6": 64}
#: The pipeline fixture's latents: the loop's arithmetic (noise, mask, CFG batch, DDIM steps) does not depend on the
#: size, and 10 tiny U-Net forwards at 64 x 64 take minutes on one CPU thread; the U-Net fixture covers each size.
PIPELINE_LATENT_SIZE = 16
AUDIO_TOKENS = 50
TIMESTEP = 951
SEEDS = {"1.0": 1000, "1.5": 1505, "1.6": 1606}
MAX_REL_ERROR = 1e-5
#: The pipeline fixture (``--what pipeline``): DDIM steps, guidance (> 1: the zero-audio branch runs), input
#: seeds (the noise seed is one more), and the goals for our final latents without and with DeepCache.
PIPELINE_STEPS = 5
PIPELINE_GUIDANCE = 1.5
PIPELINE_SEEDS = {"1.0": 2000, "1.5": 2505, "1.6": 2606}
MAX_PIPELINE_REL_ERROR = 1e-4
MAX_DEEPCACHE_REL_ERROR = 1e-5


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


def _import_original(job: dict[str, Any]) -> Any:
    """In the original's process: put ``job["deps"]`` first on the path, bind ``latentsync`` to the original's
    folder (stubbing the one util import ``unet.py`` needs), and return the original's ``latentsync.models.unet``.
    """
    import importlib
    import types

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

    unet_module = importlib.import_module("latentsync.models.unet")
    if not Path(unet_module.__file__).resolve().is_relative_to(original):
        raise RuntimeError(f"imported {unet_module.__file__}, not the original under {original}")
    return unet_module


def _worker(job_path: str) -> None:
    """Run in the original's process: the job's ``what`` (``unet``: build, re-randomise, run and save, see the
    module docstring; ``pipeline``: :func:`_pipeline_worker`)."""
    import importlib

    job = json.loads(Path(job_path).read_text())
    if job.get("what") == "pipeline":
        _pipeline_worker(job)
        return
    unet_module = _import_original(job)

    import torch

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


class _LoopFinished(Exception):
    """Raised by the callback at the last denoising step: what follows (VAE decode, video files) is not needed."""


def _pipeline_worker(job: dict[str, Any]) -> None:
    """Run in the original's process: the original ``LipsyncPipeline.__call__`` on one 16-frame chunk.

    Everything of ``__call__`` before and inside the denoising loop is the original's own code (noise from the
    generator, mask resize, channel order, CFG batch with zero audio, ``scale_model_input``, the U-Net, the
    guidance, ``scheduler.step``); the helpers it calls for files, faces, Whisper and the VAE are stubs that hand
    over this job's inputs as they are: the "VAE" encodes a tensor to itself with scaling 1 and shift 0, so the
    masked-image and reference latents reach the U-Net exactly; the "image processor" returns those two and the
    keep-mask. The callback takes the latents after the last step and stops the call there (the decode needs a
    real VAE and gives nothing the comparison needs). With ``deepcache_interval`` the same call runs again with
    the ``DeepCache`` package's ``DeepCacheSDHelper`` enabled as 1.6's ``scripts/inference.py`` enables it.
    """
    import importlib
    import importlib.metadata
    import importlib.util
    import inspect
    import types

    unet_module = _import_original(job)
    original = Path(job["original"]).resolve()

    import numpy as np
    import torch
    from diffusers import DDIMScheduler

    frames, size, channels = job["frames"], job["latent_size"], job["latent_channels"]
    pixels = size * 8
    generator = torch.Generator().manual_seed(job["seed"])
    stored = quantize(
        {
            "reference_latents": torch.randn(frames, channels, size, size, generator=generator),
            "masked_latents": torch.randn(frames, channels, size, size, generator=generator),
            "audio_embeds": torch.randn(frames, job["audio_tokens"], job["cross_attention_dim"], generator=generator),
        }
    )
    values = dequantize(stored)
    keep_mask = torch.load(job["keep_mask"], weights_only=True).float()  # (pixels, pixels), 1 = keep

    class ImageProcessor:
        """Stands for face alignment and the mask image: hands over this job's latents and keep-mask."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def affine_transform(self, frame: Any) -> tuple[Any, tuple[int, int, int, int], None]:
            return torch.zeros(3, pixels, pixels), (0, 0, pixels, pixels), None

        def prepare_masks_and_masked_images(self, images: Any, affine_transform: bool = False) -> tuple[Any, ...]:
            masks = keep_mask[None, None].expand(len(images), 1, pixels, pixels).clone()
            return values["reference_latents"].clone(), values["masked_latents"].clone(), masks

    class IdentityVAE:
        """Stands for the VAE: ``encode(x).latent_dist.sample()`` is ``x``; scaling 1 and shift 0 keep it exact."""

        config = types.SimpleNamespace(
            latent_channels=channels, block_out_channels=[1, 1, 1, 1], scaling_factor=1.0, shift_factor=0.0
        )

        def encode(self, x: Any) -> Any:
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda generator=None: x))

    class AudioEncoder:
        """Stands for Whisper: one ``(audio_tokens, cross_attention_dim)`` feature per frame."""

        def audio2feat(self, audio_path: str) -> None:
            return None

        def feature2chunks(self, feature_array: Any, fps: int) -> list[Any]:
            return list(values["audio_embeds"])

    def module(name: str, **attributes: Any) -> types.ModuleType:
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        return stub

    util = sys.modules["latentsync.utils.util"]
    util.read_video = lambda path, *args, **kwargs: np.zeros((frames, pixels, pixels, 3), np.uint8)
    util.read_audio = lambda path, *args, **kwargs: torch.zeros(16000)
    util.write_video = lambda *args, **kwargs: None
    util.check_ffmpeg_installed = lambda: None
    stubs = {
        "latentsync.utils.image_processor": module(
            "latentsync.utils.image_processor", ImageProcessor=ImageProcessor, load_fixed_mask=lambda *a, **k: None
        ),
        "latentsync.whisper": module("latentsync.whisper", __path__=[]),
        "latentsync.whisper.audio2feature": module("latentsync.whisper.audio2feature", Audio2Feature=AudioEncoder),
    }
    if importlib.util.find_spec("torchvision") is None:  # used by restore_video only, after the loop
        transforms = module("torchvision.transforms")
        stubs.update(
            {"torchvision": module("torchvision", transforms=transforms), "torchvision.transforms": transforms}
        )
    sys.modules.update(stubs)

    pipeline_module = importlib.import_module("latentsync.pipelines.lipsync_pipeline")
    if not Path(pipeline_module.__file__).resolve().is_relative_to(original):
        raise RuntimeError(f"imported {pipeline_module.__file__}, not the original under {original}")
    torch.manual_seed(0)
    model = unet_module.UNet3DConditionModel.from_config(job["section"]).eval()
    model.load_state_dict(dequantize(torch.load(job["unet_weights"], weights_only=True)), strict=True)
    scheduler = DDIMScheduler.from_pretrained(str(original / "configs"))  # as its scripts/inference.py does
    pipeline_class = pipeline_module.LipsyncPipeline
    unet_argument = "unet" if "unet" in inspect.signature(pipeline_class.__init__).parameters else "denoising_unet"
    pipe = pipeline_class(
        vae=IdentityVAE(), audio_encoder=AudioEncoder(), scheduler=scheduler, **{unet_argument: model}
    )
    pipe.set_progress_bar_config(disable=True)
    noise_seed = job["noise_seed"]
    noise = torch.randn((1, channels, 1, size, size), generator=torch.Generator().manual_seed(noise_seed))

    def run() -> dict[str, Any]:
        seen: dict[str, Any] = {"full_steps": 0, "timesteps": []}

        def first_input(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault("first_input", args[0].detach().clone())

        def deep_layer_ran(module: Any, args: tuple[Any, ...]) -> None:
            seen["full_steps"] += 1

        def callback(step: int, timestep: Any, latents: Any) -> None:
            seen["timesteps"].append(int(timestep))
            if step == job["steps"] - 1:
                seen["latents"] = latents.detach().float().clone().contiguous()
                raise _LoopFinished

        hooks = [
            model.register_forward_pre_hook(first_input, with_kwargs=True),
            model.mid_block.resnets[0].register_forward_pre_hook(deep_layer_ran),  # runs on full steps only
        ]
        try:
            pipe(
                video_path="video.mp4",
                audio_path="audio.wav",
                video_out_path="out.mp4",
                video_mask_path="out_mask.mp4",
                num_frames=frames,
                num_inference_steps=job["steps"],
                guidance_scale=job["guidance_scale"],
                weight_dtype=torch.float32,
                eta=0.0,
                height=pixels,
                width=pixels,
                generator=torch.Generator().manual_seed(noise_seed),
                callback=callback,
                callback_steps=1,
            )
        except _LoopFinished:
            pass
        else:
            raise RuntimeError("the original's call ended without its last step's callback")
        finally:
            for hook in hooks:
                hook.remove()
        # The stubs did what they should: the first U-Net input is the noise and the given latents.
        first = seen.pop("first_input")
        cfg = 2 if job["guidance_scale"] > 1 else 1
        expected = torch.cat(
            [
                noise.expand(1, channels, frames, size, size),
                torch.nn.functional.interpolate(keep_mask[None, None], size=(size, size))[:, :, None].expand(
                    1, 1, frames, size, size
                ),
                values["masked_latents"].transpose(0, 1)[None],
                values["reference_latents"].transpose(0, 1)[None],
            ],
            dim=1,
        )
        if first.shape != (cfg, 3 * channels + 1, frames, size, size) or not torch.equal(
            first, expected.expand_as(first)
        ):
            raise RuntimeError("the original's first U-Net input is not the job's noise, mask and latents")
        return seen

    plain = run()
    result = {
        **stored,
        "keep_mask": keep_mask.to(torch.uint8),
        "noise": noise,
        "steps": job["steps"],
        "guidance_scale": job["guidance_scale"],
        "deepcache_interval": job["deepcache_interval"],
        "timesteps": torch.tensor(plain["timesteps"]),
        "latents": plain["latents"],
    }
    info: dict[str, Any] = {"full_steps": plain["full_steps"]}
    if job["deepcache_interval"]:
        from DeepCache import DeepCacheSDHelper

        if not hasattr(pipe, "unet"):
            raise RuntimeError(f"{original}'s pipeline has no 'unet' attribute: DeepCacheSDHelper cannot wrap it")
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=job["deepcache_interval"], cache_branch_id=0)
        helper.enable()
        cached = run()
        helper.disable()
        result["latents_deepcache"] = cached["latents"]
        info["deepcache_full_steps"] = cached["full_steps"]
        info["deepcache_package"] = importlib.metadata.version("DeepCache")
        info["deepcache_module"] = str(Path(sys.modules["DeepCache"].__file__).resolve())

    out = Path(job["out"])
    torch.save(result, out / "pipeline.pt")
    info.update(
        {
            "torch": torch.__version__,
            "diffusers": importlib.import_module("diffusers").__version__,
            "einops": importlib.import_module("einops").__version__,
            "original_module": str(Path(pipeline_module.__file__).resolve()),
            "scheduler_config": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        }
    )
    (out / "worker.json").write_text(json.dumps(info))


def git_blob_id(path: Path) -> str:
    """The git blob id of a file (what ``git hash-object PATH`` prints): sha1 of ``b"blob <size>\\0" + bytes``."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_original(original: Path, version: str, commit: str, *, what: str = "unet") -> str:
    """Check that ``original`` holds ``commit``; return how it was checked (for ``meta.json``).

    A git checkout must have ``commit`` checked out; another folder (an extract) must hold the release's files
    (:data:`RELEASES` blob ids: the U-Net's, and with ``what="pipeline"`` the pipeline's and the scheduler
    config too) when ``commit`` is the release commit, and cannot be checked otherwise.

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
    blobs = dict(RELEASES[version]["blobs"])
    if what == "pipeline":
        blobs.update(RELEASES[version]["pipeline_blobs"])
    for relative, blob in blobs.items():
        if not (original / relative).is_file():
            raise ValueError(f"{original / relative} is missing: {original} does not hold LatentSync {version}")
        found = git_blob_id(original / relative)
        if found != blob:
            raise ValueError(f"{original / relative} is blob {found}, not {blob} as at {commit}")
    if what == "pipeline":
        return f"git blob ids of the {len(blobs)} U-Net, pipeline and scheduler files"
    return f"git blob ids of the {len(blobs)} U-Net files"


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
    section["sample_size"] = LATENT_SIZES[version]
    # PyYAML reads "1e-5" as a string; the original's OmegaConf reads a float.
    section["norm_eps"] = float(section["norm_eps"])
    return section


def _run_worker(job: dict[str, Any], tmp: str) -> None:
    """Run :func:`_worker` on ``job`` in a separate ``python -I`` process whose working directory is ``tmp``.

    Raises:
        RuntimeError: With the process's stderr, if it fails.

    """
    job_path = Path(tmp) / "job.json"
    job_path.write_text(json.dumps(job))
    # -I: no PYTHONPATH, no user site, no current directory on sys.path; cwd is a temporary folder.
    result = subprocess.run(
        [sys.executable, "-I", str(Path(__file__).resolve()), "--worker", str(job_path)],
        cwd=tmp,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the original's process failed ({result.returncode}):\n{result.stderr}")


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
        "latent_size": LATENT_SIZES[version],
        "audio_tokens": AUDIO_TOKENS,
        "cross_attention_dim": section["cross_attention_dim"],
        "timestep": TIMESTEP,
        "out": str(out.resolve()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        _run_worker(job, tmp)
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
        "latent_size": [LATENT_SIZES[version]] * 2,
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


def build_pipeline(
    original: Path,
    version: str,
    out_root: Path,
    deps: list[str],
    commit: str | None,
    *,
    steps: int = PIPELINE_STEPS,
    guidance_scale: float = PIPELINE_GUIDANCE,
    deepcache_interval: int = 0,
) -> dict[str, Any]:
    """Build the pipeline fixture ``out_root / version / pipeline.pt`` and check our pipeline against it.

    The original ``LipsyncPipeline.__call__`` (:func:`_pipeline_worker`) denoises one chunk with the U-Net of
    the version's U-Net fixture (``unet.pt`` and ``config.json``, which must exist: build them first), inputs
    drawn from :data:`PIPELINE_SEEDS` and our keep-mask at 8 x :data:`PIPELINE_LATENT_SIZE` pixels.

    Args:
        original: The original LatentSync at ``commit`` (a checkout or an extract).
        version: ``"1.0"``, ``"1.5"`` or ``"1.6"``.
        out_root: Folder of the fixtures (``tests/data/parity``).
        deps: Folders put first on the original process's path (einops; ``DeepCache`` for ``deepcache_interval``).
        commit: The commit ``original`` holds; ``None``: the version's release commit.
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance scale (> 1 runs the zero-audio branch).
        deepcache_interval: > 0: also run with ``DeepCacheSDHelper(cache_interval=..., cache_branch_id=0)``.

    Returns:
        The fixture's ``pipeline.json`` contents.

    Raises:
        ValueError: If ``original`` does not hold ``commit``.
        FileNotFoundError: If the version's U-Net fixture is missing.
        RuntimeError: If the original's process fails, or our pipeline misses the parity goals.

    """
    import torch

    sys.path.insert(0, str(REPO))
    from latentsync.face.mask import make_keep_mask

    release = RELEASES[version]["commit"]
    commit = commit or release
    verified = verify_original(original, version, commit, what="pipeline")
    out = out_root / version
    for name in ("unet.pt", "config.json"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} is missing: build the U-Net fixture first (without --what)")
    section = json.loads((out / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        keep_path = Path(tmp) / "keep_mask.pt"
        torch.save(torch.from_numpy(make_keep_mask(8 * PIPELINE_LATENT_SIZE)).to(torch.uint8), keep_path)
        job = {
            "what": "pipeline",
            "original": str(original.resolve()),
            "deps": [str(Path(d).resolve()) for d in deps],
            "section": section,
            "hidden_modules": RELEASES[version].get("hidden_modules", []),
            "unet_weights": str((out / "unet.pt").resolve()),
            "keep_mask": str(keep_path),
            "seed": PIPELINE_SEEDS[version],
            "noise_seed": PIPELINE_SEEDS[version] + 1,
            "frames": FRAMES,
            "latent_size": PIPELINE_LATENT_SIZE,
            "latent_channels": 4,
            "audio_tokens": AUDIO_TOKENS,
            "cross_attention_dim": section["cross_attention_dim"],
            "steps": steps,
            "guidance_scale": guidance_scale,
            "deepcache_interval": deepcache_interval,
            "out": str(out.resolve()),
        }
        _run_worker(job, tmp)
    worker = json.loads((out / "worker.json").read_text())
    (out / "worker.json").unlink()
    errors = check_pipeline_ours(out, version)
    if errors["latents"] > MAX_PIPELINE_REL_ERROR:
        raise RuntimeError(f"our pipeline misses the parity goal on {out}: max relative error {errors['latents']:.3g}")
    if errors.get("latents_deepcache", 0.0) > MAX_DEEPCACHE_REL_ERROR:
        raise RuntimeError(
            f"our DeepCache misses the parity goal on {out}: max relative error {errors['latents_deepcache']:.3g}"
        )
    meta = {
        "version": version,
        "commit": commit,
        "commit_verified_by": verified,
        "release_commit": release,
        "unet_fixture": "unet.pt and config.json of this folder",
        "seed": PIPELINE_SEEDS[version],
        "noise_seed": PIPELINE_SEEDS[version] + 1,
        "frames": FRAMES,
        "latent_size": [PIPELINE_LATENT_SIZE] * 2,
        "keep_mask": f"latentsync.face.mask.make_keep_mask({8 * PIPELINE_LATENT_SIZE}) (ours, an input only)",
        "steps": steps,
        "guidance_scale": guidance_scale,
        "eta": 0.0,
        "deepcache_interval": deepcache_interval,
        "deepcache_branch_id": 0 if deepcache_interval else None,
        "relative_error_definition": "max|ours - ref| / max|ref| over the final latents (1, 4, 16, 16, 16)",
        "our_max_relative_error_at_build": errors,
        "command": "python scripts/make_parity_fixtures.py " + shlex.join(sys.argv[1:]),
        **worker,
    }
    (out / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def check_pipeline_ours(fixture: Path, version: str) -> dict[str, float]:
    """Run our pipeline on a pipeline fixture (:func:`run_our_pipeline`); return its max relative errors.

    Returns:
        ``{"latents": error}``, plus ``"latents_deepcache"`` (ours with the fixture's interval) where the
        fixture has a DeepCache run.

    """
    import torch

    stored = torch.load(fixture / "pipeline.pt", weights_only=True)
    errors = {"latents": relative_error(run_our_pipeline(fixture, version), stored["latents"])}
    if "latents_deepcache" in stored:
        ours = run_our_pipeline(fixture, version, deepcache_interval=stored["deepcache_interval"])
        errors["latents_deepcache"] = relative_error(ours, stored["latents_deepcache"])
    return errors


def run_our_pipeline(fixture: Path, version: str, *, deepcache_interval: int = 0, channels_last: bool = True) -> Any:
    """Our ``LipsyncPipeline.denoise_batch`` (float32, CPU) on the inputs of ``fixture / "pipeline.pt"``.

    The U-Net is the fixture folder's (``UNet3DConfig.from_original`` + strict ``load_unet``), the scheduler
    ours (``configs/scheduler_config.json`` of this repository), the VAE a tiny random ``AutoencoderKL`` (the
    denoising loop reads only its latent channels and scale factor); the faces, which the loop does not read,
    are zeros.

    Args:
        fixture: ``tests/data/parity/<version>``.
        version: Its LatentSync version.
        deepcache_interval: Our pipeline's ``deepcache_interval`` (0: off).
        channels_last: ``load_unet``'s memory layout (the server's is channels-last).

    Returns:
        ``(1, 4, F, h, w) float32`` final latents.

    """
    sys.path.insert(0, str(REPO))
    import torch
    from diffusers import AutoencoderKL

    from latentsync.models.loading import load_unet
    from latentsync.models.unet3d import UNet3DConfig
    from latentsync.pipelines import LipsyncChunk, LipsyncPipeline, load_scheduler

    stored = torch.load(fixture / "pipeline.pt", weights_only=True)
    values = dequantize(stored)
    config = UNet3DConfig.from_original(json.loads((fixture / "config.json").read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "unet.pt"
        torch.save(dequantize(torch.load(fixture / "unet.pt", weights_only=True)), weights)
        unet = load_unet(weights, config=config, dtype="float32", version=version, channels_last=channels_last)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[4, 4, 4, 4],
            norm_num_groups=4,
            latent_channels=4,
        ).eval()
    pipeline = LipsyncPipeline(
        unet, vae, load_scheduler(REPO / "configs" / "scheduler_config.json"), deepcache_interval=deepcache_interval
    )
    keep_mask = stored["keep_mask"].float()
    frames = values["reference_latents"].shape[0]
    chunk = LipsyncChunk(
        faces=torch.zeros((frames, *keep_mask.shape, 3), dtype=torch.uint8),
        reference_latents=values["reference_latents"],
        masked_latents=values["masked_latents"],
        audio_features=values["audio_embeds"],
        noise=stored["noise"],
    )
    return pipeline.denoise_batch(
        [chunk], keep_mask, num_inference_steps=stored["steps"], guidance_scale=stored["guidance_scale"]
    )


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", type=Path, help="the original LatentSync code at the release commit")
    parser.add_argument("--version", choices=sorted(RELEASES), help="the LatentSync version PATH holds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture folder (default tests/data/parity)")
    parser.add_argument("--deps", action="append", default=[], help="folder with einops for the original's process")
    parser.add_argument("--commit", help="the commit PATH holds (default: the version's release commit)")
    parser.add_argument(
        "--what",
        choices=("unet", "pipeline"),
        default="unet",
        help="unet: one U-Net forward (unet.pt, io.pt, meta.json); pipeline: one chunk's denoising loop with "
        "that U-Net (pipeline.pt, pipeline.json; build the unet fixture first)",
    )
    parser.add_argument("--steps", type=int, default=PIPELINE_STEPS, help="--what pipeline: DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=PIPELINE_GUIDANCE, help="--what pipeline: CFG scale")
    parser.add_argument(
        "--deepcache-interval",
        type=int,
        default=0,
        help="--what pipeline: also run the original with DeepCacheSDHelper(cache_interval=N, cache_branch_id=0) "
        "(needs the DeepCache package in a --deps folder)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if args.original is None or args.version is None:
        parser.error("--original and --version are required")
    try:
        if args.what == "pipeline":
            meta = build_pipeline(
                args.original,
                args.version,
                args.out,
                args.deps,
                args.commit,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                deepcache_interval=args.deepcache_interval,
            )
        else:
            meta = build(args.original, args.version, args.out, args.deps, args.commit)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
