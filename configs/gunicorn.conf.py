"""gunicorn settings for LatentSync-Realtime.

    gunicorn -c configs/gunicorn.conf.py 'latentsync.serving.api.app:create_app()'

Exactly one worker process: it owns the output clock, FFmpeg and the GPU worker pool, which are
started after the fork, once, by ``create_app()``. Requests are served by threads. The listen address
comes from the same config as everything else ($LATENTSYNC_CONFIG, $LATENTSYNC_OVERRIDES).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentsync.config import RESERVED_THREADS, load_config_from_environment  # noqa: E402
from latentsync.serving.ops.exit import exit_now  # noqa: E402
from latentsync.serving.ops.systemd import sd_notify, take_notify_socket  # noqa: E402

# systemd's notify socket is for our worker (READY=1 once the stream is on air, watchdog pings), not
# for gunicorn's arbiter, which would send READY=1 the moment it listens.
take_notify_socket()

_config = load_config_from_environment()  # $LATENTSYNC_CONFIG (default configs/server.yaml), $LATENTSYNC_OVERRIDES

bind = f"{_config.server.host}:{_config.server.port}"
workers = 1  # never more: one process owns the stream
# gthread with a header deadline and a per-address cap (latentsync/serving/api/gunicorn_worker.py):
# a connection reaches a thread only once its request head is complete.
worker_class = "latentsync.serving.api.gunicorn_worker.GuardedThreadWorker"
# Event streams and WebSockets hold a thread each (at most api.max_long_lived); the rest always serve
# health checks, uploads and cancels.
threads = _config.api.max_long_lived + RESERVED_THREADS
timeout = 120  # worker heartbeat; uploads of up to api.max_upload_mb take far less
# SIGTERM: the worker finishes its requests, then worker_exit stops the runtime (speech faded out in
# <= 1 s, clock stopped <= 2 s, FFmpeg flushed <= 8 s, engine pool closed): all inside this, which
# stays below the unit's TimeoutStopSec=30 (the master SIGKILLs a worker that overruns it).
graceful_timeout = 25
# Slow-loris limits (issue 35; docs/security.md), from the same server.* keys infer_serv.py applies:
# the worker closes a connection whose request head is not complete server.header_timeout_s after it
# was accepted (or after its last keep-alive response), gives each read and write of a request
# server.body_timeout_s, and answers 503 to a connection past server.max_connections_per_ip from one
# address. worker_connections caps the worker's open connections (server.max_connections); past it
# gunicorn stops accepting and new ones wait in the listen backlog (infer_serv.py answers them 503).
worker_connections = _config.server.max_connections
keepalive = min(5, _config.server.header_timeout_s)
limit_request_line = 8190
limit_request_fields = 100
accesslog = "-"
# %(U)s: the path without its query (a WebSocket ticket never reaches the log)
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s"'
errorlog = "-"
loglevel = _config.log.level.lower()


def worker_exit(server, worker):
    """Stop the runtime (fade, flush FFmpeg, remove FIFOs, close the pool) as the worker exits."""
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("latentsync.runtime") if app is not None else None
    if runtime is not None:
        sd_notify("STOPPING=1")
        runtime.close()
        if runtime.exit_unsafe:  # a Ray cluster lost for good: the interpreter's teardown would crash in Ray
            exit_now(0)
