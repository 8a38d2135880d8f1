"""JSON from clients: one loader for every JSON entry point, and request bodies capped before they are read.

A client's JSON is parsed by :func:`parse_json` only: whatever ``json.loads`` refuses (not JSON,
not UTF-8, an integer past Python's digit limit) and whatever it cannot finish (``[[[[...``
nested past the recursion limit) is 400 ``bad_json``, never a traceback. A JSON request body is
read by :func:`json_body`: past ``api.max_json_kb`` it is 413 ``too_large`` on its
``Content-Length`` before a byte is read, or, chunked, after at most the cap and one byte, so a
50 MB body costs neither memory nor GIL time (docs/security.md).
"""

from __future__ import annotations

import json
from typing import Any

from flask import request

from latentsync.serving.api.errors import ApiError


def parse_json(text: str | bytes, what: str = "the body") -> Any:
    """Parse a client's JSON text, any failure a 400.

    Args:
        text: The JSON text (``bytes``: UTF-8).
        what: What the text is, for the message (``the body``, ``a text message``).

    Returns:
        The parsed value (any JSON type: the caller checks its shape).

    Raises:
        ApiError: 400 ``bad_json`` if ``text`` is not JSON, not UTF-8, holds an integer of more
            digits than Python converts, or nests deeper than the interpreter can parse.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ApiError("bad_json", f"{what} nests too deeply to be parsed") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise ApiError("bad_json", f"{what} is not valid JSON") from None


def json_body(max_kb: int) -> Any:
    """The request's JSON body, read only up to ``max_kb`` KiB.

    A body whose ``Content-Type`` is not JSON is not read (``None``, as Flask's
    ``get_json(silent=True)``): the caller answers its own "must be a JSON object" error.

    Args:
        max_kb: ``api.max_json_kb``: the largest body read, in KiB.

    Returns:
        The parsed body, or None when the request is not ``application/json``.

    Raises:
        ApiError: 413 ``too_large`` past ``max_kb`` (its ``Content-Length``, or the bytes of a
            chunked body, of which at most ``max_kb`` KiB + 1 byte are read); 400 ``bad_json`` as
            :func:`parse_json`.
    """
    if not request.is_json:
        return None
    max_bytes = max_kb * 1024
    too_large = ApiError("too_large", f"JSON body larger than api.max_json_kb = {max_kb} KiB")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    data = bytearray()
    while len(data) <= max_bytes:  # a stream may answer a read with fewer bytes than asked
        block = request.stream.read(max_bytes + 1 - len(data))
        if not block:
            break
        data += block
    if len(data) > max_bytes:
        raise too_large
    return parse_json(bytes(data))
