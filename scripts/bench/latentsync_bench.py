"""Benchmark LatentSync 1.0's models with random weights of the real size (no checkpoint needed).

Times, per dtype: one U-Net step on a 16-frame chunk (B=1, 13x16x32x32 latents, audio (16, 50, 384)),
the VAE decode of that chunk (sd-vae-ft-mse architecture, 16 x 256 x 256 output), and the Whisper-tiny
encoder on one 30 s window; derives frames per second at N DDIM steps (no CFG) and the first-chunk
latency (one Whisper window + N steps + one decode; reference latents are cached per avatar, so no VAE
encode), and reports peak GPU memory.

    python scripts/bench/latentsync_bench.py                           # CUDA, float16 and bfloat16
    python scripts/bench/latentsync_bench.py --compile                 # with torch.compile
    python scripts/bench/latentsync_bench.py --device cpu --tiny       # seconds-long CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from latentsync.config import DType  # noqa: E402
from latentsync.models.loading import resolve_dtype  # noqa: E402
from latentsync.models.unet3d import UNet3DConditionModel, UNet3DConfig  # noqa: E402
from latentsync.models.vae import VAE_SCALING_FACTOR, sd_vae_ft_mse_config  # noqa: E402
from latentsync.models.whisper_features import WhisperAudioEncoder, WhisperDims  # noqa: E402


@dataclass
class Result:
    dtype: str
    unet_ms: float
    vae_ms: float
    whisper_ms: float
    steps: int
    frames: int
    peak_mib: float | None

    @property
    def chunk_ms(self) -> float:
        return self.steps * self.unet_ms + self.vae_ms

    @property
    def fps(self) -> float:
        return self.frames / self.chunk_ms * 1000.0

    @property
    def first_chunk_ms(self) -> float:
        return self.whisper_ms + self.chunk_ms


def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill parameters with scale-preserving random values (weights ~ N(0, 1/fan_in), norms 1, biases 0)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() > 1:
                values = torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5
                param.copy_(values)
            elif "norm" in name and name.endswith("weight") or name.endswith("ln.weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return module


def build(device: torch.device, dtype: torch.dtype, tiny: bool, channels_last: bool):
    from diffusers import AutoencoderKL

    unet_config = UNet3DConfig.tiny() if tiny else UNet3DConfig()
    unet = UNet3DConditionModel(unet_config, device="meta").to_empty(device=device)
    unet = random_init_(unet).to(dtype).eval().requires_grad_(False)

    vae_config = sd_vae_ft_mse_config()
    if tiny:
        vae_config.update(
            block_out_channels=[32, 64],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            norm_num_groups=8,
            layers_per_block=1,
        )
    vae_config.pop("_class_name")
    vae = AutoencoderKL.from_config(vae_config).to(device=device)
    vae = vae.to(dtype).eval().requires_grad_(False)  # all of it in dtype: sd-vae-ft-mse decodes fine in fp16

    whisper_dims = WhisperDims(n_audio_state=64, n_audio_head=2, n_audio_layer=2) if tiny else WhisperDims()
    whisper = random_init_(WhisperAudioEncoder(whisper_dims)).to(device=device, dtype=dtype).eval()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    return unet, vae, whisper


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronising the GPU around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def bench_dtype(args: argparse.Namespace, dtype_name: str) -> Result:
    device = torch.device(args.device)
    dtype = resolve_dtype(dtype_name, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    unet, vae, whisper = build(device, dtype, args.tiny, not args.no_channels_last)
    if args.compile:
        unet = torch.compile(unet, mode=args.compile_mode)
        vae.decode = torch.compile(vae.decode, mode=args.compile_mode)

    generator = torch.Generator(device="cpu").manual_seed(0)
    frames, size = args.frames, args.latent_size
    sample = torch.randn(1, 13, frames, size, size, generator=generator).to(device, dtype)
    audio = torch.randn(1, frames, 50, 384, generator=generator).to(device, dtype)
    latents = torch.randn(frames, 4, size, size, generator=generator).to(device, dtype)
    if not args.no_channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    mel = torch.randn(1, 80, 3000, generator=generator).to(device, dtype)
    timestep = torch.tensor(951, device=device)

    with torch.inference_mode():
        unet_ms = time_ms(lambda: unet(sample, timestep, audio), device, args.warmup, args.iters)
        vae_ms = time_ms(
            lambda: vae.decode(latents / VAE_SCALING_FACTOR).sample, device, args.warmup, args.iters
        )
        whisper_ms = time_ms(lambda: whisper(mel), device, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Result(dtype_name, unet_ms, vae_ms, whisper_ms, args.steps, frames, peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LatentSync 1.0 model benchmark (random weights)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=[d.value for d in DType],
        default=None,
        help="default: float16 bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net/VAE/Whisper configs (smoke test)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per chunk")
    parser.add_argument("--frames", type=int, default=16, help="frames per chunk")
    parser.add_argument(
        "--latent-size", type=int, default=None, help="latent H = W (default 32 = 256 px / 8; 16 tiny)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3; 1 tiny)")
    parser.add_argument(
        "--iters", type=int, default=None, help="timed calls, median reported (default 10; 3 tiny)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net and the VAE decoder")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--no-channels-last", action="store_true")
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the dtype-cast notice would cut the table
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available: use --device cpu --tiny for a smoke test")
    if args.latent_size is None:
        args.latent_size = 16 if args.tiny else 32
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 3
    if args.iters is None:
        args.iters = 3 if args.tiny else 10
    if args.dtypes is None:
        args.dtypes = ["float32"] if device.type == "cpu" else ["float16", "bfloat16"]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    size = "tiny configs" if args.tiny else "full size"
    print(
        f"device: {name}; torch {torch.__version__}; {size}; chunk {args.frames} frames, "
        f"latents {args.latent_size}x{args.latent_size}; channels_last {not args.no_channels_last}; "
        f"compile {args.compile}"
    )
    header = (
        f"{'dtype':9s} {'unet ms/step':>12s} {'vae ms/chunk':>12s} {'whisper ms/win':>14s} "
        f"{'fps@' + str(args.steps):>8s} {'first chunk ms':>14s} {'peak VRAM MiB':>13s}"
    )
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        r = bench_dtype(args, dtype_name)
        peak = f"{r.peak_mib:13.0f}" if r.peak_mib is not None else f"{'n/a':>13s}"
        print(
            f"{r.dtype:9s} {r.unet_ms:12.1f} {r.vae_ms:12.1f} {r.whisper_ms:14.1f} {r.fps:8.1f} "
            f"{r.first_chunk_ms:14.0f} {peak}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
