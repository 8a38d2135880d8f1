"""Benchmark LatentSync with random weights of the real size (no checkpoint needed); prints one table.

``--version`` (1.0 default, 1.5, 1.6) picks the U-Net (1.5 / 1.6: with the temporal layers) and the face size
(1.6: 512x512 faces, 64x64 latents; else 256x256, 32x32).

GPU (the default, ``--device cuda``): builds the U-Net, the sd-vae-ft-mse VAE and the Whisper-tiny encoder
with scale-preserving random weights, and runs the product's code path, ``LipsyncPipeline.generate_batch``
(20 DDIM steps, CFG batched, compose), for every combination of dtype (fp16, bf16), compile mode (eager,
``torch.compile``, ``torch.compile(mode="reduce-overhead")`` = CUDA graphs), DeepCache interval
(``--deepcache-interval``, default 0 = off), guidance (1.0, 1.5) and chunks per batch (1-4). Per row: U-Net
ms per DDIM step (one batched call; with DeepCache the mean over full and cached steps), VAE decode ms per
chunk, fps at N steps and peak VRAM, from the pipeline's own stage timings (the device is synchronised at stage
boundaries only). Per dtype/mode: VAE encode ms per chunk (16 faces + 16 masked faces; cached per avatar
in the product), Whisper ms per 30 s window, and the first-chunk latency (log-mel + first window + one
chunk generated alone). Then the numerical check: fp16/bf16 faces against fp32 faces for the same inputs
and noise, max and mean absolute difference in grey levels over the generated pixels.

    python scripts/bench/latentsync_bench.py --quick                   # ~5 min on an H100
    python scripts/bench/latentsync_bench.py                           # everything (run it in parts:
    python scripts/bench/latentsync_bench.py --dtypes float16 --modes eager default   # each part < 10 min)
    python scripts/bench/latentsync_bench.py --device cpu              # full-size U-Net ms/step, 2 and 16 frames
    python scripts/bench/latentsync_bench.py --device cpu --tiny       # seconds-long smoke test of every path
    python scripts/bench/latentsync_bench.py --deepcache-interval 0 3  # rows without and with DeepCache
    python scripts/bench/latentsync_bench.py --quick --version 1.6     # 1.6: temporal U-Net, 512 px faces

CPU (``--device cpu`` without ``--tiny``): the full-size U-Net forward only (fp32, channels-last as loaded
by ``load_unet``), ms per step for 2 and 16 frames, with the thread count (``--threads``). ``--tiny`` runs
the GPU report's code paths with tiny configs on any device (a smoke test of the bench itself).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from latentsync.config import LATENTSYNC_VERSIONS, DType, latentsync_face_size  # noqa: E402
from latentsync.face.mask import face_keep_mask  # noqa: E402
from latentsync.models.loading import resolve_dtype  # noqa: E402
from latentsync.models.unet3d import UNet3DConditionModel, UNet3DConfig  # noqa: E402
from latentsync.models.vae import sd_vae_ft_mse_config  # noqa: E402
from latentsync.models.whisper_features import (  # noqa: E402
    SAMPLE_RATE_HZ,
    WhisperAudioEncoder,
    WhisperDims,
    WhisperFeatureExtractor,
)
from latentsync.pipelines import LipsyncChunk, LipsyncPipeline, initial_noise, load_scheduler  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
#: ``--dtypes`` values (the names of ``engine.latentsync.dtype``; resolved by ``models.loading.resolve_dtype``).
DTYPES = tuple(d.value for d in DType)
#: ``--modes`` values: eager, ``torch.compile`` default, and CUDA graphs through ``reduce-overhead``.
MODES = {"eager": None, "default": "default", "reduce-overhead": "reduce-overhead"}
AUDIO_WIDTH = 384
AUDIO_TOKENS = 50


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), model)
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronising the GPU around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------- models


def build_unet(device: torch.device, dtype: torch.dtype, tiny: bool, version: str = "1.0") -> UNet3DConditionModel:
    """Random real-size (or tiny) U-Net of a LatentSync version, channels-last, as ``load_unet`` delivers it."""
    config = UNet3DConfig.for_version(version)
    if tiny:
        config = UNet3DConfig.tiny(
            use_motion_module=config.use_motion_module, audio_layer_names=config.audio_layer_names
        )
    unet = random_init_(UNet3DConditionModel(config, device="meta").to_empty(device="cpu"))
    unet = unet.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    return unet.eval().requires_grad_(False)


def build_models(device: torch.device, dtype: torch.dtype, tiny: bool, version: str = "1.0"):
    """Random U-Net, VAE and Whisper encoder (the same weights for every dtype), as the engine loads them."""
    from diffusers import AutoencoderKL

    unet = build_unet(device, dtype, tiny, version)
    vae_config = sd_vae_ft_mse_config()
    if tiny:
        vae_config.update(
            block_out_channels=[16, 16, 32, 32],
            norm_num_groups=8,
            layers_per_block=1,
        )
    vae_config.pop("_class_name")
    torch.manual_seed(0)  # diffusers' own init: the same VAE weights for every dtype
    vae = AutoencoderKL.from_config(vae_config).to(device=device, dtype=dtype)
    vae.eval().requires_grad_(False)
    if device.type == "cuda":
        vae.to(memory_format=torch.channels_last)  # as the engine does on a GPU
    # Tiny: one narrow layer, but still 384 wide (the U-Net's cross-attention width).
    whisper_dims = WhisperDims(n_audio_head=2, n_audio_layer=1) if tiny else WhisperDims()
    encoder = random_init_(WhisperAudioEncoder(whisper_dims)).to(device=device, dtype=dtype).eval()
    encoder.requires_grad_(False)
    return unet, vae, WhisperFeatureExtractor(encoder)


@dataclass
class Inputs:
    """One avatar's worth of bench inputs (seeded): faces, keep-mask, speech-like audio, chunk features."""

    faces: np.ndarray  # (4 * 16, S, S, 3) uint8, S = the version's face size (256; 512 for 1.6)
    keep_mask: np.ndarray  # (S, S) float32
    audio: np.ndarray  # (10 s,) float32
    features: np.ndarray  # (4 * 16, 50, 384) float32


def make_inputs(frames: int, max_chunks: int, audio_width: int, face_px: int = 256) -> Inputs:
    rng = np.random.default_rng(0)
    n = frames * max_chunks
    # Smooth random faces (a blurred pattern, not white noise): closer to the VAE's training images.
    coarse = rng.integers(0, 256, (n, face_px // 16, face_px // 16, 3), dtype=np.uint8)
    faces = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
    audio = (0.1 * rng.standard_normal(10 * SAMPLE_RATE_HZ)).astype(np.float32)
    features = rng.standard_normal((n, AUDIO_TOKENS, audio_width)).astype(np.float32)
    return Inputs(faces, face_keep_mask(face_px).astype(np.float32), audio, features)


def make_chunks(pipeline: LipsyncPipeline, inputs: Inputs, frames: int, count: int) -> list[LipsyncChunk]:
    reference, masked = pipeline.encode_faces(inputs.faces[: frames * count], inputs.keep_mask, seed=1247)
    chunks = []
    for k in range(count):
        rows = slice(k * frames, (k + 1) * frames)
        chunks.append(
            LipsyncChunk(
                faces=inputs.faces[rows],
                reference_latents=reference[rows],
                masked_latents=masked[rows],
                audio_features=inputs.features[rows],
                noise=initial_noise(1247 + k, *reference.shape[-2:]),
            )
        )
    return chunks


# ------------------------------------------------------------------------------------------ GPU report


@dataclass
class Row:
    dtype: str
    mode: str
    deepcache: int  # engine.latentsync.deepcache_interval (0: off)
    guidance: float
    chunks: int
    unet_ms: float  # one batched U-Net call (one DDIM step)
    vae_decode_ms: float  # per chunk
    fps: float  # frames per second of generate_batch, N steps
    peak_mib: float | None


@dataclass
class ModelFigures:
    dtype: str
    mode: str
    vae_encode_ms: float  # per chunk: 16 faces + 16 masked faces
    whisper_ms: float  # one 30 s window
    first_chunk_ms: float  # log-mel of the clip + first window + one chunk alone


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float | None]]:
    box: list[float | None] = [None]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield box
    if device.type == "cuda":
        box[0] = torch.cuda.max_memory_allocated(device) / 2**20


def run_generate(pipeline, chunks, keep_mask, steps, guidance, device):
    sync(device)
    start = time.perf_counter()
    outputs = pipeline.generate_batch(chunks, keep_mask, num_inference_steps=steps, guidance_scale=guidance)
    sync(device)
    return outputs, time.perf_counter() - start


def bench_models(args, device, dtype_name: str, mode: str, inputs: Inputs) -> tuple[list[Row], ModelFigures]:
    dtype = resolve_dtype(dtype_name, device)
    unet, vae, whisper = build_models(device, dtype, args.tiny, args.version)
    compile_mode = MODES[mode]
    pipelines = {
        interval: LipsyncPipeline(
            unet,
            vae,
            load_scheduler(REPO / "configs/scheduler_config.json"),
            compile_models=compile_mode is not None,
            compile_mode=None if compile_mode == "default" else compile_mode,
            deepcache_interval=interval,
        )
        for interval in args.deepcache_interval
    }
    pipeline = pipelines[args.deepcache_interval[0]]
    frames = args.frames
    keep = torch.from_numpy(inputs.keep_mask).to(device)
    all_chunks = make_chunks(pipeline, inputs, frames, max(args.chunks))
    rows = []
    for (interval, pipeline), guidance, count in itertools.product(pipelines.items(), args.guidance, args.chunks):
        chunks = all_chunks[:count]
        # Compiled: the first call compiles this shape; with CUDA graphs the next ones record, then replay.
        warmup = args.warmup if compile_mode is None else max(args.warmup, 3)
        with peak_memory(device) as peak:
            for _ in range(warmup):
                run_generate(pipeline, chunks, keep, args.steps, guidance, device)
            runs = [run_generate(pipeline, chunks, keep, args.steps, guidance, device) for _ in range(args.iters)]
        wall_s = statistics.median(r[1] for r in runs)
        unet_s = statistics.median(r[0][0].timings_s["unet"] for r in runs)
        decode_s = statistics.median(r[0][0].timings_s["vae_decode"] for r in runs)
        rows.append(
            Row(
                dtype_name,
                mode,
                interval,
                guidance,
                count,
                1000 * unet_s / args.steps,
                1000 * decode_s / count,
                count * frames / wall_s,
                peak[0],
            )
        )
        print_row(rows[-1], args)

    pipeline = pipelines[args.deepcache_interval[0]]
    faces = inputs.faces[:frames]
    encode_ms = time_ms(lambda: pipeline.encode_faces(faces, inputs.keep_mask, seed=1247), device, 1, args.iters)
    with torch.inference_mode():
        mel = whisper.log_mel(inputs.audio)
        whisper_ms = time_ms(lambda: whisper.encode_windows(mel, [(0, mel.shape[-1])]), device, 1, args.iters)

    def first_chunk() -> None:
        features = whisper.prepare(inputs.audio).frames(0, frames).float().cpu().numpy()
        chunk = LipsyncChunk(
            faces=all_chunks[0].faces,
            reference_latents=all_chunks[0].reference_latents,
            masked_latents=all_chunks[0].masked_latents,
            audio_features=features,
            noise=all_chunks[0].noise,
        )
        pipeline.generate_batch([chunk], keep, num_inference_steps=args.steps, guidance_scale=args.guidance[0])

    first_ms = time_ms(first_chunk, device, 1, args.iters)
    return rows, ModelFigures(dtype_name, mode, encode_ms, whisper_ms, first_ms)


def release_models(device: torch.device) -> None:
    """Free the previous models (and compiled graphs holding them) before the next dtype/mode."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


ROW_HEADER = (
    f"{'dtype':9s} {'mode':15s} {'deepcache':>9s} {'cfg':>4s} {'chunks':>6s} {'unet ms/step':>12s} "
    f"{'ms/step/chunk':>13s} {'decode ms/chunk':>15s} {'fps':>7s} {'peak MiB':>9s}"
)


def print_row(r: Row, args) -> None:
    peak = f"{r.peak_mib:9.0f}" if r.peak_mib is not None else f"{'n/a':>9s}"
    print(
        f"{r.dtype:9s} {r.mode:15s} {r.deepcache:9d} {r.guidance:4.1f} {r.chunks:6d} {r.unet_ms:12.1f} "
        f"{r.unet_ms / r.chunks:13.1f} {r.vae_decode_ms:15.1f} {r.fps:7.1f} {peak}",
        flush=True,
    )


@torch.inference_mode()
def numerical_check(args, device, inputs: Inputs) -> list[str]:
    """fp16/bf16 faces vs fp32 faces: same random weights, inputs and noise; grey levels, generated pixels."""
    frames = args.frames
    generated = inputs.keep_mask == 0
    faces: dict[tuple[str, float], np.ndarray] = {}
    for dtype_name in ["float32", *[d for d in args.dtypes if d != "float32"]]:
        unet, vae, _ = build_models(device, resolve_dtype(dtype_name, device), args.tiny, args.version)
        pipeline = LipsyncPipeline(unet, vae, load_scheduler(REPO / "configs/scheduler_config.json"))
        # Cached latents are computed once per avatar: the fp32 ones feed every dtype (only the U-Net loop
        # and the decode differ, as when a cache file is shared).
        if dtype_name == "float32":
            chunk = make_chunks(pipeline, inputs, frames, 1)[0]
        keep = torch.from_numpy(inputs.keep_mask).to(device)
        for guidance in args.guidance:
            out = pipeline.generate_batch([chunk], keep, num_inference_steps=args.steps, guidance_scale=guidance)
            faces[(dtype_name, guidance)] = out[0].faces.astype(np.int16)
        del pipeline, unet, vae
        release_models(device)
    lines = []
    for (dtype_name, guidance), value in faces.items():
        if dtype_name == "float32":
            continue
        diff = np.abs(value - faces[("float32", guidance)])[:, generated]
        lines.append(
            f"{dtype_name:9s} cfg {guidance:3.1f}: max {int(diff.max()):3d}  mean {diff.mean():6.3f} grey levels "
            f"({(diff > 2).mean() * 100:5.2f} % of generated values differ by > 2)"
        )
    return lines


def gpu_report(args, device) -> None:
    inputs = make_inputs(args.frames, max(args.chunks), AUDIO_WIDTH, latentsync_face_size(args.version))
    print(ROW_HEADER)
    print("-" * len(ROW_HEADER))
    figures = []
    for dtype_name in args.dtypes:
        for mode in args.modes:
            if (dtype_name, mode) in args.skip:
                continue
            figures.append(bench_models(args, device, dtype_name, mode, inputs)[1])
            release_models(device)
    print()
    header = (
        f"{'dtype':9s} {'mode':15s} {'vae encode ms/chunk':>19s} {'whisper ms/window':>17s} {'first chunk ms':>14s}"
    )
    print(header)
    print("-" * len(header))
    for f in figures:
        print(f"{f.dtype:9s} {f.mode:15s} {f.vae_encode_ms:19.1f} {f.whisper_ms:17.1f} {f.first_chunk_ms:14.0f}")
    if not args.no_check:
        print()
        print(f"numerical check vs float32 (eager, 1 chunk, {args.steps} steps, same noise):")
        for line in numerical_check(args, device, inputs):
            print("  " + line)


# ------------------------------------------------------------------------------------------ CPU report


def cpu_unet_report(args, device) -> None:
    """Full-size U-Net forward on the CPU, fp32, ms per DDIM step for each frame count (B = 1, no CFG)."""
    unet = build_unet(device, torch.float32, tiny=False, version=args.version)
    print(f"{'frames':>6s} {'unet ms/step':>12s} {'ms/step/frame':>13s} {'threads':>7s}")
    print("-" * 41)
    generator = torch.Generator().manual_seed(0)
    for frames in args.cpu_frames:
        sample = torch.randn(1, 13, frames, args.latent_size, args.latent_size, generator=generator)
        audio = torch.randn(1, frames, AUDIO_TOKENS, AUDIO_WIDTH, generator=generator)
        timestep = torch.tensor(951)
        with torch.inference_mode():
            ms = time_ms(lambda: unet(sample, timestep, audio), device, args.warmup, args.iters)  # noqa: B023
        print(f"{frames:6d} {ms:12.0f} {ms / frames:13.0f} {torch.get_num_threads():7d}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LatentSync benchmark (random weights of the real size)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--version",
        choices=LATENTSYNC_VERSIONS,
        default="1.0",
        help="LatentSync version: its U-Net and face size (1.6: 512 px faces, 64x64 latents)",
    )
    parser.add_argument("--quick", action="store_true", help="GPU subset that fits in ~5 min on an H100")
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net/VAE/Whisper configs (smoke test)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None, help="eager / compile modes")
    parser.add_argument("--guidance", nargs="+", type=float, default=None, help="CFG scales (default 1.0 1.5)")
    parser.add_argument("--chunks", nargs="+", type=int, default=None, help="chunks per batch (default 1 2 3 4)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps per chunk (default 20; 2 tiny)")
    parser.add_argument("--frames", type=int, default=None, help="frames per chunk (default 16; 2 tiny)")
    parser.add_argument("--cpu-frames", nargs="+", type=int, default=[2, 16], help="CPU U-Net frame counts")
    parser.add_argument(
        "--latent-size", type=int, default=None, help="CPU U-Net latent H = W (default: the version's, 32 = 256 px)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per shape (default 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls, median (default 3; 1 quick/tiny)")
    parser.add_argument("--no-check", action="store_true", help="skip the fp16/bf16 vs fp32 numerical check")
    parser.add_argument(
        "--deepcache-interval",
        nargs="+",
        type=int,
        default=[0],
        help="DeepCache intervals, one row each (engine.latentsync.deepcache_interval; default 0 = off)",
    )
    args = parser.parse_args(argv)
    if any(interval < 0 for interval in args.deepcache_interval):
        parser.error("--deepcache-interval takes integers >= 0")
    args.latent_size = args.latent_size or latentsync_face_size(args.version) // 8

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the dtype-cast notice would cut the table
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available: use --device cpu (full-size U-Net) or --device cpu --tiny")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    args.warmup = 1 if args.warmup is None else args.warmup
    args.iters = args.iters or (1 if quick or args.tiny else 3)
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if device.type == "cpu" else ["float16", "bfloat16"]
    args.modes = args.modes or (["eager"] if device.type == "cpu" else list(MODES))
    args.guidance = args.guidance or [1.0, 1.5]
    args.chunks = args.chunks or ([1, 2] if args.tiny else [1, 4] if quick else [1, 2, 3, 4])
    args.steps = args.steps or (2 if args.tiny else 20)
    args.frames = args.frames or (2 if args.tiny else 16)
    #: (dtype, mode) pairs left out: --quick compiles one pair only (fp16 + CUDA graphs), see below.
    args.skip = set()
    if quick and device.type == "cuda":
        args.skip = {(d, m) for d in args.dtypes for m in args.modes if m != "eager"}
    # No TF32: the fp32 reference of the numerical check must be real fp32 (fp16/bf16 rows never use it).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    # dynamic=False compiles one graph per input shape: 2 guidance x 4 batch sizes exceed dynamo's default 8.
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512

    size = "tiny configs" if args.tiny else "full size, random weights"
    face_px = latentsync_face_size(args.version)
    version = f"LatentSync {args.version}, {face_px} px faces"
    print(f"device: {device_name(device)}; torch {torch.__version__}; {size}; {version}")
    if device.type == "cpu" and not args.tiny:
        print(f"U-Net forward, fp32, channels-last, B=1, latents {args.latent_size}x{args.latent_size}")
        cpu_unet_report(args, device)
        return 0
    print(
        f"chunk {args.frames} frames, {args.steps} DDIM steps, LipsyncPipeline.generate_batch; unet ms/step = one "
        "batched U-Net call (CFG doubles the batch); fps = chunks x frames / generate_batch wall time"
    )
    gpu_report(args, device)
    if quick and device.type == "cuda":
        print()
        print("compiled (fp16, CUDA graphs via reduce-overhead, cfg 1.0, 1 chunk):")
        compiled = argparse.Namespace(**{**vars(args), "guidance": [1.0], "chunks": [1], "iters": 3})
        print(ROW_HEADER)
        print("-" * len(ROW_HEADER))
        inputs = make_inputs(args.frames, 1, AUDIO_WIDTH, latentsync_face_size(args.version))
        _, fig = bench_models(compiled, device, "float16", "reduce-overhead", inputs)
        release_models(device)
        print(f"  whisper ms/window {fig.whisper_ms:.1f}, first chunk ms {fig.first_chunk_ms:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
