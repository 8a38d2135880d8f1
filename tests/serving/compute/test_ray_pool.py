"""RayWorkerPool on a real two-node Ray cluster (``ray start`` on loopback): placement, avatars
through the object store, a node lost with a call in flight, and the actor placed again when the
node is back."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.engines import ChunkRequest, create_engine
from latentsync.serving.compute.jobs import ChunkJob
from tests.datafiles import media_file
from tests.raycluster import require_ray
from tests.streamtools import seconds_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEADLINE_S = 3.0


@pytest.fixture(scope="module")
def avatar(tmp_path_factory) -> Avatar:
    return Avatar.prepare(
        media_file("video/nanmote002.mp4"), AvatarSettings(fps=25), cache_dir=tmp_path_factory.getbasetemp() / "avatars"
    )


def job(k: int, avatar_key: str) -> ChunkJob:
    """Chunk ``k``: 16 frames whose features are those of 16 frames of seeded noise."""
    audio = (np.random.default_rng(k).standard_normal(16 * 640) * 0.1).astype(np.float32)
    return ChunkJob(
        task_id="task",
        chunk_index=k,
        avatar=avatar_key,
        audio_16k=audio,
        rows=(0, 16),
        frame_indices=np.arange(16, dtype=np.int64) + 16 * k,
        due_at=time.monotonic() + k,
    )


class Results:
    """Collects a pool's callbacks: chunk index -> faces, and the errors."""

    def __init__(self) -> None:
        self.faces: dict[int, np.ndarray] = {}
        self.done_at: dict[int, float] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def ok(self, result) -> None:
        with self.lock:
            self.faces[result.chunk_index] = result.faces
            self.done_at[result.chunk_index] = time.monotonic()

    def error(self, reason: str) -> None:
        with self.lock:
            self.errors.append(reason)

    def wait(self, n: int, timeout_s: float = 60.0) -> None:
        assert seconds_until(lambda: len(self.faces) + len(self.errors) >= n, timeout_s) is not None, self.errors
        assert not self.errors, self.errors


def expected_faces(avatar: Avatar, k: int) -> np.ndarray:
    """What the parametric engine renders for :func:`job` ``k`` in this process."""
    engine = create_engine("parametric", None, avatar)
    engine.load()
    j = job(k, str(avatar.path))
    rows = engine.features(j.audio_16k, *j.rows)
    return engine.generate(
        ChunkRequest(task_id="task", chunk_index=k, frame_indices=j.frame_indices, features=rows)
    ).faces


def second_node_id() -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("second"))


def test_one_actor_per_node_and_an_avatar_reaches_the_second_node_through_the_object_store(
    ray_cluster, avatar, tmp_path
):
    from latentsync.serving.compute.ray_worker_pool import RayWorkerPool

    pool = RayWorkerPool(
        "parametric", {}, avatar_path=avatar.path, workers=None, address=ray_cluster.address, start_timeout_s=120
    )
    pool.start()
    try:
        stats = pool.worker_stats()
        assert [s.state for s in stats] == ["ready", "ready"]  # None: one CPU actor per alive node
        nodes = pool.actor_nodes()
        assert len(set(nodes)) == 2 and second_node_id() in nodes
        # A second avatar, prepared "on the server" (its own cache folder), used once, then deleted:
        # the actors can only have it from Ray's object store.
        other = tmp_path / "avatars" / avatar.path.name.replace("nanmote002", "copy")
        shutil.copytree(avatar.path, other)
        results = Results()
        pool.submit(job(0, str(other)), results.ok, results.error)
        results.wait(1)
        shutil.rmtree(other)
        for k in (1, 2):  # both actors are free: one job each (the least recently used takes the next)
            pool.submit(job(k, str(other)), results.ok, results.error)
        results.wait(3)
        assert all(str(other) in loaded for loaded in pool.loaded_avatars())
        for k in range(3):
            np.testing.assert_array_equal(results.faces[k], expected_faces(avatar, k))
        assert sorted(s.jobs for s in pool.worker_stats()) == [1, 2]
    finally:
        pool.close()


def test_a_node_lost_with_a_call_in_flight_retries_it_on_the_other_node_and_its_actor_returns(
    ray_cluster, avatar, tmp_path
):
    from latentsync.serving.compute.ray_worker_pool import RayWorkerPool

    hold = tmp_path / "hold"
    options = {"hold_flag": str(hold), "hold_node": "second"}
    pool = RayWorkerPool(
        "tests.flaky_engine:create",
        options,
        avatar_path=avatar.path,
        workers=None,
        address=ray_cluster.address,
        deadline_s=DEADLINE_S,
    )
    pool.start()
    try:
        second = second_node_id()
        hold.touch()  # the second node's engine stalls in its next call
        results = Results()
        for k in (0, 1):  # one job on each actor
            pool.submit(job(k, str(avatar.path)), results.ok, results.error)
        assert seconds_until(lambda: hold.with_name("hold.held").exists(), 30) is not None
        held = next(s for s in pool.worker_stats() if pool.actor_nodes()[s.index] == second)
        ray_cluster.kill_node("second")
        lost_at = time.monotonic()
        results.wait(2, timeout_s=30)
        recovered_s = max(results.done_at.values()) - lost_at
        stats, workers = pool.stats(), pool.worker_stats()
        assert stats.retried == 1 and stats.failed == 0 and stats.completed == 2, stats
        assert workers[held.index].failures == 1 and workers[held.index].state != "ready"
        print(f"recovered in {recovered_s:.2f} s")
        assert recovered_s <= DEADLINE_S + 1.0, recovered_s
        for k in (0, 1):
            np.testing.assert_array_equal(results.faces[k], expected_faces(avatar, k))
        # The node is back: Ray places the actor there again, and it takes jobs after its ping.
        hold.unlink()
        ray_cluster.start_second()
        assert seconds_until(lambda: [s.state for s in pool.worker_stats()] == ["ready", "ready"], 90, 0.2), (
            pool.worker_stats()
        )
        for k in (2, 3):
            pool.submit(job(k, str(avatar.path)), results.ok, results.error)
        results.wait(4)
        assert len(set(pool.actor_nodes())) == 2  # on two nodes again
    finally:
        hold.unlink(missing_ok=True)
        pool.close()


def test_actors_killed_for_good_are_replaced_and_serve_again(ray_cluster, avatar):
    import ray

    from latentsync.serving.compute.ray_worker_pool import RayWorkerPool

    pool = RayWorkerPool("parametric", {}, avatar_path=avatar.path, workers=None, address=ray_cluster.address)
    pool.start()
    try:
        for actor in pool._actors:  # as an operator's `ray kill` or a failed restart would leave them
            ray.kill(actor.handle, no_restart=True)
        # The pool learns of it from the next call: lost on one actor, retried once on the other, which
        # is dead too: the chunk fails with the reason (its task would fail, the stream goes on).
        failed = Results()
        pool.submit(job(0, str(avatar.path)), failed.ok, failed.error)
        assert seconds_until(lambda: failed.errors, 30) is not None
        assert failed.errors == ["chunk 0 of task task failed twice (worker 1 lost (ActorDiedError))"] or (
            failed.errors == ["chunk 0 of task task failed twice (worker 0 lost (ActorDiedError))"]
        ), failed.errors
        # Both are replaced by new actors, which take jobs once they answered their ping.
        assert seconds_until(lambda: [s.state for s in pool.worker_stats()] == ["ready", "ready"], 90, 0.2)
        results = Results()
        pool.submit(job(1, str(avatar.path)), results.ok, results.error)
        results.wait(1, timeout_s=60)
        assert all(s.restarts == 1 for s in pool.worker_stats()), pool.worker_stats()
        assert pool.ready() and pool.problem is None
    finally:
        pool.close()


def test_a_cluster_without_room_for_the_actors_is_a_clear_start_error(ray_cluster, avatar):
    from latentsync.serving.compute.ray_worker_pool import RayWorkerPool
    from latentsync.serving.compute.scheduling_pool import WorkerPoolError

    # Every node has one CPU: an actor that needs two is never placed.
    pool = RayWorkerPool(
        "parametric",
        {},
        avatar_path=avatar.path,
        workers=1,
        address=ray_cluster.address,
        cpus_per_worker=2.0,
        start_timeout_s=5.0,
    )
    with pytest.raises(WorkerPoolError, match=r"1 of 1 Ray actors did not start .* no room .* 2 CPU"):
        pool.start()
    assert not pool.ready()
    # Three one-CPU actors on two one-CPU nodes: the pool starts with two; the third waits, unplaced.
    pool = RayWorkerPool(
        "parametric", {}, avatar_path=avatar.path, workers=3, address=ray_cluster.address, start_timeout_s=120
    )
    pool.start()
    try:
        assert sorted(s.state for s in pool.worker_stats()) == ["ready", "ready", "unplaced"]
        assert pool.ready() and pool.problem is None
        results = Results()
        for k in range(3):
            pool.submit(job(k, str(avatar.path)), results.ok, results.error)
        results.wait(3)
    finally:
        pool.close()


def test_queued_jobs_fail_with_the_reason_when_no_actor_is_ready_past_the_deadline(avatar):
    """The rule without a cluster: the pool's view of its actors is all it decides on."""
    from latentsync.serving.compute.ray_worker_pool import RayWorkerPool, _Actor

    pool = RayWorkerPool("parametric", {}, avatar_path=avatar.path, workers=2, deadline_s=0.5)
    pool._started = True  # as after start(): both actors lost (Ray restarting or placing them)
    pool._actors = [_Actor(index=0, handle=None, state="starting"), _Actor(index=1, handle=None, state="starting")]
    results = Results()
    pool._check_available()
    pool.submit(job(0, str(avatar.path)), results.ok, results.error)  # within the deadline: queued
    assert pool.stats().queued == 1 and pool.ready()
    time.sleep(0.6)
    pool._check_available()
    assert seconds_until(lambda: results.errors, 5) is not None
    assert "no engine worker: none of the 2 Ray actors has been ready" in results.errors[0]
    assert not pool.ready() and "no node has room: each needs 1 CPU" in pool.problem
    with pytest.raises(Exception, match="no engine worker"):
        pool.submit(job(1, str(avatar.path)), results.ok, results.error)
    pool._actors[0].state = "ready"  # one is back
    pool._check_available()
    assert pool.ready() and pool.problem is None


def test_a_private_ray_started_from_a_short_lived_thread_outlives_it(avatar, monkeypatch):
    """pool.ray_address null: the server starts its own Ray from its start-up thread, which then ends.

    Ray kills its GCS and raylet when the thread that started them exits (PR_SET_PDEATHSIG): the
    pool starts them from a thread of its own that lives until close().
    """
    require_ray()
    from latentsync.serving.compute.ray_worker_pool import RayWorkerPool

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray by a test
    pool = RayWorkerPool("parametric", {}, avatar_path=avatar.path, workers=None, address=None, object_store_mb=100)
    starter = threading.Thread(target=pool.start)
    starter.start()
    starter.join(120)
    try:
        assert pool.ready(), pool.problem
        time.sleep(3.0)  # what killed it before: the start-up thread's end
        results = Results()
        for k in range(4):
            pool.submit(job(k, str(avatar.path)), results.ok, results.error)
        results.wait(4)
        assert [s.state for s in pool.worker_stats()] == ["ready"] and pool.stats().retried == 0
    finally:
        pool.close()
    assert pool._ray_owner is not None and not pool._ray_owner.is_alive()  # Ray shut down with the pool
