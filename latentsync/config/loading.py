"""Loading: defaults, a YAML file, then ``key=value`` overrides; JSON channels and outputs; YAML back out.

The schema is a tree of dataclasses turned into an OmegaConf structured config, so unknown keys
and values of the wrong type are rejected by OmegaConf with the full key name; semantic checks
(ranges, even sizes, supported AAC rates) follow in :func:`latentsync.config.validation.validate`.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentsync.config.app import AppConfig
from latentsync.config.channels import ChannelConfig
from latentsync.config.egress import OutputConfig
from latentsync.config.errors import ConfigError, omegaconf_message
from latentsync.config.validation import validate
from latentsync.output_urls import redact_output_url, redact_rtmp_url


def load_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> AppConfig:
    """Build the configuration from defaults, an optional YAML file and dotlist overrides.

    Args:
        config_file: YAML file with any subset of the keys (None: defaults only).
        overrides: ``key=value`` strings, e.g. ``["stream.fps=30", "engine.name=parametric"]``.

    Returns:
        The validated :class:`AppConfig`.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type, a malformed override, a missing
            file, or a value out of range; the message names the key.
    """
    schema = OmegaConf.structured(AppConfig)
    try:
        layers = [schema]
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item or item.startswith("="):
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_message(exc)) from None
    assert isinstance(config, AppConfig)
    if config.avatar.video is not None and config.avatar.idle_video is None:
        config.avatar.idle_video = config.avatar.video  # the presenter's own video is its idle loop too
    validate(config)
    return config


#: The config file a server started without ``$LATENTSYNC_CONFIG`` reads (the repository's own).
DEFAULT_SERVER_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "server.yaml"


def load_config_from_environment() -> AppConfig:
    """The configuration of a server started by gunicorn (or systemd): from its environment.

    ``$LATENTSYNC_CONFIG`` names the YAML file (default :data:`DEFAULT_SERVER_CONFIG`, when it
    exists) and ``$LATENTSYNC_OVERRIDES`` holds ``key=value`` overrides, shell-quoted
    (``configs/gunicorn.conf.py``, ``scripts/latentsync-realtime.service``).

    Returns:
        The validated :class:`AppConfig`.

    Raises:
        ConfigError: As :func:`load_config`.
    """
    default = DEFAULT_SERVER_CONFIG if DEFAULT_SERVER_CONFIG.is_file() else None
    source = os.environ.get("LATENTSYNC_CONFIG") or default
    return load_config(source, shlex.split(os.environ.get("LATENTSYNC_OVERRIDES", "")))


def parse_channel(name: str, values: dict) -> ChannelConfig:
    """A :class:`ChannelConfig` from an API body (``PUT /channels/<name>``), type-checked like the YAML.

    Args:
        name: The channel's name (from the URL; a ``name`` in ``values`` must equal it).
        values: Field values (JSON).

    Returns:
        The channel config (not yet checked against the others: :func:`validate` does that).

    Raises:
        ConfigError: On an unknown field or a value of the wrong type (the message names it).
    """
    if "name" in values and values["name"] != name:
        raise ConfigError(f"name: {values['name']!r} differs from the channel in the URL ({name!r})")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ChannelConfig), {**values, "name": name})
        channel = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_message(exc)) from None
    assert isinstance(channel, ChannelConfig)
    return channel


def parse_outputs(values: object) -> list[OutputConfig]:
    """Outputs from JSON (a PUT body's ``outputs``, ``channels_file``), type-checked like the YAML.

    Raises:
        ConfigError: If ``values`` is not a list of output objects, or on an unknown field or a
            value of the wrong type (the message names it).
    """
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise ConfigError('outputs: a list of objects like {"url": "rtmp://host/app/key"} is required')
    out = []
    for i, value in enumerate(values):
        try:
            merged = OmegaConf.merge(OmegaConf.structured(OutputConfig), value)
            item = OmegaConf.to_object(merged)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"outputs[{i}].{omegaconf_message(exc)}") from None
        assert isinstance(item, OutputConfig)
        out.append(item)
    return out


def to_yaml(config: AppConfig) -> str:
    """Render a configuration as YAML (``--print-config``) with stream keys, output secrets and the token hidden."""
    node = OmegaConf.structured(config)
    node.stream.rtmp_url = redact_rtmp_url(config.stream.rtmp_url)
    for out_node, out in zip(node.stream.outputs, config.stream.outputs, strict=True):
        out_node.url = redact_output_url(out.url)
        out_node.bearer_token = "***" if out.bearer_token else None
    for ch_node, ch in zip(node.channels, config.channels, strict=True):
        ch_node.rtmp_url = redact_rtmp_url(ch.rtmp_url) if ch.rtmp_url else None
        for out_node, out in zip(ch_node.outputs or [], ch.outputs or [], strict=True):
            out_node.url = redact_output_url(out.url)
            out_node.bearer_token = "***" if out.bearer_token else None
    if config.api.token is not None:
        node.api.token = "***"
    return OmegaConf.to_yaml(node)
