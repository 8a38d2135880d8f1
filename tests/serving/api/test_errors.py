"""One map from error code to HTTP status (latentsync/serving/api/errors.py), and no HTTP status below the API."""

from __future__ import annotations

import ast
from pathlib import Path

from latentsync.serving.api.errors import HTTP_STATUS, ROUTE_STATUS
from latentsync.serving.core.errors import ServingError

SERVING = Path(__file__).resolve().parents[3] / "latentsync" / "serving"
#: Codes only ever sent as WebSocket ``error`` events (an utterance ended by a time bound): no HTTP status.
EVENT_ONLY = {"idle_timeout", "too_slow", "utterance_timeout"}
ERROR_CALLS = {"SpeechError", "AvatarError", "WhepError", "ApiError", "ServingError", "error_response"}


def raised_codes() -> dict[str, list[str]]:
    """Every string literal given as the code of a serving error (or an error body), with where."""
    found: dict[str, list[str]] = {}
    for path in SERVING.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            first = node.args[0]
            if name in ERROR_CALLS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.setdefault(first.value, []).append(f"{path.relative_to(SERVING)}:{node.lineno}")
    return found


def test_every_code_raised_below_the_api_has_one_http_status():
    codes = raised_codes()
    assert len(codes) > 40  # the walk finds them (a rename of the calls would empty it)
    missing = {code: where for code, where in codes.items() if code not in HTTP_STATUS and code not in EVENT_ONLY}
    assert not missing, missing
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())
    assert all(code in HTTP_STATUS for _, code in ROUTE_STATUS)


def test_no_http_status_below_the_api():
    """Only api/ decides statuses: the errors of the parts below carry a code and a message."""
    assert ServingError("queue_full", "x").code == "queue_full"
    for path in SERVING.rglob("*.py"):
        if path.relative_to(SERVING).parts[0] == "api":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERROR_CALLS:
                assert not (
                    node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, int)
                ), f"{path}:{node.lineno} passes an HTTP status"
