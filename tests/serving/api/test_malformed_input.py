"""Malformed input at the protocol level is a 4xx with a code, never a 500 and a traceback (issue 35).

Units: the frames hello parser, PcmFormat, the WebSocket ticket book and handshake, the JSON loader,
and the routes of an app around a Runtime built but never started (Flask's test client). The same
attacks against a real server: tests/serving/api/test_hostile.py.
"""

from __future__ import annotations

import logging
import socket

import pytest

from latentsync.config import load_config
from latentsync.serving.api.access import TicketBook
from latentsync.serving.api.errors import ApiError
from latentsync.serving.api.json_body import parse_json
from latentsync.serving.api.websocket import WebSocketLimits, _accept
from latentsync.serving.egress.frames_protocol import CLOSE_BAD_HELLO, CLOSE_TOO_LARGE, HelloRefused, parse_hello
from latentsync.serving.tasks.speech_audio import PcmFormat, SpeechError

HUGE = "9" * 401  # 10**401 - 1: overflows a float in any division


@pytest.mark.parametrize(
    ("hello", "code", "reason"),
    [
        ("[" * 3000, CLOSE_BAD_HELLO, "bad_hello"),  # RecursionError in json.loads
        ('{"type": "hello", "width": ' + HUGE + "}", CLOSE_TOO_LARGE, "too_large"),  # OverflowError
        ('{"type": "hello", "height": ' + HUGE + "}", CLOSE_TOO_LARGE, "too_large"),
        ('{"type": "hello", "width": ' + "9" * 4301 + "}", CLOSE_BAD_HELLO, "bad_hello"),  # past the digit limit
    ],
)
def test_a_frames_hello_nested_too_deep_or_with_a_huge_size_is_refused_with_a_close_code(hello, code, reason):
    with pytest.raises(HelloRefused) as refused:
        parse_hello(hello, 1280, 720)
    assert refused.value.code == code and refused.value.reason.startswith(reason)


@pytest.mark.parametrize("encoding", [[], {}, 5, None])
def test_a_pcm_encoding_that_is_no_string_is_bad_encoding(encoding):
    with pytest.raises(SpeechError) as refused:  # [] and {} were unhashable: TypeError
        PcmFormat(16000, 1, encoding)
    assert refused.value.code == "bad_encoding"


def test_parse_json_answers_bad_json_for_deep_nesting_big_integers_and_bad_utf8():
    for text in ("[" * 100_000, "9" * 5000, b"\xff\xfe{", "{", ""):
        with pytest.raises(ApiError) as refused:
            parse_json(text)
        assert refused.value.code == "bad_json"
    assert parse_json(b'{"a": [1]}') == {"a": [1]}


def test_a_non_ascii_ticket_is_no_ticket_and_spends_nothing():
    book = TicketBook()
    ticket = book.issue()
    assert book.redeem("\u00e9") is False  # hmac.compare_digest(str, non-ASCII str): TypeError
    assert book.redeem(ticket + "\u00e9") is False
    assert book.redeem(ticket) is True and book.redeem(ticket) is False


def test_a_websocket_handshake_without_its_key_is_400_bad_handshake():
    server, client = socket.socketpair()
    try:
        environ = {
            "werkzeug.socket": server,
            "HTTP_HOST": "127.0.0.1",
            "HTTP_UPGRADE": "websocket",
            "HTTP_CONNECTION": "Upgrade",
            "HTTP_SEC_WEBSOCKET_VERSION": "13",
        }
        with pytest.raises(ApiError) as refused:  # wsproto's RemoteProtocolError: a 500
            _accept(environ, WebSocketLimits(max_message_bytes=1024, max_queued_bytes=4096, send_timeout_s=1.0))
        assert refused.value.code == "bad_handshake"
    finally:
        server.close()
        client.close()


class _EndlessBody:
    """A chunked request body that never ends: counts what the server reads of it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        size = 65536 if size is None or size < 0 else min(size, 65536)
        self.read_bytes += size
        return b"[" * size

    def readline(self, size: int = -1) -> bytes:
        return self.read(size)


@pytest.fixture
def app(tmp_path):
    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime

    media = tmp_path / "media"
    media.mkdir()
    config = load_config(
        None,
        [f"media.root={media}", f"avatar.cache_dir={tmp_path / 'avatars'}", f"channels_file={tmp_path / 'ch.json'}"],
    )
    return create_app(Runtime(config))  # built, never started


def test_malformed_channel_bodies_and_paths_are_4xx_with_no_error_logged(app, caplog):
    client = app.test_client()
    url = "rtmp://127.0.0.1:1935/live/x"
    cases = [  # (body, content type, status, code)
        ("[" * 60_000, "application/json", 400, "bad_json"),  # under 64 KiB, nested past the parser
        ("[" * 100_000, "application/json", 413, "too_large"),  # over api.max_json_kb, never parsed
        ('{"width": ' + "9" * 5000 + "}", "application/json", 400, "bad_json"),  # int digit limit
        ("not json", "text/plain", 400, "bad_channel"),
    ]
    with caplog.at_level(logging.WARNING):
        for body, mimetype, status, code in cases:
            for name in ("x", "main"):
                response = client.put(f"/channels/{name}", data=body, content_type=mimetype)
                assert (response.status_code, response.json["error"]["code"]) == (status, code), (name, body[:20])
        for path in ("a" * 5000, "a\x00b", "presenter.mp4\x00.txt", "/" + "b" * 300):
            for name, fields in (("x", {"rtmp_url": url}), ("main", {})):
                response = client.put(f"/channels/{name}", json={**fields, "idle_video": path})
                assert response.status_code == 400 and response.json["error"]["code"] == "bad_channel", (name, path)
                assert "a" * 100 not in response.json["error"]["message"]  # the path is not echoed
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert client.get("/channels/x").status_code == 404


def test_every_json_body_is_capped_before_it_is_read_chunked_too(app):
    client = app.test_client()
    big = b'{"text": "' + b"a" * (64 * 1024) + b'"}'
    for path in ("/speak", "/channels/main/speak"):
        response = client.post(path, data=big, content_type="application/json")
        assert response.status_code == 413 and response.json["error"]["code"] == "too_large", path
        assert "api.max_json_kb = 64" in response.json["error"]["message"]
    response = client.put("/channels/x", data=big, content_type="application/json")
    assert response.status_code == 413 and response.json["error"]["code"] == "too_large"
    for method, path in (("PUT", "/channels/x"), ("POST", "/speak")):
        body = _EndlessBody()
        response = client.open(
            path,
            method=method,
            data=b"",
            headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
            environ_overrides={"wsgi.input": body, "wsgi.input_terminated": True},
        )
        assert response.status_code == 413 and response.json["error"]["code"] == "too_large", path
        assert body.read_bytes <= 64 * 1024 + 1, body.read_bytes  # the cap and one byte, no more


def test_an_event_stream_for_a_foreign_page_is_403_before_it_takes_a_slot(app):
    client = app.test_client()
    admission = app.extensions["latentsync.admission"]
    for origin in ("http://evil.example", "null", "http://localhost:1"):
        response = client.get("/events", headers={"Origin": origin})
        assert response.status_code == 403 and response.json["error"]["code"] == "origin_not_allowed", origin
        assert admission.open() == 0
    response = client.get("/events", headers={"Origin": "http://localhost"}, buffered=False)  # same origin
    try:
        assert response.status_code == 200 and response.mimetype == "text/event-stream"
    finally:
        response.close()
