"""``infer_serv.py`` whose local workers run the test engine of tests/flaky_engine.py (a real server, real workers).

Some faults live inside an engine worker and nothing outside the process can cause them: a worker that
answers faces of the wrong size (another build of the engine), one that refuses to load. This launcher
runs the unchanged server (:func:`infer_serv.main`, same arguments) with one difference: the local
:class:`WorkerPool` it builds loads ``tests.flaky_engine:create`` instead of ``parametric``, with the
options of the JSON object in ``LSR_FLAKY_ENGINE_OPTIONS`` (e.g. ``{"wrong_flag": "/tmp/x"}``). With
no flag file present that engine *is* the parametric engine (a subclass that changes nothing), so the
other tests sharing such a server see the product's behaviour. Start it with ``engine.name=parametric``
(:class:`tests.streamtools.ServerProcess` ``script=FLAKY_SERVER``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: tests/ is on sys.path, the repository (the tests package) is not
    sys.path.insert(0, str(REPO))

#: Environment variable holding the test engine's options (a JSON object).
OPTIONS_ENV = "LSR_FLAKY_ENGINE_OPTIONS"


def flaky_worker_pool(options: dict):
    """A :class:`WorkerPool` subclass that builds ``tests.flaky_engine:create`` workers with ``options``.

    Raises:
        ValueError: If the server asks for another engine than ``parametric`` (the test engine is parametric).
    """
    from latentsync.serving.compute.worker_pool import WorkerPool

    class FlakyWorkerPool(WorkerPool):
        def __init__(self, engine_name: str, engine_options, **kwargs):
            if engine_name != "parametric" or engine_options:
                raise ValueError(f"tests/flaky_server.py runs engine.name=parametric only, not {engine_name!r}")
            super().__init__("tests.flaky_engine:create", dict(options), **kwargs)

    return FlakyWorkerPool


def main() -> int:
    """Patch the runtime's local pool, then run :func:`infer_serv.main` with this process's arguments."""
    import infer_serv
    from latentsync.serving.runtime import runtime

    runtime.WorkerPool = flaky_worker_pool(json.loads(os.environ.get(OPTIONS_ENV) or "{}"))
    return infer_serv.main()


if __name__ == "__main__":
    sys.exit(main())
