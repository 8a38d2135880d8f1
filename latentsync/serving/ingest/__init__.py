"""Ingest: where speech comes from (an upload's decoder, text to speech, PCM formats of a socket).

Each source pushes PCM into a task's :class:`~latentsync.serving.tasks.utterance.Utterance` and is
attached to it, so cancelling the task stops it.
"""

from latentsync.serving.ingest.speech_service import SpeechService
from latentsync.serving.ingest.text_to_speech import EspeakNg, SpeechFeeder, TextToSpeech
from latentsync.serving.ingest.upload_decoder import DecodeState, UploadDecoder

__all__ = ["DecodeState", "EspeakNg", "SpeechFeeder", "SpeechService", "TextToSpeech", "UploadDecoder"]
