"""Serving: HTTP API, streaming controller, FFmpeg sink and the runtime that owns them."""
