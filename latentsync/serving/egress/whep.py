"""WHEP egress: the live program to WebRTC viewers, encoded once, fanned out through bounded queues.

Data path (docs/webrtc.md)::

    controller thread --TappedSink--> WebRtcHub.on_tick (put_nowait, drops when full)
        --> encoder thread: one video encode per tick (PyAV libx264 / libvpx), audio cut into
            20 ms frames --> every viewer's bounded deques --> its aiortc tracks (asyncio loop
            thread) --> RTP packetisation per viewer (aiortc packs pre-encoded ``av.Packet``s).

Nothing on this path ever blocks the controller: the clock thread only does a ``put_nowait``.
A viewer whose queue is full loses its backlog and resumes at the next keyframe; the others and the
RTMP push never notice.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.exceptions import OperationError
from aiortc.mediastreams import MediaStreamError

from latentsync.config import VideoCodec, WebRtcConfig
from latentsync.serving.core.errors import ServingError
from latentsync.serving.egress.candidates import (
    FilteredOffer,
    Network,
    allowed_networks,
    filter_offer,
    guard_remote_candidates,
)
from latentsync.serving.egress.encoders import ENCODER_THREADS, h264_encoder

logger = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90000  # RTP video clock (RFC 6184 / RFC 7741)
AUDIO_FRAME_S = 0.020  # 20 ms Opus packets (40 ms ones sent as one RTP timestamp: Chromium conceals half)
OPUS_RATE_HZ = 48000  # Opus RTP clock (RFC 7587)
OPUS_FRAME_SAMPLES = 960  # 20 ms at 48 kHz
OPUS_BITRATE_BPS = 96000  # aiortc's own Opus setting (stereo voip)
QUIET_LOGGERS = ("aioice", "aiortc")
INBOX_TICKS = 4  # ticks waiting for the encoder thread; more are dropped (and a keyframe is forced)
MIN_FORCED_KEYFRAME_GAP_S = 0.2  # PLIs/joins closer than this share one forced keyframe
LOOP_START_TIMEOUT_S = 5.0
MIME = {VideoCodec.h264: "video/H264", VideoCodec.vp8: "video/VP8"}


class WhepError(ServingError):
    """A WHEP request that cannot be served; ``code`` names why (the API maps it to an HTTP status)."""


@dataclass(frozen=True, kw_only=True)
class WebRtcHealth:
    """WebRTC (WHEP) egress counters (:meth:`latentsync.serving.webrtc.WebRtcHub.stats`).

    Attributes:
        viewers: Sessions open now (connecting or connected).
        viewers_total: Sessions ever answered.
        frames_encoded: Video frames encoded (once each, whatever the number of viewers).
        keyframes: Keyframes among them.
        inbox_dropped_ticks: Ticks the encoder thread could not take in time (skipped for viewers only).
        viewer_dropped_packets: Video packets dropped from slow viewers' queues (all viewers together).
        dropped_candidates: Remote ICE candidates ignored: outside ``webrtc.allowed_candidate_networks``
            (an mDNS one once resolved, and each check from an outside address) or malformed
            (docs/webrtc.md).
        codec: The video codec.
        width: Preview width in pixels.
        height: Preview height in pixels.
    """

    viewers: int
    viewers_total: int
    frames_encoded: int
    keyframes: int
    inbox_dropped_ticks: int
    viewer_dropped_packets: int
    dropped_candidates: int
    codec: str
    width: int
    height: int


def preview_size(width: int, height: int, max_height: int) -> tuple[int, int]:
    """The preview's ``(width, height)``: at most ``max_height`` rows, aspect kept, both even."""
    if height <= max_height:
        return width - width % 2, height - height % 2
    scale = max_height / height
    w = max(2, int(round(width * scale / 2)) * 2)
    return w, max_height - max_height % 2


def allow_loopback_candidates() -> None:
    """Make aioice gather 127.0.0.1 as well (it skips loopback addresses by default).

    aioice has no option for this; its module function ``aioice.ice.get_host_addresses`` is wrapped
    once per process (idempotent). Needed for a browser on the same host when the machine has no
    other interface, and for loopback tests.
    """
    import aioice.ice as ice

    original = ice.get_host_addresses
    if getattr(original, "latentsync_loopback", False):
        return

    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = original(use_ipv4, use_ipv6)
        if use_ipv4 and "127.0.0.1" not in addresses:
            addresses.append("127.0.0.1")
        return addresses

    with_loopback.latentsync_loopback = True  # type: ignore[attr-defined]
    ice.get_host_addresses = with_loopback


class _Viewer:
    """One WHEP session's bounded queues (filled by the encoder thread, drained by its tracks)."""

    def __init__(self, hub: WebRtcHub, session_id: str, max_video: int, max_audio: int):
        self.hub = hub
        self.session_id = session_id
        self.created_monotonic = time.monotonic()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._lock = threading.Lock()
        self._max_video = max_video
        self._max_audio = max_audio
        self.video: collections.deque[av.Packet] = collections.deque()
        self.audio: collections.deque[av.Packet] = collections.deque()
        self.need_keyframe = True
        self.started = False  # set by the first recv(): nothing is queued for a viewer not connected yet
        self.dropped_packets = 0
        self.closed = False
        self.video_event = asyncio.Event()
        self.audio_event = asyncio.Event()
        self._wake_pending = False

    # encoder thread
    def push(self, packets: list[av.Packet], audio_packets: list[av.Packet], loop: asyncio.AbstractEventLoop) -> bool:
        """Queue one tick's video and Opus packets; returns True when a keyframe is wanted."""
        want_key = False
        with self._lock:
            if self.closed or not self.started:
                return False
            for packet in packets:
                if self.need_keyframe and not packet.is_keyframe:
                    want_key = True
                    continue
                if len(self.video) >= self._max_video:  # slow viewer: lose the backlog, resume at a keyframe
                    self.dropped_packets += len(self.video) + 1
                    self.video.clear()
                    self.need_keyframe = True
                    want_key = True
                    continue
                self.need_keyframe = False
                self.video.append(packet)
            for packet in audio_packets:
                if len(self.audio) >= self._max_audio:
                    self.audio.popleft()
                self.audio.append(packet)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            loop.call_soon_threadsafe(self._wake)
        return want_key

    # loop thread
    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self.video_event.set()
        self.audio_event.set()

    async def next_item(self, kind: str, timeout_s: float):
        """The next packet (video) or frame (audio); raises MediaStreamError once closed."""
        items, event = (self.video, self.video_event) if kind == "video" else (self.audio, self.audio_event)
        if not self.started:
            with self._lock:
                self.started = True
            self.hub.request_keyframe()
        while True:
            event.clear()
            with self._lock:
                if self.closed:
                    raise MediaStreamError
                if items:
                    return items.popleft()
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                continue

    def close_queues(self) -> None:
        with self._lock:
            self.closed = True
            self.video.clear()
            self.audio.clear()


class _QueueTrack(MediaStreamTrack):
    """An aiortc track that yields one viewer's queued, already encoded ``av.Packet``s (video, or 20 ms Opus)."""

    def __init__(self, viewer: _Viewer, kind: str):
        super().__init__()
        self.kind = kind
        self._viewer = viewer

    async def recv(self):
        """The next queued item (waits for the encoder thread; raises MediaStreamError once closed)."""
        return await self._viewer.next_item(self.kind, 1.0)


class WebRtcHub:
    """Owns the asyncio loop thread, the shared encoder thread and every WHEP session.

    Args:
        settings: ``webrtc`` section of the config.
        fps: Stream frames per second.
        sample_rate_hz: Stream audio sample rate (mono int16 from the tap).
        frame_size: Stream ``(width, height)`` in pixels.
    """

    def __init__(self, settings: WebRtcConfig, fps: int, sample_rate_hz: int, frame_size: tuple[int, int]):
        self.settings = settings
        self.fps = int(fps)
        self.sample_rate_hz = int(sample_rate_hz)
        self.width, self.height = preview_size(frame_size[0], frame_size[1], settings.max_height)
        self._max_video = max(2, int(round(settings.viewer_queue_s * fps)))
        self._max_audio = max(4, int(round(settings.viewer_queue_s / AUDIO_FRAME_S)))
        self._lock = threading.Lock()
        self._viewers: dict[str, _Viewer] = {}
        self._viewers_total = 0
        self._inbox: queue.Queue = queue.Queue(maxsize=INBOX_TICKS)
        self._inbox_dropped = 0
        self._dropped_candidates = 0  # remote ICE candidates ignored (offers: Flask threads; the guard: the loop)
        self._force_keyframe = threading.Event()
        self._last_forced_key = 0.0
        self._frames_encoded = 0
        self._keyframes = 0
        self._audio_in_pts = 0  # samples at the stream rate handed to the Opus resampler
        self._audio_out_pts = 0  # samples at 48 kHz in the Opus packets produced
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._encoder_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = False
        self._closed = False
        self._answering = 0  # answers in progress (changed on the loop only)
        self._on_viewers: list = []

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the event-loop thread and the encoder thread. Safe to call twice.

        Raises:
            RuntimeError: If the event loop does not come up within 5 s.
        """
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        if self.settings.loopback_candidates:
            allow_loopback_candidates()
        for name in QUIET_LOGGERS:  # aioice logs every ICE candidate pair check at INFO
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        ready = threading.Event()

        def run_loop() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop_thread = threading.Thread(target=run_loop, name="webrtc-loop", daemon=True)
        self._loop_thread.start()
        if not ready.wait(LOOP_START_TIMEOUT_S):
            raise RuntimeError("webrtc event loop did not start")
        self._encoder_thread = threading.Thread(target=self._encode_loop, name="webrtc-encoder", daemon=True)
        self._encoder_thread.start()
        logger.info(
            "webrtc: WHEP on, %s %dx%d, up to %d viewers",
            self.settings.video_codec.value,
            self.width,
            self.height,
            self.settings.max_viewers,
        )

    def close(self, timeout_s: float = 3.0) -> None:
        """Close every session, stop both threads. Safe to call twice or before start."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            viewers = list(self._viewers.values())
            self._viewers.clear()
        self._stop.set()
        loop = self._loop
        if loop is not None and loop.is_running():
            for viewer in viewers:
                viewer.close_queues()
            try:
                asyncio.run_coroutine_threadsafe(self._close_all(viewers), loop).result(timeout_s)
            except Exception:
                logger.warning("webrtc: closing peer connections timed out")
            loop.call_soon_threadsafe(loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout_s)
        if self._encoder_thread is not None:
            self._encoder_thread.join(timeout_s)

    async def _close_all(self, viewers: list[_Viewer]) -> None:
        await asyncio.gather(*(v.pc.close() for v in viewers), return_exceptions=True)

    def add_viewer_listener(self, callback) -> None:
        """Call ``callback(viewers: int)`` (from any thread, must not block) when the count changes."""
        self._on_viewers.append(callback)

    def stats(self) -> WebRtcHealth:
        """A snapshot of the counters."""
        with self._lock:
            viewers = list(self._viewers.values())
        return WebRtcHealth(
            viewers=len(viewers),
            viewers_total=self._viewers_total,
            frames_encoded=self._frames_encoded,
            keyframes=self._keyframes,
            inbox_dropped_ticks=self._inbox_dropped,
            viewer_dropped_packets=sum(v.dropped_packets for v in viewers),
            dropped_candidates=self._dropped_candidates,
            codec=self.settings.video_codec.value,
            width=self.width,
            height=self.height,
        )

    # ----------------------------------------------------------------- the tap (controller thread)
    def on_tick(self, index: int, video: np.ndarray, audio: np.ndarray) -> None:
        """Take one emitted tick: ``(H, W, 3) uint8`` frame and ``(N,) int16`` mono audio. Never blocks.

        Args:
            index: The tick's index (0, 1, ...), as counted by the tap (every tick of the programme).
            video: The frame on air.
            audio: The audio samples on air with it.
        """
        if not self._viewers or self._closed:
            return
        try:
            self._inbox.put_nowait((index, video, audio))
        except queue.Full:  # the encoder is behind: viewers skip this tick (their decoders cope, no keyframe)
            self._inbox_dropped += 1

    def request_keyframe(self) -> None:
        """Make the next encoded frame a keyframe (a joining viewer, a PLI, a viewer that dropped)."""
        self._force_keyframe.set()

    # ----------------------------------------------------------------- encoder thread
    def _new_encoder(self) -> av.video.codeccontext.VideoCodecContext:
        s = self.settings
        if s.video_codec is VideoCodec.h264:
            return h264_encoder(self.width, self.height, self.fps, s.video_bitrate_kbps, s.keyframe_interval_s)
        codec = av.CodecContext.create("libvpx", "w")
        codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        codec.width, codec.height = self.width, self.height
        codec.thread_count = ENCODER_THREADS
        codec.pix_fmt = "yuv420p"
        codec.bit_rate = s.video_bitrate_kbps * 1000
        codec.framerate = fractions.Fraction(self.fps, 1)
        codec.time_base = fractions.Fraction(1, self.fps)
        codec.gop_size = max(1, int(round(s.keyframe_interval_s * self.fps)))
        return codec

    def _encode_loop(self) -> None:
        encoder = audio_encoder = None
        while not self._stop.is_set():
            try:
                index, video, audio = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if not self._viewers:
                encoder = audio_encoder = None  # the next viewer starts fresh encoders (and a keyframe)
                continue
            try:
                if encoder is None:
                    encoder, audio_encoder = self._new_encoder(), self._new_audio_encoder()
                packets = self._encode_video(encoder, index, video)
                frames = self._encode_audio(audio_encoder, audio)
            except Exception:
                logger.exception("webrtc: encoding failed; restarting the encoders")
                encoder = audio_encoder = None
                continue
            with self._lock:
                viewers = list(self._viewers.values())
            want_key = False
            loop = self._loop
            if loop is None:
                continue
            for viewer in viewers:
                want_key |= viewer.push(packets, frames, loop)
            if want_key:
                self._force_keyframe.set()

    def _encode_video(self, encoder, index: int, video: np.ndarray) -> list[av.Packet]:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(video), format="rgb24")
        frame = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        frame.pts = index
        frame.time_base = fractions.Fraction(1, self.fps)
        now = time.monotonic()
        if self._force_keyframe.is_set() and now - self._last_forced_key >= MIN_FORCED_KEYFRAME_GAP_S:
            self._force_keyframe.clear()
            self._last_forced_key = now
            frame.pict_type = av.video.frame.PictureType.I
        packets = list(encoder.encode(frame))
        rtp_pts = index * VIDEO_CLOCK_HZ // self.fps
        for packet in packets:
            packet.pts = rtp_pts
            packet.dts = rtp_pts
            packet.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
            self._keyframes += int(packet.is_keyframe)
        self._frames_encoded += 1
        return packets

    def _new_audio_encoder(self) -> tuple[av.AudioResampler, av.audio.codeccontext.AudioCodecContext]:
        """Opus once for every viewer: stereo s16 at 48 kHz in 20 ms frames, as aiortc's OpusEncoder does."""
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=OPUS_RATE_HZ, frame_size=OPUS_FRAME_SAMPLES)
        codec = av.CodecContext.create("libopus", "w")
        codec.bit_rate = OPUS_BITRATE_BPS
        codec.format = "s16"
        codec.layout = "stereo"
        codec.sample_rate = OPUS_RATE_HZ
        codec.time_base = fractions.Fraction(1, OPUS_RATE_HZ)
        codec.options = {"application": "voip"}
        self._audio_in_pts = self._audio_out_pts = 0
        return resampler, codec

    def _encode_audio(self, encoder, audio: np.ndarray) -> list[av.Packet]:
        """One tick's ``(N,) int16`` mono samples → 20 ms Opus packets (PTS in 48 kHz samples)."""
        resampler, codec = encoder
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(audio, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.sample_rate_hz
        frame.pts = self._audio_in_pts
        frame.time_base = fractions.Fraction(1, self.sample_rate_hz)
        self._audio_in_pts += len(audio)
        packets = []
        for chunk in resampler.resample(frame):
            packets += codec.encode(chunk)
        for packet in packets:  # one packet per 20 ms frame; libopus' own PTS start negative (pre-skip)
            packet.pts = packet.dts = self._audio_out_pts
            packet.time_base = fractions.Fraction(1, OPUS_RATE_HZ)
            self._audio_out_pts += OPUS_FRAME_SAMPLES
        return packets

    # ----------------------------------------------------------------- signalling (Flask threads)
    def _call(self, coro, timeout_s: float):
        loop = self._loop
        if loop is None or self._closed:
            coro.close()
            raise WhepError("webrtc_stopped", "the WebRTC egress is not running")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()  # an answer that overran is abandoned (its peer connection is closed)
            raise

    def answer(self, offer_sdp: str) -> tuple[str, str]:
        """Answer a WHEP offer: a new session with the program's video and audio.

        The offer's ICE candidates outside ``webrtc.allowed_candidate_networks`` (and malformed ones)
        are removed first (:func:`~latentsync.serving.egress.candidates.filter_offer`): the server
        sends connectivity checks only inside those networks. Our own candidates are not affected.

        Args:
            offer_sdp: The viewer's SDP offer with all its candidates (we do not take trickled ones).

        Returns:
            ``(session_id, answer_sdp)``; the answer carries all our ICE candidates.

        Raises:
            WhepError: 400 for an SDP aiortc cannot parse, an offer with no ICE candidate left
                (``no_allowed_candidate``), with neither audio nor video or without the configured
                video codec; 429 past ``webrtc.max_viewers``; 503 when stopped or when signalling
                overran ``webrtc.signalling_timeout_s``.
        """
        networks = allowed_networks(self.settings.allowed_candidate_networks)
        offer = filter_offer(offer_sdp, networks)
        if offer.dropped:
            self._count_dropped_candidates(offer.dropped)
        try:  # the viewer limit is decided on the loop (_answer)
            return self._call(self._answer(offer, networks), self.settings.signalling_timeout_s)
        except TimeoutError:
            raise WhepError("signalling_timeout", "no SDP answer within webrtc.signalling_timeout_s") from None

    def _count_dropped_candidates(self, n: int = 1) -> None:
        with self._lock:
            self._dropped_candidates += n

    async def _answer(self, offer: FilteredOffer, networks: tuple[Network, ...]) -> tuple[str, str]:
        # The viewer limit is decided here, on the loop: sessions plus answers in progress (the count
        # only the loop changes), so simultaneous offers can never admit more than max_viewers. No
        # threading lock is ever held across an await (the loop would stop for every thread waiting).
        with self._lock:
            taken = len(self._viewers) + self._answering
        if taken >= self.settings.max_viewers or self._closed:
            raise WhepError(
                "too_many_viewers", f"{self.settings.max_viewers} viewers already watch (webrtc.max_viewers)"
            )
        self._answering += 1
        try:
            return await self._answer_reserved(offer, networks)
        finally:
            self._answering -= 1

    async def _answer_reserved(self, offer: FilteredOffer, networks: tuple[Network, ...]) -> tuple[str, str]:
        session_id = uuid.uuid4().hex
        viewer = _Viewer(self, session_id, self._max_video, self._max_audio)
        pc = viewer.pc
        try:
            # Transceivers made before the offer is applied take its m-lines, with our codec preference
            # (aiortc negotiates codecs in setRemoteDescription).
            for kind in ("video", "audio"):
                transceiver = pc.addTransceiver(_QueueTrack(viewer, kind), direction="sendonly")
                if kind == "video":
                    mime = MIME[self.settings.video_codec]
                    codecs = [
                        c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType in (mime, "video/rtx")
                    ]
                    transceiver.setCodecPreferences(codecs)
                    sender = transceiver.sender
                    original = sender._send_keyframe  # a PLI/FIR from the viewer: aiortc only flags its own encoder

                    def on_pli(original=original) -> None:
                        original()
                        self.request_keyframe()

                    sender._send_keyframe = on_pli  # type: ignore[method-assign]  # aiortc has no hook for this
            # The offer's candidates were filtered; an mDNS one is checked once aioice resolves it, and
            # a check from an unknown address before ICE learns it (peer-reflexive).
            # These transports carry every audio/video section (bundled or not).
            for transceiver in pc.getTransceivers():
                ice = transceiver.receiver.transport.transport
                guard_remote_candidates(ice._connection, networks, self._count_dropped_candidates)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
            except OperationError as exc:
                raise WhepError(
                    "unsupported_offer",
                    f"cannot play this offer ({exc}); the video codec is {self.settings.video_codec.value}, audio Opus",
                ) from None
            except Exception as exc:
                raise WhepError("bad_sdp", f"the SDP offer cannot be parsed: {exc}") from None
            kinds = {t.kind for t in pc.getTransceivers() if t.mid is not None}
            if not kinds & {"audio", "video"}:
                raise WhepError("no_media", "the offer has no audio or video section")
            if offer.kept == 0:  # before our candidates are gathered; the pc is closed below, having checked nothing
                raise WhepError(
                    "no_allowed_candidate",
                    f"no usable ICE candidate in the offer ({offer.outside} outside "
                    f"webrtc.allowed_candidate_networks, {offer.malformed} malformed): the server sends "
                    "connectivity checks only to those networks (and takes no trickled candidates)",
                )
            try:
                await pc.setLocalDescription(await pc.createAnswer())
            except Exception as exc:
                raise WhepError(
                    "unsupported_offer",
                    f"cannot answer this offer ({exc}); the video codec is {self.settings.video_codec.value}",
                ) from None
            if "video" in kinds and MIME[self.settings.video_codec].split("/")[1] not in pc.localDescription.sdp:
                raise WhepError(
                    "unsupported_codec", f"the offer lacks {self.settings.video_codec.value} (webrtc.video_codec)"
                )
        except BaseException:
            viewer.close_queues()
            await pc.close()
            raise

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._drop(session_id)

        with self._lock:
            admitted = not self._closed  # the slot was reserved on the loop (_answer)
            if admitted:
                self._viewers[session_id] = viewer
                self._viewers_total += 1
            count = len(self._viewers)
        if not admitted:
            viewer.close_queues()
            await pc.close()
            raise WhepError("webrtc_stopped", "the WebRTC egress is stopping")
        self.request_keyframe()
        self._notify(count)
        asyncio.get_running_loop().call_later(self.settings.connect_timeout_s, self._check_connected, session_id)
        logger.info("webrtc: viewer %s joined (%d watching)", session_id[:8], count)
        return session_id, pc.localDescription.sdp

    def _check_connected(self, session_id: str) -> None:
        viewer = self._viewers.get(session_id)
        if viewer is not None and viewer.pc.connectionState != "connected":
            logger.info("webrtc: viewer %s never connected; closed", session_id[:8])
            asyncio.ensure_future(self._drop(session_id))

    async def _drop(self, session_id: str) -> bool:
        with self._lock:
            viewer = self._viewers.pop(session_id, None)
            count = len(self._viewers)
        if viewer is None:
            return False
        viewer.close_queues()
        await viewer.pc.close()
        self._notify(count)
        logger.info("webrtc: viewer %s left (%d watching)", session_id[:8], count)
        return True

    def _notify(self, count: int) -> None:
        for callback in self._on_viewers:
            try:
                callback(count)
            except Exception:
                logger.exception("viewer listener failed")

    def end(self, session_id: str) -> bool:
        """End a session (``DELETE /whep/<id>``); False when there is no such session."""
        if session_id not in self._viewers:
            return False
        try:
            return self._call(self._drop(session_id), self.settings.signalling_timeout_s)
        except TimeoutError:
            raise WhepError("signalling_timeout", "closing the session timed out") from None
