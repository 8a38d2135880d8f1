"""An upload decoded while it plays: a confined FFmpeg whose PCM is pushed into the task's utterance as it comes.

``POST /generate_video`` no longer waits for the whole file: :class:`UploadDecoder` starts FFmpeg on
the upload (confined exactly as before: descriptor only, demuxer whitelist, empty environment;
docs/security.md), reads its output as it is written and pushes it into the utterance, so the
upload's first chunk is generated as soon as its audio plus the engine's look-ahead is decoded and
the rest follows while it plays. The request waits only for that first audio (or the end of a short
file) to answer: a file FFmpeg cannot read, one with no audio, one shorter than a frame or one
longer than ``api.max_audio_s`` (when its header says so, the decode shows it) is refused before
any task exists.

Decoding runs at most :data:`READ_AHEAD_S` ahead of playback: past that the reader stops reading
and FFmpeg waits on the full pipe. A waiting upload therefore holds a few seconds of decoded
audio, not all of it, and the decode of a long file never competes with the first chunk's
generation for the CPU.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from latentsync.media.audio import untrusted_audio_command
from latentsync.media.errors import MediaDecodeTimeout
from latentsync.media.probe import DURATION_RE, MEDIA_FORMATS, MediaProbeError, parse_duration_s
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.task import FINAL_STATES
from latentsync.serving.tasks.utterance import Utterance

logger = logging.getLogger(__name__)

#: Bytes read from FFmpeg's output at most per push (0.68 s of 48 kHz mono s16; a read returns what is there).
READ_BYTES = 1 << 16
#: Seconds of decoded audio not yet played past which the reader waits (the features of a chunk
#: see 5 s past it: ``chunking.FEATURE_FUTURE_FRAMES``).
READ_AHEAD_S = 8.0
#: Seconds between the reader's checks of the playback position while it waits.
PACE_POLL_S = 0.1
#: Last lines of FFmpeg's log kept for our own log (never sent to a client).
STDERR_TAIL_LINES = 20
#: Seconds :meth:`UploadDecoder.close` waits for FFmpeg and the reader threads.
CLOSE_TIMEOUT_S = 2.0


class DecodeState(str, enum.Enum):
    """Where a decoder is."""

    idle = "idle"
    decoding = "decoding"
    finished = "finished"  # FFmpeg exited; everything it wrote was pushed (the utterance ended)
    failed = "failed"  # FFmpeg could not read it, or the decode was stopped (timeout, too long, closed)


class UploadDecoder:
    """Decodes one upload with a confined FFmpeg and pushes its PCM into an utterance as it comes.

    Threads (owned; :meth:`close` stops them): one reads FFmpeg's output and pushes it (at most
    :data:`READ_AHEAD_S` ahead of playback), one keeps the header line (``Duration``) and the end
    of FFmpeg's log. At the end of the file the utterance ends; a decode that fails after audio
    was pushed fails the utterance with the reason.

    Args:
        path: The upload (a regular file alone in its private folder; a symlink is refused).
        utterance: Where the PCM goes (its audio at the stream rate; 16 kHz made by the utterance).
        sample_rate_hz: Rate FFmpeg decodes to, in Hz (the stream's).
        max_duration_s: Longest audio accepted in seconds (``api.max_audio_s``): FFmpeg stops just
            past it and the utterance refuses more (``too_long``).
        timeout_s: Seconds FFmpeg gets to produce the first audio (until :meth:`wait_first`
            returns), and later each time the reader waits on it (``api.decode_timeout_s``);
            FFmpeg is killed past it (``decode_timeout``).
        read_ahead_s: Seconds of audio decoded ahead of playback at most.
    """

    def __init__(
        self,
        path: Path,
        utterance: Utterance,
        *,
        sample_rate_hz: int,
        max_duration_s: float,
        timeout_s: float,
        read_ahead_s: float = READ_AHEAD_S,
    ):
        self.path = Path(path)
        self.utterance = utterance
        self.sample_rate_hz = int(sample_rate_hz)
        self.max_duration_s = float(max_duration_s)
        self.timeout_s = float(timeout_s)
        self.read_ahead_s = float(read_ahead_s)
        self.state = DecodeState.idle
        self.error: str | None = None  # why it failed (for our log and the task's error; not FFmpeg's text)
        self.header_duration_s: float | None = None  # what the container says, when it says
        self.samples = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._header_done = False
        self._stderr_tail: list[str] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._timed_out = False
        self._unpaced = False  # decode without waiting for playback (to check a header's claimed length)
        self._started_monotonic = 0.0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start FFmpeg on the upload and the reader threads. Safe to call twice.

        The upload may be deleted once this returns: FFmpeg reads it through its own descriptor.

        Raises:
            OSError: If the upload cannot be opened (missing, a symlink).
        """
        with self._cond:
            if self._proc is not None or self._closed:
                return
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                cmd = untrusted_audio_command(fd, self.sample_rate_hz, self.max_duration_s + 0.5, MEDIA_FORMATS)
                self._proc = subprocess.Popen(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    env={},
                    cwd=self.path.parent,
                    pass_fds=(fd,),
                )
            finally:
                os.close(fd)
            self.state = DecodeState.decoding
            self._started_monotonic = time.monotonic()
            name = self.utterance.task_id[:8]
            self._threads = [
                threading.Thread(target=self._read, name=f"decode-{name}", daemon=True),
                threading.Thread(target=self._read_log, name=f"decode-log-{name}", daemon=True),
            ]
        for thread in self._threads:
            thread.start()

    def _time_out(self) -> None:
        """FFmpeg took longer than ``timeout_s``: it is killed (the reader finishes with ``decode_timeout``)."""
        with self._cond:
            if self.state is not DecodeState.decoding:
                return
            self._timed_out = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self) -> None:
        """Stop decoding (FFmpeg killed if still running) and wait for the threads. Safe to call twice."""
        with self._cond:
            self._closed = True
            proc = self._proc
            self._cond.notify_all()
        if proc is not None and proc.poll() is None:
            proc.kill()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(CLOSE_TIMEOUT_S)
        if proc is not None:
            try:
                proc.wait(CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.error("decoder FFmpeg %d did not exit", proc.pid)
            _close_pipes(proc)  # the readers closed theirs; here in case one never ran

    # ----------------------------------------------------------------- the request's wait
    def wait_first(self, frames: int, fps: int) -> None:
        """Block until ``frames`` frames at ``fps`` are decoded (and FFmpeg's header read), or decoding ended.

        What is refused here leaves nothing behind: FFmpeg is stopped before this raises.

        Raises:
            latentsync.media.audio.MediaDecodeTimeout: If that took longer than ``timeout_s``.
            latentsync.media.MediaProbeError: If FFmpeg found no decodable audio in an allowed
                format (:data:`~latentsync.media.probe.MEDIA_FORMATS`), or decoded no sample.
            SpeechError: ``too_long`` if more than ``max_duration_s`` was decoded (when the
                container's header says the audio is longer than that, this waits for the decode
                to pass it or end: a header may lie); ``too_short`` if it ended under one frame.
        """
        need = int(np.ceil(frames * self.sample_rate_hz / fps))
        deadline = self._started_monotonic + self.timeout_s
        late = False
        with self._cond:
            while self.state is DecodeState.decoding:
                if self._header_done and self.samples >= need:
                    claims_too_long = (
                        self.header_duration_s is not None and self.header_duration_s > self.max_duration_s
                    )
                    if not claims_too_long or self.samples > self.max_samples:
                        break
                    self._unpaced = True  # a header claiming too much may lie (a WAV's data size): decode to know
                    self._cond.notify_all()
                left = deadline - time.monotonic()
                if left <= 0:
                    late = True
                    break
                self._cond.wait(min(left, 0.1))
            state, samples = self.state, self.samples
        if late:
            self._time_out()
        try:
            if late or self._timed_out:
                raise MediaDecodeTimeout(f"{self.path.name}: decoding took longer than {self.timeout_s:g} s")
            if samples > self.max_samples:
                raise SpeechError("too_long", f"audio longer than api.max_audio_s = {self.max_duration_s:g} s")
            if samples == 0 or state is DecodeState.failed:
                raise MediaProbeError(f"{self.path.name}: {self.error or 'no audio samples decoded'}")
            if state is DecodeState.finished and samples * fps < self.sample_rate_hz:
                raise SpeechError(
                    "too_short", f"audio shorter than one frame (1/{fps} s): {samples / self.sample_rate_hz:.4f} s"
                )
        except Exception:
            self.close()
            raise

    @property
    def max_samples(self) -> int:
        """Samples of ``max_duration_s`` at the decoding rate."""
        return int(self.max_duration_s * self.sample_rate_hz)

    # ----------------------------------------------------------------- threads
    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        pending = b""
        failure: str | None = None
        try:
            while True:
                if not self._pace():
                    break  # closed, or the utterance can take no more
                ready, _, _ = select.select([fd], [], [], self.timeout_s)
                if not ready:  # FFmpeg produced nothing for timeout_s while we waited on it
                    self._time_out()
                    continue  # killed: the next read sees the end
                data = os.read(fd, READ_BYTES)
                if not data:
                    break
                pending += data
                whole = len(pending) // 2 * 2
                block, pending = pending[:whole], pending[whole:]
                if not block:
                    continue
                mono = np.frombuffer(block, dtype="<i2").astype(np.float32) / 32768.0
                try:
                    self.utterance.push(mono, self.sample_rate_hz)
                except SpeechError as exc:
                    failure = f"{exc.code}: {exc.message}"
                    proc.kill()
                    break
                with self._cond:
                    self.samples += mono.shape[0]
                    self._cond.notify_all()
        except OSError as exc:
            failure = f"reading the decoder failed: {exc}"
        finally:
            try:
                code = proc.wait(CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(CLOSE_TIMEOUT_S)
            # The pipe's descriptor goes now: the finished task keeps this decoder (and its Popen)
            # for GET /tasks, and an open pipe held there was two descriptors a task, forever.
            proc.stdout.close()
            self._finish(code, failure)

    def _pace(self) -> bool:
        """Wait while :data:`READ_AHEAD_S` of audio waits to play; False once closed or the utterance is over."""
        u = self.utterance
        while True:
            with self._cond:
                if self._closed:
                    return False
                if self._unpaced:
                    return True
            if u.ended or u.task.state in FINAL_STATES:
                return False
            if u.buffered_s() < self.read_ahead_s:
                return True
            with self._cond:
                self._cond.wait(PACE_POLL_S)

    def _finish(self, code: int, failure: str | None) -> None:
        with self._cond:
            closed = self._closed
            samples = self.samples
        if failure is None and self._timed_out:
            failure = f"decode_timeout: FFmpeg gave no audio for api.decode_timeout_s = {self.timeout_s:g} s"
        if failure is None and closed:
            failure = "stopped"
        if failure is None and samples > self.max_samples:
            failure = f"too_long: audio longer than api.max_audio_s = {self.max_duration_s:g} s"
        if failure is None and code != 0 and samples == 0:
            failure = "not an audio file in an accepted format (or no audio stream)"
        if failure is None and code != 0:
            # audio was decoded, then FFmpeg gave up (a truncated or damaged file): what it decoded plays
            logger.warning(
                "upload of task %s: FFmpeg stopped with exit code %d after %.2f s of audio; that part plays (%s)",
                self.utterance.task_id,
                code,
                samples / self.sample_rate_hz,
                " | ".join(self._stderr_tail[-2:]),
                extra={"task_id": self.utterance.task_id},
            )
        u = self.utterance
        if failure is None:
            u.end()
        elif samples and not closed and not u.ended and u.task.state not in FINAL_STATES:
            u.fail(failure)
        with self._cond:
            self.state = DecodeState.finished if failure is None else DecodeState.failed
            self.error = failure
            self._header_done = True
            self._cond.notify_all()

    def _read_log(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip()
            with self._cond:
                if self.header_duration_s is None and (m := DURATION_RE.search(line)):
                    self.header_duration_s = parse_duration_s(m)
                if line.startswith("Output #0") or line.startswith("Stream mapping"):
                    self._header_done = True
                    self._cond.notify_all()
                self._stderr_tail.append(line[:300])
                del self._stderr_tail[:-STDERR_TAIL_LINES]
        proc.stderr.close()  # at EOF: FFmpeg is gone
        with self._cond:
            self._header_done = True
            self._cond.notify_all()


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    """Close our ends of a child's stdout and stderr pipes (idempotent; a reader may have closed them)."""
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()
