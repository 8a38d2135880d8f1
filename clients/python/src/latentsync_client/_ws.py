"""Opening a WebSocket of the server: the token as a header (or a ticket), refusals as typed exceptions."""

from __future__ import annotations

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from latentsync_client.errors import ConnectionFailed, StreamClosed, error_from_response


async def open_websocket(
    url: str,
    *,
    headers: dict[str, str],
    max_size: int | None,
    open_timeout_s: float,
    max_queue: int | None = 16,
) -> ClientConnection:
    """Open one WebSocket; a refused handshake raises the server's error as its typed exception.

    Args:
        url: ``ws://`` or ``wss://`` URL (with ``?ticket=`` when a ticket is used).
        headers: Handshake headers (``Authorization``...).
        max_size: Largest message to accept in bytes (None: no limit).
        max_queue: Messages received and not yet read before the socket is no longer read (None: no
            bound; the speech stream's events are small and must never hold up the server's sends).
        open_timeout_s: Seconds for the TCP connection and the handshake.

    Returns:
        The open connection (no compression: the server negotiates none).

    Raises:
        LatentSyncError: The class of the HTTP status when the server refuses the handshake
            (:class:`~latentsync_client.errors.NotFound` ``no_channel``,
            :class:`~latentsync_client.errors.Unauthorized`...).
        ConnectionFailed: If the server cannot be reached or the handshake fails otherwise.
    """
    try:
        return await connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=max_size,
            max_queue=max_queue,
            open_timeout=open_timeout_s,
            proxy=None,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=2,
            user_agent_header="latentsync-client",
        )
    except InvalidStatus as exc:
        response = exc.response
        raise error_from_response(response.status_code, bytes(response.body or b""), dict(response.headers)) from None
    except InvalidHandshake as exc:
        raise ConnectionFailed(f"WebSocket handshake with {url.split('?')[0]} failed: {exc}") from exc
    except (OSError, TimeoutError) as exc:
        raise ConnectionFailed(f"cannot connect to {url.split('?')[0]}: {exc!r}") from exc


def closed_error(exc: websockets.ConnectionClosed) -> StreamClosed:
    """The :class:`StreamClosed` for a connection the server (or the network) closed."""
    frame = exc.rcvd
    if frame is None:
        return StreamClosed(1006, "closed without a close frame")
    return StreamClosed(frame.code, frame.reason)


def is_normal_close(exc: websockets.ConnectionClosed) -> bool:
    """True for a normal close (1000) only: 1001 ``going_away`` (the server or the channel stopped) is not."""
    frame = exc.rcvd if exc.rcvd is not None else exc.sent
    return frame is not None and frame.code == 1000
