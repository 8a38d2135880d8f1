"""A LiveKit Agents avatar video generator on the LatentSync-Realtime server.

:class:`LatentSyncVideoGenerator` is LiveKit's ``VideoGenerator`` (``livekit.agents.voice.avatar``):
an avatar worker built with ``AvatarRunner`` and ``DataStreamAudioReceiver`` pushes the agent's
speech into it (``push_audio``, ``AudioSegmentEnd``, ``clear_buffer``) and publishes what it
yields: for every tick of the channel (25 per second, idle ticks included) one ``rtc.VideoFrame``
(RGB24) and that tick's ``rtc.AudioFrame`` (mono int16 at the channel's rate), then
``AudioSegmentEnd`` once a segment has played. The picture and the voice come from the same tick of
the server, so they cannot drift.

Each segment is one utterance on the channel's ``/ws/speech`` (one connection, opened at the first
segment's first audio frame, reopened when the server closed it as idle); the program comes from
one ``/ws/frames`` connection, reconnected with back-off when lost.

Needs ``livekit-agents`` (``clients/python/requirements-agents.txt``); the rest of
``latentsync_client`` imports without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions, VideoGenerator
except ModuleNotFoundError as exc:  # the rest of latentsync_client works without livekit
    raise ModuleNotFoundError(
        f"latentsync_client.livekit needs livekit-agents ({exc}): bash scripts/agents_venv.sh, "
        "or pip install -r clients/python/requirements-agents.txt"
    ) from exc

from latentsync_client.client import AsyncClient
from latentsync_client.errors import LatentSyncError
from latentsync_client.frames import Backoff, Disconnected, FramesStream, Reconnected
from latentsync_client.frames import Frame as TickFrame
from latentsync_client.frames_protocol import Ready, TickState
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

__all__ = ["LatentSyncVideoGenerator", "SegmentMetrics"]

logger = logging.getLogger(__name__)

#: Key of ``rtc.AudioFrame.userdata`` under which each tick's audio carries what the server said of the tick:
#: ``{"tick": int, "pts_s": float, "state": "idle" | "speaking" | "fade_in" | "fade_out", "task_id": str | None,
#: "muted": bool}`` (muted: its utterance was cleared, the audio is silence).
USERDATA_KEY = "latentsync"


@dataclass(frozen=True, slots=True)
class SegmentMetrics:
    """Latency of one segment, measured in this process.

    Attributes:
        segment: The segment's number (1, 2, ...).
        task_id: Its task on the server (32 hex digits).
        first_audio_to_first_frame_s: Seconds from its first audio frame into :meth:`push_audio`
            to its first lip-synced tick (state not ``idle``) put out by the generator.
    """

    segment: int
    task_id: str
    first_audio_to_first_frame_s: float


@dataclass(eq=False)
class _Segment(Utterance):
    """One audio segment: one utterance of the speech session (:class:`~latentsync_client.speech_session.Utterance`).

    Attributes:
        on_air: One of its ticks was put out.
        end_emitted: Its ``AudioSegmentEnd`` was put out.
        first_audio_at: ``time.monotonic()`` of its first audio frame.
    """

    on_air: bool = False
    end_emitted: bool = False
    first_audio_at: float = 0.0


_Out = TickFrame | AudioSegmentEnd


class LatentSyncVideoGenerator(VideoGenerator):
    """LiveKit's avatar ``VideoGenerator`` on a LatentSync-Realtime channel.

    Use it in an avatar worker::

        gen = LatentSyncVideoGenerator(url="http://lipsync:11001", token=TOKEN)
        options = await gen.start()            # AvatarOptions of the channel (size, fps, audio rate)
        runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room), video_gen=gen, options=options)
        await runner.start()
        ...
        await runner.aclose(); await gen.aclose()

    * :meth:`push_audio` takes ``rtc.AudioFrame`` s (int16, any rate from 8000 to 192000 Hz, 1 to 8
      channels: the server resamples and mixes down) and ``AudioSegmentEnd``. A segment (the frames up
      to ``AudioSegmentEnd``) is one utterance; segments play in order. Audio pushed faster than real
      time is paced to at most ``max_lead_s`` ahead of playback.
    * Iterating yields, per tick, ``rtc.VideoFrame`` (``RGB24``, ``width x height``) then
      ``rtc.AudioFrame`` (mono int16, ``samples_per_channel = sample_rate / fps``; its
      ``userdata["latentsync"]`` says the tick's number, state and task), and
      ``AudioSegmentEnd`` after the last tick of each segment (also for a segment without audio, or
      one the server refused or lost). Idle ticks keep coming while nothing is said.
    * :meth:`clear_buffer`: the audio of every segment not finished is silenced at once (ticks
      already queued for the consumer included), queued audio is dropped, the server cancels the
      utterances and the face fades back to idle within ``stream.crossfade_frames``. No
      ``AudioSegmentEnd`` follows for them (the runner reports the interruption itself).

    Args:
        url: The server's base URL (``http://127.0.0.1:11001``).
        token: The server's ``api.token`` (``Authorization: Bearer``), or None.
        channel: The channel (None: ``main``).
        use_tickets: Put a single-use ticket in each WebSocket URL instead of the header.
        video_format: ``rgb24`` (raw frames; best on one host) or ``jpeg`` (a tenth of the bytes,
            decoded here with Pillow).
        width: Frame width in pixels (None: the channel's; one side alone keeps the aspect ratio).
        height: Frame height in pixels.
        seed: Generation seed of every utterance (None: the server's).
        max_lead_s: Seconds of audio sent ahead of playback at most.
        max_queued_packets: Audio frames waiting for the sender at most; past it :meth:`push_audio` waits.
        queue_timeout_s: Longest wait of :meth:`push_audio` for room; past it the segment is dropped.
        max_out_ticks: Ticks waiting for the consumer at most; past it the oldest are dropped.
        open_timeout_s: Seconds for each connection and handshake, and for the answer to ``start``.
        receive_timeout_s: A frames connection without a tick for this long is lost (reconnected).
        backoff: Delays between reconnects of the frames stream.

    Raises:
        ValueError: An unknown ``video_format`` or a bound not positive.
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
        max_lead_s: float = 5.0,
        max_queued_packets: int = 512,
        queue_timeout_s: float = 30.0,
        max_out_ticks: int = 250,
        open_timeout_s: float = 5.0,
        receive_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
    ) -> None:
        if video_format not in ("rgb24", "jpeg"):
            raise ValueError(f"video_format {video_format!r}: rgb24 or jpeg")
        for name, value in (
            ("max_out_ticks", max_out_ticks),
            ("receive_timeout_s", receive_timeout_s),
        ):
            if value <= 0:
                raise ValueError(f"{name} {value}: must be positive")
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
        self._max_out_ticks = max_out_ticks
        self._receive_timeout_s = receive_timeout_s
        self._backoff = backoff or Backoff(initial_s=0.5, factor=2.0, max_s=5.0)

        self._client: AsyncClient | None = None
        self._frames: FramesStream | None = None
        self._ready: Ready | None = None
        self._frames_task: asyncio.Task[None] | None = None
        self._session: SpeechSession[_Segment] | None = None  # /ws/speech, made at start()
        self._out: deque[_Out] = deque()
        self._out_ready = asyncio.Event()
        self._segment: _Segment | None = None  # the segment being pushed
        self._segments = 0
        self._live: deque[_Segment] = deque()  # started, not finished on the server, oldest first
        self._by_task: dict[str, _Segment] = {}
        self._on_air_task: str | None = None
        self._dropped_ticks = 0
        self._frames_error: LatentSyncError | None = None  # /ws/frames refused for good
        self._cleared = False  # clear_buffer() and no audio since: the next AudioSegmentEnd is the cleared one's
        #: The latest error of a segment (refused, connection lost, no room), or None.
        self.last_error: LatentSyncError | None = None
        self._iterating = False
        self._closed = False
        #: Latency of the latest segments (first audio in → first lip-synced tick out), oldest first.
        self.segment_metrics: deque[SegmentMetrics] = deque(maxlen=64)

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def options(self) -> AvatarOptions:
        """``AvatarOptions`` for ``AvatarRunner``: the frames' size, the fps, the audio's rate (mono).

        Raises:
            RuntimeError: Before :meth:`start`.
        """
        if self._ready is None:
            raise RuntimeError("LatentSyncVideoGenerator.options: call start() first")
        r = self._ready
        return AvatarOptions(
            video_width=r.width,
            video_height=r.height,
            video_fps=float(r.fps),
            audio_sample_rate=r.sample_rate_hz,
            audio_channels=1,
        )

    @property
    def dropped_ticks(self) -> int:
        """Ticks dropped because the consumer fell more than ``max_out_ticks`` behind."""
        return self._dropped_ticks

    async def start(self) -> AvatarOptions:
        """Connect ``/ws/frames`` and start playing the channel's program. Safe to call twice.

        Returns:
            The :attr:`options` to build ``AvatarRunner`` with.

        Raises:
            Unauthorized: A wrong token. NotFound: No such channel.
            ConnectionFailed: The server cannot be reached within ``open_timeout_s``.
            RuntimeError: After :meth:`aclose`.
            LatentSyncError: Any other refusal. On every error nothing is left open.
        """
        if self._closed:
            raise RuntimeError("LatentSyncVideoGenerator is closed")
        if self._frames_task is not None:
            return self.options
        client = AsyncClient(self._url, token=self._token, channel=self._channel, use_tickets=self._use_tickets)
        frames = client.frames(
            format=self._video_format,
            width=self._width,
            height=self._height,
            audio="pcm_s16le",
            reconnect=True,
            backoff=self._backoff,
            receive_timeout_s=self._receive_timeout_s,
            open_timeout_s=self._speech.open_timeout_s,
        )
        try:
            await frames.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await frames.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await client.aclose()
            raise
        assert frames.ready is not None
        self._client, self._frames, self._ready = client, frames, frames.ready
        handler = SessionHandler(
            accepted=self._accepted, done=self._done, error=self._error, failed=self._failed, lost=self._lost
        )
        self._session = SpeechSession(
            client,
            handler,
            self._speech,
        )
        self._session.start()
        self._frames_task = asyncio.create_task(self._run_frames(frames), name="latentsync-frames")
        return self.options

    async def aclose(self) -> None:
        """Cancel what is still being said, stop every task, close every connection. Safe to call twice."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._cancel_live()
        self._closed = True
        frames_task, self._frames_task = self._frames_task, None
        if frames_task is not None:
            frames_task.cancel()
            await asyncio.wait([frames_task], timeout=2.0)
        if self._session is not None:
            await self._session.aclose()
        self._live.clear()
        self._by_task.clear()
        if self._frames is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._frames.close()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await client.aclose()
        self._out_ready.set()

    # ------------------------------------------------------------------------------------------ audio in
    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        """Take one audio frame of the current segment, or ``AudioSegmentEnd`` to end it.

        Args:
            frame: ``rtc.AudioFrame`` (int16 interleaved, ``sample_rate`` Hz, ``num_channels``); an
                empty one is ignored. ``AudioSegmentEnd``: the segment is complete (without any
                audio: ``AudioSegmentEnd`` is put out at once).

        Raises:
            RuntimeError: Before :meth:`start` or after :meth:`aclose`.
            LatentSyncError: ``/ws/frames`` was refused for good (nothing can play).
            ValueError: A rate outside 8000..192000 Hz or over 8 channels (nothing is sent of it).
        """
        session = self._session
        if self._frames_task is None or self._closed or session is None:
            raise RuntimeError("LatentSyncVideoGenerator: push_audio before start() or after aclose()")
        if self._frames_error is not None:
            raise self._frames_error
        if isinstance(frame, AudioSegmentEnd):
            segment, self._segment = self._segment, None
            if segment is None and self._cleared:
                self._cleared = False  # the end of the segment clear_buffer() cut
            elif segment is None:
                self._put_out(AudioSegmentEnd())
            elif not segment.cancelled and not segment.failed and self._session is not None:
                await self._session.send_end(segment)
            return
        rate, channels = int(frame.sample_rate), int(frame.num_channels)
        if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
            raise ValueError(f"audio at {rate} Hz: the server takes {MIN_RATE_HZ}..{MAX_RATE_HZ} Hz")
        if not 1 <= channels <= MAX_CHANNELS:
            raise ValueError(f"audio with {channels} channels: the server takes 1..{MAX_CHANNELS}")
        pcm = bytes(frame.data.cast("B"))
        if not pcm:
            return
        self._cleared = False
        segment = self._segment
        if segment is not None and (segment.sample_rate_hz != rate or segment.channels != channels):
            await self.push_audio(AudioSegmentEnd())  # the format changed: a new utterance
            segment = None
        if segment is None:
            self._segments += 1
            segment = self._segment = _Segment(self._segments, rate, channels, first_audio_at=time.monotonic())
            self._live.append(segment)
            if not await session.send_start(segment):
                return
        if segment.cancelled or segment.failed:
            return
        await session.send_pcm(segment, pcm)

    # ------------------------------------------------------------------------------------------ interruption
    async def clear_buffer(self) -> None:
        """Stop the audio at once: silence every segment not finished, drop queued audio, cancel on the server.

        The face fades back to idle within the server's ``stream.crossfade_frames``. The next
        :meth:`push_audio` starts a new segment.
        """
        if self._frames_task is None or self._closed:
            return
        self._segment = None
        self._cleared = True
        await self._cancel_live()

    async def _cancel_live(self) -> None:
        """Cancel every live segment (muted at once, the server told, queued audio dropped) and forget them.

        Ticks of one on air stay muted; the others are forgotten at once (nothing follows them any more).
        """
        live = list(self._live)
        self._live.clear()
        for segment in live:
            if segment.task_id is not None and not segment.on_air:
                self._by_task.pop(segment.task_id, None)
        if self._session is not None:
            await self._session.interrupt(live)

    # ------------------------------------------------------------------------------------------ /ws/speech events
    async def _accepted(self, segment: _Segment, event: Accepted) -> None:
        if not segment.cancelled:  # a cleared one is muted and cancelled by the session
            self._by_task[event.task_id] = segment

    async def _done(self, event: Done) -> None:
        segment = self._by_task.get(event.task_id)
        if segment is None:
            return
        if event.status == "failed" and not segment.cancelled:
            logger.warning("segment %d failed on the server: %s", segment.number, event.error)
        self._finished_through(segment)

    async def _error(self, event: ErrorEvent, segment: _Segment | None) -> None:
        if segment is None:
            logger.warning("/ws/speech: %s: %s", event.code, event.message)
        else:  # its sender gave up waiting already (and failed it)
            logger.debug("segment %d: late answer %s", segment.number, event.code)

    async def _lost(self, error: LatentSyncError | None) -> None:
        if error is not None:  # accepted segments are still followed on /ws/frames
            logger.warning("/ws/speech of %s lost: %s", self._url, error)

    async def _failed(self, segment: _Segment, exc: Exception) -> None:
        """The segment cannot be played (refused, no room, connection lost): end it for the consumer."""
        self.last_error = exc if isinstance(exc, LatentSyncError) else LatentSyncError(str(exc))
        logger.error("segment %d not delivered to %s: %s", segment.number, self._url, exc)
        if self._segment is segment:
            self._segment = None
        if not segment.on_air:
            self._emit_end(segment)

    def _finished_through(self, segment: _Segment) -> None:
        """``done`` of ``segment``: it is over, and so is every segment before it (they play in order).

        Segments seen on air end on ``/ws/frames`` (at the first tick of another task); the others here.
        """
        if segment not in self._live:
            return
        for earlier in list(self._live):
            if not earlier.on_air:
                self._emit_end(earlier)
                if earlier.task_id is not None:
                    self._by_task.pop(earlier.task_id, None)
            if earlier is segment:
                break

    def _emit_end(self, segment: _Segment) -> None:
        """Put out the segment's ``AudioSegmentEnd`` (once; none for a cleared one) and forget it."""
        if not segment.end_emitted and not segment.cancelled:
            segment.end_emitted = True
            self._put_out(AudioSegmentEnd())
        with contextlib.suppress(ValueError):
            self._live.remove(segment)

    # ------------------------------------------------------------------------------------------ /ws/frames
    async def _run_frames(self, frames: FramesStream) -> None:
        """Queue every tick of the channel for the consumer; reconnect when lost, stop on a refusal."""
        try:
            async for item in frames:
                if isinstance(item, TickFrame):
                    self._tick(item)
                elif isinstance(item, Disconnected):
                    logger.warning(
                        "/ws/frames of %s lost (%s); retry in %.1f s", self._url, item.error, item.retry_in_s
                    )
                elif isinstance(item, Reconnected):
                    logger.info("/ws/frames of %s is back", self._url)
        except LatentSyncError as exc:  # a refusal no retry can fix (token, channel)
            self._frames_error = exc
            logger.error("/ws/frames of %s refused: %s", self._url, exc)
        finally:
            self._out_ready.set()

    def _tick(self, tick: TickFrame) -> None:
        task_id = tick.header.task_id
        if task_id != self._on_air_task:
            previous = self._by_task.pop(self._on_air_task, None) if self._on_air_task else None
            if previous is not None:
                self._emit_end(previous)
            self._on_air_task = task_id
        segment = self._by_task.get(task_id) if task_id is not None else None
        if segment is not None and not segment.on_air and tick.header.state is not TickState.idle:
            segment.on_air = True
            if not segment.cancelled:
                self.segment_metrics.append(
                    SegmentMetrics(segment.number, task_id or "", time.monotonic() - segment.first_audio_at)
                )
            for earlier in list(self._live):  # segments play in order: the ones before are over
                if earlier is segment:
                    break
                self._emit_end(earlier)
                if earlier.task_id is not None:
                    self._by_task.pop(earlier.task_id, None)
        self._put_out(tick)

    def _put_out(self, item: _Out) -> None:
        self._out.append(item)
        ticks = sum(1 for o in self._out if isinstance(o, TickFrame)) if len(self._out) > self._max_out_ticks else 0
        if ticks > self._max_out_ticks:
            for i, o in enumerate(self._out):
                if isinstance(o, TickFrame):
                    del self._out[i]
                    self._dropped_ticks += 1
                    break
        self._out_ready.set()

    # ------------------------------------------------------------------------------------------ frames out
    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        """Ticks as ``rtc.VideoFrame`` + ``rtc.AudioFrame``, and ``AudioSegmentEnd`` s, until :meth:`aclose`.

        Raises (from the iteration):
            RuntimeError: Iterated twice at once, or before :meth:`start`.
            LatentSyncError: ``/ws/frames`` was refused for good (the token or the channel went away).
        """
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        if self._frames_task is None and not self._closed:
            raise RuntimeError("LatentSyncVideoGenerator: iterate after start()")
        if self._iterating:
            raise RuntimeError("LatentSyncVideoGenerator is iterated already")
        self._iterating = True
        try:
            while True:
                while not self._out:
                    if self._frames_error is not None:
                        raise self._frames_error
                    if self._closed:
                        return
                    self._out_ready.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._receive_timeout_s):
                            await self._out_ready.wait()
                item = self._out.popleft()
                if isinstance(item, AudioSegmentEnd):
                    yield item
                    continue
                video, audio = await self._to_rtc(item)
                yield video
                if audio is not None:
                    yield audio
        finally:
            self._iterating = False

    async def _to_rtc(self, tick: TickFrame) -> tuple[rtc.VideoFrame, rtc.AudioFrame | None]:
        """One tick as LiveKit frames; its audio silenced when its utterance was cleared."""
        h = tick.header
        rgb = tick.video if self._video_format == "rgb24" else await asyncio.to_thread(_jpeg_to_rgb, tick.video)
        video = rtc.VideoFrame(h.width, h.height, rtc.VideoBufferType.RGB24, rgb)
        if not tick.audio:
            return video, None
        segment = self._by_task.get(h.task_id) if h.task_id is not None else None
        muted = h.task_id is not None and (
            (self._session is not None and self._session.is_muted(h.task_id))
            or (segment is not None and segment.cancelled)
        )
        pcm = bytes(len(tick.audio)) if muted else tick.audio
        info = {"tick": h.tick, "pts_s": h.pts_s, "state": h.state.name, "task_id": h.task_id, "muted": muted}
        audio = rtc.AudioFrame(pcm, h.sample_rate_hz, 1, len(pcm) // 2, userdata={USERDATA_KEY: info})
        return video, audio


def _jpeg_to_rgb(data: bytes) -> bytes:
    """Decode one JPEG to ``height * width * 3`` bytes of RGB (rows top to bottom)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB").tobytes()
