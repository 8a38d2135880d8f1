"""The server's face searches, each in a child process: MediaPipe never enters the server.

``cover`` framing looks for the presenter's face (:func:`latentsync.framing_plan.find_face`) when a
channel loads an idle clip (a channel created, an avatar switched on) and when an avatar still is
drawn. Done in the server, the first search imports MediaPipe (and matplotlib, which it imports):
about 59,000 objects and 51 MB made after the heap was frozen at start-up
(:mod:`latentsync.serving.ops.memory`), which every full garbage collection then visits, 30-85 ms
with the GIL held and every clock of the process late (issue 38's chaos soak, docs/reliability.md).
:class:`ChildFaceFinder` runs each search in a fresh interpreter at a lower CPU priority
(``nice 10``, as avatar preparation), bounded in time, and hands back the face box; a search the
server no longer wants (it stops) is killed.

Run as ``python -m latentsync.serving.ops.face_search VIDEO WIDTH HEIGHT``, the module is the child:
it prints one JSON object, ``{"face": {...} | null, "source": [w, h]}`` or ``{"error": message}``
for a video the search cannot decode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from latentsync.media import MediaProbeError
from latentsync.media.framing import FaceBox

#: Seconds one face search may take (it decodes at most 60 small frames: 1-3 s on a 2-core machine, plus about
#: 1.5 s to start the interpreter and import MediaPipe); past it the child is killed and the framing fails.
FACE_SEARCH_TIMEOUT_S = 60.0
#: The child's CPU priority (``os.nice`` increment, as avatar preparation): the stream clocks keep theirs.
CHILD_NICE = 10


class ChildFaceFinder:
    """:func:`latentsync.framing_plan.find_face` in a child process, one per search; a ``FaceFinder``.

    Thread-safe: channel starts and still requests may search at once (one child each).

    Args:
        timeout_s: Seconds a search may take before its child is killed (:data:`FACE_SEARCH_TIMEOUT_S`).
    """

    def __init__(self, timeout_s: float = FACE_SEARCH_TIMEOUT_S):
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self._closed = False

    def __call__(self, path: str | Path, coded: tuple[int, int]) -> tuple[FaceBox | None, tuple[int, int]]:
        """The presenter's face in a video, as :func:`latentsync.framing_plan.find_face` returns it.

        Args:
            path: The video.
            coded: Its coded ``(width, height)`` in pixels (the probe's).

        Returns:
            ``(face, source)``: the median face box in displayed source pixels (None: no face on any
            sampled frame) and the displayed ``(width, height)``.

        Raises:
            latentsync.media.MediaProbeError: The video cannot be decoded; the search took longer than
                ``timeout_s``, failed, or the finder is closed (the server stops).
        """
        name = Path(path).name
        command = [sys.executable, "-m", __name__, str(path), str(int(coded[0])), str(int(coded[1]))]
        with self._lock:
            if self._closed:
                raise MediaProbeError(f"{name}: no face search, the server is stopping")
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_child_environment(),
            )
            self._children.add(child)
        try:
            out, err = child.communicate(timeout=self._timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise MediaProbeError(f"{name}: the face search took longer than {self._timeout_s:g} s") from None
        finally:
            with self._lock:
                self._children.discard(child)
        try:
            answer = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            last = err.strip().splitlines()[-1][:200] if err.strip() else f"exit code {child.returncode}"
            if self._closed:
                raise MediaProbeError(f"{name}: no face search, the server is stopping") from None
            raise MediaProbeError(f"{name}: the face search failed ({last})") from None
        if "error" in answer:
            raise MediaProbeError(answer["error"])
        face = FaceBox(**answer["face"]) if answer["face"] is not None else None
        return face, (int(answer["source"][0]), int(answer["source"][1]))

    def close(self) -> None:
        """Kill the searches running now; later calls raise ``MediaProbeError``. Safe to call twice."""
        with self._lock:
            self._closed = True
            children = list(self._children)
        for child in children:
            child.kill()


def _child_environment() -> dict[str, str]:
    """This process's environment with the folder holding ``latentsync`` first on ``PYTHONPATH``.

    The server may run from any working directory (systemd's ``WorkingDirectory``) without the package
    installed; the child imports it from where this process did.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _main(argv: list[str]) -> int:
    """The child: search ``argv = [video, width, height]`` and print the JSON answer (module docstring)."""
    os.nice(CHILD_NICE)
    from latentsync.framing_plan import find_face

    video, width, height = argv[0], int(argv[1]), int(argv[2])
    try:
        face, source = find_face(video, (width, height))
    except MediaProbeError as exc:
        print(json.dumps({"error": str(exc)}))
        return 0
    print(json.dumps({"face": dataclasses.asdict(face) if face is not None else None, "source": list(source)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
