"""Python client of the LatentSync-Realtime server (asyncio): REST, ``/ws/speech`` and ``/ws/frames``.

Imports httpx and websockets only (no NumPy, torch or any server dependency)::

    async with AsyncClient("http://127.0.0.1:11001") as client:
        task = await client.speak("Hello there.")
        print(await client.wait_task(task.task_id))
"""

from latentsync_client.client import FINAL_STATES, AsyncClient, Health, TaskAccepted, TaskInfo, Ticket
from latentsync_client.errors import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InsufficientStorage,
    LatentSyncError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    RateLimited,
    RetryLater,
    ServerError,
    StreamClosed,
    StreamRefused,
    Unauthorized,
    Unavailable,
    error_from_response,
)
from latentsync_client.frames import Backoff, Disconnected, Frame, FramesEvent, FramesStream, Reconnected
from latentsync_client.frames_protocol import (
    AudioFormat,
    FrameHeader,
    Ready,
    TickState,
    VideoFormat,
    parse_header,
    samples_in_tick,
    split_message,
)
from latentsync_client.speech import (
    Accepted,
    Done,
    ErrorEvent,
    OnAir,
    Progress,
    SlowDown,
    SpeechEvent,
    SpeechStream,
    UnknownEvent,
)

__version__ = "0.1.0"

__all__ = [
    "FINAL_STATES",
    "Accepted",
    "AsyncClient",
    "AudioFormat",
    "Backoff",
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "Disconnected",
    "Done",
    "ErrorEvent",
    "Forbidden",
    "Frame",
    "FrameHeader",
    "FramesEvent",
    "FramesStream",
    "Health",
    "InsufficientStorage",
    "LatentSyncError",
    "NotFound",
    "OnAir",
    "PayloadTooLarge",
    "Progress",
    "ProtocolError",
    "RateLimited",
    "RetryLater",
    "Ready",
    "Reconnected",
    "ServerError",
    "SlowDown",
    "SpeechEvent",
    "SpeechStream",
    "StreamClosed",
    "StreamRefused",
    "TaskAccepted",
    "TaskInfo",
    "Ticket",
    "TickState",
    "Unauthorized",
    "Unavailable",
    "UnknownEvent",
    "VideoFormat",
    "error_from_response",
    "parse_header",
    "samples_in_tick",
    "split_message",
]
