"""The one error type the server's parts raise for a refused request: a code and a message, no HTTP.

Every part below the API (generation, avatars, runtime, egress) raises a :class:`ServingError`
subclass with a machine-readable ``code`` (``queue_full``, ``not_audio``, ``no_avatar``...) and a
message that names the problem for people. The API turns the code into an HTTP status with its
one table (``latentsync.serving.api.errors.HTTP_STATUS``); a WebSocket sends it as an ``error``
event. Nothing below the API knows HTTP statuses.
"""

from __future__ import annotations


class ServingError(Exception):
    """A refused operation.

    Attributes:
        code: Machine-readable reason (snake_case; the key of the API's status table).
        message: What was wrong, for people (never FFmpeg's raw text or a server path).
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"
