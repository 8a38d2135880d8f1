"""LatentSync-Realtime: a live RTMP digital human lip-synced to uploaded speech.

The package exports only its version; the parts live in its subpackages (``latentsync.config``,
``latentsync.engines``, ``latentsync.serving`` ...: docs/architecture.md, "Code map").
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
