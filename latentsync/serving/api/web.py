"""Browser-facing routes: WHEP signalling, the Server-Sent Events feed and the control page.

Routes (docs/webrtc.md):
    ``POST /whep`` (``application/sdp`` offer) → 201, SDP answer, ``Location: /whep/<id>``;
    ``DELETE /whep/<id>`` → 200; ``PATCH /whep/<id>`` → 405 (no trickle ICE: the answer carries all
    our candidates); ``OPTIONS`` on both → 204 CORS pre-flight (answered before the token check,
    as browsers send pre-flights without credentials).
    ``GET /events``: ``text/event-stream`` of ``state``, ``task``, ``viewers``, ``health`` events;
    403 ``origin_not_allowed`` for a page of a foreign origin (the WebSockets' rule, ``api.allowed_origins``);
    503 ``too_many_event_clients`` past ``ui.max_event_clients`` on the channel, 503
    ``too_many_connections`` past ``api.max_long_lived`` (:mod:`latentsync.serving.api.admission`).
    ``/channels/<name>/whep[/<id>]`` and ``/channels/<name>/events``: the same for channel
    ``<name>`` (the paths above are channel ``main``'s; docs/channels.md); unknown: 404 ``no_channel``.
    ``GET /`` and ``GET /ui/<file>``: the control page (static files in this package; public,
    they hold no secret: the page asks for the API token when the server has one).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from flask import Blueprint, Flask, Response, jsonify, request, send_from_directory, stream_with_context

from latentsync.config import DEFAULT_CHANNEL, MAX_SDP_BYTES
from latentsync.serving.api.admission import Admission, ConnectionKind
from latentsync.serving.api.channels import find_channel
from latentsync.serving.api.errors import ApiError, error_response
from latentsync.serving.api.websocket import wsgi_socket
from latentsync.serving.egress.whep import WhepError

STATIC_DIR = Path(__file__).resolve().parent / "static"
PUBLIC_PATHS = frozenset({"/", "/ui/index.html", "/ui/app.js", "/ui/style.css"})  # no token needed
SSE_KEEPALIVE_S = 10.0  # a comment line this often: proxies keep the stream open, dead clients are found
#: Paths of WHEP resources (CORS and pre-flights apply to these): ``/whep``, ``/whep/<id>`` and the
#: same under ``/channels/<name>``.
WHEP_PATH_RE = re.compile(r"(/channels/[^/]+)?/whep(/[^/]+)?")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, DELETE, PATCH, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, Accept-Patch, Link",
    "Access-Control-Max-Age": "600",
}


def register_web(app: Flask, runtime, admission: Admission, origin_ok: Callable[[str | None], bool]) -> None:
    """Add the WHEP, events and page routes to ``app``.

    Args:
        app: The API app (its bearer-token check applies to these routes except the page files and
            CORS pre-flights).
        runtime: The :class:`latentsync.serving.runtime.Runtime` (its channels' ``webrtc`` hubs and ``events``).
        admission: The app's long-lived connections (``ui.max_event_clients`` event streams per
            channel, ``api.max_long_lived`` in all): an event stream holds a slot while it is open.
        origin_ok: ``origin_ok(origin_header) -> bool`` (app.py's :func:`origin_allowed` rule, as
            the WebSockets use it): an event stream asked by a page of a foreign origin is 403
            ``origin_not_allowed`` before it takes a slot.
    """
    bp = Blueprint("web", __name__)
    ui = runtime.config.ui

    def preflight():
        if request.method == "OPTIONS" and WHEP_PATH_RE.fullmatch(request.path):
            response = Response(status=204)
            response.headers.update(CORS_HEADERS)
            response.headers["Accept-Post"] = "application/sdp"
            return response
        return None

    app.before_request_funcs.setdefault(None, []).insert(0, preflight)  # before the token check

    @bp.after_request
    def cors(response: Response) -> Response:
        if WHEP_PATH_RE.fullmatch(request.path):
            response.headers.update(CORS_HEADERS)
        return response

    def hub(name: str):
        webrtc = find_channel(runtime, name).webrtc
        if webrtc is None:
            raise WhepError("webrtc_off", "the WebRTC egress is off (webrtc.enabled) or not started yet")
        return webrtc

    @bp.post("/whep", defaults={"name": DEFAULT_CHANNEL})
    @bp.post("/channels/<name>/whep")
    def whep_offer(name: str):
        if request.mimetype != "application/sdp":
            raise WhepError("not_sdp", "the offer must be sent as Content-Type: application/sdp")
        if (request.content_length or 0) > MAX_SDP_BYTES:
            raise WhepError("too_large", f"SDP offer larger than {MAX_SDP_BYTES} bytes")
        body = request.get_data(cache=False)
        if len(body) > MAX_SDP_BYTES:
            raise WhepError("too_large", f"SDP offer larger than {MAX_SDP_BYTES} bytes")
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            raise WhepError("bad_sdp", "the SDP offer is not UTF-8 text") from None
        if not offer.lstrip().startswith("v=0"):
            raise WhepError("bad_sdp", "the body is not an SDP offer (it must start with v=0)")
        session_id, answer = hub(name).answer(offer)
        response = Response(answer, status=201, content_type="application/sdp")
        prefix = "" if name == DEFAULT_CHANNEL else f"/channels/{name}"
        response.headers["Location"] = f"{prefix}/whep/{session_id}"
        response.headers["ETag"] = f'"{session_id}"'
        return response

    @bp.delete("/whep/<session_id>", defaults={"name": DEFAULT_CHANNEL})
    @bp.delete("/channels/<name>/whep/<session_id>")
    def whep_delete(name: str, session_id: str):
        if not hub(name).end(session_id):
            raise WhepError("not_found", f"no WHEP session {session_id!r}")
        return jsonify({"session_id": session_id, "status": "closed"})

    @bp.route("/whep/<session_id>", methods=["PATCH"], defaults={"name": DEFAULT_CHANNEL})
    @bp.route("/channels/<name>/whep/<session_id>", methods=["PATCH"])
    def whep_patch(name: str, session_id: str):
        response = error_response("no_trickle", "trickle ICE is not supported: the answer holds all candidates")
        response.headers["Allow"] = "DELETE, OPTIONS"
        return response

    @bp.get("/events", defaults={"name": DEFAULT_CHANNEL})
    @bp.get("/channels/<name>/events")
    def events(name: str):
        events = find_channel(runtime, name).events
        if not origin_ok(request.headers.get("Origin")):  # before a long-lived slot is taken
            raise ApiError(
                "origin_not_allowed",
                f"event streams for web pages of {request.headers.get('Origin')!r} are not allowed "
                "(api.allowed_origins)",
            )
        slot = admission.admit(ConnectionKind.events, name)
        try:
            sub = events.subscribe()  # None only once the channel's feed is closed (its limit is the slot's)
            if sub is None:
                raise ApiError("stopping", f"channel {name!r} is stopping: its event feed is closed")
            sock = wsgi_socket(request.environ)
            if sock is not None:  # a client that stops reading is dropped after api.send_timeout_s
                sock.settimeout(runtime.config.api.send_timeout_s)

            def stream():
                yield b"retry: 2000\n\n"
                while True:
                    data = sub.get(SSE_KEEPALIVE_S)
                    if data is None:
                        return
                    yield data or b": keepalive\n\n"

            response = Response(stream_with_context(stream()), content_type="text/event-stream")
        except BaseException:
            slot.release()
            raise
        response.call_on_close(sub.close)  # the WSGI server closes every response, started or not
        response.call_on_close(slot.release)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Accel-Buffering"] = "no"
        return response

    if ui.page:

        @bp.get("/")
        def page():
            return send_from_directory(STATIC_DIR, "index.html", max_age=0)

        @bp.get("/ui/<path:name>")
        def page_file(name: str):
            return send_from_directory(STATIC_DIR, name, max_age=0)

    app.register_blueprint(bp)
