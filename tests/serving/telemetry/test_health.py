"""The typed health snapshot: every field reaches /health's JSON and the Prometheus exposition."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from latentsync.serving.egress.frames import FramesHealth
from latentsync.serving.egress.outputs import OutputHealth
from latentsync.serving.egress.whep import WebRtcHealth
from latentsync.serving.telemetry.health import HealthSnapshot, StreamFormat, WorkersHealth
from latentsync.serving.telemetry.metrics import (
    COUNTERS,
    GAUGES,
    QUEUES,
    SPECIAL,
    TO_BASE_UNIT,
    ServerMetrics,
    server_wide,
)


def snapshot() -> HealthSnapshot:
    """Every numeric field a different value, so a metric exporting the wrong field is caught."""
    workers = WorkersHealth(
        count=2, pids=(101, 102), rebuilds=3, in_flight=4, queued=5, retried=6, failed=7, completed=8, dispatches=9
    )
    webrtc = WebRtcHealth(
        viewers=25,
        viewers_total=26,
        frames_encoded=27,
        keyframes=28,
        inbox_dropped_ticks=29,
        viewer_dropped_packets=30,
        dropped_candidates=38,
        codec="h264",
        width=480,
        height=720,
    )
    return HealthSnapshot(
        state="speaking",
        uptime_s=10.5,
        ticking=True,
        streaming=True,
        frames_emitted=11,
        ticks=12,
        late_ticks=13,
        dropped_ticks=14,
        underrun_ticks=15,
        tick_errors=61,
        programs_failed=62,
        max_tick_lateness_ms=16.5,
        ffmpeg_up=True,
        ffmpeg_restarts=17,
        ffmpeg_pid=18,
        ffmpeg_last_error="boom",
        outputs=(
            OutputHealth(
                name="yt",
                kind="rtmp",
                url="rtmp://h/live/***",
                required=True,
                state="live",
                encoding="2500k",
                bytes_out=41,
                frames_out=42,
                last_progress_s=0.5,
                restarts=43,
                stalls=44,
                last_error="",
                pid=45,
            ),
            OutputHealth(
                name="rec",
                kind="record",
                url="record:a.mkv",
                required=False,
                state="backoff",
                encoding="2500k",
                bytes_out=51,
                frames_out=52,
                last_progress_s=None,
                restarts=53,
                stalls=54,
                last_error="full",
                pid=None,
            ),
        ),
        engine="parametric",
        engine_ready=True,
        engine_error="no gpu",
        on_air_task="t1",
        stream=StreamFormat(640, 360, 25, 48000),
        workers=workers,
        webrtc=webrtc,
        frames=FramesHealth(
            clients=31,
            clients_total=32,
            encoders=33,
            frames_encoded=34,
            ticks_sent=35,
            client_dropped_ticks=36,
            inbox_dropped_ticks=37,
        ),
        playlist=19,
        tasks_waiting=20,
        tasks_admitted=21,
        tasks_final={"done": 22, "failed": 23, "cancelled": 24},
    )


def field_paths() -> set[str]:
    paths = {f.name for f in dataclasses.fields(HealthSnapshot)} - {"workers", "webrtc", "frames"}
    paths |= {f"webrtc.{f.name}" for f in dataclasses.fields(WebRtcHealth)}
    paths |= {f"frames.{f.name}" for f in dataclasses.fields(FramesHealth)}
    return paths | {f"workers.{f.name}" for f in dataclasses.fields(WorkersHealth)}


def samples() -> dict[tuple[str, tuple], float]:
    text = ServerMetrics(snapshot).render().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_every_field_is_exported_and_in_the_health_json():
    exported = {p for p, _, _ in COUNTERS} | {p for p, _, _ in GAUGES} | {p for p, _ in QUEUES} | set(SPECIAL)
    assert field_paths() == exported, "a snapshot field without an export, or an export of no field"
    body = snapshot().to_json()
    for path in field_paths():
        node = body
        for name in path.split("."):
            assert name in node, f"/health lacks {path}"
            node = node[name]
    assert body["workers"]["pids"] == [101, 102] and body["stream"]["fps"] == 25
    assert [o["name"] for o in body["outputs"]] == ["yt", "rec"] and body["outputs"][0]["state"] == "live"


def test_metric_values_come_from_their_fields():
    s, got = snapshot(), samples()

    def value(path):
        node = s
        for name in path.split("."):
            node = getattr(node, name)
        return float(node)

    main = (("channel", "main"),)  # one snapshot: the default channel
    for path, name, _ in COUNTERS:
        assert got[(f"{name}_total", () if server_wide(path) else main)] == value(path), name
    for path, name, _ in GAUGES:
        assert got[(name, () if server_wide(path) else main)] == TO_BASE_UNIT.get(path, 1.0) * value(path), name
    assert got[("latentsync_max_tick_lateness_seconds", main)] == 0.0165  # 16.5 ms in /health
    for path, label in QUEUES:
        channel = "" if server_wide(path) else "main"
        assert got[("latentsync_queue_depth", (("channel", channel), ("queue", label)))] == value(path), label
    assert got[("latentsync_stream_state", (*main, ("state", "speaking")))] == 1.0
    assert got[("latentsync_stream_state", (*main, ("state", "idle")))] == 0.0
    assert got[("latentsync_tasks_total", (*main, ("state", "failed")))] == 23
    assert got[("latentsync_engine_info", (("engine", "parametric"),))] == 1.0
    assert got[("latentsync_engine_broken", ())] == 1.0 and got[("latentsync_task_on_air", main)] == 1.0
    assert got[("latentsync_stream_format", (*main, ("dimension", "height")))] == 360
    yt, rec = (*main, ("output", "yt")), (*main, ("output", "rec"))
    assert got[("latentsync_output_state", (*main, ("kind", "rtmp"), ("output", "yt"), ("state", "live")))] == 1.0
    assert got[("latentsync_output_state", (*main, ("kind", "record"), ("output", "rec"), ("state", "live")))] == 0.0
    assert got[("latentsync_output_state", (*main, ("kind", "record"), ("output", "rec"), ("state", "backoff")))] == 1
    assert (got[("latentsync_output_required", yt)], got[("latentsync_output_required", rec)]) == (1.0, 0.0)
    assert (got[("latentsync_output_bytes_total", yt)], got[("latentsync_output_frames_total", rec)]) == (41, 52)
    assert (got[("latentsync_output_restarts_total", yt)], got[("latentsync_output_stalls_total", rec)]) == (43, 54)
    assert got[("latentsync_output_last_progress_age_seconds", yt)] == 0.5
    assert ("latentsync_output_last_progress_age_seconds", rec) not in got  # never made progress: no sample


def test_every_channel_gets_its_own_series_and_the_pool_one():
    """Two channels: per-stream series once per channel, the shared pool's series once."""
    a = snapshot()
    b = dataclasses.replace(a, ticks=99, state="idle", tasks_final={"done": 1})
    text = ServerMetrics(lambda: {"main": a, "shop": b}).render().decode()
    got = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            got[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert got[("latentsync_ticks_handled_total", (("channel", "main"),))] == 12
    assert got[("latentsync_ticks_handled_total", (("channel", "shop"),))] == 99
    assert got[("latentsync_stream_state", (("channel", "shop"), ("state", "idle")))] == 1.0
    assert got[("latentsync_tasks_total", (("channel", "shop"), ("state", "done")))] == 1
    assert got[("latentsync_worker_restarts_total", ())] == 3  # the shared pool: one series
    assert sum(1 for name, _ in got if name == "latentsync_worker_restarts_total") == 1


def test_a_snapshot_before_start_exports_zeros_not_errors():
    early = HealthSnapshot(state="starting", uptime_s=0.1)
    body = early.to_json()
    assert "workers" not in body and body["stream"] is None and body["engine_ready"] is False
    text = ServerMetrics(lambda: early).render().decode()
    assert 'latentsync_queue_depth{channel="",queue="pool_queued"} 0.0' in text


def promtool() -> str:
    """Debian's promtool, unpacked by ``scripts/prometheus.sh install`` (make test runs it); skipped without it
    outside CI, a failure in CI."""
    found = subprocess.run(
        ["bash", str(Path(__file__).resolve().parents[3] / "scripts" / "prometheus.sh"), "path", "promtool"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if found.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is missing (scripts/prometheus.sh install)")
        pytest.skip("promtool is missing (scripts/prometheus.sh install)")
    return found.stdout.strip()


def test_promtool_finds_nothing_to_flag_in_the_exposition():
    """``promtool check metrics`` (Prometheus' own linter: base units in names, counters ending in ``_total``,
    help on every family) on what ``/metrics`` serves for two channels and a Ray pool with one actor."""
    from latentsync.serving.compute.ray_worker_pool import ActorStats

    base = snapshot()
    actor = ActorStats(
        index=0, node="0123456789ab", pid=7, state="ready", jobs=3, failures=1, restarts=0, latency_ms=41
    )
    ray = dataclasses.replace(base, workers=dataclasses.replace(base.workers, backend="ray", actors=(actor,)))
    metrics = ServerMetrics(lambda: {"main": ray, "shop": dataclasses.replace(ray, state="idle")})
    metrics.observe_chunk(16, 0.4)
    metrics.observe_ttff(0.3)
    text = metrics.render()
    assert b"latentsync_pool_worker_latency_seconds" in text and b"process_resident_memory_bytes" in text
    checked = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, timeout=30)
    said = (checked.stdout + checked.stderr).decode(errors="replace").strip()
    assert checked.returncode == 0 and not said, said
