"""Attention pieces of the LatentSync U-Net: per-frame self-attention and audio cross-attention.

Module and parameter names follow the official checkpoints (``attn1.to_q``, ``ff.net.0.proj``, ...). The audio
cross-attention is ``audio_cross_attn.{norm, attn}`` in LatentSync 1.0 and ``norm2`` / ``attn2`` in 1.5 and 1.6
(same layers, renamed at the 1.5 release; :data:`AUDIO_LAYER_NAMES`). Nothing here mixes frames: every frame
is one attention batch element (the temporal layers of 1.5 / 1.6 are in :mod:`latentsync.models.motion_module`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

#: Checkpoint names of the audio cross-attention: ``"audio_cross_attn"`` (LatentSync 1.0:
#: ``audio_cross_attn.norm``, ``audio_cross_attn.attn``) or ``"attn2"`` (1.5 / 1.6: ``norm2``, ``attn2``).
AUDIO_LAYER_NAMES = ("audio_cross_attn", "attn2")


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections, computed with ``scaled_dot_product_attention``.

    Scale is ``1 / sqrt(head_dim)``, no mask, no dropout (inference layout of diffusers' ``CrossAttention``
    as used by LatentSync 1.0).

    Args:
        query_dim: Channels ``C`` of the queries (and of the output).
        heads: Number of heads; ``query_dim`` must be divisible by it (8 in LatentSync 1.0).
        context_dim: Channels of keys/values; ``None`` for self-attention (384 for Whisper audio).

    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if query_dim % heads:
            raise ValueError(f"query_dim {query_dim} is not divisible by heads {heads}")
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        # Index 1 is a (parameter-free) dropout slot in the checkpoint layout.
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``x`` to ``context`` (or to itself).

        Args:
            x: ``(N, L, C)`` query tokens.
            context: ``(N, S, context_dim)`` key/value tokens, or ``None`` for self-attention.

        Returns:
            ``(N, L, C)``.

        """
        context = x if context is None else context
        n, length, channels = x.shape
        q = self.to_q(x).view(n, length, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(n, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(n, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(n, length, channels)
        return self.to_out[1](self.to_out[0](out))


class AudioCrossAttention(nn.Module):
    """Pre-norm residual cross-attention from a frame's tokens to that frame's audio tokens.

    ``x + attn(norm(x), audio)``.

    Args:
        dim: Token channels.
        heads: Attention heads.
        audio_dim: Audio feature width (384 for Whisper tiny).

    """

    def __init__(self, dim: int, heads: int, audio_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, context_dim=audio_dim)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Apply the residual cross-attention.

        Args:
            x: ``(B * F, L, dim)`` tokens of each frame.
            audio: ``(B * F, S, audio_dim)`` audio tokens of the same frame (S = 50 in LatentSync 1.0).

        Returns:
            ``(B * F, L, dim)``.

        """
        return self.attn(self.norm(x), audio) + x


class TransformerBlock(nn.Module):
    """Self-attention, audio cross-attention and GEGLU feed-forward, each pre-norm and residual.

    Args:
        dim: Token channels.
        heads: Attention heads.
        audio_dim: Audio feature width.
        audio_layer_names: One of :data:`AUDIO_LAYER_NAMES`: how the checkpoint names the audio layer.

    Raises:
        ValueError: For another ``audio_layer_names``.

    """

    def __init__(self, dim: int, heads: int, audio_dim: int, audio_layer_names: str = "audio_cross_attn") -> None:
        super().__init__()
        if audio_layer_names not in AUDIO_LAYER_NAMES:
            raise ValueError(f"audio_layer_names must be one of {AUDIO_LAYER_NAMES}, got {audio_layer_names!r}")
        self.attn1 = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.audio_cross_attn: AudioCrossAttention | None = None
        self.norm2: nn.LayerNorm | None = None
        self.attn2: Attention | None = None
        if audio_layer_names == "audio_cross_attn":
            self.audio_cross_attn = AudioCrossAttention(dim, heads, audio_dim)
        else:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, context_dim=audio_dim)
        # GEGLU: net.0.proj maps dim -> 2 * 4 * dim, net.2 maps 4 * dim -> dim.
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``(B * F, L, dim)`` tokens.
            audio: ``(B * F, S, audio_dim)``, or ``None`` to skip the audio layer (as the original does).

        Returns:
            ``(B * F, L, dim)``.

        """
        x = self.attn1(self.norm1(x)) + x
        if audio is not None:
            if self.audio_cross_attn is not None:
                x = self.audio_cross_attn(x, audio)
            elif self.attn2 is not None and self.norm2 is not None:
                x = self.attn2(self.norm2(x), audio) + x
        return self.ff(self.norm3(x)) + x


class FrameTransformer(nn.Module):
    """Spatial transformer applied to each frame independently (``attentions.N`` in the checkpoint).

    ``x + proj_out(blocks(proj_in(norm(x))))`` where ``norm`` is a per-frame GroupNorm (eps 1e-6) and
    ``proj_in``/``proj_out`` are 1x1 convolutions.

    Args:
        channels: Channels of the feature map (also the token width).
        heads: Attention heads (8).
        audio_dim: Audio feature width (384).
        groups: GroupNorm groups (32).
        eps: GroupNorm epsilon (1e-6 in LatentSync 1.0).
        num_layers: Transformer blocks (1).
        audio_layer_names: Checkpoint names of the audio layer (:data:`AUDIO_LAYER_NAMES`).

    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        audio_dim: int,
        groups: int,
        eps: float = 1e-6,
        num_layers: int = 1,
        audio_layer_names: str = "audio_cross_attn",
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, audio_dim, audio_layer_names) for _ in range(num_layers)]
        )
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """Apply the transformer.

        Args:
            x: ``(B * F, C, H, W)``, contiguous or channels-last (which makes the token reshapes free).
            audio: ``(B * F, S, audio_dim)`` or ``None``.

        Returns:
            ``(B * F, C, H, W)`` in the memory format of ``x``.

        """
        n, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(n, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, audio)
        # The token view is channels-last. Give the output the input's layout (the model's, set by conv_in):
        # a 3x3 conv fed activations in another layout than its weights converts the weights on every call.
        # (1x1 conv weights are both contiguous and channels-last, so they cannot tell the layout.)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        spatial = tokens.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
        return self.proj_out(spatial) + x
