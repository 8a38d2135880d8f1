"""Egress: where the programme leaves: encoders, outputs (RTMP, SRT, WHIP, HLS, recording), WHEP, frames.

Nothing is re-exported; import from the modules: ``latentsync.serving.egress.sink`` (EgressSink),
``latentsync.serving.egress.whep`` (WebRtcHub), ``latentsync.serving.egress.frames`` (FramesHub), ...
"""

__all__: list[str] = []
