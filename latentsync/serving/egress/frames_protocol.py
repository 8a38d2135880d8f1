"""The frames WebSocket's wire format (``/ws/frames``): the hello, the ready answer, the per-tick header.

Everything a client needs is in docs/frames-protocol.md; this module is its executable form, shared
by the server (:mod:`latentsync.serving.egress.frames`) and its tests. The Python client
(``clients/python``, ``latentsync_client.frames_protocol``) has its own parser, written from the document
and checked against :meth:`FrameHeader.pack` by ``tests/client/``. It imports nothing heavier than
:mod:`struct` and :mod:`json`.

One binary message per tick: a :data:`HEADER_BYTES`-byte little-endian header
(:class:`FrameHeader`), then ``video_bytes`` of video payload, then ``audio_bytes`` of audio.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

#: First 4 bytes of every tick message.
MAGIC = b"LSRF"
#: Protocol version in every header; a client refuses a version it does not know.
VERSION = 1
#: ``<``: little endian, no padding. magic, version, header_bytes, tick, pts_us, state, format,
#: flags, audio_format, width, height, task_id, dropped_ticks, video_bytes, audio_bytes, sample_rate_hz.
HEADER_STRUCT = struct.Struct("<4sHHQQBBBBHH16sIIII")
#: Bytes of the version-1 header (a later version may grow it: payloads start at ``header_bytes``).
HEADER_BYTES = HEADER_STRUCT.size
#: Header flag: the video payload is a keyframe (every JPEG and rgb24 frame; an H.264 IDR access unit).
FLAG_KEYFRAME = 0x01
#: Smallest width or height a client may ask for, in pixels.
MIN_SIDE = 16
#: Largest width or height a hello may name, in pixels (more is 4413 before any arithmetic).
MAX_SIDE = 16384

#: Close codes (RFC 6455 private range 4000-4999), with the reason's first word.
CLOSE_BAD_HELLO = 4400  # not a JSON object, binary first, wrong type, bad field
CLOSE_HELLO_TIMEOUT = 4408  # no hello within frames.hello_timeout_s
CLOSE_TOO_LARGE = 4413  # width or height larger than the channel's
CLOSE_UNSUPPORTED = 4415  # unknown format or audio
#: The server stops, or the channel's stream was stopped or deleted (RFC 6455 "going away").
CLOSE_GOING_AWAY = 1001


class VideoFormat(enum.IntEnum):
    """The video payload's format (header byte ``format``)."""

    jpeg = 1  # one baseline JPEG (YCbCr 4:2:0) per tick
    h264 = 2  # one H.264 access unit per tick (Annex B, constrained Baseline; SPS/PPS before each IDR)
    rgb24 = 3  # width * height * 3 bytes, rows top to bottom, R G B per pixel


class AudioFormat(enum.IntEnum):
    """The audio payload's format (header byte ``audio_format``)."""

    none = 0  # no audio (audio_bytes is 0)
    pcm_s16le = 1  # mono signed 16-bit little-endian PCM at sample_rate_hz: this tick's samples


class TickState(enum.IntEnum):
    """What is on air at this tick (header byte ``state``)."""

    idle = 0
    speaking = 1
    fade_in = 2  # crossfading from idle (or a previous utterance) into speech
    fade_out = 3  # crossfading from speech back to idle


#: The stream state names (``latentsync.serving.playout.state.StreamState`` values) → header state.
STATE_CODES = {
    "starting": TickState.idle,
    "idle": TickState.idle,
    "speaking": TickState.speaking,
    "fade_in": TickState.fade_in,
    "fade_out": TickState.fade_out,
    "stopped": TickState.idle,
}


class HelloRefused(Exception):
    """A hello the server cannot serve: the connection is closed with ``code`` and ``reason``.

    Attributes:
        code: One of the ``CLOSE_*`` codes.
        reason: ``"<word>: <explanation>"`` (at most 123 bytes: a close frame's limit).
    """

    def __init__(self, code: int, word: str, explanation: str):
        self.code = code
        self.reason = f"{word}: {explanation}"[:123]
        super().__init__(self.reason)


@dataclass(frozen=True)
class Subscription:
    """What one client asked for in its hello (sizes resolved against the channel's).

    Attributes:
        format: The video payload's format.
        width: Frame width in pixels (even for H.264).
        height: Frame height in pixels (even for H.264).
        audio: The audio payload's format.
    """

    format: VideoFormat
    width: int
    height: int
    audio: AudioFormat

    @property
    def key(self) -> tuple[VideoFormat, int, int]:
        """What the server encodes once for every client that shares it: ``(format, width, height)``."""
        return self.format, self.width, self.height


def parse_hello(message: str | bytes | None, channel_width: int, channel_height: int) -> Subscription:
    """Read a client's first message: ``{"type": "hello", "format": ..., "width"?, "height"?, "audio"?}``.

    ``width``/``height`` default to the channel's; with only one given, the other keeps the
    channel's aspect ratio. H.264 sizes are rounded down to even numbers.

    Args:
        message: The first message (``str``: text; ``bytes``: binary, always refused).
        channel_width: The channel's frame width in pixels.
        channel_height: The channel's frame height in pixels.

    Returns:
        The subscription.

    Raises:
        HelloRefused: 4400 for a binary message, not a JSON object, a type other than ``hello``,
            a size that is not an integer of at least :data:`MIN_SIDE`; 4415 for an unknown
            ``format`` or ``audio``; 4413 for a size larger than the channel's (or :data:`MAX_SIDE`).
    """
    if not isinstance(message, str):
        raise HelloRefused(CLOSE_BAD_HELLO, "bad_hello", "the first message must be a JSON text message (hello)")
    try:
        hello = json.loads(message)
    except (ValueError, RecursionError):  # not JSON, an integer past the digit limit, nested past parsing
        raise HelloRefused(CLOSE_BAD_HELLO, "bad_hello", "the hello is not JSON") from None
    if not isinstance(hello, dict) or hello.get("type") != "hello":
        raise HelloRefused(CLOSE_BAD_HELLO, "bad_hello", 'the first message must be {"type": "hello", ...}')
    name = hello.get("format", "jpeg")
    if not isinstance(name, str) or name not in VideoFormat.__members__:
        raise HelloRefused(CLOSE_UNSUPPORTED, "unknown_format", f"format {name!r}: jpeg, h264 or rgb24")
    audio_name = hello.get("audio", "pcm_s16le")
    if not isinstance(audio_name, str) or audio_name not in AudioFormat.__members__:
        raise HelloRefused(CLOSE_UNSUPPORTED, "unknown_audio", f"audio {audio_name!r}: pcm_s16le or none")
    fmt = VideoFormat[name]
    asked_width, asked_height = _side(hello, "width"), _side(hello, "height")
    if asked_width is not None and asked_height is not None:
        width, height = asked_width, asked_height
    elif asked_width is not None:
        width, height = asked_width, max(MIN_SIDE, round(channel_height * asked_width / channel_width))
    elif asked_height is not None:
        width, height = max(MIN_SIDE, round(channel_width * asked_height / channel_height)), asked_height
    else:
        width, height = channel_width, channel_height
    if width > channel_width or height > channel_height:
        channel = f"{channel_width}x{channel_height}"
        raise HelloRefused(CLOSE_TOO_LARGE, "too_large", f"{width}x{height} is larger than the channel's {channel}")
    if fmt is VideoFormat.h264:
        width, height = width - width % 2, height - height % 2
    return Subscription(fmt, width, height, AudioFormat[audio_name])


def _side(hello: dict[str, Any], side: str) -> int | None:
    """The hello's ``width`` or ``height``: None when it names none, else an integer >= MIN_SIDE (HelloRefused)."""
    value = hello.get(side)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < MIN_SIDE):
        raise HelloRefused(CLOSE_BAD_HELLO, "bad_size", f"{side} must be an integer >= {MIN_SIDE}")
    if value is not None and value > MAX_SIDE:  # before any arithmetic: 10**400 overflows a float
        raise HelloRefused(CLOSE_TOO_LARGE, "too_large", f"{side} is larger than {MAX_SIDE}")
    return value


@dataclass(frozen=True, kw_only=True)
class FrameHeader:
    """The fixed header in front of every tick message (docs/frames-protocol.md has the byte table).

    Attributes:
        tick: The tick's number on the channel's stream (0 = the first tick shown; +1 per tick).
        pts_us: Presentation time in microseconds: ``tick * 1_000_000 // fps``.
        state: What is on air.
        format: The video payload's format.
        flags: :data:`FLAG_KEYFRAME` or 0.
        audio_format: The audio payload's format.
        width: Frame width in pixels.
        height: Frame height in pixels.
        task_id: The task on air as 16 bytes (its 32 hex digits), zeros when none.
        dropped_ticks: Ticks this client lost between the previous message and this one (always
            ``tick - previous tick - 1``; 0 in the first message).
        video_bytes: Length of the video payload.
        audio_bytes: Length of the audio payload (2 bytes per sample).
        sample_rate_hz: The audio's sample rate.
        version: The protocol version.
        header_bytes: Where the video payload starts.
    """

    tick: int
    pts_us: int
    state: TickState
    format: VideoFormat
    flags: int
    audio_format: AudioFormat
    width: int
    height: int
    task_id: bytes
    dropped_ticks: int
    video_bytes: int
    audio_bytes: int
    sample_rate_hz: int
    version: int = VERSION
    header_bytes: int = HEADER_BYTES

    @property
    def keyframe(self) -> bool:
        """True when the video payload can be decoded on its own."""
        return bool(self.flags & FLAG_KEYFRAME)

    @property
    def task(self) -> str | None:
        """The task on air as 32 hex digits, or None."""
        return self.task_id.hex() if any(self.task_id) else None

    def pack(self) -> bytes:
        """The header's :data:`HEADER_BYTES` bytes."""
        return HEADER_STRUCT.pack(
            MAGIC,
            self.version,
            self.header_bytes,
            self.tick,
            self.pts_us,
            int(self.state),
            int(self.format),
            self.flags,
            int(self.audio_format),
            self.width,
            self.height,
            self.task_id,
            self.dropped_ticks,
            self.video_bytes,
            self.audio_bytes,
            self.sample_rate_hz,
        )

    @classmethod
    def unpack(cls, message: bytes) -> FrameHeader:
        """Read the header at the start of a tick message.

        Raises:
            ValueError: If the message is shorter than a header, the magic is wrong, the version
                unknown, or the payload lengths do not add up to the message's length.
        """
        if len(message) < HEADER_BYTES:
            raise ValueError(f"a tick message has at least {HEADER_BYTES} bytes, got {len(message)}")
        fields = HEADER_STRUCT.unpack_from(message)
        if fields[0] != MAGIC:
            raise ValueError(f"bad magic {fields[0]!r}")
        if fields[1] != VERSION:
            raise ValueError(f"unknown protocol version {fields[1]}")
        header = cls(
            tick=fields[3],
            pts_us=fields[4],
            state=TickState(fields[5]),
            format=VideoFormat(fields[6]),
            flags=fields[7],
            audio_format=AudioFormat(fields[8]),
            width=fields[9],
            height=fields[10],
            task_id=fields[11],
            dropped_ticks=fields[12],
            video_bytes=fields[13],
            audio_bytes=fields[14],
            sample_rate_hz=fields[15],
            version=fields[1],
            header_bytes=fields[2],
        )
        if header.header_bytes + header.video_bytes + header.audio_bytes != len(message):
            raise ValueError("payload lengths do not match the message")
        return header


def split_message(message: bytes) -> tuple[FrameHeader, memoryview, memoryview]:
    """A tick message → ``(header, video payload, audio payload)`` (views into ``message``, no copy).

    Raises:
        ValueError: As :meth:`FrameHeader.unpack`.
    """
    header = FrameHeader.unpack(message)
    view = memoryview(message)
    start = header.header_bytes
    video = view[start : start + header.video_bytes]
    audio = view[start + header.video_bytes : start + header.video_bytes + header.audio_bytes]
    return header, video, audio
