"""A WHIP endpoint for the tests (RFC 9725 ingest): aiortc answers the offer and counts what arrives.

``POST /whip`` with an SDP offer gets ``201``, the SDP answer and a ``Location``; ``DELETE`` on that
location ends the session. :attr:`WhipReceiver.refuse_with` makes every POST answer that status
instead (an endpoint that is down: 503). Received video frames and audio samples are counted per
session, with arrival times, so a test can tell whether a publisher's media flows.

FFmpeg's WHIP muxer (n9.0) does not answer ICE consent-freshness checks (RFC 7675): an aiortc peer
left as it is ends every FFmpeg session after ~30 s ("Consent to send expired", tried here). This
endpoint does not expire consent, like the WHIP servers FFmpeg's muxer is made against; the
output's reconnection after a session that ends is tested on its own (the 503 test).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from latentsync.serving.egress.whep import allow_loopback_candidates


@dataclass
class Session:
    """One publisher's session: what it sent, as decoded by aiortc."""

    id: int
    pc: RTCPeerConnection
    authorization: str | None
    video_frames: int = 0
    audio_samples: int = 0
    frame_times: list[float] = field(default_factory=list)  # time.monotonic() of each video frame
    widths: set[int] = field(default_factory=set)
    ended: bool = False


class WhipReceiver:
    """A WHIP endpoint on 127.0.0.1 (a free port), run on a thread of its own until :meth:`close`."""

    def __init__(self) -> None:
        allow_loopback_candidates()
        aioice.ice.CONSENT_FAILURES = 10**9  # see the module's docstring: FFmpeg never answers them
        self.sessions: list[Session] = []
        self.refuse_with: int | None = None
        self.posts = 0
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="whip-rx-loop", daemon=True)
        self._loop_thread.start()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                receiver.posts += 1
                offer = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                if receiver.refuse_with is not None:
                    self._reply(receiver.refuse_with, b"unavailable")
                    return
                future = asyncio.run_coroutine_threadsafe(
                    receiver._answer(offer, self.headers.get("Authorization")), receiver._loop
                )
                session_id, answer = future.result(15)
                self._reply(
                    201,
                    answer.encode(),
                    {"Content-Type": "application/sdp", "Location": f"/whip/session/{session_id}"},
                )

            def do_DELETE(self) -> None:  # noqa: N802
                session_id = int(self.path.rsplit("/", 1)[-1]) if self.path.rsplit("/", 1)[-1].isdigit() else 0
                for s in receiver.sessions:
                    if s.id == session_id:
                        asyncio.run_coroutine_threadsafe(s.pc.close(), receiver._loop).result(5)
                        s.ended = True
                self._reply(200)

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="whip-rx-http", daemon=True)
        self._http_thread.start()

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        return f"http://127.0.0.1:{self.port}/whip"

    def video_frames(self) -> int:
        """Video frames received over every session."""
        return sum(s.video_frames for s in self.sessions)

    def frames_between(self, start: float, end: float) -> int:
        """Video frames that arrived between two ``time.monotonic()`` instants, over every session."""
        return sum(1 for s in self.sessions for t in s.frame_times if start <= t < end)

    async def _answer(self, offer: str, authorization: str | None) -> tuple[int, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session = Session(next(self._ids), pc, authorization)
        self.sessions.append(session)

        @pc.on("track")
        def on_track(track) -> None:
            asyncio.ensure_future(self._consume(session, track))

        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return session.id, pc.localDescription.sdp

    async def _consume(self, session: Session, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                session.video_frames += 1
                session.frame_times.append(time.monotonic())
                session.widths.add(frame.width)
            else:
                session.audio_samples += frame.samples

    def close(self) -> None:
        """Stop serving and close every session."""
        self._http.shutdown()
        self._http.server_close()

        async def close_all() -> None:
            for s in self.sessions:
                with contextlib.suppress(Exception):
                    await s.pc.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
