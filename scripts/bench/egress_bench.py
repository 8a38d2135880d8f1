#!/usr/bin/env python3
"""Egress benchmark: outputs as peers (docs/outputs.md), three scenarios, each printing a table.

``freeze`` (the reproduction of the outputs issue): a ``make run``-like server (parametric engine,
built-in avatar, 512x512) pushing to a private nginx-rtmp, a ``/ws/frames`` client watching; after
``--warmup-s`` the nginx (master and workers) is frozen with ``kill -STOP`` for ``--freeze-s``, then
resumed. Every 10 s a row: frames the client received per second, ticks it lost, the clock's
dropped ticks, ``/health``'s status and ``streaming``, the output's state (where the server has
outputs) and FFmpeg restarts. ``--repo`` runs another checkout's ``infer_serv.py`` (the code before
the change), with this checkout's virtualenv.

``cpu``: server + FFmpeg CPU (the server process and every process under it, ``/proc``) over
``--seconds`` of an idle 512x512 channel, with one RTMP destination, then with two of the same
encoding (each on its own nginx-rtmp).

``soak``: one channel speaking for ``--seconds`` (a 7 s upload every 8 s) to four destinations
(two nginx-rtmp, an FFmpeg SRT listener, an aiortc WHIP endpoint) plus HLS and a recording; a WHEP
viewer and a frames client watch. Dropped and late ticks, each output's restarts and stalls, and the
A/V drift of each destination's recording over the whole run (tests/serving/egress/test_outputs.py's
measure: each stream's decoded media against the span of its timestamps).

    .venv/bin/python scripts/bench/egress_bench.py freeze [--repo /tmp/old-checkout]
    .venv/bin/python scripts/bench/egress_bench.py cpu --seconds 60
    .venv/bin/python scripts/bench/egress_bench.py soak --seconds 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchclient import free_port, http, multipart, stop_server  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from latentsync.serving.egress.frames_protocol import split_message  # noqa: E402
from latentsync.serving.ops.procfs import cpu_seconds, descendants  # noqa: E402
from tests.datafiles import speech_wav  # noqa: E402
from tests.frames_ws import RawWebSocket  # noqa: E402
from tests.streamtools import RtmpServer, StreamRecorder, analyse_recording, packet_pts_s  # noqa: E402

FPS = 25


class Server:
    """``infer_serv.py`` of ``repo`` with overrides, its log in ``folder``."""

    def __init__(self, repo: Path, folder: Path, overrides: list[str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(repo / "infer_serv.py"), f"server.port={self.port}", *overrides],
            cwd=repo,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(folder)),
        )

    def health(self) -> tuple[int, dict]:
        try:
            return http("GET", self.base + "/health", timeout_s=5)
        except OSError:
            return 0, {}

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited; see {self.log.name}")
            if self.health()[1].get("engine_ready"):
                return
            time.sleep(0.5)
        raise SystemExit("server not ready")

    def tree_cpu_s(self) -> float:
        """CPU seconds of the server and every process under it (encoders, relays, workers)."""
        return sum(cpu_seconds(pid) for pid in [self.proc.pid, *descendants(self.proc.pid)])

    def stop(self) -> None:
        stop_server(self.proc)
        self.log.close()


class FramesCounter(threading.Thread):
    """A frames WebSocket client reading every tick message: arrival times and ticks lost."""

    def __init__(self, port: int, width: int, height: int):
        super().__init__(daemon=True)
        self.ws = RawWebSocket(port, "/ws/frames")
        self.ws.send_json({"type": "hello", "format": "jpeg", "width": width, "height": height, "audio": "none"})
        self.arrivals: list[float] = []
        self.lost = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                message = self.ws.receive(1.0)
            except TimeoutError:
                continue
            if message is None:
                return
            if isinstance(message, bytes):
                header, _, _ = split_message(message)
                self.arrivals.append(time.monotonic())
                self.lost += header.dropped_ticks

    def stop(self) -> None:
        self.done.set()
        self.join(5)
        self.ws.close()


def nginx_signal(server: RtmpServer, sig: int) -> None:
    master, workers = server.nginx_pids()
    for pid in [master, *workers]:
        os.kill(pid, sig)


def freeze(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="egress-freeze-"))
    rtmp = RtmpServer(tmp / "rtmp")
    rtmp.start()
    server = Server(args.repo, tmp, [f"stream.rtmp_url={rtmp.url('avatar')}"])
    try:
        server.wait_ready()
        size = server.health()[1]["stream"]
        frames = FramesCounter(server.port, size["width"], size["height"])
        frames.start()
        time.sleep(args.warmup_s)
        t_stop = time.monotonic()
        nginx_signal(rtmp, signal.SIGSTOP)
        rows, detected = [], None
        end = t_stop + args.freeze_s + args.after_s
        next_row, lost_before = t_stop, frames.lost
        _, before = server.health()
        while time.monotonic() < end:
            now = time.monotonic()
            if now - t_stop >= args.freeze_s and rtmp_frozen(rows):
                nginx_signal(rtmp, signal.SIGCONT)
                rows.append(("SIGCONT", "", "", "", "", "", ""))
            status, body = server.health()
            outputs = body.get("outputs") or []
            state = outputs[0]["state"] if outputs else "-"
            if detected is None and state == "stalled":
                detected = now - t_stop
            if now >= next_row:
                window = [t for t in frames.arrivals if next_row - 10 <= t < next_row]
                rows.append(
                    (
                        f"{now - t_stop:5.0f}",
                        f"{len(window) / 10:5.1f}",
                        str(frames.lost - lost_before),
                        str(body.get("dropped_ticks", 0) - before.get("dropped_ticks", 0)),
                        f"{status} {body.get('streaming')}",
                        state,
                        str(body.get("ffmpeg_restarts")),
                    )
                )
                next_row += 10
            time.sleep(0.2)
        if rtmp_frozen(rows):
            nginx_signal(rtmp, signal.SIGCONT)
        frames.stop()
        print(f"\nfreeze: {args.repo}, nginx frozen {args.freeze_s:.0f} s at t=0 (a row per 10 s)")
        print(
            "| t s | frames client fps (last 10 s) | ticks it lost | clock dropped ticks | /health | output"
            " | FFmpeg restarts |"
        )
        print("|---:|---:|---:|---:|---|---|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"stalled output detected after: {f'{detected:.1f} s' if detected is not None else 'never'}")
    finally:
        server.stop()
        rtmp.stop()


def rtmp_frozen(rows: list) -> bool:
    return not any(r[0] == "SIGCONT" for r in rows)


def cpu(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="egress-cpu-"))
    servers = [RtmpServer(tmp / f"rtmp-{i}") for i in range(2)]
    for s in servers:
        s.start()
    results = []
    try:
        for count in (1, 2) if args.repo == ROOT else (1,):  # another checkout may know rtmp_url only
            outputs = ", ".join(f"{{url: '{s.url('avatar')}'}}" for s in servers[:count])
            where = f"stream.outputs=[{outputs}]" if count > 1 else f"stream.rtmp_url={servers[0].url('avatar')}"
            server = Server(args.repo, tmp, [where, "webrtc.enabled=false", "frames.enabled=false"])
            try:
                server.wait_ready()
                time.sleep(5)
                c0, t0 = server.tree_cpu_s(), time.monotonic()
                time.sleep(args.seconds)
                c1, t1 = server.tree_cpu_s(), time.monotonic()
                _, body = server.health()
                results.append((count, 100 * (c1 - c0) / (t1 - t0), body))
            finally:
                server.stop()
    finally:
        for s in servers:
            s.stop()
    print(f"\ncpu: {args.repo}, idle 512x512 channel, {args.seconds:.0f} s each, server + every process under it")
    print("| destinations (same encoding) | CPU, % of one core | encoders | outputs live | dropped ticks |")
    print("|---:|---:|---:|---|---:|")
    for count, percent, body in results:
        live = sum(o["state"] == "live" for o in body.get("outputs", [])) if "outputs" in body else "-"
        print(f"| {count} | {percent:.1f} | 1 | {live}/{count} | {body['dropped_ticks']} |")
    if len(results) > 1:
        print(f"second destination: +{results[1][1] - results[0][1]:.1f} % of one core")


def av_drift_ms(path: Path) -> float:
    """Each stream's decoded media against the span of its timestamps; the difference between the two, ms."""
    rec = analyse_recording(path)
    video, audio = packet_pts_s(path, "v"), packet_pts_s(path, "a")
    video_short = (video[-1] - video[0] + 1 / FPS) - len(rec.video_pts_ms) / FPS
    audio_short = (audio[-1] - audio[0] + 1024 / rec.audio_rate_hz) - rec.audio_duration_s
    return (video_short - audio_short) * 1000


def soak(args: argparse.Namespace) -> None:
    from tests.serving.egress.test_outputs import SrtListener, WhepWatcher
    from tests.whip_receiver import WhipReceiver

    tmp = Path(tempfile.mkdtemp(prefix="egress-soak-"))
    servers = [RtmpServer(tmp / f"rtmp-{i}") for i in range(2)]
    for s in servers:
        s.start()
    srt, whip = SrtListener(tmp), WhipReceiver()
    srt.start()
    (tmp / "hls").mkdir()
    (tmp / "rec").mkdir()
    outputs = [
        {"name": "rtmp-a", "url": servers[0].url("avatar")},
        {"name": "rtmp-b", "url": servers[1].url("avatar")},
        {"name": "srt", "url": f"srt://127.0.0.1:{srt.port}"},
        {"name": "whip", "url": whip.url},
        {"name": "hls", "url": "hls:live"},
        {"name": "rec", "url": "record:soak.mkv"},
    ]
    flow = ", ".join("{" + ", ".join(f"{k}: '{v}'" for k, v in o.items()) + "}" for o in outputs)
    server = Server(
        ROOT,
        tmp,
        [f"stream.outputs=[{flow}]", f"stream.record_dir={tmp / 'rec'}", "stream.record_max_mb=2048",
         f"egress.hls_root={tmp / 'hls'}"],
    )  # fmt: skip
    pulls = []
    try:
        server.wait_ready()
        time.sleep(3)
        size = server.health()[1]["stream"]
        frames, whep = FramesCounter(server.port, size["width"], size["height"]), WhepWatcher(server.base)
        frames.start()
        whep.start()
        pulls = [
            StreamRecorder(s.url("avatar"), tmp / f"pull-{i}.flv", max_s=args.seconds + 30)
            for i, s in enumerate(servers)
        ]
        time.sleep(3)
        _, before = server.health()
        body, headers = multipart(speech_wav(7), "speech.wav")
        tasks, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            status, _ = http("POST", server.base + "/generate_video", body, headers)
            tasks += status == 202
            time.sleep(8)
        _, after = server.health()
        frames.stop()
        whep.stop()
        paths = [p.finish(settle_s=1.0) for p in pulls]
        pulls = []
    finally:
        for p in pulls:
            p.kill()
        server.stop()
        srt.stop()
        whip.close()
        for s in servers:
            s.stop()
    paths.append(srt.files[-1])
    paths += sorted((tmp / "rec").glob("soak-*.mkv"))
    print(f"\nsoak: one 512x512 channel speaking for {args.seconds:.0f} s ({tasks} uploads), 6 outputs")
    delta = {k: after[k] - before[k] for k in ("dropped_ticks", "late_ticks", "underrun_ticks")}
    print(
        f"dropped ticks: {delta['dropped_ticks']}, late ticks: {delta['late_ticks']}, underrun ticks: "
        f"{delta['underrun_ticks']}; frames client lost {frames.lost} ticks; WHEP got {len(whep.arrivals)} frames"
    )
    print("| output | state | restarts | stalls | frames out |")
    print("|---|---|---:|---:|---:|")
    for o in after["outputs"]:
        print(f"| {o['name']} | {o['state']} | {o['restarts']} | {o['stalls']} | {o['frames_out']} |")
    print("| recording | seconds | fps | A/V drift ms |")
    print("|---|---:|---:|---:|")
    for path in paths:
        rec = analyse_recording(path)
        print(f"| {path.name} | {rec.video_duration_s:.1f} | {rec.fps:.3f} | {av_drift_ms(path):+.1f} |")
    print(json.dumps({"tmp": str(tmp)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    f = sub.add_parser("freeze")
    f.add_argument("--repo", type=Path, default=ROOT)
    f.add_argument("--warmup-s", type=float, default=20.0)
    f.add_argument("--freeze-s", type=float, default=90.0)
    f.add_argument("--after-s", type=float, default=20.0)
    c = sub.add_parser("cpu")
    c.add_argument("--seconds", type=float, default=60.0)
    c.add_argument("--repo", type=Path, default=ROOT, help="another checkout: one destination only")
    s = sub.add_parser("soak")
    s.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args()
    {"freeze": freeze, "cpu": cpu, "soak": soak}[args.scenario](args)


if __name__ == "__main__":
    main()
