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


def test_x_forwarded_for_is_believed_only_from_trusted_proxies_walking_from_the_right():
    from latentsync.serving.api.proxies import TrustedProxies

    proxies = TrustedProxies(["10.0.0.0/8", "::1"])
    assert proxies.client_address("10.0.0.7", "198.51.100.9") == "198.51.100.9"
    # The client's own header stays to the left of what our proxy appended: it cannot choose its address.
    assert proxies.client_address("10.0.0.7", "1.2.3.4, 198.51.100.9") == "198.51.100.9"
    # Two proxies of ours: skip both trusted hops.
    assert proxies.client_address("10.0.0.7", "1.2.3.4, 198.51.100.9, 10.1.1.1") == "198.51.100.9"
    assert proxies.client_address("::1", "[2001:db8::5]:4711") == "2001:db8::5"
    assert proxies.client_address("10.0.0.7", "198.51.100.9:5555") == "198.51.100.9"
    assert proxies.client_address("::ffff:10.0.0.7", "198.51.100.9") == "198.51.100.9"  # IPv4-mapped peer
    # Garbage or "unknown" stops the walk at the last address a proxy of ours vouched for.
    assert proxies.client_address("10.0.0.7", "198.51.100.9, unknown") == "10.0.0.7"
    assert proxies.client_address("10.0.0.7", "garbage, 10.1.1.1") == "10.1.1.1"
    assert proxies.client_address("10.0.0.7", "") == "10.0.0.7"
    # An untrusted peer's header is ignored; so is everybody's with no proxy configured.
    assert proxies.client_address("198.51.100.9", "10.0.0.1") == "198.51.100.9"
    assert TrustedProxies([]).client_address("10.0.0.7", "198.51.100.9") == "10.0.0.7"
    # A header of a thousand hops: only the rightmost ones are read.
    assert proxies.client_address("10.0.0.7", ", ".join(["10.2.2.2"] * 1000)) == "10.2.2.2"


def test_behind_a_trusted_proxy_each_client_has_its_own_auth_failure_bucket_and_a_forged_header_buys_nothing():
    """Issue 35: behind nginx every client shared the proxy's address: one guesser locked everyone out."""
    from latentsync.config import load_config
    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime

    token = "0123456789abcdef0123"
    overrides = [f"api.token={token}", "api.auth_failures_per_min=3", "server.trusted_proxies=[10.0.0.5]"]
    config = load_config(None, overrides)
    client = create_app(Runtime(config)).test_client()  # built, never started
    wrong = {"Authorization": "Bearer wrong-guess-000000"}
    right = {"Authorization": f"Bearer {token}"}

    def get(peer: str, forwarded: str | None, headers: dict) -> int:
        extra = {"X-Forwarded-For": forwarded} if forwarded else {}
        return client.get("/tasks", headers={**headers, **extra}, environ_base={"REMOTE_ADDR": peer}).status_code

    # Through the proxy: client A guesses until locked out; client B, behind the same proxy, is not.
    assert [get("10.0.0.5", "198.51.100.1", wrong) for _ in range(4)] == [401, 401, 401, 429]
    assert get("10.0.0.5", "198.51.100.1", right) == 429
    assert get("10.0.0.5", "198.51.100.2", right) == 200
    # Straight to the server, a guesser naming a new address in each header is still one client.
    assert [get("203.0.113.7", f"192.0.2.{i}", wrong) for i in range(4)] == [401, 401, 401, 429]
    # ... and cannot borrow a locked-out or a fresh client's identity through the header either.
    assert get("203.0.113.8", "198.51.100.1", right) == 200


def test_a_trusted_proxy_is_exempt_from_the_per_address_connection_cap_and_no_one_else():
    """``max_connections_per_ip`` 1: a second connection from a trusted proxy is served, from anyone else 503."""
    import http.client

    from flask import Flask

    from latentsync.serving.api.http_server import GuardedWSGIServer
    from latentsync.serving.api.proxies import TrustedProxies

    app = Flask("cap")
    app.get("/")(lambda: "ok")
    server = GuardedWSGIServer(
        "127.0.0.1",
        0,
        app,
        header_timeout_s=5,
        body_timeout_s=5,
        max_connections_per_ip=1,
        max_connections=16,
        trusted_proxies=TrustedProxies(["127.0.0.5"]),
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    held = []
    try:
        port = server.server_address[1]

        def second_answer(source: str) -> int:
            first = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
            held.append(first)  # holds its address's place, silent
            time.sleep(0.2)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
            conn.request("GET", "/")
            status = conn.getresponse().status
            conn.close()
            return status

        assert second_answer("127.0.0.6") == 503
        assert second_answer("127.0.0.5") == 200
    finally:
        for sock in held:
            sock.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_stopping_server_answers_the_requests_in_flight_and_does_not_wait_for_streams():
    """shutdown() then drain(): a slow PUT in flight is answered whole; an event stream is not waited for."""
    import http.client
    import json

    from flask import Flask, Response

    from latentsync.serving.api.http_server import GuardedWSGIServer

    release, stream_open = threading.Event(), threading.Event()
    app = Flask("drain")

    @app.put("/slow")
    def slow():
        release.wait(10)
        return {"applied": True, "padding": "x" * 200}

    @app.get("/events")
    def events():
        def forever():
            stream_open.set()
            while True:
                yield "data: tick\n\n"
                time.sleep(0.05)

        return Response(forever(), mimetype="text/event-stream")

    server = GuardedWSGIServer(
        "127.0.0.1", 0, app, header_timeout_s=5, body_timeout_s=5, max_connections_per_ip=8, max_connections=16
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]
    answers: list = []
    viewer = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        viewer.request("GET", "/events", headers={"Accept": "text/event-stream"})
        assert viewer.getresponse().status == 200 and stream_open.wait(5)

        def put() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("PUT", "/slow", body=b"{}", headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answers.append((response.status, json.loads(response.read())))
            conn.close()

        client = threading.Thread(target=put, daemon=True)
        client.start()
        deadline = time.monotonic() + 5
        while server.drain(0.0) == 0:  # until the PUT's headers are parsed
            assert time.monotonic() < deadline, "the PUT never counted as in flight"
            time.sleep(0.02)
        server.shutdown()
        thread.join(5)
        assert server.drain(0.2) == 1  # the PUT, not the event stream
        release.set()
        t = time.monotonic()
        assert server.drain(5.0) == 0
        assert time.monotonic() - t < 2.0  # the open event stream did not hold it
        client.join(5)
        assert answers == [(200, {"applied": True, "padding": "x" * 200})]
    finally:
        release.set()
        viewer.close()
        server.server_close()
