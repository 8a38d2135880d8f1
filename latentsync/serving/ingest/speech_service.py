"""Text to speech for every channel: the TTS engine, the checks of a text request, feeders for utterances.

``POST /speak``, ``/channels/<name>/speak`` and the ``text`` messages of ``/ws/speech`` all go
through one :class:`SpeechService` (built once by the runtime): the text is checked here, then
synthesised sentence by sentence by a :class:`~latentsync.serving.ingest.text_to_speech.SpeechFeeder`
attached to the channel's utterance (docs/streaming-speech.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from latentsync.config import SEED_RANGE, TTS_RATE_RANGE_WPM, AppConfig
from latentsync.serving.ingest.text_to_speech import EspeakNg, SpeechFeeder, TextToSpeech
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.utterance import Utterance

logger = logging.getLogger(__name__)


def int_field(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """An optional integer of a JSON request, in ``[low, high]``.

    Raises:
        SpeechError: ``bad_parameter`` naming the field.
    """
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SpeechError("bad_parameter", f"{name}={value!r} is not an integer in [{low}, {high}]")
    return value


def seed_field(body: dict[str, Any]) -> int | None:
    """The optional ``seed`` of a JSON request (:data:`~latentsync.config.SEED_RANGE`).

    Raises:
        SpeechError: ``bad_parameter``.
    """
    return int_field(body, "seed", *SEED_RANGE)


class SpeechService:
    """The text-to-speech side shared by every channel.

    Args:
        tts: The TTS engine, or None when none is installed (``/speak`` then answers ``tts_unavailable``).
        max_text_chars: Longest text accepted (``speech_stream.max_text_chars``).
        max_feeder_items: Items a feeder may have waiting (``speech_stream.max_feeder_items``).
        max_feeder_bytes: Their bytes in all (``speech_stream.max_feeder_bytes``).
    """

    def __init__(
        self, tts: TextToSpeech | None, max_text_chars: int, max_feeder_items: int, max_feeder_bytes: int = 32 << 20
    ):
        self.tts = tts
        self.max_text_chars = max_text_chars
        self.max_feeder_items = max_feeder_items
        self.max_feeder_bytes = max_feeder_bytes

    @classmethod
    def from_config(cls, config: AppConfig) -> SpeechService:
        """Build from the server config (``speech_stream``); without espeak-ng, text to speech is off (logged)."""
        ss = config.speech_stream
        try:
            tts: TextToSpeech | None = EspeakNg(ss.tts_voice, ss.tts_rate_wpm, ss.tts_timeout_s)
        except RuntimeError as exc:
            logger.warning("text to speech off: %s", exc)
            tts = None
        return cls(tts, ss.max_text_chars, ss.max_feeder_items, ss.max_feeder_bytes)

    def check_text(self, text: object, voice: object, rate: object) -> tuple[str, str | None, int | None]:
        """Validate a text request.

        Returns:
            ``(text, voice, rate)``.

        Raises:
            SpeechError: ``tts_unavailable``, ``bad_text``, ``text_too_long``, ``unknown_voice``, ``bad_parameter``.
        """
        if self.tts is None:
            raise SpeechError("tts_unavailable", "no text-to-speech engine installed (scripts/tts.sh install)")
        if not isinstance(text, str) or not text.strip():
            raise SpeechError("bad_text", "'text' must be a non-empty string")
        if len(text) > self.max_text_chars:
            raise SpeechError(
                "text_too_long",
                f"text of {len(text)} characters; at most speech_stream.max_text_chars = {self.max_text_chars}",
            )
        if voice is not None and not isinstance(voice, str):
            raise SpeechError("unknown_voice", "'voice' must be a string")
        if voice is not None:
            self.tts.check_voice(voice)  # type: ignore[attr-defined]
        low, high = TTS_RATE_RANGE_WPM
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or not low <= rate <= high):
            raise SpeechError("bad_parameter", f"'rate' must be an integer in [{low}, {high}] words per minute")
        return text, voice, rate

    def feeder(
        self, utterance: Utterance, on_error: Callable[[str, str], None], cancel: Callable[[str], object]
    ) -> SpeechFeeder:
        """A started feeder for ``utterance`` (owned by the utterance: cancelling its task closes it).

        Args:
            utterance: Where its speech goes.
            on_error: Called with ``(code, message)`` when an item fails.
            cancel: Cancels the utterance's task (the channel's ``TaskManager.cancel``).
        """
        feeder = SpeechFeeder(
            utterance,
            self.tts,
            on_error=on_error,
            cancel=cancel,
            max_items=self.max_feeder_items,
            max_bytes=self.max_feeder_bytes,
        )
        feeder.start()
        return feeder
