"""An uploaded file as a source of speech: the recipe that turns a stored upload into an accepted task.

``POST /generate_video`` only stores the upload and picks this source; the recipe is here, once:
build the task (:meth:`TaskManager.build`), start the confined decoder on the file
(:class:`~latentsync.serving.ingest.upload_decoder.UploadDecoder`, attached to the utterance so
cancelling the task stops it), wait for the first chunk's audio (or a short file's end), accept the
task. Every refusal is a :class:`~latentsync.serving.tasks.speech_audio.SpeechError` with its code
and leaves nothing behind: the decoder is stopped and the task discarded before it is raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentsync.media.errors import MediaDecodeTimeout, MediaProbeError
from latentsync.serving.ingest.upload_decoder import UploadDecoder
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.task import TaskKind
from latentsync.serving.tasks.task_manager import TaskManager
from latentsync.serving.tasks.utterance import Utterance

#: The formats named in a ``not_audio`` refusal (what ``latentsync.media.probe.MEDIA_FORMATS`` accepts).
ACCEPTED_AUDIO = "WAV, MP3, FLAC, Ogg/Opus, M4A/AAC/MP4, WebM/Matroska"


@dataclass(frozen=True)
class OpenedTask:
    """A task a source opened.

    Attributes:
        utterance: Its utterance (``utterance.task`` is the task).
        position: Tasks ahead of it when it was accepted (0: next on air).
    """

    utterance: Utterance
    position: int


@dataclass(frozen=True, kw_only=True)
class UploadSource:
    """A stored upload to decode while it plays.

    Attributes:
        path: The stored upload (it may be deleted once :meth:`open` returns: FFmpeg holds its own descriptor).
        seed: Engine seed (None: the engine's default).
        guidance_scale: Engine guidance (None: the engine's default).
        max_audio_s: Longest audio accepted, in seconds (``api.max_audio_s``).
        decode_timeout_s: Seconds the first audio may take to decode (``api.decode_timeout_s``).
    """

    path: Path
    seed: int | None
    guidance_scale: float | None
    max_audio_s: float
    decode_timeout_s: float

    def open(self, tasks: TaskManager, received: tuple[float, float] | None = None) -> OpenedTask:
        """Open a task on ``tasks`` fed by this upload, once its first chunk's audio is decoded.

        Args:
            tasks: The channel's task manager.
            received: ``(time.time(), time.monotonic())`` of the request (the time to first frame counts from it).

        Returns:
            The accepted task.

        Raises:
            SpeechError: ``upload_failed`` (the stored file cannot be opened), ``decode_timeout``,
                ``not_audio``, ``too_long``, ``too_short``, or what :meth:`TaskManager.accept` raises
                (``queue_full``, ``stopping``). Nothing is left behind then.
        """
        settings = tasks.settings
        plan = settings.plan
        utterance = tasks.build(TaskKind.upload, self.seed, self.guidance_scale, received)
        decoder = UploadDecoder(self.path, utterance, settings.sample_rate_hz, self.max_audio_s, self.decode_timeout_s)
        utterance.attach(decoder)
        try:
            try:
                decoder.start()
            except OSError as exc:
                raise SpeechError("upload_failed", f"could not read the stored upload: {exc.strerror or exc}") from None
            decoder.wait_first(plan.first_frames + plan.lookahead_frames, settings.fps)
            position = tasks.accept(utterance)
        except MediaDecodeTimeout:
            tasks.discard(utterance)
            raise SpeechError(
                "decode_timeout",
                f"decoding the upload took longer than api.decode_timeout_s = "
                f"{self.decode_timeout_s:g} s; send a shorter or simpler file",
            ) from None
        except MediaProbeError:
            tasks.discard(utterance)
            raise SpeechError(
                "not_audio",
                f"the upload is not an audio file in an accepted format ({ACCEPTED_AUDIO}), or it has no audio stream",
            ) from None
        except BaseException:
            tasks.discard(utterance)
            raise
        return OpenedTask(utterance, position)
