"""A real two-node Ray cluster on loopback for the Ray backend's tests (``ray start``, stopped by pid).

The head and a second node run on this machine, each with one CPU and its own raylet, object
store and explicit ports, under a private ``--temp-dir``: nothing is shared with another Ray on
the machine, and :meth:`RayCluster.stop` kills exactly this cluster's processes (``ray stop``
would stop every Ray on the host). The second node carries the custom resource ``second`` and
the environment variable ``LSR_TEST_NODE=second`` (its actors inherit it), so tests can see where
work ran and make one node's engine stall. Optionally the head also runs Ray Client's server (the
proxier): drivers then connect as ``ray://`` clients (:attr:`RayCluster.client_address`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from latentsync.serving.ops import procfs
from tests.streamtools import REPO, free_port, seconds_until

RAY = Path(sys.executable).with_name("ray")
OBJECT_STORE_BYTES = 200 * 1024 * 1024
#: Ports each node's worker processes may listen on (explicit, so they never meet another option's).
WORKER_PORTS = 16


def require_ray() -> None:
    """Skip locally when the optional ray package is absent; under CI=true (make test installs it) fail."""
    try:
        import ray  # noqa: F401
    except ImportError:
        message = "ray not installed (make setup-ray, or pip install -r requirements-ray.txt)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


class RayCluster:
    """Head + second node started with ``ray start``; :attr:`address` is the head's GCS ``host:port``.

    Args:
        nodes: 2 (head and second node) or 1 (the head only).
        client_server: Also run Ray Client's server on the head, at :attr:`client_address`
            (``ray://127.0.0.1:<port>``; needs ``ray[client]``).
    """

    COMMON = (
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
    )

    def __init__(self, *, nodes: int = 2, client_server: bool = False) -> None:
        assert nodes in (1, 2), nodes
        self.nodes = nodes
        # Unix socket paths must stay under 108 bytes: a short folder of our own, not pytest's tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lsr-ray-", dir="/tmp"))
        self._taken: set[int] = set()
        self.port = self._port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_ports = {"head": self._port(), "second": self._port()}
        self.client_port = self._port() if client_server else None
        self.client_address = f"ray://127.0.0.1:{self.client_port}" if client_server else None
        # A loopback test cluster without token auth, whatever ~/.ray/auth_token holds (Ray 2.5x+ turns
        # token auth on when that file exists, which a private ray.init() creates); drivers of this
        # process and its children (the server under test) are told the same by start().
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
        # The nodes keep Ray's own GCS timeout (60 s): the tests of a lost GCS rely on it.
        self.env.pop("RAY_gcs_rpc_server_reconnect_timeout_s", None)
        # Ray Client's server forks a server per client while its gRPC threads run; with grpcio's fork
        # handlers on, the child sometimes dies at once (``epoll_wait error: Bad file descriptor``) and
        # the client's connect fails with "Starting Ray client server failed" (2 of 24 connects here;
        # 0 of 20 without the handlers). docs/scale-out.md says the same for a production head.
        self.env["GRPC_ENABLE_FORK_SUPPORT"] = "0"
        self._saved_auth_mode: str | None = None
        self.log = self.temp_dir / "ray-start.log"

    def _port(self) -> int:
        """A free loopback port none of this cluster's options uses yet."""
        while (port := free_port()) in self._taken:
            pass
        self._taken.add(port)
        return port

    def _ports(self, node: str) -> list[str]:
        workers = ",".join(str(self._port()) for _ in range(WORKER_PORTS))
        return [
            f"--node-manager-port={self.node_ports[node]}",
            f"--object-manager-port={self._port()}",
            f"--metrics-export-port={self._port()}",
            f"--dashboard-agent-listen-port={self._port()}",
            f"--dashboard-agent-grpc-port={self._port()}",
            f"--runtime-env-agent-port={self._port()}",
            f"--worker-port-list={workers}",
        ]

    def _ray_start(self, args: list[str], env: dict) -> None:
        with self.log.open("a") as log:
            done = subprocess.run(
                [str(RAY), "start", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120
            )
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed ({done.returncode}):\n{self.log.read_text()[-3000:]}")

    def start(self) -> RayCluster:
        """Start both nodes; wait until the head sees two alive nodes (on failure, nothing is left running).

        Sets ``RAY_AUTH_MODE=disabled`` in this process's environment until :meth:`stop`, so that
        the drivers of this process and of the processes it starts connect without a token.
        """
        self._saved_auth_mode = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self._ray_start(
            [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                # A lost node is declared dead after 3 missed 1 s health checks (Ray's default: 5 x 3 s).
                '--system-config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3}',
                *self.COMMON,
                *self._ports("head"),
                *([f"--ray-client-server-port={self.client_port}"] if self.client_port else []),
            ],
            self.env,
        )
        if self.nodes == 2:
            self.start_second()

    def start_second(self) -> None:
        """Start (or start again, after :meth:`kill_node`) the second node; wait until the head counts it."""
        self.node_ports["second"] = self._port()
        self._ray_start(
            [
                f"--address={self.address}",
                f"--resources={json.dumps({'second': 1})}",
                *self.COMMON,
                *self._ports("second"),
            ],
            dict(self.env, LSR_TEST_NODE="second"),
        )
        if seconds_until(lambda: self.alive_nodes() == 2, 60, poll_s=0.5) is None:
            raise RuntimeError(f"the second Ray node never joined:\n{self.log.read_text()[-3000:]}")

    def kill_node(self, node: str) -> None:
        """Take ``node`` away as a lost machine would: SIGKILL its raylet and every process under it."""
        raylet = self.raylet_pid(node)
        victims = [raylet, *self._descendants(raylet)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def alive_nodes(self) -> int:
        """Alive nodes as the head's GCS reports them (``ray list nodes``-free: the status command)."""
        done = subprocess.run(
            [str(RAY), "status", f"--address={self.address}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        active = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))

    def node_id(self, node: str) -> str:
        """The Ray node id (hex) of ``head`` or ``second``, asked of the GCS from a separate driver process."""
        want = "node:__internal_head__" if node == "head" else "second"
        code = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); "
            f"print(next(n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get({want!r})))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout.strip().splitlines()[-1]

    def pids(self, match: str = "") -> list[int]:
        """Processes of this cluster: those whose command line names its temp dir or its GCS, and
        their descendants (actor workers rename themselves ``ray::...``); optionally filtered by ``match``."""
        parents = _parents()
        cmds = {pid: procfs.command_line(pid) for pid in parents}
        marks = [str(self.temp_dir), f"--gcs-address={self.address}", f"--gcs_server_port={self.port}"]
        ours = {pid for pid, cmd in cmds.items() if any(m in cmd for m in marks) or self._client_server(cmd)}
        ours |= _descendants(ours, parents)
        return sorted(pid for pid in ours if match in cmds.get(pid, ""))

    def _client_server(self, cmd: str) -> bool:
        """Whether ``cmd`` is this cluster's Ray Client server (the proxier, or a per-client server it
        started): Ray names the GCS there by the host's own address (``--address=<host ip>:<port>``),
        not by the ``--node-ip-address`` the nodes were given, and reparents it to init."""
        return "ray.util.client.server" in cmd and any(
            arg.startswith("--address=") and arg.endswith(f":{self.port}") for arg in cmd.split()
        )

    def client_server_pids(self, mode: str = "") -> list[int]:
        """The Ray Client server's processes: the proxier (``mode="proxy"``) and the per-client servers
        it started (``mode="specific-server"``); all of them with ``mode=""``."""
        parents = _parents()
        cmds = {pid: procfs.command_line(pid) for pid in parents}
        return sorted(pid for pid, cmd in cmds.items() if self._client_server(cmd) and f"--mode={mode}" in cmd)

    def _descendants(self, pid: int) -> set[int]:
        return _descendants({pid}, _parents())

    def raylet_pid(self, node: str) -> int:
        """The raylet of ``node`` (``head`` or ``second``), found by its node-manager port."""
        pids = self.pids(f"--node_manager_port={self.node_ports[node]}")
        raylets = [p for p in pids if (found := procfs.read_stat(p)) is not None and "raylet" in found.comm]
        assert len(raylets) == 1, (node, pids)
        return raylets[0]

    def stop(self) -> None:
        """SIGKILL every process of this cluster (workers included), then remove its temp dir."""
        for _ in range(3):
            pids = [p for p in self.pids() if p != os.getpid()]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._saved_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = self._saved_auth_mode


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    return {pid: found.ppid for pid, found in procfs.process_stats().items()}


def _descendants(roots: set[int], parents: dict[int, int]) -> set[int]:
    """Every process under ``roots`` (not the roots themselves)."""
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found - roots
        found |= frontier
    return found
