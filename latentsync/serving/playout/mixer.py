"""ProgramMixer: what goes on air at each tick — idle loop, speech programs, crossfades, underruns.

State machine (docs/architecture.md): ``IDLE --program ready--> FADE_IN --n-1 frames--> SPEAKING
--program done--> FADE_OUT --n-1 frames--> IDLE``; ``SPEAKING --next program ready--> FADE_IN``
(speech→speech crossfade); any state ``--interrupt--> FADE_OUT``.

A crossfade of ``crossfade_frames`` = N frames reaches what comes in on its Nth frame: frames
1 .. N-1 blend the outgoing picture into the incoming one with weight k/N (k = 1 .. N-1), frame N
is the incoming picture alone and is reported with its state (``SPEAKING`` at the end of a fade-in,
``IDLE`` at the end of a fade-out); N = 0 and N = 1 are hard cuts. So an interrupted program is off
air (``OFF_AIR``, idle on air) on the Nth tick from the interrupt. A program's audio starts exactly
on its first frame at full level (no silence inserted, no speech delayed); the outgoing audio (idle
sound, or an interrupted program's speech) fades out with the same weights, and idle sound fades
back in on the way out. When a program's next frame is not generated yet (underrun), the last
frame is held with silence and the program does not advance, so its speech stays in sync with its
video. Everything here runs on the controller thread and never blocks.

A program that raises while its tick is made (its frame, audio or callbacks), or hands over a frame
or audio that is not the stream's, is dropped: :meth:`Program.abort` fails its task with the reason,
and the picture fades (or cuts) from the last frame on air to idle, or to the next program. The
clock goes on.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import cv2
import numpy as np

from latentsync.media.buffers import FramePool, written_into
from latentsync.serving.core.states import StateMachine
from latentsync.serving.playout.idle import IdleLoop
from latentsync.serving.playout.state import STREAM_MOVES, StreamState

logger = logging.getLogger(__name__)

#: Programs one tick may drop (each raised) before the tick gives up and lets the clock handle it.
MAX_DROPS_PER_TICK = 4


class ProgramEvent(str, enum.Enum):
    """What the mixer tells a program about its time on air (:meth:`Program.on_air`)."""

    FIRST_FRAME = "first_frame"  # its frame 0 is on air
    DONE = "done"  # its last frame was played
    INTERRUPTED = "interrupted"  # cut: its fade-out begins
    OFF_AIR = "off_air"  # the fade-out after it (finished or interrupted) has ended: idle is back


class Program(Protocol):
    """A speech segment the mixer can put on air (implemented by the task layer).

    Frames are indexed ``0 .. num_frames - 1`` on the stream's time base; the program's audio is
    mono int16 at the stream's sample rate and starts with frame 0.
    """

    task_id: str
    #: True when the frame last returned by :meth:`frame` was a gap frame (its speech starved):
    #: the mixer counts it as an underrun tick.
    in_gap: bool

    @property
    def num_frames(self) -> int:
        """Frames it plays (a huge number while its length is unknown)."""
        ...

    def ready_to_start(self) -> bool:
        """Whether the jitter buffer says playback can start now without underrunning."""
        ...

    def frame(self, index: int) -> np.ndarray | None:
        """Full ``(H, W, 3) uint8`` frame ``index`` with the generated face, or None if not ready."""
        ...

    def continuation_frame(self, index: int) -> np.ndarray:
        """``(H, W, 3) uint8`` base-video frame ``index`` without a generated face (any index >= 0)."""
        ...

    def audio(self, start_sample: int, num_samples: int) -> np.ndarray:
        """``(num_samples,) int16`` program audio from ``start_sample``; zeros past its end."""
        ...

    def is_cancelled(self) -> bool:
        """True once the task was cancelled (the mixer then skips or fades it out)."""
        ...

    def on_air(self, event: ProgramEvent, frames_streamed: int) -> None:
        """Progress callback on the controller thread (must not block); see :class:`ProgramEvent`."""
        ...

    def abort(self, reason: str) -> None:
        """The mixer dropped it: making its tick raised, or its frame or audio was not the stream's.

        Its task fails with ``reason``; the mixer never calls the program again (no ``OFF_AIR``
        follows, so the program lets go of what it holds here). Runs on the controller thread: must
        not block.
        """
        ...


class _Outgoing:
    """The picture and sound being faded away: the idle loop, or a program's continuation."""

    def __init__(
        self,
        idle: IdleLoop | None,
        program: Program | None,
        *,
        index: int,
        audio_pos: int,
        fade_audio: bool,
        still: np.ndarray | None = None,
    ):
        self.idle = idle
        self.program = program
        self.still = still  # a frame held in silence (what was on air when its program failed)
        self.index = index
        self.audio_pos = audio_pos
        self.fade_audio = fade_audio  # an interrupted program's speech fades out; a finished one is silent

    def next(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        if self.idle is not None:
            return self.idle.next(num_samples)
        if self.still is not None:
            return self.still, np.zeros(num_samples, dtype=np.int16)
        assert self.program is not None
        frame = self.program.continuation_frame(self.index)
        audio = (
            self.program.audio(self.audio_pos, num_samples)
            if self.fade_audio
            else np.zeros(num_samples, dtype=np.int16)
        )
        self.index += 1
        self.audio_pos += num_samples
        return frame, audio


def _blend(a: np.ndarray, b: np.ndarray, alpha: float, out: np.ndarray) -> np.ndarray:
    """``(1 - alpha) * a + alpha * b`` for ``(H, W, 3) uint8`` frames, written into ``out``."""
    return written_into(cv2.addWeighted(a, 1.0 - alpha, b, alpha, 0.0, dst=out), out)


def _mix(a: np.ndarray, gain_a: float, b: np.ndarray, gain_b: float) -> np.ndarray:
    mixed = a.astype(np.float32) * gain_a + b.astype(np.float32) * gain_b
    return np.clip(np.rint(mixed), -32768, 32767).astype(np.int16)


class ProgramMixer:
    """Decides each tick's frame and audio.

    Used only by the controller thread, except :meth:`enqueue` and :meth:`interrupt`, which any
    thread may call.

    Args:
        idle: The idle loop.
        crossfade_frames: Length of every crossfade, in frames: its last one shows what comes in
            alone, the ``crossfade_frames - 1`` before it are blends (0 or 1: hard cuts).
        max_programs: Capacity of the playlist (programs waiting to go on air; the channel derives
            it from ``api.max_queued``).
    """

    def __init__(self, idle: IdleLoop, crossfade_frames: int, max_programs: int = 64):
        self._idle = idle
        self._crossfade = int(crossfade_frames)
        self._playlist: collections.deque[Program] = collections.deque()
        self._max_programs = int(max_programs)
        self._blends: FramePool | None = None  # one crossfade's frames, reused once off air (clock thread only)
        self._lock = threading.Lock()
        self._interrupts: set[str] = set()
        self._current: Program | None = None
        self._pos = 0  # next frame index of the current program
        self._audio_pos = 0  # next sample of the current program's audio
        self._outgoing: _Outgoing | None = None
        self._fade_step = 0  # blended frames of the running crossfade already emitted
        self._last_frame: np.ndarray | None = None
        self._tick_task_id: str | None = None
        self._culprit: Program | None = None  # the program being asked for this tick's content
        self._machine = StateMachine(StreamState.IDLE, STREAM_MOVES, "mixer")
        self._next_idle: tuple[IdleLoop, Callable[[], None] | None] | None = (
            None  # (loop, callback) waiting for an idle moment
        )
        self.idle_switches = 0
        self.ticks = 0  # ticks produced (one per emitted or dropped frame)
        self.underrun_ticks = 0
        self.programs_finished = 0
        self.programs_interrupted = 0
        self.programs_failed = 0  # dropped: making their tick raised (Program.abort)

    @property
    def state(self) -> StreamState:
        """What the last tick put on air."""
        return self._machine.state

    def _set_state(self, state: StreamState) -> None:
        if state is not self._machine.state:
            self._machine.move(state)

    @property
    def current_task_id(self) -> str | None:
        """Task id of the program on air, if any."""
        current = self._current
        return current.task_id if current is not None else None

    @property
    def tick_task_id(self) -> str | None:
        """Task id of the program in the last tick produced (its speech, or its fade-out); None for idle.

        Unlike :attr:`current_task_id`, this stays the program's on its last frame, when the program
        already finished.
        """
        return self._tick_task_id

    def pending(self) -> int:
        """Programs waiting in the playlist."""
        return len(self._playlist)

    def enqueue(self, program: Program) -> bool:
        """Append a program to the playlist (played in order). Returns False when the playlist is full."""
        with self._lock:
            if len(self._playlist) >= self._max_programs:
                return False
            self._playlist.append(program)
            return True

    def switch_idle(self, idle: IdleLoop, on_switched=None) -> None:
        """Crossfade to another idle loop (a new avatar) at the next idle moment, never mid-speech.

        The switch happens on the first tick with no program on air and no fade running: the old
        loop fades into the new one over ``crossfade_frames`` like a fade back to idle. If a
        program starts first (the caller queued it after asking for the switch, so it shows the
        new avatar), the switch happens as it starts: it fades in from what is on air, and fades
        out into the new loop. A later call replaces a switch still waiting. Any thread may call this.

        Args:
            idle: The new idle loop, frames of the stream's size.
            on_switched: Called with no arguments on the controller thread when the crossfade
                begins (must not block), or None.
        """
        with self._lock:
            self._next_idle = (idle, on_switched)

    @property
    def idle_switch_pending(self) -> bool:
        """True while a :meth:`switch_idle` waits for its idle moment."""
        return self._next_idle is not None

    def interrupt(self, task_id: str) -> None:
        """Fade program ``task_id`` out within ``crossfade_frames`` if on air, or drop it from the playlist.

        Interrupts overtake everything queued: one is applied at the very next tick.
        """
        with self._lock:
            self._interrupts.add(task_id)

    # ----------------------------------------------------------------- per tick
    def next(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Produce one tick.

        Args:
            num_samples: Audio samples this tick carries.

        Returns:
            ``(H, W, 3) uint8`` frame and ``(num_samples,) int16`` audio.
        """
        self.ticks += 1
        for _ in range(MAX_DROPS_PER_TICK):
            try:
                frame, audio = self._tick(num_samples)
            except Exception as exc:
                culprit, self._culprit = self._culprit, None
                if culprit is None:
                    raise  # not a program's fault (the idle loop): the clock's guard handles it
                self._drop_failed(culprit, exc)
                continue
            self._culprit = None
            self._last_frame = frame
            return frame, audio
        raise RuntimeError(f"{MAX_DROPS_PER_TICK} programs failed in one tick")

    def _tick(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        self._apply_interrupts()
        if self._next_idle is not None and self._current is None and self._outgoing is None:
            self._switch_idle_now()
        if self._current is None:
            self._start_next_program()
        return self._play(num_samples)

    def _play(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """This tick's frame and audio from what is on air: a crossfade's next frame, speech, or idle."""
        if self._outgoing is not None and self._fade_step + 1 >= self._crossfade:
            # the crossfade's last frame (or a cut): what comes in, alone; what went out is off air now
            self._end_fade_out(self._outgoing)
        if self._current is not None:  # fading in while something still goes out, else speaking
            self._set_state(StreamState.FADE_IN if self._outgoing is not None else StreamState.SPEAKING)
            self._tick_task_id = self._current.task_id
            return self._speech_tick(num_samples)
        if self._outgoing is not None:
            self._set_state(StreamState.FADE_OUT)
            program = self._outgoing.program
            self._tick_task_id = program.task_id if program is not None else None
            return self._fade_out_tick(num_samples)
        self._tick_task_id = None
        self._set_state(StreamState.IDLE)
        return self._idle.next(num_samples)

    def _drop_failed(self, program: Program, exc: Exception) -> None:
        """``program`` raised making this tick: take it out of the playlist and off air, fail its task."""
        reason = f"playout of task {program.task_id} failed: {type(exc).__name__}: {exc}"
        logger.error("%s", reason, exc_info=exc, extra={"task_id": program.task_id})
        self.programs_failed += 1
        with self._lock:
            self._playlist = collections.deque(p for p in self._playlist if p is not program)
        outgoing = self._outgoing
        if self._current is program:
            self._current = None
            if outgoing is not None and outgoing.program is not None and outgoing.program is not program:
                try:  # what it was fading in from is gone with it
                    self._end_fade_out(outgoing)
                except Exception:
                    logger.exception("task %s: its off-air callback failed", outgoing.program.task_id)
                self._culprit = None
            # the picture fades from the last frame on air (before any: the idle loop's first) to idle
            still = self._last_frame if self._last_frame is not None else self._idle.frames[0]
            self._outgoing = _Outgoing(None, None, index=0, audio_pos=0, fade_audio=False, still=still)
            self._fade_step = 0
        elif outgoing is not None and outgoing.program is program:
            if self._current is not None:  # the program fading in cuts in
                self._outgoing = None
            else:
                self._outgoing = (
                    _Outgoing(None, None, index=0, audio_pos=0, fade_audio=False, still=self._last_frame)
                    if self._last_frame is not None
                    else None
                )
        try:
            program.abort(reason)
        except Exception:
            logger.exception("aborting task %s failed", program.task_id, extra={"task_id": program.task_id})

    def _checked(self, frame: np.ndarray, audio: np.ndarray | None, num_samples: int) -> None:
        """Raise when a program's frame or audio is not the stream's (its shape, its dtype)."""
        like = self._idle.frames.shape[1:]
        if not isinstance(frame, np.ndarray) or frame.shape != like or frame.dtype != np.uint8:
            what = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"frame is {what}, the stream's are {like} uint8")
        if audio is not None and (
            not isinstance(audio, np.ndarray) or audio.shape != (num_samples,) or audio.dtype != np.int16
        ):
            what = f"{audio.shape} {audio.dtype}" if isinstance(audio, np.ndarray) else type(audio).__name__
            raise ValueError(f"audio is {what}, expected ({num_samples},) int16")

    def _switch_idle_now(self) -> None:
        with self._lock:
            pending, self._next_idle = self._next_idle, None
        if pending is None:
            return
        idle, on_switched = pending
        if self._outgoing is None:  # the old loop fades into the new one
            self._outgoing = _Outgoing(self._idle, None, index=0, audio_pos=0, fade_audio=True)
            self._fade_step = 0
        self._idle = idle
        self.idle_switches += 1
        if on_switched is not None:
            on_switched()

    def _apply_interrupts(self) -> None:
        with self._lock:
            if not self._interrupts:
                return
            ids, self._interrupts = self._interrupts, set()
            self._playlist = collections.deque(p for p in self._playlist if p.task_id not in ids)
        current = self._current
        if current is not None and current.task_id in ids:
            self._culprit = current
            current.on_air(ProgramEvent.INTERRUPTED, self._pos)
            self.programs_interrupted += 1
            if self._outgoing is not None:  # interrupted mid crossfade: what it faded from is gone too
                self._end_fade_out(self._outgoing)
            self._outgoing = _Outgoing(None, current, index=self._pos, audio_pos=self._audio_pos, fade_audio=True)
            self._fade_step = 0
            self._current = None

    def _start_next_program(self) -> None:
        with self._lock:
            while self._playlist:
                self._culprit = self._playlist[0]
                if not self._playlist[0].is_cancelled():
                    break
                self._playlist.popleft()
            if not self._playlist or not self._playlist[0].ready_to_start():
                self._culprit = None
                return
            program = self._playlist.popleft()
            self._culprit = None
        if self._next_idle is not None:  # a new avatar's program: its idle loop comes with it
            self._switch_idle_now()
        if self._outgoing is None:
            self._outgoing = _Outgoing(self._idle, None, index=0, audio_pos=0, fade_audio=True)
        self._current = program
        self._pos = 0
        self._audio_pos = 0
        self._fade_step = 0

    def _speech_tick(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        program = self._current
        assert program is not None
        self._culprit = program
        frame = program.frame(self._pos)
        if frame is None and program.is_cancelled():  # generation failed for good: fade out now
            with self._lock:
                self._interrupts.add(program.task_id)
            self._apply_interrupts()
            return self._play(num_samples)
        if getattr(program, "in_gap", False):  # the program filled a starved tick with a gap frame
            self.underrun_ticks += 1
        if frame is None:  # underrun: hold the picture, silence, do not advance the program
            self.underrun_ticks += 1
            held = self._last_frame if self._last_frame is not None else program.continuation_frame(self._pos)
            self._checked(held, None, num_samples)
            return held, np.zeros(num_samples, dtype=np.int16)
        audio = program.audio(self._audio_pos, num_samples)
        self._checked(frame, audio, num_samples)
        if self._pos == 0:
            program.on_air(ProgramEvent.FIRST_FRAME, 0)
        if self._outgoing is not None:  # fading in
            alpha = self._fade_alpha()
            self._culprit = self._outgoing.program
            out_frame, out_audio = self._outgoing.next(num_samples)
            self._checked(out_frame, out_audio, num_samples)
            self._culprit = program
            frame = _blend(out_frame, frame, alpha, self._blend_buffer(frame))
            audio = _mix(audio, 1.0, out_audio, 1.0 - alpha)
        self._pos += 1
        self._audio_pos += num_samples
        if self._pos >= program.num_frames:
            program.on_air(ProgramEvent.DONE, self._pos)
            self.programs_finished += 1
            if self._outgoing is not None:  # done before its fade-in ended: what it came from is off air
                self._end_fade_out(self._outgoing)
            self._current = None
            self._outgoing = _Outgoing(None, program, index=self._pos, audio_pos=self._audio_pos, fade_audio=False)
            self._fade_step = 0
        return frame, audio

    def _fade_out_tick(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        outgoing = self._outgoing
        assert outgoing is not None
        self._culprit = outgoing.program
        out_frame, out_audio = outgoing.next(num_samples)
        self._checked(out_frame, out_audio, num_samples)
        self._culprit = None
        idle_frame, idle_audio = self._idle.next(num_samples)
        alpha = self._fade_alpha()
        frame = _blend(out_frame, idle_frame, alpha, self._blend_buffer(idle_frame))
        audio = _mix(out_audio, 1.0 - alpha, idle_audio, alpha)
        return frame, audio

    def _fade_alpha(self) -> float:
        """Count one blended frame of the running crossfade: the incoming picture's weight in it.

        ``k / crossfade_frames`` for its ``k``-th frame, ``k = 1 .. crossfade_frames - 1``; the
        last frame is no blend (:meth:`_play` ends the fade there).
        """
        self._fade_step += 1
        return self._fade_step / self._crossfade

    def _blend_buffer(self, like: np.ndarray) -> np.ndarray:
        """A recycled buffer shaped like ``like`` for one crossfade frame (:class:`FramePool`)."""
        pool = self._blends
        if pool is None or pool.shape != like.shape:
            pool = self._blends = FramePool(like.shape, like.dtype)
        return pool.take()

    def _end_fade_out(self, outgoing: _Outgoing) -> None:
        self._outgoing = None
        self._blends = None  # the fade is over: its buffers go once the writers let go of them
        if outgoing.program is not None:  # the program is now off air (finished or interrupted)
            culprit, self._culprit = self._culprit, outgoing.program
            outgoing.program.on_air(ProgramEvent.OFF_AIR, outgoing.index)
            self._culprit = culprit
