"""An uploaded file as a source of speech (``POST /generate_video``).

The API picks this source with the request's fields and hands it to
:meth:`~latentsync.serving.tasks.task_manager.TaskManager.open_source`, which refuses early what
could not be queued, builds the task and calls :meth:`UploadSource.start`: the body is stored in a
private folder, the confined decoder
(:class:`~latentsync.serving.ingest.upload_decoder.UploadDecoder`, attached to the utterance so
cancelling the task stops it) starts on it, and the request waits for the first chunk's audio (or a
short file's end) before the task is accepted. Every refusal is a
:class:`~latentsync.serving.core.errors.ServingError` with its code and leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from latentsync.media.errors import MediaDecodeTimeout, MediaProbeError
from latentsync.serving.core.uploads import UploadBody, stored_upload
from latentsync.serving.ingest.upload_decoder import UploadDecoder
from latentsync.serving.tasks.ports import SourceContext
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.task import TaskKind
from latentsync.serving.tasks.utterance import Utterance

__all__ = ["ACCEPTED_AUDIO", "UploadSource"]

#: The formats named in a ``not_audio`` refusal (what ``latentsync.media.probe.MEDIA_FORMATS`` accepts).
ACCEPTED_AUDIO = "WAV, MP3, FLAC, Ogg/Opus, M4A/AAC/MP4, WebM/Matroska"


@dataclass(frozen=True, kw_only=True)
class UploadSource:
    """An uploaded file, decoded while it plays (``POST /generate_video``; a :class:`SpeechSource`).

    Attributes:
        body: The received upload (werkzeug's ``FileStorage``); stored by :meth:`start`, never before
            the task could be queued.
        upload_root: Where its private folder goes (``Channel.upload_root``).
        seed: Engine seed (None: the engine's default).
        guidance_scale: Engine guidance (None: the engine's default).
        max_audio_s: Longest audio accepted, in seconds (``api.max_audio_s``).
        decode_timeout_s: Seconds the first audio may take to decode (``api.decode_timeout_s``).
    """

    body: UploadBody
    upload_root: Path
    seed: int | None
    guidance_scale: float | None
    max_audio_s: float
    decode_timeout_s: float
    kind: TaskKind = field(default=TaskKind.upload, init=False)

    def start(self, utterance: Utterance, context: SourceContext) -> None:
        """Store the body, start the confined decoder on it, return once the first chunk's audio is decoded.

        The stored file is deleted before this returns: FFmpeg reads it through its own descriptor.

        Args:
            utterance: The built task's utterance (the decoder is attached to it first).
            context: The stream's audio rate and frame rate, and the frames the first chunk needs.

        Raises:
            ServingError: ``empty_file``, ``insufficient_storage``, ``upload_failed`` (the body could
                not be stored; :func:`~latentsync.serving.core.uploads.stored_upload`).
            SpeechError: ``upload_failed`` (the stored file cannot be opened), ``decode_timeout``,
                ``not_audio``, ``too_long``, ``too_short``. The decoder is stopped then (by the
                manager's discard, which closes the utterance).
        """
        with stored_upload(self.body, self.upload_root) as path:
            decoder = UploadDecoder(
                path,
                utterance,
                sample_rate_hz=context.sample_rate_hz,
                max_duration_s=self.max_audio_s,
                timeout_s=self.decode_timeout_s,
            )
            utterance.attach(decoder)
            try:
                decoder.start()
            except OSError as exc:
                raise SpeechError("upload_failed", f"could not read the stored upload: {exc.strerror or exc}") from None
            try:
                decoder.wait_first(context.first_frames, context.fps)
            except MediaDecodeTimeout:
                raise SpeechError(
                    "decode_timeout",
                    f"decoding the upload took longer than api.decode_timeout_s = "
                    f"{self.decode_timeout_s:g} s; send a shorter or simpler file",
                ) from None
            except MediaProbeError:
                raise SpeechError(
                    "not_audio",
                    f"the upload is not an audio file in an accepted format ({ACCEPTED_AUDIO}), "
                    "or it has no audio stream",
                ) from None
