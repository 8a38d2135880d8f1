"""Outputs as peers, against real destinations: each fault while speech is on air, the others untouched.

One server (parametric engine) sends channel ``main`` to six outputs at once: two nginx-rtmp
servers of their own (``a`` and ``b``), an FFmpeg SRT listener (``srt``), an aiortc WHIP endpoint
(``whip``), HLS segments and recording files (``hls``, ``rec``, on a small tmpfs so that the disk
can be filled). A WHEP viewer and a frames WebSocket client watch throughout. Faults: ``a`` frozen
(``kill -STOP``) for 30 s, ``a`` killed and started again, the SRT listener gone and back, the WHIP
endpoint answering 503 then 201, the output filesystem full. Run with ``-s`` for the fault table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from latentsync.serving.egress.frames_protocol import split_message
from tests.datafiles import make_moving_bar_video, media_file, speech_wav
from tests.frames_ws import RawWebSocket
from tests.streamtools import (
    FFMPEG,
    Api,
    RtmpServer,
    ServerProcess,
    StreamRecorder,
    analyse_recording,
    packet_pts_s,
    require_rtmp_tools,
    seconds_until,
)
from tests.whep_client import WhepViewer
from tests.whip_receiver import WhipReceiver

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

FPS = 25
SIZE = (256, 456)  # the moving-bar idle clip's size: the channel's
STALL_S = 5.0  # egress.stall_timeout_s (the default)
FREEZE_S = 30.0
RECOVERY_S = 5.0
AAC_FRAME = 1024  # samples per AAC frame
TABLE: list[tuple[str, str, str, str]] = []  # (fault, detected after, recovered after, what the others saw)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SrtListener:
    """FFmpeg as an SRT listener on loopback, writing what arrives to MPEG-TS files (one per start)."""

    def __init__(self, folder: Path):
        self.port = free_udp_port()
        self.folder = folder
        self.files: list[Path] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        path = self.folder / f"srt-{len(self.files)}.ts"
        self.files.append(path)
        cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
               "-i", f"srt://127.0.0.1:{self.port}?mode=listener", "-c", "copy", "-f", "mpegts", str(path)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class FramesWatcher(threading.Thread):
    """A frames WebSocket client that reads every message; keeps (arrival time, tick, ticks lost)."""

    def __init__(self, port: int):
        super().__init__(name="frames-watcher", daemon=True)
        self.ws = RawWebSocket(port, "/ws/frames")
        self.ws.send_json({"type": "hello", "format": "jpeg", "width": SIZE[0], "height": SIZE[1], "audio": "none"})
        self.rows: list[tuple[float, int, int]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            message = self.ws.receive(10.0)
            if message is None:
                return
            if isinstance(message, str):  # a JSON message (the server's answer to the hello)
                continue
            header, _, _ = split_message(message)
            self.rows.append((time.monotonic(), header.tick, header.dropped_ticks))

    def stop(self) -> list[tuple[float, int, int]]:
        self.stop_event.set()
        self.join(15)
        self.ws.close()
        return self.rows


class WhepWatcher(threading.Thread):
    """A WHEP viewer (aiortc) receiving video on a loop of its own; keeps each frame's arrival time."""

    def __init__(self, base_url: str):
        super().__init__(name="whep-watcher", daemon=True)
        self.viewer = WhepViewer(base_url)
        self.arrivals: list[float] = []
        self.stop_event = threading.Event()
        self.connected = threading.Event()
        self.status: int | None = None

    def run(self) -> None:
        async def main() -> None:
            self.status = (await self.viewer.connect())[0]
            self.connected.set()
            if self.status == 201:
                await self.viewer.watch(self.stop_event, self.arrivals)
            await self.viewer.close()

        asyncio.run(main())

    def stop(self) -> list[float]:
        self.stop_event.set()
        self.join(15)
        return self.arrivals


def between(times, start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


@pytest.fixture(scope="module")
def house(tmp_path_factory):
    """The server with six outputs and every destination, for the whole module."""
    require_rtmp_tools()
    tmp = tmp_path_factory.mktemp("outputs")
    disk = tmp / "disk"  # HLS and recordings: a small filesystem of their own, so it can be filled
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True
    ).returncode == 0  # fmt: skip
    servers = {name: RtmpServer(tmp / f"rtmp-{name}") for name in ("a", "b")}
    for server in servers.values():
        server.start()
    srt = SrtListener(tmp)
    srt.start()
    whip = WhipReceiver()
    idle = make_moving_bar_video(tmp / "moving_bar.mp4")  # every tick differs: frames can be aligned
    (disk / "hls").mkdir()
    (disk / "rec").mkdir()
    outputs = ", ".join(
        [
            f"{{name: a, url: '{servers['a'].url('main')}'}}",
            f"{{name: b, url: '{servers['b'].url('main')}'}}",
            f"{{name: srt, url: 'srt://127.0.0.1:{srt.port}', required: false}}",
            f"{{name: whip, url: '{whip.url}', required: false, bearer_token: test-token-123}}",
            "{name: hls, url: 'hls:live', required: false}",
            "{name: rec, url: 'record:main.mkv'}",
        ]
    )
    proc = ServerProcess(
        [
            f"avatar.idle_video={idle}",
            f"avatar.video={media_file('video/nanmote002.mp4')}",
            f"stream.outputs=[{outputs}]",
            f"stream.record_dir={disk / 'rec'}",
            "stream.record_max_mb=1",
            "stream.record_keep=4",
            f"egress.hls_root={disk / 'hls'}",
            f"egress.stall_timeout_s={STALL_S}",
            "webrtc.max_viewers=2",
        ],
        tmp / "server.log",
    ).start()
    proc.api = Api(proc.port)
    proc.base = f"http://127.0.0.1:{proc.port}"
    proc.servers, proc.srt, proc.whip, proc.disk, proc.mounted, proc.tmp = servers, srt, whip, disk, mounted, tmp
    proc.outputs_json = [
        {"name": "a", "url": servers["a"].url("main")},
        {"name": "b", "url": servers["b"].url("main")},
        {"name": "srt", "url": f"srt://127.0.0.1:{srt.port}", "required": False},
        {"name": "whip", "url": whip.url, "required": False, "bearer_token": "test-token-123"},
        {"name": "hls", "url": "hls:live", "required": False},
        {"name": "rec", "url": "record:main.mkv"},
    ]
    try:
        proc.wait_engine_ready()
        assert seconds_until(lambda: all_live(proc), 30) is not None, proc.log()
        yield proc
    finally:
        code, _ = proc.stop()
        whip.close()
        srt.stop()
        for server in servers.values():
            with contextlib.suppress(Exception):
                for pid in server.nginx_pids()[1] + [server.nginx_pids()[0]]:
                    os.kill(pid, signal.SIGCONT)
            server.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        if TABLE:
            print("\n| fault | detected after | recovered after | the other outputs, WHEP, frames, clock |")
            print("|---|---|---|---|")
            for row in TABLE:
                print("| " + " | ".join(row) + " |")
        assert code == 0, proc.log()


def outputs(server) -> dict[str, dict]:
    _, body = server.health()
    return {o["name"]: o for o in body.get("outputs", [])}


def all_live(server, names=("a", "b", "srt", "whip", "hls", "rec")) -> bool:
    outs = outputs(server)
    return all(outs.get(n, {}).get("state") == "live" for n in names)


def speak(server, seconds: float) -> str:
    """Put ``seconds`` of speech on air now (earlier speech is cancelled); its task id once it streams."""
    for task in server.api.request("GET", "/tasks")[1].get("tasks", []):
        if task["status"] not in ("done", "failed", "cancelled"):
            server.api.request("DELETE", f"/tasks/{task['task_id']}")
    status, body = server.api.post_audio(speech_wav(seconds))
    assert status == 202, body
    server.api.wait_task(body["task_id"], ("streaming",), timeout_s=30)
    return body["task_id"]


class Watch:
    """Polls ``/health`` on a thread: each output's state and restarts over time, and the clock's counters."""

    def __init__(self, server):
        self.server = server
        self.samples: list[tuple[float, int, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            status, body = self.server.health()
            if body:
                self.samples.append((time.monotonic(), status, body))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def first(self, predicate, after: float) -> float | None:
        """Seconds after ``after`` at which a sample first satisfied ``predicate(outputs by name)``."""
        for t, _, body in self.samples:
            if t >= after and predicate({o["name"]: o for o in body["outputs"]}):
                return t - after
        return None

    def untouched(self, names, start: float, end: float) -> list[str]:
        """What went wrong with ``names`` between two instants: any sample not live, any restart."""
        problems = []
        window = [(t, b) for t, _, b in self.samples if start <= t <= end]
        assert window, "no health sample in the window"
        first = {o["name"]: o for o in window[0][1]["outputs"]}
        for t, body in window:
            for o in body["outputs"]:
                if o["name"] in names and (o["state"] != "live" or o["restarts"] != first[o["name"]]["restarts"]):
                    problems.append(f"{o['name']} {o['state']} (restarts {o['restarts']}) at +{t - start:.1f} s")
        return problems


def clock(server) -> tuple[int, int]:
    _, body = server.health()
    return body["dropped_ticks"], body["ticks"]


def stop_nginx(server: RtmpServer, sig: int) -> None:
    master, workers = server.nginx_pids()
    for pid in [master, *workers]:
        os.kill(pid, sig)


@pytest.mark.parametrize(
    ("outputs_body", "words"),
    [
        ([{"url": "rtmp://evil.example/live/k"}], "allowed_rtmp_hosts"),
        ([{"url": "srt://203.0.113.9:9000"}], "allowed_rtmp_hosts"),
        ([{"url": "hls:../../etc"}], "hls:NAME"),
        ([{"url": "record:/etc/cron.d/x.mkv"}], "record:FILE"),
        ([{"url": "rtmp://127.0.0.1/live/k|[f=null]/tmp/x"}], "not allowed"),
        ([{"url": "rtmp://127.0.0.1/live/k -f null"}], "not allowed"),
        ([{"url": "srt://127.0.0.1:9000?mode=listener"}], "caller"),
        ([{"url": "file:///etc/passwd"}], "scheme"),
        ([{"url": f"rtmp://127.0.0.1:1935/live/k{i}"} for i in range(17)], "egress.max_outputs"),
        ([], "at least one output"),
        ("rtmp://127.0.0.1/live/k", "list"),
    ],
)
def test_hostile_outputs_are_refused_and_change_nothing(house, outputs_body, words):
    before = outputs(house)
    status, body = house.api.request(
        "PUT", "/channels/main", f'{{"outputs": {__import__("json").dumps(outputs_body)}}}'.encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 400 and body["error"]["code"] == "bad_channel", body
    assert words in body["error"]["message"], body
    after = outputs(house)
    assert after.keys() == before.keys() and all(after[n]["restarts"] == before[n]["restarts"] for n in after)


def test_outputs_added_and_removed_on_air_touch_no_other(house):
    import json

    before = outputs(house)
    more = [*house.outputs_json, {"name": "rec2", "url": "record:second.mkv", "required": False}]
    status, body = house.api.request(
        "PUT", "/channels/main", json.dumps({"outputs": more}).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, body
    assert [o["name"] for o in body["outputs"]] == ["a", "b", "srt", "whip", "hls", "rec", "rec2"]
    assert all("main?secret" not in o["url"] for o in body["outputs"])  # keys never shown
    assert seconds_until(lambda: outputs(house)["rec2"]["state"] == "live", 15) is not None
    during = outputs(house)
    assert all(during[n]["pid"] == before[n]["pid"] for n in before)  # nobody else restarted
    status, body = house.api.request(
        "PUT",
        "/channels/main",
        json.dumps({"outputs": house.outputs_json}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and "rec2" not in outputs(house)
    after = outputs(house)
    assert all(after[n]["pid"] == before[n]["pid"] for n in before)
    assert sorted((house.disk / "rec").glob("second-*.mkv"))  # it recorded while it was there


def test_a_frozen_destination_freezes_nothing_else_and_comes_back(house, tmp_path):
    """kill -STOP of ``a``'s nginx for 30 s: ``b`` keeps 25.0 fps with no gap, WHEP and frames lose no tick."""
    a, b = house.servers["a"], house.servers["b"]
    speak(house, FREEZE_S + 20)
    frames, whep = FramesWatcher(house.port), WhepWatcher(house.base)
    frames.start()
    whep.start()
    assert whep.connected.wait(15) and whep.status == 201
    recorder = StreamRecorder(b.url("main"), tmp_path / "b.flv", max_s=FREEZE_S + 25)
    time.sleep(3.0)
    dropped0, _ = clock(house)
    watch = Watch(house)
    master, workers = a.nginx_pids()
    stalls0 = outputs(house)["a"]["stalls"]
    t_stop = time.monotonic()
    stop_nginx(a, signal.SIGSTOP)
    try:
        time.sleep(FREEZE_S)
        status_frozen, body_frozen = house.health()
    finally:
        stop_nginx(a, signal.SIGCONT)
    t_cont = time.monotonic()
    back_s = seconds_until(lambda: outputs(house)["a"]["state"] == "live", 20)
    time.sleep(2.0)
    watch.stop()
    arrivals, rows = whep.stop(), frames.stop()
    path = recorder.finish(settle_s=0.5)
    dropped1, _ = clock(house)

    # The stall counter, not the state: ``stalled`` lasts only the first backoff (0.5 s), which
    # the 0.2 s /health polls of a loaded host can miss, and then the test would time the second stall.
    detected_s = watch.first(lambda o: o["a"]["stalls"] > stalls0, t_stop)
    print(f"\nfrozen a: stalled after {detected_s} s, live again {back_s} s after SIGCONT")
    assert detected_s is not None and detected_s <= STALL_S + 2.0, watch.samples[-1]
    assert back_s is not None and back_s <= RECOVERY_S, house.log()
    # /health is honest while a required output is down: 503, streaming false, a named
    assert status_frozen == 503 and not body_frozen["streaming"]
    assert {o["name"]: o for o in body_frozen["outputs"]}["a"]["state"] != "live"
    # the other outputs: live all along, never restarted
    assert watch.untouched(("b", "srt", "whip", "hls", "rec"), t_stop, t_cont) == []
    # the clock dropped nothing; the frames client and the WHEP viewer got every tick meanwhile
    assert dropped1 == dropped0
    ticks = [tick for _, tick, _ in rows]
    assert np.all(np.diff(ticks) == 1) and all(lost == 0 for _, _, lost in rows[1:])
    expected = FREEZE_S * FPS
    assert between([t for t, _, _ in rows], t_stop, t_cont) >= expected - 3
    assert between(arrivals, t_stop, t_cont) >= 0.95 * expected, (len(arrivals), between(arrivals, t_stop, t_cont))
    # b's recording: 25.0 fps without a gap through the whole freeze
    rec = analyse_recording(path)
    gaps = np.diff(rec.video_pts_ms)
    assert rec.video_duration_s >= FREEZE_S + 3 and round(rec.fps, 1) == 25.0 and gaps.max() <= 40, (
        rec.fps,
        gaps.max(),
    )
    TABLE.append(
        (
            f"`kill -STOP` of a's nginx, {FREEZE_S:.0f} s",
            f"{detected_s:.1f} s (stalled)",
            f"{back_s:.1f} s after `kill -CONT`",
            f"b/srt/whip/hls/rec live, 0 restarts; b recorded {rec.fps:.2f} fps, largest gap {gaps.max()} ms; "
            f"frames client {between([t for t, _, _ in rows], t_stop, t_cont)} ticks, 0 lost; "
            f"WHEP {between(arrivals, t_stop, t_cont)} frames; dropped ticks +{dropped1 - dropped0}",
        )
    )
    del master, workers


def test_a_killed_destination_is_reconnected_when_it_is_back(house, tmp_path):
    a = house.servers["a"]
    speak(house, 20)
    dropped0, _ = clock(house)
    watch = Watch(house)
    time.sleep(1.0)
    t_kill = time.monotonic()
    stop_nginx(a, signal.SIGKILL)
    detected_s = seconds_until(lambda: outputs(house)["a"]["state"] != "live", 15)
    time.sleep(4.0)
    (a.run_dir / "nginx.pid").unlink(missing_ok=True)
    a.start()
    t_back = time.monotonic()
    back_s = seconds_until(lambda: outputs(house)["a"]["state"] == "live" and a.publishing("main"), 20)
    time.sleep(1.0)
    watch.stop()
    dropped1, _ = clock(house)
    print(f"\nkilled a: not live after {detected_s} s, live {back_s} s after its server was back")
    assert detected_s is not None and back_s is not None and back_s <= RECOVERY_S, house.log()
    assert watch.untouched(("b", "srt", "whip", "hls", "rec"), t_kill, t_back) == []
    assert dropped1 == dropped0
    TABLE.append(
        (
            "`kill -9` of a's nginx, started again 4 s later",
            f"{detected_s:.1f} s (backoff)",
            f"{back_s:.1f} s after it was back",
            f"others live, 0 restarts; dropped ticks +{dropped1 - dropped0}",
        )
    )


def test_the_srt_listener_gone_and_back(house):
    srt = house.srt
    speak(house, 20)
    dropped0, _ = clock(house)
    watch = Watch(house)
    time.sleep(1.0)
    t_gone = time.monotonic()
    srt.stop()
    detected_s = seconds_until(lambda: outputs(house)["srt"]["state"] != "live", 20)
    assert detected_s is not None, outputs(house)["srt"]
    status_gone, _ = house.health()
    time.sleep(3.0)
    srt.start()
    t_back = time.monotonic()
    back_s = seconds_until(lambda: outputs(house)["srt"]["state"] == "live", 25)
    time.sleep(3.0)
    watch.stop()
    dropped1, _ = clock(house)
    print(f"\nSRT listener gone: not live after {detected_s} s, live {back_s} s after it was back")
    assert back_s is not None, house.log()
    assert status_gone == 200  # srt is best effort: the channel still streams
    assert watch.untouched(("a", "b", "whip", "hls", "rec"), t_gone, t_back) == []
    assert dropped1 == dropped0
    new = srt.files[-1]
    restart_listener(house)  # the listener writes its file whole, then comes back for the tests after this one
    assert new.stat().st_size > 50_000  # what arrived after the listener came back
    TABLE.append(
        (
            "the SRT listener killed, started again 3 s later",
            f"{detected_s:.1f} s (backoff)",
            f"{back_s:.1f} s after it was back",
            f"others live, 0 restarts; /health still 200 (srt best effort); dropped ticks +{dropped1 - dropped0}",
        )
    )


def restart_listener(house) -> None:
    """Stop the SRT listener (its file is complete then) and start it again; wait until srt reconnected."""
    before = outputs(house)["srt"]["restarts"]
    house.srt.stop()
    house.srt.start()
    back = seconds_until(lambda: (o := outputs(house)["srt"])["restarts"] > before and o["state"] == "live", 30)
    assert back is not None, outputs(house)["srt"]


def test_a_whip_endpoint_answering_503_then_201(house):
    whip = house.whip
    speak(house, 20)
    dropped0, _ = clock(house)
    assert all(s.authorization == "Bearer test-token-123" for s in whip.sessions)  # the token reached the endpoint
    watch = Watch(house)
    whip.refuse_with = 503
    posts = whip.posts
    t_fault = time.monotonic()
    os.kill(outputs(house)["whip"]["pid"], signal.SIGKILL)  # the session ends: the relay must publish again
    refused = seconds_until(lambda: whip.posts >= posts + 2, 20)  # it kept trying, and got 503s
    state = outputs(house)["whip"]
    assert refused is not None and state["state"] != "live", state
    assert "503" in state["last_error"] or state["last_error"], state
    whip.refuse_with = None
    t_back = time.monotonic()
    frames_before = whip.video_frames()
    back_s = seconds_until(lambda: outputs(house)["whip"]["state"] == "live", 25)
    time.sleep(3.0)
    watch.stop()
    dropped1, _ = clock(house)
    print(f"\nWHIP 503: {whip.posts - posts} POSTs refused or answered; live {back_s} s after 201s came back")
    assert back_s is not None, house.log()
    assert whip.video_frames() > frames_before + 25  # media flows into the new session
    assert watch.untouched(("a", "b", "srt", "hls", "rec"), t_fault, t_back) == []
    assert dropped1 == dropped0
    TABLE.append(
        (
            "the WHIP endpoint answering 503 (relay's session ended), then 201",
            f"{refused:.1f} s (2 refused POSTs)",
            f"{back_s:.1f} s after 201",
            f"others live, 0 restarts; last error {state['last_error'][:60]!r}; dropped ticks +{dropped1 - dropped0}",
        )
    )


def test_the_output_filesystem_full(house):
    if not house.mounted:
        pytest.skip("needs root to mount a small tmpfs for HLS and the recordings")
    speak(house, 20)
    dropped0, _ = clock(house)
    watch = Watch(house)
    stop_filling = threading.Event()

    def fill() -> None:  # every byte the tmpfs has, and every byte freed meanwhile (old segments deleted)
        with open(house.disk / "filler", "wb", buffering=0) as f:
            while not stop_filling.is_set():
                try:
                    f.write(b"\0" * 65536)
                except OSError:
                    stop_filling.wait(0.02)

    filler = threading.Thread(target=fill, daemon=True)
    t_full = time.monotonic()
    filler.start()
    detected_s = seconds_until(lambda: outputs(house)["hls"]["state"] != "live", 30)
    full = outputs(house)
    time.sleep(3.0)
    stop_filling.set()
    filler.join(10)
    (house.disk / "filler").unlink()
    t_freed = time.monotonic()
    back_s = seconds_until(lambda: all_live(house, ("hls", "rec")), 30)
    watch.stop()
    dropped1, _ = clock(house)
    print(f"\nfull disk: hls not live after {detected_s} s; hls and rec live {back_s} s after space was freed")
    assert detected_s is not None, full
    assert back_s is not None, outputs(house)
    assert watch.untouched(("a", "b", "srt", "whip"), t_full, t_freed) == []
    assert dropped1 == dropped0
    TABLE.append(
        (
            "HLS and recording filesystem full (tmpfs), freed after 3 s",
            f"{detected_s:.1f} s (hls {full['hls']['state']}, rec {full['rec']['state']})",
            f"{back_s:.1f} s after space was freed",
            f"network outputs live, 0 restarts; dropped ticks +{dropped1 - dropped0}",
        )
    )


def av_drift_ms(path: Path) -> float:
    """How far audio and video drifted apart over a recording, in ms (0: in sync from end to end).

    Each stream's timestamps come from the one encoder's sample and frame counts; what a recording
    can lose is media. So each stream's decoded media (samples, frames) is compared with the span
    of its timestamps, and the difference between the two streams' shortfalls is the drift.
    """
    rec = analyse_recording(path)
    video, audio = packet_pts_s(path, "v"), packet_pts_s(path, "a")
    video_short_s = (video[-1] - video[0] + 1 / FPS) - len(rec.video_pts_ms) / FPS
    audio_short_s = (audio[-1] - audio[0] + AAC_FRAME / rec.audio_rate_hz) - rec.audio_duration_s
    return (video_short_s - audio_short_s) * 1000


def frame_hashes(path: Path) -> list[str]:
    """One hash per decoded frame (64x114 grey), in order."""
    raw = subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:v:0", "-vf", "scale=64:114",
         "-pix_fmt", "gray", "-f", "rawvideo", "-fps_mode", "passthrough", "-"],
        capture_output=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    size = 64 * 114
    return [hashlib.md5(raw[i : i + size]).hexdigest() for i in range(0, len(raw) - size + 1, size)]


def test_every_destination_gets_the_same_frames_in_sync(house, tmp_path):
    """The lips on the same ticks everywhere (the same encoded frames), A/V in sync in every recording."""
    a, b, srt = house.servers["a"], house.servers["b"], house.srt
    pulls = [StreamRecorder(s.url("main"), tmp_path / f"{n}.flv", max_s=24) for n, s in (("a", a), ("b", b))]
    restart_listener(house)
    time.sleep(2.0)
    task = speak(house, 8)
    house.api.wait_task(task, ("done",), timeout_s=40)
    time.sleep(2.0)
    paths = [p.wait_end(timeout_s=60) for p in pulls]
    paths.append(srt.files[-1])
    restart_listener(house)
    hls = house.disk / "hls" / "live" / "index.m3u8"
    hashes = [frame_hashes(p) for p in paths]
    # The SRT recording and the RTMP pulls hold the same frames, each on the same tick: every frame
    # that occurs once in b's pull (the idle loop repeats; speech does not) sits at one offset.
    reference = hashes[1]
    counts = {h: reference.count(h) for h in reference}
    index = {h: i for i, h in enumerate(reference) if counts[h] == 1}
    for name, got in zip(("a", "b", "srt"), hashes, strict=True):
        offsets = {index[h] - i for i, h in enumerate(got) if h in index and got.count(h) == 1}
        common = sum(1 for h in got if h in index)
        assert common >= 5 * FPS, (name, common)
        assert len(offsets) == 1, (name, sorted(offsets)[:10])  # one offset: every frame on the same tick
    for path in paths:
        drift_ms = av_drift_ms(path)
        assert abs(drift_ms) <= 40, (path.name, drift_ms)
    assert hls.is_file() and "#EXTINF" in hls.read_text()
    recordings = sorted((house.disk / "rec").glob("main-*.mkv"))
    assert len(recordings) >= 2 and len(recordings) <= 5  # record_keep 4 (+ the one being written)
    shutil.copy(max(recordings[:-1], key=lambda p: p.stat().st_size), tmp_path / "rec.mkv")  # a whole one
    assert analyse_recording(tmp_path / "rec.mkv").video_codec == "h264"
