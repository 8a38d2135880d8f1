"""The frames WebSocket of every channel: ``/ws/frames`` (main) and ``/channels/<name>/ws/frames``.

A client sends a JSON ``hello`` (format, size, audio), gets a JSON ``ready`` with what it will
receive, then one binary message per tick (docs/frames-protocol.md). Auth and Origin rules are
``/ws/speech``'s: ``Authorization: Bearer <token>`` or a single-use ``?ticket=`` (browsers), 403
``origin_not_allowed`` for a foreign web page. Limits: ``frames.max_clients`` per channel (one more
gets 429 ``too_many_clients``; a client is counted off before the server sends it a close, so it
may reconnect at once) and one of ``api.max_long_lived`` each (503 ``too_many_connections``, held
until the request's thread is done), both kept by :mod:`latentsync.serving.api.admission`. An
unknown channel is 404 ``no_channel``.
"""

from __future__ import annotations

import json
import logging
import re

from flask import Flask, request

from latentsync.config import DEFAULT_CHANNEL
from latentsync.serving.api.admission import Admission, ConnectionKind
from latentsync.serving.api.channels import channel_in_path, find_channel
from latentsync.serving.api.errors import error_response
from latentsync.serving.api.websocket import ConnectionClosed, ServerWebSocket, WebSocketLimits, websocket_route
from latentsync.serving.egress.frames_protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_HELLO_TIMEOUT,
    HEADER_BYTES,
    VERSION,
    HelloRefused,
    parse_hello,
)

logger = logging.getLogger(__name__)

#: Paths of the WebSocket: ``/ws/frames`` (channel main) and ``/channels/<name>/ws/frames``.
FRAMES_PATH_RE = re.compile(r"(/channels/[^/]+)?/ws/frames")
#: How long the handler waits for the next tick before it looks at the connection again, in seconds.
POLL_S = 0.2
#: Largest message a frames client may send (its hello; anything later is read and ignored).
MAX_CLIENT_MESSAGE_BYTES = 4096


def register_frames_routes(app: Flask, runtime, origin_ok, admission: Admission) -> None:
    """Add ``/ws/frames`` and ``/channels/<name>/ws/frames`` to the app.

    Args:
        app: The Flask app (its ``before_request`` hooks already check the token or ticket).
        runtime: Owns the channels (their ``frames`` hubs).
        origin_ok: ``origin_ok(origin_header) -> bool`` (app.py's :func:`origin_allowed` rule).
        admission: The app's long-lived connections (``frames.max_clients`` per channel,
            ``api.max_long_lived`` in all); installed on ``app``.
    """
    cfg = runtime.config.frames
    limits = WebSocketLimits(
        max_message_bytes=MAX_CLIENT_MESSAGE_BYTES,
        max_queued_bytes=4 * MAX_CLIENT_MESSAGE_BYTES,
        send_timeout_s=runtime.config.api.send_timeout_s,
        message_limit_name="a frames client's largest message",
    )

    @app.before_request
    def frames_admission():
        name = channel_in_path(FRAMES_PATH_RE, request.path)
        if name is None:
            return None
        channel = find_channel(runtime, name)
        if not cfg.enabled:
            return error_response("frames_off", "the frames WebSocket is off (frames.enabled)")
        if channel.frames is None or channel.frames.closed:
            return error_response("starting", "the channel's stream is not running yet; retry shortly")
        if not origin_ok(request.headers.get("Origin")):
            return error_response(
                "origin_not_allowed",
                f"WebSockets from web pages of {request.headers.get('Origin')!r} are not allowed (api.allowed_origins)",
            )
        # the slot is taken before the handshake answers (the next client sees it taken) and held
        # until the request is torn down
        admission.admit_request(ConnectionKind.frames, name)
        return None

    def release_channel_slot() -> None:
        """Give the request's ``frames.max_clients`` place back (once; a no-op after that).

        The handler calls it before it sends a close or leaves its channel, so a client that was
        told "closed" and reconnects at once finds its place free; the thread's ``api.max_long_lived``
        place stays taken until the request is torn down.
        """
        slot = admission.request_slot()
        if slot is not None:
            slot.leave_kind()

    def ws_frames(ws: ServerWebSocket, name: str):
        channel = runtime.channel(name)
        hub = channel.frames if channel is not None else None
        if hub is None or hub.closed:
            release_channel_slot()
            ws.close(CLOSE_GOING_AWAY, "going_away: the channel's stream stopped")
            return
        hello = ws.receive(timeout=cfg.hello_timeout_s)
        if hello is None:
            limit = f"frames.hello_timeout_s = {cfg.hello_timeout_s:g} s"
            release_channel_slot()
            ws.close(CLOSE_HELLO_TIMEOUT, f"hello_timeout: no hello within {limit}")
            return
        try:
            subscription = parse_hello(hello, hub.width, hub.height)
        except HelloRefused as exc:
            release_channel_slot()
            ws.close(exc.code, exc.reason)
            return
        client = hub.subscribe(subscription)
        try:
            ws.send(
                json.dumps(
                    {
                        "type": "ready",
                        "version": VERSION,
                        "header_bytes": HEADER_BYTES,
                        "channel": name,
                        "format": subscription.format.name,
                        "width": subscription.width,
                        "height": subscription.height,
                        "audio": subscription.audio.name,
                        "fps": hub.fps,
                        "sample_rate_hz": hub.sample_rate_hz,
                    }
                )
            )
            while ws.connected:
                while ws.receive(timeout=0) is not None:  # nothing is expected after the hello
                    pass
                message = client.next_message(POLL_S)
                if message is not None:
                    ws.send(message)
                elif client.closed:
                    release_channel_slot()
                    hub.unsubscribe(client)
                    ws.close(CLOSE_GOING_AWAY, "going_away: the channel's stream stopped")
                    return
        except ConnectionClosed:
            pass
        finally:
            release_channel_slot()  # before the client leaves the hub's count (health's frames.clients)
            hub.unsubscribe(client)

    websocket_route(app, "/ws/frames", "ws_frames", limits, defaults={"name": DEFAULT_CHANNEL})(ws_frames)
    websocket_route(app, "/channels/<name>/ws/frames", "ws_frames_channel", limits)(ws_frames)
