"""Encoder: two named pipes (raw video + s16le audio) read by one supervised FFmpeg that encodes once.

One long-running FFmpeg (the ``imageio-ffmpeg`` binary) reads ``rawvideo`` (``yuv420p``: the writer
converts each RGB frame with OpenCV, BT.601 limited range as FFmpeg's own conversion, at half the
bytes of RGB) from a video FIFO and ``s16le`` from an audio FIFO, encodes H.264 (libx264,
zerolatency) + AAC and writes FLV to its stdout. There is no ``-re``: the StreamingController's
clock paces the stream, and FFmpeg derives PTS from frame and sample counts, so A/V sync holds by
construction. A pump thread cuts the FLV into tags (:mod:`latentsync.serving.egress.flv`) and hands
them to the encoder's :class:`~latentsync.serving.egress.fanout.Fanout`, which copies them to every
output of this encoding (docs/outputs.md): the encoder never waits on a network.

Each FIFO has its own writer thread fed by its own bounded queue, so a full pipe on one side can
never block the other (FFmpeg reads its inputs from separate demuxer threads). A supervisor thread
restarts FFmpeg with fresh FIFOs and exponential backoff when it exits.
:meth:`Encoder.offer` never blocks: a tick whose frame and audio cannot both be queued is
refused as a whole and the caller counts it as dropped.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np

from latentsync.config import StreamConfig
from latentsync.serving.egress.fanout import Fanout
from latentsync.serving.egress.flv import FlvReader
from latentsync.serving.egress.supervision import SupervisingThread

logger = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031  # fcntl command from <linux/fcntl.h>: resize a pipe's kernel buffer
PIPE_BUFFER_BYTES = 1 << 20  # 1 MiB, the default /proc/sys/fs/pipe-max-size for unprivileged users
FIFO_OPEN_TIMEOUT_S = 10.0  # FFmpeg must open both FIFOs within this time after it starts
FLUSH_TIMEOUT_S = 4.0  # graceful close: time FFmpeg gets to drain, flush and exit after EOF
STABLE_RUN_S = 10.0  # a run at least this long resets the restart backoff to its minimum
STDERR_TAIL_LINES = 50
PUMP_READ_BYTES = 1 << 16  # one read of the encoder's stdout
STDOUT_PIPE_BYTES = 1 << 20  # the encoder's stdout pipe: room for ~3 s of a 2.5 Mbit/s stream
#: Largest GOP kept for outputs that start (a 2 s GOP at 50 Mbit/s is 12.5 MB).
GOP_CACHE_MAX_BYTES = 32 * 2**20


#: Bits per pixel (bitrate / (width x height x fps)) from which ``stream.x264_preset: auto`` picks
#: ``ultrafast``; below it ``superfast``. Measured (docs/performance.md, the formal presenter video,
#: PSNR of the FLV against the raw frames): at 0.38 bpp (512x512, 25 fps, 2500 kbit/s) ultrafast is
#: 48.2 dB against veryfast's 49.5 at 48 % of its CPU; at 0.23 bpp ultrafast loses 2.1 dB, and at
#: 0.046 and 0.096 bpp superfast is within 0.06 dB of veryfast at 75 % of its CPU.
AUTO_ULTRAFAST_MIN_BPP = 0.3


def auto_x264_preset(width: int, height: int, fps: int, bitrate_kbps: int) -> str:
    """The libx264 preset ``stream.x264_preset: auto`` gives a channel: as fast as its bitrate allows.

    Args:
        width: Frame width in pixels.
        height: Frame height in pixels.
        fps: Frames per second.
        bitrate_kbps: Target video bitrate in kbit/s.

    Returns:
        ``"ultrafast"`` at :data:`AUTO_ULTRAFAST_MIN_BPP` bits per pixel or more (bits to spare:
        the encoder's effort buys little), else ``"superfast"``.
    """
    bits_per_pixel = bitrate_kbps * 1000.0 / max(width * height * fps, 1)
    return "ultrafast" if bits_per_pixel >= AUTO_ULTRAFAST_MIN_BPP else "superfast"


@dataclass(frozen=True)
class Encoding:
    """What makes two outputs' encodings the same: they share one encoder when this is equal.

    Attributes:
        video_bitrate_kbps: H.264 target (and max) bitrate in kbit/s.
        baseline: Constrained Baseline profile (``-profile:v baseline``): what WHIP receivers decode.
    """

    video_bitrate_kbps: int
    baseline: bool

    @property
    def label(self) -> str:
        """``2500k`` or ``2500k-baseline`` (``/health``, logs, thread names)."""
        return f"{self.video_bitrate_kbps}k" + ("-baseline" if self.baseline else "")


@dataclass(frozen=True)
class EncoderSettings:
    """What the encoder needs to know: the ``stream`` config section, the frame size and its encoding.

    The section is used as is (one definition of every value and default: latentsync/config/); the
    properties below read it. ``width``/``height`` are the size actually streamed
    (``stream.width``/``height`` may be null: the idle video's size).

    Attributes:
        stream: The validated ``stream`` section.
        width: Frame width in pixels (even).
        height: Frame height in pixels (even).
        encoding: Bitrate and profile (None: the stream's bitrate, x264's own profile choice).
    """

    stream: StreamConfig
    width: int
    height: int
    encoding: Encoding | None = None

    @property
    def fps(self) -> int:
        """Frames per second."""
        return self.stream.fps

    @property
    def sample_rate_hz(self) -> int:
        """Audio rate of the s16le mono input and the AAC output, in Hz."""
        return self.stream.audio_sample_rate

    @property
    def audio_channels(self) -> int:
        """AAC output channels (the mono input is upmixed)."""
        return self.stream.audio_channels

    @property
    def video_bitrate_kbps(self) -> int:
        """H.264 target (and max) bitrate in kbit/s."""
        return self.encoding.video_bitrate_kbps if self.encoding is not None else self.stream.video_bitrate_kbps

    @property
    def baseline(self) -> bool:
        """Whether the H.264 profile is forced to Constrained Baseline."""
        return self.encoding is not None and self.encoding.baseline

    @property
    def audio_bitrate_kbps(self) -> int:
        """AAC bitrate in kbit/s."""
        return self.stream.audio_bitrate_kbps

    @property
    def x264_preset(self) -> str:
        """libx264 preset: ``stream.x264_preset``, or for ``auto`` the one for this size (:func:`auto_x264_preset`)."""
        if self.stream.x264_preset == "auto":
            return auto_x264_preset(self.width, self.height, self.fps, self.video_bitrate_kbps)
        return self.stream.x264_preset

    @property
    def x264_threads(self) -> int:
        """libx264 threads: 1 with ``x264_preset: auto`` (its presets need well under a core), else 0 (x264 picks)."""
        return 1 if self.stream.x264_preset == "auto" else 0

    @property
    def keyframe_interval_s(self) -> float:
        """Seconds between keyframes (GOP length)."""
        return self.stream.keyframe_interval_s

    @property
    def queue_frames(self) -> int:
        """Capacity of each writer queue, in ticks (``stream.sink_queue_s`` at ``fps``, at least 2)."""
        return max(2, round(self.stream.sink_queue_s * self.stream.fps))

    @property
    def backoff_min_s(self) -> float:
        """First restart delay in seconds (doubles per failed run)."""
        return self.stream.restart_backoff_min_s

    @property
    def backoff_max_s(self) -> float:
        """Restart delay cap in seconds."""
        return self.stream.restart_backoff_max_s


@dataclass(frozen=True, kw_only=True)
class EncoderStats:
    """A snapshot of one encoder's counters.

    Attributes:
        encoding: Its :attr:`Encoding.label`.
        up: FFmpeg is running and both FIFOs are open.
        starts: FFmpeg processes started so far.
        restarts: Starts after the first one (``starts - 1``, never negative).
        frames_written: Video frames written into the video FIFO, over all runs.
        refused_ticks: Ticks :meth:`Encoder.offer` refused (down, restarting or behind).
        bytes_out: FLV bytes the encoder wrote to its outputs' fan-out, over all runs.
        pid: PID of the current FFmpeg, or None.
        last_error: Last lines FFmpeg printed before it last exited.
    """

    encoding: str
    up: bool
    starts: int
    restarts: int
    frames_written: int
    refused_ticks: int
    bytes_out: int
    pid: int | None
    last_error: str


def build_encoder_command(settings: EncoderSettings, video_fifo: Path, audio_fifo: Path) -> list[str]:
    """The encoder FFmpeg's argv for one run: FIFOs in, FLV (H.264 + AAC) out on its stdout.

    Args:
        settings: Stream settings and the encoding.
        video_fifo: FIFO carrying ``yuv420p`` frames back to back (the writer converts).
        audio_fifo: FIFO carrying mono s16le samples.

    Returns:
        The command line (no secret in it: destinations are the outputs' own processes).
    """
    s = settings
    gop = max(1, round(s.keyframe_interval_s * s.fps))
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel",
        "warning",
        "-thread_queue_size",
        "8",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "yuv420p",
        "-video_size",
        f"{s.width}x{s.height}",
        "-framerate",
        str(s.fps),
        "-i",
        str(video_fifo),
        "-thread_queue_size",
        "64",
        "-f",
        "s16le",
        "-sample_rate",
        str(s.sample_rate_hz),
        "-ch_layout",
        "mono",
        "-i",
        str(audio_fifo),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        "-c:v",
        "libx264",
        "-preset",
        s.x264_preset,
        "-tune",
        "zerolatency",
        *(["-profile:v", "baseline"] if s.baseline else []),
        *(["-threads", str(s.x264_threads)] if s.x264_threads else []),
        "-pix_fmt",
        "yuv420p",
        "-g",
        str(gop),
        "-keyint_min",
        str(gop),
        "-sc_threshold",
        "0",
        "-b:v",
        f"{s.video_bitrate_kbps}k",
        "-maxrate",
        f"{s.video_bitrate_kbps}k",
        "-bufsize",
        f"{2 * s.video_bitrate_kbps}k",
        "-c:a",
        "aac",
        # The fast coder: a third of twoloop's CPU here (21 s of speech: 0.22 s against 0.64 s), and by
        # FFmpeg's AAC maintainer's account no worse at 128 kbit/s (FFmpeg commit fcb681ac, 2018).
        "-aac_coder",
        "fast",
        "-b:a",
        f"{s.audio_bitrate_kbps}k",
        "-ar",
        str(s.sample_rate_hz),
        "-ac",
        str(s.audio_channels),
        # A pipe cannot be seeked: no duration/filesize to patch in at the end. Each packet is
        # written as it is muxed (no interleaving delay beyond what A/V order needs).
        "-flvflags",
        "no_duration_filesize",
        "-flush_packets",
        "1",
        "-f",
        "flv",
        "pipe:1",
    ]


class _Run:
    """One FFmpeg process with its FIFOs, writer threads and bounded queues."""

    def __init__(self, index: int, fifo_dir: Path, prefix: str, queue_frames: int):
        self.index = index
        self.video_fifo = fifo_dir / f"{prefix}video-{index}.fifo"
        self.audio_fifo = fifo_dir / f"{prefix}audio-{index}.fifo"
        self.video_queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=queue_frames)
        self.audio_queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=queue_frames)
        self.proc: subprocess.Popen[bytes] | None = None
        self.threads: list[threading.Thread] = []
        self.failed = threading.Event()  # a writer hit EPIPE / open timeout, or the FLV broke
        self.closing = threading.Event()  # writers: finish what is queued, then close
        self.opened = 0  # FIFOs opened by their writers (0..2)
        self.opened_lock = threading.Lock()
        self.accepting = False  # offer() may queue into this run
        self.started_at = 0.0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    @property
    def up(self) -> bool:
        return self.opened == 2 and not self.failed.is_set()


class Encoder:
    """Encodes ticks (one frame + its audio) once, with a supervised FFmpeg, into FLV for the outputs.

    Thread model: :meth:`offer` is called by one producer thread (the StreamingController, through
    :class:`~latentsync.serving.egress.egress.Egress`); a supervisor thread owns the FFmpeg process;
    two writer threads per run move queued data into the FIFOs; one thread drains FFmpeg's stderr
    into the log; one pump thread reads its FLV and hands every tag to ``fanout`` (which never
    blocks: each output has its own queue).

    Args:
        settings: Stream settings and the encoding.
        fifo_dir: Private directory (mode 0700) for the FIFOs; must exist.
        fanout: Where the encoded tags go; :meth:`Fanout.reset` is called at every FFmpeg start.
        channel: The channel's name (log lines).
    """

    def __init__(self, settings: EncoderSettings, fifo_dir: Path, fanout: Fanout, channel: str = "main"):
        self._settings = settings
        self._channel = channel
        self._fifo_dir = Path(fifo_dir)
        self._label = settings.encoding.label if settings.encoding is not None else "stream"
        self._prefix = f"{self._label}-" if settings.encoding is not None else ""
        self._what = f"channel {channel} encoder {self._label}"
        self.fanout = fanout
        self._frame_bytes = settings.width * settings.height * 3
        self._run: _Run | None = None
        # the supervisor thread, its heartbeat (the systemd watchdog asks) and its stop event
        self._supervisor = SupervisingThread(self._supervise, f"encoder-{channel}-{self._label}")
        self._stop = self._supervisor.stop
        self._starts = 0
        self._frames_written = 0
        self._refused = 0
        self._bytes_out = 0
        self._last_error = ""

    @property
    def label(self) -> str:
        """The encoding's label (``2500k``, ``800k-baseline``)."""
        return self._label

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the supervisor (FFmpeg comes up in the background). Safe to call twice."""
        self._supervisor.start()

    def wait_accepting(self, timeout_s: float) -> bool:
        """Wait until :meth:`offer` can accept ticks (FFmpeg launched). Returns False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            run = self._run
            if run is not None and run.accepting:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 8.0) -> None:
        """Stop FFmpeg gracefully (EOF on both FIFOs, so it flushes), then remove the FIFOs.

        Safe to call twice or before :meth:`start`.

        Args:
            timeout_s: Upper bound in seconds for the whole shutdown.
        """
        self._supervisor.request_stop()
        if not self._supervisor.join(timeout_s):
            logger.error("%s: supervisor did not stop within %.1f s", self._what, timeout_s)
        run = self._run
        if run is not None:  # the supervisor normally did all this; make sure nothing survives
            self._kill(run)
            self._remove_fifos(run)

    def alive(self, now: float, stale_s: float) -> bool:
        """True unless the supervisor thread died or has not looped for ``stale_s`` seconds (deadlocked)."""
        return self._supervisor.alive(now, stale_s)

    # ----------------------------------------------------------------- producer side
    def offer(self, video: np.ndarray, audio: np.ndarray) -> bool:
        """Queue one tick without blocking.

        Args:
            video: ``(H, W, 3) uint8`` RGB frame, C-contiguous; must not be modified afterwards.
            audio: ``(N,) int16`` mono samples for this frame.

        Returns:
            True if both were queued; False if the tick was refused as a whole (FFmpeg down or
            restarting, or a queue full because the encoder cannot keep up).

        Raises:
            ValueError: If the frame has the wrong shape or dtype.
        """
        if video.dtype != np.uint8 or video.nbytes != self._frame_bytes:
            raise ValueError(
                f"frame must be ({self._settings.height}, {self._settings.width}, 3) uint8, "
                f"got {video.shape} {video.dtype}"
            )
        run = self._run
        # Single producer: the writers only ever make room, so checking both first is race-free.
        if run is None or not run.accepting or run.video_queue.full() or run.audio_queue.full():
            self._refused += 1
            return False
        run.video_queue.put_nowait(video)
        run.audio_queue.put_nowait(audio)
        return True

    def stats(self) -> EncoderStats:
        """Return a snapshot of the counters."""
        run = self._run
        up = run is not None and run.up and run.accepting
        pid = run.proc.pid if run is not None and run.proc is not None and run.proc.poll() is None else None
        return EncoderStats(
            encoding=self._label,
            up=up,
            starts=self._starts,
            restarts=max(0, self._starts - 1),
            frames_written=self._frames_written,
            refused_ticks=self._refused,
            bytes_out=self._bytes_out,
            pid=pid,
            last_error=self._last_error,
        )

    # ----------------------------------------------------------------- supervisor
    def _supervise(self) -> None:
        backoff_s = self._settings.backoff_min_s
        index = 0
        while not self._stop.is_set():
            self._supervisor.beat()
            run = _Run(index, self._fifo_dir, self._prefix, self._settings.queue_frames)
            self._run = run
            try:
                self._launch(run)
                while not self._stop.is_set():
                    self._supervisor.beat()
                    if run.proc is not None and run.proc.poll() is not None:
                        break
                    if run.failed.wait(0.1):
                        break
            except OSError as exc:
                logger.error("%s cannot start: %s", self._what, exc)
            graceful = self._stop.is_set()
            self._teardown(run, graceful=graceful)
            lasted_s = time.monotonic() - run.started_at
            if graceful:
                break
            self._last_error = " | ".join(list(run.stderr_tail)[-3:])
            backoff_s = self._settings.backoff_min_s if lasted_s >= STABLE_RUN_S else backoff_s
            logger.warning(
                "%s: run %d ended after %.1f s (exit %s: %s); restarting in %.1f s",
                self._what,
                run.index,
                lasted_s,
                run.proc.returncode if run.proc else None,
                self._last_error or "no message",
                backoff_s,
            )
            deadline = time.monotonic() + backoff_s
            while not self._stop.wait(max(0.0, min(0.5, deadline - time.monotonic()))):
                self._supervisor.beat()
                if time.monotonic() >= deadline:
                    break
            backoff_s = min(backoff_s * 2, self._settings.backoff_max_s)
            index += 1

    def _launch(self, run: _Run) -> None:
        for fifo in (run.video_fifo, run.audio_fifo):
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo, 0o600)
        cmd = build_encoder_command(self._settings, run.video_fifo, run.audio_fifo)
        run.started_at = time.monotonic()
        self.fanout.reset()  # the outputs start again from this run's header and first keyframe
        # Own session: a terminal's Ctrl-C stops the server, which then flushes FFmpeg itself (EOF on
        # the FIFOs). If the server dies, the FIFOs' write ends close and FFmpeg exits on EOF.
        # An empty environment: FFmpeg needs none, and the server's holds the API token and overrides.
        run.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={},
        )
        assert run.proc.stdout is not None
        with contextlib.suppress(OSError):  # room for the pump's short pauses
            fcntl.fcntl(run.proc.stdout.fileno(), F_SETPIPE_SZ, STDOUT_PIPE_BYTES)
        self._starts += 1
        logger.info(
            "%s: run %d started (pid %d), %dx%d@%d, %s",
            self._what,
            run.index,
            run.proc.pid,
            self._settings.width,
            self._settings.height,
            self._settings.fps,
            self._settings.x264_preset,
        )
        run.threads = [
            threading.Thread(target=self._drain_stderr, args=(run,), name=f"encoder-stderr-{run.index}", daemon=True),
            threading.Thread(target=self._pump, args=(run,), name=f"encoder-pump-{run.index}", daemon=True),
            threading.Thread(
                target=self._write_fifo,
                args=(run, run.video_fifo, run.video_queue, True),
                name=f"fifo-video-{run.index}",
                daemon=True,
            ),
            threading.Thread(
                target=self._write_fifo,
                args=(run, run.audio_fifo, run.audio_queue, False),
                name=f"fifo-audio-{run.index}",
                daemon=True,
            ),
        ]
        for thread in run.threads:
            thread.start()
        run.accepting = True

    def _teardown(self, run: _Run, graceful: bool) -> None:
        run.accepting = False
        run.closing.set()
        if not graceful:
            run.failed.set()  # writers drop what is queued and close at once
        proc = run.proc
        if proc is not None and graceful:
            # Writers flush their queues, then close the FIFOs: EOF makes FFmpeg finish its FLV.
            deadline = time.monotonic() + FLUSH_TIMEOUT_S
            for thread in run.threads[2:]:
                thread.join(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                logger.warning(
                    "%s: run %d did not finish its flush in %.0f s: killing it",
                    self._what,
                    run.index,
                    FLUSH_TIMEOUT_S,
                )
            else:
                logger.info("%s: run %d flushed and exited with code %d", self._what, run.index, proc.returncode)
        self._kill(run)
        for thread in run.threads:
            thread.join(2.0)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        self._remove_fifos(run)

    def _kill(self, run: _Run) -> None:
        run.failed.set()
        proc = run.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)

    @staticmethod
    def _remove_fifos(run: _Run) -> None:
        for fifo in (run.video_fifo, run.audio_fifo):
            fifo.unlink(missing_ok=True)

    # ----------------------------------------------------------------- worker threads
    def _open_fifo(self, run: _Run, path: Path) -> int | None:
        """Open a FIFO for writing once FFmpeg has opened it for reading (non-blocking poll)."""
        deadline = time.monotonic() + FIFO_OPEN_TIMEOUT_S
        while not run.failed.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.ENOENT):
                    raise
                if run.proc is not None and run.proc.poll() is not None:
                    return None
                if time.monotonic() > deadline:
                    logger.error("ffmpeg did not open %s within %.0f s", path.name, FIFO_OPEN_TIMEOUT_S)
                    return None
                time.sleep(0.01)
                continue
            os.set_blocking(fd, True)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BUFFER_BYTES)
            return fd
        return None

    def _write_fifo(self, run: _Run, path: Path, source: queue.Queue[np.ndarray], is_video: bool) -> None:
        fd = None
        try:
            fd = self._open_fifo(run, path)
            if fd is None:
                run.failed.set()
                return
            with run.opened_lock:
                run.opened += 1
            # One I420 buffer for the writer's whole run: a fresh one every tick is a fresh mapping
            # (ops.memory's mmap threshold) and ~100 page faults to fill it.
            i420 = np.empty((self._settings.height * 3 // 2, self._settings.width), np.uint8) if is_video else None
            while not run.failed.is_set():
                try:
                    item = source.get(timeout=0.1)
                except queue.Empty:
                    if run.closing.is_set():
                        return
                    continue
                if is_video:  # I420 is half the bytes of RGB, and FFmpeg has no colour conversion left to do
                    item = cv2.cvtColor(item, cv2.COLOR_RGB2YUV_I420, dst=i420)
                view = np.ascontiguousarray(item).data.cast("B")
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if is_video:
                    self._frames_written += 1
        except OSError as exc:  # EPIPE: FFmpeg went away
            if not run.closing.is_set():
                logger.warning("writing %s failed: %s", path.name, exc)
            run.failed.set()
        finally:
            if fd is not None:
                os.close(fd)

    def _pump(self, run: _Run) -> None:
        """Read the encoder's FLV and hand each tag to the fan-out (never blocked by an output)."""
        assert run.proc is not None and run.proc.stdout is not None
        fd = run.proc.stdout.fileno()
        reader = FlvReader()
        header_sent = False
        try:
            while True:
                data = os.read(fd, PUMP_READ_BYTES)
                if not data:
                    return  # EOF: FFmpeg exited (the supervisor sees it)
                self._bytes_out += len(data)
                for tag in reader.feed(data):
                    if reader.header is not None and not header_sent:
                        self.fanout.set_header(reader.header)
                        header_sent = True
                    self.fanout.publish(tag)
        except (OSError, ValueError) as exc:  # FlvError is a ValueError; OSError: stdout closed at teardown
            if not run.closing.is_set():
                logger.error("%s: run %d: its FLV cannot be read: %s", self._what, run.index, exc)
            run.failed.set()

    def _drain_stderr(self, run: _Run) -> None:
        assert run.proc is not None and run.proc.stderr is not None
        for raw in iter(run.proc.stderr.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                run.stderr_tail.append(line)
                logger.info("%s[%d]: %s", self._what, run.index, line)
        run.proc.stderr.close()
