"""A task: one utterance from acceptance to its last frame on air; its states and the moves between them.

Every input is a task of the same kind: an upload (decoded as it plays), ``POST /speak`` (text to
speech) and ``/ws/speech`` (PCM from a socket) differ only in what feeds their utterance
(:class:`TaskKind`). A task's state changes only through :meth:`Task.transition`, along
:data:`ALLOWED_MOVES` (:class:`~latentsync.serving.core.states.StateMachine`, the style every state
machine of the server follows).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from latentsync.engines import CHUNK_FRAMES
from latentsync.serving.core.states import StateMachine, check_table

if TYPE_CHECKING:
    from latentsync.serving.tasks.speech_audio import SpeechAudio


class TaskState(str, enum.Enum):
    """Lifecycle of a task."""

    queued = "queued"
    preparing = "preparing"
    generating = "generating"
    streaming = "streaming"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


#: The task lifecycle: the moves :meth:`Task.transition` makes; final states have none.
ALLOWED_MOVES: dict[TaskState, frozenset[TaskState]] = {
    TaskState.queued: frozenset({TaskState.preparing, TaskState.failed, TaskState.cancelled}),
    TaskState.preparing: frozenset({TaskState.generating, TaskState.failed, TaskState.cancelled}),
    TaskState.generating: frozenset({TaskState.streaming, TaskState.failed, TaskState.cancelled}),
    TaskState.streaming: frozenset({TaskState.done, TaskState.failed, TaskState.cancelled}),
    TaskState.done: frozenset(),
    TaskState.failed: frozenset(),
    TaskState.cancelled: frozenset(),
}
check_table(TaskState, ALLOWED_MOVES)
FINAL_STATES = tuple(s for s, moves in ALLOWED_MOVES.items() if not moves)
WAITING_STATES = (TaskState.queued, TaskState.preparing, TaskState.generating)


class TaskKind(str, enum.Enum):
    """What feeds a task's utterance (``GET /tasks`` shows it as ``source``)."""

    upload = "upload"  # POST /generate_video: the file decoded by a confined FFmpeg as it plays
    speak = "speak"  # POST /speak: text synthesised sentence by sentence
    stream = "stream"  # /ws/speech: PCM (and text) from a socket


@dataclass(kw_only=True)
class Task:
    """One utterance's state as the API reports it (times are ``time.time()`` seconds).

    ``num_frames`` frames carry the speech (known once the utterance ended; until then the frames
    received so far); ``tail_frames`` more are generated from silence (mouth closing) for the
    crossfade back to idle, so the avatar never mouths words after the speech.

    Attributes:
        task_id: 32 hex digits (uuid4), unique over the server (every channel).
        kind: What feeds it.
        audio: Its speech as it arrives (:class:`~latentsync.serving.tasks.speech_audio.SpeechAudio`);
            None once released (the fade-out played it, or it never reached the air).
        first_frame_tick: The channel's tick count (``ProgramMixer.ticks``) when its frame 0 was on air.
        last_frame_tick: The tick count when its last speech frame was on air (the next program
            starts at ``last_frame_tick + 1`` when nothing idle is played between).
    """

    task_id: str
    kind: TaskKind = TaskKind.upload
    audio: SpeechAudio | None = None
    num_frames: int = 0
    tail_frames: int = 0
    seed: int | None = None
    guidance_scale: float | None = None
    chunks_planned: int = 0
    frames_planned: int = 0
    chunks_generated: int = 0
    frames_streamed: int = 0
    received_at: float = field(default_factory=time.time)
    received_monotonic: float = field(default_factory=time.monotonic)
    first_frame_on_air_at: float | None = None
    first_frame_on_air_monotonic: float | None = None
    finished_at: float | None = None
    first_frame_tick: int | None = None
    last_frame_tick: int | None = None
    cancel_requested_tick: int | None = None
    off_air_tick: int | None = None
    audio_duration_s: float = 0.0
    ended: bool = False
    #: Called with the task, outside its lock, once it reaches a final state (the scheduler's hook).
    on_final: Callable[[Task], None] | None = field(default=None, repr=False, compare=False)
    _machine: StateMachine[TaskState] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._machine = StateMachine(TaskState.queued, ALLOWED_MOVES, f"task {self.task_id}", self._changed)

    @property
    def state(self) -> TaskState:
        """The current state."""
        return self._machine.state

    @property
    def history(self) -> list[TaskState]:
        """States this task went through, in order (at most 5: queued ... final)."""
        return self._machine.history

    @property
    def error(self) -> str | None:
        """Why it failed or was cancelled (None otherwise)."""
        return self._machine.reason

    def transition(self, to: TaskState, reason: str | None = None) -> TaskState | None:
        """Move to state ``to`` if :data:`ALLOWED_MOVES` allows it; the only writer of ``state``.

        Several threads race to end a task (API cancel, the TaskProcessor failing, the mixer
        finishing it): the first move to a final state wins, later ones are refused.

        Args:
            to: The new state.
            reason: Stored as ``error`` when the move is made (why it failed or was cancelled).

        Returns:
            The state moved from, or None when the move was refused (already final, or not in the table).
        """
        return self._machine.move(to, reason)

    def _changed(self, _previous: TaskState, to: TaskState, _reason: str | None) -> None:
        if to in FINAL_STATES:
            self.finished_at = time.time()
            if self.on_final is not None:
                self.on_final(self)

    def release_audio(self) -> None:
        """Drop the audio once it can no longer play (finished tasks stay listed, cheaply)."""
        self.audio = None

    @property
    def chunks_total(self) -> int:
        """Chunks planned so far plus the 16-frame chunks the rest of the known frames need (exact once all planned)."""
        rest = max(0, self.num_frames + self.tail_frames - self.frames_planned)
        return self.chunks_planned + -(-rest // CHUNK_FRAMES)

    def to_json(self) -> dict:
        """The ``GET /tasks/<id>`` body."""
        return {
            "task_id": self.task_id,
            "status": self.state.value,
            "source": self.kind.value,
            "audio_duration_s": round(self.audio_duration_s, 3),
            "audio_complete": self.ended,
            "frames_total": self.num_frames,
            "frames_streamed": self.frames_streamed,
            "chunks_total": self.chunks_total,
            "chunks_generated": self.chunks_generated,
            "error": self.error,
            "received_at": self.received_at,
            "first_frame_on_air_at": self.first_frame_on_air_at,
            "finished_at": self.finished_at,
            "first_frame_tick": self.first_frame_tick,
            "last_frame_tick": self.last_frame_tick,
            "interrupt_latency_frames": (
                self.off_air_tick - self.cancel_requested_tick
                if self.off_air_tick is not None and self.cancel_requested_tick is not None
                else None
            ),
            "time_to_first_frame_s": (
                round(self.first_frame_on_air_monotonic - self.received_monotonic, 3)
                if self.first_frame_on_air_monotonic is not None
                else None
            ),
        }
