"""Tasks: the lifecycle of a task from acceptance to its last frame on air.

:class:`TaskManager` (one per channel) opens a task from each request's :class:`SpeechSource`
(:meth:`TaskManager.open_source`), admits and cancels tasks; a
:class:`TaskProcessor` thread per task cuts its utterance's audio into chunks and submits them; its
:class:`SpeechProgram` is the reorder and jitter buffer the mixer plays.
"""

from latentsync.serving.tasks.ports import OpenedTask, Playout, SourceContext, SpeechSource
from latentsync.serving.tasks.speech_audio import SpeechAudio, SpeechError
from latentsync.serving.tasks.speech_program import ChunkTimes, SpeechProgram
from latentsync.serving.tasks.task import FINAL_STATES, WAITING_STATES, Task, TaskKind, TaskState
from latentsync.serving.tasks.task_manager import TaskManager, TaskSettings
from latentsync.serving.tasks.task_processor import ChunkPlan, TaskProcessor
from latentsync.serving.tasks.utterance import Utterance, UtteranceLimits

__all__ = [
    "FINAL_STATES",
    "WAITING_STATES",
    "ChunkPlan",
    "ChunkTimes",
    "OpenedTask",
    "Playout",
    "SourceContext",
    "SpeechAudio",
    "SpeechError",
    "SpeechProgram",
    "SpeechSource",
    "Task",
    "TaskKind",
    "TaskManager",
    "TaskProcessor",
    "TaskSettings",
    "TaskState",
    "Utterance",
    "UtteranceLimits",
]
