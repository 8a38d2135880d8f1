"""Egress: where the programme leaves: encoders, outputs (RTMP, SRT, WHIP, HLS, recording), WHEP, frames."""
