"""channels_file: the channel changes made through the API, kept across restarts (docs/channels.md)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from latentsync.config import (
    DEFAULT_CHANNEL,
    AppConfig,
    ConfigError,
    parse_outputs,
    uploaded_avatar_video,
    validate,
)
from latentsync.serving.runtime.channel_rules import allowed_rtmp_hosts, api_channel, api_media_paths, check_api_outputs

#: Channel fields a PUT may change while the stream runs: the avatar (idle loop and base video) and
#: the outputs (docs/outputs.md).
LIVE_FIELDS = ("avatar", "idle_video", "video", "idle_audio", "idle_pingpong", "outputs")

logger = logging.getLogger(__name__)


#: Channel fields that define the stream itself (its URL and format); changing one needs a restart.
STREAM_FIELDS = ("rtmp_url", "width", "height", "fps", "crossfade_frames", "video_bitrate_kbps", "record_path")


#: Format version of ``channels_file``.
CHANNELS_FILE_VERSION = 1


def _live_avatar(config: AppConfig, values: dict, avatar, stream):
    """The ``avatar``/``stream`` sections with a channel's kept live fields applied.

    Those are :data:`LIVE_FIELDS` and the ``width``/``height`` the stream had when its avatar changed;
    ``outputs`` are JSON objects (:func:`latentsync.config.parse_outputs`).

    Raises:
        ConfigError: If the kept ``outputs`` do not parse.
    """
    if any(k in values for k in ("avatar", "idle_video", "video")):
        if values.get("avatar") is not None:
            upload = str(uploaded_avatar_video(config.avatar.cache_dir, values["avatar"]))
            avatar = dataclasses.replace(avatar, idle_video=upload, video=None)
        else:
            avatar = dataclasses.replace(avatar, idle_video=values.get("idle_video"), video=values.get("video"))
    for key in ("idle_audio", "idle_pingpong", "width", "height"):
        if values.get(key) is not None:
            stream = dataclasses.replace(stream, **{key: values[key]})
    if values.get("outputs") is not None:
        stream = dataclasses.replace(stream, outputs=parse_outputs(values["outputs"]))
    return avatar, stream


def _malformed(state: dict) -> str | None:
    """What is wrong with the shape of a version-1 ``channels_file``, or None when it has the right one.

    ``deleted`` must be a list of names, ``live`` an object of objects, ``created`` a list of
    objects (each may be missing or null). Each item's values are checked later, one by one.
    """
    deleted, live, created = state.get("deleted"), state.get("live"), state.get("created")
    if deleted is not None and not (isinstance(deleted, list) and all(isinstance(n, str) for n in deleted)):
        return "deleted: not a list of channel names"
    if live is not None and not (isinstance(live, dict) and all(isinstance(v, dict) for v in live.values())):
        return "live: not an object of channel fields by name"
    if created is not None and not (isinstance(created, list) and all(isinstance(c, dict) for c in created)):
        return "created: not a list of channel objects"
    return None


def restore_channels(config: AppConfig) -> tuple[AppConfig, set[str], dict[str, dict], set[str]]:
    """The configuration with the channel changes kept in ``channels_file`` applied (docs/channels.md).

    The file holds what the API changed: channels created at run time (``created``), avatar changes
    of the configured channels, ``main`` included (``live``: their :data:`LIVE_FIELDS`), and
    configured channels deleted (``deleted``). Each item is checked as the API checks it; one that
    no longer holds (a deleted video or avatar, a name now in the config, ``max_channels``
    reached) is skipped with a warning, so a stale file never stops the server; a file that is not
    JSON, not version 1 or not of the right shape (``"deleted": 5``, ``"live": [1]``) is ignored
    whole with a log line, as a missing one is.

    Args:
        config: The validated configuration.

    Returns:
        ``(config to run, configured channels deleted, live changes applied by channel name,
        names of the channels created from the file)``.
    """
    if not config.channels_file:
        return config, set(), {}, set()
    path = Path(config.channels_file)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return config, set(), {}, set()
    except (OSError, ValueError, RecursionError) as exc:
        logger.warning("channels_file %s unreadable, ignored: %s", path, exc)
        return config, set(), {}, set()
    if not isinstance(state, dict) or state.get("version") != CHANNELS_FILE_VERSION:
        logger.warning("channels_file %s: not a version %d file, ignored", path, CHANNELS_FILE_VERSION)
        return config, set(), {}, set()
    if (malformed := _malformed(state)) is not None:
        logger.warning("channels_file %s malformed (%s): ignored, the server starts without it", path, malformed)
        return config, set(), {}, set()

    def attempt(candidate: AppConfig, what: str) -> bool:
        try:
            validate(candidate)
            return True
        except (ConfigError, TypeError, ValueError) as exc:
            logger.warning("channels_file: %s skipped: %s", what, exc)
            return False

    configured = {c.name for c in config.channels}
    deleted = {n for n in state.get("deleted") or [] if n in configured}
    out = dataclasses.replace(config, channels=[c for c in config.channels if c.name not in deleted])
    live: dict[str, dict] = {}
    for name, values in (state.get("live") or {}).items():
        kept = (*LIVE_FIELDS, "width", "height")  # the size the stream had when its avatar changed
        values = {k: v for k, v in values.items() if k in kept} if isinstance(values, dict) else {}
        try:  # held to the API's rules, as when it was made: video paths only under media.root
            values.update(api_media_paths(config, values.get))
            if "outputs" in values:  # and outputs only to the allowed hosts
                check_api_outputs(parse_outputs(values["outputs"]), allowed_rtmp_hosts(config))
        except (ConfigError, TypeError) as exc:
            logger.warning("channels_file: %s's live changes skipped: %s", name, exc)
            continue
        if name == DEFAULT_CHANNEL:
            avatar, stream = _live_avatar(config, values, out.avatar, out.stream)
            candidate = dataclasses.replace(out, avatar=avatar, stream=stream)
        elif name in configured and name not in deleted:
            if any(k in values for k in ("avatar", "idle_video", "video")):
                values = {"avatar": None, "idle_video": None, "video": None, **values}
            fields = {**values, **({"outputs": parse_outputs(values["outputs"])} if "outputs" in values else {})}
            specs = [dataclasses.replace(c, **fields) if c.name == name else c for c in out.channels]
            candidate = dataclasses.replace(out, channels=specs)
        else:
            continue
        if values and attempt(candidate, f"{name}'s live changes"):
            out, live[name] = candidate, values
    from latentsync.config import parse_channel

    created: set[str] = set()
    hosts = allowed_rtmp_hosts(config)
    for values in state.get("created") or []:
        try:
            spec = api_channel(config, parse_channel(str(values.get("name", "")), values), hosts)
        except (ConfigError, AttributeError, TypeError) as exc:
            name = values.get("name") if isinstance(values, dict) else None
            logger.warning("channels_file: %s skipped: %s", f"channel {name}" if name else "a created channel", exc)
            continue
        candidate = dataclasses.replace(out, channels=[*out.channels, spec])
        if (spec.name not in configured or spec.name in deleted) and attempt(candidate, f"channel {spec.name}"):
            out = candidate
            created.add(spec.name)
    if out is not config:
        logger.info(
            "channels_file %s: %d channel(s) created, %d deleted, %d avatar change(s) restored",
            path,
            len(out.channels) - len(config.channels) + len(deleted),
            len(deleted),
            len(live),
        )
    return out, deleted, live, created
