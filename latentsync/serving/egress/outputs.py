"""Outputs: each destination of a channel is its own supervised FFmpeg, fed its own bounded queue.

An :class:`Output` owns one thread and, while it runs, one small FFmpeg (the *relay*) that copies
the encoder's FLV (``-c copy``; WHIP also encodes Opus from the AAC) to its destination: RTMP/RTMPS,
SRT, WHIP, an HLS folder or recording files (docs/outputs.md). The encoder's pump hands it tags
through :meth:`Output.push`, which never blocks; the output's thread moves them into the relay's
stdin with non-blocking writes and reads the relay's ``-progress`` report. So a destination that
refuses, stalls or is slow holds up its own relay and nothing else.

Watching (``egress.stall_timeout_s``): bytes that stop leaving (no new frame and no new byte in the
relay's progress report, or the output's queue past ``egress.output_queue_s``; for HLS and
recordings also no growth of their newest file on disk, since FFmpeg's HLS muxer carries on quietly
when its writes fail) for that long mark the output ``stalled``; the relay is killed and started
again with exponential backoff (``stream.restart_backoff_min_s``..``max_s``). An RTMP(S) output
waiting out a backoff probes its server (an RTMP handshake, or a TLS one) and starts at once when a
server it found dead answers again. The kernel send buffer of an RTMP output is small
(``egress.send_buffer_kb``), so our side hides well under a second of the stream from a frozen
server; its own receive buffer it fills first, and then its TCP window closes (ops.sockets).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import imageio_ffmpeg

from latentsync.config import EgressConfig, OutputTarget, StreamConfig
from latentsync.output_urls import OutputKind, redact_output_url, url_secrets
from latentsync.serving.core.states import StateMachine, check_table
from latentsync.serving.egress.fanout import Fanout
from latentsync.serving.egress.flv import FlvTag, rebased
from latentsync.serving.egress.supervision import SupervisingThread
from latentsync.serving.ops.sockets import TcpSendState, tcp_connections, tcp_send_state

logger = logging.getLogger(__name__)

ANALYZE_US = 100_000  # how much of the stream the relay probes before it starts, in microseconds
PROGRESS_PERIOD_S = 0.25  # FFmpeg's -stats_period for the relay's progress report (part of the stall detection delay)
SELECT_TIMEOUT_S = 0.1  # how often an output's thread looks at its clock when nothing happens
PENDING_MAX_BYTES = 1 << 20  # bytes moved from the queue towards the relay's stdin at a time
READ_BYTES = 1 << 16
FLUSH_S = 1.0  # graceful stop: time to hand over what is queued before stdin is closed
EXIT_WAIT_S = 3.0  # graceful stop: time the relay gets to finish (a recording's index) after EOF
STABLE_RUN_S = 10.0  # a run live this long resets the restart backoff to its minimum
PROBE_PERIOD_S = 1.0  # during a backoff, how often an RTMP server is probed
PROBE_TIMEOUT_S = 0.5
RECORD_PRUNE_S = 10.0  # how often old recording files beyond stream.record_keep are deleted
DISK_CHECK_S = 0.5  # how often an HLS or recording output's newest file is looked at (bytes landing on disk)
#: Files grow in steps (a recording's Matroska clusters of up to 1 s, a new HLS segment every
#: ``egress.hls_segment_s``): no growth for less than this is no stall, whatever ``stall_timeout_s``.
DISK_MIN_STALL_S = 3.0
SOCKET_CHECK_S = 0.5  # how often an RTMP relay's TCP connection is looked at (ops.sockets)
#: A TCP window closed (or bytes unacknowledged and retransmitted) this long counts as stalled, at
#: most ``egress.stall_timeout_s``: a live ingest drains its socket continuously, so a window that
#: stays shut for 1.5 s means the receiving application stopped reading (the kernel still took
#: what fitted its buffer, which is why the progress report alone would see it seconds later).
BLOCKED_STALL_S = 1.5
STDERR_TAIL_LINES = 20
OPUS_SAMPLE_RATE_HZ = 48000  # libopus takes 8/12/16/24/48 kHz; WebRTC receivers expect 48 kHz
WHIP_AUDIO_BITRATE_KBPS = 96
RTMP_C1_BYTES = 1536  # RTMP handshake: C0 is one version byte (3), C1 1536 bytes (RTMP spec 5.2)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: What FFmpeg prints when an RTMP server refuses a publish or drops it at once (local_publish_hint).
PUBLISH_REFUSED_SIGNS = ("Error opening output", "Input/output error", "I/O error", "Connection reset by peer")


class OutputState(str, enum.Enum):
    """Where an output is (``outputs[].state`` in ``/health``).

    ``connecting``: a relay runs, no byte has left yet. ``live``: bytes leave. ``stalled``: they
    stopped for ``egress.stall_timeout_s``; the relay was killed and starts again after its backoff.
    ``backoff``: the relay ended (refused, disconnected); waiting to start again. ``failed``: the
    relay could not be started at all (retried like a backoff). ``stopped``: removed or the
    channel stopped.
    """

    connecting = "connecting"
    live = "live"
    stalled = "stalled"
    backoff = "backoff"
    failed = "failed"
    stopped = "stopped"


OUTPUT_MOVES: dict[OutputState, frozenset[OutputState]] = {
    OutputState.connecting: frozenset(
        {OutputState.live, OutputState.stalled, OutputState.backoff, OutputState.failed, OutputState.stopped}
    ),
    OutputState.live: frozenset(
        {OutputState.stalled, OutputState.backoff, OutputState.connecting, OutputState.stopped}
    ),
    OutputState.stalled: frozenset({OutputState.connecting, OutputState.stopped}),
    OutputState.backoff: frozenset({OutputState.connecting, OutputState.stopped}),
    OutputState.failed: frozenset({OutputState.connecting, OutputState.stopped}),
    OutputState.stopped: frozenset(),
}
check_table(OutputState, OUTPUT_MOVES)


@dataclass(frozen=True, kw_only=True)
class OutputHealth:
    """One output, as ``/health`` and ``/metrics`` report it.

    Attributes:
        name: The output's name.
        kind: ``rtmp``, ``srt``, ``whip``, ``hls`` or ``record``.
        url: Its URL without stream key, token or options (:func:`latentsync.output_urls.redact_output_url`).
        required: The channel is ``streaming`` only while this output is ``live``.
        state: :class:`OutputState` value.
        encoding: The encoding it copies (``2500k``, ``2500k-baseline``).
        bytes_out: Bytes its relays wrote to the destination (for HLS and recordings: handed to
            the relay), over all runs.
        frames_out: Video frames its relays wrote, over all runs.
        last_progress_s: Seconds since bytes last left, or None before the first.
        restarts: Relays started after the first.
        stalls: Times it was found stalled.
        last_error: What its relay last printed before ending (secrets scrubbed), or why it ended.
        pid: The relay's process id, or None.
    """

    name: str
    kind: str
    url: str
    required: bool
    state: str
    encoding: str
    bytes_out: int = 0
    frames_out: int = 0
    last_progress_s: float | None = None
    restarts: int = 0
    stalls: int = 0
    last_error: str = ""
    pid: int | None = None

    @property
    def live(self) -> bool:
        """True while bytes leave."""
        return self.state == OutputState.live.value


@dataclass(frozen=True)
class OutputSettings:
    """What every output of a channel shares: the ``egress`` and ``stream`` config sections.

    Attributes:
        egress: The validated ``egress`` section.
        stream: The channel's validated ``stream`` section.
    """

    egress: EgressConfig
    stream: StreamConfig

    def queue_max_bytes(self, video_bitrate_kbps: int) -> int:
        """Bytes an output may have queued: ``egress.output_queue_s`` of the stream (at least 1 MiB)."""
        bytes_per_s = (video_bitrate_kbps + self.stream.audio_bitrate_kbps) * 1000 / 8
        return max(1 << 20, int(self.egress.output_queue_s * bytes_per_s))

    def record_segment_s(self, video_bitrate_kbps: int) -> int:
        """Seconds per recording file: ``stream.record_max_mb`` at the bitrates (at least 10)."""
        bits_per_s = (video_bitrate_kbps + self.stream.audio_bitrate_kbps) * 1000
        return max(10, int(self.stream.record_max_mb * 2**20 * 8 / bits_per_s))


def output_path(target: OutputTarget, settings: OutputSettings) -> Path | None:
    """Where an HLS output's playlist or a recording's files go; None for network outputs.

    Returns:
        ``<egress.hls_root>/<NAME>/index.m3u8`` or ``<stream.record_dir>/<FILE>``.
    """
    name = target.url.name
    if target.kind is OutputKind.hls and settings.egress.hls_root and name:
        return Path(settings.egress.hls_root) / name / "index.m3u8"
    if target.kind is OutputKind.record and settings.stream.record_dir and name:
        return Path(settings.stream.record_dir) / name
    return None


def build_relay_command(target: OutputTarget, settings: OutputSettings, run_index: int) -> list[str]:
    """The relay FFmpeg's argv: the encoder's FLV on stdin, copied to the destination.

    Progress (``frame=``, ``total_size=`` every :data:`PROGRESS_PERIOD_S`) goes to stdout.

    Args:
        target: The output.
        settings: The channel's egress and stream settings.
        run_index: 0 for the first run; names a recording's files of later runs.

    Returns:
        The command line (holds the URL and a WHIP token: never log it).
    """
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel",
        "warning",
        "-progress",
        "pipe:1",
        "-stats_period",
        str(PROGRESS_PERIOD_S),
        # The stream's parameters are in its first bytes (metadata, sequence headers, a keyframe):
        # probing FFmpeg's default 5 s of it would only delay the start.
        "-analyzeduration",
        str(ANALYZE_US),
        "-f",
        "flv",
        "-i",
        "pipe:0",
        "-map",
        "0",
        "-c",
        "copy",
    ]
    kind, url = target.kind, target.url.url
    if kind is OutputKind.rtmp:
        # send_buffer_size reaches the TCP socket under RTMP (and TLS): SO_SNDBUF, which the kernel doubles.
        return cmd + [
            "-flvflags",
            "no_duration_filesize",
            "-send_buffer_size",
            str(settings.egress.send_buffer_kb * 1024),
            "-f",
            "flv",
            url,
        ]
    if kind is OutputKind.srt:
        return cmd + ["-f", "mpegts", url]
    if kind is OutputKind.whip:
        audio = ["-c:a", "libopus", "-b:a", f"{WHIP_AUDIO_BITRATE_KBPS}k", "-ar", str(OPUS_SAMPLE_RATE_HZ)]
        token = ["-authorization", target.bearer_token] if target.bearer_token else []
        return cmd + audio + ["-ac", "2", *token, "-f", "whip", url]
    path = output_path(target, settings)
    assert path is not None, "hls and record outputs need their root (checked by the config)"
    if kind is OutputKind.hls:
        return cmd + [
            "-f",
            "hls",
            "-hls_time",
            str(settings.egress.hls_segment_s),
            "-hls_list_size",
            str(settings.egress.hls_list_size),
            # Old segments go; a restarted relay appends to the playlist after a discontinuity.
            "-hls_flags",
            "delete_segments+independent_segments+append_list+discont_start+temp_file",
            "-hls_segment_filename",
            str(path.parent / "segment-%06d.ts"),
            str(path),
        ]
    pattern = path.with_name(f"{path.stem}-{run_index:03d}-%04d{path.suffix}")
    # Every packet written through (and Matroska clusters of at most 1 s): the file grows steadily,
    # which is how the output is seen to progress, and a crash loses at most a second.
    inner = "flush_packets=1" + (":cluster_time_limit=1000" if path.suffix == ".mkv" else "")
    return cmd + [
        "-f",
        "segment",
        "-segment_time",
        str(settings.record_segment_s(target.video_bitrate_kbps)),
        "-segment_format_options",
        inner,
        "-reset_timestamps",
        "1",
        str(pattern),
    ]


def prune_recordings(record: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` files of a recording (``<stem>-*<suffix>`` beside ``record``).

    Args:
        record: ``stream.record_dir / FILE`` of a ``record:FILE`` output.
        keep: Files to keep (the newest by modification time, the one being written among them).

    Returns:
        The files deleted.
    """
    try:
        files = sorted(record.parent.glob(f"{record.stem}-*{record.suffix}"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return []
    gone = []
    for old in files[: max(0, len(files) - keep)]:
        try:
            old.unlink()
            gone.append(old)
        except OSError as exc:
            logger.warning("recording %s not deleted: %s", old.name, exc)
    return gone


def local_publish_hint(url: str, stderr_lines: Iterable[str]) -> str | None:
    """Why a local nginx-rtmp may have refused a publish, when it looks like it (for the output's error).

    The nginx-rtmp of ``scripts/rtmp_server.sh`` (``make run``) accepts a publish only with its secret
    as the stream name's query (``?secret=``); without it FFmpeg only says that the output could not
    be opened (``Input/output error``).

    Args:
        url: The output's URL (may hold a stream key: never logged here).
        stderr_lines: The relay's last lines on stderr (secrets scrubbed).

    Returns:
        The hint, naming ``?secret=`` and ``publish-url``, for an ``rtmp://`` URL on 127.0.0.1, ::1 or
        localhost without ``secret=`` whose relay ended with such an error; else None.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme != "rtmp" or host not in LOCAL_HOSTS or "secret=" in parts.query:
        return None
    if not any(sign in line for line in stderr_lines for sign in PUBLISH_REFUSED_SIGNS):
        return None
    return (
        "a local nginx-rtmp of scripts/rtmp_server.sh accepts a publish only with its ?secret=...: "
        "`scripts/rtmp_server.sh publish-url KEY` prints the URL to use"
    )


def rtmp_server_answers(host: str, port: int, tls: bool, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when an RTMP server at ``host:port`` answers a handshake (C0+C1 → S0) within ``timeout_s``.

    A frozen server accepts the TCP connection (its kernel does) but never answers; a TCP connect
    alone would call it back. For RTMPS the TLS handshake is the answer looked for (certificates
    are not checked: this only asks whether something serves there).
    """
    try:
        with socket.create_connection((host, port), timeout_s) as sock:
            sock.settimeout(timeout_s)
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                with context.wrap_socket(sock, server_hostname=host):
                    return True
            sock.sendall(b"\x03" + bytes(RTMP_C1_BYTES))
            return bool(sock.recv(1))
    except (OSError, ssl.SSLError):
        return False


class _Relay:
    """One relay FFmpeg of an output, with what its thread tracks of it."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes], base_ms: int):
        self.index = index
        self.proc = proc
        self.base_ms = base_ms
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.stdin = proc.stdin.fileno()
        self.stdout = proc.stdout.fileno()
        self.stderr = proc.stderr.fileno()
        for fd in (self.stdin, self.stdout, self.stderr):
            os.set_blocking(fd, False)
        self.pending = bytearray()
        self.stdin_open = True
        self.progress_text = b""
        self.stderr_text = b""
        self.frames = 0
        self.total_size = 0
        self.fed = 0
        self.report: dict[str, str] = {}
        started = time.monotonic()
        self.started = started
        self.report_at = started  # last progress in the relay's report (the stall clock starts with the relay)
        self.disk_at = started  # last growth of the output's newest file (HLS and recordings)
        self.disk_mark: tuple[str, int] | None = None
        self.reported = False  # the report has shown progress at least once
        self.landed = False  # the disk has shown growth at least once
        self.blocked_since = 0.0  # since when its TCP peer has had its window closed or not acknowledged (0: not)
        self.blocked_how: TcpSendState | None = None

    def close_stdin(self) -> None:
        """EOF on the relay's input (FFmpeg then writes its trailer and exits)."""
        self.stdin_open = False
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # nothing is buffered in it: every write went through os.write

    def close_pipes(self) -> None:
        """Close our ends of the three pipes (through their file objects, so no descriptor is closed twice)."""
        self.close_stdin()
        for stream in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


class Output:
    """One destination of a channel: its relay process, queue, state and counters (docs/outputs.md).

    Thread model: the encoder's pump calls :meth:`push` and :meth:`encoder_restarted` (never
    blocking); one thread of its own (``output-<channel>-<name>``) runs the relays one after the
    other and is the only writer of the state. :meth:`health` may be called from anywhere.

    Args:
        target: What and where (:class:`latentsync.config.OutputTarget`).
        settings: The channel's egress and stream settings.
        fanout: The encoder of this output's encoding.
        encoding: That encoding's label (for ``/health``).
        channel: The channel's name (log lines, thread name).
    """

    def __init__(self, target: OutputTarget, *, settings: OutputSettings, fanout: Fanout, encoding: str, channel: str):
        self.target = target
        self._settings = settings
        self._fanout = fanout
        self._encoding = encoding
        self._channel = channel
        self._what = f"channel {channel} output {target.name}"
        self._machine = StateMachine(OutputState.connecting, OUTPUT_MOVES, self._what)
        self._queue: collections.deque[FlvTag | None] = collections.deque()  # None: the encoder restarted
        self._queued_bytes = 0
        self._queue_lock = threading.Lock()
        self._queue_max = settings.queue_max_bytes(target.video_bitrate_kbps)
        self._overflowed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # its thread, its heartbeat (the systemd watchdog asks) and its stop event
        self._supervisor = SupervisingThread(lambda: self._run(), f"output-{channel}-{target.name}")
        self._stop = self._supervisor.stop
        self._relay: _Relay | None = None
        self._runs = 0
        self._stalls = 0
        self._bytes_done = 0  # of finished runs
        self._frames_done = 0
        self._last_progress = 0.0  # monotonic time bytes last left, over all runs (0: never)
        self._last_error = ""
        self._path = output_path(target, settings)  # an HLS playlist or a recording; None for network outputs
        secrets = url_secrets(target.url.url) + ((target.bearer_token,) if target.bearer_token else ())
        self._secrets = tuple(s for s in secrets if s)
        self._redacted = redact_output_url(target.url.url)
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    # ----------------------------------------------------------------- lifecycle
    @property
    def name(self) -> str:
        """The output's name."""
        return self.target.name

    @property
    def state(self) -> OutputState:
        """Where it is now."""
        return self._machine.state

    def start(self) -> None:
        """Start its thread (the relay comes up once the encoder has a keyframe). Safe to call twice."""
        self._supervisor.start()

    def stop(self) -> None:
        """Ask it to stop (returns at once): what is queued is handed over, the relay ends, then the thread."""
        self._supervisor.request_stop()
        self._wake()

    def join(self, timeout_s: float) -> bool:
        """Wait for its thread after :meth:`stop`; True when it ended (the wake-up pipe is closed then)."""
        if not self._supervisor.join(timeout_s):
            logger.error("%s did not stop within %.1f s", self._what, timeout_s)
            return False
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        return True

    def reap(self) -> bool:
        """After :meth:`stop`: True (and its descriptors closed) once its thread has ended; never waits."""
        if self._supervisor.running:
            return False
        return self.join(0.0)

    def close(self, timeout_s: float = FLUSH_S + EXIT_WAIT_S + 2.0) -> None:
        """Stop and wait (:meth:`stop` then :meth:`join`). Safe to call twice or before :meth:`start`."""
        self.stop()
        self.join(timeout_s)

    def alive(self, now: float, stale_s: float) -> bool:
        """True unless its thread died or has not looped for ``stale_s`` seconds (deadlocked)."""
        return self._supervisor.alive(now, stale_s)

    # ----------------------------------------------------------------- from the encoder's pump
    def push(self, tag: FlvTag) -> None:
        """Queue one live tag; never blocks.

        Past ``egress.output_queue_s`` of queued stream the tag is dropped and the output counts as stalled.
        """
        with self._queue_lock:
            if self._queued_bytes + len(tag.data) > self._queue_max:
                self._overflowed = True
                return
            was_empty = not self._queue
            self._queue.append(tag)
            self._queued_bytes += len(tag.data)
        if was_empty:
            self._wake()

    def encoder_restarted(self) -> None:
        """The encoder began a new stream: the relay starts over with it (never blocks)."""
        with self._queue_lock:
            self._queue.append(None)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (stopping)
            os.write(self._wake_w, b"\0")

    # ----------------------------------------------------------------- health
    def health(self) -> OutputHealth:
        """Its state and counters now."""
        relay = self._relay
        now = time.monotonic()
        bytes_now = self._bytes_done + (self._relay_bytes(relay) if relay is not None else 0)
        frames_now = self._frames_done + (relay.frames if relay is not None else 0)
        pid = relay.proc.pid if relay is not None and relay.proc.poll() is None else None
        t = self.target
        return OutputHealth(
            name=t.name,
            kind=t.kind.value,
            url=self._redacted,
            required=t.required,
            state=self._machine.state.value,
            encoding=self._encoding,
            bytes_out=bytes_now,
            frames_out=frames_now,
            last_progress_s=round(now - self._last_progress, 3) if self._last_progress else None,
            restarts=max(0, self._runs - 1),
            stalls=self._stalls,
            last_error=self._last_error,
            pid=pid,
        )

    # ----------------------------------------------------------------- the output's thread
    def _move(self, to: OutputState, reason: str | None = None) -> None:
        if self._machine.state is not to:
            self._machine.move(to, reason)

    def _run(self) -> None:
        backoff_s = self._settings.stream.restart_backoff_min_s
        index = 0
        while not self._stop.is_set():
            started = time.monotonic()
            outcome, live_s = self._one_run(index)
            index += 1
            if self._stop.is_set():
                break
            if outcome == "restart":
                continue  # a new encoder stream: start again at once
            if live_s >= STABLE_RUN_S:
                backoff_s = self._settings.stream.restart_backoff_min_s
            logger.warning(
                "%s: relay ended after %.1f s (%s: %s); next try in %.1f s",
                self._what,
                time.monotonic() - started,
                outcome,
                self._last_error or "no message",
                backoff_s,
            )
            if self._wait_backoff(backoff_s, stalled=outcome == "stalled"):
                break
            backoff_s = min(backoff_s * 2, self._settings.stream.restart_backoff_max_s)
        self._move(OutputState.stopped)
        logger.info("%s stopped", self._what)

    def _wait_backoff(self, backoff_s: float, stalled: bool) -> bool:
        """Wait before the next relay; an RTMP server seen dead that answers again ends the wait. True: stopping.

        A relay that stalled has just seen its server stop answering (dead from the start); after a
        relay that ended by itself the server counts as dead only once a probe fails, so a server
        that answers but refuses the stream (a wrong key) gets the whole backoff.
        """
        deadline = time.monotonic() + backoff_s
        url = self.target.url
        probe = self.target.kind is OutputKind.rtmp and url.host is not None and url.port is not None
        was_dead = stalled
        next_probe = time.monotonic()
        while (left := deadline - time.monotonic()) > 0:
            self._supervisor.beat()
            if probe and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_PERIOD_S
                assert url.host is not None and url.port is not None
                answers = rtmp_server_answers(url.host, url.port, tls=url.scheme == "rtmps")
                if answers and was_dead:
                    logger.info("%s: its server answers again", self._what)
                    return self._stop.is_set()
                was_dead = was_dead or not answers
            if self._stop.wait(max(0.0, min(SELECT_TIMEOUT_S, left))):
                return True
        return self._stop.is_set()

    def _subscribe(self) -> tuple[bytes, int] | None:
        """Wait for the encoder's first keyframe and subscribe; None when stopping."""
        while not self._stop.is_set():
            self._supervisor.beat()
            with self._queue_lock:
                self._queue.clear()
                self._queued_bytes = 0
                self._overflowed = False
            start = self._fanout.subscribe(self)
            if start is not None:
                return start
            self._stop.wait(0.05)
        return None

    def _one_run(self, index: int) -> tuple[str, float]:
        """One relay, from start to end. Returns ``(outcome, seconds it was live)``.

        Outcomes: ``stopped``, ``restart`` (new encoder stream), ``stalled``, ``exited``, ``failed``.
        """
        self._move(OutputState.connecting)
        start = self._subscribe()
        if start is None:
            return "stopped", 0.0
        start_bytes, base_ms = start
        try:
            relay = self._spawn(index, base_ms)
        except OSError as exc:
            self._fanout.unsubscribe(self)
            self._last_error = f"cannot start: {exc}"
            self._move(OutputState.failed, self._last_error)
            return "failed", 0.0
        relay.pending += start_bytes
        self._relay = relay
        self._runs += 1
        live_since = 0.0
        outcome = "exited"
        try:
            outcome, live_since = self._pump(relay)
        finally:
            self._fanout.unsubscribe(self)
            self._end(relay, graceful=outcome == "stopped")
        return outcome, (time.monotonic() - live_since) if live_since else 0.0

    def _spawn(self, index: int, base_ms: int) -> _Relay:
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        cmd = build_relay_command(self.target, self._settings, index)
        # Own session (a terminal's Ctrl-C reaches the server, which stops the relays itself) and an
        # empty environment (the server's holds the API token).
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={},
        )
        logger.info("%s: relay %d started (pid %d) → %s", self._what, index, proc.pid, self._redacted)
        return _Relay(index, proc, base_ms)

    def _pump(self, relay: _Relay) -> tuple[str, float]:
        """Feed the relay and watch it until it ends; returns ``(outcome, monotonic time it went live or 0)``."""
        stall_s = self._settings.egress.stall_timeout_s
        live_since = 0.0
        next_prune = next_disk_check = next_socket_check = 0.0
        kind = self.target.kind
        on_disk = kind in (OutputKind.hls, OutputKind.record)
        blocked_limit_s = min(stall_s, BLOCKED_STALL_S)
        disk_stall_s = max(stall_s, DISK_MIN_STALL_S)
        if kind is OutputKind.hls:
            disk_stall_s = max(disk_stall_s, 2 * self._settings.egress.hls_segment_s + 1)
        while True:
            self._supervisor.beat()
            if self._stop.is_set():
                return "stopped", live_since
            restart = self._take_queue(relay)
            if restart:
                self._last_error = "the encoder restarted"
                return "restart", live_since
            readers = [self._wake_r, relay.stdout, relay.stderr]
            writers = [relay.stdin] if relay.pending and relay.stdin_open else []
            try:
                readable, writable, _ = select.select(readers, writers, [], SELECT_TIMEOUT_S)
            except (OSError, ValueError) as exc:  # a descriptor closed under us: the run is over
                self._last_error = f"select: {exc}"
                return "exited", live_since
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
            if writable:
                self._write(relay)
            if relay.stdout in readable:
                self._read_progress(relay)
            if relay.stderr in readable:
                self._read_stderr(relay)
            if relay.proc.poll() is not None:
                self._read_stderr(relay)
                tail = " | ".join(list(self._stderr_tail)[-2:])
                self._last_error = tail or f"relay exited with code {relay.proc.returncode}"
                hint = None if live_since else local_publish_hint(self.target.url.url, self._stderr_tail)
                if hint:
                    self._last_error = f"{self._last_error} ({hint})"
                self._move(OutputState.backoff, self._last_error)
                return "exited", live_since
            now = time.monotonic()
            if on_disk and now >= next_disk_check:
                next_disk_check = now + DISK_CHECK_S
                self._check_disk(relay)
            if kind is OutputKind.rtmp and now >= next_socket_check:
                next_socket_check = now + SOCKET_CHECK_S
                self._check_socket(relay, now)
            progress_at = relay.report_at
            if on_disk:  # the disk's own, slower steps: it may lag by up to disk_stall_s
                progress_at = min(relay.report_at, relay.disk_at + max(0.0, disk_stall_s - stall_s))
            moved = relay.reported and (relay.landed or not on_disk)
            if moved and progress_at > self._last_progress:
                self._last_progress = progress_at
            if moved and not live_since:
                live_since = now
                self._move(OutputState.live)
                logger.info("%s live after %.2f s", self._what, live_since - relay.started)
            quiet_s = now - progress_at
            blocked_s = now - relay.blocked_since if relay.blocked_since else 0.0
            if self._overflowed or quiet_s >= stall_s or blocked_s >= blocked_limit_s:
                why = "its queue overflowed" if self._overflowed else f"no bytes left for {quiet_s:.1f} s"
                if on_disk and now - relay.disk_at >= disk_stall_s:
                    why = f"nothing written to disk for {now - relay.disk_at:.1f} s"
                if blocked_s >= blocked_limit_s:
                    why = (
                        f"the destination stopped reading (TCP window closed for {blocked_s:.1f} s)"
                        if relay.blocked_how is TcpSendState.window_closed
                        else f"the destination does not acknowledge (retransmitting for {blocked_s:.1f} s)"
                    )
                self._stalls += 1
                self._last_error = f"stalled: {why}"
                logger.warning("%s stalled (%s): killing its relay", self._what, why)
                self._move(OutputState.stalled, self._last_error)
                return "stalled", live_since
            if kind is OutputKind.record and self._path is not None and now >= next_prune:
                next_prune = now + RECORD_PRUNE_S
                prune_recordings(self._path, self._settings.stream.record_keep)

    def _check_socket(self, relay: _Relay, now: float) -> None:
        """Note whether the relay's TCP peer has stopped reading or acknowledging (:mod:`..ops.sockets`)."""
        state = tcp_send_state(tcp_connections(relay.proc.pid))
        if state in (TcpSendState.window_closed, TcpSendState.retransmitting):
            if not relay.blocked_since or state is not relay.blocked_how:
                relay.blocked_since, relay.blocked_how = now, state
        else:
            relay.blocked_since, relay.blocked_how = 0.0, None

    def _check_disk(self, relay: _Relay) -> None:
        """Note when the output's newest file (this run's recording file, the newest HLS segment) grew."""
        path = self._path
        if path is None:
            return
        pattern = (
            "segment-*.ts" if self.target.kind is OutputKind.hls else f"{path.stem}-{relay.index:03d}-*{path.suffix}"
        )
        try:
            newest = max(path.parent.glob(pattern), default=None)
            mark = (newest.name, newest.stat().st_size) if newest is not None else None
        except OSError:
            return
        if mark is not None and mark != relay.disk_mark and mark[1] > 0:
            if relay.disk_mark is not None or self.target.kind is OutputKind.record:
                relay.disk_at = time.monotonic()  # an HLS segment left from a run before this one is no growth
                relay.landed = True
            relay.disk_mark = mark

    def _take_queue(self, relay: _Relay) -> bool:
        """Move queued tags into the relay's pending bytes (rebased); True when the encoder restarted."""
        while len(relay.pending) < PENDING_MAX_BYTES:
            with self._queue_lock:
                if not self._queue:
                    return False
                tag = self._queue.popleft()
                if tag is None:
                    return True
                self._queued_bytes -= len(tag.data)
            relay.pending += rebased(tag, relay.base_ms)
        return False

    def _write(self, relay: _Relay) -> None:
        try:
            written = os.write(relay.stdin, relay.pending)
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the relay is gone; its exit is seen next
            relay.stdin_open = False
            return
        relay.fed += written
        del relay.pending[:written]

    def _relay_bytes(self, relay: _Relay) -> int:
        return relay.total_size if relay.total_size else relay.fed

    def _read_progress(self, relay: _Relay) -> None:
        """Read the relay's progress report; new frames or bytes mark progress (``relay.report_at``)."""
        try:
            data = os.read(relay.stdout, READ_BYTES)
        except OSError:  # BlockingIOError included: nothing to read after all
            return
        relay.progress_text += data
        *lines, relay.progress_text = relay.progress_text.split(b"\n")
        for raw in lines:
            key, _, value = raw.decode("ascii", errors="replace").strip().partition("=")
            if key != "progress":
                relay.report[key] = value
                continue
            frames = _int(relay.report.get("frame"))
            size = _int(relay.report.get("total_size"))
            if frames > relay.frames or size > relay.total_size:
                relay.frames = max(relay.frames, frames)
                relay.total_size = max(relay.total_size, size)
                relay.report_at = time.monotonic()
                relay.reported = True

    def _read_stderr(self, relay: _Relay) -> None:
        try:
            data = os.read(relay.stderr, READ_BYTES)
        except OSError:
            return
        relay.stderr_text += data
        *lines, relay.stderr_text = relay.stderr_text.split(b"\n")
        for raw in lines[-STDERR_TAIL_LINES:]:
            line = self._scrub(raw.decode("utf-8", errors="replace").rstrip())
            if line:
                self._stderr_tail.append(line)
                logger.info("%s[%d]: %s", self._what, relay.index, line)

    def _scrub(self, line: str) -> str:
        for secret in self._secrets:
            line = line.replace(secret, self._redacted if "://" in secret else "***")
        return line

    def _end(self, relay: _Relay, graceful: bool) -> None:
        """End a relay: on a graceful stop hand over what is queued and let it finish; else kill it."""
        proc = relay.proc
        if graceful and proc.poll() is None:
            deadline = time.monotonic() + FLUSH_S
            self._take_queue(relay)
            while relay.pending and relay.stdin_open and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError):
                    select.select([], [relay.stdin], [], max(0.0, deadline - time.monotonic()))
                self._write(relay)
            relay.close_stdin()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(EXIT_WAIT_S)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)
        self._read_stderr(relay)
        self._bytes_done += self._relay_bytes(relay)
        self._frames_done += relay.frames
        self._relay = None
        relay.close_pipes()


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:  # "N/A"
        return 0
