"""The ``engine`` section: which lip-sync engine, its worker processes and LatentSync 1.0's settings.

The chunk lengths each engine accepts live here too (the engines' interface,
:mod:`latentsync.engines.base`, takes them from this module), so the configuration imports
nothing of the engines.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

#: Frames per chunk (LatentSync 1.0 processes 16 frames together).
CHUNK_FRAMES = 16
#: Chunk lengths ``(shortest, longest)`` in frames an engine generates without changing its output.
#: parametric: every frame is rendered on its own from its own features -> 1..16.
#: latentsync: LatentSync 1.0's ResNet GroupNorms normalise over all frames of a chunk jointly
#: (docs/latentsync.md), so a frame's face depends on the 15 others: 16 only (shown in
#: tests/test_unet.py); a shorter last chunk is padded by repeating its last frame.
CHUNK_FRAMES_RANGE = {"parametric": (1, CHUNK_FRAMES), "latentsync": (CHUNK_FRAMES, CHUNK_FRAMES)}
#: Chunk lengths of an engine not in :data:`CHUNK_FRAMES_RANGE`: 16 only (the safe choice).
DEFAULT_CHUNK_FRAMES_RANGE = (CHUNK_FRAMES, CHUNK_FRAMES)
#: Classifier-free guidance scales accepted everywhere (config, engine, API ``guidance_scale``):
#: 1.0 is no guidance (LatentSync 1.0's sampler needs >= 1; above ~20 the faces break up).
GUIDANCE_SCALE_RANGE = (1.0, 20.0)
#: DDIM denoising steps accepted by ``engine.latentsync.inference_steps``.
INFERENCE_STEPS_RANGE = (1, 1000)
#: LatentSync versions ``engine.latentsync.version`` accepts (``docs/latentsync.md``, "Versions"): 1.0 (no
#: temporal layers, 256 px faces), 1.5 (temporal layers, 256 px) and 1.6 (1.5's network trained at 512 px).
LATENTSYNC_VERSIONS = ("1.0", "1.5", "1.6")
#: Side in pixels of the aligned face crops each LatentSync version runs on: the ``data.resolution`` of its
#: U-Net yaml in the original repository (1.0 ``second_stage.yaml`` and 1.5 ``stage2.yaml``: 256; 1.6
#: ``stage2_512.yaml``: 512, i.e. 64x64 latents; docs/latentsync.md, "Versions").
LATENTSYNC_FACE_SIZE_PX = {"1.0": 256, "1.5": 256, "1.6": 512}
#: Side in pixels of the aligned face crops the parametric engine draws on (LatentSync 1.0's 256 px crops).
PARAMETRIC_FACE_SIZE_PX = 256
#: Most parametric workers ``engine.workers: null`` starts (one per core up to this).
PARAMETRIC_MAX_DEFAULT_WORKERS = 4


class EngineName(str, enum.Enum):
    """Lip-sync engines."""

    parametric = "parametric"
    latentsync = "latentsync"


class DType(str, enum.Enum):
    """Floating-point precision for the LatentSync models on GPU (CPU always runs float32)."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


@dataclass(kw_only=True)
class LatentSyncConfig:
    """LatentSync files and sampling settings (the files are the user's; never downloaded).

    ``version``: which LatentSync the files are, one of :data:`LATENTSYNC_VERSIONS` (a string; YAML's
    ``1.5`` works too). It chooses the U-Net (1.5 / 1.6 have temporal layers; ``unet_config`` must agree:
    second_stage.yaml for 1.0, stage2.yaml / stage2_512.yaml for 1.5 / 1.6) and the engine refuses at
    start a ``unet_path`` of the other family, naming both (a file tells 1.0 from 1.5 / 1.6 by its
    tensors, but not 1.5 from 1.6, which differ only in the face resolution they were trained at).

    ``deepcache_interval``: DeepCache (an int >= 0; 0, the default, and 1 are off). N > 1 runs the whole
    U-Net only at DDIM steps 0, N, 2N... of each chunk and, at the others, only its shallow part (``conv_in``,
    the last decoder layer, the output head) on the deep features kept from the last full step: the original
    LatentSync 1.6's ``scripts/inference.py`` turns it on with N = 3 (``DeepCacheSDHelper``, branch 0), and
    ours gives the same latents as that (docs/latentsync.md, "DeepCache"). Fewer deep-layer evaluations
    (7 full steps of 20 at N = 3) for a somewhat different face than without it; any version.
    """

    version: str = "1.0"
    unet_path: str = "checkpoints/latentsync_unet.pt"
    unet_config: str = "configs/unet/second_stage.yaml"
    whisper_path: str = "checkpoints/whisper/tiny.pt"
    vae_path: str = "checkpoints/sd-vae-ft-mse"
    scheduler_config: str = "configs/scheduler_config.json"
    dtype: DType = DType.float16
    inference_steps: int = 20
    guidance_scale: float = 1.0
    seed: int = 1247
    compile: bool = False
    deepcache_interval: int = 0


@dataclass(kw_only=True)
class EngineConfig:
    """Lip-sync engine and its worker pool.

    ``workers`` None: latentsync one worker process per GPU (1 on CPU); parametric one per core, at
    most :data:`PARAMETRIC_MAX_DEFAULT_WORKERS` (one worker is one core, and the engine is most of
    a speaking channel's CPU: docs/performance.md). ``worker_nice``: niceness added to every
    local engine worker (``os.nice``): generation runs ahead of the clock behind a jitter buffer,
    so the latency-bound parts (the stream's clock thread, FFmpeg) go first when the cores are
    busy; 0 keeps the server's priority. ``device`` None: ``cuda`` when a GPU is visible, else
    ``cpu``. ``chunk_deadline_s``: a chunk not back within this many seconds is retried once on
    a fresh worker, then its task fails. ``max_batch_chunks``: queued chunks a free worker
    generates in one model batch (a task's first chunk always runs alone). 1 (off) by default: a
    batch's results all arrive when the last is done, which only pays where a bigger batch is much
    cheaper than its parts (the latentsync U-Net on a GPU: try 2-4 there).
    ``max_avatars_per_worker``: prepared avatars (engines bound to them; for latentsync the models
    are shared and only the avatar's latents are added) a worker keeps loaded, least recently used
    dropped first (docs/channels.md). ``first_chunk_frames``: length of a task's first chunk, what
    its first frame on air waits for (null: the engine's, ``latentsync.engines.FIRST_CHUNK_FRAMES``:
    parametric 4, latentsync 16, which LatentSync 1.0 needs: its U-Net normalises over all 16
    frames of a chunk, docs/latentsync.md); later chunks are 16 frames, shorter only while
    audio streams in at real time (docs/streaming-speech.md). ``max_queued_jobs``: chunk jobs the
    pool's queue holds at most (a bound far above what the scheduler ever queues).
    """

    name: EngineName = EngineName.parametric
    workers: int | None = None
    worker_nice: int = 10
    device: str | None = None
    chunk_deadline_s: float = 60.0
    max_batch_chunks: int = 1
    max_avatars_per_worker: int = 4
    first_chunk_frames: int | None = None
    max_queued_jobs: int = 4096
    latentsync: LatentSyncConfig = field(default_factory=LatentSyncConfig)


def latentsync_face_size(version: str) -> int:
    """Side in pixels of the aligned faces a LatentSync version runs on (:data:`LATENTSYNC_FACE_SIZE_PX`).

    Args:
        version: One of :data:`LATENTSYNC_VERSIONS` (``"1.0"``, ``"1.5"``, ``"1.6"``).

    Returns:
        256 for 1.0 and 1.5, 512 for 1.6.

    Raises:
        ValueError: If ``version`` is not one of :data:`LATENTSYNC_VERSIONS` (quoted).
    """
    try:
        return LATENTSYNC_FACE_SIZE_PX[version]
    except KeyError:
        raise ValueError(
            f"unknown LatentSync version {version!r}, expected one of {list(LATENTSYNC_VERSIONS)}"
        ) from None


def engine_face_size(engine: EngineConfig) -> int:
    """Side in pixels of the aligned faces the configured engine works on: what avatars are prepared at.

    The one place that says it: the server prepares every avatar at this size (the latentsync engine
    refuses an avatar of another), and the worker pool expects faces of it back.

    Args:
        engine: The ``engine`` section.

    Returns:
        ``latentsync``: its version's size (:func:`latentsync_face_size`: 512 for 1.6, else 256);
        ``parametric``: :data:`PARAMETRIC_FACE_SIZE_PX` (256).
    """
    if engine.name == EngineName.latentsync:  # a str-valued enum: the plain string matches too
        return latentsync_face_size(engine.latentsync.version)
    return PARAMETRIC_FACE_SIZE_PX
