"""What media reading raises: a file FFmpeg cannot read, and an FFmpeg that ran out of time.

A leaf module (it imports nothing of the package): probing, decoding and the FFmpeg confinement
(:mod:`latentsync.media.confine`) all raise these.
"""

from __future__ import annotations


class MediaProbeError(ValueError):
    """The file is missing, unreadable, or not a media file FFmpeg understands."""


class MediaDecodeTimeout(MediaProbeError):
    """FFmpeg did not finish decoding within its time limit (the process was killed)."""
