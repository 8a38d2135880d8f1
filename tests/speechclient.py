"""A speech WebSocket client for tests and benches (simple-websocket's client, the library the server uses)."""

from __future__ import annotations

import json
import time

import numpy as np
import simple_websocket


class SpeechClient:
    """One WebSocket connection to ``/ws/speech`` (channel main) or ``/channels/<channel>/ws/speech``.

    Args:
        port: Server port on 127.0.0.1.
        token: Sent as ``Authorization: Bearer <token>`` (None: none).
        headers: Extra handshake headers (e.g. ``Origin``).
        channel: The channel (None: main's path).
        query: The URL's query, e.g. ``ticket=...`` (a browser's way: ``POST /ws/tickets`` first).
    """

    def __init__(
        self,
        port: int,
        token: str | None = None,
        headers: dict | None = None,
        channel: str | None = None,
        query: str = "",
    ):
        headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        prefix = f"/channels/{channel}" if channel else ""
        url = f"ws://127.0.0.1:{port}{prefix}/ws/speech{'?' + query if query else ''}"
        self.ws = simple_websocket.Client.connect(url, headers=headers)
        self.events: list[dict] = []
        self.closed = False  # the server closed the connection

    def start(self, sample_rate: int = 16000, channels: int = 1, encoding: str = "s16le", **extra) -> None:
        self.send_json(
            {"type": "start", "sample_rate": sample_rate, "channels": channels, "encoding": encoding, **extra}
        )

    def send_json(self, message: dict) -> None:
        self._send(json.dumps(message))

    def send_pcm(self, data: bytes) -> None:
        self._send(data)

    def _send(self, data: str | bytes) -> None:
        """Send one message; ``simple_websocket.ConnectionClosed`` once the connection is closed.

        simple-websocket's reader thread closes the socket when the server closes the connection; a
        send between its ``connected`` check and that close meets the closed socket (``OSError``
        EBADF), which is the same closed connection.
        """
        try:
            self.ws.send(data)
        except OSError as exc:
            if self.ws.connected:
                raise
            raise simple_websocket.ConnectionClosed() from exc

    def poll(self, timeout_s: float = 0.0) -> list[dict]:
        """Events received within ``timeout_s`` (all that are waiting, at least one if any arrives)."""
        got = []
        try:
            message = self.ws.receive(timeout=timeout_s)
            while message is not None:
                event = json.loads(message)
                event["t"] = time.monotonic()
                got.append(event)
                self.events.append(event)
                message = self.ws.receive(timeout=0)
        except simple_websocket.ConnectionClosed:
            self.closed = True
        return got

    def wait(self, kind: str, timeout_s: float = 30.0, **match) -> dict:
        """The first event of type ``kind`` (matching ``match``) seen, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    self.events.remove(event)
                    return event
            seen = 0
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                raise AssertionError(
                    f"no {kind} event {match} within {timeout_s} s (closed: {self.closed}); got {self.events}"
                )
            self.poll(min(remaining, 0.2))

    def stream(self, pcm: np.ndarray, rate: int, packet_s: float = 0.02, speed: float = 1.0) -> float:
        """Send ``(n,) int16`` mono PCM in ``packet_s`` packets at ``speed`` x real time; returns the start time."""
        step = int(rate * packet_s)
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(pcm), step)):
            due = t0 + k * packet_s / speed
            while (now := time.monotonic()) < due:
                self.poll(min(due - now, 0.005))
            self.send_pcm(pcm[i : i + step].astype("<i2").tobytes())
        return t0

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # already closed by the server
            pass
