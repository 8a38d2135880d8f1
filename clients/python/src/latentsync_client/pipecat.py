"""A Pipecat video service on the LatentSync-Realtime server: the face (and voice) of a voice agent.

:class:`LatentSyncVideoService` sits where Pipecat's avatar services sit (``SimliVideoService``,
``TavusVideoService``, ``HeyGenVideoService``): after the TTS, before the output transport. It
takes the TTS's audio, streams each segment (``TTSStartedFrame`` … ``TTSStoppedFrame``) to the
channel's ``/ws/speech`` and plays the channel's program from ``/ws/frames``: every tick becomes
one :class:`~pipecat.frames.frames.OutputImageRawFrame` plus that tick's PCM as a
:class:`~pipecat.frames.frames.SpeechOutputAudioRawFrame`, so the lips the user sees and the voice
the user hears come from the same tick and cannot drift. The TTS's own audio is consumed here and
never reaches the transport.

Needs ``pipecat-ai`` (``clients/python/requirements-agents.txt``); the rest of ``latentsync_client``
imports without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

try:
    from loguru import logger
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        SpeechOutputAudioRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        UserStartedSpeakingFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
    from pipecat.utils.errors import ErrorCategory
except ModuleNotFoundError as exc:  # the rest of latentsync_client works without pipecat
    raise ModuleNotFoundError(
        f"latentsync_client.pipecat needs pipecat-ai ({exc}): bash scripts/agents_venv.sh, "
        "or pip install -r clients/python/requirements-agents.txt"
    ) from exc

from latentsync_client.client import AsyncClient
from latentsync_client.errors import (
    BadRequest,
    ConnectionFailed,
    Forbidden,
    LatentSyncError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    RateLimited,
    ServerError,
    StreamClosed,
    StreamRefused,
    Unauthorized,
)
from latentsync_client.frames import Backoff
from latentsync_client.frames import Frame as TickFrame
from latentsync_client.frames_protocol import (
    CLOSE_BAD_HELLO,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_TOO_LARGE,
    CLOSE_UNSUPPORTED,
    TickState,
)
from latentsync_client.speech import Accepted, Done, ErrorEvent
from latentsync_client.speech_session import (
    MAX_CHANNELS,
    MAX_RATE_HZ,
    MIN_RATE_HZ,
    SessionHandler,
    SessionOptions,
    SpeechSession,
    Utterance,
)

__all__ = ["LatentSyncVideoService", "TickInfo"]

#: Refusals of ``/ws/frames`` no retry can fix (a wrong token, an unknown channel, a bad hello).
_PERMANENT = (Unauthorized, Forbidden, NotFound, BadRequest, PayloadTooLarge, ProtocolError)
_PERMANENT_CLOSE = (CLOSE_BAD_HELLO, CLOSE_TOO_LARGE, CLOSE_UNSUPPORTED, CLOSE_MESSAGE_TOO_BIG)
#: Key of :attr:`pipecat.frames.frames.Frame.metadata` under which each emitted frame carries its :class:`TickInfo`.
METADATA_KEY = "latentsync"


@dataclass(frozen=True, slots=True)
class TickInfo:
    """What the server said about the tick an emitted image or audio frame comes from.

    Found in ``frame.metadata["latentsync"]`` of every frame the service emits.

    Attributes:
        tick: The tick's number on the channel's stream (+1 per frame at ``fps``).
        pts_s: Its presentation time in seconds (``tick / fps``).
        state: ``idle``, ``speaking``, ``fade_in`` or ``fade_out``.
        task_id: The server task on air (32 hex digits), or None while idle.
        muted: True when its audio was replaced by silence (an interrupted utterance).
    """

    tick: int
    pts_s: float
    state: str
    task_id: str | None
    muted: bool


@dataclass(eq=False)
class _Segment(Utterance):
    """One TTS segment: one utterance of the speech session (:class:`~latentsync_client.speech_session.Utterance`).

    Attributes:
        started: ``start`` was queued for the sender (the segment had audio).
        ended: ``end`` was queued (no more audio will come).
        reported: An ``ErrorFrame`` about its TTS audio was pushed (one per segment).
        first_audio_at: ``time.monotonic()`` of its first TTS audio frame.
        first_frame_at: ``time.monotonic()`` of its first tick on air.
        finished: Set once its task reached a final state (or can no longer be followed).
    """

    started: bool = False
    ended: bool = False
    reported: bool = False
    first_audio_at: float | None = None
    first_frame_at: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class LatentSyncVideoService(AIService):
    """Lip-synced video (and the matching audio) of a LatentSync-Realtime channel for a Pipecat pipeline.

    Put it right after the TTS service. Downstream it emits, for every tick of the channel (25 per
    second, idle ticks included, so the face never freezes), an ``OutputImageRawFrame`` (RGB,
    ``width x height`` of the server's answer) and a ``SpeechOutputAudioRawFrame`` (mono s16le at
    the stream's rate, silence while idle), both carrying a :class:`TickInfo` in
    ``metadata["latentsync"]``. ``TTSAudioRawFrame`` s are consumed (never forwarded): their audio
    goes to the server, which plays it back lip-synced. ``TTSStartedFrame`` / ``TTSStoppedFrame`` and
    every other frame pass through.

    * A segment is one utterance on the server, opened at its first audio frame (any rate from 8000
      to 192000 Hz, 1 to 8 channels: the server resamples and mixes down) and ended at
      ``TTSStoppedFrame``. Segments are sent in order on one ``/ws/speech`` connection and play in
      that order. TTS audio that comes faster than real time is paced to at most ``max_lead_s``
      ahead of playback (the server refuses more than its ``max_buffered_s``).
    * ``InterruptionFrame`` (and ``UserStartedSpeakingFrame`` with ``interrupt_on_user_speech``):
      the audio of every utterance of this service is silenced at once, queued audio is dropped,
      the server cancels them (the face fades back to idle within ``stream.crossfade_frames``).
    * TTFB metrics: from a segment's first TTS audio frame to its first tick on air.
    * The server going away (a restart, a network loss): an ``ErrorFrame`` upstream (not fatal,
      category ``CONNECTIVITY``), reconnects with ``backoff``; frames flow again once it is back.
      A wrong token or an unknown channel: an ``ErrorFrame`` with a permanent category
      (``AUTHENTICATION``, ``INVALID_REQUEST``): nothing is retried and nothing stays open.

    Args:
        url: The server's base URL (``http://127.0.0.1:11001``).
        token: The server's ``api.token`` (sent as ``Authorization: Bearer``), or None.
        channel: The channel (None: ``main``).
        use_tickets: Put a single-use ticket in each WebSocket URL instead of the header.
        video_format: ``rgb24`` (raw frames; best on one machine) or ``jpeg`` (a tenth of the
            bytes; decoded here with Pillow).
        width: Frame width in pixels (None: the channel's; one side alone keeps the aspect ratio).
        height: Frame height in pixels.
        seed: Generation seed of every utterance (None: the server's).
        interrupt_on_user_speech: Treat ``UserStartedSpeakingFrame`` as an interruption too.
        max_lead_s: Seconds of audio sent ahead of playback at most (< the server's
            ``speech_stream.max_buffered_s / 2``, 15 s by default).
        max_queued_packets: TTS audio frames waiting for the sender at most; past it
            ``process_frame`` waits (back pressure on the TTS).
        queue_timeout_s: Longest wait for room in that queue; past it the segment is dropped
            with an ``ErrorFrame``.
        end_timeout_s: On ``EndFrame``, seconds to wait, beyond the audio still to play, for the
            utterances to finish before closing.
        open_timeout_s: Seconds for each connection and handshake.
        receive_timeout_s: A frames connection with no tick for this long is lost.
        backoff: Delays between reconnects of the frames stream.
        **kwargs: Passed to :class:`pipecat.services.ai_service.AIService`.

    Raises:
        ValueError: An unknown ``video_format``, or a bound not positive.
    """

    def __init__(
        self,
        *,
        url: str,
        token: str | None = None,
        channel: str | None = None,
        use_tickets: bool = False,
        video_format: Literal["rgb24", "jpeg"] = "rgb24",
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        interrupt_on_user_speech: bool = True,
        max_lead_s: float = 5.0,
        max_queued_packets: int = 512,
        queue_timeout_s: float = 30.0,
        end_timeout_s: float = 5.0,
        open_timeout_s: float = 5.0,
        receive_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
        **kwargs: object,
    ) -> None:
        if video_format not in ("rgb24", "jpeg"):
            raise ValueError(f"video_format {video_format!r}: rgb24 or jpeg")
        if receive_timeout_s <= 0:
            raise ValueError(f"receive_timeout_s {receive_timeout_s}: must be positive")
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self._url = url
        self._token = token
        self._channel = channel
        self._use_tickets = use_tickets
        self._video_format = video_format
        self._width = width
        self._height = height
        # checked here, so a bad bound refuses the integration when it is built
        self._speech = SessionOptions(
            seed=seed,
            max_lead_s=max_lead_s,
            max_queued_packets=max_queued_packets,
            queue_timeout_s=queue_timeout_s,
            open_timeout_s=open_timeout_s,
        )
        self._interrupt_on_user_speech = interrupt_on_user_speech
        self._end_timeout_s = end_timeout_s
        self._receive_timeout_s = receive_timeout_s
        self._backoff = backoff or Backoff(initial_s=0.5, factor=2.0, max_s=5.0)

        self._client: AsyncClient | None = None
        self._frames_task: asyncio.Task[None] | None = None
        self._session: SpeechSession[_Segment] | None = None  # /ws/speech, made at start()
        self._segment: _Segment | None = None  # the segment the TTS is feeding
        self._segments = 0  # segments opened so far
        self._live: deque[_Segment] = deque()  # started and not finished, oldest first
        self._by_task: dict[str, _Segment] = {}  # task id -> live segment
        self._ttfb_segment: _Segment | None = None
        self._unusable = False  # a permanent refusal (token, channel): nothing more is sent
        self._frames_down = False  # an ErrorFrame was pushed for the current outage of /ws/frames
        self._closed = False

    # ------------------------------------------------------------------------------------------ lifecycle
    def can_generate_metrics(self) -> bool:
        """True: the service reports TTFB (first TTS audio in → first lip-synced frame out)."""
        return True

    async def start(self, frame: StartFrame) -> None:
        """Make the HTTP client and the speech session (connections open after ``StartFrame`` went on)."""
        await super().start(frame)
        self._closed = False
        if self._client is None:
            self._client = AsyncClient(
                self._url, token=self._token, channel=self._channel, use_tickets=self._use_tickets
            )
        if self._session is None:
            handler = SessionHandler(
                accepted=self._accepted, done=self._done, error=self._error, failed=self._failed, lost=self._lost
            )
            self._session = SpeechSession(
                self._client,
                handler,
                self._speech,
            )

    async def stop(self, frame: EndFrame) -> None:
        """End gracefully: the segment being fed ends, what was sent plays to its end (bounded), then close."""
        await super().stop(frame)
        await self._end_segment()
        session = self._session
        if session is not None and not self._unusable:  # wait until the sender has sent everything queued
            await session.drain(
                max(0.0, session.sent_until - time.monotonic()) + self._speech.max_lead_s + self._end_timeout_s
            )
        pending = [] if self._unusable else [s.finished.wait() for s in self._live if not s.failed]
        if pending and session is not None:
            timeout_s = max(0.0, session.sent_until - time.monotonic()) + self._end_timeout_s
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.gather(*pending)
            except TimeoutError:
                logger.warning(f"{self}: utterances still playing after {timeout_s:.1f} s: closing")
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        """Stop at once: the server cancels this service's utterances (best effort, 1 s), then close."""
        await super().cancel(frame)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._interrupt()
        await self._close()

    async def cleanup(self) -> None:
        """Close everything left (safe after :meth:`stop` or :meth:`cancel`)."""
        await super().cleanup()  # type: ignore[no-untyped-call]  # pipecat 1.14 leaves it unannotated
        await self._close()

    async def _close(self) -> None:
        """Stop the tasks and close the connections and the HTTP client. Safe to call twice."""
        self._closed = True
        frames_task, self._frames_task = self._frames_task, None
        if frames_task is not None:
            await self.cancel_task(frames_task, timeout=2.0)
        session, self._session = self._session, None
        if session is not None:
            await session.aclose()
        for segment in self._live:
            segment.finished.set()
        self._live.clear()
        self._by_task.clear()
        self._segment = None
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await client.aclose()

    # ------------------------------------------------------------------------------------------ frames in
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Take TTS audio and interruptions; pass everything else on.

        Args:
            frame: The frame.
            direction: Its direction.
        """
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            if self._frames_task is None:
                self._frames_task = self.create_task(self._run_frames(), name="latentsync-frames")
            if self._session is not None:
                self._session.start()
        elif isinstance(frame, TTSAudioRawFrame):
            await self._feed(frame)  # consumed: the server's audio of the same tick replaces it
        elif isinstance(frame, TTSStartedFrame):
            await self._end_segment()
            self._segment = self._new_segment()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStoppedFrame):
            await self._end_segment()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame) or (
            isinstance(frame, UserStartedSpeakingFrame) and self._interrupt_on_user_speech
        ):
            await self._interrupt()  # the server is told before the interruption goes downstream
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _new_segment(self) -> _Segment:
        self._segments += 1
        return _Segment(number=self._segments)

    async def _feed(self, frame: TTSAudioRawFrame) -> None:
        """Queue one TTS audio frame (s16le, ``num_channels`` interleaved at ``sample_rate`` Hz) for the server."""
        session = self._session
        if self._unusable or self._closed or session is None or not frame.audio:
            return
        segment = self._segment
        if (
            segment is not None
            and segment.started
            and (segment.sample_rate_hz != frame.sample_rate or segment.channels != frame.num_channels)
        ):
            await self._end_segment()  # the TTS changed its format: a new utterance
            segment = None
        if segment is None:
            segment = self._segment = self._new_segment()
        if segment.failed or segment.cancelled:
            return
        rate, channels = int(frame.sample_rate), int(frame.num_channels)
        problem = None
        if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
            problem = f"a sample rate of {rate} Hz (the server takes {MIN_RATE_HZ}..{MAX_RATE_HZ})"
        elif not 1 <= channels <= MAX_CHANNELS:
            problem = f"{channels} channels (the server takes 1..{MAX_CHANNELS})"
        elif len(frame.audio) % (2 * channels):
            problem = f"{len(frame.audio)} bytes, not whole s16le frames of {channels} channel(s)"
        if problem is not None:
            # Nothing sent yet: the whole segment is dropped. Else this frame only (the utterance still ends).
            segment.failed = segment.failed or not segment.started
            if not segment.reported:
                segment.reported = True
                dropped = f"segment {segment.number} dropped" if segment.failed else "frame dropped"
                await self.push_error(f"TTS audio with {problem}: {dropped}", category=ErrorCategory.APPLICATION)
            return
        if not segment.started:
            segment.sample_rate_hz, segment.channels = rate, channels
            segment.started = True
            segment.first_audio_at = time.monotonic()
            self._live.append(segment)
            if self._ttfb_segment is None:
                self._ttfb_segment = segment
                await self.start_ttfb_metrics()
            if not await session.send_start(segment):
                return
        await session.send_pcm(segment, bytes(frame.audio))

    async def _end_segment(self) -> None:
        """The TTS segment being fed is over: its utterance ends after what was sent (nothing was sent: nothing)."""
        segment, self._segment = self._segment, None
        if segment is None or not segment.started or segment.ended:
            return
        segment.ended = True
        if not segment.failed and not segment.cancelled and self._session is not None:
            await self._session.send_end(segment)

    # ------------------------------------------------------------------------------------------ interruption
    async def _interrupt(self) -> bool:
        """Silence this service's utterances at once, tell the server to cancel them, drop their queued audio.

        Returns:
            False when there was nothing to interrupt.
        """
        live = list(self._live)
        if not live and self._segment is None:
            return False
        if self._segment is not None:
            self._segment.cancelled = True
            self._segment = None
        if self._ttfb_segment is not None:
            self._ttfb_segment = None
            await self.cancel_ttfb_metrics()  # type: ignore[no-untyped-call]  # unannotated in pipecat 1.14
        if self._session is not None:
            await self._session.interrupt([s for s in live if not s.finished.is_set()])
        for segment in live:
            segment.cancelled = True
            if not segment.sent_start:  # never reached the server: nothing to cancel or follow
                segment.finished.set()
        self._prune()
        return True

    # ------------------------------------------------------------------------------------------ /ws/speech events
    async def _failed(self, segment: _Segment, exc: Exception) -> None:
        """The speech session could not deliver ``segment`` (refused, no room, connection lost)."""
        segment.failed = True
        if self._ttfb_segment is segment:  # it will never be on air: no TTFB for it
            self._ttfb_segment = None
            await self.cancel_ttfb_metrics()  # type: ignore[no-untyped-call]  # unannotated in pipecat 1.14
        if not segment.sent_start:
            segment.finished.set()
        if self._unusable:
            return
        if isinstance(exc, StreamRefused):
            code = exc.code or ""
            await self.push_error(
                f"segment {segment.number} refused by the server: {exc}",
                exception=exc,
                category=ErrorCategory.RATE_LIMIT
                if code in ("too_many_streams", "queue_full")
                else ErrorCategory.APPLICATION,
            )
            return
        if isinstance(exc, Unauthorized | Forbidden | NotFound):
            self._unusable = True  # the frames stream says the same: one error is enough
            if self._session is not None:
                self._session.disabled = True
        await self.push_error(
            f"segment {segment.number} not delivered to {self._url}: {exc}",
            exception=exc,
            category=self._classify_error(exc) or ErrorCategory.SERVER,
        )

    async def _lost(self, error: LatentSyncError | None) -> None:
        """The connection is gone: the ``done`` of the utterances sent there cannot come."""
        for segment in self._live:
            if segment.sent_start:
                segment.finished.set()
        self._prune()
        if error is not None and not self._closed:
            await self.push_error(
                f"/ws/speech of {self._url} lost: {error}", exception=error, category=ErrorCategory.CONNECTIVITY
            )

    async def _accepted(self, segment: _Segment, event: Accepted) -> None:
        self._by_task[event.task_id] = segment  # an interrupted one is muted and cancelled by the session

    async def _done(self, event: Done) -> None:
        segment = self._by_task.get(event.task_id)
        if segment is None:
            return
        self._finish_through(segment)
        if event.status == "failed" and not segment.cancelled:
            await self.push_error(
                f"segment {segment.number} (task {event.task_id}) failed on the server: {event.error}",
                category=ErrorCategory.SERVER,
            )

    async def _error(self, event: ErrorEvent, segment: _Segment | None) -> None:
        if segment is not None:  # a refusal its sender gave up waiting for
            if not segment.sent_start or segment.cancelled:
                segment.finished.set()
                self._prune()
        else:
            await self.push_error(f"/ws/speech: {event.code}: {event.message}", category=ErrorCategory.SERVER)

    def _finish_through(self, segment: _Segment) -> None:
        """``segment`` is over, and so is every segment before it: they play in order.

        A connection reports ``done`` of its latest utterance only: an earlier one, ended and still
        playing when the next started there, is known to be over when a later one is on air or done.
        """
        if segment not in self._live:
            segment.finished.set()
            return
        for earlier in self._live:
            earlier.finished.set()
            if earlier is segment:
                break
        self._prune()

    def _finish_through_before(self, segment: _Segment) -> None:
        """``segment`` is on air: every segment before it is over."""
        for earlier in self._live:
            if earlier is segment:
                break
            earlier.finished.set()
        self._prune()

    def _prune(self) -> None:
        """Forget finished segments (``_live`` keeps order: the oldest unfinished one stays first)."""
        while self._live and self._live[0].finished.is_set():
            self._live.popleft()
        for task_id in [t for t, s in self._by_task.items() if s.finished.is_set()]:
            del self._by_task[task_id]

    # ------------------------------------------------------------------------------------------ /ws/frames
    async def _run_frames(self) -> None:
        """Play the channel's program: every tick out as an image and its audio; reconnect when lost."""
        assert self._client is not None
        failures = 0
        while not self._closed:
            stream = self._client.frames(
                format=self._video_format,
                width=self._width,
                height=self._height,
                audio="pcm_s16le",
                receive_timeout_s=self._receive_timeout_s,
                open_timeout_s=self._speech.open_timeout_s,
            )
            error: LatentSyncError
            try:
                async with stream:
                    if self._frames_down:
                        logger.info(f"{self}: /ws/frames of {self._url} is back")
                    self._frames_down = False
                    failures = 0
                    async for item in stream:
                        if isinstance(item, TickFrame):
                            await self._emit(item)
                error = ConnectionFailed("the server closed /ws/frames")
            except LatentSyncError as exc:
                if isinstance(exc, _PERMANENT) or (
                    isinstance(exc, StreamClosed) and exc.close_code in _PERMANENT_CLOSE
                ):
                    self._unusable = True
                    await self.push_error(
                        f"/ws/frames of {self._url} refused: {exc}", exception=exc, category=self._classify_error(exc)
                    )
                    return
                error = exc
            failures += 1
            if not self._frames_down:
                self._frames_down = True
                await self.push_error(
                    f"LatentSync server {self._url} unreachable ({error}); reconnecting",
                    exception=error,
                    category=ErrorCategory.CONNECTIVITY,
                )
            await asyncio.sleep(self._backoff.delay_s(failures))

    async def _emit(self, tick: TickFrame) -> None:
        """Push one tick: its picture, then its audio (silenced when its utterance was interrupted)."""
        h = tick.header
        now = time.monotonic()
        segment = self._by_task.get(h.task_id) if h.task_id is not None else None
        muted = h.task_id is not None and (
            (self._session is not None and self._session.is_muted(h.task_id))
            or (segment is not None and segment.cancelled)
        )
        info = TickInfo(tick=h.tick, pts_s=h.pts_s, state=h.state.name, task_id=h.task_id, muted=muted)
        rgb = tick.video if self._video_format == "rgb24" else await asyncio.to_thread(_jpeg_to_rgb, tick.video)
        image = OutputImageRawFrame(image=rgb, size=(h.width, h.height), format="RGB")
        image.pts = h.pts_us * 1000
        image.metadata[METADATA_KEY] = info
        await self.push_frame(image)
        if tick.audio:
            pcm = bytes(len(tick.audio)) if muted else tick.audio
            audio = SpeechOutputAudioRawFrame(audio=pcm, sample_rate=h.sample_rate_hz, num_channels=1)
            audio.pts = h.pts_us * 1000
            audio.metadata[METADATA_KEY] = info
            await self.push_frame(audio)
        if segment is not None and self._live and self._live[0] is not segment:
            self._finish_through_before(segment)
        if segment is not None and segment.first_frame_at is None and h.state is not TickState.idle and not muted:
            segment.first_frame_at = now
            if self._ttfb_segment is segment:
                self._ttfb_segment = None
                await self.stop_ttfb_metrics()

    def _classify_error(self, exception: Exception) -> ErrorCategory | None:
        """Pipecat's error category of a client exception (401 authentication, 404 invalid request, ...)."""
        if isinstance(exception, Unauthorized):
            return ErrorCategory.AUTHENTICATION
        if isinstance(exception, Forbidden):
            return ErrorCategory.AUTHORIZATION
        if isinstance(exception, NotFound | BadRequest | PayloadTooLarge | ProtocolError):
            return ErrorCategory.INVALID_REQUEST
        if isinstance(exception, RateLimited):
            return ErrorCategory.RATE_LIMIT
        if isinstance(exception, ServerError):
            return ErrorCategory.SERVER
        if isinstance(exception, StreamClosed) and exception.close_code in _PERMANENT_CLOSE:
            return ErrorCategory.INVALID_REQUEST
        if isinstance(exception, ConnectionFailed | StreamClosed | OSError | TimeoutError):
            return ErrorCategory.CONNECTIVITY
        return None


def _jpeg_to_rgb(data: bytes) -> bytes:
    """Decode one JPEG to ``height * width * 3`` bytes of RGB (rows top to bottom)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB").tobytes()
