"""The API's rules for channels made at run time: ``PUT /channels/<name>``, its outputs, ``channels_file``.

The config file is the operator's and may name any path or host. A channel given through the API
may name videos only under ``media.root``, send only to the allowed hosts
(``stream.allowed_rtmp_hosts``) and never set ``record_path``. The runtime
(:class:`latentsync.serving.runtime.runtime.Runtime`) and the ``channels_file``
(:mod:`latentsync.serving.runtime.persistence`) hold what they are given to these rules, then check it
with the rest as at load (:func:`latentsync.config.validate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

from latentsync.config import (
    AppConfig,
    ChannelConfig,
    ConfigError,
    OutputConfig,
    channel_configs,
    channel_outputs,
)
from latentsync.output_urls import RTMP_URL_WANT, OutputUrlError, parse_output_url, rtmp_host

#: Longest path (UTF-8 bytes) a client may name as a video: Linux's ``PATH_MAX``.
MAX_API_PATH_BYTES = 4096


def api_media_path(config: AppConfig, key: str, value: str) -> str:
    """A video named by path through the API: resolved (symlinks followed), and only under ``media.root``.

    The message is the same whether a path outside ``media.root`` exists or not (the API never
    tells whether a file exists outside it).

    Args:
        config: The server configuration (``media.root``).
        key: The field, for messages (``idle_video``, ``video``).
        value: The path as given: absolute, or relative to ``media.root``.

    Returns:
        The resolved absolute path of an existing file under ``media.root``.

    Raises:
        ConfigError: Without ``media.root``, for a path outside it, or for no such file in it; for a
            value that is no string, holds a NUL byte or is longer than :data:`MAX_API_PATH_BYTES`
            (the file system would refuse it: the answer is the API's ``bad_channel``, not a 500).
    """
    root = config.media.root
    if root is None:
        raise ConfigError(
            f"{key}: video paths are not accepted through the API (media.root is not set): upload the video "
            "with POST /avatars and give its id as avatar"
        )
    if not isinstance(value, str) or "\x00" in value or len(value.encode("utf-8", "replace")) > MAX_API_PATH_BYTES:
        raise ConfigError(f"{key}: must be a path of at most {MAX_API_PATH_BYTES} bytes, without NUL")
    base = Path(root).resolve()
    try:
        resolved = (base / value).resolve()
        inside = resolved.is_relative_to(base)
        exists = inside and resolved.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a lone surrogate...
        inside, exists = False, False
    if not inside:
        raise ConfigError(f"{key}: must name a file under media.root")
    if not exists:
        raise ConfigError(f"{key}: no such file under media.root")
    return str(resolved)


#: The fields of a channel that name a video (held to :func:`api_media_path` through the API).
API_MEDIA_KEYS: tuple[Literal["idle_video", "video"], ...] = ("idle_video", "video")


class MediaPaths(TypedDict, total=False):
    """The resolved video paths of a channel given through the API (:func:`api_media_paths`)."""

    idle_video: str
    video: str


#: Why a ``record_path`` given through the API is refused.
RECORD_PATH_CONFIG_ONLY = "record_path: recordings are set in the config file only (stream.record_dir)"


def api_media_paths(config: AppConfig, get: Callable[[str], Any]) -> MediaPaths:
    """:func:`api_media_path` of every video field given (``get(key)``: a channel's or a body's value).

    Returns:
        ``{key: resolved path}`` for the keys of :data:`API_MEDIA_KEYS` that are set.

    Raises:
        ConfigError: As :func:`api_media_path`.
    """
    paths: MediaPaths = {}
    for k in API_MEDIA_KEYS:
        if value := get(k):
            paths[k] = api_media_path(config, k, value)
    return paths


def allowed_rtmp_hosts(config: AppConfig) -> set[str]:
    """Hosts a channel created (or given outputs) through the API may send to (``stream.allowed_rtmp_hosts``).

    Null: the hosts of the outputs of ``config``'s own channels, ``main`` included (pass the config as
    loaded from the file, not one with channels the API made).
    """
    if config.stream.allowed_rtmp_hosts is not None:
        return {h.strip("[]").lower() for h in config.stream.allowed_rtmp_hosts}
    hosts: set[str] = set()
    for derived in channel_configs(config).values():
        hosts.update(t.url.host for t in channel_outputs(derived) if t.url.host is not None)
    return hosts


def api_channel(config: AppConfig, spec: ChannelConfig, allowed_hosts: set[str]) -> ChannelConfig:
    """A channel given through the API (a PUT, or an entry of ``channels_file``), held to the API's rules.

    Video paths resolve under ``media.root`` (:func:`api_media_path`); the RTMP URL and the outputs
    are well formed and send to ``allowed_hosts`` only (:func:`check_api_outputs`); ``record_path`` is
    for the config file only.

    Args:
        config: The server configuration.
        spec: The channel as parsed (:func:`latentsync.config.parse_channel`).
        allowed_hosts: :func:`allowed_rtmp_hosts` of the config as loaded.

    Returns:
        ``spec`` with its video paths resolved.

    Raises:
        ConfigError: Naming the field.
    """
    if spec.record_path is not None:
        raise ConfigError(RECORD_PATH_CONFIG_ONLY)
    if spec.rtmp_url is not None:
        host = rtmp_host(spec.rtmp_url)
        if host is None:
            raise ConfigError(f"rtmp_url: expected {RTMP_URL_WANT}")
        if host not in allowed_hosts:
            raise ConfigError(
                f"rtmp_url: {host!r} is not in stream.allowed_rtmp_hosts ({', '.join(sorted(allowed_hosts))})"
            )
    if spec.outputs is not None:
        check_api_outputs(spec.outputs, allowed_hosts)
    return dataclasses.replace(spec, **api_media_paths(config, lambda k: getattr(spec, k)))


def check_api_outputs(outputs: Sequence[OutputConfig], allowed_hosts: set[str]) -> None:
    """Hold outputs given through the API to its rules: well-formed URLs to allowed hosts only.

    HLS folders and recording files are names under the operator's roots (``egress.hls_root``,
    ``stream.record_dir``), never paths (:func:`latentsync.output_urls.parse_output_url`); the rest
    of the checks (names, counts, roots set) are :func:`latentsync.config.channel_outputs`'.

    Raises:
        ConfigError: Naming the output (``outputs[i].url``).
    """
    for i, o in enumerate(outputs):
        try:
            url = parse_output_url(o.url)
        except OutputUrlError as exc:
            raise ConfigError(f"outputs[{i}].{exc}") from None
        if url.host is not None and url.host not in allowed_hosts:
            raise ConfigError(
                f"outputs[{i}].url: {url.host!r} is not in stream.allowed_rtmp_hosts "
                f"({', '.join(sorted(allowed_hosts))})"
            )
