"""The API's errors: one JSON body shape, one map from error code to HTTP status.

Every part below the API raises a :class:`~latentsync.serving.core.errors.ServingError` with a
``code``; this module alone decides the HTTP status (:data:`HTTP_STATUS`, and
:data:`ROUTE_STATUS` where one route answers a code differently). Every error body is
``{"error": {"code": ..., "message": ...}}`` (README, docs/).
"""

from __future__ import annotations

from flask import Response, jsonify, request

from latentsync.serving.core.errors import ServingError

#: HTTP status of every error code the server answers with (a test checks that every code raised
#: under latentsync/serving is here).
HTTP_STATUS: dict[str, int] = {
    # 400: the request is wrong
    "bad_parameter": 400,
    "bad_json": 400,
    "bad_channel": 400,
    "main_channel": 400,
    "no_file": 400,
    "empty_file": 400,
    "not_audio": 400,
    "not_video": 400,
    "too_short": 400,
    "too_long": 400,
    "bad_text": 400,
    "unknown_voice": 400,
    "bad_encoding": 400,
    "bad_sample_rate": 400,
    "bad_channels": 400,
    "odd_length": 400,
    "bad_samples": 400,
    "not_started": 400,
    "bad_type": 400,
    "bad_sdp": 400,
    "bad_handshake": 400,
    "no_media": 400,
    "unsupported_offer": 400,
    "unsupported_codec": 400,
    "no_allowed_candidate": 400,
    # 401, 403, 404, 405, 409
    "unauthorized": 401,
    "origin_not_allowed": 403,
    "media_not_allowed": 403,
    "not_found": 404,
    "no_channel": 404,
    "no_avatar": 404,
    "method_not_allowed": 405,
    "no_trickle": 405,
    "already_open": 409,
    "not_open": 409,
    "restart_needed": 409,
    "channel_not_ready": 409,
    "avatar_not_ready": 409,
    "avatar_in_use": 409,
    "face_too_small": 409,
    # 421: this server does not answer to that name (Host header)
    "bad_host": 421,
    # 413, 415: too big, wrong type
    "too_large": 413,
    "text_too_long": 413,
    "not_sdp": 415,
    # 429: too many
    "queue_full": 429,
    "rate_limited": 429,
    "too_many_streams": 429,
    "buffer_full": 429,
    "busy": 429,
    "too_many_viewers": 429,
    "too_many_clients": 429,
    "too_many_auth_failures": 429,
    # 500, 503, 507: the server cannot now
    "upload_failed": 500,
    "tts_failed": 500,
    "internal": 500,
    "starting": 503,
    "stopping": 503,
    "decode_timeout": 503,
    "tts_unavailable": 503,
    "webrtc_off": 503,
    "frames_off": 503,
    "webrtc_stopped": 503,
    "signalling_timeout": 503,
    "too_many_event_clients": 503,
    "too_many_connections": 503,
    "insufficient_storage": 507,
    "quota_exceeded": 507,
}

#: Where a route answers a code with another status: ``(endpoint, code) -> status``. An avatar id
#: in a ``PUT /channels/<name>`` body that names no avatar is a bad request, not a missing resource.
ROUTE_STATUS: dict[tuple[str, str], int] = {
    ("put_channel", "no_avatar"): 400,
}


class ApiError(ServingError):
    """An error the API itself raises (a missing form field, the rate limit...): a code of :data:`HTTP_STATUS`."""


def status_of(exc: ServingError) -> int:
    """The HTTP status for ``exc`` in this request: :data:`ROUTE_STATUS`, then :data:`HTTP_STATUS`, else 500."""
    return ROUTE_STATUS.get((request.endpoint or "", exc.code)) or HTTP_STATUS.get(exc.code, 500)


def error_response(code: str, message: str, status: int | None = None) -> Response:
    """The JSON error body ``{"error": {"code", "message"}}`` with the code's status (or ``status``)."""
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status or HTTP_STATUS.get(code, 500)
    return response
