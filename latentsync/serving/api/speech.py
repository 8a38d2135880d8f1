"""Front doors of streamed speech, on every channel: ``/ws/speech`` and ``POST /speak``.

``/ws/speech`` and ``/speak`` are channel ``main``'s; ``/channels/<name>/ws/speech`` and
``/channels/<name>/speak`` any channel's. Each picks its source
(:mod:`latentsync.serving.ingest.speech_sources`: a text, or PCM and texts from the socket) and
opens it on the channel's TaskManager (:meth:`TaskManager.open_source`, the one speech path:
docs/streaming-speech.md).
Protocol, events and error codes: docs/streaming-speech.md.

Auth: as every route, ``Authorization: Bearer <token>`` when ``api.token`` is set; a browser's
WebSocket cannot set headers, so it first gets a single-use ticket (``POST /ws/tickets`` with the
token, valid for :data:`~latentsync.serving.api.access.TICKET_TTL_S`) and connects with
``?ticket=...``: the token itself is never in a URL (nor in an access log). A WebSocket handshake
from a browser page of a foreign origin gets 403 ``origin_not_allowed``, as state-changing HTTP
requests do. How many connections may be open at once (503 ``too_many_connections``) is
:mod:`latentsync.serving.api.admission`'s to say; the connection's bounds (no compression, a
bounded receive queue with backpressure, send deadlines) are :mod:`latentsync.serving.api.websocket`'s.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time

from flask import Flask, jsonify, request, url_for

from latentsync.config import DEFAULT_CHANNEL
from latentsync.serving.api.admission import Admission, ConnectionKind
from latentsync.serving.api.channels import channel_in_path, find_channel
from latentsync.serving.api.errors import error_response
from latentsync.serving.api.json_body import json_body, parse_json
from latentsync.serving.api.websocket import ConnectionClosed, WebSocketLimits, websocket_route
from latentsync.serving.core.errors import ServingError
from latentsync.serving.ingest.speech_sources import StreamSource, TextSource
from latentsync.serving.ingest.text_to_speech import SpeechFeeder
from latentsync.serving.tasks.speech_audio import PcmFormat, SpeechError
from latentsync.serving.tasks.task import FINAL_STATES

logger = logging.getLogger(__name__)

#: Paths of the WebSocket: ``/ws/speech`` (channel main) and ``/channels/<name>/ws/speech``.
WS_PATH_RE = re.compile(r"(/channels/[^/]+)?/ws/speech")
#: Seconds between ``progress`` events.
PROGRESS_INTERVAL_S = 0.5
#: Shortest time between two ``slow_down`` events, in seconds.
SLOW_DOWN_INTERVAL_S = 1.0
#: Poll period of the WebSocket loop (events are sent at most this late), in seconds.
WS_POLL_S = 0.02
#: Messages of the events an utterance that was ended for it gets (its ``error`` event).
END_MESSAGES = {
    "idle_timeout": "nothing received for speech_stream.idle_timeout_s: the utterance was ended",
    "too_slow": "audio arrived at less than speech_stream.min_arrival_ratio of real time for "
    "speech_stream.starve_timeout_s with nothing left to play: the utterance was ended",
    "utterance_timeout": "the utterance was open longer than speech_stream.max_utterance_s: it was ended",
}


def register_speech_routes(app: Flask, runtime, origin_ok, admission: Admission) -> None:
    """Add the WebSocket and ``POST /speak`` of every channel to the app.

    Args:
        app: The Flask app (its ``before_request`` hooks already check the token).
        runtime: Owns the channels (their TaskManagers) and the text-to-speech service.
        origin_ok: ``origin_ok(origin_header) -> bool`` (app.py's :func:`origin_allowed` rule).
        admission: The app's long-lived connections (``speech_stream.max_open`` speech WebSockets
            on all channels, ``api.max_long_lived`` in all); installed on ``app``.
    """
    ss = runtime.config.speech_stream
    limits = WebSocketLimits(
        max_message_bytes=ss.max_message_bytes,
        max_queued_bytes=ss.max_queued_bytes,
        send_timeout_s=runtime.config.api.send_timeout_s,
    )

    @app.before_request
    def ws_origin():
        name = channel_in_path(WS_PATH_RE, request.path)
        if name is None:
            return None
        find_channel(runtime, name)
        if not origin_ok(request.headers.get("Origin")):
            return error_response(
                "origin_not_allowed",
                f"WebSockets from web pages of {request.headers.get('Origin')!r} are not allowed (api.allowed_origins)",
            )
        # the slot is taken here, before the handshake answers, so a client that connects right
        # after another sees it taken; it is held until the request is torn down (session ended)
        admission.admit_request(ConnectionKind.speech, name)
        return None

    def channel_tasks(name: str):
        channel = find_channel(runtime, name)
        tasks = None if runtime.stopped else channel.tasks
        if tasks is None or runtime.speech is None:
            raise SpeechError("starting", "the lip-sync engine is not ready yet; retry shortly")
        return tasks

    @app.post("/speak", defaults={"name": DEFAULT_CHANNEL})
    @app.post("/channels/<name>/speak")
    def speak(name: str):
        received = (time.time(), time.monotonic())
        body = json_body(runtime.config.api.max_json_kb)  # capped and parsed first: 413/400 in any state
        tasks = channel_tasks(name)
        source = TextSource.from_request(runtime.speech, body)
        opened = tasks.open_source(source, received)
        utterance = opened.utterance
        return jsonify(
            {
                "task_id": utterance.task_id,
                "status": "queued",
                "position": opened.position,  # as POST /generate_video gives it
                "status_url": url_for("get_task", name=name, task_id=utterance.task_id),
            }
        ), 202

    def ws_speech(ws, name: str):
        SpeechSession(ws, runtime, name, lambda: channel_tasks(name)).run()  # slot: ws_origin, teardown

    websocket_route(app, "/ws/speech", "ws_speech", limits, defaults={"name": DEFAULT_CHANNEL})(ws_speech)
    websocket_route(app, "/channels/<name>/ws/speech", "ws_speech_channel", limits)(ws_speech)


class SpeechSession:
    """One WebSocket connection: at most one open utterance at a time on its channel, events back to the client.

    Args:
        ws: The simple-websocket connection.
        runtime: The runtime (its text-to-speech service).
        channel: The channel's name.
        tasks: Returns the channel's TaskManager (raises ``no_channel`` once it was deleted,
            ``starting`` before the engine is ready).
    """

    def __init__(self, ws, runtime, channel: str, tasks):
        self.ws = ws
        self.runtime = runtime
        self.channel = channel
        self._tasks = tasks
        self._idle_timeout_s = runtime.config.speech_stream.idle_timeout_s
        self._last_message = time.monotonic()
        self._send_lock = threading.Lock()
        self._errors: list[tuple[str, str]] = []
        self._errors_lock = threading.Lock()
        self.utterance = None
        self.feeder: SpeechFeeder | None = None
        self.fmt: PcmFormat | None = None
        self._on_air_sent = False
        self._end_sent = False
        self._last_progress = 0.0
        self._last_slow_down = 0.0

    def send(self, event: str, **fields) -> None:
        """Send a JSON event ``{"type": event, **fields}`` to the client."""
        with self._send_lock:
            self.ws.send(json.dumps({"type": event, **fields}))

    def send_error(self, code: str, message: str) -> None:
        """Send an ``error`` event."""
        self.send("error", code=code, message=message)

    def _feeder_error(self, code: str, message: str) -> None:  # feeder thread: handed to the loop
        with self._errors_lock:
            self._errors.append((code, message))

    def run(self) -> None:
        """Serve the connection until the client closes it (an open utterance then ends)."""
        try:
            while True:
                try:
                    message = self.ws.receive(timeout=WS_POLL_S)
                except ConnectionClosed:
                    break
                self._report()
                if message is None and not self.ws.connected:
                    break
                if message is not None:
                    try:
                        if isinstance(message, bytes):
                            self._pcm(message)
                        else:
                            self._control(message)
                        if message:  # only a valid message keeps the connection; an empty PCM one is none
                            self._last_message = time.monotonic()
                    except ServingError as exc:
                        self.send_error(exc.code, exc.message)
                        if exc.code == "no_channel":
                            break
                # checked after every message too: a stream of refused messages is no activity
                if self.utterance is None and time.monotonic() - self._last_message > self._idle_timeout_s:
                    limit = f"speech_stream.idle_timeout_s = {self._idle_timeout_s:g} s"
                    self.send_error("idle_timeout", f"no utterance and no valid message for {limit}: closing")
                    break
        except ConnectionClosed:
            pass
        finally:
            self._disconnect()

    def _disconnect(self) -> None:
        """The client went away: an open utterance ends (what it sent plays to its end)."""
        if self.feeder is not None and self.utterance is not None and not self.utterance.ended:
            logger.info(
                "ws client left during utterance %s: it ends with what it has",
                self.utterance.task_id,
                extra={"task_id": self.utterance.task_id},
            )
            self.feeder.end()

    def _open(self) -> bool:
        return self.utterance is not None and not self.utterance.ended and self.utterance.task.state not in FINAL_STATES

    def _pcm(self, data: bytes) -> None:
        if self.fmt is None:
            raise SpeechError(
                "not_started", 'send the opening JSON message ({"type": "start", "sample_rate": ...}) before PCM'
            )
        if not self._open():
            raise SpeechError("not_open", "the utterance is over: open a new one")
        if not data:
            return
        mono = self.fmt.decode(data)
        assert self.feeder is not None
        self.feeder.push_pcm(mono, self.fmt.sample_rate_hz)

    def _control(self, text: str) -> None:
        msg = parse_json(text, "a text message")  # 400 bad_json: not JSON, or nested past parsing
        if not isinstance(msg, dict):
            raise SpeechError("bad_json", "text messages must be JSON objects")
        kind = msg.get("type", "start")
        if kind == "start":
            self._start(msg)
        elif kind == "end":
            if not self._open():
                raise SpeechError("not_open", "no open utterance to end")
            assert self.feeder is not None
            self.feeder.end()
        elif kind == "cancel":
            if self.utterance is None:
                raise SpeechError("not_open", "no utterance to cancel")
            self._tasks().cancel(self.utterance.task_id)  # one call: its feeder goes with it
        elif kind == "text":
            if not self._open():
                raise SpeechError("not_open", "open an utterance before sending text")
            service = self.runtime.speech
            if service is None:
                raise SpeechError("starting", "the lip-sync engine is not ready yet; retry shortly")
            text, voice, rate = service.check_text(msg.get("text"), msg.get("voice"), msg.get("rate"))
            assert self.feeder is not None
            self.feeder.push_text(text, voice, rate)
        else:
            raise SpeechError("bad_type", f"unknown message type {kind!r} (start, end, cancel, text)")

    def _start(self, msg: dict) -> None:
        if self._open():
            raise SpeechError("already_open", "an utterance is open on this connection: end it first")
        source = StreamSource.from_message(self.runtime.speech, msg, self._feeder_error)
        utterance = self._tasks().open_source(source).utterance
        self.fmt = source.fmt
        self.utterance = utterance
        self.feeder = source.feeder
        self._on_air_sent = False
        self._end_sent = False
        with self._errors_lock:
            self._errors.clear()
        prefix = "" if self.channel == DEFAULT_CHANNEL else f"/channels/{self.channel}"
        self.send("accepted", task_id=utterance.task_id, status_url=f"{prefix}/tasks/{utterance.task_id}")

    def _report(self) -> None:
        """Send the events due: feeder errors, on_air, an ended utterance's reason, slow_down, progress, done."""
        with self._errors_lock:
            errors, self._errors = self._errors, []
        for code, message in errors:
            self.send_error(code, message)
        u = self.utterance
        if u is None:
            return
        task = u.task
        now = time.monotonic()
        if not self._on_air_sent and task.first_frame_on_air_monotonic is not None:
            self._on_air_sent = True
            first_byte = u.first_byte_monotonic

            def since_first_byte(t: float | None) -> float | None:
                return round(t - first_byte, 3) if t is not None and first_byte is not None else None

            program = u.program
            self.send(
                "on_air",
                task_id=task.task_id,
                first_byte_to_air_s=since_first_byte(task.first_frame_on_air_monotonic),
                chunk0_audio_s=since_first_byte(program.chunk_audio_at.get(0) if program else None),
                chunk0_ready_s=since_first_byte(program.first_chunk_monotonic if program else None),
            )
        if u.end_reason in END_MESSAGES and not self._end_sent:
            self._end_sent = True
            self.send_error(u.end_reason, END_MESSAGES[u.end_reason])
        buffered = u.buffered_s()
        limit = u.max_buffered_s
        if (
            limit is not None
            and not u.ended
            and buffered > limit / 2
            and now - self._last_slow_down >= SLOW_DOWN_INTERVAL_S
        ):
            self._last_slow_down = now
            self.send("slow_down", task_id=task.task_id, buffered_s=round(buffered, 3), max_buffered_s=limit)
        if task.state in FINAL_STATES:
            program = u.program
            self.send(
                "done",
                task_id=task.task_id,
                status=task.state.value,
                error=task.error,
                frames_streamed=task.frames_streamed,
                underrun_ticks=program.underrun_ticks if program else 0,
            )
            self.utterance = None
            self.feeder = None
            self._last_message = now  # the connection's idle time counts from here
            return
        if now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            program = u.program
            self.send(
                "progress",
                task_id=task.task_id,
                status=task.state.value,
                frames_streamed=task.frames_streamed,
                received_s=round(u.received_frames() / u.fps, 3),
                buffered_s=round(buffered, 3),
                underrun_ticks=program.underrun_ticks if program else 0,
            )
