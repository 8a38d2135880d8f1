"""Tasks: the lifecycle of a task from acceptance to its last frame on air.

:class:`TaskManager` (one per channel) builds, accepts, admits and cancels tasks; a
:class:`TaskProcessor` thread per task cuts its utterance's audio into chunks and submits them; its
:class:`SpeechProgram` is the reorder and jitter buffer the mixer plays.
"""

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
    "SpeechAudio",
    "SpeechError",
    "SpeechProgram",
    "Task",
    "TaskKind",
    "TaskManager",
    "TaskProcessor",
    "TaskSettings",
    "TaskState",
    "Utterance",
    "UtteranceLimits",
]
