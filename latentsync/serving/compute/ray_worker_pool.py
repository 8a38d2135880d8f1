"""RayWorkerPool: the engine workers as Ray actors, on any node of a Ray cluster (docs/scale-out.md).

The second backend of :class:`~latentsync.serving.compute.scheduling_pool.SchedulingPool` (``pool.backend:
ray``). The scheduler is the local pool's: the same bounded earliest-deadline-first queue, at
most one call in flight per worker, the same chunk deadline, a job retried once (on another
worker: the one that failed is not trusted again before it answers a ping) and then failed with
the reason, and a worker that answers its ping with an engine error marks the pool ``broken``.

Each worker is an :class:`EngineActor` holding an :class:`~latentsync.serving.compute.engine_host.EngineHost`
(the engine and its LRU of prepared avatars, as in a local worker process). Avatars reach other
nodes through Ray's object store: the server puts a prepared avatar there once
(:meth:`latentsync.avatar.Avatar.engine_payload`, keyed by its cache folder) and sends only the
object's reference with a job; an actor on any node fetches it on first use. Nothing in a job
carries frames.

Faults: an actor that dies (its process killed, its node lost) is restarted by Ray
(``max_restarts=-1``) wherever the cluster has room; until it answers a ping again it takes no
job. A call that outlives its deadline gets its actor killed (and so restarted). An actor that
cannot be placed (no node with the resources it needs) simply stays unverified until there is room.
The stream never depends on the pool: the pool only produces faces.

Threads: a Ray call may block rather than fail (a Ray Client server that stopped answering, a
network that drops packets), so no Ray call is ever made with the pool's lock held, and only the
pool's own threads make them: the *sender* sends chunk calls, the *monitor* waits for answers,
pings and kills. The *watchdog* makes no Ray call: when a call of either has not returned within
the chunk deadline, it marks the cluster unreachable (readiness fails, ``/health`` names it) and
retries or fails the jobs on air by their deadlines, as the monitor would; readiness comes back
when the call returns. ``submit`` and ``/health`` only take the lock, so they never wait on Ray.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import logging
import os
import socket
import stat
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from latentsync.avatar import Avatar
from latentsync.engines import ChunkResult
from latentsync.serving.compute.engine_host import EngineHost
from latentsync.serving.compute.jobs import ChunkJob, JobFailed
from latentsync.serving.compute.scheduling_pool import ClusterUnreachable, Job, SchedulingPool, WorkerPoolError

logger = logging.getLogger(__name__)

#: Seconds the monitor waits on Ray for a result before it checks deadlines again.
WAIT_S = 0.02
#: Recent call latencies kept per actor for its median in ``/health``.
LATENCY_WINDOW = 64
#: Prepared avatars whose object-store copy the pool keeps referenced (least recently used dropped).
MAX_AVATAR_OBJECTS = 32
#: Seconds between pings to an actor that answered none (Ray is restarting or placing it).
PING_RETRY_S = 0.5
#: Seconds a ping may stay unanswered before the actor is reported ``unplaced`` (no room in the cluster).
PLACEMENT_REPORT_S = 10.0
#: Seconds a ready actor may stay idle before it is pinged (a node or a GCS lost while no call ran
#: is noticed within this, not at the next chunk).
IDLE_PING_S = 5.0
#: Ray's setting (read from the environment by its core worker) for how long a process waits for
#: an unreachable GCS before Ray ends it (``gcs_rpc_server_reconnect_timeout_s``; Ray's default 60 s).
GCS_TIMEOUT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
#: The default of ``pool.ray_gcs_timeout_s``, in seconds.
GCS_TIMEOUT_S = 86400.0
#: Seconds a TCP connect to the cluster's address may take at start (:meth:`RayWorkerPool._check_reachable`).
REACH_TIMEOUT_S = 5.0
#: Seconds between the watchdog's checks (at most; a quarter of the chunk deadline when that is shorter).
WATCHDOG_PERIOD_S = 0.25
#: Seconds the sender waits for a call to send before it looks at the stop flag again.
SEND_IDLE_S = 0.5
#: Seconds :meth:`RayWorkerPool.close` waits for each of the pool's threads (one blocked in Ray is left).
JOIN_S = 2.0
#: Ray Client's setting (read from the environment at ``ray.init``) for how long a dropped ``ray://``
#: connection is retried before the client gives its session up (Ray's default 30 s); the cluster keeps
#: the session, and so the actors, as long after a client vanished.
CLIENT_RECONNECT_ENV = "RAY_CLIENT_RECONNECT_GRACE_PERIOD"
#: Seconds a dropped ``ray://`` connection is retried (:data:`CLIENT_RECONNECT_ENV`), unless that is set.
CLIENT_RECONNECT_S = 300


def _connect_problem(address: str) -> str | None:
    """Why a TCP connection to ``host:port`` (or ``ray://host:port``) fails, or None when it succeeds.

    Waits :data:`REACH_TIMEOUT_S` at most.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return None


def private_cache_dir() -> Path:
    """The node's folder for avatar caches: ``<tmp>/latentsync-ray-<uid>``, made 0700, verified before use.

    The name is predictable, so it is trusted only when it is a real directory (not a link) owned
    by this user that no one else may write to (then made 0700 if it was not); otherwise (another
    user made it first, or opened it) a fresh private folder is used for this actor's life (left in
    the temp directory) and a warning says why.

    Returns:
        A directory only this user can read or write.
    """
    base = Path(tempfile.gettempdir()) / f"latentsync-ray-{os.getuid()}"
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        logger.warning("node cache %s: %s; using a private folder for this actor", base, exc)
        return Path(tempfile.mkdtemp(prefix="latentsync-ray-"))
    info = os.lstat(base)
    # nobody else can have written into it: a directory of ours that others may not write to
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        logger.warning(
            "node cache %s is not a private folder of this user (owner %d, mode %o): not used; "
            "using a private folder for this actor",
            base,
            info.st_uid,
            info.st_mode & 0o7777,
        )
        return Path(tempfile.mkdtemp(prefix="latentsync-ray-"))
    if info.st_mode & 0o077:
        os.chmod(base, 0o700)  # made by an older version (0755): nothing foreign in it, now private
    return base


class EngineActor:
    """One engine worker as a Ray actor (``ray.remote`` is applied by :class:`RayWorkerPool`).

    The engine loads on the first :meth:`ping`, which brings the default avatar's object
    reference: nothing the constructor takes lives in the object store, so Ray can restart the
    actor anywhere at any time, and the pool's ping before its next job loads it again.

    Args:
        engine_name: Engine name for :func:`latentsync.engines.create_engine`.
        options: Engine options (picklable; ``device`` set to ``cuda`` for a GPU actor).
        default: Key (the server's cache folder) of the default avatar.
        max_avatars: Engines the actor keeps loaded (LRU).
    """

    def __init__(self, engine_name: str, options: Mapping[str, Any], default: str, max_avatars: int):
        self._engine_name = engine_name
        self._options = dict(options)
        self._default = default
        self._max_avatars = max_avatars
        self._refs: dict[str, Any] = {}
        self._folder = private_cache_dir()
        self._error: str | None = None
        self._host: EngineHost | None = None

    def _load(self, key: str) -> Avatar:
        import ray

        payload = ray.get(self._refs[key])
        return Avatar.from_engine_payload(payload, self._folder / Path(key).name)

    def ping(self, refs: dict[str, list[Any]]) -> tuple[int, str, str | None]:
        """Load the engine if not yet loaded; ``(pid, node id, engine error or None)``.

        Args:
            refs: The default avatar's key -> ``[ObjectRef]`` of its payload (in a list, so Ray
                hands the reference over, not the object).
        """
        import ray

        self._refs.update({key: box[0] for key, box in refs.items()})
        if self._host is None and self._error is None:
            try:
                self._host = EngineHost(
                    self._engine_name,
                    self._options,
                    default=self._default,
                    load_avatar=self._load,
                    max_avatars=self._max_avatars,
                )
            except Exception as exc:  # reported to the pool, which marks itself broken
                self._error = f"{type(exc).__name__}: {exc}"
        return os.getpid(), ray.get_runtime_context().get_node_id(), self._error

    def avatars(self) -> list[str]:
        """Avatar keys with a loaded engine, least recently used first."""
        return self._host.loaded() if self._host is not None else []

    def chunks(self, jobs: list[ChunkJob], refs: dict[str, list[Any]]) -> list[ChunkResult]:
        """:meth:`EngineHost.chunks`; ``refs`` maps the jobs' avatar key to ``[ObjectRef]`` of its payload."""
        if self._host is None:
            raise RuntimeError(f"worker failed to start: {self._error or 'not pinged'}")
        self._refs.update({key: box[0] for key, box in refs.items()})
        try:
            return self._host.chunks(jobs)
        finally:
            # only the avatars it keeps loaded (and the default) keep their payload's reference: the
            # object store frees the rest (a later job of an evicted avatar brings its reference again)
            keep = {self._default, *self._host.loaded()}
            for key in [k for k in self._refs if k not in keep]:
                del self._refs[key]


@dataclasses.dataclass(kw_only=True)
class _Actor:
    """The pool's view of one actor."""

    index: int
    handle: Any
    state: str = "starting"  # starting (ping outstanding) | ready | lost (its call failed; Ray restarts it)
    ping: Any = None  # the outstanding ping's ObjectRef
    ping_sent: float = 0.0  # when it last became unverified (started, or lost)
    ping_retry_at: float | None = None  # when the monitor sends the next ping (None: none due)
    last_answer: float = 0.0  # when it last answered a ping or a call (time.monotonic())
    liveness_sent: float | None = None  # when the outstanding ping of a ready, idle actor went out
    call: Any = None  # the outstanding chunks call's ObjectRef
    send: str = ""  # "queued" (a call for the sender), "sending" (the sender is in .remote()), "": neither
    kill_due: bool = False  # its call missed its deadline: the monitor kills it (Ray restarts it)
    dispatch_id: int | None = None
    last_dispatch: float = 0.0
    node: str = ""
    pid: int = 0
    jobs: int = 0
    failures: int = 0
    restarts: int = 0
    latencies: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActorStats:
    """One Ray actor in ``/health`` and ``/metrics``.

    Attributes:
        index: The actor's slot (0-based, stable over restarts).
        node: Ray node id (first 12 hex digits) the actor runs on; empty before it answered.
        pid: Its process id on that node.
        state: ``ready``, ``starting`` (placed or being placed, not yet answered), ``unplaced``
            (no answer for :data:`PLACEMENT_REPORT_S`: no node has room) or ``lost``.
        jobs: Chunk jobs it finished.
        failures: Calls lost with it (died, node lost, deadline missed).
        restarts: Times it was lost and restarted.
        latency_ms: Median seconds from dispatch to result of its recent calls, in ms (0: none yet).
    """

    index: int
    node: str
    pid: int
    state: str
    jobs: int
    failures: int
    restarts: int
    latency_ms: float


class RayWorkerPool(SchedulingPool):
    """Owns the engine actors on a Ray cluster (a :class:`~latentsync.serving.compute.jobs.JobQueue`).

    Args:
        engine_name: ``"parametric"`` or ``"latentsync"``.
        engine_options: Options for :func:`latentsync.engines.create_engine` (picklable).
        avatar_path: Cache directory of the default prepared avatar (read at :meth:`start`, put in the
            object store); None: given later with :meth:`set_default_avatar`, before :meth:`start`.
        workers: Actors to run; None: every GPU of the cluster (``gpus_per_worker`` set), or one per
            alive node (CPU engines).
        address: ``auto``, ``host:port``, ``ray://host:port``; None or empty: start a private Ray.
        cpus_per_worker: CPUs each actor reserves.
        gpus_per_worker: GPUs each actor reserves (None: a CPU engine).
        namespace: Ray namespace of the actors.
        object_store_mb: Object store of a private Ray in MB (None: Ray's default).
        gcs_timeout_s: Seconds this process waits for an unreachable GCS before Ray ends it
            (``pool.ray_gcs_timeout_s``; set as ``RAY_gcs_rpc_server_reconnect_timeout_s`` in this
            process's environment while Ray starts, so a private Ray's GCS and raylet get it too,
            then put back).
        start_timeout_s: Seconds every actor gets to answer its first ping at :meth:`start`.
        on_chunk_done, max_batch, max_avatars, deadline_s, max_queued: As for
            :class:`~latentsync.serving.compute.scheduling_pool.WorkerPool`.
    """

    def __init__(
        self,
        engine_name: str,
        engine_options: Mapping[str, Any],
        *,
        avatar_path: str | Path | None,
        workers: int | None,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float | None = None,
        namespace: str = "latentsync",
        object_store_mb: int | None = None,
        gcs_timeout_s: float = GCS_TIMEOUT_S,
        start_timeout_s: float = 600.0,
        on_chunk_done: Callable[[int, float], None] | None = None,
        max_batch: int = 1,
        max_avatars: int = 1,
        deadline_s: float = 60.0,
        max_queued: int = 4096,
    ):
        super().__init__(
            workers or 0, on_chunk_done=on_chunk_done, max_batch=max_batch, deadline_s=deadline_s, max_queued=max_queued
        )
        self._engine_name = engine_name
        self._engine_options = dict(engine_options)
        self._avatar_path = "" if avatar_path is None else str(avatar_path)
        self._requested = workers
        self._address = address or None
        self._cpus = float(cpus_per_worker)
        self._gpus = gpus_per_worker
        self._namespace = namespace
        self._object_store_mb = object_store_mb
        self._gcs_timeout_s = gcs_timeout_s
        self._start_timeout_s = start_timeout_s
        self._max_avatars = max(1, int(max_avatars))
        self._actors: list[_Actor] = []
        self._avatar_refs: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._monitor: threading.Thread | None = None
        self._started = False
        self._ray: Any = None
        self._actor_class: Any = None
        self._default_ref: Any = None  # the default avatar's payload in the object store
        self._no_worker_since: float | None = None  # since when no actor is ready
        # (since, why) while waiting on the cluster raises (a dropped ray:// connection, the GCS gone)
        self._cluster_error: tuple[float, str] | None = None
        # (since, which thread) while a Ray call has not returned for the chunk deadline (the watchdog)
        self._stalled: tuple[float, str] | None = None
        self._in_ray: dict[str, float] = {}  # thread role -> when its Ray call in progress began
        self._released: list[Any] = []  # refs given up on with the lock held, for the monitor to release (_drop)
        self._sendable = threading.Condition(self._lock)  # the sender waits here for calls to send
        self._sender: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._ray_owner: threading.Thread | None = None  # the thread that started a private Ray
        self._release_ray = threading.Event()  # tells it to shut that Ray down

    # ----------------------------------------------------------------- lifecycle
    def set_default_avatar(self, avatar_path: str | Path) -> None:
        """Serve ``avatar_path`` (a prepared avatar's cache directory) by default; before :meth:`start` only.

        Raises:
            RuntimeError: If the pool has started.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("the default avatar of a started Ray pool cannot change")
            self._avatar_path = str(avatar_path)

    @property
    def connected(self) -> bool:
        """True once :meth:`connect` (or :meth:`start`) connected this process to Ray."""
        return self._ray is not None and self._ray.is_initialized()

    def connect(self) -> None:
        """Connect this process's Ray driver to ``address`` (or start a private Ray); nothing if connected.

        The runtime calls it before any channel's clock ticks when ``pool.ray_address`` is set: Ray
        builds the driver's core worker holding the GIL (1.0-1.3 s measured on 2 loaded cores,
        Ray 2.60), which stalls every thread of the process, the output clock included (ticks
        skipped past ``stream.max_catchup_s``). :meth:`start` connects if this was not called.

        Raises:
            ClusterUnreachable: If nothing accepts a connection at ``address`` (worth retrying).
            WorkerPoolError: If Ray is not installed, or ``ray.init`` fails.
        """
        if self.connected:
            return
        try:
            import ray
        except ImportError:
            raise WorkerPoolError(
                "pool.backend=ray needs the ray package: .venv/bin/pip install -r requirements-ray.txt"
            ) from None
        self._ray = ray
        init: dict[str, Any] = dict(namespace=self._namespace, log_to_driver=False, logging_level=logging.WARNING)
        if self._address is None:
            init.update(include_dashboard=False, num_cpus=os.cpu_count() or 1)
            if self._object_store_mb:
                init["object_store_memory"] = int(self._object_store_mb) * 1024 * 1024
        self._check_reachable()
        # Ray's core worker reads its settings from the environment when it starts (and a private
        # Ray's GCS and raylet inherit it): without this, a GCS unreachable for 60 s (Ray's default)
        # ends the whole server, stream and all. Set for the start only, then put back as it was.
        # A Ray Client (ray://) likewise gives its session up after a connection dropped for 30 s:
        # the server would be left without actors for good. Unless the operator set it, it retries
        # for CLIENT_RECONNECT_S.
        settings = {GCS_TIMEOUT_ENV: str(int(self._gcs_timeout_s))}
        if CLIENT_RECONNECT_ENV not in os.environ:
            settings[CLIENT_RECONNECT_ENV] = str(CLIENT_RECONNECT_S)
        previous = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            if self._address is None:
                self._start_private_ray(init)
            else:
                ray.init(address=self._address, **init)
        except Exception as exc:
            where = f"the Ray cluster at {self._address}" if self._address else "a private Ray"
            raise WorkerPoolError(f"cannot reach {where}: {exc}") from exc
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def start(self) -> None:
        """Connect to (or start) Ray (:meth:`connect`), place the actors and wait until every one loaded its engine.

        Raises:
            ClusterUnreachable: If nothing accepts a connection at ``address`` (worth retrying).
            WorkerPoolError: If Ray is not installed or unreachable, no default avatar was given, an
                actor's engine failed to load (its message is included), or no actor answered within
                ``start_timeout_s`` (the cluster has no room for them: the message says what each
                needs). Actors beyond the room there is start ``unplaced`` and join when a node has room.
        """
        if not self._avatar_path:
            raise WorkerPoolError("the Ray pool has no default avatar (set_default_avatar before start)")
        self.connect()
        ray = self._ray
        try:
            self._workers = self._requested or self._default_workers()
            remote = ray.remote(EngineActor)
            self._actor_class = remote.options(
                num_cpus=self._cpus,
                num_gpus=self._gpus or 0,
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy="SPREAD",
            )
            self._default_ref = self._ray.put(Avatar.load(self._avatar_path).engine_payload())
            handles = [self._new_handle() for _ in range(self._workers)]
            now = time.monotonic()
            with self._lock:
                self._started = True
                for index, handle in enumerate(handles):  # the monitor's first poll pings them
                    self._actors.append(_Actor(index=index, handle=handle, ping_sent=now, ping_retry_at=now))
            self._start_threads()
            self._wait_started()
        except BaseException:
            self.close()
            raise

    def _start_threads(self) -> None:
        """Start the monitor, the sender and the watchdog (module docstring); :meth:`close` stops them."""
        self._monitor = threading.Thread(target=self._watch, name="ray-pool-monitor", daemon=True)
        self._sender = threading.Thread(target=self._send_calls, name="ray-pool-sender", daemon=True)
        self._watchdog = threading.Thread(target=self._guard, name="ray-pool-watchdog", daemon=True)
        for thread in (self._monitor, self._sender, self._watchdog):
            thread.start()

    def _check_reachable(self) -> None:
        """Refuse at once a cluster whose GCS (or Ray Client server) does not accept a connection.

        ``ray.init`` towards an address where nothing listens waits minutes (Ray's own retries),
        so the start is refused after a TCP connect of at most :data:`REACH_TIMEOUT_S` instead
        (``auto`` and a private Ray are not checked).

        Raises:
            ClusterUnreachable: Naming the address and the connect error.
        """
        address = self._address
        if address is None or address == "auto":
            return
        if (problem := _connect_problem(address)) is not None:
            raise ClusterUnreachable(f"cannot reach the Ray cluster at {address}: {problem}")

    def _gcs_gone(self) -> bool:
        """True when the connected cluster's GCS refuses connections (its head is gone)."""
        try:
            address = str(self._ray.get_runtime_context().gcs_address)
        except Exception:  # a Ray Client connection has no local GCS client: its configured address
            address = self._address or ""
        return bool(address) and address != "auto" and _connect_problem(address) is not None

    def _start_private_ray(self, init: dict[str, Any]) -> None:
        """Start a single-node Ray from a thread that lives until :meth:`close`.

        Ray starts its GCS and raylet with ``PR_SET_PDEATHSIG``, which fires when the *thread* that
        started them exits: started from the runtime's short-lived start-up thread, they would be
        killed seconds later. The owner thread also shuts Ray down at :meth:`close`.
        """
        started = threading.Event()
        errors: list[BaseException] = []

        def own() -> None:
            try:
                self._ray.init(**init)
            except BaseException as exc:  # handed to start()
                errors.append(exc)
                return
            finally:
                started.set()
            self._release_ray.wait()
            self._ray.shutdown()

        self._ray_owner = threading.Thread(target=own, name="ray-private-head", daemon=True)
        self._ray_owner.start()
        if not started.wait(self._start_timeout_s):
            raise TimeoutError(f"not started within {self._start_timeout_s:.0f} s")
        if errors:
            raise errors[0]

    def _default_workers(self) -> int:
        ray = self._ray
        if self._gpus:
            return max(1, int(ray.cluster_resources().get("GPU", 0) // self._gpus))
        return max(1, sum(1 for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) > 0))

    def _new_handle(self) -> Any:
        options = dict(self._engine_options)
        if self._gpus:
            options["device"] = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
        return self._actor_class.remote(self._engine_name, options, self._avatar_path, self._max_avatars)

    def _wait_started(self) -> None:
        """Wait until every actor answered, or some did and the rest stalled.

        Once at least one actor answered, the others get :data:`PLACEMENT_REPORT_S` without progress;
        then they stay ``unplaced`` and join when the cluster has room.

        Raises:
            WorkerPoolError: No actor answered within ``start_timeout_s``, or an engine failed to load.
        """
        deadline = time.monotonic() + self._start_timeout_s
        ready_count, progress_at = 0, time.monotonic()
        while True:
            with self._lock:
                ready = sum(1 for a in self._actors if a.state == "ready")
            if ready == self._workers:
                return
            now = time.monotonic()
            if ready != ready_count:
                ready_count, progress_at = ready, now
            if ready and now - progress_at > PLACEMENT_REPORT_S:
                logger.warning(
                    "%d of %d Ray actors not placed yet (each needs %s): they join when the cluster has room",
                    self._workers - ready,
                    self._workers,
                    self._need,
                )
                return
            if now > deadline:
                raise WorkerPoolError(
                    f"{self._workers - ready} of {self._workers} Ray actors did not start within "
                    f"{self._start_timeout_s:.0f} s: the cluster has no room for them (each needs {self._need})"
                )
            self._stop.wait(0.1)  # the monitor pings them
            if self._broken is not None:
                raise WorkerPoolError(f"engine worker failed to start: {self._broken}")

    def close(self) -> None:
        """Kill the actors and disconnect from Ray; pending jobs fail with "shutting down". Safe to call twice.

        Waits :data:`JOIN_S` for each of the pool's threads; one blocked in a Ray call that never
        returns (a daemon thread) is left behind with a warning.
        """
        self._stop.set()
        with self._lock:
            self._sendable.notify_all()
        for thread in (self._monitor, self._sender, self._watchdog):
            if thread is not None and thread is not threading.current_thread():
                thread.join(JOIN_S)
                if thread.is_alive():
                    logger.warning("%s did not stop within %.0f s (blocked in a Ray call)", thread.name, JOIN_S)
        with self._lock:
            actors, self._actors = self._actors, []
            self._started = False
            # released here, without the lock (a Ray Client ref's release waits for the server)
            refs = [self._default_ref, *self._avatar_refs.values(), *self._released]
            self._avatar_refs, self._default_ref, self._released = collections.OrderedDict(), None, []
        refs.clear()
        self._fail_everything("server shutting down")
        ray = self._ray
        if ray is None or not ray.is_initialized():
            return
        if self._address is not None and self._gcs_gone():
            # Lost with its cluster (the GCS gone): disconnecting from it aborts the process inside
            # Ray (SIGABRT in ray.shutdown). Nothing of ours runs there any more.
            logger.warning("the Ray cluster is unreachable: leaving it without a disconnect")
            atexit.unregister(ray.shutdown)
            self._exit_unsafe = True
            return
        for actor in actors:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception as exc:  # already gone, or the cluster unreachable: nothing is left to stop
                logger.debug("killing Ray actor %d: %s", actor.index, exc)
        if self._ray_owner is not None:  # a private Ray: its owner thread shuts it down
            self._release_ray.set()
            self._ray_owner.join(30.0)
        else:
            ray.shutdown()

    def ready(self) -> bool:
        """True while the actors run, the pool is not broken and a job would find an actor in time."""
        with self._lock:
            return (
                self._started
                and not self._stop.is_set()
                and self._broken is None
                and self._cluster_error is None
                and self._stalled is None
                and self._unavailable() is None
            )

    def worker_pids(self) -> list[int]:
        """Process ids of the actors that answered (each on its own node)."""
        with self._lock:
            return [a.pid for a in self._actors if a.pid]

    def worker_stats(self) -> list[ActorStats]:
        """Per-actor figures for ``/health`` and ``/metrics``."""
        now = time.monotonic()
        with self._lock:
            out = []
            for a in self._actors:
                state = a.state
                if state in ("starting", "lost") and now - a.ping_sent > PLACEMENT_REPORT_S:
                    state = "unplaced"
                latency = statistics.median(a.latencies) * 1000 if a.latencies else 0.0
                out.append(
                    ActorStats(
                        index=a.index,
                        node=a.node[:12],
                        pid=a.pid,
                        state=state,
                        jobs=a.jobs,
                        failures=a.failures,
                        restarts=a.restarts,
                        latency_ms=round(latency, 1),
                    )
                )
            return out

    def loaded_avatars(self, timeout_s: float = 5.0) -> list[list[str]]:
        """The avatar keys each ready actor holds loaded, least recently used first (tests, /health).

        Raises:
            JobFailed: If the pool is not running.
        """
        with self._lock:
            if not self._started:
                raise JobFailed("worker pool is not running")
            handles = [a.handle for a in self._actors if a.state == "ready"]
        loaded: list[list[str]] = self._ray.get([h.avatars.remote() for h in handles], timeout=timeout_s)
        return loaded

    def actor_nodes(self) -> list[str]:
        """Full Ray node id of each actor that answered (tests: where the work ran)."""
        with self._lock:
            return [a.node for a in self._actors]

    # ----------------------------------------------------------------- jobs (lock held)
    def _accepting(self) -> bool:
        return self._started

    def _free_worker(self) -> _Actor | None:
        """The free ready actor that was given work longest ago: load spreads over every node."""
        free = [a for a in self._actors if a.state == "ready" and a.call is None and not a.send]
        return min(free, key=lambda a: a.last_dispatch) if free else None

    def _dispatch(self, dispatch_id: int, jobs: list[Job], worker: _Actor) -> None:
        """Hand the call to the sender (lock held: no Ray call here, :meth:`_send_calls` makes it).

        At most one call per actor waits for the sender (the actor is busy from now on), so what
        waits is bounded by the number of actors.
        """
        worker.dispatch_id = dispatch_id
        worker.last_dispatch = time.monotonic()
        worker.send = "queued"
        self._sendable.notify()

    def _avatar_ref(self, key: str) -> Any:
        """The object-store reference of avatar ``key``'s engine payload, put on first use (sender thread).

        The lock is held only to look up and to record: the put itself (a Ray call) is made without it.
        """
        with self._lock:
            if key == self._avatar_path:
                return self._default_ref
            ref = self._avatar_refs.get(key)
            if ref is not None:
                self._avatar_refs.move_to_end(key)
                return ref
        ref = self._ray.put(Avatar.load(key).engine_payload())
        evicted = []  # released after the lock (a Ray Client ref's release waits for the server)
        with self._lock:
            self._avatar_refs[key] = ref
            while len(self._avatar_refs) > MAX_AVATAR_OBJECTS:
                evicted.append(self._avatar_refs.popitem(last=False))  # actors using it hold their own reference
        evicted.clear()
        return ref

    def _request_ping(self, actor: _Actor, delay_s: float = 0.0) -> None:
        """Have the monitor ping ``actor`` in ``delay_s`` seconds; an outstanding ping's answer is ignored.

        Lock held; no Ray call (the monitor sends it: :meth:`_send_pings`).
        """
        self._drop(actor.ping)
        actor.ping, actor.liveness_sent = None, None
        actor.ping_retry_at = time.monotonic() + delay_s

    def _drop(self, ref: Any) -> None:
        """Give up on ``ref`` (lock held): the monitor releases it later, without the lock.

        Dropping the last reference to a Ray Client's ref runs its destructor, which waits for the
        server to have named it: with the lock held, that froze ``/health`` (the Ray Client server
        stopped). At most two per actor wait here (its call and its ping), until the monitor's next poll.
        """
        if ref is not None:
            self._released.append(ref)

    def _release_dropped(self) -> None:
        """Release what :meth:`_drop` kept (monitor thread, without the lock: this may wait on Ray)."""
        with self._lock:
            released, self._released = self._released, []
        released.clear()

    # ----------------------------------------------------------------- the sender
    def _send_calls(self) -> None:
        """The sender thread: make the chunk calls :meth:`_dispatch` queued, without the lock."""
        while not self._stop.is_set():
            with self._lock:
                todo = [a for a in self._actors if a.send == "queued"]
                if not todo:
                    self._sendable.wait(SEND_IDLE_S)
                    continue
                batch = []
                for a in todo:
                    a.send = "sending"
                    assert a.dispatch_id is not None, "a call is queued with its dispatch id (_dispatch)"
                    batch.append((a, a.dispatch_id, a.handle, list(self._running.get(a.dispatch_id, []))))
            for actor, dispatch_id, handle, jobs in batch:
                try:
                    with self._in_ray_call("sender"):  # the refs it drops may wait on Ray too
                        self._send_call(actor, dispatch_id, handle, jobs)
                except Exception:  # the sender must outlive any one call
                    logger.exception("Ray pool sender")

    def _send_call(self, actor: _Actor, dispatch_id: int, handle: Any, jobs: list[Job]) -> None:
        """Send one chunk call; record its ObjectRef unless the call was given up on meanwhile."""
        if not jobs:  # already requeued or failed (its deadline passed while it waited)
            with self._lock:
                if actor.dispatch_id == dispatch_id and actor.send == "sending":
                    actor.send, actor.dispatch_id = "", None
                    self._dispatch_waiting()
            return
        key = jobs[0].job.avatar or self._avatar_path
        try:
            refs = {key: [self._avatar_ref(key)]}
            call = handle.chunks.remote([entry.job for entry in jobs], refs)
        except Exception as exc:  # the call never left: its jobs go back with their deadlines (a 2nd time: failed)
            logger.warning("dispatching %s failed: %s: %s", jobs[0].job.label, type(exc).__name__, exc)
            with self._lock:
                if actor.dispatch_id == dispatch_id and actor.send == "sending":
                    actor.send, actor.dispatch_id = "", None
                    lost = self._running.pop(dispatch_id, [])
                    self._requeue(lost, f"dispatch failed: {type(exc).__name__}: {exc}")
                    self._dispatch_waiting()
            return
        with self._lock:
            if actor.dispatch_id == dispatch_id and actor.send == "sending":
                actor.send, actor.call = "", call
            # else: its jobs were requeued (deadline, watchdog) meanwhile: the answer, if any, is ignored

    @contextlib.contextmanager
    def _in_ray_call(self, role: str) -> Iterator[None]:
        """Mark the current thread (``role``) as waiting on Ray, for the watchdog (:meth:`_check_stall`)."""
        with self._lock:
            self._in_ray[role] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._in_ray.pop(role, None)

    # ----------------------------------------------------------------- the watchdog
    def _guard(self) -> None:
        """The watchdog thread: :meth:`_check_stall` every :data:`WATCHDOG_PERIOD_S` (no Ray call here)."""
        period_s = min(WATCHDOG_PERIOD_S, self._deadline_s / 4)
        while not self._stop.wait(period_s):
            try:
                self._check_stall()
            except Exception:  # the watchdog must outlive any one bad check
                logger.exception("Ray pool watchdog")

    def _check_stall(self) -> None:
        """Mark the cluster unreachable while a Ray call (a poll, a send) has not returned for the chunk deadline.

        While it is marked, readiness fails, ``/health`` says why (:meth:`_unavailable`), calls past
        their deadline count lost and their jobs are retried or failed (the monitor would do it, but
        it is the one blocked), and queued jobs fail with the reason. The mark goes as soon as no
        call is that late any more; the actors then take jobs again once they answer a ping.
        """
        now = time.monotonic()
        with self._lock:
            late = [(since, role) for role, since in self._in_ray.items() if now - since > self._deadline_s]
            if late and self._stalled is None:
                self._stalled = min(late)
                logger.error(
                    "the Ray cluster has not answered the pool's %s for %.1f s (chunk deadline %.1f s): "
                    "the engine is not ready",
                    self._stalled[1],
                    now - self._stalled[0],
                    self._deadline_s,
                )
            elif not late and self._stalled is not None:
                logger.info("the Ray cluster answers again after %.0f s", now - self._stalled[0])
                self._stalled = None
            if self._stalled is None:
                return
            self._expire_calls(now)
        self._check_available()

    # ----------------------------------------------------------------- the monitor
    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll(WAIT_S)
            except Exception:  # the monitor must outlive any one bad answer
                logger.exception("Ray pool monitor")
                self._stop.wait(0.5)

    def _poll(self, timeout_s: float) -> None:
        """Send due pings, wait up to ``timeout_s`` for answers, handle them, and enforce the deadlines.

        The deadlines and the availability are checked whatever the wait did: when waiting on the
        cluster raises (a dropped ``ray://`` connection, the GCS gone), the pool reports itself not
        ready, running jobs still miss their deadlines and are retried or failed, and queued jobs
        fail once no actor could take them for the chunk deadline. When it blocks instead, the
        watchdog does the same (:meth:`_check_stall`).
        """
        with self._in_ray_call("monitor"):
            try:
                self._send_pings()
                self._wait_and_handle(timeout_s)
            finally:
                self._check_deadlines()
                self._release_dropped()
        self._check_available()

    def _send_pings(self) -> None:
        """Ping the actors whose ping is due, and the ready ones idle for :data:`IDLE_PING_S` (liveness)."""
        now = time.monotonic()
        with self._lock:
            due: list[tuple[_Actor, Any, float | None]] = []
            for a in self._actors:
                if a.ping is not None:
                    continue
                if a.ping_retry_at is not None and now >= a.ping_retry_at:
                    due.append((a, a.handle, None))
                elif (
                    a.ping_retry_at is None
                    and a.state == "ready"
                    and a.call is None
                    and not a.send
                    and now - a.last_answer >= IDLE_PING_S
                ):
                    due.append((a, a.handle, now))  # liveness: a failure or no answer in time loses it
            for a, _, _ in due:
                a.ping_retry_at = None
            refs = {self._avatar_path: [self._default_ref]}
        for actor, handle, liveness in due:
            try:
                ref = handle.ping.remote(refs)
            except Exception as exc:  # the cluster unreachable: ask again in a second
                logger.warning("pinging Ray actor %d: %s: %s", actor.index, type(exc).__name__, exc)
                with self._lock:
                    if actor.ping is None and actor.ping_retry_at is None:
                        actor.ping_retry_at = time.monotonic() + 1.0
                continue
            with self._lock:
                if actor.ping is None and actor.ping_retry_at is None and actor.handle is handle:
                    actor.ping, actor.liveness_sent = ref, liveness
                # else: asked again meanwhile (lost, replaced): the next poll sends a fresh one

    def _wait_and_handle(self, timeout_s: float) -> None:
        ray = self._ray
        with self._lock:
            # (ref, actor) pairs, never hashed or compared here: a Ray Client's ref learns its id from
            # the server, so its hash and == wait for an answer (and would hold the lock meanwhile)
            waiting = [(a.call, a) for a in self._actors if a.call is not None]
            waiting += [(a.ping, a) for a in self._actors if a.ping is not None]
        if waiting:
            refs = [ref for ref, _ in waiting]
            try:
                done, rest = ray.wait(refs, num_returns=1, timeout=timeout_s)  # returns at the first answer
                if done and rest:
                    done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            except Exception as exc:
                with self._lock:
                    if self._cluster_error is None:
                        logger.error("the Ray cluster is unreachable: %s: %s", type(exc).__name__, exc)
                        self._cluster_error = (time.monotonic(), f"{type(exc).__name__}: {exc}")
                self._stop.wait(min(timeout_s, 0.5))
                return
            with self._lock:
                if self._cluster_error is not None:
                    logger.info("the Ray cluster answers again")
                    self._cluster_error = None
        else:
            done = []
            self._stop.wait(timeout_s)
        for answered in done:
            # the ref we sent, not the one wait returned: a Ray Client (ray://) returns equal copies,
            # and the answer is matched to its actor's outstanding call or ping by identity
            ref, actor = next((ref, actor) for ref, actor in waiting if ref == answered)
            if ref is actor.ping:
                self._on_ping(actor, ref)
            elif ref is actor.call:
                self._on_call(actor, ref)

    def _check_available(self) -> None:
        """With no ready actor for longer than the chunk deadline, queued jobs fail with the reason."""
        now = time.monotonic()
        with self._lock:
            if any(a.state == "ready" for a in self._actors) or not self._started:
                self._no_worker_since = None
                return
            if self._no_worker_since is None:
                self._no_worker_since = now
            reason = self._unavailable()
            if reason is None or not self._queue:
                return
        self._fail_queued(reason)

    def _unavailable(self) -> str | None:
        """Why no job can run: the cluster or every actor unreachable for longer than the chunk deadline (lock held)."""
        if self._stalled is not None:
            began, role = self._stalled
            return (
                f"the Ray cluster has not answered for {time.monotonic() - began:.0f} s (a call from the pool's "
                f"{role} is blocked: Ray Client's server or the network to the cluster is not answering)"
            )
        if self._cluster_error is not None and time.monotonic() - self._cluster_error[0] > self._deadline_s:
            return (
                f"the Ray cluster has been unreachable for {time.monotonic() - self._cluster_error[0]:.0f} s "
                f"({self._cluster_error[1]})"
            )
        since = self._no_worker_since
        if since is None or time.monotonic() - since <= self._deadline_s:
            return None
        return (
            f"no engine worker: none of the {self._workers} Ray actors has been ready for "
            f"{time.monotonic() - since:.0f} s (lost, or no node has room: each needs {self._need})"
        )

    @property
    def _need(self) -> str:
        """What each actor reserves, as error messages say it (``1 CPU and 1 GPU``)."""
        return f"{self._cpus:g} CPU" + (f" and {self._gpus:g} GPU" if self._gpus else "")

    def _on_ping(self, actor: _Actor, ref: Any) -> None:
        ray = self._ray
        try:
            pid, node, error = ray.get(ref)
        except ray.exceptions.ActorDiedError as exc:  # for good (killed without restart): a new actor
            logger.warning("Ray actor %d died for good (%s): placing a new one", actor.index, exc.__class__.__name__)
            with self._lock:
                if actor.ping is not ref or not self._started:
                    return
                actor.ping, old = None, actor.handle
            try:
                new = self._new_handle()  # a Ray call: without the lock
            except Exception as new_exc:  # the cluster unreachable: the old handle's next ping says it again
                logger.warning("placing a new Ray actor %d: %s: %s", actor.index, type(new_exc).__name__, new_exc)
                with self._lock:
                    self._request_ping(actor, PING_RETRY_S)
                return
            with self._lock:
                actor.handle = new  # the same loss: counted once
                self._request_ping(actor)
            try:
                ray.kill(old, no_restart=True)
            except Exception as kill_exc:  # already gone
                logger.debug("killing the dead actor %d: %s", actor.index, kill_exc)
            return
        except Exception as exc:  # being restarted or placed by Ray: ask again soon
            logger.warning("Ray actor %d did not answer its ping: %s", actor.index, type(exc).__name__)
            with self._lock:
                if actor.ping is ref and actor.state == "ready":  # a liveness ping: it is gone
                    actor.ping, actor.liveness_sent = None, None  # `ref` still holds it: not the last reference
                    self._lose(actor, None, f"worker {actor.index} lost ({type(exc).__name__} to its ping)")
                elif actor.ping is ref:
                    self._request_ping(actor, PING_RETRY_S)
            return
        with self._lock:
            if actor.ping is not ref:
                return
            actor.ping, actor.liveness_sent = None, None
            actor.last_answer = time.monotonic()
            actor.pid, actor.node = pid, node
            if error:  # an actor cannot load its engine: every queued and later job fails with it
                self._broken = f"engine worker failed to start: {error}"
            elif actor.state != "ready":
                actor.state = "ready"
                logger.info("Ray actor %d ready on node %s (pid %d)", actor.index, node[:12], pid)
                self._dispatch_waiting()
        if error:
            self._announce_broken()

    def _on_call(self, actor: _Actor, ref: Any) -> None:
        """A chunk call answered: fetch its results and hand them to its jobs.

        The call stays the actor's while its results are fetched, so that a fetch that blocks (the
        cluster stopped answering between ``wait`` and ``get``) still counts against the call's
        deadline: the watchdog then gives up on it (:meth:`_expire_calls`) and its jobs are retried
        or failed, where they used to wait, attached to nothing, until the cluster came back. An
        answer fetched after its call was given up on is ignored.
        """
        ray = self._ray
        with self._lock:
            if actor.call is not ref:
                return
            dispatch_id = actor.dispatch_id
            assert dispatch_id is not None, "a call is sent with its dispatch id (_dispatch)"
            jobs = self._running.get(dispatch_id, [])
            started = jobs[0].submitted_at if jobs else time.monotonic()
        try:
            results = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the engine raised: deterministic, no retry
            if self._settle(actor, ref):
                self._engine_failed(dispatch_id, exc.cause if exc.cause is not None else exc)
            return
        except Exception as exc:  # the actor or its node is gone
            with self._lock:
                if actor.call is ref:
                    actor.call, actor.dispatch_id = None, None
                    self._lose(actor, dispatch_id, f"worker {actor.index} lost ({type(exc).__name__})")
            return
        if not self._settle(actor, ref):
            return
        with self._lock:
            actor.jobs += len(jobs)
            actor.last_answer = time.monotonic()
            actor.latencies.append(time.monotonic() - started)
        self._deliver(dispatch_id, results)

    def _settle(self, actor: _Actor, ref: Any) -> bool:
        """The answer to ``ref`` was fetched: free the actor; False when the call was given up on meanwhile."""
        with self._lock:
            if actor.call is not ref:
                return False  # its deadline passed while the answer was fetched: its jobs were retried or failed
            actor.call, actor.dispatch_id = None, None
            return True

    def _check_deadlines(self) -> None:
        """Give up on calls and liveness pings past their deadline; kill those calls' actors (Ray restarts them)."""
        with self._lock:
            self._expire_calls(time.monotonic())
            kills = [(a.index, a.handle) for a in self._actors if a.kill_due]
            for a in self._actors:
                a.kill_due = False
        for index, handle in kills:  # Ray calls: without the lock
            try:
                self._ray.kill(handle, no_restart=False)  # Ray restarts it
            except Exception as exc:  # unreachable: the restart comes when it is back
                logger.warning("killing Ray actor %d: %s", index, exc)

    def _expire_calls(self, now: float) -> None:
        """Calls (sent, or still with the sender) and liveness pings past their deadline count lost.

        Lock held; no Ray call: the watchdog calls it too.
        The actor of a call that was sent is marked for the monitor to kill (:meth:`_check_deadlines`).
        """
        for actor in self._actors:
            if actor.liveness_sent is not None and now - actor.liveness_sent > self._deadline_s:
                self._drop(actor.ping)
                actor.ping, actor.liveness_sent = None, None  # its answer, if it comes, is ignored
                self._lose(actor, None, f"worker {actor.index} did not answer its ping in {self._deadline_s:.1f} s")
                continue
            dispatch_id = actor.dispatch_id if actor.call is not None or actor.send else None
            jobs = self._running.get(dispatch_id) if dispatch_id is not None else None
            if jobs and now - jobs[0].submitted_at > self._deadline_s * len(jobs):
                reason = f"{jobs[0].job.label} missed its {self._deadline_s:.1f} s deadline on worker {actor.index}"
                actor.kill_due = actor.call is not None
                self._drop(actor.call)
                actor.call, actor.dispatch_id, actor.send = None, None, ""
                self._lose(actor, dispatch_id, reason)

    def _lose(self, actor: _Actor, dispatch_id: int | None, reason: str) -> None:
        """The actor's call is lost: requeue its jobs, and trust it again only after a ping (lock held)."""
        jobs = self._running.pop(dispatch_id, []) if dispatch_id is not None else []
        actor.failures += 1
        actor.restarts += 1
        actor.state = "lost"
        actor.ping_sent = time.monotonic()
        self._rebuilds += 1
        logger.warning("%s: %d job(s) queued again", reason, len(jobs))
        self._requeue(jobs, reason)
        self._request_ping(actor)
        self._dispatch_waiting()
