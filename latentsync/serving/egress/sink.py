"""EgressSink: a channel's programme encoded once per encoding and sent to every output as peers.

The StreamingController offers each tick here (:meth:`EgressSink.offer`, never blocking). Each
distinct encoding (bitrate and H.264 profile; docs/outputs.md) has one
:class:`~latentsync.serving.egress.encoder.Encoder` (FIFOs → FFmpeg → FLV) and one
:class:`~latentsync.serving.egress.fanout.Fanout`; each output has its own
:class:`~latentsync.serving.egress.outputs.Output` (thread, queue, relay FFmpeg, backoff, state).
The encoders write to pipes that are always drained, so no destination can stop the clock, another
output, WHEP, frames or the event feed. Outputs are added and removed while the channel runs
(:meth:`EgressSink.set_outputs`) without touching the others; an encoding no output uses any more
is stopped.

Which outputs share an encoding: those with the same ``video_bitrate_kbps`` and profile. WHIP
outputs need Constrained Baseline (what WebRTC receivers decode); at a bitrate where the channel's
x264 preset resolves to ``ultrafast`` every output is encoded as Baseline anyway (ultrafast uses
no tool Baseline forbids: no CABAC, no B-frames, no 8x8 transform), so there WHIP shares the one
encoder, and elsewhere it gets its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentsync.config import EgressConfig, OutputTarget, StreamConfig
from latentsync.output_urls import OutputKind
from latentsync.serving.egress.encoder import (
    GOP_CACHE_MAX_BYTES,
    Encoder,
    EncoderSettings,
    EncoderStats,
    Encoding,
    auto_x264_preset,
)
from latentsync.serving.egress.fanout import Fanout
from latentsync.serving.egress.outputs import Output, OutputHealth, OutputSettings

logger = logging.getLogger(__name__)

#: A supervisor (encoder or output thread) that has not looped for this long is deadlocked: the
#: systemd watchdog is then withheld (docs/architecture.md "Health").
SUPERVISOR_STALE_S = 15.0
#: Whole-sink shutdown bound: encoders flush (4 s), then every output hands over and ends (~4 s).
CLOSE_TIMEOUT_S = 12.0


@dataclass(frozen=True, kw_only=True)
class EgressStats:
    """A snapshot of a channel's egress.

    Attributes:
        up: Every encoder runs with both FIFOs open.
        restarts: Encoder restarts (starts after each encoder's first).
        pid: The first encoder's FFmpeg pid, or None.
        last_error: What an encoder last printed before it ended, or "".
        encoders: Each encoder's counters.
        outputs: Each output's health, in the channel's order.
    """

    up: bool
    restarts: int
    pid: int | None
    last_error: str
    encoders: tuple[EncoderStats, ...]
    outputs: tuple[OutputHealth, ...]


def encoding_for(target: OutputTarget, stream: StreamConfig, width: int, height: int) -> Encoding:
    """The encoding an output copies: its bitrate, Baseline for WHIP or where the preset is ultrafast anyway."""
    preset = stream.x264_preset
    if preset == "auto":
        preset = auto_x264_preset(width, height, stream.fps, target.video_bitrate_kbps)
    return Encoding(target.video_bitrate_kbps, baseline=target.kind is OutputKind.whip or preset == "ultrafast")


class EgressSink:
    """A channel's encoders and outputs behind one :class:`~latentsync.serving.playout.clock.TickSink`.

    Args:
        stream: The channel's ``stream`` section.
        egress: The ``egress`` section.
        width: Frame width in pixels (even).
        height: Frame height in pixels (even).
        outputs: The outputs to start with (:func:`latentsync.config.channel_outputs`).
        work_dir: The channel's private folder (mode 0700), for the encoders' FIFOs.
        channel: The channel's name (log lines, thread names).
    """

    def __init__(
        self,
        stream: StreamConfig,
        *,
        egress: EgressConfig,
        width: int,
        height: int,
        outputs: Sequence[OutputTarget],
        work_dir: Path,
        channel: str,
    ):
        self._stream = stream
        self._width, self._height = width, height
        self._work_dir = Path(work_dir)
        self._channel = channel
        self._settings = OutputSettings(egress, stream)
        self._lock = threading.Lock()  # set_outputs, start and close
        self._started = False
        self._closed = False
        # Replaced whole (copy on write): the clock thread reads them without a lock.
        self._encoders: dict[Encoding, Encoder] = {}
        self._outputs: dict[str, Output] = {}
        self._retired: list[Output] = []  # removed outputs still ending: reaped once ended, joined at close
        self._build(list(outputs))

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start every encoder and output. Safe to call twice, and a no-op after :meth:`close`."""
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            for encoder in self._encoders.values():
                encoder.start()
            for output in self._outputs.values():
                output.start()

    def wait_accepting(self, timeout_s: float) -> bool:
        """Wait until every encoder takes ticks (FFmpeg launched). Returns False on timeout."""
        deadline = time.monotonic() + timeout_s
        return all(e.wait_accepting(max(0.0, deadline - time.monotonic())) for e in list(self._encoders.values()))

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Flush and stop the encoders, then let every output hand over what it has and end.

        Safe to call twice or before :meth:`start`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            encoders, outputs, retired = list(self._encoders.values()), list(self._outputs.values()), self._retired
            self._retired = []
        deadline = time.monotonic() + timeout_s
        for encoder in encoders:  # their last tags reach the outputs before those stop
            encoder.close(max(1.0, deadline - time.monotonic() - 4.0))
        for output in outputs:
            output.stop()
        for output in [*outputs, *retired]:
            output.join(max(0.5, deadline - time.monotonic()))

    # ----------------------------------------------------------------- the clock's side
    def offer(self, video: np.ndarray, audio: np.ndarray) -> bool:
        """Offer one tick to every encoder without blocking.

        Args:
            video: ``(H, W, 3) uint8`` RGB frame, C-contiguous; must not be modified afterwards.
            audio: ``(N,) int16`` mono samples for this frame.

        Returns:
            True when every encoder took it; False when one refused (down, restarting or behind:
            the clock counts the tick as dropped).

        Raises:
            ValueError: If the frame has the wrong shape or dtype.
        """
        accepted = True
        for encoder in self._encoders.values():
            accepted = encoder.offer(video, audio) and accepted
        return accepted

    # ----------------------------------------------------------------- outputs at run time
    def set_outputs(self, outputs: Sequence[OutputTarget]) -> tuple[list[str], list[str]]:
        """Make the outputs these, while the channel runs: new ones start, gone ones stop, others go on.

        An output whose definition changed (URL, bitrate, ``required``, token) is replaced; one that
        is the same keeps its relay, connection and counters. An encoding no output uses any more is
        stopped; a new one is started.

        Returns:
            ``(started, stopped)``: the names of the outputs started and stopped.

        Raises:
            RuntimeError: If the sink is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"channel {self._channel}: its stream is stopped")
            old_outputs, old_encoders = self._outputs, self._encoders
            kept = {t.name for t in outputs if t.name in old_outputs and old_outputs[t.name].target == t}
            gone = [o for name, o in old_outputs.items() if name not in kept]
            self._build(list(outputs), reuse={name: old_outputs[name] for name in kept}, encoders=old_encoders)
            unused = [e for key, e in old_encoders.items() if key not in self._encoders]
            new = [o for name, o in self._outputs.items() if name not in kept]
            new_encoders = [e for key, e in self._encoders.items() if key not in old_encoders]
            for output in gone:
                output.stop()
            self._retired = [o for o in self._retired if not o.reap()] + gone
            if self._started:
                for encoder in new_encoders:
                    encoder.start()
                for output in new:
                    output.start()
        for encoder in unused:  # outside the lock: an encoder flushes for up to 4 s
            encoder.close()
        logger.info(
            "channel %s: outputs now %s (started %s, stopped %s)",
            self._channel,
            ", ".join(self._outputs) or "none",
            ", ".join(o.name for o in new) or "none",
            ", ".join(o.name for o in gone) or "none",
        )
        return [o.name for o in new], [o.name for o in gone]

    def _build(
        self,
        targets: list[OutputTarget],
        reuse: dict[str, Output] | None = None,
        encoders: dict[Encoding, Encoder] | None = None,
    ) -> None:
        """Publish the encoders and outputs for ``targets`` (``_lock`` held, or in ``__init__``)."""
        reuse, encoders = reuse or {}, encoders or {}
        new_encoders: dict[Encoding, Encoder] = {}
        new_outputs: dict[str, Output] = {}
        for target in targets:
            key = encoding_for(target, self._stream, self._width, self._height)
            encoder = new_encoders.get(key) or encoders.get(key)
            if encoder is None:
                settings = EncoderSettings(self._stream, self._width, self._height, key)
                encoder = Encoder(settings, self._work_dir, Fanout(GOP_CACHE_MAX_BYTES), self._channel)
            new_encoders[key] = encoder
            output = reuse.get(target.name)
            if output is None:
                output = Output(
                    target, settings=self._settings, fanout=encoder.fanout, encoding=key.label, channel=self._channel
                )
            new_outputs[target.name] = output
        self._encoders = new_encoders
        self._outputs = new_outputs

    # ----------------------------------------------------------------- health
    def alive(self) -> bool:
        """True unless an encoder's or output's supervising thread died or deadlocked (the watchdog asks)."""
        now = time.monotonic()
        parts: list[Encoder | Output] = [*self._encoders.values(), *self._outputs.values()]
        return all(p.alive(now, SUPERVISOR_STALE_S) for p in parts)

    def stats(self) -> EgressStats:
        """A snapshot of every encoder and output."""
        encoders = tuple(e.stats() for e in list(self._encoders.values()))
        first = encoders[0] if encoders else None
        return EgressStats(
            up=all(e.up for e in encoders),
            restarts=sum(e.restarts for e in encoders),
            pid=first.pid if first else None,
            last_error=next((e.last_error for e in encoders if e.last_error), ""),
            encoders=encoders,
            outputs=tuple(o.health() for o in list(self._outputs.values())),
        )

    def outputs(self) -> list[OutputTarget]:
        """The outputs as they are now, in order."""
        return [o.target for o in list(self._outputs.values())]
