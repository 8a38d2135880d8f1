"""Load an official LatentSync U-Net checkpoint (``latentsync_unet.pt``, 1.0, 1.5 or 1.6) into our model.

The file is read with ``torch.load(mmap=True, weights_only=True)``: tensors stay on disk until touched,
so a 3.4 GB checkpoint does not need twice its size in RAM, and no pickled code is executed. The model is
built on the ``meta`` device (no allocation) and the checkpoint tensors are assigned to it, converted to
the target dtype/device one at a time. For float32 on CPU the parameters are the memory-mapped tensors
themselves (copy-on-write).

Unlike the original code (which loads with ``strict=False`` and silently keeps random weights for a
wrong file), a missing or misshaped tensor is an error naming the keys; extra tensors only warn.

The version a file holds is told from its tensors (:func:`detect_version`): a 1.5 / 1.6 U-Net has
motion-module (temporal layer) tensors, a 1.0 U-Net has none. 1.5 and 1.6 have the same tensors (1.6 is
1.5's network trained at 512x512), so the file cannot tell them apart: the configured version decides the
resolution. A file of the other family is refused before the key-by-key check, with a message naming both.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from latentsync.models.unet3d import VERSIONS, UNet3DConditionModel, UNet3DConfig

logger = logging.getLogger(__name__)

MAX_LISTED_KEYS = 10
"""How many offending keys an error message lists before summarising the rest."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


#: Infix of every temporal-layer tensor name (``down_blocks.0.motion_modules.0.temporal_transformer...``).
MOTION_MODULE_INFIX = ".motion_modules."


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model (message names the file and keys)."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint holds another LatentSync version than the one configured (message names both)."""


def motion_module_keys(names: Iterable[str]) -> list[str]:
    """Return the temporal-layer (motion-module) tensor names among ``names``, in their order."""
    return [name for name in names if MOTION_MODULE_INFIX in name]


def detect_version(state_dict: Mapping[str, object]) -> str:
    """Tell the LatentSync version of a U-Net state dict from its tensor names.

    Args:
        state_dict: Tensor (or anything) by name.

    Returns:
        ``"1.0"`` when no motion-module tensor is present, else ``"1.5"``, which stands for 1.5 or 1.6: their
        files have the same names and shapes.

    """
    return "1.5" if motion_module_keys(state_dict) else "1.0"


def describe_version(state_dict: Mapping[str, object]) -> str:
    """Say in words which version a state dict holds, e.g. ``"a LatentSync 1.0 U-Net (no motion-module tensors)"``."""
    count = len(motion_module_keys(state_dict))
    if not count:
        return "a LatentSync 1.0 U-Net (no motion-module tensors)"
    return f"a LatentSync 1.5 or 1.6 U-Net ({count} motion-module tensors)"


def check_version(state_dict: Mapping[str, object], version: str, source: str, setting: str = "version") -> None:
    """Refuse a state dict of another LatentSync version than ``version``.

    Args:
        state_dict: Tensor (or anything) by name.
        version: ``"1.0"``, ``"1.5"`` or ``"1.6"``.
        source: What to call the state dict in messages (usually the file path).
        setting: The name of the setting that chose ``version``, for messages
            (``"engine.latentsync.version"`` in the server).

    Raises:
        CheckpointVersionError: If the file holds 1.0 and ``version`` is 1.5 / 1.6, or the reverse.
        ValueError: If ``version`` is unknown.

    """
    if version not in VERSIONS:
        raise ValueError(f"{setting}: unknown LatentSync version {version!r}; expected one of {VERSIONS}")
    found = detect_version(state_dict)
    if (found == "1.0") != (version == "1.0"):
        fits = "1.0" if found == "1.0" else "1.5 or 1.6"
        raise CheckpointVersionError(
            f"{source} holds {describe_version(state_dict)} but {setting} is {version} "
            f"(set {setting} to {fits}, or bring a LatentSync {version} checkpoint)"
        )


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """Turn a dtype name into a ``torch.dtype``, choosing the default for the device.

    Args:
        dtype: ``torch.float32``/``float16``/``bfloat16``, one of their names (``"fp16"``, ``"bf16"``...),
            or ``None`` for the default: float32 on CPU, float16 elsewhere.
        device: Target device.

    Returns:
        The dtype.

    Raises:
        ValueError: For any other dtype.

    """
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
    return dtype


@dataclass(frozen=True)
class UNetCheckpoint:
    """Contents of a U-Net checkpoint file.

    Attributes:
        state_dict: ``{name: tensor}`` on CPU, memory-mapped when possible.
        global_step: Training step stored beside the weights, or ``None`` for a bare state dict.

    """

    state_dict: dict[str, torch.Tensor]
    global_step: int | None


def read_checkpoint(path: str | os.PathLike[str]) -> UNetCheckpoint:
    """Read a U-Net checkpoint lazily (memory-mapped) without executing pickled code.

    Args:
        path: ``latentsync_unet.pt``: ``{"global_step": int, "state_dict": {name: tensor}}`` or a bare
            ``{name: tensor}`` state dict, saved with ``torch.save``.

    Returns:
        The state dict and global step. Tensors are memory-mapped when the file is in the zip format that
        ``torch.save`` has written since PyTorch 1.6 (older files are read fully, with a warning).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is truncated, not a torch checkpoint, or holds no tensor dict.

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"U-Net checkpoint not found: {path} (put the official latentsync_unet.pt there, see checkpoints/README.md)"
        )
    try:
        if zipfile.is_zipfile(path):
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        else:
            logger.warning("%s is not in torch's zip format: reading it fully into memory (no mmap)", path)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes): {type(exc).__name__}: {exc}. "
            "The file may be truncated or not a PyTorch checkpoint."
        ) from exc
    state_dict = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(
            f"checkpoint {path} holds neither a state dict nor a {{'global_step', 'state_dict'}} dict "
            f"(top-level type {type(obj).__name__})"
        )
    step = obj.get("global_step") if state_dict is not obj else None
    return UNetCheckpoint(dict(state_dict), int(step) if step is not None else None)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Return the state dict of :func:`read_checkpoint` (same arguments and errors)."""
    return read_checkpoint(path).state_dict


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    source: str,
    model_name: str = "the LatentSync 1.0 U-Net",
) -> list[str]:
    """Compare a state dict with the expected names and shapes.

    Args:
        state_dict: Tensors (or anything with ``.shape``) by name.
        expected: Shapes by name, e.g. ``{k: v.shape for k, v in model.state_dict().items()}``.
        source: What to call the state dict in messages (usually the file path).
        model_name: What to call the model in messages.

    Returns:
        The names of extra tensors (present but not expected), sorted; the caller decides whether to warn.

    Raises:
        CheckpointError: If any expected tensor is missing or has another shape; the message lists the
            first :data:`MAX_LISTED_KEYS` of each and the counts.

    """
    missing = [k for k in expected if k not in state_dict]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} != model {tuple(expected[k])}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    extra = sorted(k for k in state_dict if k not in expected)
    if missing or mismatched:
        parts = [f"{source} does not fit {model_name}:"]
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {', '.join(missing[:MAX_LISTED_KEYS])}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es), first: {'; '.join(mismatched[:MAX_LISTED_KEYS])}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), first: {', '.join(extra[:MAX_LISTED_KEYS])}")
        raise CheckpointError(" ".join(parts))
    return extra


def load_unet(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    config: UNet3DConfig | None = None,
    channels_last: bool = True,
    version: str | None = None,
    version_setting: str = "version",
) -> UNet3DConditionModel:
    """Build the LatentSync U-Net and load ``latentsync_unet.pt`` into it.

    Args:
        path: Checkpoint file, ``{"global_step", "state_dict"}`` or a bare state dict (fp32, ~3.4 GB).
        device: Target device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: float32, float16 or bfloat16 (or their names); ``None``: float32 on CPU, float16 elsewhere.
        config: Architecture; defaults to ``UNet3DConfig.for_version(version)`` (LatentSync 1.0 when
            ``version`` is None too).
        channels_last: Convert the convolution weights to channels-last memory once, here (default). The
            forward pass then keeps every activation channels-last: faster convolutions on CPU (oneDNN) and
            tensor cores, free token reshapes in the transformers, and no per-call weight conversion (a conv
            fed channels-last activations with contiguous weights converts the weights on every call: about
            640 ms per full-size forward on CPU). False keeps contiguous weights and activations throughout.
        version: ``"1.0"``, ``"1.5"`` or ``"1.6"``: the file must hold this version (told from its tensors,
            :func:`detect_version`) and so must ``config``. None: the version of ``config``, or any version
            when ``config`` is None too (the file's own: 1.0 or 1.5 / 1.6).
        version_setting: Name of the setting that chose ``version``, for messages.

    Returns:
        The model in eval mode with ``requires_grad=False`` on every parameter.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointVersionError: If the file holds another version than ``version`` (or than ``config``'s).
        CheckpointError: If the file is unreadable, or a tensor is missing or misshaped.
        ValueError: For an unsupported dtype, an unknown version, or a ``config`` of another version.

    """
    target_dtype = resolve_dtype(dtype, device)
    if (
        config is not None
        and version is not None
        and config.version_family != UNet3DConfig.for_version(version).version_family
    ):
        raise ValueError(
            f"{version_setting} is {version} but the U-Net config is LatentSync {config.version_family}'s "
            f"(use_motion_module={config.use_motion_module})"
        )
    state_dict = read_state_dict(path)
    if version is None:  # the config's version, or (no config either) the file's own
        version = config.version_family if config is not None else detect_version(state_dict)
        version_setting = "the U-Net config's version" if config is not None else version_setting
    check_version(state_dict, version, str(path), version_setting)
    if config is None:
        config = UNet3DConfig.for_version(version)
    model = UNet3DConditionModel(config, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model_name = f"the LatentSync {version} U-Net"
    extra = check_state_dict(state_dict, expected, str(path), model_name)
    if extra:
        logger.warning(
            "%s: ignoring %d unexpected key(s), first: %s",
            path,
            len(extra),
            ", ".join(extra[:MAX_LISTED_KEYS]),
        )
    converted = {}
    for name in expected:
        tensor = state_dict.pop(name)
        converted[name] = tensor.to(device=device, dtype=target_dtype)
    del state_dict
    model.load_state_dict(converted, strict=True, assign=True)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    return model
