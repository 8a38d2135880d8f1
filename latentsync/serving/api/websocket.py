"""The server side of the API's WebSockets (``/ws/speech``), bounded in every direction.

wsproto speaks the protocol; this module owns the connection: one reader thread per socket and
the limits a hostile client must not get past (docs/security.md):

- no extension is negotiated (no permessage-deflate), so ``max_message_bytes`` is what arrives on
  the wire, and a small compressed message can never inflate into a large one;
- received messages wait in a queue of at most ``max_queued_bytes``, each message costing its bytes
  plus :data:`MESSAGE_OVERHEAD_BYTES` (a flood of empty messages fills it too); while it is full the
  reader stops reading the socket, so a client that sends faster than the handler reads is held
  back by TCP (its own send buffer fills) instead of growing the server's memory;
- every send has a deadline (``send_timeout_s``): a client that stops reading is dropped, never
  holding a server thread;
- a ping every ``ping_interval_s``; a client that has not answered the previous one is dropped.

:func:`websocket_route` adds a route whose handler gets a :class:`ServerWebSocket`, under the
werkzeug development server and gunicorn's threaded workers alike.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import cast

from flask import Flask, Response, request
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from latentsync.serving.api.errors import ApiError

logger = logging.getLogger(__name__)

#: Bytes the reader takes from the socket at once (what the queue may exceed its bound by).
RECEIVE_BYTES = 64 * 1024
#: What each queued message costs against ``max_queued_bytes`` beyond its payload (its share of
#: the deque and the object): empty messages are not free, so the queue is bounded in messages too.
MESSAGE_OVERHEAD_BYTES = 64
#: Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class ConnectionClosed(Exception):
    """The WebSocket is closed (by the client, a limit, or :meth:`ServerWebSocket.close`)."""


@dataclass(frozen=True, kw_only=True)
class WebSocketLimits:
    """Bounds of one connection.

    Attributes:
        max_message_bytes: Largest message (``speech_stream.max_message_bytes``); a larger one
            closes the connection with 1009.
        max_queued_bytes: Received bytes waiting for the handler (``speech_stream.max_queued_bytes``);
            while reached, the socket is not read.
        send_timeout_s: Seconds one send may take (``api.send_timeout_s``); past it the client is dropped.
        ping_interval_s: Seconds between pings; a ping still unanswered at the next one drops the client.
        message_limit_name: What ``max_message_bytes`` is called in the 1009 close reason.
    """

    max_message_bytes: int
    max_queued_bytes: int
    send_timeout_s: float
    ping_interval_s: float = 25.0
    message_limit_name: str = "speech_stream.max_message_bytes"


class ServerWebSocket:
    """One accepted WebSocket connection (made by :func:`websocket_route`).

    Args:
        sock: The connection's socket (the WSGI server's), the handshake already answered.
        ws: The wsproto connection in the OPEN state.
        limits: The connection's bounds.
    """

    def __init__(self, sock: socket.socket, ws: WSConnection, limits: WebSocketLimits):
        self._sock = sock
        self._ws = ws
        self._limits = limits
        self._proto_lock = threading.Lock()  # wsproto is not thread safe: reader and handler share it
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._inbox: collections.deque[tuple[str | bytes, int]] = collections.deque()  # (message, cost)
        self._inbox_bytes = 0  # the costs of the messages queued (:data:`MESSAGE_OVERHEAD_BYTES` each and more)
        self._connected = True
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._partial: list[str | bytes | bytearray] = []  # one message's fragments: all text or all bytes
        self._partial_bytes = 0
        self._pong_due = False
        sock.settimeout(limits.send_timeout_s)  # sends; the reader waits in select() first, so recv never waits
        self._reader = threading.Thread(target=self._read, name="ws-reader", daemon=True)
        self._reader.start()

    @property
    def connected(self) -> bool:
        """True until the connection closed (either side, or a limit)."""
        return self._connected

    @property
    def queued_bytes(self) -> int:
        """Received bytes waiting for :meth:`receive`, :data:`MESSAGE_OVERHEAD_BYTES` more per message."""
        return self._inbox_bytes

    # ----------------------------------------------------------------- handler side
    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """The next message (``str`` for text, ``bytes`` for binary), or None after ``timeout`` seconds.

        Raises:
            ConnectionClosed: Once the connection is closed and every queued message was read.
        """
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._inbox:
                if not self._connected:
                    raise ConnectionClosed(self.close_reason or "closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left if left is not None else 1.0)
            message, cost = self._inbox.popleft()
            self._inbox_bytes -= cost
            self._cond.notify_all()  # the reader may read again
            return message

    def send(self, data: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) message within ``send_timeout_s``.

        Raises:
            ConnectionClosed: If the connection is closed, or the client did not take the message in
                time (it is then dropped).
        """
        if not self._connected:
            raise ConnectionClosed(self.close_reason or "closed")
        event = BytesMessage(data=data) if isinstance(data, bytes) else TextMessage(data=data)
        self._send_event(event)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the connection with ``code`` and ``reason`` (safe to call twice, never raises)."""
        if self._connected:
            try:
                self._send_event(CloseConnection(code=code, reason=reason))
            except ConnectionClosed:
                pass
        self._drop(code, reason)

    def wait_closed(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the reader thread to end."""
        self._reader.join(timeout_s)

    # ----------------------------------------------------------------- internals
    def _send_event(self, event) -> None:
        with self._proto_lock:
            try:
                data = self._ws.send(event)
            except LocalProtocolError:
                raise ConnectionClosed("closed") from None
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except (TimeoutError, OSError) as exc:
                reason = "send timeout" if isinstance(exc, TimeoutError) else "send failed"
                self._drop(CLOSE_GOING_AWAY, reason)
                raise ConnectionClosed(reason) from None

    def _drop(self, code: int, reason: str) -> None:
        with self._cond:
            if not self._connected:
                return
            self._connected = False
            self.close_code, self.close_reason = code, reason
            self._cond.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader's select() wakes up
        except OSError:
            pass

    def _read(self) -> None:
        next_ping = time.monotonic() + self._limits.ping_interval_s
        try:
            while self._connected:
                with self._cond:
                    while self._connected and self._inbox_bytes >= self._limits.max_queued_bytes:
                        self._cond.wait(0.5)  # backpressure: the socket is not read until the handler reads
                if not self._connected:
                    break
                wait_s = max(0.0, next_ping - time.monotonic())
                readable, _, _ = select.select([self._sock], [], [], min(wait_s, 1.0))
                if not readable:
                    if time.monotonic() >= next_ping:
                        if self._pong_due:
                            self.close(CLOSE_POLICY, "ping timeout")
                            break
                        self._pong_due = True
                        next_ping = time.monotonic() + self._limits.ping_interval_s
                        self._send_event(Ping())
                    continue
                data = self._sock.recv(RECEIVE_BYTES)
                if not data:
                    self._drop(CLOSE_GOING_AWAY, "client went away")
                    break
                with self._proto_lock:
                    self._ws.receive_data(data)
                    events = list(self._ws.events())
                for event in events:
                    self._handle(event)
        except ConnectionClosed:
            pass
        except (OSError, RemoteProtocolError, LocalProtocolError) as exc:
            self._drop(CLOSE_POLICY, f"protocol error: {type(exc).__name__}")
        finally:
            self._drop(CLOSE_GOING_AWAY, "closed")
            try:
                self._sock.close()
            except OSError:
                pass

    def _handle(self, event) -> None:
        if isinstance(event, TextMessage | BytesMessage):
            size = len(event.data.encode()) if isinstance(event.data, str) else len(event.data)
            self._partial_bytes += size
            if self._partial_bytes > self._limits.max_message_bytes:
                limit = self._limits.max_message_bytes
                self.close(CLOSE_TOO_BIG, f"message larger than {self._limits.message_limit_name} = {limit}")
                raise ConnectionClosed("message too big")
            if event.data:  # a flood of empty fragments grows nothing
                self._partial.append(event.data)
            if not event.message_finished:
                return
            parts, cost = self._partial, self._partial_bytes + MESSAGE_OVERHEAD_BYTES
            self._partial, self._partial_bytes = [], 0
            message: str | bytes
            if isinstance(event, TextMessage):
                message = "".join(cast(list[str], parts))
            else:
                message = b"".join(cast(list[bytes | bytearray], parts))
            with self._cond:
                self._inbox.append((message, cost))
                self._inbox_bytes += cost
                self._cond.notify_all()
        elif isinstance(event, Ping):
            self._send_event(event.response())
        elif isinstance(event, Pong):
            self._pong_due = False
        elif isinstance(event, CloseConnection):
            try:
                self._send_event(event.response())
            except ConnectionClosed:
                pass
            self._drop(event.code, event.reason or "closed by the client")
            raise ConnectionClosed("closed by the client")


def wsgi_socket(environ: dict) -> socket.socket | None:
    """The client connection's socket, as werkzeug's development server or gunicorn expose it (else None)."""
    return environ.get("werkzeug.socket") or environ.get("gunicorn.socket")


def _accept(environ: dict, limits: WebSocketLimits) -> ServerWebSocket:
    """Answer the handshake of the request in ``environ`` (no extension) and return the connection.

    Raises:
        ConnectionClosed: If the WSGI server gives no socket, or the answer cannot be sent.
        ApiError: 400 ``bad_handshake`` if the handshake is not a valid WebSocket one (no
            ``Sec-WebSocket-Key``, another version): answered as HTTP, nothing accepted.
    """
    sock = wsgi_socket(environ)
    if sock is None:
        raise ConnectionClosed("this WSGI server gives no socket for WebSockets (werkzeug or gunicorn)")
    ws = WSConnection(ConnectionType.SERVER)
    head = b"GET / HTTP/1.1\r\n"
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = "-".join(part.capitalize() for part in key[5:].split("_"))
            head += f"{name}: {value}\r\n".encode("latin-1", errors="replace")
    try:  # wsproto refuses a handshake without Sec-WebSocket-Key, or of another version, here
        ws.receive_data(head + b"\r\n")
        request_event = next((e for e in ws.events() if isinstance(e, Request)), None)
    except RemoteProtocolError as exc:
        raise ApiError("bad_handshake", f"not a valid WebSocket handshake: {exc}") from None
    if request_event is None:
        raise ApiError("bad_handshake", "not a valid WebSocket handshake")
    sock.settimeout(limits.send_timeout_s)
    try:
        sock.sendall(ws.send(AcceptConnection(extensions=[])))  # no permessage-deflate
    except OSError as exc:
        raise ConnectionClosed(f"handshake not sent: {exc}") from None
    return ServerWebSocket(sock, ws, limits)


def websocket_route(
    app: Flask, rule: str, endpoint: str, limits: WebSocketLimits, **options
) -> Callable[[Callable], Callable]:
    """Register ``handler(ws, **view_args)`` for WebSocket requests to ``rule``.

    The app's ``before_request`` hooks run first (token, origin, slots): a refusal there answers
    the handshake with its HTTP error. The handler runs in the request's thread; when it returns,
    the connection is closed (1000) and the WSGI server is told the response was sent.

    Args:
        app: The Flask app.
        rule: The URL rule.
        endpoint: The endpoint name.
        limits: Every connection's bounds.
        options: More ``app.route`` options (``defaults``...).
    """

    def decorator(handler: Callable) -> Callable:
        @wraps(handler)
        def view(**kwargs):
            ws = _accept(request.environ, limits)
            mode = "gunicorn" if "gunicorn.socket" in request.environ else "werkzeug"
            try:
                handler(ws, **kwargs)
            except ConnectionClosed:
                pass
            finally:
                ws.close()
                ws.wait_closed(2.0)
            return _Handled(mode)

        app.add_url_rule(rule, endpoint, view, websocket=True, **options)
        return view

    return decorator


class _Handled(Response):
    """The response of a WebSocket view: the connection was the response, nothing more is written."""

    def __init__(self, mode: str):
        super().__init__()
        self._mode = mode

    def __call__(self, environ, start_response):
        if self._mode == "gunicorn":
            raise StopIteration()  # gunicorn's threaded worker: the request is over, the socket is ours
        return super().__call__(environ, start_response)
