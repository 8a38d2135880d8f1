"""Ingest: where speech comes from, one source per way in (an upload, a text, a PCM socket).

Each source implements :class:`~latentsync.serving.tasks.ports.SpeechSource`: the API makes one
per request and hands it to :meth:`~latentsync.serving.tasks.task_manager.TaskManager.open_source`.
What a source starts (a decoder, a feeder) pushes PCM into the task's
:class:`~latentsync.serving.tasks.utterance.Utterance` and is attached to it, so cancelling the task stops it.
"""

from latentsync.serving.ingest.speech_service import SpeechService
from latentsync.serving.ingest.speech_sources import StreamSource, TextSource
from latentsync.serving.ingest.text_to_speech import EspeakNg, SpeechFeeder, TextToSpeech
from latentsync.serving.ingest.upload_decoder import DecodeState, UploadDecoder
from latentsync.serving.ingest.upload_source import UploadSource

__all__ = [
    "DecodeState",
    "EspeakNg",
    "SpeechFeeder",
    "SpeechService",
    "StreamSource",
    "TextSource",
    "TextToSpeech",
    "UploadDecoder",
    "UploadSource",
]
