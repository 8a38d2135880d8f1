"""LatentSync 1.0 inference for one chunk of aligned faces: glue between U-Net, VAE and DDIM scheduler.

The models hold no sampling logic and the scheduler only ``set_timesteps``/``step``s (diffusers' split);
this module wires them together, following docs/latentsync.md, "One chunk (16 frames) at
inference":

1. Per avatar frame, once (:meth:`LipsyncPipeline.encode_faces`): reference latents
   ``sample(VAE.encode(face)) * 0.18215`` and masked-image latents ``sample(VAE.encode(face * mask)) *
   0.18215``, pixels RGB ``/ 255`` normalised to [-1, 1]. Both are sampled from the VAE's latent
   distribution as the original does, with noise seeded per frame (``seed + frame index``) so that the
   result does not depend on how frames are batched.
2. Per chunk (:meth:`LipsyncPipeline.__call__`): one ``(1, 4, 1, h, w)`` Gaussian sample (the task's,
   see :func:`initial_noise`) repeated over the frames; DDIM with eta 0 (20 steps: timesteps 951, 901,
   ..., 1); U-Net input channels in the order noisy latents (4, through the scheduler's
   ``scale_model_input``, the identity for DDIM), keep-mask resized (nearest) to the latent size (1),
   masked-image latents (4), reference latents (4). With ``guidance_scale > 1`` the unconditional branch
   (all-zero audio features) runs in the same U-Net call as the conditional one. With DeepCache
   (``deepcache_interval`` N > 1) only steps 0, N, 2N... run the whole U-Net; the others reuse its deep
   features (:meth:`UNet3DConditionModel.forward_deepcache`), as the original 1.6 does with interval 3.
3. Decode ``latents / 0.18215`` with the VAE and keep the generated pixels only where the keep-mask is 0:
   ``out = decoded * (1 - mask) + face * mask``, so kept pixels are the input face's, bit for bit.

Where we differ from the original: the DDIM state (latents) is kept in float32 whatever the model dtype
(the U-Net still runs in its own dtype), and non-finite decoded values are zeroed before composing
(a float16 overflow shows as grey, never as garbage in the stream). In float32 the denoising loop gives the
original's final latents (``tests/test_pipeline_parity.py``, DeepCache included: ``tests/test_deepcache.py``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler

from latentsync.models.unet3d import UNet3DConditionModel
from latentsync.models.vae import VAE_LATENT_CHANNELS, VAE_SCALING_FACTOR

#: Largest 8-bit pixel value: pixels / 127.5 - 1 maps [0, 255] onto the VAE's [-1, 1].
_PIXEL_MAX = 255.0


def load_scheduler(path: str | os.PathLike[str]) -> DDIMScheduler:
    """Build the DDIM scheduler from a diffusers scheduler config.

    Args:
        path: ``scheduler_config.json`` (e.g. ``configs/scheduler_config.json``: beta_start 0.00085,
            beta_end 0.012, scaled_linear, 1000 train steps, steps_offset 1), or a folder holding one.

    Returns:
        The scheduler.

    Raises:
        FileNotFoundError: If ``path`` does not exist.

    """
    path = Path(path)
    if path.is_dir():
        return DDIMScheduler.from_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"scheduler config not found: {path}")
    return DDIMScheduler.from_config(DDIMScheduler.load_config(path))


def initial_noise(seed: int, height: int, width: int, channels: int = VAE_LATENT_CHANNELS) -> torch.Tensor:
    """The task's initial latent noise: one frame's Gaussian sample, to be repeated over all frames.

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)``, so a seed gives the same tensor on every
    call and every device (every chunk of a task starts from the same noise, as in LatentSync 1.0).

    Args:
        seed: Random seed (any Python int accepted by ``manual_seed``).
        height: Latent height (32 for 256 px faces, 64 for LatentSync 1.6's 512 px faces).
        width: Latent width.
        channels: Latent channels (4).

    Returns:
        ``(1, channels, 1, height, width) float32`` CPU tensor.

    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((1, channels, 1, height, width), generator=generator, dtype=torch.float32)


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``torch.as_tensor`` that copies read-only numpy arrays (memory maps) instead of warning."""
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        array = np.array(array)
    return torch.as_tensor(array)


def _shape(array: np.ndarray | torch.Tensor | None) -> tuple[int, ...] | None:
    return None if array is None else tuple(array.shape)


@dataclass(frozen=True, kw_only=True)
class LipsyncChunk:
    """The per-chunk inputs of :meth:`LipsyncPipeline.generate_batch` (see :meth:`LipsyncPipeline.__call__`).

    Attributes:
        faces: ``(F, H, W, 3) uint8`` RGB aligned faces.
        reference_latents: ``(F, 4, H / 8, W / 8)`` reference latents.
        masked_latents: ``(F, 4, H / 8, W / 8)`` masked-image latents.
        audio_features: ``(F, 50, 384)`` Whisper features.
        noise: ``(1, 4, 1, H / 8, W / 8)`` the task's initial noise.
    """

    faces: np.ndarray | torch.Tensor
    reference_latents: np.ndarray | torch.Tensor
    masked_latents: np.ndarray | torch.Tensor
    audio_features: np.ndarray | torch.Tensor
    noise: torch.Tensor


@dataclass(frozen=True)
class LipsyncOutput:
    """Result of one chunk.

    Attributes:
        faces: ``(F, H, W, 3) uint8`` RGB faces; pixels where the keep-mask is 1 are the input faces'.
        timings_s: Seconds per stage: ``inputs`` (tensors to device), ``unet`` (denoising loop),
            ``vae_decode``, ``compose`` (mask blend and copy back to the CPU). On CUDA the device is
            synchronised at stage boundaries (never inside the loop) so the numbers are real.

    """

    faces: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)


class LipsyncPipeline:
    """One 16-frame chunk of LatentSync 1.0: cached face latents + audio features -> lip-synced faces.

    Args:
        unet: The audio-conditioned U-Net (13 input channels), on its device and dtype.
        vae: diffusers ``AutoencoderKL`` (sd-vae-ft-mse), on the same device.
        scheduler: ``DDIMScheduler`` (see :func:`load_scheduler`); this pipeline sets its timesteps.
        compile_models: Wrap the U-Net and the VAE decode in ``torch.compile`` (first calls are slow).
        compile_mode: ``torch.compile`` mode when ``compile_models`` is set: ``None`` (default),
            ``"reduce-overhead"`` (CUDA graphs: each static input shape is captured once, then replayed),
            ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``.
        deepcache_interval: DeepCache: 0 or 1 runs the whole U-Net at every DDIM step; N > 1 runs it at
            steps 0, N, 2N, ... of each chunk and only its shallow part at the others, reusing the deep
            features of the last full step (:meth:`UNet3DConditionModel.forward_deepcache`; the original
            LatentSync 1.6 uses 3). About N times fewer deep-layer evaluations, at some cost in fidelity.

    Raises:
        ValueError: If the U-Net's input channels are not ``3 * latent_channels + 1`` of the VAE, or
            ``deepcache_interval`` is not an int >= 0.

    """

    def __init__(
        self,
        unet: UNet3DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDIMScheduler,
        *,
        compile_models: bool = False,
        compile_mode: str | None = None,
        deepcache_interval: int = 0,
    ) -> None:
        latent_channels = int(vae.config.latent_channels)
        if isinstance(deepcache_interval, bool) or not isinstance(deepcache_interval, int) or deepcache_interval < 0:
            raise ValueError(f"deepcache_interval must be an int >= 0, got {deepcache_interval!r}")
        if unet.config.in_channels != 3 * latent_channels + 1:
            raise ValueError(
                f"U-Net in_channels {unet.config.in_channels} != 3 * VAE latent_channels {latent_channels} + 1"
            )
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.latent_channels = latent_channels
        #: Pixels per latent cell: diffusers' encoder halves the size in every block but the last.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.deepcache_interval = deepcache_interval
        if compile_models:
            self._unet_forward = torch.compile(unet, dynamic=False, mode=compile_mode)
            self._vae_decode = torch.compile(vae.decode, dynamic=False, mode=compile_mode)
            self._unet_deepcache = (
                torch.compile(unet.forward_deepcache, dynamic=False, mode=compile_mode)
                if deepcache_interval > 1
                else unet.forward_deepcache
            )
        else:
            self._unet_forward, self._vae_decode = unet, vae.decode
            self._unet_deepcache = unet.forward_deepcache
        #: CUDA graphs (reduce-overhead) reuse their output buffers: each call is marked as a new step, and
        #: every output is consumed (``.float()`` copy, scheduler step, decode) before the next call.
        self._cuda_graphs = compile_models and compile_mode in ("reduce-overhead", "max-autotune")

    @property
    def device(self) -> torch.device:
        """Device of the U-Net."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the U-Net."""
        return self.unet.dtype

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pixels(self, faces: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3) uint8`` RGB -> ``(N, 3, H, W)`` in [-1, 1], VAE dtype, on the device."""
        x = _as_tensor(faces).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return (x.float() / (_PIXEL_MAX / 2) - 1.0).to(self.vae.dtype)

    def _memory_format(self) -> torch.memory_format:
        weight = self.vae.decoder.conv_in.weight
        return (
            torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        )

    @torch.inference_mode()
    def encode_faces(
        self,
        faces: np.ndarray | torch.Tensor,
        keep_mask: np.ndarray | torch.Tensor,
        *,
        seed: int,
        first_index: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """VAE latents of aligned faces: what a chunk needs per avatar frame (cache them).

        Args:
            faces: ``(N, H, W, 3) uint8`` RGB aligned faces (H = W = 256 for LatentSync 1.0 / 1.5, 512 for 1.6).
            keep_mask: ``(H, W)`` float keep-mask, 1 = keep, 0 = generated.
            seed: Seed of the latent sampling noise; frame ``k`` of this batch uses a CPU generator
                seeded ``seed + first_index + k`` (reference noise first, then masked).
            first_index: Avatar frame index of ``faces[0]``.

        Returns:
            ``(reference, masked)``, each ``(N, 4, H / 8, W / 8) float32`` numpy, already multiplied by
            the scaling factor 0.18215.

        Raises:
            ValueError: If the shapes or dtypes do not fit.

        """
        faces_shape, mask_shape = _shape(faces), _shape(keep_mask)
        if len(faces_shape) != 4 or faces_shape[-1] != 3 or faces.dtype not in (np.uint8, torch.uint8):
            raise ValueError(f"faces must be (N, H, W, 3) uint8, got {faces_shape} {faces.dtype}")
        if mask_shape != faces_shape[1:3]:
            raise ValueError(f"keep_mask must be {faces_shape[1:3]}, got {mask_shape}")
        n, height, width = faces_shape[:3]
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"face size {width}x{height} is not a multiple of {self.vae_scale_factor}")
        pixels = self._pixels(faces)
        mask = _as_tensor(keep_mask).to(self.device, self.vae.dtype)[None, None]
        both = torch.cat([pixels, pixels * mask]).contiguous(memory_format=self._memory_format())
        dist = self.vae.encode(both).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        latent_shape = (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = torch.empty((2, n, *latent_shape), dtype=torch.float32)
        for k in range(n):
            generator = torch.Generator(device="cpu").manual_seed(int(seed) + first_index + k)
            noise[:, k] = torch.randn((2, *latent_shape), generator=generator)
        sample = (mean + std * noise.flatten(0, 1).to(self.device)) * VAE_SCALING_FACTOR
        sample = sample.cpu().numpy()
        return sample[:n], sample[n:]

    def check_inputs(
        self,
        faces: np.ndarray | torch.Tensor,
        reference_latents: np.ndarray | torch.Tensor,
        masked_latents: np.ndarray | torch.Tensor,
        keep_mask: np.ndarray | torch.Tensor,
        audio_features: np.ndarray | torch.Tensor,
        noise: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> None:
        """Check the inputs of :meth:`__call__` (same arguments).

        Raises:
            ValueError: Naming the argument and quoting its bad shape, dtype or value.

        """
        faces_shape = _shape(faces)
        if faces_shape is None or len(faces_shape) != 4 or faces_shape[-1] != 3:
            raise ValueError(f"faces must be (F, H, W, 3), got shape {faces_shape}")
        if faces.dtype not in (np.uint8, torch.uint8):
            raise ValueError(f"faces must be uint8, got {faces.dtype}")
        frames, height, width = faces_shape[:3]
        if frames < 1:
            raise ValueError(f"faces must hold at least one frame, got shape {faces_shape}")
        latent = (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"face size {width}x{height} is not a multiple of {self.vae_scale_factor}")
        for name, value in (("reference_latents", reference_latents), ("masked_latents", masked_latents)):
            if _shape(value) != (frames, *latent):
                raise ValueError(f"{name} must be {(frames, *latent)} for faces {faces_shape}, got {_shape(value)}")
        if _shape(keep_mask) != (height, width):
            raise ValueError(f"keep_mask must be {(height, width)}, got {_shape(keep_mask)}")
        audio_shape = _shape(audio_features)
        width_expected = self.unet.config.cross_attention_dim
        if audio_shape is None or len(audio_shape) != 3 or audio_shape[0] != frames or audio_shape[2] != width_expected:
            raise ValueError(f"audio_features must be ({frames}, S, {width_expected}), got {audio_shape}")
        if _shape(noise) != (1, latent[0], 1, latent[1], latent[2]):
            raise ValueError(f"noise must be {(1, latent[0], 1, latent[1], latent[2])}, got {_shape(noise)}")
        train_steps = int(self.scheduler.config.num_train_timesteps)
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int | np.integer)
            or not 1 <= num_inference_steps <= train_steps
        ):
            raise ValueError(f"num_inference_steps must be an int in [1, {train_steps}], got {num_inference_steps!r}")
        if not isinstance(guidance_scale, int | float) or not math.isfinite(guidance_scale) or guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be a finite number >= 1.0, got {guidance_scale!r}")

    @torch.inference_mode()
    def __call__(
        self,
        *,
        faces: np.ndarray | torch.Tensor,
        reference_latents: np.ndarray | torch.Tensor,
        masked_latents: np.ndarray | torch.Tensor,
        keep_mask: np.ndarray | torch.Tensor,
        audio_features: np.ndarray | torch.Tensor,
        noise: torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
    ) -> LipsyncOutput:
        """Generate one chunk of lip-synced faces.

        Args:
            faces: ``(F, H, W, 3) uint8`` RGB aligned faces of the chunk's avatar frames (F = 16; H = W = 256, 512
                for LatentSync 1.6).
            reference_latents: ``(F, 4, H / 8, W / 8)`` float reference latents of those frames
                (:meth:`encode_faces`, scaled by 0.18215).
            masked_latents: ``(F, 4, H / 8, W / 8)`` float masked-image latents of those frames.
            keep_mask: ``(H, W)`` float keep-mask, 1 = keep the face's pixel, 0 = generated.
            audio_features: ``(F, 50, 384)`` float Whisper features, one row per frame.
            noise: ``(1, 4, 1, H / 8, W / 8)`` float initial noise of the task (:func:`initial_noise`),
                repeated over the F frames.
            num_inference_steps: DDIM steps (20: timesteps 951, 901, ..., 1), eta 0.
            guidance_scale: Classifier-free guidance scale; 1.0 runs the conditional branch only, > 1 adds
                an unconditional branch (zero audio) in the same U-Net batch.

        Returns:
            :class:`LipsyncOutput` with ``(F, H, W, 3) uint8`` RGB faces and stage timings.

        Raises:
            ValueError: From :meth:`check_inputs`.

        """
        chunk = LipsyncChunk(
            faces=faces,
            reference_latents=reference_latents,
            masked_latents=masked_latents,
            audio_features=audio_features,
            noise=noise,
        )
        return self.generate_batch([chunk], keep_mask, num_inference_steps, guidance_scale)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        chunks: Sequence[LipsyncChunk],
        keep_mask: np.ndarray | torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
    ) -> list[LipsyncOutput]:
        """Generate several chunks (of any tasks) in one U-Net batch per DDIM step.

        Each chunk is one sample of the batch: its GroupNorm statistics span only its own frames and
        it keeps its own initial noise, so every output equals what :meth:`__call__` gives for that
        chunk alone (up to float rounding). All chunks share the steps and the guidance scale.

        Args:
            chunks: The chunks; each field as in :meth:`__call__`, all with the same frame count and size.
            keep_mask: ``(H, W)`` float keep-mask, 1 = keep the face's pixel, 0 = generated.
            num_inference_steps: DDIM steps, eta 0.
            guidance_scale: Classifier-free guidance scale (1.0: conditional branch only).

        Returns:
            One :class:`LipsyncOutput` per chunk, in order; the stage timings are the batch's.

        Raises:
            ValueError: From :meth:`check_inputs`, or when the chunks differ in frame count or size.

        """
        if not chunks:
            return []
        self._check_batch(chunks, keep_mask, num_inference_steps, guidance_scale)
        timings: dict[str, float] = {}
        device = self.device
        t0 = time.perf_counter()
        frames, height, width = _shape(chunks[0].faces)[:3]
        n = len(chunks)
        faces_t = torch.cat([_as_tensor(c.faces) for c in chunks]).to(device, non_blocking=True)  # (N*F, H, W, 3)
        mask_t = _as_tensor(keep_mask).to(device, torch.float32)
        cond, audio, noise = self._model_inputs(chunks, mask_t, guidance_scale)
        self._sync()
        t1 = time.perf_counter()
        timings["inputs"] = t1 - t0

        latents = self._denoise(cond, audio, noise, frames, int(num_inference_steps), guidance_scale)
        self._sync()
        t2 = time.perf_counter()
        timings["unet"] = t2 - t1

        flat = (latents.transpose(1, 2).flatten(0, 1) / VAE_SCALING_FACTOR).to(self.vae.dtype)  # (N*F, 4, h, w)
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        decoded = self._vae_decode(flat.contiguous(memory_format=self._memory_format())).sample
        self._sync()
        t3 = time.perf_counter()
        timings["vae_decode"] = t3 - t2

        pixels = ((torch.nan_to_num(decoded.float()) + 1.0) * (_PIXEL_MAX / 2)).clamp(0.0, _PIXEL_MAX)
        keep = mask_t[..., None]  # (H, W, 1)
        out = pixels.permute(0, 2, 3, 1) * (1.0 - keep) + faces_t.float() * keep
        result = out.round_().to(torch.uint8).cpu().numpy().reshape(n, frames, height, width, 3)
        timings["compose"] = time.perf_counter() - t3
        return [LipsyncOutput(result[k], dict(timings)) for k in range(n)]

    @torch.inference_mode()
    def denoise_batch(
        self,
        chunks: Sequence[LipsyncChunk],
        keep_mask: np.ndarray | torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The denoising loop of :meth:`generate_batch` alone: the final latents, before the VAE decode.

        The same code path as :meth:`generate_batch` up to the decode (the parity tests compare its result
        with the original's, ``tests/test_pipeline_parity.py``). ``faces`` are only checked, not used.

        Args:
            chunks: As in :meth:`generate_batch`.
            keep_mask: ``(H, W)`` float keep-mask, 1 = keep, 0 = generated.
            num_inference_steps: DDIM steps, eta 0.
            guidance_scale: Classifier-free guidance scale (1.0: conditional branch only).

        Returns:
            ``(N, 4, F, H / 8, W / 8) float32`` latents on the pipeline's device (scaled: divide by 0.18215
            before decoding); ``(0, 4, 0, 0, 0)`` for no chunks.

        Raises:
            ValueError: As :meth:`generate_batch`.

        """
        if not chunks:
            return torch.empty((0, self.latent_channels, 0, 0, 0), device=self.device)
        self._check_batch(chunks, keep_mask, num_inference_steps, guidance_scale)
        frames = _shape(chunks[0].faces)[0]
        mask_t = _as_tensor(keep_mask).to(self.device, torch.float32)
        cond, audio, noise = self._model_inputs(chunks, mask_t, guidance_scale)
        return self._denoise(cond, audio, noise, frames, int(num_inference_steps), guidance_scale)

    def _check_batch(
        self,
        chunks: Sequence[LipsyncChunk],
        keep_mask: np.ndarray | torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> None:
        """:meth:`check_inputs` on every chunk, and one faces shape for all of them (raises ``ValueError``)."""
        for c in chunks:
            self.check_inputs(
                c.faces,
                c.reference_latents,
                c.masked_latents,
                keep_mask,
                c.audio_features,
                c.noise,
                num_inference_steps,
                guidance_scale,
            )
        shapes = {_shape(c.faces) for c in chunks}
        if len(shapes) != 1:
            raise ValueError(f"chunks of one batch must have the same faces shape, got {sorted(shapes)}")

    def _model_inputs(
        self, chunks: Sequence[LipsyncChunk], mask_t: torch.Tensor, guidance_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The U-Net's fixed inputs of a batch (checked chunks; ``mask_t`` the ``(H, W)`` float32 keep-mask).

        Returns:
            ``(cond, audio, noise)``: ``cond`` ``(B, 9, F, h, w)`` mask, masked-image and reference latents
            in the U-Net's dtype; ``audio`` ``(B, F, S, D)`` in that dtype; ``noise`` ``(N, 4, 1, h, w)``
            float32. ``B = 2N`` with guidance (unconditional half first, zero audio), else ``N``.

        """
        device, dtype = self.device, self.dtype
        frames = _shape(chunks[0].faces)[0]
        n = len(chunks)
        latent_hw = (mask_t.shape[0] // self.vae_scale_factor, mask_t.shape[1] // self.vae_scale_factor)
        mask_latent = F.interpolate(mask_t[None, None], size=latent_hw, mode="nearest")  # (1, 1, h, w)

        def video(xs) -> torch.Tensor:  # N x (F, C, h, w) -> (N, C, F, h, w)
            return torch.stack([_as_tensor(x).to(device, dtype, non_blocking=True).transpose(0, 1) for x in xs])

        cond = torch.cat(
            [
                mask_latent.to(dtype)[:, :, None].expand(n, 1, frames, *latent_hw),
                video([c.masked_latents for c in chunks]),
                video([c.reference_latents for c in chunks]),
            ],
            dim=1,
        )  # (N, 9, F, h, w)
        audio = torch.stack([_as_tensor(c.audio_features).to(device, dtype, non_blocking=True) for c in chunks])
        if guidance_scale > 1.0:
            cond = torch.cat([cond, cond])
            audio = torch.cat([torch.zeros_like(audio), audio])  # unconditional first
        noise = torch.cat([c.noise.to(device, torch.float32) for c in chunks])  # (N, 4, 1, h, w)
        return cond, audio, noise

    def _denoise(
        self,
        cond: torch.Tensor,
        audio: torch.Tensor,
        noise: torch.Tensor,
        frames: int,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """DDIM (eta 0) from ``noise`` repeated over ``frames``; returns ``(N, 4, F, h, w)`` float32 latents.

        Per step: ``scale_model_input`` (the identity for DDIM), the U-Net on ``cat([latents (x2 with
        guidance), cond])`` (whole, or its shallow part on DeepCache's cached steps), guidance
        ``uncond + scale * (cond - uncond)``, ``scheduler.step``.
        """
        do_cfg = guidance_scale > 1.0
        dtype = self.dtype
        latents = noise.repeat(1, 1, frames, 1, 1) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps_cpu = self.scheduler.timesteps  # indexes the scheduler's CPU tables: no device sync
        timesteps_dev = timesteps_cpu.to(self.device)
        interval = self.deepcache_interval
        deep: torch.Tensor | None = None
        for i, t in enumerate(timesteps_cpu):
            model_latents = self.scheduler.scale_model_input(latents, t).to(dtype)
            if do_cfg:
                model_latents = torch.cat([model_latents, model_latents])
            model_input = torch.cat([model_latents, cond], dim=1)
            if self._cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            if interval > 1:
                # Steps 0, N, 2N... are full; the original counts steps from the first of the chunk too.
                cached = i % interval != 0
                noise_pred, features = self._unet_deepcache(
                    model_input, timesteps_dev[i], audio, deep if cached else None
                )
                if not cached:  # a CUDA graph's outputs are overwritten by its next replay: keep a copy
                    deep = features.clone() if self._cuda_graphs else features
                noise_pred = noise_pred.float()
            else:
                noise_pred = self._unet_forward(model_input, timesteps_dev[i], audio).float()
            if do_cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]
        return latents
