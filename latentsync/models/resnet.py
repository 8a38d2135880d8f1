"""Convolutional pieces of the LatentSync 1.0 U-Net, working on frame-flattened video tensors.

Every module here takes activations of shape ``(batch * frames, channels, height, width)`` (frame index
minor), so the 2-D convolutions run on all frames at once without any layout change. Only the ResNet
GroupNorm needs to know ``frames``: LatentSync 1.0 normalises over all frames of a chunk jointly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class JointGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics span all frames of a video, as LatentSync 1.0's ResNet norms do.

    The original model applies ``torch.nn.GroupNorm`` to the 5-D tensor ``(B, C, F, H, W)``, so the mean
    and variance of each group are taken over ``(C / groups, F, H, W)``. This module computes exactly that
    on the frame-flattened layout ``(B * F, C, H, W)`` without moving data, for both contiguous and
    channels-last tensors. Statistics and the affine transform are computed in float32 and the result is
    cast back to the input dtype (as PyTorch's native GroupNorm does for float16/bfloat16). A channels-last
    tensor on the CPU goes through PyTorch's fused GroupNorm kernel on a 5-D channels_last_3d view (same
    statistics, one pass); elsewhere the statistics are computed with ``var_mean``, which ``torch.compile``
    fuses on the GPU.

    With ``joint=False`` it is a plain per-frame GroupNorm. That variant does NOT match LatentSync 1.0; it
    exists for experiments and for tests that isolate the per-frame parts of the network.

    Args:
        num_groups: Number of channel groups.
        num_channels: Channels ``C``; must be divisible by ``num_groups``.
        eps: Added to the variance (1e-5 in second_stage.yaml).
        joint: Normalise over all frames (True, LatentSync 1.0) or per frame (False).

    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, joint: bool = True) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.joint = joint

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        """Normalise ``x``.

        Args:
            x: ``(B * F, C, H, W)`` activations, frame index minor.
            num_frames: ``F``, the number of frames per video; must divide ``x.shape[0]``.

        Returns:
            Tensor of the same shape, dtype and memory layout as ``x``.

        Raises:
            ValueError: If ``num_frames`` does not divide the batch dimension.

        """
        if not self.joint or num_frames == 1:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        n, c, h, w = x.shape
        if n % num_frames:
            raise ValueError(f"batch*frames dimension {n} is not a multiple of num_frames={num_frames}")
        if x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last):
            # Channels-last (B * F, C, H, W) memory is (B, F, H, W, C): viewed as (B, C, F, H, W) it is exactly
            # channels_last_3d, which the CPU GroupNorm kernel normalises in place of layout, in one fused pass
            # (no float32 copy, no separate mean/var/affine passes). CUDA's kernel would copy to contiguous.
            video = x.unflatten(0, (n // num_frames, num_frames)).transpose(1, 2)
            out = F.group_norm(video, self.num_groups, self.weight, self.bias, self.eps)
            return out.transpose(1, 2).flatten(0, 1)
        # (B, F, G, C/G, H, W): a view for contiguous and channels-last memory alike.
        grouped = x.unflatten(0, (n // num_frames, num_frames)).unflatten(2, (self.num_groups, -1))
        grouped = grouped.float()
        var, mean = torch.var_mean(grouped, dim=(1, 3, 4, 5), keepdim=True, correction=0)
        normed = ((grouped - mean) * torch.rsqrt(var + self.eps)).flatten(2, 3).flatten(0, 1)
        out = normed * self.weight.float().view(1, c, 1, 1) + self.bias.float().view(1, c, 1, 1)
        return out.to(x.dtype)


class ResnetBlock(nn.Module):
    """Pre-activation ResNet block with a timestep bias (LatentSync 1.0 / SD 1.5 layout).

    ``out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale``.
    Both norms are :class:`JointGroupNorm`; dropout is 0 at inference and therefore omitted.

    Args:
        in_channels: Input channels.
        out_channels: Output channels; a 1x1 ``conv_shortcut`` is created when they differ.
        temb_channels: Width of the timestep embedding (``4 * block_out_channels[0]``, 1280).
        groups: GroupNorm groups (32).
        eps: GroupNorm epsilon (1e-5).
        output_scale_factor: Divisor of the sum (1.0 everywhere in LatentSync 1.0).
        joint_norm: See :class:`JointGroupNorm`.

    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
        joint_norm: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = JointGroupNorm(groups, in_channels, eps, joint=joint_norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = JointGroupNorm(groups, out_channels, eps, joint=joint_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``(B * F, in_channels, H, W)``.
            temb: ``(B, temb_channels)`` timestep embedding, shared by the F frames of a video.
            num_frames: ``F``.

        Returns:
            ``(B * F, out_channels, H, W)``.

        """
        h = self.conv1(F.silu(self.norm1(x, num_frames)))
        t = self.time_emb_proj(F.silu(temb)).to(h.dtype)
        h = (h.unflatten(0, (-1, num_frames)) + t[:, None, :, None, None]).flatten(0, 1)
        h = self.conv2(F.silu(self.norm2(h, num_frames)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample(nn.Module):
    """Stride-2 3x3 convolution applied to every frame.

    Args:
        channels: Input and output channels.
        padding: Convolution padding (``downsample_padding``, 1).

    """

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, ceil(H / 2), ceil(W / 2))`` (with padding 1)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution, per frame.

    Args:
        channels: Input and output channels.

    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Upsample ``(N, C, H, W)``.

        Args:
            x: Activations.
            output_size: ``(H_out, W_out)`` to force (used when the latent size is not a multiple of the
                U-Net's total downsampling factor); ``None`` doubles H and W.

        Returns:
            ``(N, C, H_out, W_out)``.

        """
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)
