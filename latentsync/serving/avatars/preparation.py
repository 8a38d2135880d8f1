"""The one preparation queue of the server: every avatar is prepared here, one child process at a time.

A preparation (:meth:`latentsync.avatar.Avatar.prepare`: decode, face tracking, framing, warps)
takes seconds to minutes of CPU. :class:`PreparationQueue` runs them one at a time, each in a
spawned child process at a lower CPU priority (``nice 10``: the stream clocks and the engine
workers keep theirs), bounded by ``avatar.prepare_timeout_s`` and ``avatar.prepare_max_rss_mb`` (the
child's peak resident memory, read from ``/proc`` at every poll), with a budget on the frames the
video may decode to (``avatar.upload_max_s`` or ``media.max_clip_s``, counted while decoding). It
serves two kinds of job:

- a channel's base video (a channel starting, an avatar switch): :meth:`PreparationQueue.prepare_for_channel`,
  served first, since a channel waits for it on air;
- an uploaded avatar (``POST /avatars``): queued by id, prepared by the store's ``prepare_upload``
  (which runs the child with :meth:`PreparationQueue.run_child`); at most ``avatar.max_preparing``
  uploads wait or prepare (:meth:`PreparationQueue.upload_slot`).

The child sends ``("progress", fraction)`` messages over a pipe, then one result (docs/avatars.md).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from latentsync.media import MediaProbeError
from latentsync.media.video import FrameBudget, MediaLimitError
from latentsync.serving.avatars.catalogue import AvatarError
from latentsync.serving.avatars.face_policy import measure_face
from latentsync.serving.ops import procfs
from latentsync.serving.ops.children import become_helper_process

logger = logging.getLogger(__name__)

#: Seconds between checks of a running preparation (progress, timeout, stop).
POLL_S = 0.25
#: Seconds a preparation child gets to exit after it was told to stop, before it is killed.
CHILD_EXIT_S = 5.0


def _prepare_child(video: str, settings, cache_dir: str, conn, budget: FrameBudget | None = None) -> None:
    """Body of the preparation process: prepare, send ``("progress", f)`` messages, then one result.

    Args:
        video: The base video.
        settings: :class:`latentsync.avatar.AvatarSettings` (fps, size, face fraction).
        cache_dir: The avatar cache.
        conn: The pipe to the parent.
        budget: :class:`latentsync.media.video.FrameBudget`: most frames the video may decode to
            (``too_long`` past it); None: none.
    """
    become_helper_process()  # the server stops it, and a stop mid-way leaves no semaphore registered (ops.children)
    conn.send(("progress", 0.0))  # started: from now on the parent's memory readings are this process's own
    try:
        os.nice(10)  # the stream clocks and the engine workers come first
    except OSError:
        pass
    from latentsync.avatar import Avatar
    from latentsync.face import FaceNotFoundError

    try:
        progress = lambda f: conn.send(("progress", f))  # noqa: E731
        avatar = Avatar.prepare(video, settings, cache_dir, on_progress=progress, budget=budget)
        faces = int(avatar.meta.get("faces_found", 0))
        conn.send(("done", str(avatar.path), faces, avatar.num_frames, measure_face(avatar, video)))
    except FaceNotFoundError as exc:
        conn.send(("failed", "no_face", f"no usable face: {exc}"))
    except MediaLimitError as exc:  # our own text: the budget and its key, never FFmpeg's or a path
        conn.send(("failed", "too_long", str(exc)))
    except MediaProbeError:
        conn.send(("failed", "not_video", "not a decodable video in an accepted format (MP4/MOV, Matroska/WebM)"))
    except Exception as exc:  # anything else is reported, never raised into a dead process
        conn.send(("failed", "prepare_failed", f"{type(exc).__name__} (the server log has it)"))
        print(f"avatar preparation of {Path(video).name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        conn.close()


class PreparationFailed(Exception):
    """A channel's avatar preparation in the child process failed.

    Attributes:
        code: How (``no_face``, ``not_video``, ``too_long``, ``prepare_timeout``, ``prepare_memory``,
            ``prepare_failed``, ``stopping``).
        public_message: What API clients may read (the child never sends FFmpeg's text or a path).
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.public_message = f"{code}: {message}"


@dataclasses.dataclass(eq=False, kw_only=True)
class _ChannelJob:
    """A channel's avatar (start or switch) waiting for, or in, the preparation queue."""

    video: str
    settings: object
    budget: FrameBudget | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: bool = False
    path: str | None = None
    error: tuple[str, str] | None = None


class PreparationQueue:
    """One thread preparing avatars one at a time in child processes: channels' base videos, then uploads.

    Args:
        cache_dir: ``avatar.cache_dir`` (where the prepared avatars go).
        timeout_s: ``avatar.prepare_timeout_s``: a child running longer is terminated (``prepare_timeout``).
        max_rss_mb: ``avatar.prepare_max_rss_mb``: a child whose resident memory ever exceeds this
            many MiB (its ``VmHWM``, read every :data:`POLL_S` s) is terminated (``prepare_memory``);
            None: no budget. The FFmpeg it runs is a process of its own and not counted.
        prepare_upload: Prepares the upload of this id (on the queue's thread; runs its child with
            :meth:`run_child`). It must not raise: an exception is logged and the thread goes on.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        timeout_s: float,
        prepare_upload: Callable[[str], None],
        max_rss_mb: float | None = None,
    ):
        self._root = Path(cache_dir)
        self._timeout_s = timeout_s
        self._max_rss_mb = max_rss_mb
        self._last_peak_rss_kib = 0  # the last child's VmHWM, as last read
        self._prepare_upload = prepare_upload
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._uploads: collections.deque[str] = collections.deque()  # ids waiting (with the running one: max_preparing)
        self._channel_jobs: collections.deque[_ChannelJob] = collections.deque()  # served before uploads
        self._slots = 0  # uploads being taken in (copied, checked): they hold a max_preparing slot already
        self._running: str | None = None
        self._child: multiprocessing.process.BaseProcess | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ctx = multiprocessing.get_context("spawn")

    # ----------------------------------------------------------------- lifecycle
    def start(self, backlog: Callable[[], Iterable[str]]) -> None:
        """Start the preparation thread. Safe to call twice, and after :meth:`close` (nothing starts then).

        Args:
            backlog: Returns the upload ids left waiting by the last stop; called once, before the
                thread starts, only if it starts (its exceptions propagate, and nothing starts).
        """
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._uploads.extend(backlog())
            self._thread = threading.Thread(target=self._run, name="avatar-prepare", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = CHILD_EXIT_S) -> None:
        """Stop: a running child is terminated, channels waiting get ``stopping``; waits ``timeout_s`` for the thread.

        An upload whose child is terminated is not finished: it stays ``preparing`` for the next start.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            child = self._child
            self._wake.notify_all()
        if child is not None and child.is_alive():
            child.terminate()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ----------------------------------------------------------------- uploads
    @contextlib.contextmanager
    def upload_slot(self, max_preparing: int) -> Iterator[None]:
        """Hold one of the ``max_preparing`` upload slots while an upload is taken in.

        The slot is taken before the (possibly long) copy, so concurrent uploads see it; once the
        upload is queued (:meth:`enqueue_upload`) its place in the queue holds it.

        Raises:
            AvatarError: 503 ``stopping`` once closed; 429 ``busy`` when ``max_preparing`` uploads
                are waiting, preparing or being taken in.
        """
        with self._lock:
            if self._closed:
                raise AvatarError("stopping", "the server is stopping")
            busy = len(self._uploads) + (self._running is not None) + self._slots
            if busy >= max_preparing:
                raise AvatarError(
                    "busy", f"{busy} avatars are being prepared (avatar.max_preparing); retry when one is ready"
                )
            self._slots += 1
        try:
            yield
        finally:
            with self._lock:
                self._slots -= 1

    def enqueue_upload(self, avatar_id: str) -> None:
        """Queue an upload's preparation (behind the others; channels' jobs go first).

        Raises:
            AvatarError: 503 ``stopping`` once closed (nothing is queued).
        """
        with self._lock:
            if self._closed:
                raise AvatarError("stopping", "the server is stopping")
            self._uploads.append(avatar_id)
            self._wake.notify_all()

    def withdraw_upload(self, avatar_id: str) -> bool:
        """Take an upload out of the queue (it will not be prepared).

        Returns:
            False if it is being prepared now (left alone), else True (also when it was not queued).
        """
        with self._lock:
            if self._running == avatar_id:
                return False
            if avatar_id in self._uploads:
                self._uploads.remove(avatar_id)
            return True

    def busy_uploads(self) -> set[str]:
        """Ids of the uploads waiting or being prepared."""
        with self._lock:
            return set(self._uploads) | ({self._running} if self._running else set())

    # ----------------------------------------------------------------- channels' avatars
    def prepare_for_channel(
        self, video: str | Path, settings, stopping: Callable[[], bool], budget: FrameBudget | None = None
    ) -> str | None:
        """Prepare a channel's base video in the queue (a child process, before uploads).

        Args:
            video: The base video (its path was checked by the caller: config file or ``media.root``).
            settings: :class:`latentsync.avatar.AvatarSettings` at the channel's fps and size.
            stopping: True once the channel no longer wants it (closed, or the switch superseded):
                polled every 0.1 s; the job leaves the queue or its child is terminated.
            budget: :class:`latentsync.media.video.FrameBudget` counted while decoding (``too_long``); None: none.

        Returns:
            The prepared avatar's cache folder, or None when ``stopping()`` became true first.

        Raises:
            PreparationFailed: With the child's code (``no_face``, ``not_video``, ``too_long``,
                ``prepare_timeout``, ``prepare_memory``, ``prepare_failed``, ``stopping``) and a
                message that never holds FFmpeg's text.
        """
        job = _ChannelJob(video=str(video), settings=settings, budget=budget)
        with self._lock:
            if self._closed:
                raise PreparationFailed("stopping", "the server is stopping")
            self._channel_jobs.append(job)
            self._wake.notify_all()
        while not job.done.wait(0.1):
            if stopping():
                with self._lock:
                    job.cancelled = True
                    if job in self._channel_jobs:
                        self._channel_jobs.remove(job)
                        return None
                job.done.wait(CHILD_EXIT_S + 1.0)  # its child is being terminated
                return None
        if job.error is not None:
            raise PreparationFailed(*job.error)
        return job.path

    def _prepare_channel(self, job: _ChannelJob) -> None:
        try:
            label = f"channel-{Path(job.video).stem[:24]}"
            result = self.run_child(
                job.video,
                job.settings,
                label=label,
                on_progress=lambda _f: None,
                cancelled=lambda: job.cancelled,
                budget=job.budget,
            )
            if result is None:
                job.error = ("stopping", "cancelled")
            elif result[0] == "done":
                job.path = result[1]
            else:
                job.error = (result[1], result[2])
        except Exception as exc:  # a bug here must not end the thread
            logger.exception("channel avatar preparation of %s crashed", Path(job.video).name)
            job.error = ("prepare_failed", f"{type(exc).__name__}")
        finally:
            job.done.set()

    # ----------------------------------------------------------------- the thread
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._uploads and not self._channel_jobs and not self._closed:
                    self._wake.wait(timeout=1.0)
                if self._closed:
                    for waiting in self._channel_jobs:
                        waiting.error = ("stopping", "the server is stopping")
                        waiting.done.set()
                    self._channel_jobs.clear()
                    return
                job: _ChannelJob | None
                if self._channel_jobs:  # a channel waits for it on air: before uploads
                    job = self._channel_jobs.popleft()
                else:
                    job = None
                    avatar_id = self._uploads.popleft()
                    self._running = avatar_id
            if job is not None:
                self._prepare_channel(job)
                continue
            try:
                self._prepare_upload(avatar_id)
            except Exception:  # a bug here must not end the thread
                logger.exception("avatar %s: preparation crashed", avatar_id)
            finally:
                with self._lock:
                    self._running = None
                    self._child = None

    def run_child(
        self,
        video: str,
        settings,
        *,
        label: str,
        on_progress: Callable[[float], None],
        cancelled: Callable[[], bool],
        budget: FrameBudget | None = None,
    ) -> tuple | None:
        """Prepare ``video`` in a child process (lower priority, time and memory bounded); on the queue's thread.

        Every :data:`POLL_S` s the child's peak resident memory (``VmHWM``) is read: over
        ``max_rss_mb`` the child is terminated and the result is ``prepare_memory``; past
        ``timeout_s``, ``prepare_timeout``.

        Args:
            video: The base video.
            settings: :class:`latentsync.avatar.AvatarSettings`.
            label: Names the child process (``avatar-prepare-<label>``).
            on_progress: Called with each fraction (0-1) the child reports.
            cancelled: Polled every :data:`POLL_S` s: True terminates the child.
            budget: :class:`latentsync.media.video.FrameBudget`: most frames the video may decode to
                (``too_long`` past it, counted while decoding); None: none.

        Returns:
            The child's result message (``("done", path, faces, frames, face)``, ``face`` from
            :func:`~latentsync.serving.avatars.face_policy.measure_face`, or ``("failed", code,
            message)``), or None when the queue closed or ``cancelled()`` became true (the child is
            terminated).
        """
        t0 = time.monotonic()
        receiver, sender = self._ctx.Pipe(duplex=False)
        child = self._ctx.Process(
            target=_prepare_child,
            args=(video, settings, str(self._root), sender, budget),
            name=f"avatar-prepare-{label}",
            daemon=True,
        )
        with self._lock:
            if self._closed:
                return None
            self._child = child
            child.start()
        sender.close()
        result = None
        deadline = t0 + self._timeout_s
        self._last_peak_rss_kib = 0
        started = False  # a first message came: the child runs Python (not a copy of this process before exec)
        try:
            while result is None:
                if self._closed or cancelled():
                    return None  # terminated below
                if started and self._over_memory(child):
                    result = (
                        "failed",
                        "prepare_memory",
                        f"preparation needed more than avatar.prepare_max_rss_mb = {self._max_rss_mb:g} MB of memory",
                    )
                    break
                if time.monotonic() > deadline:
                    result = (
                        "failed",
                        "prepare_timeout",
                        f"preparation took longer than avatar.prepare_timeout_s = {self._timeout_s:g} s",
                    )
                    break
                try:
                    if not receiver.poll(POLL_S):
                        continue
                    message = receiver.recv()
                except (EOFError, OSError):
                    child.join(CHILD_EXIT_S)
                    result = ("failed", "prepare_failed", f"the preparation process died (exit code {child.exitcode})")
                    break
                started = True
                if message[0] == "progress":
                    on_progress(float(message[1]))
                else:
                    result = message
        finally:
            receiver.close()
            if started:
                self._over_memory(child)  # its last peak, for last_peak_rss_mb
            if child.is_alive():
                child.terminate()
            child.join(CHILD_EXIT_S)
            if child.is_alive():
                child.kill()
                child.join(CHILD_EXIT_S)
            with self._lock:
                self._child = None
        logger.info("avatar preparation %s: peak memory %.0f MiB", label, self.last_peak_rss_mb)
        return result

    def _over_memory(self, child: multiprocessing.process.BaseProcess) -> bool:
        """Read the child's peak resident memory (``VmHWM``); True once it is over ``max_rss_mb``."""
        if child.pid is not None:
            self._last_peak_rss_kib = max(self._last_peak_rss_kib, procfs.peak_rss_kib(child.pid))
        return self._max_rss_mb is not None and self._last_peak_rss_kib > self._max_rss_mb * 1024

    @property
    def last_peak_rss_mb(self) -> float:
        """Peak resident memory, in MiB, of the last (or running) preparation child, as last read (0 before any)."""
        return self._last_peak_rss_kib / 1024
