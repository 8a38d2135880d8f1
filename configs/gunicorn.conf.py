"""gunicorn settings for LatentSync-Realtime.

    gunicorn -c configs/gunicorn.conf.py 'latentsync.serving.app:create_app()'

Exactly one worker process: it owns the output clock, FFmpeg and the GPU worker pool, which are
started after the fork, once, by ``create_app()``. Requests are served by threads. The listen address
comes from the same config as everything else ($LATENTSYNC_CONFIG, $LATENTSYNC_OVERRIDES).
"""

import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentsync.config import load_config  # noqa: E402

_config = load_config(
    os.environ.get("LATENTSYNC_CONFIG") or Path(__file__).resolve().parent / "server.yaml",
    shlex.split(os.environ.get("LATENTSYNC_OVERRIDES", "")),
)

bind = f"{_config.server.host}:{_config.server.port}"
workers = 1  # never more: one process owns the stream
worker_class = "gthread"
threads = 8
timeout = 120  # worker heartbeat; uploads of up to api.max_upload_mb take far less
graceful_timeout = 8  # SIGTERM: finish requests, fade speech out, flush FFmpeg, all within systemd's 10 s
keepalive = 5
limit_request_line = 8190
limit_request_fields = 100
accesslog = "-"
errorlog = "-"
loglevel = _config.log.level.lower()


def worker_exit(server, worker):
    """Stop the runtime (fade, flush FFmpeg, remove FIFOs, close the pool) as the worker exits."""
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("latentsync.runtime") if app is not None else None
    if runtime is not None:
        runtime.stop()
