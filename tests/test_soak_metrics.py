"""scripts/bench/soak_metrics.py: a private Prometheus scraping a fake server's /metrics, the summary, the plot."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from latentsync.serving.telemetry.metrics import CONTENT_TYPE, ServerMetrics
from tests.datafiles import load_script
from tests.serving.telemetry.test_health import snapshot

pytestmark = pytest.mark.slow  # starts Prometheus and waits for its scrapes: seconds

REPO = Path(__file__).resolve().parents[1]


soak_metrics = load_script("bench/soak_metrics")


def prometheus_binary() -> Path:
    """The unpacked prometheus; skips the test without it (fails instead in CI)."""
    found = subprocess.run(
        ["bash", str(REPO / "scripts" / "prometheus.sh"), "path", "prometheus"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if found.returncode != 0:
        reason = f"prometheus missing (bash scripts/prometheus.sh install): {found.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return Path(found.stdout.strip())


@pytest.fixture
def metrics_server():
    """A thread serving the snapshot's exposition at /metrics; yields its ``host:port``."""
    health = snapshot()
    metrics = ServerMetrics(lambda: health)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_prometheus_scrapes_queries_and_stops(tmp_path, metrics_server):
    binary = prometheus_binary()
    start = time.time()
    prom = soak_metrics.Prometheus(binary, tmp_path / "prom", [metrics_server], scrape_interval_s=1.0)
    try:
        prom.start(timeout_s=30)
        prom.wait_scraped(timeout_s=15)

        handled = prom.query("latentsync_ticks_handled_total")
        assert [(labels["channel"], value) for labels, value in handled] == [("main", 12.0)]
        labels = handled[0][0]
        assert labels["job"] == "latentsync" and labels["instance"] == metrics_server

        now = time.time()
        series = prom.query_range('up{job="latentsync"}', now - 2, now, 1)
        assert series and all(value == 1.0 for _, points in series for _, value in points)

        with pytest.raises(soak_metrics.PromQLError, match="parse error"):
            prom.query("sum(latentsync_ticks_handled_total")

        time.sleep(1.5)  # a second scrape, so increase() has two samples
        figures = soak_metrics.summary(prom, start, time.time())
        names = [name for name, _, _ in figures]
        assert len(set(names)) == len(names) >= 9
        assert all(value is None or isinstance(value, float) for _, _, value in figures)
        values = {name: value for name, _, value in figures}
        assert values["rss_max_bytes"] > 0
        assert values["open_fds_max"] > 0
        assert values["scrape_success_ratio"] == 1.0
        assert values["ticks_dropped"] in (0.0, None)  # a constant counter: nothing dropped during the run
    finally:
        prom.stop()
    process = prom.process
    assert process is not None and process.returncode is not None, "prometheus still runs after stop()"
    prom.stop()  # twice is fine
    assert (tmp_path / "prom" / "prometheus.log").stat().st_size > 0


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    figures = [
        {"t_s": 0, "server_rss_mb": 400.0, "children_rss_mb": 120.0, "fds": 40, "threads": 30},
        {"t_s": 60, "server_rss_mb": 410.5, "children_rss_mb": 130.0, "fds": 42, "threads": 31},
        {"t_s": 120, "server_rss_mb": 412.0, "children_rss_mb": None, "fds": 41, "threads": 31},
    ]
    faults = [{"name": "kill ffmpeg", "start_s": 50, "end_s": 80}]
    png = soak_metrics.plot(figures, faults, tmp_path / "out" / "soak.png", "soak test")
    assert png == tmp_path / "out" / "soak.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
