"""Egress: where the programme leaves the server: encoders and outputs (RTMP, SRT, WHIP, HLS, recording), WHEP, frames."""
