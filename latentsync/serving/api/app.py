"""Flask app factory: routes only; all state lives in the Runtime passed in.

Routes:
    ``GET /health``: 200 while streaming (clock ticking, encoders up, every required output live),
    else 503 (with ``api.token`` set, a caller without it sees the state only:
    :data:`PUBLIC_HEALTH_KEYS`); ``?ready=1``: 200 only when streaming and the engine accepts
    uploads (readiness: a required output down fails it); ``?live=1``: 200 while the output clock
    ticks, even with every destination away (liveness). Each output's state is in ``outputs``.
    ``GET /metrics``: Prometheus text format.
    ``POST /generate_video``: multipart ``audio_file`` (+ optional ``seed``, ``guidance_scale``) →
    202 with a task id, or a JSON error.
    ``GET /tasks``, ``GET /tasks/<id>``, ``DELETE /tasks/<id>``.
    ``GET /ws/speech`` (WebSocket) and ``POST /speak``: streamed speech and text to speech
    (:mod:`latentsync.serving.api.speech`, docs/streaming-speech.md).
    ``GET /ws/frames`` (WebSocket): every tick on air as data (:mod:`latentsync.serving.api.frames`,
    docs/frames-protocol.md).
    ``GET /channels``: every channel (docs/channels.md); ``/channels/<name>/generate_video``,
    ``/channels/<name>/tasks[/<id>]``, ``/channels/<name>/health`` (and ``/events``, ``/whep`` in
    web.py) are the routes above for channel ``<name>``; the paths without ``/channels/<name>`` are
    channel ``main``'s. ``GET /channels/<name>``; ``PUT /channels/<name>`` (JSON channel fields)
    creates a channel at run time (202; it starts in the background) or switches an existing
    channel's avatar at its next idle moment (202; 409 ``restart_needed`` for stream fields),
    ``DELETE /channels/<name>`` fades it out and stops it (``/channels/main/...`` answers too,
    never redirects: a 308 would make clients re-send an upload). An unknown channel is 404
    ``no_channel``.
    ``POST /avatars`` (multipart ``video_file``, optional ``name``) → 202 with the new avatar's
    record, prepared in the background (200 with the existing avatar's record for bytes uploaded
    before); ``GET /avatars``, ``GET /avatars/<id>`` (progress, failure
    reason), ``GET /avatars/<id>/still?channel=<name>`` (JPEG: the avatar framed as that channel
    would show it), ``DELETE /avatars/<id>`` (:mod:`latentsync.serving.avatars`, docs/avatars.md).

Every error body is ``{"error": {"code": ..., "message": ...}}``; a rejected upload leaves no
temporary file and no task behind. A state-changing request from a browser page of a foreign
origin gets 403 ``origin_not_allowed`` (:func:`origin_allowed`); uploads over the rate limit are
refused before their body is read.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from pathlib import PurePath
from typing import TypeVar

from flask import Flask, Response, jsonify, request, url_for
from werkzeug.exceptions import HTTPException

from latentsync.config import (
    DEFAULT_CHANNEL,
    GUIDANCE_SCALE_RANGE,
    SEED_RANGE,
    ConfigError,
    parse_channel,
)
from latentsync.serving.api.access import (
    TICKET_TTL_S,
    RateLimiter,
    TicketBook,
    allowed_hosts,
    host_allowed,
    origin_allowed,
)
from latentsync.serving.api.admission import Admission
from latentsync.serving.api.channels import find_channel, no_channel
from latentsync.serving.api.errors import ApiError, error_response, status_of
from latentsync.serving.api.frames import FRAMES_PATH_RE, register_frames_routes
from latentsync.serving.api.json_body import json_body
from latentsync.serving.api.proxies import ForwardedClientMiddleware, TrustedProxies
from latentsync.serving.api.speech import WS_PATH_RE, register_speech_routes
from latentsync.serving.api.web import PUBLIC_PATHS, register_web
from latentsync.serving.core.errors import ServingError
from latentsync.serving.core.uploads import storage_error, stored_upload
from latentsync.serving.ingest.upload_source import UploadSource
from latentsync.serving.runtime.runtime import RestartNeeded, Runtime
from latentsync.serving.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

logger = logging.getLogger(__name__)

#: Exit status of a gunicorn worker that cannot boot; the master then exits with it too
#: (``gunicorn.arbiter.Arbiter.WORKER_BOOT_ERROR``).
WORKER_BOOT_ERROR_EXIT = 3


_N = TypeVar("_N", int, float)


def _form_number(name: str, kind: type[_N], low: float, high: float) -> _N | None:
    raw = request.form.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError("bad_parameter", f"{name}={raw!r} is not a {kind.__name__}") from None
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError("bad_parameter", f"{name}={raw!r} is outside [{low}, {high}]")
    return value


#: Methods that change state: a browser page of another origin must not send them (CSRF).
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: What ``/health`` tells a caller without the token (when ``api.token`` is set): the state only,
#: no process ids, task ids, errors or counters.
PUBLIC_HEALTH_KEYS = ("state", "ticking", "ffmpeg_up", "engine_ready", "uptime_s")


def public_health(body: dict) -> dict:
    """The part of a ``/health`` body shown without the token: :data:`PUBLIC_HEALTH_KEYS` only."""
    return {k: body[k] for k in PUBLIC_HEALTH_KEYS if k in body}


def create_app(runtime: Runtime | None = None) -> Flask:
    """Build the HTTP API around a runtime.

    Args:
        runtime: The object that owns the stream and the tasks. None (the gunicorn entry point
            ``latentsync.serving.api.app:create_app()``): build one from ``$LATENTSYNC_CONFIG`` (a YAML
            file, default ``configs/server.yaml``) and ``$LATENTSYNC_OVERRIDES`` (``key=value ...``)
            and start it in the background, in this (already forked) worker process, once.

    Returns:
        The Flask app; its runtime is ``app.extensions["latentsync.runtime"]``, its
        :class:`~latentsync.serving.api.admission.Admission` ``app.extensions["latentsync.admission"]``.

    Raises:
        latentsync.config.ConfigError: If the environment's configuration is invalid.
    """
    if runtime is None:
        runtime = _runtime_from_environment()
    app = Flask("latentsync-realtime")
    app.extensions["latentsync.runtime"] = runtime
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # /channels/main/... is served as is: werkzeug would 308-redirect it to the rule whose defaults
    # name main (/generate_video), and a client would have to re-send its upload.
    app.url_map.redirect_defaults = False
    api = runtime.config.api
    avatar_cfg = runtime.config.avatar
    app.config["MAX_CONTENT_LENGTH"] = int(api.max_upload_mb * 1024 * 1024)
    # Behind a reverse proxy: the client's address from X-Forwarded-For (latentsync/serving/api/proxies.py)
    app.wsgi_app = ForwardedClientMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, TrustedProxies(runtime.config.server.trusted_proxies)
    )
    limiter = RateLimiter(api.rate_limit_per_min)  # uploads
    mutations = RateLimiter(api.mutations_per_min)  # every state-changing request
    auth_failures = RateLimiter(api.auth_failures_per_min)
    stills = RateLimiter(api.stills_per_min)  # stills made (not from the cache): a face search each
    tickets = TicketBook()  # WebSocket handshakes of browsers (never the token in a URL)
    admission = Admission.from_config(runtime.config)  # event streams, WebSockets (latentsync/serving/api/admission.py)
    admission.install(app)
    hosts = allowed_hosts(runtime.config)
    any_ip = runtime.config.server.allowed_hosts is None  # an address is no name to rebind
    token = api.token.encode() if api.token else None
    origins = frozenset(o.rstrip("/").lower() for o in api.allowed_origins)

    def authorized() -> bool:
        if token is None:
            return True
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        websocket = WS_PATH_RE.fullmatch(request.path) or FRAMES_PATH_RE.fullmatch(request.path)
        if websocket and not given:  # a browser's WebSocket cannot set headers
            if request.environ.get("latentsync.ticket_ok") is None:  # redeemed once per request
                request.environ["latentsync.ticket_ok"] = tickets.redeem(request.args.get("ticket", ""))
            return request.environ["latentsync.ticket_ok"]
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)

    def client() -> str:
        return request.remote_addr or "?"

    def check_host():
        if not host_allowed(request.headers.get("Host"), hosts, any_ip):
            return error_response(
                "bad_host", "this server does not answer to that name (server.allowed_hosts, server.public_name)"
            )
        return None

    @app.before_request
    def limit_mutations():
        if request.method in STATE_CHANGING_METHODS and not mutations.allow(client()):
            return error_response(
                "rate_limited",
                f"more than {api.mutations_per_min} changes a minute from this client (api.mutations_per_min)",
            )
        return None

    @app.before_request
    def check_origin():
        if request.method in STATE_CHANGING_METHODS and not origin_allowed(
            request.headers.get("Origin"), request.host, request.scheme, origins
        ):
            return error_response(
                "origin_not_allowed",
                f"requests from web pages of {request.headers.get('Origin')!r} are not allowed (api.allowed_origins)",
            )
        return None

    @app.before_request
    def require_token():
        if request.path in PUBLIC_PATHS:
            return None
        if request.endpoint == "health" and "Authorization" not in request.headers:
            return None  # /health's public part; a token given there is checked and counted as anywhere
        if token is not None and auth_failures.over(client()):
            return error_response(
                "too_many_auth_failures",
                f"more than {api.auth_failures_per_min} failed authentications a minute from this client",
            )
        if authorized():
            return None
        auth_failures.allow(client())
        response = error_response("unauthorized", "missing or wrong bearer token (api.token), or a spent ticket")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.post("/ws/tickets")
    def ws_ticket():
        """A single-use ticket for one WebSocket handshake (``?ticket=``), valid for TICKET_TTL_S."""
        return jsonify({"ticket": tickets.issue(), "expires_in_s": TICKET_TTL_S}), 201

    @app.errorhandler(ServingError)
    def serving_error(exc: ServingError):  # every refusal below the API, and the API's own
        return error_response(exc.code, exc.message, status_of(exc))

    @app.before_request
    def avatar_upload_limit():
        if request.method == "POST" and request.path == "/avatars":  # videos: their own, larger limit
            request.max_content_length = int(avatar_cfg.upload_max_mb * 1024 * 1024)
            if request.content_length is not None and request.content_length > request.max_content_length:
                raise ApiError(
                    "too_large", f"upload larger than avatar.upload_max_mb = {avatar_cfg.upload_max_mb:g} MB"
                )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413 and request.path == "/avatars":
            limit = avatar_cfg.upload_max_mb
            return error_response("too_large", f"upload larger than avatar.upload_max_mb = {limit:g} MB")
        if exc.code == 413:
            return error_response("too_large", f"upload larger than api.max_upload_mb = {api.max_upload_mb:g} MB")
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(code, exc.description or "", exc.code or 500)

    def channel_or_404(name: str):
        return find_channel(runtime, name)  # 404 no_channel (latentsync/serving/api/channels.py)

    def channel_tasks(name: str):
        channel = channel_or_404(name)
        return None if runtime.stopped else channel.tasks

    @app.get("/channels")
    def list_channels():
        return jsonify({"channels": [c.describe() for c in list(runtime.channels.values())]})

    @app.get("/channels/<name>")
    def get_channel(name: str):
        return jsonify(channel_or_404(name).describe())

    @app.put("/channels/<name>")
    def put_channel(name: str):
        values = json_body(api.max_json_kb)  # 413 past api.max_json_kb before a byte is parsed
        if not isinstance(values, dict):
            raise ApiError("bad_channel", "the body must be a JSON object of channel fields (docs/channels.md)")
        force = values.pop("force", False)
        if not isinstance(force, bool):
            raise ApiError("bad_channel", "force: true or false")
        try:
            if runtime.channel(name) is not None:
                channel, switching = runtime.reconfigure_channel(name, values, force)
                return jsonify({**channel.describe(), "status_url": f"/channels/{name}"}), 202 if switching else 200
            channel = runtime.add_channel(parse_channel(name, values))
        except ConfigError as exc:
            raise ApiError("bad_channel", str(exc)) from None
        except RestartNeeded as exc:
            raise ApiError("restart_needed", str(exc)) from None
        except KeyError:
            raise no_channel(name) from None
        except RuntimeError as exc:  # the server is stopping, or the channel to switch is not ready
            if runtime.stopped:
                raise ApiError("stopping", str(exc)) from None
            raise ApiError("channel_not_ready", str(exc)) from None
        return jsonify({**channel.describe(), "status_url": f"/channels/{name}"}), 202

    # ----------------------------------------------------------------- avatars (docs/avatars.md)
    @app.post("/avatars")
    def upload_avatar():
        if runtime.stopped:
            raise ApiError("stopping", "the server is stopping")
        if not limiter.allow(request.remote_addr or "?"):  # before the body is read
            raise ApiError("rate_limited", f"more than {api.rate_limit_per_min} uploads a minute from this client")
        store = runtime.avatars
        try:
            upload = request.files.get("video_file")
        except OSError as exc:
            raise storage_error(exc) from None
        if upload is None or not upload.filename and upload.content_length == 0:
            raise ApiError("no_file", "multipart field 'video_file' is required")
        name = request.form.get("name") or PurePath(upload.filename or "avatar").stem
        with stored_upload(upload, store.incoming_root) as path:
            record, created = store.add(path, name)  # AvatarError: its own 4xx/5xx
        return jsonify(record), 202 if created else 200  # 200: these bytes are that avatar already

    @app.get("/avatars")
    def list_avatars():
        return jsonify({"avatars": runtime.avatars.list()})

    @app.get("/avatars/<avatar_id>")
    def get_avatar(avatar_id: str):
        return jsonify(runtime.avatars.get(avatar_id))

    @app.get("/avatars/<avatar_id>/still")
    def avatar_still(avatar_id: str):
        name = request.args.get("channel", DEFAULT_CHANNEL)
        channel = channel_or_404(name)
        if channel.stream_size is None:
            raise ApiError("channel_not_ready", f"channel {name!r} has no frame size yet (starting)")
        a = channel.config.avatar
        client = request.remote_addr or "?"
        jpeg = runtime.avatars.still(
            avatar_id, channel.stream_size, a.fit, a.background, may_render=lambda: stills.allow(client)
        )
        return Response(jpeg, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    @app.delete("/avatars/<avatar_id>")
    def delete_avatar(avatar_id: str):
        return jsonify(runtime.avatars.delete(avatar_id))

    @app.delete("/channels/<name>")
    def delete_channel(name: str):
        try:
            status = runtime.remove_channel(name)
        except ValueError as exc:
            raise ApiError("main_channel", str(exc)) from None
        if status is None:
            raise no_channel(name)
        return jsonify({"name": name, "status": status})

    @app.get("/health", defaults={"name": DEFAULT_CHANNEL})
    @app.get("/channels/<name>/health")
    def health(name: str):
        streaming, body = channel_or_404(name).health(runtime.uptime_s())
        if request.args.get("live"):
            ok = body.get("ticking", False)
        elif request.args.get("ready"):
            ok = streaming and body.get("engine_ready", False)
        else:
            ok = streaming
        return jsonify(body if authorized() else public_health(body)), (200 if ok else 503)

    @app.get("/metrics")
    def metrics():
        return Response(runtime.metrics.render(), mimetype=None, content_type=METRICS_CONTENT_TYPE)

    @app.post("/generate_video", defaults={"name": DEFAULT_CHANNEL})
    @app.post("/channels/<name>/generate_video")
    def generate_video(name: str):
        received = (time.time(), time.monotonic())  # TTFF counts from the request's arrival
        channel = channel_or_404(name)
        tasks = channel_tasks(name)
        if tasks is None:
            raise ApiError("starting", "the lip-sync engine is not ready yet; retry shortly")
        if not limiter.allow(request.remote_addr or "?"):  # before the body is read
            raise ApiError("rate_limited", f"more than {api.rate_limit_per_min} uploads a minute from this client")
        try:  # werkzeug spools large multipart bodies to the temp directory
            upload = request.files.get("audio_file")
        except OSError as exc:
            raise storage_error(exc) from None
        if upload is None or not upload.filename and upload.content_length == 0:
            raise ApiError("no_file", "multipart field 'audio_file' is required")
        seed = _form_number("seed", int, *SEED_RANGE)
        guidance = _form_number("guidance_scale", float, *GUIDANCE_SCALE_RANGE)
        # refused before the body is stored; decoded while it plays: the answer waits for the first
        # chunk's audio (or a short file's end); the stored file is gone when this returns (FFmpeg
        # goes on reading it through its own descriptor)
        source = UploadSource(
            body=upload,
            upload_root=channel.upload_root,
            seed=seed,
            guidance_scale=guidance,
            max_audio_s=api.max_audio_s,
            decode_timeout_s=api.decode_timeout_s,
        )
        opened = tasks.open_source(source, received)
        utterance, position = opened.utterance, opened.position
        task = utterance.task
        logger.info(
            "task %s accepted on channel %s: %s, position %d",
            task.task_id,
            name,
            "decoding" if not utterance.ended else f"{task.audio_duration_s:.2f} s of audio",
            position,
            extra={"task_id": task.task_id},
        )
        body = {
            "task_id": task.task_id,
            "status": "queued",  # every accepted task starts queued (its thread may have moved on already)
            "position": position,
            "status_url": url_for("get_task", name=name, task_id=task.task_id),
        }
        return jsonify(body), 202

    @app.get("/tasks", defaults={"name": DEFAULT_CHANNEL})
    @app.get("/channels/<name>/tasks")
    def list_tasks(name: str):
        tasks = channel_tasks(name)
        return jsonify({"tasks": [t.to_json() for t in tasks.list()] if tasks else []})

    def task_json(task, task_id: str):
        if task is None:
            raise ApiError("not_found", f"no task {task_id!r}")
        return jsonify(task.to_json())

    @app.get("/tasks/<task_id>", defaults={"name": DEFAULT_CHANNEL})
    @app.get("/channels/<name>/tasks/<task_id>")
    def get_task(name: str, task_id: str):
        tasks = channel_tasks(name)
        return task_json(tasks.get(task_id) if tasks else None, task_id)

    @app.delete("/tasks/<task_id>", defaults={"name": DEFAULT_CHANNEL})
    @app.delete("/channels/<name>/tasks/<task_id>")
    def cancel_task(name: str, task_id: str):
        tasks = channel_tasks(name)
        return task_json(tasks.cancel(task_id) if tasks else None, task_id)

    def origin_ok(origin: str | None) -> bool:
        return origin_allowed(origin, request.host, request.scheme, origins)

    register_speech_routes(app, runtime, origin_ok, admission)
    register_frames_routes(app, runtime, origin_ok, admission)  # /ws/frames (latentsync/serving/api/frames.py)
    # WHEP, GET /events (its Origin checked as the WebSockets'), the control page (latentsync/serving/api/web.py)
    register_web(app, runtime, admission, origin_ok)
    app.before_request_funcs.setdefault(None, []).insert(0, check_host)  # first of all: DNS rebinding
    return app


def _runtime_from_environment() -> Runtime:
    """Build and start (in a background thread) the runtime of a gunicorn worker."""
    import os

    from latentsync.config import load_config_from_environment
    from latentsync.serving.ops.logs import configure_logging
    from latentsync.serving.ops.memory import bound_heap_growth
    from latentsync.serving.ops.systemd import sd_notify

    config = load_config_from_environment()
    configure_logging(config.log.level, config.log.json)
    bound_heap_growth()  # freed frames and audio go back to the system (latentsync/serving/ops/memory.py)
    runtime = Runtime(config)

    def start() -> None:
        try:
            runtime.start()
        except Exception as exc:
            if runtime.stopped:  # SIGTERM while starting: what failed was being stopped, as asked
                logger.info("start interrupted by the shutdown: %s: %s", type(exc).__name__, exc)
                return
            logger.error("cannot start: %s", exc)
            runtime.close()
            logging.shutdown()
            # gunicorn's master halts with this status when its worker exits with it, so systemd
            # sees a failed start (Restart=on-failure applies); a SIGTERM to the master would exit 0.
            os._exit(WORKER_BOOT_ERROR_EXIT)
        if runtime.tasks is None:  # stopped (SIGTERM) while starting: not ready, never was
            return
        logger.info("ready: uploads accepted")
        sd_notify("READY=1")

    threading.Thread(target=start, name="runtime-start", daemon=True).start()
    return runtime
