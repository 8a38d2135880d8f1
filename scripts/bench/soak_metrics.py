"""Metrics of a long chaos soak: a private Prometheus on loopback, the run's summary in PromQL, and a plot.

    prom = Prometheus(binary, data_dir, ["127.0.0.1:11001"], scrape_interval_s=5.0)
    with prom.start():
        prom.wait_scraped()
        ...  # the soak
        figures = summary(prom, start, end)

:class:`Prometheus` runs Debian's ``prometheus`` binary (``bash scripts/prometheus.sh path prometheus``; never a
system service) as a child process of the soak, scraping the server's ``/metrics`` under the job ``latentsync``,
with its TSDB in the soak's own directory, so the run's series can be queried afterwards (:func:`summary`) and kept
with the run's results. :func:`plot` draws the per-minute figures the soak records itself (RSS, descriptors,
threads) with the injected faults shaded; it needs matplotlib (``requirements-soak.txt``).

Times are unix seconds unless named ``*_s`` relative to something; memory is bytes unless named ``*_mb``.
"""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

#: The scrape job of the server(s) under test.
JOB = "latentsync"
#: Lines of ``prometheus.log`` quoted in the errors of :meth:`Prometheus.start`.
LOG_TAIL_LINES = 20
#: The part of a run left out of the RSS slope (warm-up: caches, first allocations), in seconds.
RSS_WARMUP_S = 15 * 60
#: Runs shorter than this (seconds) get their RSS slope over the whole run.
RSS_WARMUP_MIN_RUN_S = 30 * 60


class PromQLError(RuntimeError):
    """Prometheus answered a query with an error (bad PromQL, bad parameters, a query timeout)."""


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it before Prometheus binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _duration(seconds: float) -> str:
    """A Prometheus duration string for ``seconds`` (milliseconds resolution, at least 1 ms)."""
    return f"{max(1, round(seconds * 1000))}ms"


class Prometheus:
    """A private Prometheus server on loopback, scraping ``targets`` at ``/metrics`` under the job ``latentsync``.

    The constructor writes ``<data_dir>/prometheus.yml`` (and creates ``data_dir``); :meth:`start` runs the binary
    with its TSDB in ``<data_dir>/tsdb`` and its output in ``<data_dir>/prometheus.log``. The object owns the
    process: :meth:`stop` (or leaving the ``with`` block) ends it.

    Args:
        binary: The ``prometheus`` executable (``bash scripts/prometheus.sh path prometheus``).
        data_dir: A directory of this instance's own: configuration, TSDB and log.
        targets: ``host:port`` of each server to scrape, e.g. ``"127.0.0.1:11001"``; each target's series carry
            ``instance="<host:port>"``.
        scrape_interval_s: Seconds between two scrapes of a target (also the scrape timeout, up to 10 s).
        port: The port of Prometheus' own HTTP API on 127.0.0.1; a free one is picked when None.
        retention: ``--storage.tsdb.retention.time`` (a Prometheus duration such as ``"2d"``).

    Raises:
        ValueError: If ``targets`` is empty or ``scrape_interval_s`` is not positive.
    """

    #: Seconds one HTTP request to Prometheus' API may take.
    HTTP_TIMEOUT_S = 30.0

    def __init__(
        self,
        binary: Path,
        data_dir: Path,
        targets: list[str],
        scrape_interval_s: float = 5.0,
        port: int | None = None,
        retention: str = "2d",
    ):
        if not targets:
            raise ValueError("Prometheus needs at least one target")
        if not scrape_interval_s > 0:
            raise ValueError(f"scrape_interval_s must be positive, not {scrape_interval_s}")
        self.binary = Path(binary)
        self.data_dir = Path(data_dir)
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.port = port if port is not None else _free_port()
        self.retention = retention
        self.config_path = self.data_dir / "prometheus.yml"
        self.log_path = self.data_dir / "prometheus.log"
        self.tsdb_path = self.data_dir / "tsdb"
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config_text())

    def _config_text(self) -> str:
        """prometheus.yml (JSON strings are valid YAML scalars, so every value is quoted with :func:`json.dumps`)."""
        interval = _duration(self.scrape_interval_s)
        timeout = _duration(min(self.scrape_interval_s, 10.0))
        lines = [
            "global:",
            f"  scrape_interval: {json.dumps(interval)}",
            f"  scrape_timeout: {json.dumps(timeout)}",
            f"  evaluation_interval: {json.dumps(interval)}",
            "scrape_configs:",
            f"  - job_name: {json.dumps(JOB)}",
            '    metrics_path: "/metrics"',
            "    static_configs:",
        ]
        for target in self.targets:
            lines += [
                f"      - targets: [{json.dumps(target)}]",
                f"        labels: {{instance: {json.dumps(target)}}}",
            ]
        return "\n".join(lines) + "\n"

    @property
    def running(self) -> bool:
        """Whether the Prometheus process was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of ``prometheus.log`` ("" when there is none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout_s: float = 30.0) -> Prometheus:
        """Start Prometheus and wait until ``GET /-/ready`` answers 200.

        Args:
            timeout_s: Seconds to wait for readiness.

        Returns:
            self, for ``with Prometheus(...).start() as prom:``.

        Raises:
            RuntimeError: If it is already running, or if it exits or is not ready within ``timeout_s`` (the
                process is stopped then); the message holds the tail of ``prometheus.log``.
            OSError: If the binary cannot be executed.
        """
        if self.running:
            raise RuntimeError(f"Prometheus already runs (pid {self.process.pid})")  # type: ignore[union-attr]
        self.tsdb_path.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.binary),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.tsdb_path}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--storage.tsdb.retention.time={self.retention}",
        ]
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C in the soak's terminal does not reach it; stop() ends it.
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"prometheus exited with status {code} while starting; {self.log_path}:\n{self.log_tail()}"
                )
            if self._ready():
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"prometheus was not ready on {self.url} within {timeout_s:g} s; "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _ready(self) -> bool:
        """Whether ``GET /-/ready`` answers 200 now (waits at most 1 s)."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as response:
                return response.status == 200
        except OSError:  # refused, 503 while starting (HTTPError), timeout: all OSError
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """End Prometheus: SIGTERM, up to ``timeout_s`` seconds for it to exit, then SIGKILL.

        Safe to call twice, and before :meth:`start`. ``self.process`` stays (with its return code) afterwards.

        Raises:
            subprocess.TimeoutExpired: If it has not exited ``timeout_s`` seconds after SIGKILL either.
        """
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        else:
            process.wait(timeout=timeout_s)  # reaped already; returns at once

    def __enter__(self) -> Prometheus:
        """Start Prometheus unless it runs already (see :meth:`start` for the errors)."""
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop Prometheus (:meth:`stop`)."""
        self.stop()

    def _api(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """GET ``/api/v1/<path>`` with ``params``: the ``data`` of a successful answer.

        Raises:
            PromQLError: If Prometheus answers with an error (its ``errorType`` and ``error``).
            OSError: If Prometheus cannot be reached (``urllib.error.URLError``) or does not answer within
                :attr:`HTTP_TIMEOUT_S` seconds.
        """
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.HTTP_TIMEOUT_S) as response:
                body = response.read()
        except urllib.error.HTTPError as error:  # 400 bad_data, 422 execution, 503 timeout: a JSON error body
            body = error.read()
            try:
                answer = json.loads(body)
            except ValueError:
                raise PromQLError(f"HTTP {error.code} from {path}: {body[:500]!r}") from error
            raise PromQLError(f"{answer.get('errorType', 'error')}: {answer.get('error', body[:500])}") from error
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise PromQLError(f"{answer.get('errorType', 'error')}: {answer.get('error', '')}")
        return answer["data"]

    def query(self, promql: str, at: float | None = None) -> list[tuple[dict, float]]:
        """An instant query (``/api/v1/query``).

        Args:
            promql: The expression; it must give an instant vector or a scalar.
            at: Evaluation time, unix seconds; now when None.

        Returns:
            (labels, value) of each series (a scalar: one pair with empty labels); values may be NaN or ±Inf.

        Raises:
            PromQLError: On an error answer, or if the result is a range vector (use :meth:`query_range`).
            OSError: If Prometheus cannot be reached.
        """
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", params)
        kind = data["resultType"]
        if kind == "vector":
            return [(item["metric"], float(item["value"][1])) for item in data["result"]]
        if kind == "scalar":
            return [({}, float(data["result"][1]))]
        raise PromQLError(f"{promql!r} gives a {kind}, not an instant vector: use query_range")

    def query_range(
        self, promql: str, start: float, end: float, step_s: float
    ) -> list[tuple[dict, list[tuple[float, float]]]]:
        """A range query (``/api/v1/query_range``).

        Args:
            promql: The expression (an instant vector or scalar expression, evaluated at every step).
            start: First evaluation time, unix seconds.
            end: Last evaluation time, unix seconds.
            step_s: Seconds between evaluations.

        Returns:
            (labels, [(unix seconds, value), ...]) of each series.

        Raises:
            PromQLError: On an error answer (bad PromQL, end before start, too many points).
            OSError: If Prometheus cannot be reached.
        """
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        data = self._api("query_range", params)
        return [(item["metric"], [(float(t), float(v)) for t, v in item["values"]]) for item in data["result"]]

    def wait_scraped(self, timeout_s: float = 30.0) -> None:
        """Wait until every target's last scrape succeeded (``up{job="latentsync"} == 1`` for each).

        Raises:
            TimeoutError: If some target is not up within ``timeout_s`` seconds (the message names them).
            PromQLError: If Prometheus answers the query with an error.
            OSError: If Prometheus cannot be reached.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            up = {labels.get("instance"): value for labels, value in self.query(f'up{{job="{JOB}"}}')}
            missing = [target for target in self.targets if up.get(target) != 1.0]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not scraped within {timeout_s:g} s: {', '.join(missing)}")
            time.sleep(min(0.2, self.scrape_interval_s / 5))


def summary(prom: Prometheus, start: float, end: float) -> list[tuple[str, str, float | None]]:
    """The run's figures, in PromQL evaluated at ``end`` over the run's length (whole seconds, at least 1).

    Series of several targets are combined: the largest RSS, slope and descriptors, counters summed over targets
    and channels, the worst target's scrape success. ``increase()`` extrapolates to the window's edges, so the
    counts need not be whole numbers, and a counter seen in fewer than two scrapes gives no value.

    Figures (name: unit):

    * ``rss_slope_bytes_per_h``: growth of the server's RSS, bytes per hour (least squares, ``deriv``), leaving out
      the first 15 minutes when the run is longer than 30 minutes;
    * ``rss_max_bytes``: bytes; ``open_fds_max``: descriptors;
    * ``ticks_dropped``, ``ticks_late``, ``ticks_underrun``, ``ffmpeg_restarts``, ``worker_restarts``,
      ``output_restarts``: counts in the run;
    * ``scrape_success_ratio``: 0-1.

    Args:
        prom: The Prometheus that scraped the run.
        start: The run's start, unix seconds.
        end: The run's end, unix seconds.

    Returns:
        (figure name, PromQL used, value) in the order above; value None where the query gives no series.

    Raises:
        ValueError: If ``end`` is before ``start``.
        PromQLError: If Prometheus answers a query with an error.
        OSError: If Prometheus cannot be reached.
    """
    if end < start:
        raise ValueError(f"the run ends ({end}) before it starts ({start})")
    run_s = max(1, int(end - start))
    slope_s = run_s - RSS_WARMUP_S if run_s > RSS_WARMUP_MIN_RUN_S else run_s
    job = f'{{job="{JOB}"}}'
    window = f"[{run_s}s]"
    queries = [
        ("rss_slope_bytes_per_h", f"max(deriv(process_resident_memory_bytes{job}[{slope_s}s])) * 3600"),
        ("rss_max_bytes", f"max(max_over_time(process_resident_memory_bytes{job}{window}))"),
        ("open_fds_max", f"max(max_over_time(process_open_fds{job}{window}))"),
        ("ticks_dropped", f"sum(increase(latentsync_ticks_dropped_total{job}{window}))"),
        ("ticks_late", f"sum(increase(latentsync_ticks_late_total{job}{window}))"),
        ("ticks_underrun", f"sum(increase(latentsync_ticks_underrun_total{job}{window}))"),
        ("ffmpeg_restarts", f"sum(increase(latentsync_ffmpeg_restarts_total{job}{window}))"),
        ("worker_restarts", f"sum(increase(latentsync_worker_restarts_total{job}{window}))"),
        ("output_restarts", f"sum(increase(latentsync_output_restarts_total{job}{window}))"),
        ("scrape_success_ratio", f"min(avg_over_time(up{job}{window}))"),
    ]
    figures: list[tuple[str, str, float | None]] = []
    for name, promql in queries:
        result = prom.query(promql, at=end)
        figures.append((name, promql, result[0][1] if result else None))
    return figures


def _number(row: dict, key: str) -> float:
    """``row[key]`` as a float; NaN (a gap in the line) when missing or None."""
    value = row.get(key)
    return math.nan if value is None else float(value)


def plot(figures: list[dict], faults: list[dict], png: Path, title: str) -> Path:
    """Draw the soak's per-minute figures as a PNG: RSS, descriptors and threads over the run, faults shaded.

    Three stacked panels share the time axis (minutes since the run's start): RSS in MB of the server and of its
    children (summed; and of the server with its standing children where the figures have it), open
    descriptors, threads. Each fault's window is shaded in every panel and named in
    small print at the top of the first.

    Args:
        figures: The soak's JSON lines: ``t_s`` (seconds since start), ``server_rss_mb``, ``children_rss_mb``,
            ``fds``, ``threads`` (a missing or null value is a gap), and where present ``standing_rss_mb`` (the
            server with the children that live as long as it, drawn as a third line).
        faults: ``name``, ``start_s`` and ``end_s`` (seconds since the run's start; ``end_s`` None: until the last
            figure).
        png: Where to write the image (its directory is created).
        title: The figure's title.

    Returns:
        ``png``.

    Raises:
        ImportError: If matplotlib is not installed (``pip install -r requirements-soak.txt``).
        KeyError: If a figure has no ``t_s`` or a fault no ``name`` or ``start_s``.
        OSError: If the file cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(figures, key=lambda row: float(row["t_s"]))
    minutes = [float(row["t_s"]) / 60 for row in rows]
    last_min = max(minutes, default=0.0)
    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global figure manager
    rss, fds, threads = fig.subplots(3, 1, sharex=True)
    rss.plot(minutes, [_number(row, "server_rss_mb") for row in rows], label="server")
    rss.plot(minutes, [_number(row, "children_rss_mb") for row in rows], label="children (sum)")
    if any("standing_rss_mb" in row for row in rows):  # what the growth goal is judged on (chaos_soak.py)
        rss.plot(minutes, [_number(row, "standing_rss_mb") for row in rows], label="server + standing children")
    rss.set_ylabel("RSS (MB)")
    rss.legend(loc="upper left", fontsize="small")
    fds.plot(minutes, [_number(row, "fds") for row in rows], color="tab:green")
    fds.set_ylabel("open descriptors")
    threads.plot(minutes, [_number(row, "threads") for row in rows], color="tab:purple")
    threads.set_ylabel("threads")
    threads.set_xlabel("minutes since start")
    for fault in faults:
        begin = float(fault["start_s"]) / 60
        end_s = fault.get("end_s")
        finish = last_min if end_s is None else float(end_s) / 60
        for ax in (rss, fds, threads):
            ax.axvspan(begin, max(finish, begin), color="tab:red", alpha=0.15, linewidth=0)
        rss.text(
            begin,
            0.98,
            str(fault["name"]),
            transform=rss.get_xaxis_transform(),  # x in minutes, y in fractions of the panel's height
            fontsize=6,
            rotation=90,
            va="top",
            ha="right",
            bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0, "pad": 1},
        )
    for ax in (rss, fds, threads):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png", dpi=100)
    return png
