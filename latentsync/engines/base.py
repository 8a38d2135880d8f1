"""The engine interface: typed chunk messages and the narrow :class:`Engine` protocol.

Nothing outside ``latentsync.engines`` knows which engine runs: the server builds one with
:func:`latentsync.engines.create_engine` and only talks through these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# The chunk lengths are the configuration's (it checks engine.first_chunk_frames against them and
# imports nothing of the engines); re-exported here as part of the engine interface.
from latentsync.config import CHUNK_FRAMES as CHUNK_FRAMES
from latentsync.config import CHUNK_FRAMES_RANGE as CHUNK_FRAMES_RANGE
from latentsync.config import DEFAULT_CHUNK_FRAMES_RANGE as DEFAULT_CHUNK_FRAMES_RANGE

#: Sample rate of the audio given to engines, in Hz (Whisper's rate).
ENGINE_SAMPLE_RATE_HZ = 16000

#: Audio frames past a chunk's last frame the engine must hear before that chunk's features are
#: final, per engine (at 25 fps one frame is 40 ms).
#: parametric: the last frame of a chunk is sampled at its centre + ``ParametricOptions.look_ahead_s``
#: (40 ms), i.e. 20 ms past the chunk's end, interpolated between 10 ms envelope points whose 30 ms
#: Hann windows reach at most 45 ms past the end; the last 5 ms of a Hann window carry under 3 % of
#: its weight -> 1 frame (40 ms).
#: latentsync: frame ``i`` reads Whisper encoder positions up to ``2 i + 5`` (20 ms each, see
#: ``latentsync.models.whisper_features``), i.e. audio up to 80 ms past the frame's end, + the
#: 25 ms STFT window centred on the last mel frame -> 3 frames (120 ms).
LOOKAHEAD_FRAMES = {"parametric": 1, "latentsync": 3}
#: Look-ahead of an engine not in :data:`LOOKAHEAD_FRAMES` (a test engine): the largest known.
DEFAULT_LOOKAHEAD_FRAMES = max(LOOKAHEAD_FRAMES.values())
#: A task's first chunk, per engine, when ``engine.first_chunk_frames`` is null: short where the
#: engine allows it (its first frame on air waits for the first chunk's audio and generation).
FIRST_CHUNK_FRAMES = {"parametric": 4, "latentsync": CHUNK_FRAMES}


@dataclass(frozen=True, kw_only=True)
class ChunkRequest:
    """One chunk of work: 16 output frames of one task.

    Attributes:
        task_id: Id of the task the chunk belongs to.
        chunk_index: Position of the chunk in the task, from 0.
        frame_indices: ``(16,) int64`` avatar base-frame indices, one per output frame.
        features: Per-frame features of these 16 frames: rows of what :meth:`Engine.features`
            returned for the whole task (``features[k0 : k0 + 16]``, padded by the caller).
        seed: Random seed for engines that sample noise (None: engine default).
        guidance_scale: Classifier-free guidance scale (1.0 = none; None: the engine's configured
            default); engines without guidance ignore it. Denoising steps come from the config.

    """

    task_id: str
    chunk_index: int
    frame_indices: np.ndarray
    features: np.ndarray
    seed: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if np.ndim(self.frame_indices) != 1 or len(self.frame_indices) == 0:
            shape = np.shape(self.frame_indices)
            raise ValueError(f"frame_indices must be a non-empty 1-D array, got shape {shape}")
        if self.features is None:
            raise ValueError(f"chunk {self.task_id}/{self.chunk_index}: no feature rows (features is None)")
        if len(self.features) != len(self.frame_indices):
            raise ValueError(
                f"chunk {self.task_id}/{self.chunk_index}: {len(self.features)} feature rows "
                f"for {len(self.frame_indices)} frames"
            )


@dataclass(frozen=True, kw_only=True)
class ChunkResult:
    """Generated faces of one chunk.

    Attributes:
        task_id: Id of the task, as in the request.
        chunk_index: Chunk position, as in the request.
        frame_indices: ``(16,) int64`` avatar base-frame indices, as in the request.
        faces: ``(16, S, S, 3) uint8`` RGB aligned faces, to paste into the base frames; ``S`` is the avatar's
            face size (256; 512 for LatentSync 1.6).
        generate_s: Seconds spent in :meth:`Engine.generate`.
        timings_s: Optional breakdown of ``generate_s`` by stage, in seconds.

    """

    task_id: str
    chunk_index: int
    frame_indices: np.ndarray
    faces: np.ndarray
    generate_s: float
    timings_s: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A lip-sync engine bound to one prepared avatar.

    Lifecycle: construct (cheap), :meth:`load` once (heavy: models, per-avatar caches),
    :meth:`features` once per task, :meth:`generate` once per chunk, :meth:`close` at the end.
    ``load`` and ``close`` are safe to call twice.
    """

    name: str

    def load(self) -> None:
        """Load models and per-avatar data."""
        ...

    def features(self, audio_16k: np.ndarray, start_frame: int = 0, end_frame: int | None = None) -> np.ndarray:
        """Compute a task's per-frame audio features, or only those of frames ``[start_frame, end_frame)``.

        A range lets the server get a long task's first chunks going without analysing the whole
        file first; rows of a range equal the same rows of the whole (the analysis still sees the
        whole clip where it needs to, e.g. Whisper's log-mel normalisation).

        Args:
            audio_16k: ``(N,) float32`` mono audio at 16 kHz in [-1, 1].
            start_frame: First output frame (>= 0).
            end_frame: One past the last; None: ``ceil(N * fps / 16000)``. Frames past the audio's end
                are padded the engine's way (parametric: the last row; latentsync: clamped Whisper
                positions, as LatentSync 1.0 does).

        Returns:
            Array whose first axis is the output frame at the avatar's fps:
            ``end_frame - start_frame`` rows.

        """
        ...

    def generate(self, request: ChunkRequest) -> ChunkResult:
        """Generate the faces of one chunk."""
        ...

    def generate_batch(self, requests: list[ChunkRequest]) -> list[ChunkResult]:
        """Generate several queued chunks at once (one model batch where the engine can); in order."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...


def num_output_frames(num_samples: int, fps: int, sample_rate_hz: int = ENGINE_SAMPLE_RATE_HZ) -> int:
    """Output frames covering ``num_samples`` of audio: ``ceil(num_samples * fps / sample_rate_hz)``."""
    return -(-int(num_samples) * int(fps) // int(sample_rate_hz))
