"""A failing channel never takes the server down, whatever moment of the server's life it fails in.

The real server (parametric engine, the session's nginx-rtmp) is started several times; a seeded
driver sends PUT and DELETE of valid and failing channels without pause through its whole life:
start-up (the API answers, ``main`` not yet on air), engine start (on air, workers loading),
ready, a pool rebuild (an engine worker SIGKILLed) and shutdown (SIGTERM, sent at a moment the
seed picks: sometimes before the engine is ready). Failing channels fail every way a channel can:
an idle video that is not a video (its start fails), a video without a face (its avatar fails), an
RTMP server that is not there (ready, its FFmpeg keeps restarting), plus a ``channels_file`` that
keeps a channel whose video was spoiled since and a ``main`` avatar that no longer decodes.

Each life must: never exit before SIGTERM, then exit 0 within 15 s leaving no process and no work
directory behind; keep ``main``'s dropped ticks at their count when it first streamed; answer
every ``GET /channels`` within 200 ms; answer every request with a JSON status it documents (never
a 500); and write to ``channels_file`` only channels that reached ``ready``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from latentsync.serving.ops import procfs
from tests.datafiles import make_faceless_video, media_file
from tests.streamtools import Api, ServerProcess, free_port, require_rtmp_tools, seconds_until

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

VIDEO = "video/nanmote002.mp4"  # 256x456: small, so a few channels fit on CI's two cores
#: When SIGTERM is sent, life by life (the seed is the life's index): after a pool rebuild, or earlier.
TERMINATE_AT = ("after rebuild", "engine start", "after rebuild", "start-up", "pool rebuild", "after rebuild")
PHASES = ("start-up", "engine start", "ready", "pool rebuild", "shutdown")
MIN_INTERLEAVINGS = 200
LIST_BUDGET_S = 0.2  # GET /channels answers within this, always
REBUILD_WINDOW_S = 2.0  # "pool rebuild": this long after the SIGKILL, and until the pool counted a rebuild
LIFE_TIMEOUT_S = 120.0
#: The statuses each request may answer (docs/channels.md); 0 only once SIGTERM was sent (connection refused).
ALLOWED = {"PUT": {200, 202, 400, 409, 503}, "DELETE": {200, 400, 404}}


def request(api: Api, method: str, path: str, values: dict | None = None, timeout_s: float = 2.0):
    """``(status, body, seconds)``; status 0 when nothing answered (refused, reset or timed out)."""
    data = json.dumps(values).encode() if values is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(api.base + path, data=data, method=method, headers=headers)
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read() or b"{}"), time.monotonic() - t
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), time.monotonic() - t
    except (OSError, ValueError):
        return 0, {}, time.monotonic() - t


def descendants(pid: int) -> dict[tuple[int, int], str]:
    """Every descendant of ``pid``: ``(pid, start time in ticks)`` (a reused pid is not confused) -> its command."""
    stats = procfs.process_stats()
    return {(p, stats[p].starttime_ticks): procfs.command_line(p)[:160] for p in procfs.descendants(pid, stats)}


def alive(process: tuple[int, int]) -> bool:
    found = procfs.read_stat(process[0])
    return found is not None and found.starttime_ticks == process[1] and found.alive


class Life:
    """One server life driven by one seed; :meth:`run` returns what it saw."""

    def __init__(self, seed: int, overrides: list[str], kinds: dict[str, dict], tmp: Path):
        self.rng = random.Random(seed)
        self.terminate_at = TERMINATE_AT[seed % len(TERMINATE_AT)]
        self.kinds = kinds
        tmpdir = tmp / f"tmp-{seed}"
        tmpdir.mkdir()
        self.tmpdir = tmpdir
        self.server = ServerProcess(overrides, tmp / f"server-{seed}.log", tmpdir=tmpdir)
        self.api = Api(self.server.port)
        self.ops: Counter = Counter()  # (phase, method) -> PUT/DELETE requests sent in that phase
        self.list_s: list[tuple[float, str, str]] = []  # GET /channels: (seconds, phase, wall clock)
        self.failed_seen: dict[str, str] = {}  # channel -> its error, as GET /channels reported it
        self.processes: dict[tuple[int, str], str] = {}

    def phase(self, health: dict, answered: bool, now: float) -> str:
        if self.term_time is not None:
            return "shutdown"
        if self.kill_time is not None and (
            now - self.kill_time < REBUILD_WINDOW_S or health.get("workers", {}).get("rebuilds", 0) == 0
        ):
            return "pool rebuild"
        if not answered:
            return "before"
        if not health.get("streaming"):
            return "start-up"
        return "ready" if health.get("engine_ready") else "engine start"

    def run(self) -> dict:
        server, rng = self.server, self.rng
        self.kill_time = self.term_time = None
        kill_due = term_due = None
        dropped_first = dropped_last = None
        server.start()
        t0 = time.monotonic()
        for step in range(10**6):
            now = time.monotonic()
            assert now - t0 < LIFE_TIMEOUT_S, f"life did not end within {LIFE_TIMEOUT_S} s:\n{server.log()}"
            if server.proc.poll() is not None:
                assert self.term_time is not None, f"the server exited before SIGTERM:\n{server.log()}"
                break
            if step % 5 == 0:
                self.processes |= descendants(server.proc.pid)
            status, health, _ = request(self.api, "GET", "/health")
            phase = self.phase(health, status != 0, now)
            if self.term_time is None and health.get("streaming"):
                dropped_last = health["dropped_ticks"]
                dropped_first = dropped_last if dropped_first is None else dropped_first
            if phase == "ready" and kill_due is None:
                kill_due = now + rng.uniform(0.3, 1.5)
                if self.terminate_at == "after rebuild":
                    term_due = kill_due + REBUILD_WINDOW_S + rng.uniform(0.5, 2.5)
            if kill_due is not None and self.kill_time is None and now >= kill_due:
                pids = health.get("workers", {}).get("pids") or []
                assert pids, health
                os.kill(rng.choice(pids), signal.SIGKILL)
                self.kill_time = now
                if self.terminate_at == "pool rebuild":
                    term_due = now + rng.uniform(0.1, 1.5)
            if term_due is None and phase == self.terminate_at:
                term_due = now + rng.uniform(0.0, 0.4)
            if self.term_time is None and term_due is not None and now >= term_due:
                self.processes |= descendants(server.proc.pid)
                server.proc.send_signal(signal.SIGTERM)
                self.term_time = now
                phase = "shutdown"
            self.one_op(phase)
            self.check_list(phase)
            time.sleep(rng.expovariate(1 / 0.03))
        code, took_s = server.stop(timeout_s=15.0)
        return {
            "code": code,
            "stop_s": time.monotonic() - self.term_time,
            "dropped": (dropped_first, dropped_last),
        }

    def one_op(self, phase: str) -> None:
        rng = self.rng
        name = rng.choice([*self.kinds, "main"])
        method = "PUT" if rng.random() < 0.55 else "DELETE"
        values = None
        if method == "PUT":  # on an existing channel: an avatar switch (idle_pingpong) or nothing to change
            values = {**self.kinds.get(name, {}), "idle_pingpong": rng.random() < 0.5}
        status, body, _ = request(self.api, method, f"/channels/{name}", values)
        if phase == "before":
            return  # the API is not listening yet: nothing was sent
        self.ops[phase, method] += 1
        if status == 0:
            assert phase == "shutdown", f"{method} {name} unanswered in {phase}:\n{self.server.log()}"
            return
        allowed = ALLOWED[method] | ({503} if phase == "shutdown" else set())
        assert status in allowed and ("error" in body or status < 400), (method, name, phase, status, body)

    def check_list(self, phase: str) -> None:
        status, body, took_s = request(self.api, "GET", "/channels")
        if phase in ("before", "shutdown"):
            return
        assert status == 200, (phase, status, body)
        self.list_s.append((took_s, phase, time.strftime("%H:%M:%S")))
        channels = body["channels"]
        assert channels[0]["name"] == "main", channels
        for c in channels:
            assert c["status"] in ("created", "starting", "ready", "failed", "stopping", "stopped"), c
            assert (c["status"] == "failed") == (c["error"] is not None), c
            if c["status"] == "failed":
                self.failed_seen[c["name"]] = c["error"]


def test_put_and_delete_at_any_moment_never_take_the_server_down(rtmp_server, tmp_path):
    require_rtmp_tools()
    video = tmp_path / "presenter.mp4"  # every video the API names lies under media.root
    shutil.copy(media_file(VIDEO), video)
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video\n")
    spoiled = tmp_path / "spoiled.mp4"  # was a video when the API kept it; it is not any more
    spoiled.write_text("not a video any more\n")
    faceless = make_faceless_video(tmp_path / "faceless.mp4")
    kinds = {
        "v1": {"rtmp_url": rtmp_server.url("faults-v1"), "idle_video": str(video)},
        "v2": {"rtmp_url": rtmp_server.url("faults-v2"), "idle_video": str(video)},
        "r1": {"rtmp_url": f"rtmp://127.0.0.1:{free_port()}/live/r1", "idle_video": str(video)},  # nothing listens
        "b1": {"rtmp_url": rtmp_server.url("faults-b1"), "idle_video": str(broken)},
        "f1": {"rtmp_url": rtmp_server.url("faults-f1"), "idle_video": str(faceless)},
    }
    channels_file = tmp_path / "channels.json"
    kept_bad = {"name": "kept", "rtmp_url": rtmp_server.url("faults-kept"), "idle_video": str(spoiled)}
    live_main = {"avatar": None, "idle_video": str(spoiled), "video": None}
    channels_file.write_text(
        json.dumps({"version": 1, "created": [kept_bad], "deleted": [], "live": {"main": live_main}})
    )
    overrides = [
        f"avatar.idle_video={video}",
        "engine.name=parametric",
        "webrtc.enabled=false",
        f"avatar.cache_dir={tmp_path / 'avatars'}",
        f"channels_file={channels_file}",
        f"media.root={tmp_path}",
        "api.mutations_per_min=0",  # the seeded client changes channels faster than a person would
    ]
    interleavings: Counter = Counter()
    lists: list[tuple[float, str, str]] = []
    for seed in range(len(TERMINATE_AT) + 2):
        key = f"faults-main-{seed}"
        life = Life(seed, [*overrides, f"stream.rtmp_url={rtmp_server.url(key)}"], kinds, tmp_path)
        seen = life.run()
        log = life.server.log()
        assert seen["code"] == 0 and seen["stop_s"] < 15.0, (seen, log)
        first, last = seen["dropped"]
        assert first is not None or life.terminate_at == "start-up", f"main never streamed:\n{log}"
        assert last == first, f"main dropped {(last or 0) - (first or 0)} ticks once streaming (life {seed}):\n{log}"
        seconds_until(lambda life=life: not any(alive(p) for p in life.processes), 5.0)
        left = [command for p, command in life.processes.items() if alive(p)]
        assert not left, f"processes left behind by life {seed}: {left}"
        assert not list(life.tmpdir.glob("latentsync-rt-*")), f"work directories left by life {seed}"
        state = json.loads(channels_file.read_text())
        created = {c["name"] for c in state["created"]}
        assert created <= {"v1", "v2", "r1", "kept"}, state  # never a channel that did not reach ready
        assert "kept" in created, state  # skipped at start, still kept (a DELETE removes it)
        assert state["live"].get("main", {}).get("idle_video") != str(spoiled), state  # main's bad avatar dropped
        if life.terminate_at == "after rebuild":  # it had the time to fail, and was reported with its error
            assert "MediaProbeError" in life.failed_seen.get("kept", ""), life.failed_seen
        interleavings.update(life.ops)
        lists += life.list_s
    per_phase = {p: sum(n for (phase, _), n in interleavings.items() if phase == p) for p in PHASES}
    total = sum(per_phase.values())
    print(f"{total} interleavings by phase: {per_phase}; GET /channels slowest {sorted(lists)[-5:]}")
    assert total >= MIN_INTERLEAVINGS and all(n >= 5 for n in per_phase.values()), per_phase
    assert max(lists)[0] <= LIST_BUDGET_S, sorted(lists)[-5:]
