"""Admission of the connections that hold a server thread for long: one count, one refusal.

Three kinds of connection stay open while the client listens or talks, each holding one request
thread: speech WebSockets (``/ws/speech``), frames WebSockets (``/ws/frames``) and event streams
(``GET /events``), on every channel. :class:`Admission` (one per app) counts them per channel and
server-wide for each kind, and all of them together against ``api.max_long_lived``, below
gunicorn's ``threads`` (``configs/gunicorn.conf.py``), so health checks, uploads and cancels
always find a thread (docs/security.md).

A connection is admitted with :meth:`Admission.admit` before its handshake or response answers
(so the next client already sees the place taken) and holds a :class:`Slot` until it is released,
once, whatever happens. The limits, checked in this order, and their refusals (HTTP status from
:data:`~latentsync.serving.api.errors.HTTP_STATUS`; body ``{"error": {"code", "message"}}``):

=========  ==============================================  ===================================
kind       limit                                           refusal
=========  ==============================================  ===================================
speech     ``speech_stream.max_open``, all channels        503 ``too_many_connections``
frames     ``frames.max_clients`` per channel              429 ``too_many_clients``
events     ``ui.max_event_clients`` per channel            503 ``too_many_event_clients``
all        ``api.max_long_lived``, all kinds and channels  503 ``too_many_connections``
=========  ==============================================  ===================================

The kind's own limit is checked first: a client refused is told the most specific limit it hit.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from flask import Flask, g

from latentsync.config import AppConfig
from latentsync.serving.api.errors import ApiError

#: Code of a refusal by ``api.max_long_lived`` (every kind, every channel together).
TOO_MANY_CONNECTIONS = "too_many_connections"
#: Where the app keeps its :class:`Admission` (``app.extensions``).
EXTENSION = "latentsync.admission"
#: Name of the request's slot in ``flask.g`` (:meth:`Admission.admit_request`).
_REQUEST_SLOT = "latentsync_admission_slot"


class ConnectionKind(enum.Enum):
    """A kind of long-lived connection."""

    speech = "speech"  # /ws/speech
    frames = "frames"  # /ws/frames
    events = "events"  # GET /events


@dataclass(frozen=True)
class Limit:
    """How many connections may be open at once, and the config key that says so.

    Attributes:
        count: Connections at once (>= 1; config validation bounds it).
        key: The config key, named in the refusal's message (``frames.max_clients``).
    """

    count: int
    key: str


@dataclass(frozen=True, kw_only=True)
class KindRule:
    """One kind's limits and the code of its refusal.

    Attributes:
        noun: The connections in a refusal's message (``frames clients``).
        code: The refusal's error code (a key of ``HTTP_STATUS``).
        per_channel: Connections of this kind at once on one channel (None: no such limit).
        server_wide: Connections of this kind at once on all channels together (None: no such limit).
    """

    noun: str
    code: str
    per_channel: Limit | None = None
    server_wide: Limit | None = None


def rules_from_config(config: AppConfig) -> dict[ConnectionKind, KindRule]:
    """Every kind's rule, from the config (the table in this module's docstring)."""
    return {
        ConnectionKind.speech: KindRule(
            noun="speech WebSockets",
            code=TOO_MANY_CONNECTIONS,
            server_wide=Limit(config.speech_stream.max_open, "speech_stream.max_open"),
        ),
        ConnectionKind.frames: KindRule(
            noun="frames clients",
            code="too_many_clients",
            per_channel=Limit(config.frames.max_clients, "frames.max_clients"),
        ),
        ConnectionKind.events: KindRule(
            noun="event streams",
            code="too_many_event_clients",
            per_channel=Limit(config.ui.max_event_clients, "ui.max_event_clients"),
        ),
    }


class AdmissionRefused(ApiError):
    """A long-lived connection refused by a limit: its code and message say which (the table above).

    Attributes:
        kind: The kind of connection refused.
        channel: The channel it asked for.
        limit: The limit that was reached.
    """

    def __init__(self, code: str, message: str, *, kind: ConnectionKind, channel: str, limit: Limit):
        super().__init__(code, message)
        self.kind = kind
        self.channel = channel
        self.limit = limit


class Slot:
    """One admitted connection's places; a context manager that releases them on leaving.

    Made by :meth:`Admission.admit` only. :meth:`release` is safe to call more than once.

    Attributes:
        kind: Its kind.
        channel: Its channel's name.
    """

    def __init__(self, admission: Admission, kind: ConnectionKind, channel: str):
        self.kind = kind
        self.channel = channel
        self._admission = admission
        self._lock = threading.Lock()
        self._in_kind = True  # its place among its kind (per channel, server-wide)
        self._in_thread = True  # its place among all long-lived connections (api.max_long_lived)

    def leave_kind(self) -> None:
        """Give back the kind's places only (once; later calls do nothing).

        A frames client calls it before the server sends it a close, so it may reconnect at once;
        its ``api.max_long_lived`` place stays taken until :meth:`release`, while its thread works.
        """
        with self._lock:
            was, self._in_kind = self._in_kind, False
        if was:
            self._admission._give_back(self.kind, self.channel, places_in_kind=True, place_in_all=False)

    def release(self) -> None:
        """Give back every place this slot still holds (once; later calls do nothing)."""
        with self._lock:
            in_kind, in_thread = self._in_kind, self._in_thread
            self._in_kind = self._in_thread = False
        if in_kind or in_thread:
            self._admission._give_back(self.kind, self.channel, places_in_kind=in_kind, place_in_all=in_thread)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class Admission:
    """Counts the open long-lived connections and admits or refuses new ones (thread-safe).

    Args:
        max_long_lived: All long-lived connections at once, every kind and channel (``api.max_long_lived``).
        rules: Each kind's own limits and refusal code (:func:`rules_from_config`); a kind with no
            rule is bounded by ``max_long_lived`` only, and refused with ``too_many_connections``.
    """

    def __init__(self, *, max_long_lived: int, rules: Mapping[ConnectionKind, KindRule]):
        self.max_long_lived = max_long_lived
        self.rules = dict(rules)
        self._lock = threading.Lock()
        self._open = 0  # every kind, every channel
        self._by_kind: dict[ConnectionKind, int] = {}
        self._by_channel: dict[tuple[ConnectionKind, str], int] = {}  # entries at 0 are removed

    @classmethod
    def from_config(cls, config: AppConfig) -> Admission:
        """The admission of a server with this config (``api.max_long_lived`` and :func:`rules_from_config`)."""
        return cls(max_long_lived=config.api.max_long_lived, rules=rules_from_config(config))

    def open(self, kind: ConnectionKind | None = None, channel: str | None = None) -> int:
        """Connections open now: all of them, of ``kind``, or of ``kind`` on ``channel``.

        Counts the kind's places (a frames client that has left its kind no longer counts there,
        though it still counts in the total until released).
        """
        with self._lock:
            if kind is None:
                return self._open
            if channel is None:
                return self._by_kind.get(kind, 0)
            return self._by_channel.get((kind, channel), 0)

    def admit(self, kind: ConnectionKind, channel: str) -> Slot:
        """Take a place for one connection of ``kind`` on ``channel``.

        Args:
            kind: What connects.
            channel: The channel's name (it exists: callers check that first).

        Returns:
            The connection's :class:`Slot`; release it when the connection is done.

        Raises:
            AdmissionRefused: When a limit is reached (this module's table gives the order and codes).
        """
        rule = self.rules.get(kind)
        with self._lock:
            refusal = self._full(rule, kind, channel)
            if refusal is not None:
                code, limit, what = refusal
                raise AdmissionRefused(
                    code, f"{limit.count} {what} ({limit.key})", kind=kind, channel=channel, limit=limit
                )
            self._open += 1
            self._by_kind[kind] = self._by_kind.get(kind, 0) + 1
            self._by_channel[(kind, channel)] = self._by_channel.get((kind, channel), 0) + 1
        return Slot(self, kind, channel)

    def _full(self, rule: KindRule | None, kind: ConnectionKind, channel: str) -> tuple[str, Limit, str] | None:
        """The first limit reached, as ``(code, limit, what is open)``; None when there is room (lock held)."""
        if rule is not None and rule.per_channel is not None:
            if self._by_channel.get((kind, channel), 0) >= rule.per_channel.count:
                return rule.code, rule.per_channel, f"{rule.noun} already on {channel!r}"
        if rule is not None and rule.server_wide is not None:
            if self._by_kind.get(kind, 0) >= rule.server_wide.count:
                return rule.code, rule.server_wide, f"{rule.noun} already open"
        if self._open >= self.max_long_lived:
            limit = Limit(self.max_long_lived, "api.max_long_lived")
            return TOO_MANY_CONNECTIONS, limit, "long-lived connections (event streams, WebSockets) already open"
        return None

    def _give_back(self, kind: ConnectionKind, channel: str, *, places_in_kind: bool, place_in_all: bool) -> None:
        """Count a slot's places off (:class:`Slot` calls it once per place)."""
        with self._lock:
            if places_in_kind:
                self._by_kind[kind] -= 1
                key = (kind, channel)
                self._by_channel[key] -= 1
                if self._by_channel[key] == 0:
                    del self._by_channel[key]  # channels come and go: no entry is kept for one
            if place_in_all:
                self._open -= 1

    def install(self, app: Flask) -> None:
        """Make this the app's admission (``app.extensions``) and release request-held slots at teardown.

        A slot taken by :meth:`admit_request` is released when the request is torn down (its
        WebSocket session ended, or the request was refused after all), whatever happened.
        """
        app.extensions[EXTENSION] = self

        @app.teardown_request
        def release_request_slot(_exc: BaseException | None) -> None:
            slot = g.pop(_REQUEST_SLOT, None)
            if slot is not None:
                slot.release()

    def admit_request(self, kind: ConnectionKind, channel: str) -> Slot:
        """:meth:`admit`, the slot held by the current request until its teardown (:meth:`install`).

        For WebSockets: admitted in a ``before_request`` hook, before the handshake answers.

        Raises:
            AdmissionRefused: As :meth:`admit`.
        """
        slot = self.admit(kind, channel)
        setattr(g, _REQUEST_SLOT, slot)
        return slot

    @staticmethod
    def request_slot() -> Slot | None:
        """The slot the current request holds (:meth:`admit_request`), or None."""
        return g.get(_REQUEST_SLOT)
