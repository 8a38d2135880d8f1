"""Frames egress: every tick on air as data, for clients that render the avatar themselves (``/ws/frames``).

Data path (docs/frames-protocol.md)::

    controller thread --TappedSink--> FramesHub.on_tick (put_nowait, counted when full)
        --> encoder thread: per tick, one resize per size and one encode per (format, size)
            asked for (JPEG: OpenCV; H.264: libx264 with the WHEP encoder's settings; rgb24: the
            pixels) --> every client's bounded deque --> its WebSocket handler thread (header +
            payloads, one binary message per tick).

The tap is the one WHEP uses: a client gets every tick the mixer made, whatever the encoders and
outputs do (docs/outputs.md). Nothing here ever blocks the controller, and a client that reads
slowly loses its own backlog (whole ticks, counted and reported in the header of its next message);
the other clients and the outputs never notice. An H.264 client starts, and resumes after a loss,
at a keyframe (forced on the next tick).
"""

from __future__ import annotations

import collections
import fractions
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import cv2
import numpy as np

from latentsync.config import FramesConfig
from latentsync.serving.egress.encoders import h264_encoder
from latentsync.serving.egress.frames_protocol import (
    FLAG_KEYFRAME,
    STATE_CODES,
    AudioFormat,
    FrameHeader,
    Subscription,
    TickState,
    VideoFormat,
)

logger = logging.getLogger(__name__)

#: Ticks waiting for the encoder thread; one more is skipped for every client (and counted).
INBOX_TICKS = 12
#: Keyframe requests (joins, losses) closer than this share one forced keyframe, in seconds.
MIN_FORCED_KEYFRAME_GAP_S = 0.2
NO_TASK = bytes(16)

#: ``() -> (stream state value, task id on air or None)``, read on the controller thread at each tick.
OnAir = Callable[[], tuple[str, str | None]]
#: ``(format, width, height)``: what is encoded once for every client that asks for it.
EncodingKey = tuple[VideoFormat, int, int]


@dataclass(frozen=True, kw_only=True)
class FramesHealth:
    """Frames egress counters of one channel (``frames`` in ``/health``; ``latentsync_frames_*``).

    Attributes:
        clients: Clients connected now.
        clients_total: Clients ever subscribed.
        encoders: ``(format, size)`` encodings running now (one per distinct request, whatever the
            number of clients sharing it).
        frames_encoded: Video payloads encoded (once per encoding per tick).
        ticks_sent: Tick messages handed to clients' WebSockets (all clients together).
        client_dropped_ticks: Ticks lost by slow clients (their queue overflowed or an H.264 client
            waited for a keyframe after a loss).
        inbox_dropped_ticks: Ticks the encoder thread could not take in time (lost for every client).
    """

    clients: int
    clients_total: int
    encoders: int
    frames_encoded: int
    ticks_sent: int
    client_dropped_ticks: int
    inbox_dropped_ticks: int


@dataclass(frozen=True, kw_only=True)
class EncodedTick:
    """One tick, encoded for one :class:`Subscription` key (shared, read-only, by its clients).

    Attributes:
        index: The tick number (the tap's emitted-frame index).
        state: What was on air.
        task_id: The task on air as 16 bytes, zeros when none.
        video: The encoded frame.
        keyframe: The frame decodes on its own.
        audio: The tick's ``(N,)`` samples as ``N * 2`` bytes of s16le mono.
    """

    index: int
    state: TickState
    task_id: bytes
    video: bytes
    keyframe: bool
    audio: bytes


class FramesClient:
    """One client's bounded queue of encoded ticks (filled by the encoder thread, sent by its handler).

    Args:
        subscription: What the client asked for.
        max_ticks: Ticks it may have waiting (``frames.client_queue_s`` × fps).
        fps: Stream frames per second (for the header's PTS).
        sample_rate_hz: The audio's sample rate.
    """

    def __init__(self, subscription: Subscription, max_ticks: int, fps: int, sample_rate_hz: int):
        self.subscription = subscription
        self._max = max_ticks
        self._fps = fps
        self._rate = sample_rate_hz
        self._cond = threading.Condition()
        self._queue: collections.deque[EncodedTick] = collections.deque()
        self._need_keyframe = subscription.format is VideoFormat.h264
        self._started = False  # a tick was queued: losses count from here on
        self._closed = False
        self._last_sent: int | None = None
        self.sent = 0
        self.dropped = 0

    @property
    def closed(self) -> bool:
        """True once the hub closed (the server or the channel's stream stops) or the client left."""
        return self._closed

    def close(self) -> None:
        """Wake the handler; nothing more is queued."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    # encoder thread
    def offer(self, tick: EncodedTick) -> bool:
        """Queue one tick (never blocks); returns True when this client needs a keyframe."""
        with self._cond:
            if self._closed:
                return False
            if len(self._queue) >= self._max:  # a slow client: it loses its whole backlog
                self.dropped += len(self._queue)
                self._queue.clear()
                self._need_keyframe = self.subscription.format is VideoFormat.h264
            if self._need_keyframe and not tick.keyframe:
                self.dropped += int(self._started)  # ticks before its first keyframe were never its
                return True
            self._need_keyframe = False
            self._started = True
            self._queue.append(tick)
            self._cond.notify_all()
            return False

    # handler thread
    def next_message(self, timeout_s: float) -> bytes | None:
        """The next tick message (header + video + audio), or None after ``timeout_s`` or once closed."""
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait(timeout_s)
            if not self._queue:
                return None
            tick = self._queue.popleft()
            dropped = 0 if self._last_sent is None else tick.index - self._last_sent - 1
            self._last_sent = tick.index
            self.sent += 1
        sub = self.subscription
        audio = tick.audio if sub.audio is AudioFormat.pcm_s16le else b""
        header = FrameHeader(
            tick=tick.index,
            pts_us=tick.index * 1_000_000 // self._fps,
            state=tick.state,
            format=sub.format,
            flags=FLAG_KEYFRAME if tick.keyframe else 0,
            audio_format=sub.audio,
            width=sub.width,
            height=sub.height,
            task_id=tick.task_id,
            dropped_ticks=dropped,
            video_bytes=len(tick.video),
            audio_bytes=len(audio),
            sample_rate_hz=self._rate,
        )
        return b"".join((header.pack(), tick.video, audio))


class FramesHub:
    """Owns one channel's frames encoder thread and its clients.

    Args:
        settings: ``frames`` section of the config.
        fps: Stream frames per second.
        sample_rate_hz: Stream audio sample rate (mono int16 from the tap).
        frame_size: Stream ``(width, height)`` in pixels: the largest size a client may ask for.
        on_air: Returns what is on air (read on the controller thread at each tick).
    """

    def __init__(
        self, settings: FramesConfig, *, fps: int, sample_rate_hz: int, frame_size: tuple[int, int], on_air: OnAir
    ):
        self.settings = settings
        self.fps = int(fps)
        self.sample_rate_hz = int(sample_rate_hz)
        self.width, self.height = frame_size
        self._on_air = on_air
        self._max_ticks = max(2, int(round(settings.client_queue_s * fps)))
        self._lock = threading.Lock()
        self._clients: list[FramesClient] = []
        self._clients_total = 0
        self._departed_sent = 0
        self._departed_dropped = 0
        self._inbox: queue.Queue = queue.Queue(maxsize=INBOX_TICKS)
        self._inbox_dropped = 0
        self._frames_encoded = 0
        self._want_keyframe: set[EncodingKey] = set()
        self._last_forced: dict[EncodingKey, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the encoder thread (safe to call twice)."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._encode_loop, name="frames-encoder", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 3.0) -> None:
        """Close every client (their handlers close the WebSocket with 1001) and stop the thread."""
        with self._lock:
            self._closed = True
            clients = list(self._clients)
        for client in clients:
            client.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def subscribe(self, subscription: Subscription) -> FramesClient:
        """A new client for ``subscription`` (sizes already checked by ``parse_hello``).

        An H.264 client gets a keyframe on the next tick. The caller bounds the number of clients
        (``frames.max_clients``).
        """
        client = FramesClient(subscription, self._max_ticks, self.fps, self.sample_rate_hz)
        with self._lock:
            if self._closed:
                client.close()
                return client
            self._clients.append(client)
            self._clients_total += 1
            if subscription.format is VideoFormat.h264:
                self._want_keyframe.add(subscription.key)
        logger.info(
            "frames: client joined (%s %dx%d, %d connected)",
            subscription.format.name,
            subscription.width,
            subscription.height,
            len(self._clients),
        )
        return client

    def unsubscribe(self, client: FramesClient) -> None:
        """Remove a client (its counters stay in the totals). Safe to call twice."""
        client.close()
        with self._lock:
            if client not in self._clients:
                return
            self._clients.remove(client)
            self._departed_sent += client.sent
            self._departed_dropped += client.dropped
            left = len(self._clients)
            key = client.subscription.key
            if all(c.subscription.key != key for c in self._clients):
                # nobody watches that encoding any more: nothing of it is kept (a client asking for one
                # size after another leaves no keyframe request or timestamp behind; the encoder thread
                # drops its H.264 encoder at its next tick)
                self._want_keyframe.discard(key)
                self._last_forced.pop(key, None)
        logger.info("frames: client left after %d ticks, %d lost (%d connected)", client.sent, client.dropped, left)

    def request_keyframe(self, key: EncodingKey) -> None:
        """Make the next H.264 frame of ``key`` a keyframe (at most one forced per 0.2 s)."""
        with self._lock:
            self._want_keyframe.add(key)

    def stats(self) -> FramesHealth:
        """A snapshot of the counters."""
        with self._lock:
            clients = list(self._clients)
            sent, dropped = self._departed_sent, self._departed_dropped
        return FramesHealth(
            clients=len(clients),
            clients_total=self._clients_total,
            encoders=len({c.subscription.key for c in clients}),
            frames_encoded=self._frames_encoded,
            ticks_sent=sent + sum(c.sent for c in clients),
            client_dropped_ticks=dropped + sum(c.dropped for c in clients),
            inbox_dropped_ticks=self._inbox_dropped,
        )

    # ----------------------------------------------------------------- the tap (controller thread)
    def on_tick(self, index: int, video: np.ndarray, audio: np.ndarray) -> None:
        """Take one emitted tick: ``(H, W, 3) uint8`` RGB frame and ``(N,) int16`` mono audio. Never blocks.

        Args:
            index: The tick's index (0, 1, ...), as counted by the tap (every tick of the programme).
            video: The frame on air.
            audio: The audio samples on air with it.
        """
        if not self._clients or self._closed:
            return
        state, task_id = self._on_air()
        try:
            self._inbox.put_nowait((index, video, audio, state, task_id))
        except queue.Full:  # the encoder thread is behind: every client loses this tick (a hole, reported)
            self._inbox_dropped += 1

    # ----------------------------------------------------------------- encoder thread
    def _encode_loop(self) -> None:
        h264: dict[EncodingKey, av.video.codeccontext.VideoCodecContext] = {}
        _warm_up()
        while not self._stop.is_set():
            try:
                index, video, audio, state, task_id = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                clients = list(self._clients)
            keys = {c.subscription.key for c in clients}
            for key in [k for k in h264 if k not in keys]:  # nobody left at that size: the next one starts fresh
                del h264[key]
            resized: dict[tuple[int, int], np.ndarray] = {}
            encoded: dict[EncodingKey, tuple[bytes, bool]] = {}
            for key in keys:
                fmt, width, height = key
                if (width, height) not in resized:
                    resized[(width, height)] = self._resize(video, width, height)
                try:
                    got = self._encode(key, resized[(width, height)], index, h264)
                except Exception:
                    logger.exception("frames: %s %dx%d encoding failed; restarting it", fmt.name, width, height)
                    h264.pop(key, None)
                    continue
                if got is not None:
                    encoded[key] = got
                    self._frames_encoded += 1
            if not encoded:
                continue
            code = STATE_CODES.get(state, TickState.idle)
            task = bytes.fromhex(task_id) if task_id and len(task_id) == 32 else NO_TASK
            pcm = np.ascontiguousarray(audio, dtype="<i2").tobytes()
            wanted: set[EncodingKey] = set()
            ticks = {
                key: EncodedTick(index=index, state=code, task_id=task, video=data, keyframe=flag, audio=pcm)
                for key, (data, flag) in encoded.items()
            }
            for client in clients:
                tick = ticks.get(client.subscription.key)
                if tick is not None and client.offer(tick):
                    wanted.add(client.subscription.key)
            if wanted:
                with self._lock:
                    self._want_keyframe |= wanted

    def _resize(self, video: np.ndarray, width: int, height: int) -> np.ndarray:
        if (width, height) == (video.shape[1], video.shape[0]):
            return np.ascontiguousarray(video)
        return cv2.resize(video, (width, height), interpolation=cv2.INTER_AREA)

    def _encode(self, key: EncodingKey, frame: np.ndarray, index: int, h264: dict) -> tuple[bytes, bool] | None:
        """``(payload, keyframe)`` of one frame for ``key``; None when the encoder gave nothing yet."""
        fmt, width, height = key
        if fmt is VideoFormat.rgb24:
            return frame.tobytes(), True
        if fmt is VideoFormat.jpeg:
            ok, data = cv2.imencode(
                ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.settings.jpeg_quality]
            )
            if not ok:
                raise RuntimeError("cv2.imencode failed")
            return data.tobytes(), True
        encoder = h264.get(key)
        if encoder is None:
            s = self.settings
            encoder = h264[key] = h264_encoder(width, height, self.fps, s.h264_bitrate_kbps, s.keyframe_interval_s)
        picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
        picture.pts = index
        picture.time_base = fractions.Fraction(1, self.fps)
        now = time.monotonic()
        with self._lock:
            force = key in self._want_keyframe and now - self._last_forced.get(key, 0.0) >= MIN_FORCED_KEYFRAME_GAP_S
            if force:
                self._want_keyframe.discard(key)
                self._last_forced[key] = now
        if force:
            picture.pict_type = av.video.frame.PictureType.I
        packets = encoder.encode(picture)
        if not packets:
            return None
        return b"".join(bytes(p) for p in packets), any(p.is_keyframe for p in packets)


def _warm_up() -> None:
    """Run OpenCV's resize, colour conversion and JPEG encoder once on a tiny frame.

    OpenCV's first call of these takes 150 ms on an idle 2-core machine and over 600 ms on a busy
    one (its thread pool and codec tables start): without this the first client of a server lost
    its first 16 ticks to the full inbox (seen with ``make run``).
    """
    frame = np.zeros((32, 32, 3), np.uint8)
    cv2.imencode(".jpg", cv2.cvtColor(cv2.resize(frame, (16, 16), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR))
