"""Flask app factory: routes only; all state lives in the Runtime passed in."""

from __future__ import annotations

from flask import Flask, jsonify

from latentsync.serving.runtime import Runtime


def create_app(runtime: Runtime) -> Flask:
    """Build the HTTP API around a runtime.

    Args:
        runtime: The object that owns the stream.

    Returns:
        The Flask app. Routes: ``GET /health`` (200 while streaming, 503 otherwise, JSON body).
    """
    app = Flask("latentsync-realtime")
    app.json.sort_keys = False  # type: ignore[attr-defined]

    @app.get("/health")
    def health():
        streaming, body = runtime.health()
        return jsonify(body), (200 if streaming else 503)

    return app
