"""Media input: probing, video decoding at the stream fps, audio decoding and A/V timing."""

from latentsync.media.audio import decode_audio
from latentsync.media.probe import MediaInfo, MediaProbeError, probe_media
from latentsync.media.timing import samples_before_frame, samples_in_frame
from latentsync.media.video import VideoClip, decode_clip

__all__ = [
    "MediaInfo",
    "MediaProbeError",
    "VideoClip",
    "decode_audio",
    "decode_clip",
    "probe_media",
    "samples_before_frame",
    "samples_in_frame",
]
