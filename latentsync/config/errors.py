"""The configuration's one error type, and the message every check of a value gives."""

from __future__ import annotations

from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


def check_value(ok: bool, key: str, value: object, want: str) -> None:
    """Refuse a value unless ``ok``, naming its key, the value and what is expected.

    Args:
        ok: Whether the value passes.
        key: Its full key (``stream.fps``, ``channels[0].name``).
        value: The value, shown by its ``repr`` (``"<hidden>"`` for a secret).
        want: What the key takes (``1..120``).

    Raises:
        ConfigError: ``<key>: <value!r> is invalid, expected <want>`` when ``ok`` is false.
    """
    if not ok:
        raise ConfigError(f"{key}: {value!r} is invalid, expected {want}")


def omegaconf_message(exc: OmegaConfBaseException) -> str:
    """OmegaConf's error in one line: ``<full key>: <first line>`` (the first line alone without a key)."""
    key = getattr(exc, "full_key", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{key}: {first}" if key else first
