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


def public_reason(exc: BaseException) -> str:
    """Why a channel, an avatar switch or a preparation failed, as API clients may read it.

    Our own messages (budgets, faces) are kept; FFmpeg's text, paths and whether a file exists
    never are (the log has the full error).

    Args:
        exc: The exception that stopped it.

    Returns:
        ``"<ErrorType>: <message>"``.
    """
    from latentsync.face import FaceNotFoundError
    from latentsync.media.errors import MediaDecodeTimeout
    from latentsync.media.probe import MediaProbeError
    from latentsync.media.video import MediaLimitError

    name = type(exc).__name__
    if isinstance(exc, MediaLimitError | FaceNotFoundError):
        return f"{name}: {exc}"
    if isinstance(exc, MediaDecodeTimeout):
        return f"{name}: decoding the video took too long"
    if isinstance(exc, MediaProbeError):
        return f"{name}: not a decodable video in an accepted format (MP4/MOV, Matroska/WebM)"
    if isinstance(exc, FileNotFoundError):
        return f"{name}: the video file is missing"
    if isinstance(exc, ServingError):
        return f"{exc.code}: {exc.message}"
    public = getattr(exc, "public_message", None)
    if isinstance(public, str):  # made safe to show where it was raised
        return f"{name}: {public}"
    return f"{name}: an internal error (the server log has it)"
