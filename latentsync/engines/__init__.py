"""Lip-sync engines behind one narrow interface; build them with :func:`create_engine`."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from latentsync.engines.base import (
    CHUNK_FRAMES,
    CHUNK_FRAMES_RANGE,
    DEFAULT_CHUNK_FRAMES_RANGE,
    DEFAULT_LOOKAHEAD_FRAMES,
    ENGINE_SAMPLE_RATE_HZ,
    FIRST_CHUNK_FRAMES,
    LOOKAHEAD_FRAMES,
    ChunkRequest,
    ChunkResult,
    Engine,
    num_output_frames,
)

#: Engine names :func:`create_engine` knows.
ENGINE_NAMES = ("parametric", "latentsync")


def create_engine(name: str, options: Mapping[str, Any] | None, avatar) -> Engine:
    """Build an engine bound to a prepared avatar (not loaded yet: call ``load()``).

    Args:
        name: ``"parametric"`` (CPU, no model) or ``"latentsync"`` (LatentSync 1.0); or
            ``"package.module:factory"``, a callable ``(options, avatar) -> Engine`` imported in the
            worker (the seam test engines use; the server's config only ever names the two above).
        options: Engine options by field name (for ``parametric``: the fields of
            :class:`latentsync.engines.parametric.ParametricOptions`; for ``latentsync``: passed to
            its engine's constructor); None for defaults.
        avatar: The prepared :class:`latentsync.avatar.Avatar`.

    Returns:
        The engine.

    Raises:
        ValueError: If the name is unknown or an option is not a field of the engine's options.

    """
    options = dict(options or {})
    if name == "parametric":
        from latentsync.engines.parametric import ParametricEngine, ParametricOptions

        fields = {f.name for f in dataclasses.fields(ParametricOptions)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown parametric engine options {unknown}; known: {sorted(fields)}")
        for key in ("band_hz",):
            if key in options:
                options[key] = tuple(options[key])
        return ParametricEngine(avatar, ParametricOptions(**options))
    if name == "latentsync":
        from latentsync.engines import latentsync as latentsync_engine  # owned elsewhere

        return latentsync_engine.create(options, avatar)
    if ":" in name:
        module, _, factory = name.partition(":")
        return getattr(importlib.import_module(module), factory)(options, avatar)
    raise ValueError(f"unknown engine {name!r}; known: {list(ENGINE_NAMES)}")


__all__ = [
    "CHUNK_FRAMES",
    "CHUNK_FRAMES_RANGE",
    "DEFAULT_CHUNK_FRAMES_RANGE",
    "DEFAULT_LOOKAHEAD_FRAMES",
    "FIRST_CHUNK_FRAMES",
    "LOOKAHEAD_FRAMES",
    "ENGINE_NAMES",
    "ENGINE_SAMPLE_RATE_HZ",
    "ChunkRequest",
    "ChunkResult",
    "Engine",
    "create_engine",
    "num_output_frames",
]
