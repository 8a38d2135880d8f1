#!/usr/bin/env python3
"""LatentSync-Realtime server: keeps the avatar live on RTMP and serves the HTTP API.

Usage:
    .venv/bin/python infer_serv.py [--config FILE] [--print-config] [key=value ...]

Overrides use the config's dotted keys, e.g. ``stream.fps=30 avatar.idle_video=idle.mp4``.
SIGINT/SIGTERM stop everything cleanly (FFmpeg flushed, FIFOs removed) within 10 s.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from latentsync.config import ConfigError, load_config, redact_rtmp_url, to_yaml
from latentsync.media.probe import MediaProbeError
from latentsync.serving.api.app import create_app
from latentsync.serving.api.http_server import make_guarded_server
from latentsync.serving.compute.scheduling_pool import WorkerPoolError
from latentsync.serving.ops.exit import exit_now
from latentsync.serving.ops.logs import configure_logging
from latentsync.serving.ops.memory import HeapFreezer, bound_heap_growth
from latentsync.serving.ops.systemd import sd_notify
from latentsync.serving.ops.threads import limit_native_threads
from latentsync.serving.runtime.runtime import Runtime

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "server.yaml"
#: Seconds a stopping server waits for the requests in flight to be answered (PUT applied, answer unsent).
DRAIN_S = 2.0
logger = logging.getLogger("latentsync.serve")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None,
        help="YAML config file (default: configs/server.yaml)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stream.fps=30")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM. Returns the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    configure_logging(config.log.level, config.log.json)
    bound_heap_growth()  # freed frames and audio go back to the system (latentsync/serving/ops/memory.py)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    limit_native_threads(config.server.native_threads)  # a process setting: this is the process's entry point

    heap = HeapFreezer()  # latentsync/serving/ops/memory.py: full collections skip what lives on

    def release(made_at: float, what: str) -> None:
        # What a deleted channel or a switched-away avatar left in reference cycles is collected: a channel
        # frozen with the server by one full collection (a pause), anything made since by a collection of the
        # unfrozen heap only.
        t = time.monotonic()
        how, count = heap.release(made_at)
        logger.info("%s: heap %s (%d objects, %.1f ms)", what, how, count, (time.monotonic() - t) * 1000)

    runtime = Runtime(config, after_release=release)
    # Header/body deadlines and per-address connection caps (issue 35: a slow-loris client)
    server = make_guarded_server(config.server.host, config.server.port, create_app(runtime), config.server)
    http_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    http_thread.start()
    logger.info("API on http://%s:%d", config.server.host, config.server.port)
    failure: list[str] = []

    def start() -> None:
        # In a thread, so SIGTERM during a long first start (avatar preparation, model loading)
        # still stops the server within 10 s.
        # Before any clock ticks: the heap frozen by one full collection, which stops every thread (ops/memory.py).
        logger.info("heap frozen (imports): %d objects out of the garbage collector's way", heap.freeze())
        try:
            runtime.start()
        except Exception as exc:
            if runtime.stopped:  # SIGTERM while starting: what failed was being stopped, as asked
                logger.info("start interrupted by the shutdown: %s: %s", type(exc).__name__, exc)
                return
            if isinstance(exc, (MediaProbeError, WorkerPoolError, FileNotFoundError, ValueError)):
                failure.append(str(exc))
            else:  # unexpected: keep the traceback
                logger.exception("start failed")
                failure.append(f"{type(exc).__name__}: {exc}")
            stop.set()
            return
        if not stop.is_set():
            frozen = heap.freeze_survivors()  # what start-up made lives as long as the server: no pause now
            logger.info("heap frozen (started): %d objects out of the garbage collector's way", frozen)
            logger.info(
                "ready: streaming to %s; POST audio to http://%s:%d/generate_video",
                redact_rtmp_url(config.stream.rtmp_url),
                config.server.host,
                config.server.port,
            )
            sd_notify("READY=1")

    starter = threading.Thread(target=start, name="runtime-start", daemon=True)
    starter.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sd_notify("STOPPING=1")
        server.shutdown()  # no new connections; the requests in flight go on
        http_thread.join(2.0)
        runtime.close()
        unanswered = server.drain(DRAIN_S)
        if unanswered:
            logger.warning("stopping with %d requests unanswered after %.0f s", unanswered, DRAIN_S)
    code = 0
    if failure:
        logger.error("cannot start: %s", failure[0])
        code = 1
    if runtime.exit_unsafe:  # a Ray cluster lost for good: the interpreter's teardown would crash in Ray
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
