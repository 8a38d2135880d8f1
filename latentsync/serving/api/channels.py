"""Which channel a request is for, and the one answer when it names none (docs/channels.md).

Every route of a channel has two paths: the bare one (``/ws/speech``, ``/events``...) is channel
``main``'s (:data:`~latentsync.config.DEFAULT_CHANNEL`), ``/channels/<name>/...`` channel
``<name>``'s; ``GET /avatars/<id>/still`` names it in ``?channel=``. An unknown name is 404
``no_channel`` (:func:`no_channel`), from every route alike.
"""

from __future__ import annotations

import re

from latentsync.config import DEFAULT_CHANNEL
from latentsync.serving.api.errors import ApiError

#: What a channel's routes put before their own path: ``/channels/<name>``.
CHANNEL_PREFIX = "/channels/"


def no_channel(name: str) -> ApiError:
    """The error for a channel name that names no channel: 404 ``no_channel``.

    Args:
        name: The name the request gave.

    Returns:
        The error to raise (the app's error handler answers it).
    """
    return ApiError("no_channel", f"no channel {name!r} (GET /channels lists them)")


def find_channel(runtime, name: str):
    """The channel called ``name``.

    Args:
        runtime: The :class:`~latentsync.serving.runtime.Runtime` that owns the channels.
        name: From the request's path (``/channels/<name>/...``; the bare path: ``main``) or query.

    Returns:
        The :class:`~latentsync.serving.runtime.channel.Channel`.

    Raises:
        ApiError: 404 ``no_channel`` (:func:`no_channel`) when there is none of that name.
    """
    channel = runtime.channel(name)
    if channel is None:
        raise no_channel(name)
    return channel


def channel_in_path(pattern: re.Pattern[str], path: str) -> str | None:
    """The channel name a request path of ``pattern`` is for, before the request is routed.

    Args:
        pattern: A path pattern whose group 1 is the optional ``/channels/<name>`` prefix
            (``(/channels/[^/]+)?/ws/frames``).
        path: The request's path.

    Returns:
        ``<name>`` for ``/channels/<name>/...``, ``main`` for the bare path, None when ``path``
        does not match ``pattern``.
    """
    match = pattern.fullmatch(path)
    if match is None:
        return None
    return match.group(1)[len(CHANNEL_PREFIX) :] if match.group(1) else DEFAULT_CHANNEL
