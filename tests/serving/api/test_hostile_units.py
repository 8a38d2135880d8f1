"""Unit tests of hostile clients' cheap tricks (issue 35): no server, sockets in the test's process only."""

from __future__ import annotations

import socket
import threading
import time

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from latentsync.serving.api.websocket import (
    MESSAGE_OVERHEAD_BYTES,
    RECEIVE_BYTES,
    ConnectionClosed,
    ServerWebSocket,
    WebSocketLimits,
)


def _open_pair(limits: WebSocketLimits) -> tuple[ServerWebSocket, WSConnection, socket.socket]:
    """A :class:`ServerWebSocket` past its handshake on one end of a socket pair, and the client's end."""
    server_sock, client_sock = socket.socketpair()
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="localhost", target="/ws/speech")))
    assert any(isinstance(e, Request) for e in server.events())
    client.receive_data(server.send(AcceptConnection(extensions=[])))
    assert any(isinstance(e, AcceptConnection) for e in client.events())
    return ServerWebSocket(server_sock, server, limits), client, client_sock


def test_a_flood_of_empty_websocket_messages_fills_the_queue_and_stops_the_reader():
    """Each queued message costs MESSAGE_OVERHEAD_BYTES at least: empty ones hit max_queued_bytes too."""
    limits = WebSocketLimits(max_message_bytes=1 << 20, max_queued_bytes=100 * MESSAGE_OVERHEAD_BYTES, send_timeout_s=5)
    ws, client, client_sock = _open_pair(limits)
    frame = client.send(BytesMessage(data=b""))  # 6 bytes on the wire (masked, empty)
    sent = 0

    def flood() -> None:  # far more than one read of RECEIVE_BYTES; blocks once the server stops reading
        nonlocal sent
        try:
            for _ in range(40):
                client_sock.sendall(frame * 5000)
                sent += 5000
        except OSError:
            pass

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 5
        while ws.queued_bytes < limits.max_queued_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # what the reader would go on taking, were it not held back
        queued = len(ws._inbox)
        assert ws.queued_bytes == queued * MESSAGE_OVERHEAD_BYTES >= limits.max_queued_bytes
        assert queued <= RECEIVE_BYTES // len(frame) + 1  # one read past the bound, no more
        assert sent < 40 * 5000  # the client is held back by TCP
        assert ws.receive(timeout=1) == b""  # the messages still arrive, in order, as they were
    finally:
        ws.close()
        client_sock.close()
        sender.join(5)


class _ScriptedWebSocket:
    """What :class:`SpeechSession` reads from: the given messages, then a closed connection."""

    def __init__(self, messages: list[str | bytes]):
        self.messages, self.sent, self.connected = list(messages), [], True

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        if not self.messages:
            self.connected = False
            raise ConnectionClosed("closed")
        return self.messages.pop(0)

    def send(self, data: str | bytes) -> None:
        self.sent.append(data)


def test_an_empty_pcm_message_is_no_activity():
    """Only a message that carries something keeps a ``/ws/speech`` connection from its idle timeout."""
    from types import SimpleNamespace

    from latentsync.config import load_config
    from latentsync.serving.api.speech import SpeechSession
    from latentsync.serving.tasks.task import TaskState

    task = SimpleNamespace(task_id="t", state=TaskState.streaming, first_frame_on_air_monotonic=None, frames_streamed=0)
    utterance = SimpleNamespace(
        task=task,
        ended=False,
        end_reason=None,
        program=None,
        max_buffered_s=None,
        fps=25,
        buffered_s=lambda: 0.0,
        received_frames=lambda: 0,
    )
    runtime = SimpleNamespace(config=load_config())
    session = SpeechSession(_ScriptedWebSocket([b"", b"", b""]), runtime, "main", tasks=None)
    session.fmt, session.utterance = object(), utterance  # an open utterance: PCM is taken
    before = session._last_message = time.monotonic() - 1000.0
    session.run()
    assert session._last_message == before


def test_a_wrong_token_on_health_is_counted_like_on_every_route():
    """``/health`` is public without a token, but a wrong one there is 401 and counts: 429 past the limit."""
    from latentsync.config import load_config
    from latentsync.serving.api.app import PUBLIC_HEALTH_KEYS, create_app
    from latentsync.serving.runtime.runtime import Runtime

    token = "0123456789abcdef0123"
    config = load_config(None, [f"api.token={token}", "api.auth_failures_per_min=3"])
    client = create_app(Runtime(config)).test_client()  # built, never started
    public = client.get("/health")
    assert public.status_code == 503 and set(public.json) <= set(PUBLIC_HEALTH_KEYS)  # no header: not counted
    for _ in range(3):
        wrong = client.get("/health", headers={"Authorization": "Bearer wrong-guess-000000"})
        assert wrong.status_code == 401 and wrong.json["error"]["code"] == "unauthorized"
    for path in ("/health", "/channels/main/health", "/tasks"):  # the right token too, for the rest of the minute
        over = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert over.status_code == 429 and over.json["error"]["code"] == "too_many_auth_failures", path
    assert set(client.get("/health").json) <= set(PUBLIC_HEALTH_KEYS)  # the public part stays open
