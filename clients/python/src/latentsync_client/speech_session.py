"""A live speech session on ``/ws/speech``: utterances sent in order, paced, cancelled, followed.

What the agent integrations (:mod:`latentsync_client.pipecat`, :mod:`latentsync_client.livekit`)
share below their framework: one connection to the channel's ``/ws/speech`` (opened at the first
utterance, reopened when the server closed it as idle or it was lost), a bounded queue of commands
(``start``, PCM, ``end``) sent by one task in order, audio paced to at most ``max_lead_s`` ahead of
playback, the ``already_open`` retry while the previous utterance drains its ``end``, cancels (the
connection's latest utterance by a ``cancel`` message, earlier ones by ``DELETE /tasks/<id>``), and
the list of tasks whose audio the integration must silence. Framework-free: what an integration
does with the events (frames, errors, metrics) it says in a :class:`SessionHandler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from latentsync_client.client import AsyncClient
from latentsync_client.errors import ConnectionFailed, LatentSyncError, StreamClosed, StreamRefused
from latentsync_client.speech import START_REFUSALS, Accepted, Done, ErrorEvent, SpeechStream

__all__ = [
    "MAX_CHANNELS",
    "MAX_RATE_HZ",
    "MIN_RATE_HZ",
    "SessionHandler",
    "SessionOptions",
    "SpeechSession",
    "Utterance",
]

logger = logging.getLogger(__name__)

#: What ``/ws/speech`` takes (docs/streaming-speech.md): sample rates in Hz, interleaved channels.
MIN_RATE_HZ = 8000
MAX_RATE_HZ = 192000
MAX_CHANNELS = 8
#: Task ids remembered as muted (interrupted); a conversation has a few utterances alive at once.
MUTED_KEPT = 64
#: Retry interval (seconds) of a ``start`` answered ``already_open`` (the previous utterance draining).
ALREADY_OPEN_RETRY_S = 0.02
#: Bound (seconds) on writing a ``cancel`` to the socket: no answer is awaited.
CANCEL_WRITE_TIMEOUT_S = 0.5


@dataclass(eq=False)
class Utterance:
    """One utterance of a session: ``start``, PCM (s16le), ``end``; integrations subclass it.

    Attributes:
        number: Its order in the session (1, 2, ...).
        sample_rate_hz: Its audio's rate in Hz (8000..192000; 0 until its first audio).
        channels: Interleaved channels of its audio (1..8).
        task_id: The server's task (32 hex digits), once ``accepted``.
        sent_start: ``start`` went to the server: a cancel reaches it from now on.
        end_sent: ``end`` went to the server.
        cancelled: Interrupted: its audio is muted, the rest of it is not sent, the server cancels it.
        failed: Refused, or its connection was lost mid-utterance: the rest of it is not sent.
    """

    number: int
    sample_rate_hz: int = 0
    channels: int = 1
    task_id: str | None = None
    sent_start: bool = False
    end_sent: bool = False
    cancelled: bool = False
    failed: bool = False


U = TypeVar("U", bound=Utterance)


@dataclass(frozen=True, slots=True)
class SessionHandler(Generic[U]):
    """What an integration does with a session's events: coroutines called on the event loop.

    Attributes:
        accepted: ``(utterance, event)``: the server accepted it (``utterance.task_id`` is set).
        done: ``(event)``: a task of the connection reached a final state (its latest utterance's).
        error: ``(event, utterance)``: a refusal of ``utterance``'s ``start`` that came after it was
            given up, or (``utterance`` None) an error about no utterance.
        failed: ``(utterance, exception)``: it cannot be delivered (refused, no room, connection
            lost): the rest of it is dropped.
        lost: ``(error)``: the connection is gone; ``error`` says why when it was lost rather than
            closed by either side. Answers to ``start`` and ``done`` sent there will not come.
    """

    accepted: Callable[[U, Accepted], Awaitable[None]]
    done: Callable[[Done], Awaitable[None]]
    error: Callable[[ErrorEvent, U | None], Awaitable[None]]
    failed: Callable[[U, Exception], Awaitable[None]]
    lost: Callable[[LatentSyncError | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How a :class:`SpeechSession` sends: the integrations take these as keyword arguments and pass them on.

    Attributes:
        seed: Generation seed of every utterance (None: the server's).
        max_lead_s: Seconds of audio sent ahead of playback at most (keep it under the server's
            ``speech_stream.max_buffered_s / 2``).
        max_queued_packets: Commands waiting for the sender at most; past it :meth:`SpeechSession.send_pcm` waits.
        queue_timeout_s: Longest wait in seconds for room in that queue; past it the utterance fails.
        open_timeout_s: Seconds for the connection and handshake, and for the answer to ``start``
            (counted from when the audio sent before it has played).

    Raises:
        ValueError: A bound not positive (at construction, so an integration refuses it when built).
    """

    seed: int | None = None
    max_lead_s: float = 5.0
    max_queued_packets: int = 512
    queue_timeout_s: float = 30.0
    open_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_lead_s", "max_queued_packets", "queue_timeout_s", "open_timeout_s"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} {value}: must be positive")


@dataclass(frozen=True, slots=True)
class _Start(Generic[U]):
    utterance: U


@dataclass(frozen=True, slots=True)
class _Pcm(Generic[U]):
    utterance: U
    pcm: bytes  # s16le, interleaved, whole sample frames
    duration_s: float


@dataclass(frozen=True, slots=True)
class _End(Generic[U]):
    utterance: U


_Command = _Start[U] | _Pcm[U] | _End[U]


class SpeechSession(Generic[U]):
    """Utterances to one channel's ``/ws/speech``, in order, on one connection.

    Args:
        client: The client (its channel, token and tickets); not closed here.
        handler: Told about answers, ``done``, errors, failures and lost connections.
        options: Seed, pacing and bounds (the defaults: :class:`SessionOptions`).
    """

    def __init__(self, client: AsyncClient, handler: SessionHandler[U], options: SessionOptions | None = None) -> None:
        options = options or SessionOptions()
        self._client = client
        self._handler = handler
        self._seed = options.seed
        self._max_lead_s = options.max_lead_s
        self._queue_timeout_s = options.queue_timeout_s
        self._open_timeout_s = options.open_timeout_s
        self._commands: asyncio.Queue[_Command[U]] = asyncio.Queue(maxsize=options.max_queued_packets)
        self._sender: asyncio.Task[None] | None = None
        self._stream: SpeechStream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._latest: U | None = None  # the latest utterance started on the current connection
        # starts sent on the connection awaiting the server's answer, oldest first (None: connection lost)
        self._awaiting: deque[tuple[U, asyncio.Future[Accepted | ErrorEvent | None]]] = deque()
        self._cancels: set[asyncio.Task[None]] = set()  # DELETE /tasks/<id> in flight
        self._muted: deque[str] = deque(maxlen=MUTED_KEPT)
        self._sent_until = 0.0  # time.monotonic() at which the audio sent so far ends playing, at the latest
        self._closed = False
        #: Set by the integration after a refusal no retry can fix: queued commands are dropped.
        self.disabled = False

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the sender task (the connection opens at the first utterance). Safe to call twice.

        Raises:
            RuntimeError: After :meth:`aclose`.
        """
        if self._closed:
            raise RuntimeError("SpeechSession is closed")
        if self._sender is None:
            self._sender = asyncio.create_task(self._run_sender(), name="latentsync-speech-sender")

    async def aclose(self, *, settle_s: float = 1.0) -> None:
        """Stop the sender, close the connection. Safe to call twice.

        Args:
            settle_s: Seconds the ``DELETE /tasks/<id>`` still in flight may take to finish; then
                they are cancelled too.
        """
        self._closed = True
        if self._cancels and settle_s > 0:
            await asyncio.wait(list(self._cancels), timeout=settle_s)
        tasks = [t for t in (self._sender,) if t is not None] + list(self._cancels)
        self._sender = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self._drain()
        await self._drop_stream()

    @property
    def sent_until(self) -> float:
        """``time.monotonic()`` at which the audio sent so far has played, at the latest."""
        return self._sent_until

    @property
    def queued(self) -> int:
        """Commands waiting for the sender."""
        return self._commands.qsize()

    def is_muted(self, task_id: str | None) -> bool:
        """Whether ``task_id``'s audio is to be silenced (its utterance was interrupted)."""
        return task_id is not None and task_id in self._muted

    def _mute(self, task_id: str) -> None:
        if task_id not in self._muted:
            self._muted.append(task_id)

    # ------------------------------------------------------------------------------------------ commands
    async def send_start(self, utterance: U) -> bool:
        """Queue ``start`` of ``utterance`` (its ``sample_rate_hz`` and ``channels`` set).

        Returns:
            False when no room came within ``queue_timeout_s`` (the utterance failed, the handler was told).
        """
        return await self._put(_Start(utterance))

    async def send_pcm(self, utterance: U, pcm: bytes) -> bool:
        """Queue PCM of ``utterance``: s16le, ``utterance.channels`` interleaved, whole sample frames.

        Returns:
            False when no room came within ``queue_timeout_s`` (the utterance failed, the handler was told).
        """
        duration_s = len(pcm) / (2 * utterance.channels * utterance.sample_rate_hz)
        return await self._put(_Pcm(utterance, pcm, duration_s))

    async def send_end(self, utterance: U) -> bool:
        """Queue ``end`` of ``utterance``: what was sent plays to its end.

        Returns:
            False when no room came within ``queue_timeout_s`` (the utterance failed, the handler was told).
        """
        return await self._put(_End(utterance))

    async def _put(self, command: _Command[U]) -> bool:
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await self._commands.put(command)
            # A put with room never suspends: a TTS handing over seconds of audio at once would hold
            # the event loop for all of it, and the ticks coming in beside it would wait (a gap in the
            # picture out). One turn of the loop per command lets them through.
            await asyncio.sleep(0)
            return True
        except TimeoutError:
            why = f"no room for audio for {self._queue_timeout_s:g} s (the server does not take it)"
            await self._fail(command.utterance, LatentSyncError(why))
            return False

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued command was sent (the pacing holds PCM back), at most ``timeout_s``.

        Returns:
            True when the queue is empty.
        """
        deadline = time.monotonic() + timeout_s
        while not self._commands.empty() and time.monotonic() < deadline and self._sender is not None:
            await asyncio.sleep(0.02)
        return self._commands.empty()

    # ------------------------------------------------------------------------------------------ interruption
    async def interrupt(self, utterances: list[U]) -> None:
        """Cancel ``utterances`` at once: muted, the server told, their queued audio dropped.

        The connection's latest utterance (perhaps not accepted yet) by a ``cancel`` message, written
        before anything else; the earlier ones (ended, still queued or playing) by ``DELETE
        /tasks/<id>`` in tasks of their own (nothing here waits on HTTP). One not accepted yet is
        muted and cancelled when its answer comes. Then the sender restarts on an empty queue, and
        the pacing with it.
        """
        stream = self._stream
        for utterance in utterances:
            utterance.cancelled = True
            if utterance.task_id is not None:
                self._mute(utterance.task_id)
        for utterance in utterances:
            if not utterance.sent_start:
                continue
            if utterance is self._latest and stream is not None and not stream.closed:
                try:
                    async with asyncio.timeout(CANCEL_WRITE_TIMEOUT_S):
                        await stream.cancel()
                except (LatentSyncError, TimeoutError, OSError, RuntimeError) as exc:
                    logger.debug("cancel of utterance %d not sent: %r", utterance.number, exc)
            elif utterance.task_id is not None:
                self._rest_cancel(utterance.task_id)
        sender, self._sender = self._sender, None
        if sender is not None:  # it may be in a pacing sleep or a send
            sender.cancel()
            await asyncio.wait([sender], timeout=1.0)
        self._drain()
        self._sent_until = time.monotonic()
        if not self._closed:
            self.start()

    def _rest_cancel(self, task_id: str) -> None:
        task = asyncio.create_task(self._delete_task(task_id), name="latentsync-cancel")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _delete_task(self, task_id: str) -> None:
        try:
            async with asyncio.timeout(self._open_timeout_s):
                await self._client.cancel_task(task_id)
        except (LatentSyncError, TimeoutError, OSError) as exc:  # already finished (409/404) or unreachable
            logger.debug("DELETE /tasks/%s: %r", task_id, exc)

    def _drain(self) -> None:
        while True:
            try:
                self._commands.get_nowait()
            except asyncio.QueueEmpty:
                return

    # ------------------------------------------------------------------------------------------ sender
    async def _run_sender(self) -> None:
        """Send the queued commands in order, PCM paced to ``max_lead_s`` ahead of playback."""
        while True:
            command = await self._commands.get()
            utterance = command.utterance
            if utterance.cancelled or utterance.failed or self.disabled:
                continue
            try:
                if isinstance(command, _Start):
                    await self._open(utterance)
                elif isinstance(command, _Pcm):
                    lead_s = self._sent_until - time.monotonic()
                    if lead_s > self._max_lead_s:
                        await asyncio.sleep(lead_s - self._max_lead_s)
                    await self._current_stream().send_pcm(command.pcm)
                    self._sent_until = max(self._sent_until, time.monotonic()) + command.duration_s
                else:
                    utterance.end_sent = True
                    await self._current_stream().end()
            except (LatentSyncError, OSError, TimeoutError, RuntimeError, ValueError) as exc:
                await self._fail(utterance, exc)

    def _current_stream(self) -> SpeechStream:
        if self._stream is None or self._stream.closed:
            raise ConnectionFailed("the /ws/speech connection was lost mid-utterance")
        return self._stream

    async def _open(self, utterance: U) -> None:
        """Start ``utterance`` and wait for ``accepted``.

        On a fresh connection when there is none (once more if it closed meanwhile: the server closes
        an idle one after ``speech_stream.idle_timeout_s``). The previous utterance of the connection
        may still be draining its ``end`` (``already_open``): retried every 20 ms for up to
        ``open_timeout_s`` after the audio sent before has played.

        Raises:
            StreamRefused: The server refused it (``too_many_streams``, ``queue_full``, ...).
            StreamClosed, ConnectionFailed: The connection failed twice.
            TimeoutError: No answer in time.
        """
        deadline = max(time.monotonic(), self._sent_until) + self._open_timeout_s
        lost = 0
        while True:
            if self._stream is None or self._stream.closed:
                await self._open_stream()
            stream = self._stream
            assert stream is not None
            answer: asyncio.Future[Accepted | ErrorEvent | None] = asyncio.get_running_loop().create_future()
            self._awaiting.append((utterance, answer))
            try:
                await stream.start(utterance.sample_rate_hz, channels=utterance.channels, seed=self._seed, wait=False)
                utterance.sent_start = True
                self._latest = utterance
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    event = await answer
                if event is None:
                    raise StreamClosed(1000, "the /ws/speech connection closed before the answer")
            except (StreamClosed, ConnectionFailed):
                utterance.sent_start = False
                await self._drop_stream()
                lost += 1
                if lost >= 2:
                    raise
                continue
            if isinstance(event, Accepted):
                return
            utterance.sent_start = False
            if event.code == "already_open" and time.monotonic() < deadline:
                await asyncio.sleep(ALREADY_OPEN_RETRY_S)
                continue
            raise StreamRefused(event.message, code=event.code)

    async def _fail(self, utterance: U, exc: Exception) -> None:
        """``utterance`` cannot be delivered: the rest of it is dropped; a half-sent one loses its connection.

        The server ends an utterance whose connection goes (it plays what it received).
        """
        if utterance.failed or utterance.cancelled:
            return
        utterance.failed = True
        half_sent = utterance.sent_start and not utterance.end_sent and utterance is self._latest
        if half_sent or not isinstance(exc, StreamRefused):
            await self._drop_stream()
        await self._handler.failed(utterance, exc)

    # ------------------------------------------------------------------------------------------ connection
    async def _open_stream(self) -> None:
        stream = self._client.speech(open_timeout_s=self._open_timeout_s)
        await stream.connect()
        self._stream = stream
        self._latest = None
        self._reader = asyncio.create_task(self._follow(stream), name="latentsync-speech-events")

    async def _drop_stream(self) -> None:
        """Close the connection and stop its reader; answers awaited there will not come."""
        stream, self._stream = self._stream, None
        reader, self._reader = self._reader, None
        self._latest = None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.wait([reader], timeout=1.0)
        if stream is None:
            return
        await _close_quietly(stream)
        self._answer_none()
        await self._handler.lost(None)

    def _answer_none(self) -> None:
        while self._awaiting:
            _, answer = self._awaiting.popleft()
            if not answer.done():
                answer.set_result(None)

    async def _follow(self, stream: SpeechStream) -> None:
        """Read the connection's events (answers to ``start``, ``done``, errors) until it closes."""
        error: LatentSyncError | None = None
        try:
            while (event := await stream.next_event()) is not None:
                if isinstance(event, Accepted):
                    await self._accepted(event)
                elif isinstance(event, Done):
                    await self._handler.done(event)
                elif isinstance(event, ErrorEvent):
                    await self._error_event(event)
        except LatentSyncError as exc:
            error = exc
        if self._stream is stream:  # the server closed it (idle_timeout, going away, ...)
            self._stream = None
            self._reader = None
            self._latest = None
            self._answer_none()
            await _close_quietly(stream)
            await self._handler.lost(error)

    async def _accepted(self, event: Accepted) -> None:
        if not self._awaiting:
            return
        utterance, answer = self._awaiting.popleft()
        utterance.task_id = event.task_id
        if not answer.done():
            answer.set_result(event)
        await self._handler.accepted(utterance, event)
        if utterance.cancelled:  # interrupted before the server answered (a second cancel is a harmless 409)
            self._mute(event.task_id)
            self._rest_cancel(event.task_id)

    async def _error_event(self, event: ErrorEvent) -> None:
        if event.code in START_REFUSALS and self._awaiting:
            utterance, answer = self._awaiting.popleft()
            if not answer.done():
                answer.set_result(event)  # the sender raises it (or retries already_open)
            else:
                await self._handler.error(event, utterance)
        elif event.code in ("idle_timeout", "not_open"):  # an idle connection closing; a cancel after done
            logger.debug("/ws/speech: %s: %s", event.code, event.message)
        else:
            await self._handler.error(event, None)


async def _close_quietly(stream: SpeechStream) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await stream.close()
