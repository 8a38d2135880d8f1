"""Streamed speech: utterances opened as tasks, their feeders, the TTS engine (docs/streaming-speech.md)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

from latentsync.serving.generation.processor import StreamTaskProcessor
from latentsync.serving.generation.program import StreamSpeechProgram
from latentsync.serving.generation.task import FINAL_STATES, Task
from latentsync.serving.generation.tts import EspeakNg, SpeechFeeder, TextToSpeech
from latentsync.serving.generation.utterance import (
    STREAM_JITTER_MARGIN_S,
    SpeechStreamError,
    StreamTaskAudio,
    Utterance,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamLimits:
    """Bounds of streamed speech (``speech_stream`` config section).

    Attributes:
        max_open: Utterances open (not ended) at once.
        max_buffered_s: Seconds of audio received and not yet played, per utterance.
        idle_timeout_s: An open utterance that receives nothing for this long is ended.
        max_duration_s: Longest utterance (``api.max_audio_s``).
        start_margin_s: Slack the jitter buffer keeps for an open utterance's next chunk, in seconds.
    """

    max_open: int = 4
    max_buffered_s: float = 30.0
    idle_timeout_s: float = 10.0
    max_duration_s: float = 300.0
    start_margin_s: float = STREAM_JITTER_MARGIN_S


class SpeechStreams:
    """Opens streamed utterances as tasks of a :class:`~latentsync.serving.tasks.TaskManager`.

    Args:
        manager: The task manager (queue, admission, cancel, ``GET /tasks``).
        limits: The bounds.
        lookahead_frames: The engine's audio look-ahead (:data:`LOOKAHEAD_FRAMES`).
    """

    def __init__(self, manager, limits: StreamLimits, lookahead_frames: int):
        self.manager = manager
        self.limits = limits
        self.lookahead_frames = lookahead_frames
        self._lock = threading.Lock()
        self._open: dict[str, Utterance] = {}

    def open_count(self) -> int:
        """Utterances still open (not ended and not final)."""
        with self._lock:
            self._open = {k: u for k, u in self._open.items() if not u.ended and u.task.state not in FINAL_STATES}
            return len(self._open)

    def open(
        self, seed: int | None = None, guidance_scale: float | None = None, received: tuple[float, float] | None = None
    ) -> Utterance:
        """Open an utterance: a task that waits for audio, queued behind the tasks already accepted.

        Raises:
            SpeechStreamError: ``too_many_streams`` (429) at ``max_open``; ``queue_full`` (429) when
                ``api.max_queued`` tasks already wait.
        """
        if self.open_count() >= self.limits.max_open:
            raise SpeechStreamError(
                "too_many_streams", f"{self.limits.max_open} utterances already open (speech_stream.max_open)", 429
            )
        m = self.manager
        task = Task(
            task_id=uuid.uuid4().hex,
            audio=None,
            num_frames=1,
            num_chunks=1,
            tail_frames=m.tail_frames,
            seed=seed,
            guidance_scale=guidance_scale,
        )
        task.audio = StreamTaskAudio(m.sample_rate_hz, self.limits.max_duration_s)  # type: ignore[assignment]
        if received is not None:
            task.received_at, task.received_monotonic = received
        utterance = Utterance(task, m.fps, self.limits.max_buffered_s, self.limits.idle_timeout_s)
        pool, avatar = m.binding()  # together: an avatar switch changes both
        program = StreamSpeechProgram(
            task,
            utterance,
            avatar,
            m.fps,
            self.lookahead_frames,
            m.tick_counter,
            m.on_ttff,
            start_margin_s=self.limits.start_margin_s,
        )
        processor = StreamTaskProcessor(
            task,
            program,
            utterance,
            pool,
            avatar,
            m.deadline_s,
            self.lookahead_frames,
            m.fps,
            due_at=lambda c: m.due_at(task, c),
        )
        if not m.accept(task, program, processor):
            raise SpeechStreamError("queue_full", "too many tasks wait (api.max_queued); retry later", 429)
        with self._lock:
            self._open[task.task_id] = utterance
        return utterance

    def get(self, task_id: str) -> Utterance | None:
        """The open utterance ``task_id``, if any."""
        with self._lock:
            return self._open.get(task_id)


#: ``rate`` of ``/speak`` and ``text`` messages, words per minute.
TTS_RATE_RANGE_WPM = (80, 450)


class SpeechService:
    """The streamed-speech side of the runtime: utterances, their feeders, the TTS engine.

    Args:
        streams: Opens utterances on the task manager.
        tts: The TTS engine, or None when none is installed (``/speak`` then answers 503).
        max_text_chars: Longest text accepted (``speech_stream.max_text_chars``).
    """

    def __init__(self, streams: SpeechStreams, tts: TextToSpeech | None, max_text_chars: int):
        self.streams = streams
        self.tts = tts
        self.max_text_chars = max_text_chars
        self._lock = threading.Lock()
        self._feeders: list[SpeechFeeder] = []
        self._closed = False

    @classmethod
    def from_config(cls, manager, config, lookahead_frames: int) -> SpeechService:
        """Build from the server config (``speech_stream`` and ``api.max_audio_s``)."""
        ss = config.speech_stream
        limits = StreamLimits(
            ss.max_open, ss.max_buffered_s, ss.idle_timeout_s, config.api.max_audio_s, ss.start_margin_s
        )
        try:
            tts: TextToSpeech | None = EspeakNg(ss.tts_voice, ss.tts_rate_wpm, ss.tts_timeout_s)
        except RuntimeError as exc:
            logger.warning("text to speech off: %s", exc)
            tts = None
        return cls(SpeechStreams(manager, limits, lookahead_frames), tts, ss.max_text_chars)

    def check_text(self, text: object, voice: object, rate: object) -> tuple[str, str | None, int | None]:
        """Validate a text request.

        Raises:
            SpeechStreamError: ``tts_unavailable`` (503), ``bad_text`` (400), ``text_too_long`` (413),
                ``unknown_voice`` (400), ``bad_parameter`` (400).
        """
        if self.tts is None:
            raise SpeechStreamError(
                "tts_unavailable", "no text-to-speech engine installed (scripts/tts.sh install)", 503
            )
        if not isinstance(text, str) or not text.strip():
            raise SpeechStreamError("bad_text", "'text' must be a non-empty string")
        if len(text) > self.max_text_chars:
            raise SpeechStreamError(
                "text_too_long",
                f"text of {len(text)} characters; at most speech_stream.max_text_chars = {self.max_text_chars}",
                413,
            )
        if voice is not None and not isinstance(voice, str):
            raise SpeechStreamError("unknown_voice", "'voice' must be a string")
        if voice is not None:
            self.tts.check_voice(voice)  # type: ignore[attr-defined]
        if rate is not None and (
            not isinstance(rate, int)
            or isinstance(rate, bool)
            or not TTS_RATE_RANGE_WPM[0] <= rate <= TTS_RATE_RANGE_WPM[1]
        ):
            raise SpeechStreamError(
                "bad_parameter", f"'rate' must be an integer in {list(TTS_RATE_RANGE_WPM)} words per minute"
            )
        return text, voice, rate

    def feeder(self, utterance, on_error) -> SpeechFeeder:
        """Start a feeder for ``utterance`` (owned here: :meth:`close` stops it)."""
        feeder = SpeechFeeder(utterance, self.tts, on_error, self.streams.manager.cancel)
        with self._lock:
            self._feeders = [f for f in self._feeders if f.alive]
            if self._closed:
                feeder.stop()
            self._feeders.append(feeder)
        return feeder

    def close(self, timeout_s: float = 3.0) -> None:
        """Stop every feeder. Idempotent."""
        with self._lock:
            self._closed = True
            feeders, self._feeders = self._feeders, []
        for f in feeders:
            f.stop()
        deadline = time.monotonic() + timeout_s
        for f in feeders:
            f.join(max(0.0, deadline - time.monotonic()))
