"""Video encoders shared by the egresses that encode the program once for many clients (WHEP, frames)."""

from __future__ import annotations

import fractions

import av

#: H.264 level 3.1 covers up to 3,600 macroblocks a frame (1280x720); level 4.0 up to 8,192 (ITU-T H.264 Table A-1).
LEVEL_31_MACROBLOCKS = 3600
#: Encoder threads: with frame threads libvpx took 40-100 ms a frame on a 2-core machine (2.5 ms with
#: one), and libx264's zerolatency tune adds no frame delay with one.
ENCODER_THREADS = 1


def h264_encoder(
    width: int, height: int, fps: int, bitrate_kbps: int, keyframe_interval_s: float
) -> av.video.codeccontext.VideoCodecContext:
    """A low-latency libx264 encoder (PyAV): constrained Baseline, ``zerolatency``, one packet per frame.

    No B-frames and no lookahead: every ``encode(frame)`` returns that frame's access unit at once.
    Output is an Annex B byte stream with SPS and PPS in front of every IDR frame, so a decoder can
    start at any keyframe.

    Args:
        width: Frame width in pixels (even).
        height: Frame height in pixels (even).
        fps: Frames per second (the time base is ``1/fps``).
        bitrate_kbps: Target bitrate in kbit/s.
        keyframe_interval_s: Seconds between keyframes (GOP); a frame sent with ``pict_type = I`` is
            a keyframe anyway.

    Returns:
        The codec context, input ``yuv420p``.
    """
    codec = av.CodecContext.create("libx264", "w")
    macroblocks = ((width + 15) // 16) * ((height + 15) // 16)
    codec.options = {
        "tune": "zerolatency",
        "preset": "veryfast",
        "level": "31" if macroblocks <= LEVEL_31_MACROBLOCKS else "40",
    }
    codec.profile = "Baseline"
    codec.width, codec.height = width, height
    codec.thread_count = ENCODER_THREADS
    codec.pix_fmt = "yuv420p"
    codec.bit_rate = bitrate_kbps * 1000
    codec.framerate = fractions.Fraction(fps, 1)
    codec.time_base = fractions.Fraction(1, fps)
    codec.gop_size = max(1, int(round(keyframe_interval_s * fps)))
    return codec
