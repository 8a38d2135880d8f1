"""A WebSocket client on a bare socket (wsproto) for the frames tests: it reads only when told to.

simple-websocket's client reads its socket in a thread of its own, so it can never be a client
that stops reading; this one can (the socket's buffers fill, then the server's send blocks).
"""

from __future__ import annotations

import json
import socket
import time

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class RawWebSocket:
    """One client connection to ``path`` on 127.0.0.1:``port``.

    Args:
        port: The server's port.
        path: The WebSocket's path.
        headers: Extra handshake headers.

    Raises:
        ConnectionError: If the server refuses the handshake (``status`` and ``body`` on the exception).
    """

    def __init__(self, port: int, path: str, headers: dict | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.sock.sendall(self.ws.send(Request(host=f"127.0.0.1:{port}", target=path, extra_headers=extra)))
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._partial: list = []
        self._pending: list[str | bytes] = []
        status, body = None, b""
        while True:
            for event in self._events(10.0):
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    done = not event.has_body
                elif isinstance(event, RejectData):
                    body += event.data
                    done = event.body_finished
                else:
                    continue
                if done:
                    error = ConnectionError(f"handshake refused: {status} {body[:300]!r}")
                    error.status, error.body = status, body  # type: ignore[attr-defined]
                    self.sock.close()
                    raise error

    def _events(self, timeout_s: float) -> list:
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(1 << 20)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    def send_json(self, message: dict) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=json.dumps(message))))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def receive(self, timeout_s: float = 10.0) -> str | bytes | None:
        """The next whole message, or None once the server closed (``close_code``/``close_reason``)."""
        deadline = time.monotonic() + timeout_s
        while not self._pending:
            if self.close_code is not None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message")
            try:
                events = self._events(left)
            except (TimeoutError, OSError):
                continue
            for event in events:
                if isinstance(event, TextMessage | BytesMessage):
                    self._partial.append(event.data)
                    if event.message_finished:
                        joined = "".join(self._partial) if isinstance(event, TextMessage) else b"".join(self._partial)
                        self._pending.append(joined)
                        self._partial = []
                elif isinstance(event, Ping):
                    self.sock.sendall(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.close_code, self.close_reason = event.code, event.reason
                    try:
                        self.sock.sendall(self.ws.send(event.response()))
                    except Exception:
                        pass
        return self._pending.pop(0)

    def close(self) -> None:
        try:
            if self.close_code is None:
                self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        except Exception:
            pass
        self.sock.close()
