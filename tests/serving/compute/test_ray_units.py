"""The Ray backend's monitor when the cluster stops answering (issue 35), on a fake ``ray`` module: no Ray needed.

A dropped ``ray://`` connection made ``ray.wait`` raise in the monitor before the deadline check, so
jobs on air hung while ``engine_ready`` stayed true.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from latentsync.serving.compute.ray_worker_pool import RayWorkerPool, _Actor
from latentsync.serving.compute.scheduling_pool import Job
from tests.serving.compute.test_scheduling import chunk_job


class Unreachable:
    """``ray`` as a client whose connection was cut: every call raises."""

    def wait(self, refs: list[Any], **kwargs: Any) -> Any:
        raise ConnectionError("ray client connection lost")

    def kill(self, handle: Any, **kwargs: Any) -> None:
        raise ConnectionError("ray client connection lost")


class Method:
    def remote(self, *args: Any) -> Any:
        raise ConnectionError("ray client connection lost")


class Handle:
    ping = Method()
    chunks = Method()


def test_a_cut_connection_fails_readiness_and_jobs_keep_their_deadlines():
    pool = RayWorkerPool("parametric", {}, avatar_path="unused", workers=1, deadline_s=0.3)
    pool._ray = Unreachable()
    actor = _Actor(index=0, handle=Handle(), state="ready", call="call-ref", dispatch_id=7)
    errors: list[str] = []
    running = Job(key=1, job=chunk_job("t"), on_done=lambda r: None, on_error=errors.append)
    running.submitted_at = time.monotonic() - 1.0  # on an actor for longer than its deadline
    with pool._lock:
        pool._started = True
        pool._actors = [actor]
        pool._running[7] = [running]
    assert pool.ready()
    pool._poll(0.01)  # the old monitor raised here, before any deadline was checked
    assert not pool.ready()  # readiness tells the truth at once
    assert actor.call is None and 7 not in pool._running  # its call counted lost: the job queued again
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
        pool._poll(0.01)
    assert errors and "Ray cluster has been unreachable" in errors[0], errors  # failed by its deadline
    assert pool.problem is not None and "unreachable" in pool.problem


class LoadedOnly:
    """An engine host that keeps the last avatar it generated for (an LRU of one)."""

    def __init__(self) -> None:
        self.last = "default"

    def chunks(self, jobs: list[Any]) -> list[Any]:
        self.last = jobs[0].avatar
        return []

    def loaded(self) -> list[str]:
        return [self.last]


def test_an_actor_lets_go_of_the_payloads_of_avatars_it_no_longer_keeps(tmp_path, monkeypatch):
    """Issue 35: actors kept a reference to every avatar ever sent, so the object store only grew."""
    import tempfile

    from latentsync.serving.compute.ray_worker_pool import EngineActor

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its node cache folder goes there

    actor = EngineActor("parametric", {}, "default", 1)
    actor._refs["default"] = "default-ref"
    actor._host = LoadedOnly()  # type: ignore[assignment]
    for k in range(5):
        job = dataclasses.replace(chunk_job("t", k), avatar=f"av{k}")
        actor.chunks([job], {f"av{k}": [f"ref{k}"]})
        assert actor._refs == {"default": "default-ref", f"av{k}": f"ref{k}"}


def test_the_node_cache_is_used_only_when_it_is_this_users_private_folder(tmp_path, monkeypatch):
    """Issue 35: the node cache's name is predictable; one another user made (or left open) is not trusted."""
    import os
    import tempfile

    from latentsync.serving.compute.ray_worker_pool import private_cache_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = tmp_path / f"latentsync-ray-{os.getuid()}"
    assert private_cache_dir() == base and (base.stat().st_mode & 0o777) == 0o700  # made private
    assert private_cache_dir() == base  # and found again
    base.chmod(0o755)  # as an older version made it: readable, not writable by others: kept, made private
    assert private_cache_dir() == base and (base.stat().st_mode & 0o777) == 0o700
    base.chmod(0o777)  # left open to others: anything in it could have been planted
    other = private_cache_dir()
    assert other != base and other.parent == tmp_path and (other.stat().st_mode & 0o777) == 0o700
    base.rmdir()
    base.symlink_to(other)  # a link planted in its place
    assert private_cache_dir() not in (base, other)
