"""Flask app factory: routes only; all state lives in the Runtime passed in.

Routes:
    ``GET /health``: stream health (200 while streaming, 503 otherwise).
    ``POST /generate_video``: multipart ``audio_file`` (+ optional ``seed``, ``guidance_scale``) →
    202 with a task id, or a JSON error.
    ``GET /tasks``, ``GET /tasks/<id>``, ``DELETE /tasks/<id>``.

Every error body is ``{"error": {"code": ..., "message": ...}}``; a rejected upload leaves no
temporary file and no task behind.
"""

from __future__ import annotations

import logging
import math
import time

from flask import Flask, jsonify, request, url_for
from werkzeug.exceptions import HTTPException

from latentsync.media.probe import MediaProbeError
from latentsync.serving.runtime import Runtime

logger = logging.getLogger(__name__)

#: Seed range accepted from clients (torch.Generator takes 64-bit seeds; keep it portable).
MAX_SEED = 2**31 - 1


class ApiError(Exception):
    """An HTTP error with a JSON body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str):
    return jsonify({"error": {"code": code, "message": message}}), status


def _form_number(name: str, kind: type, low: float, high: float) -> float | int | None:
    raw = request.form.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name}={raw!r} is not a {kind.__name__}") from None
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, "bad_parameter", f"{name}={raw!r} is outside [{low}, {high}]")
    return value


def create_app(runtime: Runtime) -> Flask:
    """Build the HTTP API around a runtime.

    Args:
        runtime: The object that owns the stream and the tasks.

    Returns:
        The Flask app.
    """
    app = Flask("latentsync-realtime")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    api = runtime.config.api
    app.config["MAX_CONTENT_LENGTH"] = int(api.max_upload_mb * 1024 * 1024)
    fps = runtime.config.stream.fps

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return _error(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            return _error(413, "too_large", f"upload larger than api.max_upload_mb = {api.max_upload_mb:g} MB")
        return _error(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description or "")

    @app.get("/health")
    def health():
        streaming, body = runtime.health()
        return jsonify(body), (200 if streaming else 503)

    @app.post("/generate_video")
    def generate_video():
        received = (time.time(), time.monotonic())  # TTFF counts from the request's arrival
        tasks = runtime.tasks
        if tasks is None:
            raise ApiError(503, "starting", "the lip-sync engine is not ready yet; retry shortly")
        upload = request.files.get("audio_file")
        if upload is None or not upload.filename and upload.content_length == 0:
            raise ApiError(400, "no_file", "multipart field 'audio_file' is required")
        seed = _form_number("seed", int, 0, MAX_SEED)
        guidance = _form_number("guidance_scale", float, 1.0, 20.0)
        if tasks.waiting() >= api.max_queued:
            raise ApiError(429, "queue_full", f"{api.max_queued} tasks already wait (api.max_queued); retry later")
        path = runtime.upload_path()  # our own name: the client's filename is never used as a path
        try:
            upload.save(path)
            if path.stat().st_size == 0:
                raise ApiError(400, "empty_file", "the uploaded file is empty")
            try:
                audio = runtime.decode_task_audio(path, max_duration_s=api.max_audio_s + 1.0)
            except MediaProbeError as exc:
                if "matches no streams" in str(exc):
                    raise ApiError(400, "not_audio", "the upload has no audio stream") from None
                raise ApiError(400, "not_audio", "the upload is not an audio file FFmpeg can read") from None
        finally:
            path.unlink(missing_ok=True)
        if audio.duration_s > api.max_audio_s:
            raise ApiError(400, "too_long", f"audio longer than api.max_audio_s = {api.max_audio_s:g} s")
        if audio.duration_s < 1.0 / fps:
            raise ApiError(400, "too_short", f"audio shorter than one frame (1/{fps} s): {audio.duration_s:.4f} s")
        accepted = tasks.submit(audio, seed, guidance, received=received)
        if accepted is None:
            raise ApiError(429, "queue_full", f"{api.max_queued} tasks already wait (api.max_queued); retry later")
        task, position = accepted
        logger.info("task %s accepted: %.2f s of audio, position %d", task.task_id, audio.duration_s, position)
        body = {
            "task_id": task.task_id,
            "status": "queued",  # every accepted task starts queued (its thread may have moved on already)
            "position": position,
            "status_url": url_for("get_task", task_id=task.task_id),
        }
        return jsonify(body), 202

    @app.get("/tasks")
    def list_tasks():
        tasks = runtime.tasks
        return jsonify({"tasks": [t.to_json() for t in tasks.list()] if tasks else []})

    @app.get("/tasks/<task_id>")
    def get_task(task_id: str):
        task = runtime.tasks.get(task_id) if runtime.tasks else None
        if task is None:
            raise ApiError(404, "not_found", f"no task {task_id!r}")
        return jsonify(task.to_json())

    @app.delete("/tasks/<task_id>")
    def cancel_task(task_id: str):
        task = runtime.tasks.cancel(task_id) if runtime.tasks else None
        if task is None:
            raise ApiError(404, "not_found", f"no task {task_id!r}")
        return jsonify(task.to_json())

    return app
