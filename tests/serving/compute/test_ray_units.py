"""The Ray backend's monitor when the cluster stops answering (issue 35), on a fake ``ray`` module: no Ray needed.

A dropped ``ray://`` connection made ``ray.wait`` raise in the monitor before the deadline check, so
jobs on air hung while ``engine_ready`` stayed true. A Ray Client server that stops answering
(SIGSTOP) makes Ray calls block instead: the watchdog's tests use a fake whose calls block.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from latentsync.serving.compute.ray_worker_pool import IDLE_PING_S, RayWorkerPool, _Actor
from latentsync.serving.compute.scheduling_pool import Job
from tests.serving.compute.test_scheduling import chunk_job, result_for


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


class Ref:
    """A Ray Client's ObjectRef in the fake below: the answer it stands for.

    As a real one, it learns its id from the server: its hash, ``==`` and destructor wait while the
    cluster does not answer. Copies (what ``wait`` returns) are equal, not identical.
    """

    def __init__(self, ray: Stalling, value: Any, ref_id: int | None = None) -> None:
        self.ray, self.value = ray, value
        self.id = id(self) if ref_id is None else ref_id

    def copy(self) -> Ref:
        return Ref(self.ray, self.value, self.id)

    def __eq__(self, other: object) -> bool:
        self.ray.block()
        return isinstance(other, Ref) and other.id == self.id

    def __hash__(self) -> int:
        self.ray.block()
        return hash(self.id)

    def __del__(self) -> None:  # a real one tells the server it is released, once it knows its id
        self.ray.block()


#: Seconds a call of the fake below blocks at most (no test thread is left behind).
STALL_LIMIT_S = 20.0


class Stalling:
    """``ray`` as a client whose server stopped answering (SIGSTOPped): calls block instead of failing.

    Every call but ``.remote()`` waits while :attr:`answering` is clear (at most
    :data:`STALL_LIMIT_S`, so that no test thread is left behind), then answers at once: pings with
    a pid, chunk calls with faces; a ref's hash, ``==`` and destructor wait too. ``wait`` returns copies of the
    refs it was given. So does a Ray Client whose server was SIGSTOPped (measured).
    """

    class exceptions:
        class ActorDiedError(Exception):
            pass

        class RayTaskError(Exception):
            cause: BaseException | None = None

    def __init__(self) -> None:
        self.answering = threading.Event()
        self.answering.set()

    def block(self) -> None:
        if not self.answering.wait(STALL_LIMIT_S):
            raise TimeoutError("the fake cluster never answered again")

    def wait(self, refs: list[Any], num_returns: int = 1, timeout: float | None = None) -> Any:
        self.block()
        time.sleep(0.005)
        return [ref.copy() for ref in refs], []

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        self.block()
        return ref.value

    def kill(self, handle: Any, **kwargs: Any) -> None:
        self.block()

    def is_initialized(self) -> bool:
        return False  # close() has nothing to disconnect


class StallingHandle:
    """An actor handle whose ``.remote()`` calls block with the fake cluster."""

    def __init__(self, ray: Stalling) -> None:
        self.ping = StallingMethod(ray, lambda *args: (1234, "node", None))
        self.chunks = StallingMethod(ray, lambda jobs, refs: [result_for(job) for job in jobs])


class StallingMethod:
    def __init__(self, ray: Stalling, answer: Callable[..., Any]) -> None:
        self.ray, self.answer = ray, answer

    def remote(self, *args: Any) -> Ref:
        return Ref(self.ray, self.answer(*args))


def running_pool(ray: Stalling, deadline_s: float, state: str = "ready") -> RayWorkerPool:
    """A pool on the fake cluster with one actor (``ready``, or ``starting``: its first ping due),
    its threads running as after ``start``."""
    pool = RayWorkerPool("parametric", {}, avatar_path="avatar", workers=1, deadline_s=deadline_s)
    pool._ray = ray
    now = time.monotonic()
    actor = _Actor(index=0, handle=StallingHandle(ray), state=state, last_answer=now, ping_sent=now)
    if state == "starting":
        actor.ping_retry_at = now
    with pool._lock:
        pool._started = True
        pool._actors = [actor]
    pool._start_threads()
    return pool


def within(seconds: float, check: Callable[[], Any]) -> float | None:
    """Seconds until ``check()`` is true, or None after ``seconds``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if check():
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


def test_a_ray_call_that_blocks_fails_readiness_and_jobs_by_their_deadline_until_it_returns():
    """Issue 35: with Ray Client's server stopped, Ray calls block rather than fail.

    The old pool then waited in the blocked call: ``engine_ready`` stayed true and the job on it
    never ended. The watchdog (no Ray call of its own) now marks the cluster unreachable once a
    call has not returned for the chunk deadline, fails the job with the reason, and readiness
    comes back when the calls return.
    """
    ray = Stalling()
    pool = running_pool(ray, deadline_s=0.5)
    done: list[Any] = []
    errors: list[str] = []
    try:
        pool.submit(chunk_job("before"), done.append, errors.append)
        assert within(5, lambda: done) is not None and pool.ready(), errors
        ray.answering.clear()  # the cluster stops answering: every Ray call blocks
        with pool._lock:  # the idle actor's liveness ping is due: the monitor blocks waiting for it
            pool._actors[0].last_answer -= IDLE_PING_S
        time.sleep(0.1)
        t0 = time.monotonic()
        # the call's ref is then held by the pool alone: giving it up (its deadline) runs its destructor,
        # which waits on Ray (with the lock held, that froze /health and the watchdog)
        pool.submit(chunk_job("cut"), done.append, errors.append)
        assert within(5, lambda: not pool.ready()) is not None  # readiness tells the truth
        assert "has not answered" in (pool.problem or ""), pool.problem
        assert within(5, lambda: errors) is not None, "the job on air never ended"
        failed_after_s = time.monotonic() - t0
        assert "has not answered" in errors[0], errors
        assert failed_after_s < 0.5 + 1.0, failed_after_s  # by its deadline (+ the watchdog's period)
        assert len(done) == 1
        ray.answering.set()  # the cluster answers again
        assert within(5, pool.ready) is not None, pool.problem
        pool.submit(chunk_job("after"), done.append, errors.append)
        assert within(5, lambda: len(done) == 2) is not None, errors
        assert done[1].task_id == "after"
    finally:
        ray.answering.set()
        pool.close()


def test_submit_and_health_never_wait_on_a_blocked_ray_call():
    """Issue 35: the old pool sent a chunk call from ``submit`` with its lock held, the lock that
    ``/health`` (``worker_stats``, ``ready``, ``problem``) takes: one blocked Ray call froze both
    the task's thread and ``/health``. Ray calls are now made by the pool's own threads, without it."""
    ray = Stalling()
    pool = running_pool(ray, deadline_s=1.0)
    errors: list[str] = []
    try:
        ray.answering.clear()
        submit = threading.Thread(target=pool.submit, args=(chunk_job("t"), lambda r: None, errors.append))
        submit.start()
        submit.join(1.0)
        assert not submit.is_alive(), "submit waits on the blocked Ray call"
        time.sleep(0.3)  # the monitor polls meanwhile (and blocks on the new call's ref)
        answers: list[Any] = []

        def health() -> None:
            answers.append((pool.worker_stats(), pool.stats(), pool.ready(), pool.problem))

        probe = threading.Thread(target=health)
        probe.start()
        probe.join(1.0)
        assert answers, "/health waits on the blocked Ray call"
        assert within(5, lambda: errors) is not None  # and the job still ends, by its deadline
    finally:
        ray.answering.set()
        pool.close()


def test_answers_that_a_ray_client_returns_as_copies_reach_their_actor():
    """Issue 35: as a ``ray://`` client the server never became ready (the actors answered; the
    pool did not see it). A Ray Client's ``wait`` returns equal copies of the refs it was given,
    and the monitor matched an answer to its actor's ping or call by identity."""
    ray = Stalling()
    pool = running_pool(ray, deadline_s=2.0, state="starting")
    done: list[Any] = []
    errors: list[str] = []
    try:
        assert within(5, lambda: pool.worker_stats()[0].state == "ready") is not None, pool.worker_stats()
        pool.submit(chunk_job("t"), done.append, errors.append)
        assert within(5, lambda: done) is not None, errors
    finally:
        pool.close()


class StopsBeforeGet(Stalling):
    """The fake cluster stops answering between ``wait`` and ``get``: once :attr:`cut` is set, the
    ``get`` of the next chunk call's answer blocks, as on a Ray Client server SIGSTOPped just then."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = threading.Event()

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        if self.cut.is_set() and isinstance(ref.value, list):  # a chunk call's answer (a ping's is a tuple)
            self.cut.clear()
            self.answering.clear()
        return super().get(ref, timeout)


def test_a_cluster_that_stops_answering_while_an_answer_is_fetched_fails_the_job_by_its_deadline():
    """Red CI of 2026-12-07 (test_ray_e2e's 40 s cut): the task on air was still streaming at the end.

    The monitor let go of the call (the actor free, the job attached to no call) before fetching
    its answer; the cut came between ``wait`` and ``get``, so the job's deadline was never checked
    and the task waited for the whole cut. The job now fails by its deadline, the late answer is
    ignored, and the next job is served once the cluster answers again.
    """
    ray = StopsBeforeGet()
    pool = running_pool(ray, deadline_s=0.5)
    done: list[Any] = []
    errors: list[str] = []
    try:
        ray.cut.set()
        t0 = time.monotonic()
        pool.submit(chunk_job("cut"), done.append, errors.append)
        assert within(5, lambda: errors) is not None, "the job whose answer was being fetched never ended"
        assert time.monotonic() - t0 < 0.5 + 1.0  # by its deadline (+ the watchdog's period)
        assert "has not answered" in errors[0], errors
        assert not pool.ready()
        ray.answering.set()  # the cluster answers again: the blocked get returns a stale answer
        assert within(5, pool.ready) is not None, pool.problem
        pool.submit(chunk_job("after"), done.append, errors.append)
        assert within(5, lambda: done) is not None, errors
        time.sleep(0.2)
        assert [r.task_id for r in done] == ["after"]  # the given-up answer never reached its job
        assert len(errors) == 1
    finally:
        ray.answering.set()
        pool.close()
