"""Temporal layers ("motion modules") of the LatentSync 1.5 / 1.6 U-Net: attention across the frames of a chunk.

LatentSync 1.5 and 1.6 put one motion module after every ResNet (and after its spatial transformer, where the
level has one) of every down and up block; the mid block has none (``docs/latentsync.md``, section
"Versions"). A motion module is a residual transformer whose tokens are the F values of one spatial position
across the chunk's frames:

    x + proj_out(blocks(proj_in(norm(x))))    norm: per-frame GroupNorm (32 groups, eps 1e-6),
                                              proj_in / proj_out: linear C -> C (proj_out zero-initialised)
    block: for each of its 2 attentions: t = attn(norm_i(t) + pe[:F]) + t   (temporal self-attention)
           then t = ff(ff_norm(t)) + t                                       (GEGLU, 4x)

``pe`` is a fixed sinusoidal position encoding over the frame index (``max_len`` 24 rows, stored in the
checkpoint as the buffer ``pos_encoder.pe`` of shape ``(1, 24, C)``); it is added to the normalised tokens
that feed q, k and v, not to the residual. Attention has 8 heads of ``C / 8`` dims, no q/k/v bias, no mask:
every frame attends to every frame of the chunk, so a frame's output depends on the others through these
layers (in addition to the ResNets' joint GroupNorms).

Module and parameter names follow the official checkpoints:
``motion_modules.N.temporal_transformer.{norm, proj_in, transformer_blocks.0.{attention_blocks.K, norms.K,
ff, ff_norm}, proj_out}``. The original's default ``zero_initialize`` zeroes ``proj_out`` at construction, so
a freshly built module is the identity until weights are loaded.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from latentsync.models.attention import Attention


def sinusoidal_position_table(max_len: int, dim: int) -> torch.Tensor:
    """Return the fixed temporal position encoding, ``(1, max_len, dim) float32``.

    Row ``p``, column ``2i`` is ``sin(p / 10000^(2i/dim))`` and column ``2i + 1`` the cosine of the same angle
    (the Transformer encoding of Vaswani et al.).

    Args:
        max_len: Rows (frames the encoding covers; 24 in LatentSync 1.5 / 1.6).
        dim: Channels (even).

    Returns:
        The table.

    Raises:
        ValueError: If ``dim`` is odd or either size is not positive.

    """
    if max_len <= 0 or dim <= 0 or dim % 2:
        raise ValueError(f"need max_len > 0 and an even dim > 0, got max_len {max_len}, dim {dim}")
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, max_len, dim)
    table[0, :, 0::2] = torch.sin(position * frequency)
    table[0, :, 1::2] = torch.cos(position * frequency)
    return table


class PositionEncoding(nn.Module):
    """Adds the fixed position table to frame-major tokens (``pos_encoder`` in the checkpoint).

    Args:
        dim: Token channels.
        max_len: Longest chunk in frames (24).

    """

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoidal_position_table(max_len, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, F, dim)`` -> ``tokens + pe[:, :F]``.

        Raises:
            ValueError: If F exceeds ``max_len``.

        """
        frames = tokens.shape[1]
        pe: torch.Tensor = self.pe
        if frames > pe.shape[1]:
            raise ValueError(f"{frames} frames exceed the temporal position encoding's {pe.shape[1]}")
        return tokens + pe[:, :frames].to(tokens.dtype)


class TemporalAttention(Attention):
    """Self-attention across frames with the position encoding added to its input (``attention_blocks.K``).

    Args:
        dim: Token channels.
        heads: Attention heads (8).
        max_len: Rows of the position encoding, or ``None`` for no encoding.

    """

    def __init__(self, dim: int, heads: int, max_len: int | None) -> None:
        super().__init__(dim, heads)
        self.pos_encoder = PositionEncoding(dim, max_len) if max_len is not None else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, F, dim)`` tokens (one sequence per spatial position) -> same shape. ``context`` is unused."""
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        return super().forward(x)


class TemporalTransformerBlock(nn.Module):
    """``attentions`` pre-norm residual temporal self-attentions, then a pre-norm residual GEGLU feed-forward.

    Args:
        dim: Token channels.
        heads: Attention heads.
        attentions: Temporal self-attentions in the block (2 in LatentSync 1.5 / 1.6).
        max_len: Rows of the position encoding, or ``None``.

    """

    def __init__(self, dim: int, *, heads: int, attentions: int, max_len: int | None) -> None:
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len) for _ in range(attentions)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(attentions)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, F, dim)`` -> same shape."""
        for attention, norm in zip(self.attention_blocks, self.norms, strict=True):
            tokens = attention(norm(tokens)) + tokens
        return self.ff(self.ff_norm(tokens)) + tokens


class TemporalTransformer(nn.Module):
    """Residual temporal transformer over a frame-flattened feature map (``temporal_transformer``).

    Args:
        channels: Channels ``C`` of the feature map (also the token width).
        heads: Attention heads (8).
        groups: Groups of the entry GroupNorm (32 in the original, whatever the U-Net's own groups).
        num_layers: Transformer blocks (1).
        attentions: Temporal self-attentions per block (2).
        max_len: Rows of the position encoding (24), or ``None`` for none.
        zero_initialize: Zero ``proj_out`` at construction, as the original does.

    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        groups: int,
        num_layers: int,
        attentions: int,
        max_len: int | None,
        zero_initialize: bool = True,
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [
                TemporalTransformerBlock(channels, heads=heads, attentions=attentions, max_len=max_len)
                for _ in range(num_layers)
            ]
        )
        self.proj_out = nn.Linear(channels, channels)
        if zero_initialize:
            with torch.no_grad():
                self.proj_out.weight.zero_()
                self.proj_out.bias.zero_()

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Mix each spatial position across the frames of its video.

        Args:
            x: ``(B * F, C, H, W)``, frame index minor (contiguous or channels-last).
            num_frames: ``F``.

        Returns:
            ``(B * F, C, H, W)`` in the memory format of ``x``.

        """
        n, c, h, w = x.shape
        batch = n // num_frames
        # (B*F, C, H, W) -> (B, H, W, F, C) -> (B*H*W, F, C): one sequence of F frames per position.
        tokens = self.norm(x).view(batch, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(-1, num_frames, c)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = self.proj_out(tokens)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        out = tokens.view(batch, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(n, c, h, w)
        return out.contiguous(memory_format=memory_format) + x


class MotionModule(nn.Module):
    """One motion module (``motion_modules.N`` in the checkpoint): a :class:`TemporalTransformer`.

    Args:
        channels: Channels of the feature map.
        heads: Attention heads (8).
        groups: Groups of the entry GroupNorm (32).
        num_layers: Transformer blocks (1).
        attentions: Temporal self-attentions per block (2).
        max_len: Rows of the position encoding (24), or ``None``.
        zero_initialize: Zero ``proj_out`` at construction.

    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        groups: int,
        num_layers: int,
        attentions: int,
        max_len: int | None,
        zero_initialize: bool = True,
    ) -> None:
        super().__init__()
        self.temporal_transformer = TemporalTransformer(
            channels,
            heads=heads,
            groups=groups,
            num_layers=num_layers,
            attentions=attentions,
            max_len=max_len,
            zero_initialize=zero_initialize,
        )

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``(B * F, C, H, W)`` -> same shape (see :meth:`TemporalTransformer.forward`)."""
        return self.temporal_transformer(x, num_frames)
