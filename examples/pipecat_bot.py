"""A Pipecat bot with a lip-synced face in the browser, on one machine: no cloud, no API key.

    bash scripts/agents_venv.sh                 # .venv-agents: pipecat-ai[webrtc], livekit-agents, the client
    bash scripts/tts.sh install                 # espeak-ng (the bot's TTS)
    make run                                    # the LatentSync-Realtime server (another terminal)
    .venv-agents/bin/python examples/pipecat_bot.py --server http://127.0.0.1:11001
    # open http://127.0.0.1:7860 and press Connect: the avatar says the greeting; type a line, press Say

Pipeline (one per browser): ``transport.input() → EspeakTTSService → LatentSyncVideoService →
transport.output()`` over Pipecat's ``SmallWebRTCTransport`` (aiortc, peer to peer). The page
(``examples/pipecat_bot.html``) is ours: plain ``RTCPeerConnection`` + ``fetch``, nothing loaded from
the internet. ``POST /api/offer`` takes the browser's SDP offer, ``POST /api/say`` ``{"text": ...}``
makes every connected bot say a line (a new line interrupts the one playing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, InterruptionFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from latentsync_client import AsyncClient
from latentsync_client.pipecat import LatentSyncVideoService

PAGE = Path(__file__).with_name("pipecat_bot.html")
GREETING = "Hello! I am a lip-synced avatar. Type something below and I will say it."
#: espeak-ng's output rate in Hz (mono s16le WAV on stdout).
ESPEAK_RATE_HZ = 22050
MAX_TEXT_CHARS = 500
MAX_SESSIONS = 4


class EspeakTTSService(TTSService):
    """Text to speech with the local ``espeak-ng`` (Debian package; ``scripts/tts.sh install``).

    One subprocess per sentence; its WAV (22050 Hz mono s16le) goes out as ``TTSAudioRawFrame`` s.

    Args:
        voice: espeak-ng voice (``en-us``, ``de``, ...).
        words_per_minute: Speaking rate.
        timeout_s: Longest run of one espeak-ng call in seconds.
        **kwargs: Passed to :class:`pipecat.services.tts_service.TTSService`.

    Raises:
        RuntimeError: espeak-ng is not installed.
    """

    def __init__(self, *, voice: str = "en-us", words_per_minute: int = 160, timeout_s: float = 10.0, **kwargs: object):
        executable = shutil.which("espeak-ng")
        if executable is None:
            raise RuntimeError("espeak-ng is not installed: bash scripts/tts.sh install")
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            sample_rate=ESPEAK_RATE_HZ,
            settings=TTSSettings(model=None, voice=voice, language=None),
            **kwargs,  # type: ignore[arg-type]
        )
        self._executable = executable
        self._voice = voice
        self._words_per_minute = words_per_minute
        self._timeout_s = timeout_s

    def can_generate_metrics(self) -> bool:
        """True: TTFB and usage metrics."""
        return True

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        """Speak ``text`` (one sentence): TTS audio frames, or an ``ErrorFrame``."""
        try:
            pcm = await self._synthesize(text)
        except (OSError, TimeoutError, ValueError) as exc:
            yield ErrorFrame(error=f"espeak-ng: {exc}")
            return
        await self.start_tts_usage_metrics(text)

        async def chunks() -> AsyncIterator[bytes]:
            step = ESPEAK_RATE_HZ // 50 * 2  # 20 ms
            for i in range(0, len(pcm), step):
                yield pcm[i : i + step]

        first = True
        async for frame in self._stream_audio_frames_from_iterator(
            chunks(), in_sample_rate=ESPEAK_RATE_HZ, context_id=context_id
        ):
            await self.stop_ttfb_metrics()
            if first:  # the wall clock, to compare with what a browser on this machine hears
                first = False
                seconds = len(pcm) / (2 * ESPEAK_RATE_HZ)
                logger.info(f"TTS audio out at epoch {time.time():.3f} s: {seconds:.1f} s of speech for {text!r}")
            yield frame

    async def _synthesize(self, text: str) -> bytes:
        """espeak-ng's PCM of ``text``: mono s16le at :data:`ESPEAK_RATE_HZ`.

        Raises:
            TimeoutError: espeak-ng ran longer than ``timeout_s`` (killed).
            ValueError: It failed or wrote no WAV.
        """
        proc = await asyncio.create_subprocess_exec(
            self._executable,
            "--stdout",
            "-v",
            self._voice,
            "-s",
            str(self._words_per_minute),
            "--",
            text,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise ValueError(f"exit {proc.returncode}: {err.decode(errors='replace')[:200]}")
        return _wav_data(out)


def _wav_data(wav: bytes) -> bytes:
    """The samples of a RIFF/WAVE file (espeak-ng's streamed header may give no true sizes).

    Raises:
        ValueError: Not a WAV, or no ``data`` chunk.
    """
    if wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise ValueError("espeak-ng wrote no WAV")
    pos = 12
    while pos + 8 <= len(wav):
        chunk, size = wav[pos : pos + 4], struct.unpack("<I", wav[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            data = wav[pos + 8 :]
            return data[: len(data) - len(data) % 2]
        pos += 8 + size + (size & 1)
    raise ValueError("no data chunk in espeak-ng's WAV")


@dataclass
class Session:
    """One browser: its connection, its pipeline and the task running it."""

    connection: SmallWebRTCConnection
    worker: PipelineWorker
    runner: WorkerRunner
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Bot:
    """The HTTP side: the page, the offers, the lines to say; one pipeline per connected browser.

    Args:
        server: The LatentSync-Realtime server's URL.
        token: Its ``api.token`` or None.
        channel: The channel (None: main).
        greeting: What each bot says when its browser connects.
        size: The channel's frame size ``(width, height)`` in pixels.
    """

    def __init__(
        self, *, server: str, token: str | None, channel: str | None, greeting: str, size: tuple[int, int]
    ) -> None:
        self.server = server
        self.token = token
        self.channel = channel
        self.greeting = greeting
        self.size = size
        self.sessions: dict[str, Session] = {}

    async def page(self, request: web.Request) -> web.StreamResponse:
        """GET /: the page."""
        return web.FileResponse(PAGE)

    async def offer(self, request: web.Request) -> web.Response:
        """POST /api/offer ``{"sdp", "type"}``: answer ``{"sdp", "type", "pc_id"}``; the bot starts."""
        body = await request.json()
        if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
            raise web.HTTPBadRequest(text="expected {sdp, type: offer}")
        if len(self.sessions) >= MAX_SESSIONS:
            raise web.HTTPServiceUnavailable(text=f"{MAX_SESSIONS} browsers connected already")
        connection = SmallWebRTCConnection(ice_servers=[])  # peer to peer on this machine or LAN
        await connection.initialize(sdp=body["sdp"], type="offer")
        session = self._session(connection)
        answer = connection.get_answer()  # type: ignore[no-untyped-call]  # unannotated in pipecat 1.14
        if answer is None:
            raise web.HTTPInternalServerError(text="no SDP answer")
        self.sessions[connection.pc_id] = session
        session.task = asyncio.create_task(self._run(session), name=f"bot-{connection.pc_id}")
        return web.json_response(answer)

    async def say(self, request: web.Request) -> web.Response:
        """POST /api/say ``{"text"}``: every connected bot says it (interrupting what it says)."""
        body = await request.json()
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
            raise web.HTTPBadRequest(text=f"expected {{text}}: 1..{MAX_TEXT_CHARS} characters")
        for session in list(self.sessions.values()):
            await session.worker.queue_frames([InterruptionFrame(), TTSSpeakFrame(text.strip())])
        return web.json_response({"sessions": len(self.sessions)})

    def _session(self, connection: SmallWebRTCConnection) -> Session:
        width, height = self.size
        transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(
                audio_in_enabled=False,
                audio_out_enabled=True,
                video_out_enabled=True,
                video_out_is_live=True,
                video_out_width=width,
                video_out_height=height,
                video_out_framerate=25,
            ),
        )
        tts = EspeakTTSService()
        avatar = LatentSyncVideoService(url=self.server, token=self.token, channel=self.channel)
        pipeline = Pipeline([transport.input(), tts, avatar, transport.output()])
        worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True))
        greeting = self.greeting

        @transport.event_handler("on_client_connected")  # type: ignore[untyped-decorator]  # pipecat 1.14
        async def on_connected(_transport: object, _client: object) -> None:
            logger.info(f"browser {connection.pc_id} connected: saying the greeting")
            await worker.queue_frames([TTSSpeakFrame(greeting)])

        @transport.event_handler("on_client_disconnected")  # type: ignore[untyped-decorator]  # pipecat 1.14
        async def on_disconnected(_transport: object, _client: object) -> None:
            logger.info(f"browser {connection.pc_id} left")
            await worker.cancel()

        return Session(connection=connection, worker=worker, runner=WorkerRunner(handle_sigint=False))

    async def _run(self, session: Session) -> None:
        try:
            await session.runner.add_workers(session.worker)
            await session.runner.run()
        finally:
            self.sessions.pop(session.connection.pc_id, None)

    async def close(self) -> None:
        """Cancel every bot and close every connection (10 s at most)."""
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await session.worker.cancel()
                    await session.connection.disconnect()  # type: ignore[no-untyped-call]  # pipecat 1.14
        tasks = [s.task for s in sessions if s.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


async def channel_size(server: str, token: str | None, channel: str | None) -> tuple[int, int]:
    """The channel's frame size ``(width, height)`` (from the ``ready`` of ``/ws/frames``; 10 s at most).

    Raises:
        LatentSyncError: The server refused (a wrong token, no such channel) or cannot be reached.
    """
    async with AsyncClient(server, token=token, channel=channel) as client:
        async with client.frames(format="rgb24", audio="none", open_timeout_s=10.0) as frames:
            assert frames.ready is not None
            return frames.ready.width, frames.ready.height


async def main() -> None:
    """Parse the arguments, check the server, serve the page until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:11001", help="the LatentSync-Realtime server")
    parser.add_argument("--token", default=os.environ.get("LATENTSYNC_TOKEN"), help="its api.token ($LATENTSYNC_TOKEN)")
    parser.add_argument("--channel", default=None, help="the channel (default: main)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the page (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    parser.add_argument("--greeting", default=GREETING, help="what the bot says when a browser connects")
    args = parser.parse_args()

    size = await channel_size(args.server, args.token, args.channel)
    bot = Bot(server=args.server, token=args.token, channel=args.channel, greeting=args.greeting, size=size)
    app = web.Application(client_max_size=256 * 1024)
    app.router.add_get("/", bot.page)
    app.router.add_post("/api/offer", bot.offer)
    app.router.add_post("/api/say", bot.say)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    # Everything loaded so far (Pipecat, aiortc, PyAV, numpy: hundreds of thousands of objects) lives as
    # long as the process: out of the collector's sight, a full collection no longer stalls the event
    # loop (here 122 ms once in 10 minutes before: a gap in the video the browser sees).
    gc.collect()
    gc.freeze()
    print(json.dumps({"page": f"http://{args.host}:{args.port}/", "server": args.server, "size": size}), flush=True)
    try:
        await asyncio.Event().wait()  # until Ctrl-C / SIGTERM
    finally:
        await bot.close()
        await runner.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
