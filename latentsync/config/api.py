"""The ``api`` section: the HTTP API's limits and access, and what it accepts from clients."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Seeds accepted from clients (``seed`` of uploads, ``/speak``, ``/ws/speech``): torch.Generator
#: takes 64-bit seeds; 31 bits keep them portable.
SEED_RANGE = (0, 2**31 - 1)
#: gunicorn threads beyond ``api.max_long_lived``: always free for health checks, uploads and cancels.
RESERVED_THREADS = 4


@dataclass(kw_only=True)
class ApiConfig:
    """HTTP API limits and access.

    ``token``: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <token>``.
    ``rate_limit_per_min``: uploads accepted per client address per minute (0: unlimited).
    ``decode_timeout_s``: seconds FFmpeg may take to decode one upload; past it the upload gets
    503 ``decode_timeout``.
    ``allowed_origins``: web origins (``scheme://host[:port]``) whose pages may send state-changing
    requests (POST, PUT, PATCH, DELETE) from a browser. Requests without an ``Origin`` header
    (curl, scripts) and same-origin pages served from a loopback address are always allowed;
    anything else gets 403 ``origin_not_allowed``.
    ``max_long_lived``: connections that hold a server thread for long (``GET /events`` streams and
    WebSockets, every channel together) at once; one more gets 503 ``too_many_connections``, so
    health checks, uploads and cancels always find a thread (gunicorn runs this many threads plus
    :data:`RESERVED_THREADS`). ``send_timeout_s``: a long-lived connection whose client takes no
    data for this long is dropped.
    ``mutations_per_min``: state-changing requests (POST, PUT, PATCH, DELETE) accepted per client
    address per minute, on every route (0: unlimited); ``auth_failures_per_min``: requests with a
    missing or wrong token per client address per minute before that client gets 429 for the rest
    of the minute (0: unlimited).
    ``max_json_kb``: the largest JSON request body (``PUT /channels/<name>``, ``POST /speak``...),
    in KiB; a larger one gets 413 ``too_large`` before it is read or parsed. It must hold a
    ``/speak`` body of ``speech_stream.max_text_chars`` characters (4 bytes each, + 1 KiB).
    ``stills_per_min``: avatar stills (``GET /avatars/<id>/still``) a client address may have made
    per minute (0: unlimited); only stills not in the cache count (each runs a face search in the
    server process, a second or two); past it: 429 ``rate_limited``.
    """

    max_audio_s: float = 300.0
    max_upload_mb: float = 50.0
    max_queued: int = 16
    token: str | None = None
    rate_limit_per_min: int = 120
    decode_timeout_s: float = 30.0
    allowed_origins: list[str] = field(default_factory=list)
    max_long_lived: int = 4
    send_timeout_s: float = 10.0
    mutations_per_min: int = 600
    auth_failures_per_min: int = 30
    max_json_kb: int = 64
    stills_per_min: int = 30
