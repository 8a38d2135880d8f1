"""The idle loop: the avatar's idle clip played forever, frame by frame, its audio sample-continuously."""

from __future__ import annotations

import numpy as np

from latentsync.serving.playout.state import StreamState


class IdleLoop:
    """Loops the idle clip forever: video frame by frame, its audio sample-continuously.

    The audio cursor runs independently of the video position and wraps around the clip's audio,
    so the loop is seamless for any (fps, sample rate). With ping-pong the video plays forward then
    backward (``0..F-1, F-2..1``) while the audio keeps looping forward (reversed sound would be odd).

    Args:
        frames: ``(F, H, W, 3) uint8`` RGB frames.
        audio: ``(M,) int16`` mono samples covering the clip, or None for silence.
        pingpong: Play the frames forward then backward instead of wrapping to frame 0.
    """

    def __init__(self, frames: np.ndarray, audio: np.ndarray | None, pingpong: bool = False):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
            raise ValueError(f"frames must be (F, H, W, 3) uint8 with F > 0, got {frames.shape} {frames.dtype}")
        self.frames = frames
        self.audio = audio if audio is not None and audio.size > 0 else None
        n = frames.shape[0]
        self._order = list(range(n)) + (list(range(n - 2, 0, -1)) if pingpong and n > 2 else [])
        self._position = 0
        self._audio_cursor = 0

    @property
    def state(self) -> StreamState:
        """Always :attr:`StreamState.IDLE`."""
        return StreamState.IDLE

    def next(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Advance one frame.

        Args:
            num_samples: Audio samples to return with this frame.

        Returns:
            ``(H, W, 3) uint8`` frame (a read-only view into the clip) and ``(num_samples,) int16`` audio.
        """
        frame = self.frames[self._order[self._position]]
        self._position = (self._position + 1) % len(self._order)
        if self.audio is None:
            return frame, np.zeros(num_samples, dtype=np.int16)
        total = self.audio.shape[0]
        idx = (self._audio_cursor + np.arange(num_samples)) % total
        self._audio_cursor = (self._audio_cursor + num_samples) % total
        return frame, self.audio[idx]
