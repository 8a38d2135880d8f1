"""A spawned helper stopped by the server leaves no semaphore behind (latentsync/serving/ops/children.py).

A child that made a tqdm bar and is then terminated (as a preparation stopped by Ctrl-C is) used to
leave tqdm's ``multiprocessing.RLock`` registered with the parent's resource tracker, which warned
``leaked semaphore objects`` when the server exited.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.streamtools import REPO

PARENT = textwrap.dedent(
    """
    import multiprocessing, sys, time

    def child(helper, ready):
        if helper:
            from latentsync.serving.ops.children import become_helper_process
            become_helper_process()
        from tqdm import tqdm
        with tqdm(total=10, disable=True) as bar:
            bar.update(1)
            ready.set()
            time.sleep(60)

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        proc = ctx.Process(target=child, args=(sys.argv[1] == "helper", ready))
        proc.start()
        assert ready.wait(60)
        proc.terminate()  # what the server does to a preparation it stops
        proc.join(10)
    """
)


@pytest.mark.parametrize(("mode", "leaks"), [("plain", True), ("helper", False)])
def test_a_terminated_helper_leaves_no_semaphore_registered(mode, leaks, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    done = subprocess.run(
        [sys.executable, str(script), mode],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),  # the spawned child imports latentsync too
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert ("leaked semaphore" in done.stderr) is leaks, done.stderr
