"""The ``latentsync`` engine: LatentSync (audio-conditioned latent diffusion) behind the Engine protocol.

``engine.latentsync.version`` says which LatentSync the files are: 1.0 or 1.5 (256x256 faces; 1.5 adds
temporal layers to the U-Net) or 1.6 (1.5's network on 512x512 faces, 64x64 latents). The version decides the
face size (:func:`latentsync.config.latentsync_face_size`): the avatar must be prepared at it (the server
does so, :func:`latentsync.config.engine_face_size`), and a U-Net yaml whose ``data.resolution`` says another
size is refused. The user brings the files (never downloaded): the U-Net checkpoint
and its yaml, Whisper ``tiny.pt``, the ``sd-vae-ft-mse`` folder and the DDIM scheduler config
(docs/latentsync.md, "Files a user brings"); a checkpoint of another version than the configured one
is refused at start, naming both. :meth:`LatentSyncEngine.load` checks that every one exists before
loading anything, then loads the models (float32 on CPU, the configured dtype on a GPU) and the avatar's latent cache.

Latent cache: a chunk needs, per avatar frame, the VAE latents of the aligned face (reference) and of the
face with its generated region greyed out (masked). They depend only on the avatar frame, the VAE weights
and the dtype, so they are computed once, for every frame, the first time an avatar is loaded with a given
VAE file and dtype, and stored beside the avatar's own cache as ``<avatar.path>/latents-<key>.npy``
(``(F, 2, 4, S/8, S/8) float32``, 32x32 at 256 px faces, 64x64 at 512: ``[:, 0]`` reference, ``[:, 1]``
masked); later loads memory-map it.
``key`` hashes the VAE's config and weight bytes, the dtype, the sampling seed and a format version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from latentsync.avatar import file_digest
from latentsync.config import DType, LatentSyncConfig, latentsync_face_size, validate_latentsync
from latentsync.engines.base import ENGINE_SAMPLE_RATE_HZ, ChunkRequest, ChunkResult, num_output_frames

logger = logging.getLogger(__name__)

#: Root of the repository: relative file options are looked up in the working directory, then here.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Config section the options come from (used in error messages).
CONFIG_SECTION = "engine.latentsync"
#: Bump when the latent cache changes meaning (its files are then recomputed under a new name).
LATENT_CACHE_VERSION = 1
#: Seed of the noise that samples the cached latents from the VAE's latent distribution (frame k uses
#: ``seed + k``). Fixed, so the cache never depends on a request; LatentSync 1.0's default seed.
LATENT_SAMPLE_SEED = 1247
#: Avatar frames VAE-encoded per batch when the latent cache is built (x2: face and masked face).
ENCODE_BATCH_FRAMES = 16
#: Shortest audio given to the Whisper features, in samples (one 25 fps frame): shorter clips are
#: zero-padded so that they have a mel frame and an encoder position.
MIN_FEATURE_SAMPLES = ENGINE_SAMPLE_RATE_HZ // 25
#: Weight files diffusers reads from an ``AutoencoderKL`` folder, in its order of preference.
VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _find(key: str, value: str, hint: str, is_dir: bool = False) -> Path:
    """Resolve a file option: absolute as is, relative against the working directory then the repo root.

    Raises:
        FileNotFoundError: Naming the option, its value and ``hint``.

    """
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_dir() if is_dir else candidate.is_file():
            return candidate
    kind = "folder" if is_dir else "file"
    raise FileNotFoundError(f"{CONFIG_SECTION}.{key}: {value} not found ({kind}) — {hint}")


class LatentSyncEngine:
    """LatentSync lip sync for one prepared avatar (engine name ``"latentsync"``).

    Args:
        avatar: The prepared :class:`latentsync.avatar.Avatar` (aligned faces at the version's size: 256x256,
            512x512 for 1.6; keep-mask, fps, cache folder ``path`` where the latent cache is written).
        options: Files and sampling settings: the server's ``engine.latentsync`` section as is
            (None: its defaults).
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``...; None: ``cuda`` when available, else ``cpu``.

    Attributes:
        device: Device the models run on (set by :meth:`load`).
        dtype: Model dtype (float32 on CPU, ``options.dtype`` elsewhere; set by :meth:`load`).
        latent_cache_path: File of the avatar's latent cache (None before :meth:`load`, or when the avatar
            folder is not writable and the latents are kept in memory only).
        latents_computed: True when the last :meth:`load` had to compute the latents (no cache file yet).
        load_timings_s: Seconds per step of the last :meth:`load` (``check``, ``unet``, ``whisper``,
            ``vae``, ``latents``).

    """

    name = "latentsync"

    def __init__(self, avatar, options: LatentSyncConfig | None = None, device: str | None = None) -> None:
        self.avatar = avatar
        self.options = options or LatentSyncConfig()
        validate_latentsync(self.options)
        if device is not None:
            try:
                torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"engine.device {device!r} is not a torch device: {exc}") from exc
        self._device_option = device
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.latent_cache_path: Path | None = None
        self.latents_computed = False
        self.load_timings_s: dict[str, float] = {}
        self._pipeline = None
        self._whisper = None
        self._latents: np.ndarray | None = None
        self._keep_mask: torch.Tensor | None = None

    @property
    def loaded(self) -> bool:
        """Whether :meth:`load` has completed (and :meth:`close` not been called since)."""
        return self._pipeline is not None

    def resolve_files(self) -> dict[str, Path]:
        """Find every file the engine needs, without reading any.

        Returns:
            Paths by option name: ``unet_path``, ``unet_config``, ``whisper_path``, ``vae_path`` (the folder),
            ``vae_config`` and ``vae_weights`` (files in it), ``scheduler_config``.

        Raises:
            FileNotFoundError: For the first missing one, naming the ``engine.latentsync`` key and the path.

        """
        o = self.options
        weights = (
            "weights are never downloaded by the server: LatentSync's U-Net and whisper/tiny.pt are on Hugging Face"
            " (1.0: chunyu-li/LatentSync, 1.5: ByteDance/LatentSync-1.5, 1.6: ByteDance/LatentSync-1.6), the VAE is"
            " stabilityai/sd-vae-ft-mse; e.g. `.venv/bin/hf download chunyu-li/LatentSync latentsync_unet.pt"
            " whisper/tiny.pt --local-dir checkpoints`; every command: checkpoints/README.md"
        )
        found = {
            "unet_path": _find("unet_path", o.unet_path, weights),
            "unet_config": _find("unet_config", o.unet_config, "the U-Net yaml (configs/unet/second_stage.yaml)"),
            "whisper_path": _find("whisper_path", o.whisper_path, weights),
            "vae_path": _find("vae_path", o.vae_path, weights, is_dir=True),
        }
        vae_dir = found["vae_path"]
        found["vae_config"] = _find("vae_path", str(vae_dir / "config.json"), weights)
        weight_file = next((vae_dir / n for n in VAE_WEIGHT_FILES if (vae_dir / n).is_file()), None)
        if weight_file is None:
            raise FileNotFoundError(
                f"{CONFIG_SECTION}.vae_path: {o.vae_path} has no {' or '.join(VAE_WEIGHT_FILES)} — {weights}"
            )
        found["vae_weights"] = weight_file
        found["scheduler_config"] = _find(
            "scheduler_config", o.scheduler_config, "the DDIM config (configs/scheduler_config.json)"
        )
        return found

    def load(self) -> None:
        """Check the files, load U-Net, Whisper encoder, VAE and scheduler, and the avatar's latents.

        Safe to call twice (the second call does nothing).

        Raises:
            FileNotFoundError: If a file is missing (before any model is loaded; names the config key).
            latentsync.models.loading.CheckpointVersionError: If the U-Net file holds another LatentSync
                version than ``engine.latentsync.version`` (1.0 against 1.5 / 1.6).
            latentsync.models.loading.CheckpointError: If the U-Net file does not fit the yaml's model.
            latentsync.models.whisper_features.WhisperCheckpointError: If ``tiny.pt`` is not Whisper.
            ValueError: If the U-Net yaml has no usable ``model`` section, describes another version than
                ``engine.latentsync.version`` or another face size (``data.resolution``: 256 for 1.0 / 1.5,
                512 for 1.6), if the avatar's faces are not of the version's size (:meth:`check_avatar`), or
                models do not fit together.

        """
        if self.loaded:
            return
        from diffusers import AutoencoderKL

        from latentsync.models.loading import check_version, load_unet, read_state_dict, resolve_dtype
        from latentsync.models.unet3d import UNet3DConfig
        from latentsync.models.whisper_features import WhisperFeatureExtractor
        from latentsync.pipelines import LipsyncPipeline, load_scheduler

        timings: dict[str, float] = {}
        t = time.perf_counter()
        files = self.resolve_files()
        device = torch.device(self._device_option or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float32 if device.type == "cpu" else resolve_dtype(self.options.dtype.value, device)
        channels_last = device.type == "cuda"
        yaml_doc = OmegaConf.load(files["unet_config"])
        yaml_model = yaml_doc.get("model")
        if yaml_model is None:
            raise ValueError(f"{CONFIG_SECTION}.unet_config: {files['unet_config']} has no 'model' section")
        unet_config = UNet3DConfig.from_original(OmegaConf.to_container(yaml_model, resolve=True))
        version, setting = self.options.version, f"{CONFIG_SECTION}.version"
        if unet_config.version_family != UNet3DConfig.for_version(version).version_family:
            raise ValueError(
                f"{CONFIG_SECTION}.unet_config: {files['unet_config']} describes a LatentSync "
                f"{'1.0' if unet_config.version_family == '1.0' else '1.5 or 1.6'} U-Net "
                f"(use_motion_module: {str(unet_config.use_motion_module).lower()}) but {setting} is {version}"
            )
        face_size = latentsync_face_size(version)
        resolution = OmegaConf.select(yaml_doc, "data.resolution", default=None)
        if resolution is not None and int(resolution) != face_size:
            raise ValueError(
                f"{CONFIG_SECTION}.unet_config: {files['unet_config']} has data.resolution {resolution} but {setting} "
                f"is {version}, which runs on {face_size}x{face_size} faces (1.6: configs/unet/stage2_512.yaml; "
                "1.5: configs/unet/stage2.yaml; 1.0: configs/unet/second_stage.yaml)"
            )
        check_version(read_state_dict(files["unet_path"]), version, str(files["unet_path"]), setting)  # mmap: cheap
        self.check_avatar(self.avatar)
        timings["check"] = time.perf_counter() - t

        t = time.perf_counter()
        unet = load_unet(  # channels-last on every device: one memory layout end to end, converted once here
            files["unet_path"],
            device=device,
            dtype=dtype,
            config=unet_config,
            channels_last=True,
            version=version,
            version_setting=setting,
        )
        timings["unet"] = time.perf_counter() - t
        t = time.perf_counter()
        whisper = WhisperFeatureExtractor.from_checkpoint(files["whisper_path"], device=device, dtype=dtype)
        timings["whisper"] = time.perf_counter() - t
        t = time.perf_counter()
        vae = AutoencoderKL.from_pretrained(files["vae_path"], torch_dtype=dtype, low_cpu_mem_usage=False).to(device)
        vae.eval().requires_grad_(False)
        if channels_last:
            vae.to(memory_format=torch.channels_last)
        scheduler = load_scheduler(files["scheduler_config"])
        pipeline = LipsyncPipeline(
            unet,
            vae,
            scheduler,
            compile_models=self.options.compile,
            deepcache_interval=self.options.deepcache_interval,
        )
        timings["vae"] = time.perf_counter() - t

        t = time.perf_counter()
        keep_mask = np.asarray(self.avatar.mask, np.float32)
        key = self._latent_cache_key(files, dtype)
        self._latents = self._load_or_compute_latents(pipeline, keep_mask, key)
        timings["latents"] = time.perf_counter() - t

        self.device, self.dtype = device, dtype
        self._keep_mask = torch.from_numpy(np.array(keep_mask)).to(device)
        self._whisper = whisper
        self._pipeline = pipeline
        self.load_timings_s = timings
        logger.info(
            "latentsync engine loaded on %s (%s): %s",
            device,
            str(dtype).removeprefix("torch."),
            ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        )

    @property
    def face_size(self) -> int:
        """Side in pixels of the aligned faces this engine's version runs on (256; 512 for 1.6)."""
        return latentsync_face_size(self.options.version)

    def check_avatar(self, avatar) -> None:
        """Refuse an avatar prepared at another face size than this engine's version runs on.

        Args:
            avatar: A prepared :class:`latentsync.avatar.Avatar` (its ``faces`` ``(F, S, S, 3)``).

        Raises:
            ValueError: If ``S`` is not :attr:`face_size`, naming the avatar's folder, both sizes and the version.

        """
        shape = tuple(np.shape(avatar.faces))
        size = self.face_size
        if shape[1:] != (size, size, 3):
            raise ValueError(
                f"avatar {avatar.path} holds faces of shape {shape[1:]} but {CONFIG_SECTION}.version is "
                f"{self.options.version}, which runs on {size}x{size} faces: prepare the avatar with "
                f"face_size={size} (latentsync.avatar.AvatarSettings; the server prepares avatars at the size of "
                "the configured engine, latentsync.config.engine_face_size)"
            )

    def with_avatar(self, avatar) -> LatentSyncEngine:
        """A loaded engine for another avatar that shares this engine's models (one copy per worker).

        Only the new avatar's latents are added (memory-mapped from its cache, computed once when
        missing); the U-Net, VAE, Whisper encoder and scheduler are this engine's. Closing the
        returned engine drops its references only. Used by the shared worker pool (docs/channels.md).

        Args:
            avatar: The prepared :class:`latentsync.avatar.Avatar`.

        Returns:
            The loaded engine bound to ``avatar``.

        Raises:
            RuntimeError: If this engine is not loaded.
            FileNotFoundError: If the VAE files went away since :meth:`load`.
            ValueError: If the avatar's faces are not of this version's size (:meth:`check_avatar`).
        """
        self._require_loaded("with_avatar")
        assert self.dtype is not None and self.device is not None
        self.check_avatar(avatar)
        other = LatentSyncEngine(avatar, self.options, self._device_option)
        keep_mask = np.asarray(avatar.mask, np.float32)
        t = time.perf_counter()
        other._latents = other._load_or_compute_latents(
            self._pipeline, keep_mask, other._latent_cache_key(self.resolve_files(), self.dtype)
        )
        other.device, other.dtype = self.device, self.dtype
        other._keep_mask = torch.from_numpy(np.array(keep_mask)).to(self.device)
        other._whisper = self._whisper
        other._pipeline = self._pipeline
        other.load_timings_s = {"latents": time.perf_counter() - t}
        return other

    def _latent_cache_key(self, files: Mapping[str, Path], dtype: torch.dtype) -> str:
        """24 hex digits identifying the latents: VAE config and weight bytes, dtype, avatar, seed, version."""
        h = hashlib.sha256()
        h.update(f"v{LATENT_CACHE_VERSION} seed{LATENT_SAMPLE_SEED} {dtype} avatar {self.avatar.key}\n".encode())
        h.update(Path(files["vae_config"]).read_bytes())
        h.update(file_digest(files["vae_weights"]).encode())
        return h.hexdigest()[:24]

    def _load_or_compute_latents(self, pipeline, keep_mask: np.ndarray, key: str) -> np.ndarray:
        """Memory-map the avatar's latent cache, or compute it (all frames) and write it atomically."""
        faces = self.avatar.faces
        n, height, width = faces.shape[:3]
        f = pipeline.vae_scale_factor
        shape = (n, 2, pipeline.latent_channels, height // f, width // f)
        path = Path(self.avatar.path) / f"latents-{key}.npy"
        if path.is_file():
            try:
                cached = np.load(path, mmap_mode="r")
                if cached.shape == shape and cached.dtype == np.float32:
                    self.latent_cache_path, self.latents_computed = path, False
                    return cached
                logger.warning("latent cache %s has shape %s, expected %s: recomputing", path, cached.shape, shape)
            except (OSError, ValueError) as exc:
                logger.warning("latent cache %s unreadable (%s): recomputing", path, exc)

        self.latents_computed = True
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".latents-{key}-", suffix=".npy", dir=path.parent)
            os.close(fd)
        except OSError as exc:
            logger.warning("avatar folder %s not writable (%s): latents kept in memory only", path.parent, exc)
            self.latent_cache_path = None
            latents = np.empty(shape, np.float32)
            self._encode_all(pipeline, keep_mask, latents)
            return latents
        tmp = Path(tmp_name)
        try:
            latents = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            self._encode_all(pipeline, keep_mask, latents)
            latents.flush()
            del latents
            os.replace(tmp, path)  # atomic: a concurrent loader sees the whole file or none
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("latent cache of %d avatar frames written to %s", n, path)
        self.latent_cache_path = path
        return np.load(path, mmap_mode="r")

    def _encode_all(self, pipeline, keep_mask: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out (F, 2, 4, h, w)`` with the latents of every avatar frame, in batches."""
        faces = self.avatar.faces
        for start in range(0, len(faces), ENCODE_BATCH_FRAMES):
            stop = min(start + ENCODE_BATCH_FRAMES, len(faces))
            reference, masked = pipeline.encode_faces(
                np.asarray(faces[start:stop]), keep_mask, seed=LATENT_SAMPLE_SEED, first_index=start
            )
            out[start:stop, 0] = reference
            out[start:stop, 1] = masked

    def close(self) -> None:
        """Release the models and the latent map; safe to call twice or before :meth:`load`."""
        on_cuda = self.device is not None and self.device.type == "cuda"
        self._pipeline = None
        self._whisper = None
        self._latents = None
        self._keep_mask = None
        if on_cuda:
            torch.cuda.empty_cache()

    def _require_loaded(self, what: str) -> None:
        if not self.loaded:
            raise RuntimeError(f"LatentSyncEngine.{what}() before load()")

    def features(self, audio_16k: np.ndarray, start_frame: int = 0, end_frame: int | None = None) -> np.ndarray:
        """Whisper-tiny features of a task, one ``(50, 384)`` row per output frame.

        With a frame range only the 30 s windows those frames need go through the encoder (the
        log-mel is still computed over the whole clip, so the rows equal the whole-clip rows).

        Frame ``i`` takes encoder positions ``int(i * 50 / fps) - 4 .. + 5`` clamped to the clip, so frames
        past the audio's end repeat its last positions (docs/latentsync.md, "Audio features").

        Args:
            audio_16k: ``(N,) float32`` mono audio at 16 kHz in [-1, 1] (int16 is rescaled by 1/32768).
            start_frame: First output frame.
            end_frame: One past the last (None: ``ceil(N * fps / 16000)``).

        Returns:
            ``(end_frame - start_frame, 50, 384) float32`` (rows, 10 positions x 5 layers, width).

        Raises:
            RuntimeError: If :meth:`load` was not called.
            ValueError: If ``audio_16k`` is not 1-D.

        """
        self._require_loaded("features")
        audio = np.asarray(audio_16k)
        if audio.ndim != 1:
            raise ValueError(f"audio_16k must be a 1-D mono waveform, got shape {audio.shape}")
        audio = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
        n_frames = num_output_frames(len(audio), self.avatar.fps)
        end = n_frames if end_frame is None else int(end_frame)
        dims = self._whisper.encoder.dims
        if n_frames == 0 or end <= start_frame:
            return np.zeros((max(end - start_frame, 0), 10 * (dims.n_audio_layer + 1), dims.n_audio_state), np.float32)
        if len(audio) < MIN_FEATURE_SAMPLES:
            audio = np.pad(audio, (0, MIN_FEATURE_SAMPLES - len(audio)))
        clip = self._whisper.prepare(audio, fps=self.avatar.fps)
        return clip.frames(int(start_frame), end).float().cpu().numpy()

    def generate(self, request: ChunkRequest) -> ChunkResult:
        """Generate the lip-synced faces of one chunk.

        Settings: ``request.seed`` (None: ``options.seed``) seeds the task's initial noise, the same for
        every chunk of the task; ``options.inference_steps`` DDIM steps; ``request.guidance_scale``
        (None: ``options.guidance_scale``).

        Args:
            request: The chunk: ``frame_indices`` (avatar base frames, normally 16) and ``features`` rows
                from :meth:`features` (the caller pads the last chunk).

        Returns:
            :class:`ChunkResult` with ``(len(frame_indices), S, S, 3) uint8`` RGB faces, ``S`` = :attr:`face_size`
            (256; 512 for 1.6; pixels where the avatar's keep-mask is 1 are the avatar face's) and timings
            ``features``, ``inputs``, ``unet``, ``vae_decode``, ``compose`` in seconds.

        Raises:
            RuntimeError: If :meth:`load` was not called.
            ValueError: If a frame index is outside the avatar, or the features or settings do not fit.

        """
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: list[ChunkRequest]) -> list[ChunkResult]:
        """Generate several chunks (of any tasks) with one U-Net batch per DDIM step.

        Chunks that share the guidance scale run together
        (:meth:`LipsyncPipeline.generate_batch`); each keeps its task's seed, so every result equals
        :meth:`generate` of that chunk alone.

        Args:
            requests: The chunks, as for :meth:`generate`.

        Returns:
            One :class:`ChunkResult` per request, in order; ``generate_s`` is the whole batch's time.

        Raises:
            RuntimeError: If :meth:`load` was not called.
            ValueError: As :meth:`generate`.

        """
        from latentsync.pipelines import LipsyncChunk, initial_noise

        self._require_loaded("generate")
        t0 = time.perf_counter()
        prepared = []
        n_avatar = len(self.avatar.faces)
        for request in requests:
            idx = np.asarray(request.frame_indices, np.int64)
            if idx.min() < 0 or idx.max() >= n_avatar:
                raise ValueError(f"frame index out of range [0, {n_avatar}): {idx.tolist()}")
            feats = request.features
            seed = self.options.seed if request.seed is None else int(request.seed)
            steps = self.options.inference_steps
            guidance = self.options.guidance_scale if request.guidance_scale is None else float(request.guidance_scale)
            latents = self._latents[idx]  # (F, 2, 4, h, w) copy out of the memory map
            chunk = LipsyncChunk(
                faces=np.asarray(self.avatar.faces[idx]),
                reference_latents=latents[:, 0],
                masked_latents=latents[:, 1],
                audio_features=np.asarray(feats, np.float32),
                noise=initial_noise(seed, latents.shape[-2], latents.shape[-1], latents.shape[2]),
            )
            prepared.append((request, idx, chunk, (steps, guidance, len(idx))))
        t_features = time.perf_counter() - t0
        results: dict[int, ChunkResult] = {}
        for key in dict.fromkeys(p[3] for p in prepared):  # groups in first-seen order
            group = [(k, p) for k, p in enumerate(prepared) if p[3] == key]
            outputs = self._pipeline.generate_batch(
                [p[2] for _, p in group], self._keep_mask, num_inference_steps=key[0], guidance_scale=key[1]
            )
            elapsed = time.perf_counter() - t0
            for (k, (request, idx, _, _)), output in zip(group, outputs, strict=True):
                timings = {"features": t_features, **output.timings_s, "batch": float(len(group))}
                results[k] = ChunkResult(
                    task_id=request.task_id,
                    chunk_index=request.chunk_index,
                    frame_indices=idx,
                    faces=output.faces,
                    generate_s=elapsed,
                    timings_s=timings,
                )
        return [results[k] for k in range(len(requests))]


def create(options: Mapping[str, Any] | None, avatar) -> LatentSyncEngine:
    """Build a (not yet loaded) LatentSync engine; called by ``create_engine("latentsync", ...)``.

    Args:
        options: ``config``: the server's :class:`~latentsync.config.LatentSyncConfig` (None: its
            defaults); ``device`` (str or None); any other key replaces that field of ``config``
            (``dtype`` as its name: tests and scripts). None: all defaults.
        avatar: The prepared :class:`latentsync.avatar.Avatar`.

    Returns:
        The engine; call :meth:`LatentSyncEngine.load` before using it.

    Raises:
        ValueError: If an option is unknown (named) or has an invalid value (a
            :class:`~latentsync.config.ConfigError` naming the ``engine.latentsync`` key).

    """
    values = dict(options or {})
    device = values.pop("device", None)
    config = values.pop("config", None) or LatentSyncConfig()
    known = {f.name for f in dataclasses.fields(LatentSyncConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown latentsync engine option(s) {unknown}; known: {sorted(known | {'device'})}")
    if "dtype" in values:
        try:
            values["dtype"] = DType(getattr(values["dtype"], "value", values["dtype"]))
        except ValueError:
            raise ValueError(
                f"{CONFIG_SECTION}.dtype: {values['dtype']!r} is invalid, expected one of {[d.value for d in DType]}"
            ) from None
    if "version" in values and isinstance(values["version"], float):
        values["version"] = f"{values['version']:.1f}"  # 1.5 as a number, as YAML reads it
    for key in ("unet_path", "unet_config", "whisper_path", "vae_path", "scheduler_config"):
        if key in values:
            values[key] = os.fspath(values[key])
    return LatentSyncEngine(avatar, dataclasses.replace(config, **values), device)
