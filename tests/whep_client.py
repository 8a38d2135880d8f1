"""A pure-Python WHEP viewer (aiortc) for tests and benchmarks: POST an offer, receive frames."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from latentsync.serving.egress.whep import allow_loopback_candidates


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """``(status, headers, body bytes)`` of one request (urllib; HTTP errors returned, not raised)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@dataclass
class Received:
    """What one viewer got."""

    video_pts: list[int] = field(default_factory=list)  # RTP time base 1/90000
    frames: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8 RGB, the first keep_frames
    audio_samples: int = 0
    audio_rate_hz: int = 0
    audio: list[np.ndarray] = field(default_factory=list)


class WhepViewer:
    """One WHEP session driven from an asyncio loop.

    Args:
        base_url: ``http://host:port`` of the server.
        audio: Ask for audio.
        video: Ask for video.
        headers: Extra request headers (the bearer token).
    """

    def __init__(self, base_url: str, audio: bool = True, video: bool = True, headers: dict | None = None):
        allow_loopback_candidates()
        self.base_url = base_url
        self.headers = headers or {}
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.want = [k for k, on in (("video", video), ("audio", audio)) if on]
        self.location: str | None = None
        self.received = Received()
        self._tasks: list[asyncio.Task] = []

    async def connect(self) -> tuple[int, dict, bytes]:
        """Send the offer; returns the POST's ``(status, headers, body)`` (the answer applied on 201)."""
        tracks: dict[str, asyncio.Future] = {}
        for kind in self.want:
            self.pc.addTransceiver(kind, direction="recvonly")
            tracks[kind] = asyncio.get_running_loop().create_future()

        @self.pc.on("track")
        def on_track(track):
            if not tracks[track.kind].done():
                tracks[track.kind].set_result(track)

        await self.pc.setLocalDescription(await self.pc.createOffer())
        status, headers, body = await asyncio.to_thread(
            http,
            "POST",
            self.base_url + "/whep",
            self.pc.localDescription.sdp.encode(),
            {"Content-Type": "application/sdp", **self.headers},
        )
        if status != 201:
            return status, headers, body
        self.location = headers.get("Location")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))
        self._tracks = tracks
        return status, headers, body

    async def receive(self, video_frames: int, keep_frames: int = 0, timeout_s: float = 30.0) -> Received:
        """Receive until ``video_frames`` video frames arrived (audio alongside)."""

        async def video_loop(track):
            while len(self.received.video_pts) < video_frames:
                frame = await track.recv()
                self.received.video_pts.append(frame.pts)
                if len(self.received.frames) < keep_frames:
                    self.received.frames.append(frame.to_ndarray(format="rgb24"))

        async def audio_loop(track):
            try:
                while True:
                    frame = await track.recv()
                    self.received.audio_rate_hz = frame.sample_rate
                    self.received.audio_samples += frame.samples
                    self.received.audio.append(frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0])
            except MediaStreamError:
                return

        audio_task = None
        if "audio" in self._tracks:
            audio_task = asyncio.ensure_future(audio_loop(await self._tracks["audio"]))
        if "video" in self._tracks:
            await asyncio.wait_for(video_loop(await asyncio.wait_for(self._tracks["video"], timeout_s)), timeout_s)
        if audio_task is not None:
            audio_task.cancel()
        return self.received

    async def watch(self, stop: threading.Event, arrivals: list[float], timeout_s: float = 30.0) -> None:
        """Receive video until ``stop`` is set, appending each frame's ``time.monotonic()`` to ``arrivals``."""
        track = await asyncio.wait_for(self._tracks["video"], timeout_s)
        while not stop.is_set():
            try:
                await asyncio.wait_for(track.recv(), 1.0)
            except TimeoutError:
                continue
            arrivals.append(time.monotonic())

    async def close(self, delete: bool = True) -> int | None:
        """DELETE the session (unless ``delete`` is False: a viewer that vanishes) and close the peer."""
        status = None
        if delete and self.location:
            status = (await asyncio.to_thread(http, "DELETE", self.base_url + self.location, None, self.headers))[0]
        await self.pc.close()
        return status
