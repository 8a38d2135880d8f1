"""The sources of ``POST /speak`` (a text) and ``/ws/speech`` (PCM and texts pushed while spoken).

Each reads its request's fields, with their checks, when it is made, and is then handed to
:meth:`~latentsync.serving.tasks.task_manager.TaskManager.open_source` like an upload's
:class:`~latentsync.serving.ingest.upload_source.UploadSource`: the API only picks a source. Both
feed their task through a :class:`~latentsync.serving.ingest.text_to_speech.SpeechFeeder` made by
the runtime's :class:`~latentsync.serving.ingest.speech_service.SpeechService` (docs/streaming-speech.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from latentsync.serving.ingest.speech_service import SpeechService, seed_field
from latentsync.serving.ingest.text_to_speech import SpeechFeeder
from latentsync.serving.tasks.ports import SourceContext
from latentsync.serving.tasks.speech_audio import PcmFormat, SpeechError
from latentsync.serving.tasks.task import TaskKind
from latentsync.serving.tasks.utterance import Utterance

__all__ = ["StreamSource", "TextSource"]

logger = logging.getLogger(__name__)

#: ``(code, message)`` of an item its feeder could not speak (a text TTS failed on, a full buffer).
OnError = Callable[[str, str], None]


@dataclass(frozen=True, kw_only=True)
class TextSource:
    """A text, synthesised sentence by sentence while it plays (``POST /speak``).

    Attributes:
        service: The text-to-speech service.
        text: What to say.
        voice: TTS voice (None: the default).
        rate: Words per minute (None: the default).
        seed: Engine seed (None: the engine's default).

    A sentence that fails (``tts_failed``) is logged with the task's id; nobody waits on the request.
    """

    service: SpeechService
    text: str
    voice: str | None
    rate: int | None
    seed: int | None
    kind: TaskKind = field(default=TaskKind.speak, init=False)
    guidance_scale: float | None = field(default=None, init=False)

    @classmethod
    def from_request(cls, service: SpeechService, body: Any) -> TextSource:
        """The source of a ``/speak`` JSON body (``text``, optional ``voice``, ``rate``, ``seed``).

        Raises:
            SpeechError: ``bad_json`` (not an object), ``tts_unavailable``, ``bad_text``,
                ``text_too_long``, ``unknown_voice``, ``bad_parameter``.
        """
        if not isinstance(body, dict):
            raise SpeechError("bad_json", "the body must be a JSON object with 'text'")
        text, voice, rate = service.check_text(body.get("text"), body.get("voice"), body.get("rate"))
        return cls(service=service, text=text, voice=voice, rate=rate, seed=seed_field(body))

    def start(self, utterance: Utterance, context: SourceContext) -> None:
        """Queue the text on a new feeder of ``utterance`` and end it there (synthesis runs on the feeder's thread)."""
        task_id = utterance.task_id

        def on_error(code: str, message: str) -> None:
            logger.warning("speak %s: %s: %s", task_id, code, message, extra={"task_id": task_id})

        feeder = self.service.feeder(utterance, on_error, context.cancel)
        feeder.push_text(self.text, self.voice, self.rate)
        feeder.end()


class StreamSource:
    """Speech pushed over a socket while it is spoken (``/ws/speech``): PCM blocks and texts, in order.

    Args:
        service: The text-to-speech service (its feeder; texts of the stream).
        fmt: The PCM format the ``start`` message announced.
        seed: Engine seed (None: the engine's default).
        on_error: Told ``(code, message)`` of an item its feeder could not take (the feeder thread calls it).

    Attributes:
        feeder: Where the socket pushes the utterance's PCM, texts and end; None until :meth:`start`.
    """

    kind = TaskKind.stream
    guidance_scale: float | None = None

    def __init__(self, service: SpeechService, *, fmt: PcmFormat, seed: int | None, on_error: OnError):
        self.service = service
        self.fmt = fmt
        self.seed = seed
        self._on_error = on_error
        self.feeder: SpeechFeeder | None = None

    @classmethod
    def from_message(cls, service: SpeechService, msg: dict[str, Any], on_error: OnError) -> StreamSource:
        """The source a ``start`` message opens (``sample_rate``, optional ``channels``, ``encoding``, ``seed``).

        Raises:
            SpeechError: ``bad_sample_rate``, ``bad_channels``, ``bad_encoding``, ``bad_parameter``.
        """
        fmt = PcmFormat(msg.get("sample_rate"), msg.get("channels", 1), msg.get("encoding", "s16le"))  # type: ignore[arg-type]
        return cls(service, fmt=fmt, seed=seed_field(msg), on_error=on_error)

    def start(self, utterance: Utterance, context: SourceContext) -> None:
        """Give ``utterance`` its feeder (:attr:`feeder`); the socket feeds it from now on."""
        self.feeder = self.service.feeder(utterance, self._on_error, context.cancel)
