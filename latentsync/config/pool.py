"""The ``pool`` section: where the engine workers run (docs/scale-out.md)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PoolBackend(str, enum.Enum):
    """Where the engine workers run (docs/scale-out.md)."""

    local = "local"  # multiprocessing workers on this host
    ray = "ray"  # Ray actors on a Ray cluster


@dataclass(kw_only=True)
class PoolConfig:
    """Where the engine workers run; the scheduler above them is the same (docs/scale-out.md).

    ``backend``: ``local`` (processes on this host, ``engine.workers`` of them) or ``ray`` (one
    Ray actor per worker, on any node of a Ray cluster; needs ``pip install -r
    requirements-ray.txt``). ``ray_address``: ``auto`` (the cluster this host belongs to),
    ``host:port`` (a head's GCS), ``ray://host:10001`` (Ray Client), or null/empty to start a
    private single-node Ray owned by the server. ``ray_workers``: actors to run (null: every GPU
    of the cluster for ``latentsync``, one per node for ``parametric``). ``ray_cpus_per_worker``
    and ``ray_gpus_per_worker``: what each actor reserves (GPU only for ``latentsync``).
    ``ray_namespace``: the Ray namespace of the actors (two servers on one cluster use two).
    ``ray_object_store_mb``: the object store of a private Ray (null: Ray's default, 30 % of RAM).
    ``ray_gcs_timeout_s``: how long the server, a Ray driver, waits for an unreachable GCS before
    Ray ends the process (Ray's ``gcs_rpc_server_reconnect_timeout_s``, 60 s by default, which
    would take the stream down with it); while it waits, the stream stays on air and readiness
    says whether the actors still answer (docs/scale-out.md).
    """

    backend: PoolBackend = PoolBackend.local
    ray_address: str | None = None
    ray_workers: int | None = None
    ray_cpus_per_worker: float = 1.0
    ray_gpus_per_worker: float = 1.0
    ray_namespace: str = "latentsync"
    ray_object_store_mb: int | None = None
    ray_gcs_timeout_s: float = 86400.0
