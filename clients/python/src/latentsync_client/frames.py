"""The frames stream (``/ws/frames``): the program on air as typed frames, with reconnects when asked.

Protocol: docs/frames-protocol.md; its byte layout is :mod:`latentsync_client.frames_protocol`.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import websockets
from websockets.asyncio.client import ClientConnection

from latentsync_client._ws import closed_error, is_normal_close, open_websocket
from latentsync_client.errors import (
    BadRequest,
    ConnectionFailed,
    Forbidden,
    LatentSyncError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    StreamClosed,
    Unauthorized,
)
from latentsync_client.frames_protocol import (
    CLOSE_BAD_HELLO,
    CLOSE_TOO_LARGE,
    CLOSE_UNSUPPORTED,
    AudioFormat,
    FrameHeader,
    Ready,
    VideoFormat,
    hello_message,
    split_message,
)


@dataclass(frozen=True, slots=True)
class Frame:
    """One tick of the program: its header, the picture and the tick's audio.

    Attributes:
        header: The parsed 64-byte header (tick, ``pts_us``, state, task, lost ticks, sizes).
        video: The video payload: a JPEG, an H.264 access unit (Annex B) or ``width*height*3``
            bytes of RGB, as ``header.format`` says.
        audio: The tick's PCM, mono s16le at ``header.sample_rate_hz`` (empty with ``audio="none"``).
    """

    header: FrameHeader
    video: bytes = field(repr=False)
    audio: bytes = field(repr=False)

    @property
    def tick(self) -> int:
        """The tick's number on the channel's stream."""
        return self.header.tick

    @property
    def pts_s(self) -> float:
        """Presentation time in seconds."""
        return self.header.pts_s


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection was lost; with ``reconnect=True`` the stream tries again after ``retry_in_s``.

    Attributes:
        error: What ended it (:class:`StreamClosed` with the close code, :class:`ConnectionFailed`,
            :class:`~latentsync_client.errors.Unavailable` ``starting``...).
        attempt: Connections lost since the last frame received (1 for the first).
        retry_in_s: Seconds until the next attempt.
    """

    error: LatentSyncError
    attempt: int
    retry_in_s: float


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A new connection is up after :class:`Disconnected`; ``ready`` is its answer (ticks go on)."""

    ready: Ready
    attempts: int


FramesEvent = Frame | Disconnected | Reconnected

#: Refusals that another try cannot fix: the stream raises them even with ``reconnect=True``.
_FATAL = (Unauthorized, Forbidden, NotFound, BadRequest, PayloadTooLarge, ProtocolError)
_FATAL_CLOSE = (CLOSE_BAD_HELLO, CLOSE_TOO_LARGE, CLOSE_UNSUPPORTED, 1009)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between reconnect attempts: ``initial_s * factor**(n-1)``, at most ``max_s``, ±``jitter``.

    Attributes:
        initial_s: Seconds before the first attempt.
        factor: Growth per attempt.
        max_s: Longest delay in seconds.
        jitter: Random fraction added or taken (0.1: ±10 %).
        max_attempts: Give up (raise the last error) after this many losses without a frame between
            them (None: never).
    """

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 10.0
    jitter: float = 0.1
    max_attempts: int | None = None

    def delay_s(self, attempt: int) -> float:
        """Seconds before attempt ``attempt`` (1, 2, ...)."""
        base = min(self.max_s, self.initial_s * self.factor ** max(0, attempt - 1))
        return max(0.0, base * (1.0 + random.uniform(-self.jitter, self.jitter)))


class FramesStream:
    """One client of a channel's ``/ws/frames``: sends the hello, yields :class:`Frame` per tick.

    Made by :meth:`latentsync_client.AsyncClient.frames`; use as ``async with`` and iterate. With
    ``reconnect=True`` a lost connection yields :class:`Disconnected`, then :class:`Reconnected`
    once back, and frames again; refusals no retry can fix (401, 403, 404, a bad hello) raise.

    Args:
        url_factory: Awaitable giving ``(url, headers)`` for each connection (a fresh ticket each
            time when tickets are used).
        format: Video format (``jpeg``, ``h264``, ``rgb24``).
        width: Frame width in pixels (None: the channel's).
        height: Frame height in pixels (None: the channel's).
        audio: ``pcm_s16le`` or ``none``.
        reconnect: Reconnect with :class:`Backoff` when the connection is lost.
        backoff: The reconnect delays.
        receive_timeout_s: A connection that brings no message for this long is lost (the server
            sends ``fps`` a second).
        open_timeout_s: Seconds for each connection and handshake.
    """

    def __init__(
        self,
        url_factory: Callable[[], Awaitable[tuple[str, dict[str, str]]]],
        *,
        format: VideoFormat | str = VideoFormat.jpeg,
        width: int | None = None,
        height: int | None = None,
        audio: AudioFormat | str = AudioFormat.pcm_s16le,
        reconnect: bool = False,
        backoff: Backoff | None = None,
        receive_timeout_s: float = 10.0,
        open_timeout_s: float = 10.0,
    ):
        self._url_factory = url_factory
        self.hello = hello_message(format, width=width, height=height, audio=audio)
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.receive_timeout_s = receive_timeout_s
        self.open_timeout_s = open_timeout_s
        self.ready: Ready | None = None
        self.reconnects = 0
        self._ws: ClientConnection | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        token: str | None = None,
        format: VideoFormat | str = VideoFormat.jpeg,
        width: int | None = None,
        height: int | None = None,
        audio: AudioFormat | str = AudioFormat.pcm_s16le,
        reconnect: bool = False,
        backoff: Backoff | None = None,
        receive_timeout_s: float = 10.0,
        open_timeout_s: float = 10.0,
    ) -> FramesStream:
        """A stream of a full WebSocket URL (``ws://host:11001/channels/hall/ws/frames``), the token as a header.

        Args:
            url: The frames WebSocket's URL (a ``?ticket=`` in it serves one connection only).
            token: Sent as ``Authorization: Bearer`` (None: none).
            format: ``jpeg``, ``h264`` or ``rgb24``.
            width: Frame width in pixels (None: the channel's).
            height: Frame height in pixels (None: the channel's).
            audio: ``pcm_s16le`` or ``none``.
            reconnect: Reconnect with ``backoff`` when the connection is lost.
            backoff: The reconnect delays.
            receive_timeout_s: Seconds without a message after which the connection counts as lost.
            open_timeout_s: Seconds for each connection and handshake.

        Raises:
            ValueError: An unknown format or a size under 16 pixels.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        async def target() -> tuple[str, dict[str, str]]:
            return url, headers

        return cls(
            target,
            format=format,
            width=width,
            height=height,
            audio=audio,
            reconnect=reconnect,
            backoff=backoff,
            receive_timeout_s=receive_timeout_s,
            open_timeout_s=open_timeout_s,
        )

    async def connect(self) -> FramesStream:
        """Connect and send the hello; :attr:`ready` is the server's answer. Safe to call twice.

        Raises:
            NotFound: ``no_channel``. Unauthorized: a wrong token or ticket.
            RateLimited: ``too_many_clients``. Unavailable: ``starting``, ``frames_off``, ``too_many_connections``.
            StreamClosed: The server closed on the hello (4400 ``bad_size``, 4413 ``too_large``...).
            ConnectionFailed: The server cannot be reached.
        """
        if self._ws is None:
            await self._open()
        return self

    async def _open(self) -> None:
        url, headers = await self._url_factory()
        ws = await open_websocket(url, headers=headers, max_size=None, open_timeout_s=self.open_timeout_s)
        try:
            await ws.send(json.dumps(self.hello))
            async with asyncio.timeout(self.open_timeout_s):
                while True:  # a later version may send other text messages first
                    message = await ws.recv()
                    if isinstance(message, str):
                        decoded = json.loads(message)
                        if isinstance(decoded, dict) and decoded.get("type") == "ready":
                            break
            self.ready = Ready.from_json(decoded)
        except websockets.ConnectionClosed as exc:
            await ws.close()
            raise closed_error(exc) from None
        except (TimeoutError, ValueError) as exc:
            await ws.close()
            raise ProtocolError(f"no ready answer to the hello: {exc!r}") from None
        except BaseException:
            await ws.close()
            raise
        self._ws = ws

    async def __aenter__(self) -> FramesStream:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _next_frame(self) -> Frame | None:
        """The next tick of this connection; None after a normal close. Raises LatentSyncError."""
        assert self._ws is not None
        while True:
            try:
                async with asyncio.timeout(self.receive_timeout_s):
                    message = await self._ws.recv()
            except websockets.ConnectionClosed as exc:
                if is_normal_close(exc):
                    return None
                raise closed_error(exc) from None
            except TimeoutError:
                raise ConnectionFailed(f"no tick for {self.receive_timeout_s:g} s") from None
            except OSError as exc:
                raise ConnectionFailed(f"connection failed: {exc!r}") from exc
            if isinstance(message, str):
                continue  # text messages of later versions
            header, video, audio = split_message(message)
            return Frame(header=header, video=bytes(video), audio=bytes(audio))

    def __aiter__(self) -> AsyncIterator[FramesEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[FramesEvent]:
        await self.connect()
        failures = 0  # connections lost since the last frame received
        error: LatentSyncError | None = None
        while not self._closed:
            if self._ws is None:  # lost: wait, then try again
                assert error is not None
                failures += 1
                if self.backoff.max_attempts is not None and failures > self.backoff.max_attempts:
                    raise error
                delay = self.backoff.delay_s(failures)
                yield Disconnected(error=error, attempt=failures, retry_in_s=delay)
                await asyncio.sleep(delay)
                if self._closed:
                    return
                try:
                    await self._open()
                except LatentSyncError as exc:
                    if not self._retryable(exc):
                        raise
                    error = exc
                    continue
                self.reconnects += 1
                assert self.ready is not None
                yield Reconnected(ready=self.ready, attempts=failures)
                continue
            try:
                frame = await self._next_frame()
                if frame is None:
                    if not self.reconnect:
                        return
                    raise StreamClosed(1000, "closed by the server")
            except LatentSyncError as exc:
                if not self._retryable(exc):
                    raise
                error = exc
                await self._drop()
                continue
            failures = 0
            yield frame

    def _retryable(self, exc: LatentSyncError) -> bool:
        if not self.reconnect or self._closed:
            return False
        if isinstance(exc, StreamClosed):
            return exc.close_code not in _FATAL_CLOSE
        return not isinstance(exc, _FATAL)

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    async def close(self) -> None:
        """Close the connection and end the iteration. Safe to call twice."""
        self._closed = True
        await self._drop()
