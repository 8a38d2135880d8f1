"""The ``/ws/frames`` wire format, written from docs/frames-protocol.md (version 1): hello, ready, tick header.

Pure Python (``struct``, ``json``): no network, no NumPy. One binary message per tick: a 64-byte
little-endian header (:class:`FrameHeader`), then ``video_bytes`` of video, then ``audio_bytes`` of
audio. :func:`parse_header` and :func:`split_message` refuse anything the document does not allow.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

from latentsync_client.errors import ProtocolError

#: First 4 bytes of every tick message.
MAGIC = b"LSRF"
#: The header version this client reads.
VERSION = 1
#: magic, version, header_bytes, tick, pts_us, state, format, flags, audio_format, width, height,
#: task_id, dropped_ticks, video_bytes, audio_bytes, sample_rate_hz (little endian, no padding).
HEADER_STRUCT = struct.Struct("<4sHHQQBBBBHH16sIIII")
#: Bytes of the version-1 header (a later version may grow it: payloads start at ``header_bytes``).
HEADER_BYTES = 64
#: Header flag bit 0: the video payload decodes on its own (every JPEG and rgb24 frame, an H.264 IDR).
FLAG_KEYFRAME = 0x01

#: Close codes of ``/ws/frames`` (docs/frames-protocol.md "Close codes").
CLOSE_BAD_HELLO = 4400
CLOSE_HELLO_TIMEOUT = 4408
CLOSE_TOO_LARGE = 4413
CLOSE_UNSUPPORTED = 4415
CLOSE_GOING_AWAY = 1001
CLOSE_MESSAGE_TOO_BIG = 1009

assert HEADER_STRUCT.size == HEADER_BYTES


class VideoFormat(enum.IntEnum):
    """The video payload's format (header byte 25; the hello's ``format`` is the name)."""

    jpeg = 1  # one baseline JFIF image (YCbCr 4:2:0)
    h264 = 2  # one H.264 access unit, Annex B, constrained Baseline; SPS/PPS before every IDR
    rgb24 = 3  # width * height * 3 bytes, rows top to bottom, R G B per pixel


class AudioFormat(enum.IntEnum):
    """The audio payload's format (header byte 27; the hello's ``audio`` is the name)."""

    none = 0  # audio_bytes is 0
    pcm_s16le = 1  # the tick's samples: mono signed 16-bit little endian at sample_rate_hz


class TickState(enum.IntEnum):
    """What is on air at the tick (header byte 24)."""

    idle = 0
    speaking = 1
    fade_in = 2  # crossfading into speech
    fade_out = 3  # crossfading back to idle


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """One tick's 64-byte header (docs/frames-protocol.md, "The tick header").

    Attributes:
        version: Header version (1).
        header_bytes: Where the video payload starts in the message, in bytes (64 for version 1).
        tick: The tick's number on the channel's stream (+1 per tick).
        pts_us: Presentation time in microseconds (``tick * 1000000 // fps``).
        state: What is on air (:class:`TickState`).
        format: The video payload's format (:class:`VideoFormat`).
        flags: Flag bits (bit 0: keyframe).
        audio_format: The audio payload's format (:class:`AudioFormat`).
        width: Frame width in pixels.
        height: Frame height in pixels.
        task_id: The task on air (32 lowercase hex digits), or None while idle (16 zero bytes).
        dropped_ticks: Ticks this client lost between the previous message and this one.
        video_bytes: Length of the video payload in bytes.
        audio_bytes: Length of the audio payload in bytes (2 per sample for ``pcm_s16le``).
        sample_rate_hz: The audio's sample rate in Hz.
    """

    version: int
    header_bytes: int
    tick: int
    pts_us: int
    state: TickState
    format: VideoFormat
    flags: int
    audio_format: AudioFormat
    width: int
    height: int
    task_id: str | None
    dropped_ticks: int
    video_bytes: int
    audio_bytes: int
    sample_rate_hz: int

    @property
    def keyframe(self) -> bool:
        """True when the video payload decodes on its own (flag bit 0)."""
        return bool(self.flags & FLAG_KEYFRAME)

    @property
    def pts_s(self) -> float:
        """Presentation time in seconds."""
        return self.pts_us / 1e6

    @property
    def audio_samples(self) -> int:
        """Samples in the audio payload (mono s16le: ``audio_bytes // 2``; 0 without audio)."""
        return self.audio_bytes // 2 if self.audio_format is AudioFormat.pcm_s16le else 0

    @property
    def message_bytes(self) -> int:
        """The whole message's length in bytes: ``header_bytes + video_bytes + audio_bytes``."""
        return self.header_bytes + self.video_bytes + self.audio_bytes


def parse_header(message: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse the header at the start of one binary tick message.

    Args:
        message: The whole binary message (at least 64 bytes).

    Returns:
        The header.

    Raises:
        ProtocolError: If the message is shorter than 64 bytes, its magic is not ``LSRF``, its
            version is not 1, its ``header_bytes`` is under 64, or a byte names an unknown state,
            format or audio format.
    """
    if len(message) < HEADER_BYTES:
        raise ProtocolError(f"tick message of {len(message)} bytes, shorter than the {HEADER_BYTES}-byte header")
    (
        magic,
        version,
        header_bytes,
        tick,
        pts_us,
        state,
        fmt,
        flags,
        audio_format,
        width,
        height,
        task_id,
        dropped,
        video_bytes,
        audio_bytes,
        sample_rate,
    ) = HEADER_STRUCT.unpack_from(message)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(f"header version {version}: this client reads version {VERSION}")
    if header_bytes < HEADER_BYTES:
        raise ProtocolError(f"header_bytes {header_bytes} < {HEADER_BYTES}")
    try:
        state_v, format_v, audio_v = TickState(state), VideoFormat(fmt), AudioFormat(audio_format)
    except ValueError as exc:
        raise ProtocolError(f"unknown value in the header: {exc}") from None
    return FrameHeader(
        version=version,
        header_bytes=header_bytes,
        tick=tick,
        pts_us=pts_us,
        state=state_v,
        format=format_v,
        flags=flags,
        audio_format=audio_v,
        width=width,
        height=height,
        task_id=task_id.hex() if any(task_id) else None,
        dropped_ticks=dropped,
        video_bytes=video_bytes,
        audio_bytes=audio_bytes,
        sample_rate_hz=sample_rate,
    )


def split_message(message: bytes | bytearray | memoryview) -> tuple[FrameHeader, memoryview, memoryview]:
    """Split one binary tick message into its header, video payload and audio payload.

    Args:
        message: The whole binary message.

    Returns:
        ``(header, video, audio)``; the payloads are views into ``message`` (no copy).

    Raises:
        ProtocolError: As :func:`parse_header`, or if the message's length is not
            ``header_bytes + video_bytes + audio_bytes``.
    """
    header = parse_header(message)
    if len(message) != header.message_bytes:
        raise ProtocolError(
            f"tick message of {len(message)} bytes; its header says {header.message_bytes} "
            f"({header.header_bytes} + {header.video_bytes} + {header.audio_bytes})"
        )
    view = memoryview(message)
    start = header.header_bytes
    video = view[start : start + header.video_bytes]
    audio = view[start + header.video_bytes : header.message_bytes]
    return header, video, audio


def samples_in_tick(tick: int, sample_rate_hz: int, fps: int) -> int:
    """Audio samples tick ``tick`` carries: ``floor((tick+1)*sr/fps) - floor(tick*sr/fps)``.

    Args:
        tick: The tick's number.
        sample_rate_hz: The audio's sample rate in Hz.
        fps: The stream's frame rate in frames per second.

    Returns:
        The count of samples (mono) of that tick.
    """
    return (tick + 1) * sample_rate_hz // fps - tick * sample_rate_hz // fps


@dataclass(frozen=True, slots=True)
class Ready:
    """The server's ``ready`` answer to the hello: what every tick message will carry.

    Attributes:
        channel: The channel's name.
        format: The video format.
        width: Frame width in pixels.
        height: Frame height in pixels.
        audio: The audio format.
        fps: Ticks per second.
        sample_rate_hz: The audio's sample rate in Hz.
        version: Protocol version.
        header_bytes: Bytes of each header.
        raw: The whole JSON message.
    """

    channel: str
    format: VideoFormat
    width: int
    height: int
    audio: AudioFormat
    fps: int
    sample_rate_hz: int
    version: int
    header_bytes: int
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, message: dict[str, Any]) -> Ready:
        """Read a ``ready`` message.

        Raises:
            ProtocolError: If it is not a ``ready`` message or misses a field.
        """
        if message.get("type") != "ready":
            raise ProtocolError(f"expected a ready message, got {str(message)[:200]}")
        try:
            return cls(
                channel=str(message["channel"]),
                format=VideoFormat[message["format"]],
                width=int(message["width"]),
                height=int(message["height"]),
                audio=AudioFormat[message["audio"]],
                fps=int(message["fps"]),
                sample_rate_hz=int(message["sample_rate_hz"]),
                version=int(message["version"]),
                header_bytes=int(message["header_bytes"]),
                raw=message,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ProtocolError(f"bad ready message {str(message)[:200]}: {exc!r}") from None


def hello_message(
    format: VideoFormat | str = VideoFormat.jpeg,
    *,
    width: int | None = None,
    height: int | None = None,
    audio: AudioFormat | str = AudioFormat.pcm_s16le,
) -> dict[str, Any]:
    """The hello a client sends first.

    Args:
        format: ``jpeg``, ``h264`` or ``rgb24``.
        width: Frame width in pixels (>= 16, at most the channel's; None: the channel's, or kept
            in the channel's aspect ratio when only ``height`` is given).
        height: Frame height in pixels (as ``width``).
        audio: ``pcm_s16le`` (each tick's samples) or ``none``.

    Returns:
        The JSON object to send.

    Raises:
        ValueError: If ``format`` or ``audio`` is unknown, or a size is under 16 pixels.
    """
    try:
        fmt = format if isinstance(format, VideoFormat) else VideoFormat[format]
        aud = audio if isinstance(audio, AudioFormat) else AudioFormat[audio]
    except KeyError as exc:
        raise ValueError(
            f"unknown format {exc}: formats {[f.name for f in VideoFormat]}, audio {[a.name for a in AudioFormat]}"
        ) from None
    hello: dict[str, Any] = {"type": "hello", "format": fmt.name, "audio": aud.name}
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            if value < 16:
                raise ValueError(f"{name} {value}: at least 16 pixels")
            hello[name] = int(value)
    return hello
