"""The ``log`` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class LogConfig:
    """Logging."""

    level: str = "INFO"
    json: bool = False
