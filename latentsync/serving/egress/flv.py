"""FLV tags: how the encoder's one byte stream is cut, cached and handed to every output.

The encoder FFmpeg writes FLV to a pipe (H.264 + AAC, legacy FLV tags as FFmpeg's ``flv`` muxer
writes them for these codecs). :class:`FlvReader` cuts it into tags; :class:`GopCache` keeps
what an output that starts now needs before the live tags (the file header, ``onMetaData``, the
AVC and AAC sequence headers, and every tag since the last keyframe), and :func:`rebased` rewrites
a tag's timestamp so that each output's stream starts at 0.

Layout (Adobe Flash Video File Format Specification 10.1, E.2-E.4): a 9-byte header (``FLV``,
version 1, flags, data offset 9) and a 4-byte ``PreviousTagSize0``; then tags of an 11-byte header
(type: 8 audio, 9 video, 18 script; 24-bit data size; 24-bit timestamp in ms and its upper 8 bits;
24-bit stream id 0), the data, and a 4-byte ``PreviousTagSize`` (11 + data size). A video tag's
first data byte holds the frame type (1: keyframe) and codec (7: AVC), its second the AVC packet
type (0: sequence header); an audio tag's first byte the sound format (10: AAC), its second the
AAC packet type (0: sequence header).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

HEADER_BYTES = 9 + 4  # file header + PreviousTagSize0
TAG_HEADER_BYTES = 11
TAG_TRAILER_BYTES = 4
AUDIO, VIDEO, SCRIPT = 8, 9, 18
MAX_TAG_BYTES = 8 * 2**20  # 24-bit sizes allow 16 MiB; one frame this large means a broken stream
AVC_CODEC_ID = 7
AVC_NALU = 1  # AVC packet type of a picture (0: sequence header, 2: end of sequence)
AAC_SOUND_FORMAT = 10
KEY_FRAME = 1
TIMESTAMP_MASK = 0xFFFFFFFF  # FLV timestamps are 32-bit milliseconds and wrap after 49.7 days


class FlvError(ValueError):
    """The byte stream is not FLV as the encoder writes it (a bad signature or a tag size out of range)."""


@dataclass(frozen=True)
class FlvTag:
    """One FLV tag, whole (header, data and trailing ``PreviousTagSize``).

    Attributes:
        kind: 8 audio, 9 video, 18 script data.
        timestamp_ms: Its decoding time in ms (32 bits, wraps).
        data: The complete tag bytes as they appear in the stream.
    """

    kind: int
    timestamp_ms: int
    data: bytes

    @property
    def payload(self) -> bytes:
        """The tag's data without its 11-byte header and 4-byte trailer."""
        return self.data[TAG_HEADER_BYTES:-TAG_TRAILER_BYTES]

    @property
    def keyframe(self) -> bool:
        """True for a video tag that holds a keyframe's picture (not the AVC sequence header or end of sequence)."""
        if self.kind != VIDEO or len(self.data) < TAG_HEADER_BYTES + 2 + TAG_TRAILER_BYTES:
            return False
        first = self.data[11]
        is_avc_picture = first & 0x0F != AVC_CODEC_ID or self.data[12] == AVC_NALU
        return (first >> 4) & 7 == KEY_FRAME and is_avc_picture

    @property
    def sequence_header(self) -> bool:
        """True for the AVC decoder configuration or the AAC AudioSpecificConfig (needed before any frame)."""
        if len(self.data) < TAG_HEADER_BYTES + 2 + TAG_TRAILER_BYTES:
            return False
        first, packet_type = self.data[11], self.data[12]
        if self.kind == VIDEO:
            return first & 0x0F == AVC_CODEC_ID and packet_type == 0
        if self.kind == AUDIO:
            return first >> 4 == AAC_SOUND_FORMAT and packet_type == 0
        return False


def rebased(tag: FlvTag, base_ms: int) -> bytes:
    """The tag's bytes with ``base_ms`` taken off its timestamp (modulo 2**32, as FLV wraps).

    Args:
        tag: The tag.
        base_ms: The timestamp that becomes 0 (an output's first keyframe).

    Returns:
        New tag bytes; the source tag is not changed. A tag from before ``base_ms`` (an audio
        frame interleaved just ahead of the keyframe) gets 0, never a wrapped timestamp.
    """
    ts = (tag.timestamp_ms - base_ms) & TIMESTAMP_MASK
    if ts > TIMESTAMP_MASK >> 1:  # before the base: half the range back is "earlier", not 24 days on
        ts = 0
    head = bytearray(tag.data[:TAG_HEADER_BYTES])
    head[4:7] = (ts & 0xFFFFFF).to_bytes(3, "big")
    head[7] = ts >> 24
    return bytes(head) + tag.data[TAG_HEADER_BYTES:]


class FlvReader:
    """Cuts an FLV byte stream, fed in pieces of any size, into the file header and whole tags."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.header: bytes | None = None  # the 13 header bytes, once read

    def feed(self, data: bytes) -> Iterator[FlvTag]:
        """Add bytes; yield every tag completed by them.

        Raises:
            FlvError: On a bad signature or a tag size over :data:`MAX_TAG_BYTES`.
        """
        buf = self._buffer
        buf += data
        pos = 0
        if self.header is None:
            if len(buf) < HEADER_BYTES:
                return
            if buf[:3] != b"FLV":
                raise FlvError("not an FLV stream")
            offset = struct.unpack(">I", buf[5:9])[0]
            if offset != 9:
                raise FlvError(f"unexpected FLV header size {offset}")
            self.header = bytes(buf[:HEADER_BYTES])
            pos = HEADER_BYTES
        try:
            while len(buf) - pos >= TAG_HEADER_BYTES:
                kind = buf[pos] & 0x1F
                size = int.from_bytes(buf[pos + 1 : pos + 4], "big")
                if size > MAX_TAG_BYTES:
                    raise FlvError(f"FLV tag of {size} bytes")
                total = TAG_HEADER_BYTES + size + TAG_TRAILER_BYTES
                if len(buf) - pos < total:
                    break
                ts = int.from_bytes(buf[pos + 4 : pos + 7], "big") | buf[pos + 7] << 24
                yield FlvTag(kind, ts, bytes(buf[pos : pos + total]))
                pos += total
        finally:
            del buf[:pos]


class GopCache:
    """What an output joining now needs before the live tags: the headers and the current GOP.

    Fed every tag of one encoder run in order (:meth:`add`). An output that starts gets
    :meth:`start_bytes`: the FLV header, ``onMetaData``, both sequence headers at timestamp 0, and
    the tags since the last keyframe rebased to start at 0; from then on it takes live tags rebased
    by the same base. So every output's stream starts with a decodable keyframe, at once, without
    waiting for the next one.

    Args:
        max_bytes: Largest GOP kept, in bytes; a longer one is dropped (an output then waits for the
            next keyframe).
    """

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self.header: bytes | None = None
        self._metadata: FlvTag | None = None
        self._video_config: FlvTag | None = None
        self._audio_config: FlvTag | None = None
        self._gop: deque[FlvTag] = deque()
        self._gop_bytes = 0

    def add(self, tag: FlvTag) -> None:
        """Record one tag of the stream (in stream order)."""
        if tag.kind == SCRIPT:
            if self._metadata is None:
                self._metadata = tag
            return
        if tag.sequence_header:
            if tag.kind == VIDEO:
                self._video_config = tag
            else:
                self._audio_config = tag
            return
        if tag.keyframe:
            self._gop.clear()
            self._gop_bytes = 0
        elif not self._gop:
            return  # no keyframe yet: nothing an output could start with
        self._gop.append(tag)
        self._gop_bytes += len(tag.data)
        if self._gop_bytes > self._max_bytes:
            self._gop.clear()
            self._gop_bytes = 0

    @property
    def ready(self) -> bool:
        """True once an output can start: header, video configuration and a keyframe seen."""
        return self.header is not None and self._video_config is not None and bool(self._gop)

    def start_bytes(self) -> tuple[bytes, int]:
        """The bytes an output starts with, and the timestamp its live tags are rebased by.

        Returns:
            ``(bytes, base_ms)``: header, metadata and sequence headers at 0, then the current GOP
            rebased to start at 0; ``base_ms`` is the GOP's keyframe timestamp.

        Raises:
            RuntimeError: If not :attr:`ready`.
        """
        if not self.ready or self.header is None:
            raise RuntimeError("no keyframe yet")
        base = self._gop[0].timestamp_ms
        parts = [self.header]
        for tag in (self._metadata, self._video_config, self._audio_config):
            if tag is not None:
                parts.append(rebased(tag, tag.timestamp_ms))
        parts.extend(rebased(t, base) for t in self._gop)
        return b"".join(parts), base
