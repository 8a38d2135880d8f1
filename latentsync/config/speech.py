"""The ``speech_stream`` section: speech that streams in (docs/streaming-speech.md), and what clients may send."""

from __future__ import annotations

from dataclasses import dataclass

#: Speaking rates of text to speech in words per minute (``rate`` of ``/speak``, ``speech_stream.tts_rate_wpm``).
TTS_RATE_RANGE_WPM = (80, 450)
#: Raw PCM of ``/ws/speech``: encodings with their bytes per sample, sample rates in Hz, channels.
PCM_ENCODINGS = {"s16le": 2, "f32le": 4}
PCM_SAMPLE_RATE_RANGE_HZ = (8000, 192000)
PCM_MAX_CHANNELS = 8


@dataclass(kw_only=True)
class SpeechStreamConfig:
    """Speech that streams in: ``/ws/speech``, ``POST /speak`` (docs/streaming-speech.md).

    ``max_open``: utterances open (not ended) at once; more get ``too_many_streams``.
    ``max_buffered_s``: seconds of audio received and not yet played per utterance; a client
    pushing faster than real time past it gets ``buffer_full`` (past half of it: ``slow_down``).
    ``idle_timeout_s``: an open utterance that receives nothing for this long is ended.
    ``max_text_chars``: longest text for ``/speak`` or one ``text`` message.
    ``tts_voice``: espeak-ng voice used when a request names none; ``tts_rate_wpm``: its speed.
    ``tts_timeout_s``: seconds espeak-ng may take for one sentence.
    ``start_margin_s``: slack the jitter buffer keeps for an open utterance's next chunk: more
    costs latency to the first frame, less risks gaps when the pool is slow for a moment.
    ``max_utterance_s``: longest time an utterance may stay open (wall clock): then it ends and
    plays what it has. ``starve_timeout_s`` and ``min_arrival_ratio``: once audio flows, an open
    utterance must keep arriving at ``min_arrival_ratio`` of real time; below that for
    ``starve_timeout_s`` with nothing left to play, it ends (``too_slow``), so a trickling client
    never holds its channel's air. ``max_feeder_items``: PCM blocks and texts one utterance may
    have waiting for its feeder, ``max_feeder_bytes`` their bytes in all (PCM as float32).
    ``max_message_bytes``: largest WebSocket message (no compression is negotiated: the bytes on
    the wire); ``max_queued_bytes``: received WebSocket bytes waiting to be handled, past which the
    server stops reading the socket until they are (TCP holds the client back).
    """

    max_open: int = 4
    max_buffered_s: float = 30.0
    idle_timeout_s: float = 10.0
    max_text_chars: int = 5000
    tts_voice: str = "en"
    tts_rate_wpm: int = 175
    tts_timeout_s: float = 10.0
    start_margin_s: float = 0.04
    max_utterance_s: float = 600.0
    starve_timeout_s: float = 5.0
    min_arrival_ratio: float = 0.5
    max_feeder_items: int = 512
    max_feeder_bytes: int = 32 << 20
    max_message_bytes: int = 1 << 20
    max_queued_bytes: int = 4 << 20
