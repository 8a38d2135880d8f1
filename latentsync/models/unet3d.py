"""LatentSync U-Net (1.0, 1.5, 1.6): a checkpoint-compatible ``UNet3DConditionModel`` written for inference.

The network is Stable-Diffusion-1.5-shaped and runs on video latents ``(B, C, F, H, W)``. Convolutions and
spatial attention work on every frame independently; the ResNet GroupNorms and ``conv_norm_out`` normalise
over all F frames of a chunk jointly, which in 1.0 is the only place where frames interact. LatentSync 1.5
and 1.6 add temporal layers (motion modules, :mod:`latentsync.models.motion_module`) after every ResNet of
the down and up blocks, which attend across the frames (``docs/latentsync.md``). Internally activations are
kept frame-flattened, ``(B * F, C, H, W)``, so no layout change is needed between layers; channels-last
memory is supported and makes the attention token reshapes free.

``UNet3DConditionModel(UNet3DConfig()).state_dict()`` has exactly the 686 names and shapes of the
official 1.0 ``latentsync_unet.pt``; ``UNet3DConfig.for_version("1.5")`` (or ``"1.6"``, the same network)
gives the 1.5 / 1.6 layout, 1,246 tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from latentsync.models.attention import AUDIO_LAYER_NAMES, FrameTransformer
from latentsync.models.motion_module import MotionModule
from latentsync.models.resnet import Downsample, JointGroupNorm, ResnetBlock, Upsample

CROSS_ATTN_DOWN = "CrossAttnDownBlock3D"
DOWN = "DownBlock3D"
CROSS_ATTN_UP = "CrossAttnUpBlock3D"
UP = "UpBlock3D"

#: LatentSync versions whose U-Net this module builds. 1.5 and 1.6 share one network (1.6 was trained at
#: 512x512 without changing it), so a checkpoint's tensors tell 1.0 from "1.5 or 1.6" but not 1.5 from 1.6.
VERSIONS = ("1.0", "1.5", "1.6")


@dataclass(frozen=True, kw_only=True)
class UNet3DConfig:
    """Architecture of the U-Net. Defaults are the ``model`` section of LatentSync 1.0's second_stage.yaml.

    :meth:`for_version` gives 1.5 / 1.6 (stage2.yaml, stage2_512.yaml: the same model section).

    Attributes:
        in_channels: Input channels (13 = noisy latents 4 + mask 1 + masked latents 4 + reference latents 4).
        out_channels: Output channels (4, predicted noise).
        block_out_channels: Channels per resolution level.
        down_block_types: ``"CrossAttnDownBlock3D"`` or ``"DownBlock3D"`` per level.
        up_block_types: ``"UpBlock3D"`` or ``"CrossAttnUpBlock3D"`` per level (deepest first).
        layers_per_block: ResNets per down block (up blocks have one more).
        norm_num_groups: Groups of every GroupNorm.
        norm_eps: Epsilon of the ResNet GroupNorms and ``conv_norm_out``.
        transformer_norm_eps: Epsilon of the GroupNorm at each transformer's entry (1e-6 in the original).
        attention_heads: Heads per attention layer; the yaml's ``attention_head_dim: 8`` means 8 heads.
        cross_attention_dim: Width of the audio features (384, Whisper tiny).
        flip_sin_to_cos: Sinusoidal timestep embedding as ``[cos, sin]``.
        freq_shift: Frequency shift of the timestep embedding.
        downsample_padding: Padding of the stride-2 convolutions.
        mid_block_scale_factor: Output divisor of the mid-block ResNets.
        sample_size: Nominal latent size (64; LatentSync runs at 32 for 256 px faces). Informational.
        joint_frame_norm: True reproduces LatentSync 1.0 (ResNet norms over all frames). False makes them
            per frame; that variant is NOT checkpoint-faithful and exists for experiments and tests.
        audio_layer_names: Checkpoint names of the audio cross-attention: ``"audio_cross_attn"`` (1.0) or
            ``"attn2"`` (1.5 / 1.6, whose code renamed the layer ``norm2`` / ``attn2``).
        use_motion_module: Temporal layers (LatentSync 1.5 / 1.6) after every ResNet of the down/up blocks.
        motion_module_resolutions: Levels that get them, as downsampling factors (1, 2, 4, 8 = all four);
            down level ``i`` has factor ``2**i``, up level ``i`` ``2**(levels - 1 - i)`` (the original writes
            ``2**(3 - i)``: the same for its four levels; they differ only for other depths with a partial list).
        motion_module_mid_block: Also after the mid block's transformer (False in 1.5 / 1.6).
        motion_module_decoder_only: Only in the up blocks (False in 1.5 / 1.6).
        motion_module_heads: Heads of the temporal attention (8, each ``C / 8`` wide).
        motion_module_layers: Transformer blocks per motion module (1).
        motion_module_attentions: Temporal self-attentions per block (2: ``Temporal_Self`` twice).
        motion_module_norm_groups: Groups of each motion module's entry GroupNorm (32: the original fixes it,
            whatever ``norm_num_groups`` says).
        temporal_position_encoding: Add the sinusoidal frame-index encoding before each temporal attention.
        temporal_position_encoding_max_len: Its rows, the longest chunk in frames (24 in 1.5 / 1.6).
        motion_module_zero_initialize: Zero each motion module's ``proj_out`` at construction (as the
            original; loading weights replaces it).

    """

    in_channels: int = 13
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN)
    up_block_types: tuple[str, ...] = (UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6
    attention_heads: int = 8
    cross_attention_dim: int = 384
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    sample_size: int = 64
    joint_frame_norm: bool = field(default=True)
    audio_layer_names: str = "audio_cross_attn"
    use_motion_module: bool = False
    motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_module_heads: int = 8
    motion_module_layers: int = 1
    motion_module_attentions: int = 2
    motion_module_norm_groups: int = 32
    temporal_position_encoding: bool = True
    temporal_position_encoding_max_len: int = 24
    motion_module_zero_initialize: bool = True

    def __post_init__(self) -> None:
        """Validate the configuration.

        Raises:
            ValueError: On inconsistent lengths, unknown block types or indivisible channel counts.

        """
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"block_out_channels {self.block_out_channels}, down_block_types {self.down_block_types} and "
                f"up_block_types {self.up_block_types} must have the same length"
            )
        for name in self.down_block_types:
            if name not in (CROSS_ATTN_DOWN, DOWN):
                raise ValueError(f"unknown down block type {name!r}")
        for name in self.up_block_types:
            if name not in (CROSS_ATTN_UP, UP):
                raise ValueError(f"unknown up block type {name!r}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups or channels % self.attention_heads:
                raise ValueError(
                    f"channels {channels} must be divisible by norm_num_groups {self.norm_num_groups} "
                    f"and attention_heads {self.attention_heads}"
                )
        if self.audio_layer_names not in AUDIO_LAYER_NAMES:
            raise ValueError(f"audio_layer_names must be one of {AUDIO_LAYER_NAMES}, got {self.audio_layer_names!r}")
        if self.use_motion_module:
            for channels in self.block_out_channels:
                if channels % self.motion_module_heads or channels % self.motion_module_norm_groups:
                    raise ValueError(
                        f"channels {channels} must be divisible by motion_module_heads {self.motion_module_heads} "
                        f"and motion_module_norm_groups {self.motion_module_norm_groups}"
                    )
            if self.temporal_position_encoding and self.temporal_position_encoding_max_len <= 0:
                raise ValueError(
                    f"temporal_position_encoding_max_len must be > 0, got {self.temporal_position_encoding_max_len}"
                )

    @property
    def version_family(self) -> str:
        """``"1.0"`` without temporal layers, ``"1.5"`` (meaning 1.5 or 1.6) with them."""
        return "1.5" if self.use_motion_module else "1.0"

    def has_motion_module(self, level: int, *, up: bool) -> bool:
        """Whether the down (``up=False``) or up block ``level`` (0 = first built) has motion modules."""
        if not self.use_motion_module or (not up and self.motion_module_decoder_only):
            return False
        levels = len(self.block_out_channels)
        factor = 2 ** (levels - 1 - level) if up else 2**level
        return factor in self.motion_module_resolutions

    def motion_module(self, channels: int) -> MotionModule:
        """Build one motion module of this config for a level of ``channels`` channels."""
        return MotionModule(
            channels,
            heads=self.motion_module_heads,
            groups=self.motion_module_norm_groups,
            num_layers=self.motion_module_layers,
            attentions=self.motion_module_attentions,
            max_len=self.temporal_position_encoding_max_len if self.temporal_position_encoding else None,
            zero_initialize=self.motion_module_zero_initialize,
        )

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding, ``4 * block_out_channels[0]`` (1280)."""
        return 4 * self.block_out_channels[0]

    @classmethod
    def for_version(cls, version: str, **overrides: Any) -> UNet3DConfig:
        """Return the full-size U-Net of a LatentSync version.

        Args:
            version: ``"1.0"``, ``"1.5"`` or ``"1.6"`` (1.5 and 1.6 give the same network: temporal layers on,
                audio layers named ``attn2``).
            **overrides: Fields to change (e.g. those of :meth:`tiny` for tests).

        Returns:
            The config.

        Raises:
            ValueError: For an unknown version.

        """
        if version not in VERSIONS:
            raise ValueError(f"unknown LatentSync version {version!r}; expected one of {VERSIONS}")
        values: dict[str, Any] = {}
        if version != "1.0":
            values = {"use_motion_module": True, "audio_layer_names": "attn2"}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides: Any) -> UNet3DConfig:
        """Return a two-level config for tests: ``block_out_channels=(32, 64)``, 8 groups, 4 heads.

        Args:
            **overrides: Fields to change.

        Returns:
            The config.

        """
        values: dict[str, Any] = {
            "block_out_channels": (32, 64),
            "down_block_types": (CROSS_ATTN_DOWN, DOWN),
            "up_block_types": (UP, CROSS_ATTN_UP),
            "norm_num_groups": 8,
            "attention_heads": 4,
            "sample_size": 16,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_original(cls, model_section: Mapping[str, Any]) -> UNet3DConfig:
        """Build from the ``model`` section of an original LatentSync yaml.

        1.0's second_stage.yaml (``use_motion_module: false``) gives the 1.0 network; 1.5's stage2.yaml and
        1.6's stage2_512.yaml (``use_motion_module: true``, ``motion_module_type: Vanilla``) give the 1.5 / 1.6
        network, whose code also names the audio layers ``attn2`` (the yaml does not say so: it follows
        from the version, as in the original code at each release).

        Args:
            model_section: Mapping with the original keys (``attention_head_dim``, ``use_motion_module``,
                ``motion_module_kwargs``...). ``motion_module_kwargs`` may also hold ``norm_num_groups``
                (ours, for tiny test models: the original fixes 32).

        Returns:
            The config.

        Raises:
            ValueError: If the section asks for a feature this model lacks (cross-frame or per-layer temporal
                attention, group-norm audio conditioning, scale-shift time embedding, a custom audio layer,
                another motion-module type or attention type, cross-frame attention in the motion module)
                or lacks the audio layer.

        """
        unsupported = {
            "unet_use_cross_frame_attention": False,
            "unet_use_temporal_attention": False,
            "custom_audio_layer": False,
            "center_input_sample": False,
            "add_audio_layer": True,
            "audio_condition_method": "cross_attn",
            "resnet_time_scale_shift": "default",
            "mid_block_type": "UNetMidBlock3DCrossAttn",
            "act_fn": "silu",
            "use_inflated_groupnorm": False,
        }
        for key, supported in unsupported.items():
            if key in model_section and model_section[key] != supported:
                raise ValueError(f"unsupported model option {key}={model_section[key]!r} (need {supported!r})")
        renames = {"attention_head_dim": "attention_heads"}
        motion_keys = {"motion_module_resolutions", "motion_module_mid_block", "motion_module_decoder_only"}
        known = {f.name for f in fields(cls)} - motion_keys - {"use_motion_module", "audio_layer_names"}
        values: dict[str, Any] = {}
        for key, value in model_section.items():
            key = renames.get(key, key)
            if key in known:
                values[key] = tuple(value) if isinstance(value, list | tuple) else value
        for key in ("norm_eps", "mid_block_scale_factor"):
            if key in values:
                values[key] = float(values[key])
        if model_section.get("use_motion_module", False):
            values.update(cls._motion_values(model_section))
        return cls(**values)

    @staticmethod
    def _motion_values(section: Mapping[str, Any]) -> dict[str, Any]:
        kind = section.get("motion_module_type", "Vanilla")
        if kind != "Vanilla":
            raise ValueError(f"unsupported model option motion_module_type={kind!r} (need 'Vanilla')")
        # The original module's own defaults where the yaml is silent (its stage2 yamls set them all).
        kwargs = {
            "num_attention_heads": 8,
            "num_transformer_block": 2,
            "temporal_position_encoding": False,
            "temporal_position_encoding_max_len": 24,
            **dict(section.get("motion_module_kwargs") or {}),
        }
        values: dict[str, Any] = {"use_motion_module": True, "audio_layer_names": "attn2"}
        for key in ("motion_module_resolutions", "motion_module_mid_block", "motion_module_decoder_only"):
            if key in section:
                value = section[key]
                values[key] = tuple(value) if isinstance(value, list | tuple) else value
        block_types = list(kwargs.pop("attention_block_types", ["Temporal_Self", "Temporal_Self"]))
        if not block_types or any(t != "Temporal_Self" for t in block_types):
            raise ValueError(
                f"unsupported motion_module_kwargs.attention_block_types={block_types!r} (need Temporal_Self only)"
            )
        values["motion_module_attentions"] = len(block_types)
        for key, supported in (("temporal_attention_dim_div", 1), ("cross_frame_attention_mode", None)):
            if kwargs.pop(key, supported) != supported:
                raise ValueError(f"unsupported motion_module_kwargs.{key} (need {supported!r})")
        renames = {
            "num_attention_heads": "motion_module_heads",
            "num_transformer_block": "motion_module_layers",
            "norm_num_groups": "motion_module_norm_groups",
            "temporal_position_encoding": "temporal_position_encoding",
            "temporal_position_encoding_max_len": "temporal_position_encoding_max_len",
            "zero_initialize": "motion_module_zero_initialize",
        }
        unknown = sorted(set(kwargs) - set(renames))
        if unknown:
            raise ValueError(f"unsupported motion_module_kwargs key(s) {unknown}")
        values.update({renames[k]: v for k, v in kwargs.items()})
        return values


class DownBlock(nn.Module):
    """One encoder level: ResNets (each optionally followed by a transformer), then a stride-2 conv.

    Args:
        in_channels: Channels entering the level.
        out_channels: Channels of the level.
        config: The U-Net config (groups, eps, heads, audio width).
        has_attention: ``CrossAttnDownBlock3D`` (True) or ``DownBlock3D`` (False).
        add_downsample: Whether a ``downsamplers.0`` conv ends the level.
        has_motion: Whether a motion module follows each ResNet (and its transformer): 1.5 / 1.6.

    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        config: UNet3DConfig,
        has_attention: bool,
        add_downsample: bool,
        has_motion: bool = False,
    ) -> None:
        super().__init__()
        c = config
        self.attentions = (
            nn.ModuleList(
                [
                    FrameTransformer(
                        out_channels,
                        heads=c.attention_heads,
                        audio_dim=c.cross_attention_dim,
                        groups=c.norm_num_groups,
                        eps=c.transformer_norm_eps,
                        audio_layer_names=c.audio_layer_names,
                    )
                    for _ in range(c.layers_per_block)
                ]
            )
            if has_attention
            else None
        )
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=c.time_embed_dim,
                    groups=c.norm_num_groups,
                    eps=c.norm_eps,
                    joint_norm=c.joint_frame_norm,
                )
                for i in range(c.layers_per_block)
            ]
        )
        self.motion_modules = (
            nn.ModuleList([c.motion_module(out_channels) for _ in range(c.layers_per_block)]) if has_motion else None
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels, c.downsample_padding)]) if add_downsample else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor | None, num_frames: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run the level.

        Args:
            x: ``(B * F, in_channels, H, W)``.
            temb: ``(B, time_embed_dim)``.
            audio: ``(B * F, S, cross_attention_dim)`` or ``None``.
            num_frames: ``F``.

        Returns:
            The output and the skip activations handed to the decoder (one per ResNet, plus the
            downsampled output when there is a downsampler).

        """
        skips: tuple[torch.Tensor, ...] = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x = self.attentions[i](x, audio)
            if self.motion_modules is not None:
                x = self.motion_modules[i](x, num_frames)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level: ResNets on ``cat([x, skip])``, each optionally followed by a transformer.

    A 2x nearest upsample + conv ends every level but the last.

    Args:
        in_channels: Channels of the matching encoder level's input (for the last skip).
        out_channels: Channels of the level.
        prev_output_channels: Channels arriving from the deeper level.
        config: The U-Net config.
        has_attention: ``CrossAttnUpBlock3D`` (True) or ``UpBlock3D`` (False).
        add_upsample: Whether an ``upsamplers.0`` ends the level.
        has_motion: Whether a motion module follows each ResNet (and its transformer): 1.5 / 1.6.

    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        prev_output_channels: int,
        config: UNet3DConfig,
        has_attention: bool,
        add_upsample: bool,
        has_motion: bool = False,
    ) -> None:
        super().__init__()
        c = config
        num_layers = c.layers_per_block + 1
        self.attentions = (
            nn.ModuleList(
                [
                    FrameTransformer(
                        out_channels,
                        heads=c.attention_heads,
                        audio_dim=c.cross_attention_dim,
                        groups=c.norm_num_groups,
                        eps=c.transformer_norm_eps,
                        audio_layer_names=c.audio_layer_names,
                    )
                    for _ in range(num_layers)
                ]
            )
            if has_attention
            else None
        )
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            resnets.append(
                ResnetBlock(
                    resnet_in + skip_channels,
                    out_channels,
                    temb_channels=c.time_embed_dim,
                    groups=c.norm_num_groups,
                    eps=c.norm_eps,
                    joint_norm=c.joint_frame_norm,
                )
            )
        self.resnets = nn.ModuleList(resnets)
        self.motion_modules = (
            nn.ModuleList([c.motion_module(out_channels) for _ in range(num_layers)]) if has_motion else None
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        audio: torch.Tensor | None,
        num_frames: int,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run the level.

        Args:
            x: ``(B * F, prev_output_channels, H, W)``.
            skips: One skip activation per ResNet, consumed last-first.
            temb: ``(B, time_embed_dim)``.
            audio: ``(B * F, S, cross_attention_dim)`` or ``None``.
            num_frames: ``F``.
            upsample_size: Forced output size of the upsampler, or ``None`` to double.

        Returns:
            ``(B * F, out_channels, H', W')``.

        """
        for i in range(len(self.resnets)):
            x = self.layer(i, x, skips[-1 - i], temb, audio, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x

    def layer(
        self,
        index: int,
        x: torch.Tensor,
        skip: torch.Tensor,
        temb: torch.Tensor,
        audio: torch.Tensor | None,
        num_frames: int,
    ) -> torch.Tensor:
        """Run layer ``index`` alone: ResNet on ``cat([x, skip])``, then its transformer and motion module if any.

        Args:
            index: Layer, ``0 .. len(resnets) - 1``.
            x: ``(B * F, C_in, H, W)``, the previous layer's output (or the deeper level's, for layer 0).
            skip: ``(B * F, C_skip, H, W)``, the skip activation of this layer.
            temb: ``(B, time_embed_dim)``.
            audio: ``(B * F, S, cross_attention_dim)`` or ``None``.
            num_frames: ``F``.

        Returns:
            ``(B * F, out_channels, H, W)``.

        """
        x = self.resnets[index](torch.cat([x, skip], dim=1), temb, num_frames)
        if self.attentions is not None:
            x = self.attentions[index](x, audio)
        if self.motion_modules is not None:
            x = self.motion_modules[index](x, num_frames)
        return x


class MidBlock(nn.Module):
    """Bottleneck: ResNet, then (transformer, [motion module,] ResNet) ``num_layers`` times (1).

    LatentSync 1.5 / 1.6 have no motion module here (``motion_module_mid_block`` false).

    Args:
        channels: Channels of the deepest level.
        config: The U-Net config.
        num_layers: Transformer/ResNet pairs after the first ResNet.

    """

    def __init__(self, channels: int, config: UNet3DConfig, num_layers: int = 1) -> None:
        super().__init__()
        c = config
        self.attentions = nn.ModuleList(
            [
                FrameTransformer(
                    channels,
                    heads=c.attention_heads,
                    audio_dim=c.cross_attention_dim,
                    groups=c.norm_num_groups,
                    eps=c.transformer_norm_eps,
                    audio_layer_names=c.audio_layer_names,
                )
                for _ in range(num_layers)
            ]
        )
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    channels,
                    channels,
                    temb_channels=c.time_embed_dim,
                    groups=c.norm_num_groups,
                    eps=c.norm_eps,
                    output_scale_factor=c.mid_block_scale_factor,
                    joint_norm=c.joint_frame_norm,
                )
                for _ in range(num_layers + 1)
            ]
        )
        has_motion = c.use_motion_module and c.motion_module_mid_block
        self.motion_modules = (
            nn.ModuleList([c.motion_module(channels) for _ in range(num_layers)]) if has_motion else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        """``(B * F, C, H, W)`` -> same shape."""
        x = self.resnets[0](x, temb, num_frames)
        for i, (attention, resnet) in enumerate(zip(self.attentions, self.resnets[1:], strict=True)):
            x = attention(x, audio)
            if self.motion_modules is not None:
                x = self.motion_modules[i](x, num_frames)
            x = resnet(x, temb, num_frames)
        return x


class UNet3DConditionModel(nn.Module):
    """LatentSync denoising U-Net (audio-conditioned, checkpoint-compatible, inference-oriented).

    Args:
        config: Architecture; defaults to LatentSync 1.0 (second_stage.yaml); ``UNet3DConfig.for_version``
            gives 1.5 / 1.6.
        device: Where to create the parameters (``"meta"`` builds a shape-only model in no time).
        dtype: Parameter dtype (float32 by default; float16/bfloat16 for GPU inference).

    Example:
        >>> model = UNet3DConditionModel(UNet3DConfig.tiny())
        >>> out = model(torch.randn(1, 13, 2, 16, 16), 951, torch.randn(1, 2, 50, 384))
        >>> out.shape
        torch.Size([1, 4, 2, 16, 16])

    """

    def __init__(
        self,
        config: UNet3DConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config = UNet3DConfig() if config is None else config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(config)
        if dtype is not None:
            self.to(dtype)

    def _build(self, c: UNet3DConfig) -> None:
        channels = c.block_out_channels
        self.conv_in = nn.Conv2d(c.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], c.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        output_channels = channels[0]
        for i, block_type in enumerate(c.down_block_types):
            input_channels, output_channels = output_channels, channels[i]
            self.down_blocks.append(
                DownBlock(
                    input_channels,
                    output_channels,
                    config=c,
                    has_attention=block_type == CROSS_ATTN_DOWN,
                    add_downsample=i < len(channels) - 1,
                    has_motion=c.has_motion_module(i, up=False),
                )
            )

        # Registered before mid_block so that state_dict() lists keys in the official file's order.
        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(channels))
        output_channels = reversed_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_output_channels, output_channels = output_channels, reversed_channels[i]
            input_channels = reversed_channels[min(i + 1, len(channels) - 1)]
            self.up_blocks.append(
                UpBlock(
                    input_channels,
                    output_channels,
                    prev_output_channels=prev_output_channels,
                    config=c,
                    has_attention=block_type == CROSS_ATTN_UP,
                    add_upsample=i < len(channels) - 1,
                    has_motion=c.has_motion_module(i, up=True),
                )
            )
        self.mid_block = MidBlock(channels[-1], c)

        self.conv_norm_out = JointGroupNorm(c.norm_num_groups, channels[0], c.norm_eps, joint=c.joint_frame_norm)
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, kernel_size=3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.conv_in.weight.device

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        audio_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """Predict the noise of a chunk of video latents.

        Args:
            sample: ``(B, in_channels, F, H, W)`` latents (13 channels: noisy 4, mask 1, masked-image 4,
                reference 4), in the model's dtype. H and W need not be multiples of 8.
            timestep: Diffusion timestep(s) in ``[0, 1000)``: a number, a 0-d tensor, or a ``(B,)`` tensor.
            audio_embeds: Whisper features per frame, ``(B, F, S, cross_attention_dim)`` (S = 50, width
                384), or the original pipeline's flattened ``(B * F, S, cross_attention_dim)`` with the
                frame index minor. Frame ``f`` of video ``b`` attends only to its own S tokens. ``None``
                skips the audio layers (the original does the same).

        Returns:
            ``(B, out_channels, F, H, W)`` predicted noise, same dtype as ``sample``, contiguous.

        Raises:
            ValueError: If the shapes of ``sample``, ``timestep`` or ``audio_embeds`` do not fit.

        """
        return self._run(sample, timestep, audio_embeds, deep_features=None, keep_deep_features=False)[0]

    def forward_deepcache(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        audio_embeds: torch.Tensor | None,
        deep_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for DeepCache: the whole U-Net keeping its deep features, or the shallow part reusing them.

        DeepCache (Ma et al., 2023) reuses the slowly changing deep features of the U-Net across denoising steps.
        This is the semantics of the original LatentSync 1.6 (``DeepCacheSDHelper`` of the ``DeepCache`` package
        with ``cache_branch_id=0``, as its ``scripts/inference.py`` sets it), reimplemented: on a cached step the
        helper replays every down block (the first included), the mid block, every up block but the last, and
        the last up block's layers but its last one, from what they returned at the last full step, so the only
        layers that compute are ``conv_in``, the last layer (ResNet, transformer, motion module) of the last up
        block and the output head, and the deep input of that last layer is the one of the last full step.

        Args:
            sample: As in :meth:`forward`.
            timestep: As in :meth:`forward`.
            audio_embeds: As in :meth:`forward`.
            deep_features: ``None``: run the whole U-Net (a full step). Otherwise the features a full step of
                the same batch returned: ``(B * F, block_out_channels[0], H, W)`` in the model's dtype; only the
                shallow part runs (a cached step).

        Returns:
            ``(noise, deep_features)``: the predicted noise as :meth:`forward` returns it, and the input of the
            last up block's last layer before its skip is concatenated: computed on a full step, the given
            tensor itself on a cached step.

        Raises:
            ValueError: If the shapes do not fit (as :meth:`forward`), or ``deep_features`` is not
                ``(B * F, block_out_channels[0], H, W)``.

        """
        return self._run(sample, timestep, audio_embeds, deep_features=deep_features, keep_deep_features=True)

    def _run(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        audio_embeds: torch.Tensor | None,
        *,
        deep_features: torch.Tensor | None,
        keep_deep_features: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` (``keep_deep_features`` False) and :meth:`forward_deepcache`."""
        if sample.dim() != 5 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must be (B, {self.config.in_channels}, F, H, W), got {tuple(sample.shape)}")
        batch, _, num_frames, height, width = sample.shape
        audio = self._flatten_audio(audio_embeds, batch, num_frames)
        temb = self.time_embedding(self._timestep_features(timestep, batch, sample.device).to(self.dtype))

        # (B, C, F, H, W) -> (B * F, C, H, W), in the memory format of the convolution weights.
        if self.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            x = (
                sample.permute(0, 2, 3, 4, 1)
                .reshape(batch * num_frames, height, width, -1)
                .permute(0, 3, 1, 2)
                .contiguous(memory_format=torch.channels_last)  # a no-op unless reshape kept a strided view
            )
        else:
            x = sample.transpose(1, 2).reshape(batch * num_frames, -1, height, width).contiguous()

        x = self.conv_in(x)
        last = self.up_blocks[-1]
        last_layer = len(last.resnets) - 1
        if deep_features is not None:  # cached step: conv_in, the last layer, the head
            expected = (batch * num_frames, self.config.block_out_channels[0], height, width)
            if tuple(deep_features.shape) != expected:
                raise ValueError(f"deep_features must be {expected}, got {tuple(deep_features.shape)}")
            # The last up block's last skip is conv_in's output (the first skip the down path makes).
            x = last.layer(last_layer, deep_features, x, temb, audio, num_frames)
        else:
            skips: tuple[torch.Tensor, ...] = (x,)
            for down_block in self.down_blocks:
                x, block_skips = down_block(x, temb, audio, num_frames)
                skips += block_skips

            x = self.mid_block(x, temb, audio, num_frames)

            factor = 2 ** (len(self.up_blocks) - 1)
            force_size = height % factor != 0 or width % factor != 0
            for up_block in self.up_blocks[:-1]:
                n = len(up_block.resnets)
                block_skips, skips = skips[-n:], skips[:-n]
                upsample_size = tuple(skips[-1].shape[-2:]) if force_size else None
                x = up_block(x, block_skips, temb, audio, num_frames, upsample_size)
            # The last up block (it has no upsampler), layer by layer: the input of its last layer is what
            # DeepCache keeps.
            for i in range(last_layer):
                x = last.layer(i, x, skips[-1 - i], temb, audio, num_frames)
            deep_features = x if keep_deep_features else None
            x = last.layer(last_layer, x, skips[-1 - last_layer], temb, audio, num_frames)

        x = self.conv_out(torch.nn.functional.silu(self.conv_norm_out(x, num_frames)))
        return x.reshape(batch, num_frames, -1, height, width).transpose(1, 2).contiguous(), deep_features

    def _flatten_audio(self, audio_embeds: torch.Tensor | None, batch: int, num_frames: int) -> torch.Tensor | None:
        if audio_embeds is None:
            return None
        width = self.config.cross_attention_dim
        if audio_embeds.dim() == 4 and audio_embeds.shape[:2] == (batch, num_frames):
            audio_embeds = audio_embeds.flatten(0, 1)
        if audio_embeds.dim() != 3 or audio_embeds.shape[0] != batch * num_frames or audio_embeds.shape[2] != width:
            raise ValueError(
                f"audio_embeds must be ({batch}, {num_frames}, S, {width}) or "
                f"({batch * num_frames}, S, {width}), got {tuple(audio_embeds.shape)}"
            )
        return audio_embeds.to(self.dtype)

    def _timestep_features(
        self, timestep: torch.Tensor | int | float, batch: int, device: torch.device
    ) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(device)
        if timestep.dim() != 1 or timestep.shape[0] not in (1, batch):
            raise ValueError(f"timestep must be a number, a 0-d tensor or ({batch},), got {tuple(timestep.shape)}")
        return self.time_proj(timestep.to(device).expand(batch))
