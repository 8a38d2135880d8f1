"""LatentSync-Realtime: a live RTMP digital human lip-synced to uploaded speech."""

__version__ = "0.1.0"
