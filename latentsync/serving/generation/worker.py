"""The worker-process side of the pool: one engine per spawned process, loaded once (see pool.py).

A spawned worker process holds exactly one engine (and engines bound to the other avatars it was
asked for, least recently used dropped first). The slot below exists only inside worker processes
(the pool initializer fills it once, ``multiprocessing.Pool`` calls the functions here); the
server process never writes it.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from latentsync.engines import ChunkRequest, ChunkResult
from latentsync.serving.generation.ports import ChunkJob

_WORKER_SLOT: dict[str, Any] = {}


def _worker_init(
    engine_name: str, engine_options: Mapping[str, Any], avatar_path: str, counter, devices, max_avatars: int = 1
) -> None:
    """Pool initializer: load the default avatar and the engine once. Never raises (errors are kept)."""
    # Ctrl-C in a terminal reaches the whole process group: the server owns shutdown, not its workers
    # (a worker dying on SIGINT mid-read would also leave the pool's queue lock held).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        options = dict(engine_options)
        if devices:
            options["device"] = devices[index % len(devices)]
        from latentsync.avatar import Avatar
        from latentsync.engines import create_engine

        avatar = Avatar.load(avatar_path)
        engine = create_engine(engine_name, options, avatar)
        engine.load()
        engines: OrderedDict[str, Any] = OrderedDict({avatar_path: engine})
        _WORKER_SLOT.update(
            engine=engine,
            engines=engines,
            default=avatar_path,
            name=engine_name,
            options=options,
            max_avatars=max(1, int(max_avatars)),
            index=index,
            error=None,
        )
    except Exception as exc:  # reported to the parent by every later call
        _WORKER_SLOT.update(engine=None, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())


def _engine(avatar_path: str | None = None):
    """The engine bound to ``avatar_path`` (None: the default avatar), loaded on first use.

    A worker keeps at most ``max_avatars`` engines, least recently used dropped first. An engine
    with ``with_avatar`` (latentsync) binds the new avatar to the models it already holds, so only
    the avatar's data (its latents) is added; others (parametric) build a fresh engine, which is cheap.
    """
    base = _WORKER_SLOT.get("engine")
    if base is None:
        raise RuntimeError(f"worker failed to start: {_WORKER_SLOT.get('error', 'not initialised')}")
    engines: OrderedDict[str, Any] = _WORKER_SLOT["engines"]
    path = avatar_path or _WORKER_SLOT["default"]
    engine = engines.get(path)
    if engine is not None:
        engines.move_to_end(path)
        return engine
    from latentsync.avatar import Avatar
    from latentsync.engines import create_engine

    avatar = Avatar.load(path)
    if hasattr(base, "with_avatar"):
        engine = base.with_avatar(avatar)
    else:
        engine = create_engine(_WORKER_SLOT["name"], _WORKER_SLOT["options"], avatar)
        engine.load()
    engines[path] = engine
    while len(engines) > _WORKER_SLOT["max_avatars"]:
        old_path, old = engines.popitem(last=False)
        if old is not base:  # the default engine holds the shared models: never closed here
            old.close()
    return engine


def _worker_ping() -> tuple[int, str | None]:
    return os.getpid(), _WORKER_SLOT.get("error")


def _worker_avatars() -> tuple[int, list[str]]:
    """This worker's pid and the avatar paths it holds loaded, least recently used first."""
    return os.getpid(), list(_WORKER_SLOT.get("engines") or ())


def _worker_chunks(jobs: list[ChunkJob]) -> list[ChunkResult]:
    """Features, then faces, of chunk jobs of one avatar (one model batch where the engine can).

    Each job's features are the rows ``job.rows`` of :meth:`Engine.features` over its audio window,
    the last row repeated when the job's frames were padded to the engine's shortest chunk.
    """
    engine = _engine(jobs[0].avatar)
    requests = []
    for job in jobs:
        rows = np.asarray(engine.features(job.audio_16k, *job.rows))
        n = len(job.frame_indices)
        if len(rows) < n:
            rows = np.concatenate([rows, np.repeat(rows[-1:], n - len(rows), axis=0)])
        requests.append(
            ChunkRequest(
                task_id=job.task_id,
                chunk_index=job.chunk_index,
                frame_indices=np.asarray(job.frame_indices, np.int64),
                features=rows[:n],
                seed=job.seed,
                guidance_scale=job.guidance_scale,
            )
        )
    return engine.generate_batch(requests) if len(requests) > 1 else [engine.generate(requests[0])]
