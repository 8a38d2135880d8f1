"""Outputs and the egress sink without a server: real relay FFmpegs fed from a real FLV, fakes only for the clock.

A black-hole TCP server (accepts, never reads or answers) stands in for a destination that freezes
during its handshake; a recording in a temporary folder is the destination that works.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import imageio_ffmpeg
import numpy as np
import pytest

from latentsync.config import channel_outputs, load_config
from latentsync.serving.egress.fanout import Fanout
from latentsync.serving.egress.flv import FlvReader
from latentsync.serving.egress.outputs import Output, OutputSettings, OutputState
from latentsync.serving.egress.sink import SUPERVISOR_STALE_S, EgressSink
from latentsync.serving.playout.tap import TappedSink
from tests.streamtools import analyse_recording, seconds_until

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


@pytest.fixture(scope="module")
def flv_tags():
    """20 s of 128x128 H.264 (keyframe every second) + AAC as FLV: the header and its tags."""
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=s=128x128:r=25:d=20",
           "-f", "lavfi", "-i", "sine=r=48000:d=20", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25",
           "-c:a", "aac", "-flvflags", "no_duration_filesize", "-f", "flv", "pipe:1"]  # fmt: skip
    data = subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout
    reader = FlvReader()
    tags = list(reader.feed(data))
    return reader.header, tags


class Feeder(threading.Thread):
    """Publishes the tags into a fan-out at their own pace (as the encoder's pump would)."""

    def __init__(self, fanout: Fanout, header: bytes, tags):
        super().__init__(daemon=True)
        self.fanout, self.header, self.tags = fanout, header, tags
        self.stop_event = threading.Event()

    def run(self) -> None:
        self.fanout.reset()
        self.fanout.set_header(self.header)
        t0 = time.monotonic()
        first = self.tags[0].timestamp_ms
        for tag in self.tags:
            due = t0 + (tag.timestamp_ms - first) / 1000
            if self.stop_event.wait(max(0.0, due - time.monotonic())):
                return
            self.fanout.publish(tag)


def black_hole() -> tuple[socket.socket, int]:
    """A TCP server that accepts connections and never reads or writes (a frozen ingest)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server, server.getsockname()[1]


@pytest.mark.ffmpeg
def test_a_frozen_destination_stalls_alone_and_a_recording_beside_it_is_whole(flv_tags, tmp_path):
    header, tags = flv_tags
    hole, port = black_hole()
    cfg = load_config(
        None,
        [
            f"stream.record_dir={tmp_path}",
            "egress.stall_timeout_s=1.0",
            "stream.restart_backoff_min_s=0.2",
            "stream.restart_backoff_max_s=0.5",
            f"stream.outputs=[{{url: 'rtmp://127.0.0.1:{port}/live/k', name: frozen}}, {{url: 'record:ok.mkv'}}]",
        ],
    )
    frozen_target, record_target = channel_outputs(cfg)
    fanout = Fanout(1 << 22)
    settings = OutputSettings(cfg.egress, cfg.stream)
    frozen = Output(frozen_target, settings=settings, fanout=fanout, encoding="test", channel="test")
    record = Output(record_target, settings=settings, fanout=fanout, encoding="test", channel="test")
    feeder = Feeder(fanout, header, tags[: 12 * 75])  # 12 s
    states = []
    try:
        feeder.start()
        frozen.start()
        record.start()
        assert seconds_until(lambda: record.state is OutputState.live, 10) is not None
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            states.append(frozen.state)
            time.sleep(0.05)
        health = frozen.health()
        assert health.stalls >= 2 and health.restarts >= 2, health  # stalled, killed, tried again, again
        assert OutputState.live not in states and {OutputState.stalled, OutputState.connecting} <= set(states)
        assert "stalled: no bytes left" in health.last_error
        assert record.state is OutputState.live and record.health().restarts == 0
    finally:
        feeder.join(20)
        record.close()
        frozen.close()
        hole.close()
    assert record.state is OutputState.stopped and frozen.state is OutputState.stopped
    assert record.health().pid is None and frozen.health().pid is None  # no relay left behind
    (path,) = sorted(tmp_path.glob("ok-000-*.mkv"))
    rec = analyse_recording(path)
    # whole: from its first keyframe to the feeder's last tag (the graceful stop flushed it)
    assert rec.video_duration_s >= 11.0 and round(rec.fps) == 25


@pytest.mark.ffmpeg
def test_a_recording_starts_with_the_current_gop_and_its_timestamps_at_zero(flv_tags, tmp_path):
    header, tags = flv_tags
    cfg = load_config(None, [f"stream.record_dir={tmp_path}", "stream.outputs=[{url: 'record:late.mkv'}]"])
    fanout = Fanout(1 << 22)
    feeder = Feeder(fanout, header, tags[: 6 * 75])
    feeder.start()
    time.sleep(2.5)  # the output joins mid-stream, half a GOP after a keyframe
    output = Output(
        channel_outputs(cfg)[0],
        settings=OutputSettings(cfg.egress, cfg.stream),
        fanout=fanout,
        encoding="test",
        channel="test",
    )
    output.start()
    feeder.join(20)
    output.close()
    (path,) = sorted(tmp_path.glob("late-000-*.mkv"))
    rec = analyse_recording(path)
    assert rec.video_pts_ms[0] == 0 and rec.video_duration_s >= 3.4  # it started at 2 s, not at 3 s


def test_taps_see_every_tick_whatever_the_encoders_say():
    class Refusing:
        def offer(self, video, audio):
            return False

    seen = []
    tap = TappedSink(Refusing(), [lambda i, v, a: seen.append(i)])
    frame, audio = np.zeros((4, 4, 3), np.uint8), np.zeros(1920, np.int16)
    assert [tap.offer(frame, audio) for _ in range(5)] == [False] * 5
    assert seen == [0, 1, 2, 3, 4]  # a refused tick is still the programme


def test_outputs_change_without_touching_the_others_and_encoders_follow(tmp_path):
    cfg = load_config(
        None,
        [
            "stream.x264_preset=superfast",  # so WHIP needs an encoding of its own
            "stream.outputs=[{url: 'rtmp://127.0.0.1/live/a', name: a}, {url: 'srt://127.0.0.1:9000', name: b}]",
        ],
    )
    sink = EgressSink(
        cfg.stream,
        egress=cfg.egress,
        width=256,
        height=256,
        outputs=channel_outputs(cfg),
        work_dir=tmp_path,
        channel="test",
    )
    a, b = (sink._outputs[n] for n in ("a", "b"))  # noqa: SLF001 - the objects themselves are the point
    assert len(sink.stats().encoders) == 1
    more = load_config(
        None,
        [
            "stream.outputs=[{url: 'rtmp://127.0.0.1/live/a', name: a}, {url: 'srt://127.0.0.1:9001', name: b},"
            " {url: 'http://127.0.0.1:8889/whip', name: w}]"
        ],
    )
    started, stopped = sink.set_outputs(channel_outputs(more))
    assert (started, stopped) == (["b", "w"], ["b"])  # b's URL changed: replaced; a untouched
    assert sink._outputs["a"] is a and sink._outputs["b"] is not b  # noqa: SLF001
    assert [e.encoding for e in sink.stats().encoders] == ["2500k", "2500k-baseline"]
    sink.set_outputs(channel_outputs(more)[:1])
    assert [o.name for o in sink.stats().outputs] == ["a"] and len(sink.stats().encoders) == 1
    sink.close()
    with pytest.raises(RuntimeError):
        sink.set_outputs(channel_outputs(cfg))


def test_a_deadlocked_supervisor_is_not_alive(tmp_path):
    cfg = load_config(None, [f"stream.record_dir={tmp_path}", "stream.outputs=[{url: 'record:x.mkv'}]"])
    output = Output(
        channel_outputs(cfg)[0],
        settings=OutputSettings(cfg.egress, cfg.stream),
        fanout=Fanout(1 << 20),
        encoding="t",
        channel="t",
    )
    stuck = threading.Event()
    output._run = lambda: stuck.wait(30)  # noqa: SLF001 - a supervisor that never loops again
    output.start()
    now = time.monotonic()
    assert output.alive(now, SUPERVISOR_STALE_S)
    assert not output.alive(now + SUPERVISOR_STALE_S + 1, SUPERVISOR_STALE_S)
    stuck.set()
    output.close()
    assert output.alive(time.monotonic() + 100, SUPERVISOR_STALE_S)  # a stopped output is no alarm


def test_a_sink_with_no_encoder_running_refuses_ticks(tmp_path):
    cfg = load_config(None, ["stream.outputs=[{url: 'rtmp://127.0.0.1/live/a'}]"])
    sink = EgressSink(
        cfg.stream,
        egress=cfg.egress,
        width=16,
        height=16,
        outputs=channel_outputs(cfg),
        work_dir=tmp_path,
        channel="test",
    )
    assert not sink.offer(np.zeros((16, 16, 3), np.uint8), np.zeros(1920, np.int16))  # not started
    with pytest.raises(ValueError):
        sink.offer(np.zeros((8, 8, 3), np.uint8), np.zeros(1920, np.int16))
    assert sink.stats().encoders[0].refused_ticks == 1
    sink.close()
