"""The client's exceptions: every refusal of the server as a typed exception with its HTTP status and code.

The server answers every error with ``{"error": {"code": ..., "message": ...}}`` and one HTTP status
per code (the server's ``latentsync/serving/api/errors.py``); :func:`error_from_response` turns such
an answer (a REST call or a refused WebSocket handshake) into the exception of its status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class LatentSyncError(Exception):
    """Base of every error this client raises.

    Attributes:
        status: The HTTP status the server answered (None: no HTTP answer, e.g. a stream event or a
            network failure).
        code: The server's error code (``"no_channel"``, ``"queue_full"``...; None when unknown).
        message: The server's message, or ours.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        parts = [str(self.status)] if self.status is not None else []
        if self.code:
            parts.append(self.code)
        prefix = " ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class BadRequest(LatentSyncError):
    """400: the request is wrong (``bad_parameter``, ``not_audio``, ``too_short``, ``bad_text``...)."""


class Unauthorized(LatentSyncError):
    """401 ``unauthorized``: the token (``api.token``) or the WebSocket ticket is missing or wrong."""


class Forbidden(LatentSyncError):
    """403: ``origin_not_allowed`` or ``media_not_allowed``."""


class NotFound(LatentSyncError):
    """404: ``no_channel``, ``not_found`` (a task), ``no_avatar``."""


class Conflict(LatentSyncError):
    """409: ``avatar_in_use``, ``restart_needed``, ``channel_not_ready``, ``already_open``..."""


class PayloadTooLarge(LatentSyncError):
    """413: ``too_large`` (a body over the server's limit) or ``text_too_long``."""


class RetryLater(LatentSyncError):
    """An answer that says when to try again (429 and 503 may carry ``Retry-After``).

    Attributes:
        retry_after_s: The server's ``Retry-After`` in seconds, when it sent one (else None).
    """

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None, retry_after_s: float | None = None
    ):
        super().__init__(message, status=status, code=code)
        self.retry_after_s = retry_after_s


class RateLimited(RetryLater):
    """429: ``rate_limited``, ``queue_full``, ``too_many_streams``, ``too_many_clients``, ``busy``..."""


class ServerError(LatentSyncError):
    """500 and other 5xx without a class of their own (``upload_failed``, ``tts_failed``, ``internal``)."""


class Unavailable(RetryLater, ServerError):
    """503: the server cannot now (``starting``, ``stopping``, ``too_many_connections``, ``frames_off``...)."""


class InsufficientStorage(ServerError):
    """507: ``insufficient_storage`` or ``quota_exceeded``."""


class ConnectionFailed(LatentSyncError):
    """The server could not be reached or the connection broke before an answer (no HTTP status)."""


class ProtocolError(LatentSyncError):
    """The server sent something this client cannot read (a bad frame header, a non-JSON event...)."""


class StreamClosed(LatentSyncError):
    """A WebSocket (``/ws/speech``, ``/ws/frames``) was closed other than normally.

    Attributes:
        close_code: The WebSocket close code (``4400`` bad hello, ``4413`` too large, ``4415``
            unknown format, ``1001`` going away, ``1009`` message too big, ``1006`` no close frame...).
        reason: The close reason (``"<word>: <explanation>"`` from this server).
    """

    def __init__(self, close_code: int | None, reason: str):
        word = reason.split(":", 1)[0].strip() if reason else None
        super().__init__(f"connection closed ({close_code}): {reason or 'no reason'}", code=word or None)
        self.close_code = close_code
        self.reason = reason


class StreamRefused(LatentSyncError):
    """The speech stream answered a message with an ``error`` event (``bad_sample_rate``, ``not_open``...).

    The connection stays open (unless the server closes it); ``code`` and ``message`` are the event's.
    """


_BY_STATUS: dict[int, type[LatentSyncError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Unavailable,
    507: InsufficientStorage,
}


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    for key, value in headers.items():
        if key.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None  # an HTTP date: this server never sends one
    return None


def error_from_response(status: int, body: bytes | str, headers: Mapping[str, str] | None = None) -> LatentSyncError:
    """The typed exception for a non-2xx answer of the server.

    Args:
        status: The HTTP status (e.g. 404).
        body: The answer's body; the server's ``{"error": {"code", "message"}}`` when it is one,
            else anything (its first 200 characters become the message).
        headers: The answer's headers (``Retry-After`` in seconds fills ``retry_after_s``).

    Returns:
        An instance of the class of ``status`` (:class:`NotFound` for 404, :class:`RateLimited` for
        429...), :class:`ServerError` for other 5xx, else :class:`LatentSyncError`; never raised here.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    code: str | None = None
    message = text[:200] or f"HTTP {status}"
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        code = str(err["code"]) if err.get("code") is not None else None
        message = str(err.get("message") or code or message)
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else LatentSyncError)
    if issubclass(cls, RetryLater):
        return cls(message, status=status, code=code, retry_after_s=_retry_after_s(headers or {}))
    return cls(message, status=status, code=code)
