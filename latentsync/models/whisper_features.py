"""Whisper-tiny audio features for LatentSync 1.0, computed as the original does, window by window.

Pipeline (facts from ``docs/latentsync.md``; constants are OpenAI Whisper's):

1. 16 kHz mono float audio -> log-mel spectrogram of the whole clip: STFT (n_fft 400, hop 160, Hann,
   centred), power, 80 mel filters (``librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)``, the
   matrix Whisper ships), ``log10(max(x, 1e-10))``, floored at the clip's maximum minus 8, then
   ``(x + 4) / 4``. The last STFT frame is dropped, so there are ``num_samples // 160`` mel frames
   (100 per second).
2. The mel is cut into 30 s windows of 3000 frames; each is zero-padded to 3000 and encoded. Kept per
   window: the input embedding after the positional embedding plus the output of each of the 4 residual
   blocks, before ``ln_post`` -> ``(1500, 5, 384)``, of which the first ``(end - start) // 2`` positions
   (those covering real audio) are kept. Windows are concatenated -> ``(T50, 5, 384)``, 50 per second.
3. Video frame ``i`` at 25 fps takes positions ``2i - 4 .. 2i + 5`` clamped to ``[0, T50 - 1]`` ->
   ``(10, 5, 384)`` -> ``(50, 384)`` (position-major, layer-minor).

The log-mel floor depends on the whole clip's maximum, so the (cheap) mel is computed for the whole clip;
the (costly) encoder runs lazily, only on the windows that the requested frames need
(:class:`AudioFeatures`). The encoder's parameter names equal openai-whisper's ``encoder.*`` names, so
the official ``tiny.pt`` loads directly; the text decoder in that file is ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE_HZ = 16_000
"""Audio sample rate the features are defined at (Whisper)."""
N_FFT = 400
"""STFT size in samples (25 ms at 16 kHz, Whisper)."""
HOP_LENGTH = 160
"""STFT hop in samples (10 ms: 100 mel frames per second, Whisper)."""
N_MELS = 80
"""Mel bands of Whisper tiny."""
WINDOW_MEL_FRAMES = 3000
"""Mel frames per encoder window (30 s, Whisper's ``N_FRAMES``)."""
POSITIONS_PER_WINDOW = WINDOW_MEL_FRAMES // 2
"""Encoder positions per window (the stride-2 conv halves the mel rate: 50 per second)."""
POSITIONS_PER_SECOND = SAMPLE_RATE_HZ // HOP_LENGTH // 2
"""Encoder positions per second of audio (50)."""
VIDEO_FPS = 25
"""Video frame rate LatentSync 1.0 was trained at."""
POSITIONS_BEFORE = 4
"""Positions taken before a frame's centre (LatentSync 1.0: ``audio_feat_length[0] * 2``)."""
POSITIONS_AFTER = 5
"""Positions taken after a frame's centre (``(audio_feat_length[1] + 1) * 2 - 1``)."""
POSITIONS_PER_FRAME = POSITIONS_BEFORE + 1 + POSITIONS_AFTER
"""Positions per video frame (10)."""


#: The ``"dims"`` entry of OpenAI's ``tiny.pt`` (text-decoder fields included; the encoder ignores them).
#: Source: the openai-whisper model card / checkpoint format; read-only.
WHISPER_TINY_DIMS: Mapping[str, int] = MappingProxyType(
    {
        "n_mels": 80,
        "n_vocab": 51865,
        "n_audio_ctx": 1500,
        "n_audio_state": 384,
        "n_audio_head": 6,
        "n_audio_layer": 4,
        "n_text_ctx": 448,
        "n_text_state": 384,
        "n_text_head": 6,
        "n_text_layer": 4,
    }
)


class WhisperCheckpointError(ValueError):
    """A Whisper checkpoint is unreadable or not the expected model (message names the file)."""


@dataclass(frozen=True, kw_only=True)
class WhisperDims:
    """Audio-encoder dimensions from a Whisper checkpoint's ``"dims"`` (tiny: 80, 1500, 384, 6, 4).

    Attributes:
        n_mels: Mel bands.
        n_audio_ctx: Encoder positions per 30 s window.
        n_audio_state: Feature width.
        n_audio_head: Attention heads.
        n_audio_layer: Residual attention blocks.

    """

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4

    @classmethod
    def from_checkpoint_dims(cls, dims: Mapping[str, int]) -> WhisperDims:
        """Pick the audio fields of a checkpoint's ``"dims"`` dict (text-decoder fields are ignored).

        Args:
            dims: The ``"dims"`` entry of an OpenAI Whisper checkpoint.

        Returns:
            The audio dimensions.

        Raises:
            KeyError: If an audio field is missing.

        """
        return cls(**{name: int(dims[name]) for name in cls.__dataclass_fields__})


def mel_filterbank(n_mels: int = N_MELS) -> torch.Tensor:
    """Mel filter matrix used by Whisper.

    Args:
        n_mels: Number of mel bands.

    Returns:
        float32 tensor ``(n_mels, N_FFT // 2 + 1)`` = ``librosa.filters.mel(sr=16000, n_fft=400, n_mels)``
        (Slaney scale and normalisation, the matrix saved in Whisper's ``mel_filters.npz``).

    """
    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE_HZ, n_fft=N_FFT, n_mels=n_mels)).float()


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    *,
    n_mels: int = N_MELS,
    filters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute Whisper's normalised log-mel spectrogram of a whole clip.

    Args:
        audio: 1-D waveform at 16 kHz, float in [-1, 1] (numpy or torch, any float dtype).
        n_mels: Mel bands (80 for tiny).
        filters: Precomputed :func:`mel_filterbank` (saves recomputing it per call).

    Returns:
        float32 tensor ``(n_mels, num_samples // 160)`` on the audio's device (CPU for numpy).

    Raises:
        ValueError: If ``audio`` is not 1-D or is shorter than ``N_FFT // 2 + 1`` samples (the centred STFT
            reflects that many samples at each end).

    """
    waveform = torch.as_tensor(audio).float()
    if waveform.dim() != 1:
        raise ValueError(f"audio must be a 1-D mono waveform, got shape {tuple(waveform.shape)}")
    if waveform.numel() <= N_FFT // 2:
        raise ValueError(f"audio too short: {waveform.numel()} samples, need at least {N_FFT // 2 + 1}")
    window = torch.hann_window(N_FFT, device=waveform.device)
    stft = torch.stft(waveform, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[:, :-1].abs() ** 2
    filters = mel_filterbank(n_mels) if filters is None else filters
    mel = filters.to(power.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def window_spans(num_mel_frames: int) -> list[tuple[int, int]]:
    """Mel-frame span ``[start, end)`` of each 30 s encoder window.

    Args:
        num_mel_frames: Mel frames of the clip.

    Returns:
        One ``(start, end)`` per window; all but the last span 3000 frames.

    """
    return [
        (start, min(start + WINDOW_MEL_FRAMES, num_mel_frames)) for start in range(0, num_mel_frames, WINDOW_MEL_FRAMES)
    ]


def kept_positions(span: tuple[int, int]) -> int:
    """Count the encoder positions kept from a window: those covering real audio, ``(end - start) // 2``."""
    return (span[1] - span[0]) // 2


def num_positions(num_mel_frames: int) -> int:
    """Total encoder positions ``T50`` of a clip (sum of :func:`kept_positions` over its windows)."""
    return sum(kept_positions(span) for span in window_spans(num_mel_frames))


def frame_positions(frame_index: int, total_positions: int, fps: float = VIDEO_FPS) -> list[int]:
    """List the encoder positions that feed video frame ``frame_index`` (LatentSync 1.0's slicing).

    Centre ``c = int(frame_index * 50 / fps)`` (``2 * frame_index`` at 25 fps); positions ``c - 4`` to
    ``c + 5`` inclusive, each clamped to ``[0, total_positions - 1]``.

    Args:
        frame_index: Video frame index (>= 0; frames past the audio's end clamp to its last position).
        total_positions: ``T50`` of the clip (>= 1).
        fps: Video frame rate.

    Returns:
        10 position indices, in order.

    Raises:
        ValueError: If ``total_positions < 1`` or ``frame_index < 0``.

    """
    if total_positions < 1 or frame_index < 0:
        raise ValueError(f"need total_positions >= 1 and frame_index >= 0, got {total_positions}, {frame_index}")
    centre = int(frame_index * POSITIONS_PER_SECOND / fps)
    return [min(max(p, 0), total_positions - 1) for p in range(centre - POSITIONS_BEFORE, centre + POSITIONS_AFTER + 1)]


def window_of_position(position: int) -> int:
    """Index of the 30 s window that holds encoder position ``position`` (``position // 1500``).

    Every window but the last keeps all 1500 positions, so positions map to windows by division.
    """
    return position // POSITIONS_PER_WINDOW


def windows_for_frames(frame_start: int, frame_stop: int, total_positions: int, fps: float = VIDEO_FPS) -> list[int]:
    """Windows that must be encoded to get the features of frames ``[frame_start, frame_stop)``.

    Args:
        frame_start: First video frame.
        frame_stop: One past the last video frame (> ``frame_start``).
        total_positions: ``T50`` of the clip.
        fps: Video frame rate.

    Returns:
        Sorted window indices.

    """
    first = frame_positions(frame_start, total_positions, fps)[0]
    last = frame_positions(frame_stop - 1, total_positions, fps)[-1]
    return list(range(window_of_position(first), window_of_position(last) + 1))


def slice_frame_features(
    features: torch.Tensor, frame_start: int, frame_stop: int, fps: float = VIDEO_FPS
) -> torch.Tensor:
    """Per-frame U-Net audio inputs from a clip's encoder features.

    Args:
        features: ``(T50, L, D)`` encoder features of the whole clip (L = 5 layers, D = 384 for tiny).
        frame_start: First video frame.
        frame_stop: One past the last video frame.
        fps: Video frame rate.

    Returns:
        ``(frame_stop - frame_start, 10 * L, D)``, i.e. ``(F, 50, 384)``, same dtype/device as
        ``features``; row ``f`` is ``features[positions(f)]`` flattened position-major.

    Raises:
        ValueError: If the frame range is empty or ``features`` is empty.

    """
    if frame_stop <= frame_start:
        raise ValueError(f"empty frame range [{frame_start}, {frame_stop})")
    index = torch.tensor(
        [frame_positions(i, features.shape[0], fps) for i in range(frame_start, frame_stop)],
        device=features.device,
    )
    return features[index].flatten(1, 2)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (as openai-whisper does for half precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


class _MultiHeadAttention(nn.Module):
    """Whisper self-attention (``query``/``key``/``value``/``out``; ``key`` has no bias)."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, channels = x.shape
        q, k, v = (
            proj(x).view(n, length, self.n_head, -1).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as Whisper's d^-0.25 twice
        return self.out(out.transpose(1, 2).reshape(n, length, channels))


class _ResidualAttentionBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(attn_ln(x))``, then ``x + mlp(mlp_ln(x))`` (GELU MLP, 4x)."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = _MultiHeadAttention(n_state, n_head)
        self.attn_ln = _LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = _LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


def _sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """Whisper's fixed positional embedding ``(length, channels)``: ``[sin, cos]`` halves."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class WhisperAudioEncoder(nn.Module):
    """Whisper audio encoder returning every intermediate embedding (no final LayerNorm).

    Parameter names equal openai-whisper's encoder without the ``encoder.`` prefix (``conv1.weight``,
    ``blocks.0.attn.query.weight``, ``positional_embedding``...). ``ln_post`` exists only so that the
    official weights load strictly; LatentSync's features are taken before it.

    Args:
        dims: Encoder dimensions (tiny by default).

    """

    def __init__(self, dims: WhisperDims | None = None) -> None:
        super().__init__()
        self.dims = dims = WhisperDims() if dims is None else dims
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_audio_state, dims.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", _sinusoids(dims.n_audio_ctx, dims.n_audio_state))
        self.blocks = nn.ModuleList(
            [_ResidualAttentionBlock(dims.n_audio_state, dims.n_audio_head) for _ in range(dims.n_audio_layer)]
        )
        self.ln_post = _LayerNorm(dims.n_audio_state)

    @property
    def num_embeddings(self) -> int:
        """Embeddings kept per position: input embedding + one per block (5 for tiny)."""
        return self.dims.n_audio_layer + 1

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Encode padded 30 s mel windows.

        Args:
            mel: ``(B, n_mels, 3000)`` normalised log-mel windows (any float dtype; cast to the model's).

        Returns:
            ``(B, 1500, n_audio_layer + 1, n_audio_state)``: the input embedding after the positional
            embedding, then each block's output, all before ``ln_post``.

        Raises:
            ValueError: If ``mel`` is not ``(B, n_mels, 2 * n_audio_ctx)``.

        """
        expected = (self.dims.n_mels, 2 * self.dims.n_audio_ctx)
        if mel.dim() != 3 or tuple(mel.shape[1:]) != expected:
            raise ValueError(f"mel must be (B, {expected[0]}, {expected[1]}), got {tuple(mel.shape)}")
        x = mel.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = (x.permute(0, 2, 1) + self.positional_embedding).to(x.dtype)
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return torch.stack(hidden, dim=2)


def load_whisper_encoder(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WhisperAudioEncoder:
    """Load the audio encoder of an OpenAI Whisper checkpoint (``tiny.pt``).

    Args:
        path: File holding ``{"dims": {...}, "model_state_dict": {...}}`` (openai-whisper's format).
        device: Target device.
        dtype: Target dtype (float32 reproduces the original on CPU; float16 is what it used on GPU).

    Returns:
        The encoder, in eval mode without gradients.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        WhisperCheckpointError: If the file is unreadable, lacks ``dims``/``model_state_dict``, has
            dimensions other than 80 mels / 1500 positions, or encoder tensors are missing or misshaped.

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Whisper checkpoint not found: {path} (put OpenAI's tiny.pt there)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is reported with the file name
        raise WhisperCheckpointError(f"cannot read Whisper checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(checkpoint, Mapping) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise WhisperCheckpointError(f"{path} is not an OpenAI Whisper checkpoint (need 'dims' and 'model_state_dict')")
    try:
        dims = WhisperDims.from_checkpoint_dims(checkpoint["dims"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WhisperCheckpointError(f"{path}: bad 'dims' {checkpoint['dims']!r}: {exc}") from exc
    if dims.n_mels != N_MELS or dims.n_audio_ctx != POSITIONS_PER_WINDOW:
        raise WhisperCheckpointError(
            f"{path}: need n_mels={N_MELS} and n_audio_ctx={POSITIONS_PER_WINDOW}, "
            f"got {dims.n_mels}, {dims.n_audio_ctx}"
        )
    prefix = "encoder."
    state = {k[len(prefix) :]: v for k, v in checkpoint["model_state_dict"].items() if k.startswith(prefix)}
    with torch.device("meta"):
        encoder = WhisperAudioEncoder(dims)
    expected = encoder.state_dict()
    if "positional_embedding" not in state:
        state["positional_embedding"] = _sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    missing = [k for k in expected if k not in state]
    mismatched = [
        f"{prefix}{k}: file {tuple(state[k].shape)} != model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or mismatched:
        raise WhisperCheckpointError(
            f"{path} does not fit the Whisper encoder: missing {[prefix + k for k in missing[:10]]}, "
            f"mismatched {mismatched[:10]}"
        )
    state = {k: state[k].to(device=device, dtype=dtype) for k in expected}
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval().requires_grad_(False)


class AudioFeatures:
    """The features of one audio clip, encoded lazily window by window.

    Built by :meth:`WhisperFeatureExtractor.prepare`. The mel of the whole clip is computed up front (a few
    milliseconds per minute of audio); a 30 s window is run through the encoder the first time a frame
    needs it, and kept. Results equal encoding the whole clip at once.

    Args:
        extractor: The extractor (encoder, device, dtype).
        mel: ``(n_mels, num_mel_frames)`` log-mel of the whole clip.
        fps: Video frame rate the frames are counted at.

    """

    def __init__(self, extractor: WhisperFeatureExtractor, mel: torch.Tensor, fps: float = VIDEO_FPS) -> None:
        self.extractor = extractor
        self.mel = mel
        self.fps = fps
        self.spans = window_spans(mel.shape[-1])
        self.num_positions = sum(kept_positions(span) for span in self.spans)
        self._windows: dict[int, torch.Tensor] = {}

    @property
    def num_windows(self) -> int:
        """Number of 30 s windows in the clip."""
        return len(self.spans)

    @property
    def encoded_windows(self) -> tuple[int, ...]:
        """Indices of the windows encoded so far, sorted."""
        return tuple(sorted(self._windows))

    @property
    def duration_s(self) -> float:
        """Duration covered by the mel frames, in seconds."""
        return self.mel.shape[-1] * HOP_LENGTH / SAMPLE_RATE_HZ

    def window(self, index: int) -> torch.Tensor:
        """Features of one window: ``(kept_positions, L, D)``, encoded on first use.

        Raises:
            IndexError: If ``index`` is not a window of the clip.

        """
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for a clip of {self.num_windows} window(s)")
        if index not in self._windows:
            self._windows[index] = self.extractor.encode_windows(self.mel, [self.spans[index]])[0]
        return self._windows[index]

    def frames(self, frame_start: int, frame_stop: int) -> torch.Tensor:
        """U-Net audio inputs of frames ``[frame_start, frame_stop)``, encoding only the windows needed.

        Args:
            frame_start: First video frame (>= 0).
            frame_stop: One past the last frame; frames past the audio's end repeat its last positions.

        Returns:
            ``(frame_stop - frame_start, 10 * L, D)`` = ``(F, 50, 384)`` in the extractor's dtype/device.

        Raises:
            ValueError: If the frame range is empty or the clip has no encoder position.

        """
        if frame_stop <= frame_start:
            raise ValueError(f"empty frame range [{frame_start}, {frame_stop})")
        if self.num_positions < 1:
            raise ValueError("the clip is too short to have any encoder position (< 20 ms)")
        needed = windows_for_frames(frame_start, frame_stop, self.num_positions, self.fps)
        first = needed[0] * POSITIONS_PER_WINDOW
        local = torch.cat([self.window(i) for i in needed])
        rows = [
            [p - first for p in frame_positions(i, self.num_positions, self.fps)]
            for i in range(frame_start, frame_stop)
        ]
        return local[torch.tensor(rows, device=local.device)].flatten(1, 2)

    def iter_windows(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_position, features (kept_positions, L, D))`` for each window, in order."""
        first = 0
        for index in range(self.num_windows):
            features = self.window(index)
            yield first, features
            first += features.shape[0]

    def all_positions(self) -> torch.Tensor:
        """``(T50, L, D)`` features of the whole clip (encodes every window)."""
        return torch.cat([features for _, features in self.iter_windows()])


class WhisperFeatureExtractor:
    """Turns 16 kHz audio into LatentSync 1.0's per-frame audio features.

    Args:
        encoder: A loaded :class:`WhisperAudioEncoder`.
        batch_windows: How many 30 s windows to encode per forward pass.

    Example:
        >>> extractor = WhisperFeatureExtractor.from_checkpoint("tiny.pt")  # doctest: +SKIP
        >>> clip = extractor.prepare(audio_16k)  # doctest: +SKIP
        >>> clip.frames(0, 16).shape  # doctest: +SKIP
        torch.Size([16, 50, 384])

    """

    def __init__(self, encoder: WhisperAudioEncoder, batch_windows: int = 4) -> None:
        self.encoder = encoder
        self.batch_windows = batch_windows
        self.filters = mel_filterbank(encoder.dims.n_mels)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WhisperFeatureExtractor:
        """Load ``tiny.pt`` (see :func:`load_whisper_encoder`, which lists the errors raised)."""
        return cls(load_whisper_encoder(path, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        """Device of the encoder."""
        return self.encoder.conv1.weight.device

    def log_mel(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        """:func:`log_mel_spectrogram` of a whole 16 kHz clip, ``(80, num_samples // 160)`` float32 on CPU."""
        return log_mel_spectrogram(torch.as_tensor(audio).cpu(), n_mels=self.encoder.dims.n_mels, filters=self.filters)

    @torch.inference_mode()
    def encode_windows(self, mel: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Encode mel windows and keep their real-audio positions.

        Args:
            mel: ``(n_mels, num_mel_frames)`` log-mel of the whole clip.
            spans: ``(start, end)`` mel-frame spans, each at most 3000 frames long.

        Returns:
            One ``(kept_positions(span), L, D)`` tensor per span, on the encoder's device and dtype.

        """
        results: list[torch.Tensor] = []
        for i in range(0, len(spans), self.batch_windows):
            batch = spans[i : i + self.batch_windows]
            windows = torch.stack(
                [F.pad(mel[:, start:end], (0, WINDOW_MEL_FRAMES - (end - start))) for start, end in batch]
            )
            encoded = self.encoder(windows.to(self.device))
            results.extend(encoded[j, : kept_positions(span)] for j, span in enumerate(batch))
        return results

    def prepare(self, audio: np.ndarray | torch.Tensor, fps: float = VIDEO_FPS) -> AudioFeatures:
        """Compute the clip's mel now and return a lazily-encoding :class:`AudioFeatures`.

        Args:
            audio: 1-D 16 kHz float waveform in [-1, 1].
            fps: Video frame rate.

        Returns:
            The clip's features handle.

        """
        return AudioFeatures(self, self.log_mel(audio), fps)

    def encode(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode a whole clip at once: ``(T50, L, D)`` = ``(T50, 5, 384)`` for tiny."""
        mel = self.log_mel(audio)
        return torch.cat(self.encode_windows(mel, window_spans(mel.shape[-1])))
