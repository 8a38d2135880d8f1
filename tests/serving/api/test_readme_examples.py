"""The README's curl examples, run as written against a real server (one ServerProcess for the module).

Every ``curl`` line of README.md's ``bash`` blocks that talks to ``http://127.0.0.1:11001`` is run with
bash in a folder holding the files it names (``speech.wav``, ``presenter.mp4``), the port replaced by the
test server's and the placeholders (``<task_id>``, ``av-…``) by what the earlier examples answered. It
must answer 2xx, and where the README shows the answer (``# 202 {"task_id": …}``) that status and those
keys. :data:`SKIPPED` lists the examples that are not run, each with its reason; an example neither run
nor listed fails the test, so a new README example is run from the day it is written.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.datafiles import media_file
from tests.streamtools import REPO, ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]

README = REPO / "README.md"
#: Example lines (after the port and placeholders are replaced: a prefix is enough) not run, and why.
SKIPPED: dict[str, str] = {}
#: The files the examples name, from tests/data/media.
FILES = {"speech.wav": "audio/4s_Wavfile_1719704064_11.wav", "presenter.mp4": "video/2s_GirlMuseum_0730.mp4"}
IDLE = "video/nanmote002.mp4"


def readme_curl_examples() -> list[tuple[str, str | None]]:
    """``(command, the comment after it or on the next line)`` of every local curl example, in README order."""
    out: list[tuple[str, str | None]] = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("curl ") or "http://127.0.0.1:11001" not in line:
                continue
            command, _, comment = line.partition("   #")
            if not comment and i + 1 < len(lines) and lines[i + 1].startswith("# "):
                comment = lines[i + 1][2:]
            out.append((command.strip(), comment.strip() or None))
    return out


def expected(comment: str | None) -> tuple[int | None, set[str]]:
    """The status and JSON keys a README comment shows (``202 {"task_id": "…", ...}``), if it shows them."""
    if comment is None:
        return None, set()
    status = re.match(r"(\d{3})\b", comment)
    keys = set(re.findall(r'"(\w+)":', comment.split("(")[0]))
    return (int(status.group(1)) if status else None), keys


@pytest.fixture(scope="module")
def server(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    proc = ServerProcess(
        [
            f"avatar.idle_video={media_file(IDLE)}",
            f"stream.rtmp_url={rtmp_server.url('readme')}",
            f"avatar.cache_dir={tmp / 'avatars'}",
            "engine.name=parametric",
            "engine.workers=1",
            "webrtc.enabled=false",
            "stream.clock_nice=0",  # what is checked here is the answers, not the clock: no priority over others
            "stream.clock_rt_priority=0",
        ],
        tmp / "server.log",
    ).start()
    proc.wait_healthy()
    proc.wait_engine_ready()
    yield proc
    code, _ = proc.stop()
    assert code == 0, proc.log()


def run_curl(command: str, cwd: Path) -> tuple[int, dict]:
    """Run one example with bash; returns (HTTP status, JSON body or {})."""
    done = subprocess.run(
        ["bash", "-c", f"{command} --silent --show-error --write-out '\\n%{{http_code}}'"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{command}: {done.stderr}"
    body, _, status = done.stdout.rpartition("\n")
    try:
        parsed = json.loads(body) if body.strip() else {}
    except json.JSONDecodeError:
        parsed = {}
    return int(status), parsed


def test_the_readme_curl_examples_work(server, tmp_path):
    examples = readme_curl_examples()
    assert len(examples) >= 7, examples  # the extraction still finds them
    for name, relative in FILES.items():
        shutil.copy(media_file(relative), tmp_path / name)
    found: dict[str, str] = {}  # placeholder -> value, from earlier answers
    ran, skipped = [], []
    for command, comment in examples:
        command = command.replace("127.0.0.1:11001", f"127.0.0.1:{server.port}")
        for placeholder, value in found.items():
            command = command.replace(placeholder, value)
        reason = next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)
        if reason is not None:
            skipped.append((command, reason))
            continue
        if '{"avatar": "av-' in command:  # a channel takes an avatar once it is prepared
            avatar = found["av-…"]
            status_of = f"curl http://127.0.0.1:{server.port}/avatars/{avatar}"
            deadline = time.monotonic() + 180
            while run_curl(status_of, tmp_path)[1].get("status") == "preparing" and time.monotonic() < deadline:
                time.sleep(0.5)
        status, body = run_curl(command, tmp_path)
        want_status, want_keys = expected(comment)
        assert 200 <= status < 300, f"{command} → {status} {body}\n{server.log()}"
        if want_status is not None:
            assert status == want_status or (command.endswith("/avatars") and status == 200), (command, status, body)
        assert want_keys <= set(body), f"{command}: the README shows {sorted(want_keys)}, the server gave {body}"
        if "task_id" in body:
            found.setdefault("<task_id>", body["task_id"])
        if str(body.get("id", "")).startswith("av-"):
            found.setdefault("av-…", body["id"])
        ran.append(command)
    print("\nREADME curl examples run:", *ran, "skipped:", *(f"{c} ({why})" for c, why in skipped), sep="\n  ")
    assert len(ran) + len(skipped) == len(examples)
