"""The worker side of the pool: one engine per worker, loaded once (see worker_pool.py and ray_worker_pool.py).

A worker (a spawned process of the local pool, or a Ray actor) holds one :class:`EngineHost`:
the engine bound to the default avatar, and engines bound to the other avatars it was asked for,
least recently used dropped first. In the local pool the host lives in the slot below, which
exists only inside worker processes (the pool initializer fills it once, ``multiprocessing.Pool``
calls the functions here); the server process never writes it. A Ray actor holds its own host.
"""

from __future__ import annotations

import os
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from latentsync.engines import ChunkRequest, ChunkResult, Engine
from latentsync.serving.compute.jobs import ChunkJob
from latentsync.serving.ops.children import become_helper_process
from latentsync.serving.ops.threads import limit_native_threads

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized


class EngineHost:
    """The engines of one worker: the default avatar's, plus an LRU of other avatars' engines.

    Args:
        engine_name: ``"parametric"`` or ``"latentsync"`` (or a ``module:factory`` test engine).
        options: Engine options (``device`` already chosen for this worker).
        default: Key of the default avatar (its cache path).
        load_avatar: Returns the :class:`latentsync.avatar.Avatar` for a key: from the cache folder
            in the local pool, from Ray's object store on an actor.
        max_avatars: Engines kept loaded (``engine.max_avatars_per_worker``).

    Raises:
        Exception: Whatever loading the default avatar or the engine raises (the caller keeps it
            as the worker's error, reported by every later call).
    """

    def __init__(
        self,
        engine_name: str,
        options: Mapping[str, Any],
        *,
        default: str,
        load_avatar: Callable[[str], Any],
        max_avatars: int = 1,
    ):
        from latentsync.engines import create_engine

        # A host is its worker process's whole job, and the pool parallelises by process: OpenCV's and
        # BLAS's own pools only spin on the cores the other workers, FFmpeg and the server need
        # (a parametric worker used twice its wall time in CPU: docs/performance.md).
        limit_native_threads(1)
        self.name = engine_name
        self.options = dict(options)
        self.default = default
        self._load_avatar = load_avatar
        self.max_avatars = max(1, int(max_avatars))
        self.base = create_engine(engine_name, self.options, load_avatar(default))
        self.base.load()
        self.engines: OrderedDict[str, Engine] = OrderedDict({default: self.base})

    def engine(self, avatar: str | None = None) -> Engine:
        """The engine bound to ``avatar`` (None: the default avatar), loaded on first use.

        An engine with ``with_avatar`` (latentsync) binds the new avatar to the models it already
        holds, so only the avatar's data (its latents) is added; others (parametric) build a fresh
        engine, which is cheap.
        """
        from latentsync.engines import create_engine

        key = avatar or self.default
        engine = self.engines.get(key)
        if engine is not None:
            self.engines.move_to_end(key)
            return engine
        loaded = self._load_avatar(key)
        if hasattr(self.base, "with_avatar"):
            engine = self.base.with_avatar(loaded)
        else:
            engine = create_engine(self.name, self.options, loaded)
            engine.load()
        self.engines[key] = engine
        while len(self.engines) > self.max_avatars:
            _old_key, old = self.engines.popitem(last=False)
            if old is not self.base:  # the default engine holds the shared models: never closed here
                old.close()
        return engine

    def loaded(self) -> list[str]:
        """Avatar keys with a loaded engine, least recently used first."""
        return list(self.engines)

    def close(self) -> None:
        """Close every engine (safe to call twice)."""
        engines, self.engines = list(self.engines.values()), OrderedDict()
        for engine in engines:
            engine.close()

    def chunks(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        """Features, then faces, of chunk jobs of one avatar (one model batch where the engine can).

        Each job's features are the rows ``job.rows`` of :meth:`Engine.features` over its audio
        window, the last row repeated when the job's frames were padded to the engine's shortest chunk.

        Returns:
            One :class:`ChunkResult` per job, in order (faces ``(n, S, S, 3) uint8`` RGB, ``S`` the avatar's
            face size: 256, 512 for LatentSync 1.6).
        """
        engine = self.engine(jobs[0].avatar)
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


#: The worker process's one engine host (set by :func:`worker_init`, the pool's initializer):
#: ``multiprocessing.Pool`` calls module functions, so the process keeps its host here.
_WORKER_SLOT: dict[str, Any] = {}


def worker_init(
    engine_name: str,
    engine_options: Mapping[str, Any],
    avatar_path: str,
    counter: Synchronized[int],
    devices: Sequence[str],
    max_avatars: int = 1,
    nice: int = 0,
) -> None:
    """Pool initializer: load the default avatar and the engine once. Never raises (errors are kept)."""
    # Ctrl-C in a terminal reaches the whole process group: the server owns shutdown, not its workers
    # (a worker dying on SIGINT mid-read would also leave the pool's queue lock held); and a worker the pool
    # terminates leaves no tqdm semaphore registered with the server's resource tracker (ops.children).
    become_helper_process()
    if nice:
        os.nice(nice)  # behind the clock and FFmpeg when the cores are busy (engine.worker_nice)
    try:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        options = dict(engine_options)
        if devices:
            options["device"] = devices[index % len(devices)]
        from latentsync.avatar import Avatar

        host = EngineHost(engine_name, options, default=avatar_path, load_avatar=Avatar.load, max_avatars=max_avatars)
        _WORKER_SLOT.update(host=host, index=index, error=None)
    except Exception as exc:  # reported to the parent by every later call
        _WORKER_SLOT.update(host=None, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())


def _host() -> EngineHost:
    host: EngineHost | None = _WORKER_SLOT.get("host")
    if host is None:
        raise RuntimeError(f"worker failed to start: {_WORKER_SLOT.get('error', 'not initialised')}")
    return host


def worker_ping() -> tuple[int, str | None]:
    """This worker's pid and why its engine did not load (None: it loaded); the pool's start check."""
    return os.getpid(), _WORKER_SLOT.get("error")


def worker_avatars() -> tuple[int, list[str]]:
    """This worker's pid and the avatar paths it holds loaded, least recently used first."""
    host: EngineHost | None = _WORKER_SLOT.get("host")
    return os.getpid(), host.loaded() if host is not None else []


def worker_chunks(jobs: list[ChunkJob]) -> list[ChunkResult]:
    """:meth:`EngineHost.chunks` of this worker process."""
    return _host().chunks(jobs)
