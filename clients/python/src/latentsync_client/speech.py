"""The speech stream (``/ws/speech``): start an utterance, send PCM or text, end or cancel it, read its events.

Protocol: docs/streaming-speech.md, "WebSocket ``/ws/speech``". One connection carries one open
utterance at a time; after its :class:`Done` another may be started.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import websockets
from websockets.asyncio.client import ClientConnection

from latentsync_client._ws import closed_error, is_normal_close, open_websocket
from latentsync_client.errors import ConnectionFailed, ProtocolError, StreamClosed, StreamRefused

Encoding = Literal["s16le", "f32le"]
_SAMPLE_BYTES = {"s16le": 2, "f32le": 4}
#: The error codes that answer a ``start`` message (docs/streaming-speech.md). Other errors read while
#: waiting for that answer (``not_open`` for PCM still in flight after a cancel, a time bound...) are
#: about earlier messages: they stay for the next reader.
START_REFUSALS = frozenset(
    {
        "bad_json",
        "bad_type",
        "bad_encoding",
        "bad_sample_rate",
        "bad_channels",
        "bad_parameter",
        "already_open",
        "too_many_streams",
        "queue_full",
        "starting",
        "stopping",
        "no_channel",
        "too_many_connections",
    }
)


@dataclass(frozen=True, slots=True)
class Accepted:
    """``accepted``: the utterance is open. ``status_url`` is its ``GET /tasks/<id>`` path."""

    task_id: str
    status_url: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class OnAir:
    """``on_air``: the utterance's first frame is on air; times in seconds from its first audio byte.

    Attributes:
        task_id: The utterance's task.
        first_byte_to_air_s: First byte received → first frame on air, in seconds.
        chunk0_audio_s: First byte → chunk 0's audio (and look-ahead) complete, in seconds.
        chunk0_ready_s: First byte → chunk 0 generated, in seconds.
    """

    task_id: str
    first_byte_to_air_s: float | None
    chunk0_audio_s: float | None
    chunk0_ready_s: float | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Progress:
    """``progress``, every 0.5 s while the utterance is open or playing.

    Attributes:
        task_id: The utterance's task.
        status: Its task state (``queued``, ``generating``, ``streaming``...).
        frames_streamed: Speech frames played so far.
        received_s: Seconds of audio received.
        buffered_s: Seconds received and not yet played.
        underrun_ticks: Gap ticks played so far (its audio came late).
    """

    task_id: str
    status: str
    frames_streamed: int
    received_s: float
    buffered_s: float
    underrun_ticks: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class SlowDown:
    """``slow_down``: over half of ``max_buffered_s`` waits to play; send slower (past it: ``buffer_full``)."""

    task_id: str
    buffered_s: float
    max_buffered_s: float
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Done:
    """``done``: the utterance's task reached a final state.

    Attributes:
        task_id: The utterance's task.
        status: ``done``, ``failed`` or ``cancelled``.
        error: Why it failed (None otherwise; an empty utterance fails with "empty utterance...").
        frames_streamed: Speech frames played.
        underrun_ticks: Gap ticks played.
    """

    task_id: str
    status: str
    error: str | None
    frames_streamed: int
    underrun_ticks: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """``error``: a message was refused (the connection stays open), or the utterance was ended by a bound.

    Attributes:
        code: The server's code (``bad_sample_rate``, ``not_open``, ``idle_timeout``, ``buffer_full``...).
        message: Its explanation.
    """

    code: str
    message: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event type this client does not know (a later server's); kept, never an error."""

    type: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


SpeechEvent = Accepted | OnAir | Progress | SlowDown | Done | ErrorEvent | UnknownEvent
E = TypeVar("E", Accepted, OnAir, Progress, SlowDown, Done, ErrorEvent, UnknownEvent)


def _f(message: dict[str, Any], key: str) -> float:
    return float(message.get(key) or 0.0)


def _opt_f(message: dict[str, Any], key: str) -> float | None:
    value = message.get(key)
    return None if value is None else float(value)


def parse_event(message: dict[str, Any]) -> SpeechEvent:
    """One server event (a decoded JSON object) as its dataclass.

    Raises:
        ProtocolError: If a known event misses a required field.
    """
    kind = str(message.get("type"))
    m = message
    try:
        if kind == "accepted":
            return Accepted(task_id=str(m["task_id"]), status_url=str(m.get("status_url", "")), raw=m)
        if kind == "on_air":
            return OnAir(
                task_id=str(m["task_id"]),
                first_byte_to_air_s=_opt_f(m, "first_byte_to_air_s"),
                chunk0_audio_s=_opt_f(m, "chunk0_audio_s"),
                chunk0_ready_s=_opt_f(m, "chunk0_ready_s"),
                raw=m,
            )
        if kind == "progress":
            return Progress(
                task_id=str(m["task_id"]),
                status=str(m.get("status")),
                frames_streamed=int(m.get("frames_streamed") or 0),
                received_s=_f(m, "received_s"),
                buffered_s=_f(m, "buffered_s"),
                underrun_ticks=int(m.get("underrun_ticks") or 0),
                raw=m,
            )
        if kind == "slow_down":
            return SlowDown(
                task_id=str(m["task_id"]), buffered_s=_f(m, "buffered_s"), max_buffered_s=_f(m, "max_buffered_s"), raw=m
            )
        if kind == "done":
            return Done(
                task_id=str(m["task_id"]),
                status=str(m.get("status")),
                error=None if m.get("error") is None else str(m["error"]),
                frames_streamed=int(m.get("frames_streamed") or 0),
                underrun_ticks=int(m.get("underrun_ticks") or 0),
                raw=m,
            )
        if kind == "error":
            return ErrorEvent(code=str(m.get("code")), message=str(m.get("message", "")), raw=m)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {kind} event {str(message)[:200]}: {exc!r}") from None
    return UnknownEvent(type=kind, raw=m)


class _Samples(Protocol):
    """What :meth:`SpeechStream.send_pcm` takes besides bytes: a NumPy-like array (``dtype``, ``astype``)."""

    @property
    def dtype(self) -> Any: ...

    def astype(self, dtype: str) -> Any: ...


PcmLike = bytes | bytearray | memoryview | _Samples


class SpeechStream:
    """One connection to a channel's ``/ws/speech``.

    Made by :meth:`latentsync_client.AsyncClient.speech`; connected by ``async with``, ``await`` or
    :meth:`connect`. Events are read with ``async for event in stream`` (ends after a normal close),
    :meth:`next_event` or :meth:`wait_for`; one reader at a time.

    Args:
        target: Awaitable giving ``(url, headers)``: the WebSocket URL
            (``ws://host:port[/channels/<name>]/ws/speech``, with ``?ticket=`` when tickets are used)
            and the handshake headers (``Authorization: Bearer ...``).
        open_timeout_s: Seconds for the connection and handshake.
    """

    def __init__(
        self, target: Callable[[], Awaitable[tuple[str, dict[str, str]]]], *, open_timeout_s: float = 10.0
    ) -> None:
        self._target = target
        self._open_timeout_s = open_timeout_s
        self._ws: ClientConnection | None = None
        self._held: deque[SpeechEvent] = deque()  # read by start()/wait_for() for a later reader
        self._frame_bytes = 0  # bytes of one sample frame of the utterance started last (0: none yet)
        self._open = False  # an utterance was started and neither ended nor cancelled by this client
        self._encoding: Encoding = "s16le"
        self._sample_rate_hz = 0
        self._channels = 1
        self.accepted: Accepted | None = None
        self.closed = False

    async def connect(self) -> SpeechStream:
        """Open the connection (safe to call twice).

        Raises:
            NotFound: ``no_channel`` (404 at the handshake).
            Unauthorized: A wrong or missing token or ticket.
            Unavailable: ``too_many_connections`` (503).
            ConnectionFailed: The server cannot be reached.
        """
        if self._ws is None:
            url, headers = await self._target()
            self._ws = await open_websocket(
                url, headers=headers, max_size=1 << 20, open_timeout_s=self._open_timeout_s, max_queue=None
            )
            self.closed = False
        return self

    @classmethod
    def from_url(cls, url: str, *, token: str | None = None, open_timeout_s: float = 10.0) -> SpeechStream:
        """A stream of a full WebSocket URL (``ws://host:11001/channels/hall/ws/speech``), the token as a header.

        Args:
            url: The speech WebSocket's URL.
            token: Sent as ``Authorization: Bearer`` (None: none).
            open_timeout_s: Seconds for the connection and handshake.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        async def target() -> tuple[str, dict[str, str]]:
            return url, headers

        return cls(target, open_timeout_s=open_timeout_s)

    def __await__(self) -> Generator[Any, None, SpeechStream]:
        return self.connect().__await__()

    async def __aenter__(self) -> SpeechStream:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _conn(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError("SpeechStream is not connected: use 'async with' or 'await'")
        return self._ws

    async def _send(self, data: str | bytes) -> None:
        try:
            await self._conn().send(data)
        except websockets.ConnectionClosed as exc:
            self.closed = True
            raise closed_error(exc) from None
        except OSError as exc:
            raise ConnectionFailed(f"send failed: {exc!r}") from exc

    async def start(
        self,
        sample_rate_hz: int = 16000,
        channels: int = 1,
        encoding: Encoding = "s16le",
        *,
        seed: int | None = None,
        wait: bool = True,
        timeout_s: float = 10.0,
    ) -> Accepted | None:
        """Open an utterance.

        Args:
            sample_rate_hz: The PCM's sample rate in Hz (the server takes 8000..192000).
            channels: Interleaved channels (1..8; the server mixes them down).
            encoding: ``s16le`` (int16) or ``f32le`` (float32 in [-1, 1]), little endian.
            seed: Generation seed (0..2^31-1), or None.
            wait: Wait for the server's answer (else return None at once; the answer comes as an event).
            timeout_s: Seconds to wait for it.

        Returns:
            The :class:`Accepted` event (``wait``), else None. Events read meanwhile stay for the
            next reader.

        Raises:
            ValueError: ``encoding`` not ``s16le``/``f32le``.
            StreamRefused: The server answered an ``error`` (``bad_sample_rate``, ``bad_channels``,
                ``already_open``, ``too_many_streams``, ``queue_full``, ``starting``, ``no_channel``...).
            StreamClosed: The server closed the connection.
            TimeoutError: No answer within ``timeout_s``.
        """
        if encoding not in _SAMPLE_BYTES:
            raise ValueError(f"encoding {encoding!r}: s16le or f32le")
        message: dict[str, Any] = {
            "type": "start",
            "sample_rate": int(sample_rate_hz),
            "channels": int(channels),
            "encoding": encoding,
        }
        if seed is not None:
            message["seed"] = int(seed)
        self._encoding, self._sample_rate_hz, self._channels = encoding, int(sample_rate_hz), int(channels)
        self._frame_bytes = _SAMPLE_BYTES[encoding] * max(1, int(channels))
        self.accepted = None
        self._open = True
        await self._send(json.dumps(message))
        if not wait:
            return None
        try:
            event = await self._wait_answer((Accepted,), timeout_s)
        except StreamRefused:
            self._open = False
            raise
        assert isinstance(event, Accepted)
        self.accepted = event
        return event

    async def send_pcm(self, pcm: PcmLike) -> None:
        """Send audio of the open utterance.

        Args:
            pcm: Raw little-endian bytes in the started encoding (interleaved, a whole number of
                sample frames), or a NumPy array: ``int16`` for ``s16le``, ``float32`` for ``f32le``
                (shape ``(n,)`` mono or ``(n, channels)`` interleaved). Empty input sends nothing.

        Raises:
            RuntimeError: No utterance is open: none was started, or this client ended or cancelled
                it (PCM after a cancel is refused here, not sent).
            ValueError: The bytes are not a whole number of sample frames, or the array's dtype
                does not match the encoding.
            StreamClosed: The server closed the connection.
        """
        if not self._open:
            raise RuntimeError("no open utterance (none started, or ended or cancelled): start() one")
        data = self._pcm_bytes(pcm)
        if not data:
            return
        if len(data) % self._frame_bytes:
            raise ValueError(
                f"{len(data)} bytes is not a whole number of {self._frame_bytes}-byte sample frames "
                f"({self._channels} channel(s) of {self._encoding})"
            )
        await self._send(data)

    def _pcm_bytes(self, pcm: PcmLike) -> bytes:
        if isinstance(pcm, bytes | bytearray | memoryview):
            return bytes(pcm)
        dtype = getattr(pcm, "dtype", None)
        if dtype is None:
            raise TypeError(f"PCM must be bytes or a NumPy array, not {type(pcm).__name__}")
        kind, size = getattr(dtype, "kind", "?"), getattr(dtype, "itemsize", 0)
        if self._encoding == "s16le" and (kind, size) == ("i", 2):
            return bytes(pcm.astype("<i2").tobytes())
        if self._encoding == "f32le" and (kind, size) == ("f", 4):
            return bytes(pcm.astype("<f4").tobytes())
        want = "int16" if self._encoding == "s16le" else "float32"
        raise ValueError(f"samples of dtype {dtype} for encoding {self._encoding}: want {want}")

    async def stream_pcm(self, pcm: PcmLike, *, packet_s: float = 0.02, speed: float = 1.0) -> None:
        """Send audio in packets of ``packet_s`` seconds at ``speed`` times real time (a live source).

        Paced on a fixed schedule from the first packet (``time.monotonic``), so errors never add up.
        Stops quietly at the next packet once :meth:`cancel` or :meth:`end` was called meanwhile.

        Args:
            pcm: As :meth:`send_pcm`.
            packet_s: Seconds of audio per message.
            speed: 1.0 = real time; 2.0 sends twice as fast.

        Raises:
            As :meth:`send_pcm`.
        """
        if not self._open:
            raise RuntimeError("no open utterance (none started, or ended or cancelled): start() one")
        data = self._pcm_bytes(pcm)
        step = max(1, int(self._sample_rate_hz * packet_s)) * self._frame_bytes
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(data), step)):
            delay = t0 + k * packet_s / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self._open:
                return  # cancelled or ended while streaming: the rest is not sent
            await self.send_pcm(data[i : i + step])

    async def send_text(self, text: str, *, voice: str | None = None, rate_wpm: int | None = None) -> None:
        """Append synthesised speech (the server's espeak-ng) to the open utterance, in order with the PCM.

        Args:
            text: What to say.
            voice: An espeak-ng voice (``en-us``...), or the server's default.
            rate_wpm: Words per minute (80..450), or the server's default.

        Raises:
            StreamClosed: The server closed the connection. Refusals (``bad_text``, ``unknown_voice``,
                ``tts_unavailable``) come as :class:`ErrorEvent`.
        """
        message: dict[str, Any] = {"type": "text", "text": text}
        if voice is not None:
            message["voice"] = voice
        if rate_wpm is not None:
            message["rate"] = int(rate_wpm)
        await self._send(json.dumps(message))

    async def end(self) -> None:
        """No more audio: what was sent plays to its end, then :class:`Done`.

        Raises:
            StreamClosed: The server closed the connection.
        """
        self._open = False
        await self._send(json.dumps({"type": "end"}))

    async def cancel(self) -> None:
        """Cancel the open utterance (as ``DELETE /tasks/<id>``): it fades back to idle; :class:`Done` ``cancelled``.

        Raises:
            StreamClosed: The server closed the connection.
        """
        self._open = False
        await self._send(json.dumps({"type": "cancel"}))

    async def next_event(self, timeout_s: float | None = None) -> SpeechEvent | None:
        """The next event, or None once the connection was closed normally.

        Args:
            timeout_s: Seconds to wait (None: no limit).

        Raises:
            TimeoutError: Nothing within ``timeout_s``.
            StreamClosed: The connection was closed other than normally (the close code is on it).
            ProtocolError: The server sent a message that is not a JSON event.
        """
        if self._held:
            return self._held.popleft()
        if self.closed:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                message = await self._conn().recv()
        except websockets.ConnectionClosed as exc:
            self.closed = True
            if is_normal_close(exc):
                return None
            raise closed_error(exc) from None
        if isinstance(message, bytes):
            raise ProtocolError(f"unexpected binary message of {len(message)} bytes on /ws/speech")
        try:
            decoded = json.loads(message)
        except ValueError:
            raise ProtocolError(f"not a JSON event: {message[:200]!r}") from None
        if not isinstance(decoded, dict):
            raise ProtocolError(f"not a JSON object: {message[:200]!r}")
        return parse_event(decoded)

    def __aiter__(self) -> AsyncIterator[SpeechEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SpeechEvent]:
        while (event := await self.next_event()) is not None:
            yield event

    async def wait_for(self, kind: type[E], *, timeout_s: float = 30.0, task_id: str | None = None) -> E:
        """Read events until one of class ``kind`` (for ``task_id`` when given); the others are dropped.

        Args:
            kind: An event class (:class:`Done`, :class:`OnAir`...).
            timeout_s: Seconds to wait in all.
            task_id: Only an event of this task.

        Raises:
            TimeoutError: None within ``timeout_s``.
            StreamClosed: As :meth:`next_event`; a normal close before it too.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            event = await self.next_event(max(0.0, deadline - time.monotonic()))
            if event is None:
                raise StreamClosed(1000, f"closed before a {kind.__name__} event")
            if isinstance(event, kind) and (task_id is None or getattr(event, "task_id", None) == task_id):
                return event

    async def _wait_answer(self, kinds: tuple[type, ...], timeout_s: float) -> SpeechEvent:
        """The first event of ``kinds`` or an error; the others read meanwhile are kept for the next reader."""
        deadline = time.monotonic() + timeout_s
        kept: list[SpeechEvent] = []
        try:
            while True:
                event = await self.next_event(max(0.0, deadline - time.monotonic()))
                if event is None:
                    raise StreamClosed(1000, "closed before the server answered")
                if isinstance(event, ErrorEvent) and event.code in START_REFUSALS:
                    raise StreamRefused(event.message, code=event.code)
                if isinstance(event, kinds):
                    return event
                kept.append(event)
        finally:
            self._held.extend(kept)

    async def close(self) -> None:
        """Close the connection (an open utterance then ends: what was sent plays). Safe to call twice."""
        ws, self._ws = self._ws, None
        self.closed = True
        if ws is not None:
            await ws.close()
