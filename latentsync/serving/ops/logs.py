"""Logging setup: plain text, or one JSON object per line (``log.json=true``) with task ids."""

from __future__ import annotations

import json
import logging
import sys
import time

from werkzeug.serving import WSGIRequestHandler

#: ``LogRecord`` attributes carried into JSON lines when a log call passes them in ``extra``.
CONTEXT_FIELDS = ("task_id", "chunk_index", "status")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object.

    Keys: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``msg``, plus ``task_id``/``chunk_index``/
    ``status`` when the log call gave them in ``extra``, and ``exc`` for exceptions.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, as_json: bool) -> None:
    """Send the process's logs to stderr, as text or JSON lines.

    Args:
        level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
        as_json: One JSON object per line instead of text.
    """
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class QueryRedactingRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler, whose access log lines leave out query strings.

    A query may hold a WebSocket ticket (``/ws/speech?ticket=...``) or whatever a client put
    there; the log shows ``/ws/speech?…`` instead (docs/security.md). gunicorn's access log
    does the same with ``%(U)s`` (configs/gunicorn.conf.py).
    """

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log the request line with the query replaced by ``?…``."""
        full = self.path
        path, query, _ = full.partition("?")
        self.path = path + ("?…" if query else "")
        try:
            super().log_request(code, size)
        finally:
            self.path = full
