"""``AsyncClient``: the server's REST API, and the factory of its speech and frames streams.

REST: README.md of the server ("Make it talk", the API table); every non-2xx answer raises the typed
exception of :mod:`latentsync_client.errors`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx

from latentsync_client.errors import ConnectionFailed, error_from_response
from latentsync_client.frames import Backoff, FramesStream
from latentsync_client.frames_protocol import AudioFormat, VideoFormat
from latentsync_client.speech import SpeechStream

#: The task states that never change again.
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
DEFAULT_URL = "http://127.0.0.1:11001"


@dataclass(frozen=True, slots=True)
class TaskAccepted:
    """The 202 answer of ``POST /generate_video`` and ``POST /speak``.

    Attributes:
        task_id: The task's id (32 hex digits).
        status: ``queued``.
        status_url: Its ``GET /tasks/<id>`` path.
        position: Tasks ahead of it on the channel (uploads only; None for ``/speak``).
    """

    task_id: str
    status: str
    status_url: str
    position: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task as ``GET /tasks/<id>`` describes it (every field of the answer in ``raw``).

    Attributes:
        task_id: The task's id.
        status: ``queued``, ``preparing``, ``generating``, ``streaming``, ``done``, ``failed``, ``cancelled``.
        source: ``upload``, ``speak`` or ``stream``.
        audio_duration_s: Seconds of audio received so far.
        frames_streamed: Speech frames played.
        error: Why it failed, or None.
        time_to_first_frame_s: Received → first frame on air, in seconds (None before).
    """

    task_id: str
    status: str
    source: str | None
    audio_duration_s: float
    frames_streamed: int
    error: str | None
    time_to_first_frame_s: float | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        """True in a final state (``done``, ``failed``, ``cancelled``)."""
        return self.status in FINAL_STATES

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TaskInfo:
        """Read a task's JSON."""
        ttff = body.get("time_to_first_frame_s")
        return cls(
            task_id=str(body.get("task_id")),
            status=str(body.get("status")),
            source=body.get("source"),
            audio_duration_s=float(body.get("audio_duration_s") or 0.0),
            frames_streamed=int(body.get("frames_streamed") or 0),
            error=body.get("error"),
            time_to_first_frame_s=None if ttff is None else float(ttff),
            raw=body,
        )


@dataclass(frozen=True, slots=True)
class Health:
    """``GET /health``: ``ok`` is its 200 (streaming; with ``ready`` also the engine), 503 otherwise.

    Attributes:
        ok: The answer was 200.
        status_code: 200 or 503.
        body: The report (without a token on a server that has one: its public part only).
    """

    ok: bool
    status_code: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ticket:
    """A single-use WebSocket ticket (``POST /ws/tickets``), valid ``expires_in_s`` seconds."""

    ticket: str
    expires_in_s: float


AudioInput = str | Path | bytes | IO[bytes]


class AsyncClient:
    """The server's REST API over one HTTP connection pool (httpx), and its WebSocket streams.

    Args:
        base_url: The server, e.g. ``http://127.0.0.1:11001`` (``https://`` gives ``wss://`` streams).
        token: The server's ``api.token``, sent as ``Authorization: Bearer`` (None: none).
        channel: The default channel of every call (None: ``main``, the paths without ``/channels/<name>``).
        timeout_s: Seconds for each HTTP request (an upload's answer waits for its first chunk's audio).
        use_tickets: Open WebSockets with a single-use ticket (``POST /ws/tickets``, ``?ticket=``)
            instead of the ``Authorization`` header (for proxies that drop the header); only with a token.

    Use as ``async with AsyncClient(...) as client:`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        channel: str | None = None,
        timeout_s: float = 60.0,
        use_tickets: bool = False,
    ):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.channel = channel
        self.use_tickets = use_tickets
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s, trust_env=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool (streams are closed by their own ``close``). Safe to call twice."""
        await self._http.aclose()

    # ------------------------------------------------------------------------------------------ plumbing
    def _path(self, path: str, channel: str | None) -> str:
        name = channel if channel is not None else self.channel
        return f"/channels/{quote(name, safe='')}{path}" if name and name != "main" else path

    async def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"{method} {self.base_url}{path}: {exc!r}") from exc
        if response.is_success or response.status_code in ok:
            return response
        raise error_from_response(response.status_code, response.content, dict(response.headers))

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._request(method, path, **kwargs)).json()

    # ------------------------------------------------------------------------------------------ health
    async def health(self, *, channel: str | None = None, ready: bool = False, live: bool = False) -> Health:
        """``GET /health``: the stream's state (never raises for its 503).

        Args:
            channel: The channel (None: the client's).
            ready: Also require the engine (``?ready=1``).
            live: Only require the clock to tick (``?live=1``).

        Raises:
            Unauthorized: A wrong token. ConnectionFailed: the server cannot be reached.
        """
        params = {k: "1" for k, v in (("ready", ready), ("live", live)) if v}
        response = await self._request("GET", self._path("/health", channel), params=params, ok=(503,))
        return Health(ok=response.status_code == 200, status_code=response.status_code, body=response.json())

    # ------------------------------------------------------------------------------------------ speech
    async def generate_video(
        self,
        audio: AudioInput,
        *,
        filename: str | None = None,
        seed: int | None = None,
        guidance_scale: float | None = None,
        channel: str | None = None,
    ) -> TaskAccepted:
        """``POST /generate_video``: upload an audio file (WAV, MP3, FLAC, OGG, M4A...; any rate) to be spoken.

        Args:
            audio: A path, the file's bytes, or a binary file object.
            filename: The upload's name (default: the path's name, else ``audio.wav``).
            seed: Generation seed (0..2^31-1).
            guidance_scale: The engine's guidance scale.
            channel: The channel (None: the client's).

        Returns:
            The accepted task (202); it plays when its turn comes.

        Raises:
            BadRequest: ``not_audio``, ``too_short``, ``too_long``, ``empty_file``, ``bad_parameter``.
            PayloadTooLarge: Over ``api.max_upload_mb``. RateLimited: ``queue_full``, ``rate_limited``.
            Unavailable: ``starting``, ``decode_timeout``. NotFound: ``no_channel``.
        """
        data: dict[str, str] = {}
        if seed is not None:
            data["seed"] = str(int(seed))
        if guidance_scale is not None:
            data["guidance_scale"] = str(float(guidance_scale))
        if isinstance(audio, str | Path):
            path = Path(audio)
            with path.open("rb") as fh:
                return await self._upload(fh.read(), filename or path.name, data, channel)
        if isinstance(audio, bytes | bytearray):
            return await self._upload(bytes(audio), filename or "audio.wav", data, channel)
        return await self._upload(
            audio.read(), filename or Path(getattr(audio, "name", "audio.wav")).name, data, channel
        )

    async def _upload(self, body: bytes, filename: str, data: dict[str, str], channel: str | None) -> TaskAccepted:
        files = {"audio_file": (filename, body, "application/octet-stream")}
        answer = await self._json("POST", self._path("/generate_video", channel), files=files, data=data)
        return _accepted(answer)

    async def speak(
        self,
        text: str,
        *,
        voice: str | None = None,
        rate_wpm: int | None = None,
        seed: int | None = None,
        channel: str | None = None,
    ) -> TaskAccepted:
        """``POST /speak``: the server's espeak-ng says ``text``, sentence by sentence.

        Args:
            text: What to say (at most ``speech_stream.max_text_chars``, 5000).
            voice: An espeak-ng voice (``en``, ``en-us``, ``de``...).
            rate_wpm: Words per minute (80..450).
            seed: Generation seed.
            channel: The channel (None: the client's).

        Raises:
            BadRequest: ``bad_text``, ``unknown_voice``, ``bad_parameter``. PayloadTooLarge: ``text_too_long``.
            RateLimited: ``too_many_streams``, ``queue_full``. Unavailable: ``tts_unavailable``, ``starting``.
        """
        body: dict[str, Any] = {"text": text}
        for key, value in (("voice", voice), ("rate", rate_wpm), ("seed", seed)):
            if value is not None:
                body[key] = value
        return _accepted(await self._json("POST", self._path("/speak", channel), json=body))

    # ------------------------------------------------------------------------------------------ tasks
    async def task(self, task_id: str, *, channel: str | None = None) -> TaskInfo:
        """``GET /tasks/<id>``.

        Raises:
            NotFound: ``not_found`` (no such task on that channel) or ``no_channel``.
        """
        return TaskInfo.from_json(await self._json("GET", self._path(f"/tasks/{quote(task_id, safe='')}", channel)))

    async def tasks(self, *, channel: str | None = None) -> list[TaskInfo]:
        """``GET /tasks``: recent tasks, newest first."""
        body = await self._json("GET", self._path("/tasks", channel))
        return [TaskInfo.from_json(t) for t in body.get("tasks", [])]

    async def cancel_task(self, task_id: str, *, channel: str | None = None) -> TaskInfo:
        """``DELETE /tasks/<id>``: cancel a waiting task or fade one on air back to idle.

        Raises:
            NotFound: ``not_found`` or ``no_channel``.
        """
        path = self._path(f"/tasks/{quote(task_id, safe='')}", channel)
        return TaskInfo.from_json(await self._json("DELETE", path))

    async def wait_task(
        self,
        task_id: str,
        *,
        states: frozenset[str] | set[str] = FINAL_STATES,
        timeout_s: float = 120.0,
        poll_s: float = 0.2,
        channel: str | None = None,
    ) -> TaskInfo:
        """Poll ``GET /tasks/<id>`` until the task is in one of ``states`` (default: a final one).

        Args:
            task_id: The task.
            states: States to wait for (``{"streaming"}`` waits until it is on air; a final state
                also ends the wait).
            timeout_s: Seconds to wait in all.
            poll_s: Seconds between polls.
            channel: The channel (None: the client's).

        Returns:
            The task as last seen.

        Raises:
            TimeoutError: Not there within ``timeout_s``. NotFound: no such task.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.task(task_id, channel=channel)
            if info.status in states or info.finished:
                return info
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} still {info.status} after {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    # ------------------------------------------------------------------------------------------ channels
    async def channels(self) -> list[dict[str, Any]]:
        """``GET /channels``: every channel's description."""
        return list((await self._json("GET", "/channels")).get("channels", []))

    async def get_channel(self, name: str) -> dict[str, Any]:
        """``GET /channels/<name>``.

        Raises:
            NotFound: ``no_channel``.
        """
        return dict(await self._json("GET", f"/channels/{quote(name, safe='')}"))

    async def put_channel(self, name: str, fields: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        """``PUT /channels/<name>``: create a channel, or switch an existing one's avatar or outputs.

        Args:
            name: The channel.
            fields: Channel fields (docs/channels.md): ``{"avatar": "<id>"}``, ``rtmp_url``, ``outputs``...
            force: Switch even when the face would be under ``avatar.min_face_px``.

        Returns:
            The channel's description (+ ``status_url``).

        Raises:
            BadRequest: ``bad_channel``, ``no_avatar``. Conflict: ``restart_needed``, ``avatar_not_ready``,
            ``face_too_small``, ``channel_not_ready``.
        """
        body = {**fields, **({"force": True} if force else {})}
        return dict(await self._json("PUT", f"/channels/{quote(name, safe='')}", json=body))

    async def delete_channel(self, name: str) -> dict[str, Any]:
        """``DELETE /channels/<name>``: fade it out and stop it.

        Raises:
            NotFound: ``no_channel``. BadRequest: ``main_channel`` (main cannot be deleted).
        """
        return dict(await self._json("DELETE", f"/channels/{quote(name, safe='')}"))

    # ------------------------------------------------------------------------------------------ avatars
    async def avatars(self) -> list[dict[str, Any]]:
        """``GET /avatars``: every avatar's record."""
        return list((await self._json("GET", "/avatars")).get("avatars", []))

    async def avatar(self, avatar_id: str) -> dict[str, Any]:
        """``GET /avatars/<id>``: its record (``status`` ``preparing``/``ready``/``failed``, ``progress``...).

        Raises:
            NotFound: ``no_avatar``.
        """
        return dict(await self._json("GET", f"/avatars/{quote(avatar_id, safe='')}"))

    async def upload_avatar(self, video: str | Path | bytes, *, name: str | None = None) -> dict[str, Any]:
        """``POST /avatars``: upload a video (MP4/MOV/Matroska/WebM, at most 60 s) to prepare as an avatar.

        Args:
            video: A path or the file's bytes.
            name: The avatar's name (default: the file's stem).

        Returns:
            Its record (202, ``status: preparing``); poll :meth:`avatar` until ``ready``.

        Raises:
            BadRequest: ``not_video``, ``too_long``, ``empty_file``. PayloadTooLarge: ``too_large``.
            RateLimited: ``busy``, ``rate_limited``. InsufficientStorage: ``quota_exceeded``.
        """
        if isinstance(video, bytes):
            body, filename = video, "avatar.mp4"
        else:
            body, filename = Path(video).read_bytes(), Path(video).name
        data = {"name": name} if name else {}
        files = {"video_file": (filename, body, "application/octet-stream")}
        return dict(await self._json("POST", "/avatars", files=files, data=data))

    async def delete_avatar(self, avatar_id: str) -> dict[str, Any]:
        """``DELETE /avatars/<id>``.

        Raises:
            NotFound: ``no_avatar``. Conflict: ``avatar_in_use``.
        """
        return dict(await self._json("DELETE", f"/avatars/{quote(avatar_id, safe='')}"))

    # ------------------------------------------------------------------------------------------ streams
    async def ws_ticket(self) -> Ticket:
        """``POST /ws/tickets``: a single-use ticket for one WebSocket handshake (30 s).

        Raises:
            Unauthorized: A wrong token (or none on a server that has one).
        """
        body = await self._json("POST", "/ws/tickets")
        return Ticket(ticket=str(body["ticket"]), expires_in_s=float(body.get("expires_in_s", 30)))

    async def _ws_target(self, path: str) -> tuple[str, dict[str, str]]:
        """The WebSocket URL of ``path`` and its headers: the bearer header, or a fresh ticket in the URL."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        query = ""
        headers: dict[str, str] = {}
        if self.token and self.use_tickets:
            query = urlencode({"ticket": (await self.ws_ticket()).ticket})
        elif self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, query, "")), headers

    def speech(self, *, channel: str | None = None, open_timeout_s: float = 10.0) -> SpeechStream:
        """A channel's ``/ws/speech``: ``async with client.speech() as stream:`` (or ``await client.speech()``).

        Args:
            channel: The channel (None: the client's).
            open_timeout_s: Seconds for the connection and handshake.

        Returns:
            The :class:`~latentsync_client.speech.SpeechStream`, connected by ``async with`` or ``await``.

        Raises:
            NotFound: ``no_channel``. Unauthorized: wrong token or ticket.
            Unavailable: ``too_many_connections``. ConnectionFailed: unreachable. All when it connects.
        """
        path = self._path("/ws/speech", channel)
        return SpeechStream(lambda: self._ws_target(path), open_timeout_s=open_timeout_s)

    def frames(
        self,
        *,
        format: VideoFormat | str = VideoFormat.jpeg,
        width: int | None = None,
        height: int | None = None,
        audio: AudioFormat | str = AudioFormat.pcm_s16le,
        channel: str | None = None,
        reconnect: bool = False,
        backoff: Backoff | None = None,
        receive_timeout_s: float = 10.0,
        open_timeout_s: float = 10.0,
    ) -> FramesStream:
        """A channel's ``/ws/frames`` (connected by ``async with`` or on the first iteration).

        Args:
            format: ``jpeg``, ``h264`` or ``rgb24``.
            width: Frame width in pixels (None: the channel's; one side alone keeps the aspect ratio).
            height: Frame height in pixels.
            audio: ``pcm_s16le`` (each tick's mono samples) or ``none``.
            channel: The channel (None: the client's).
            reconnect: Reconnect with backoff when the connection is lost (yields
                :class:`~latentsync_client.frames.Disconnected` / ``Reconnected``).
            backoff: The reconnect delays.
            receive_timeout_s: Seconds without a message after which the connection counts as lost.
            open_timeout_s: Seconds for each connection and handshake.

        Raises:
            ValueError: An unknown format or a size under 16 pixels (at once).
        """
        path = self._path("/ws/frames", channel)
        return FramesStream(
            lambda: self._ws_target(path),
            format=format,
            width=width,
            height=height,
            audio=audio,
            reconnect=reconnect,
            backoff=backoff,
            receive_timeout_s=receive_timeout_s,
            open_timeout_s=open_timeout_s,
        )


def _accepted(body: dict[str, Any]) -> TaskAccepted:
    position = body.get("position")
    return TaskAccepted(
        task_id=str(body["task_id"]),
        status=str(body.get("status")),
        status_url=str(body.get("status_url", "")),
        position=None if position is None else int(position),
        raw=body,
    )
