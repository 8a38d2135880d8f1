"""ChildFaceFinder: the face search of cover framing in a child process, the same answer as in-process, MediaPipe
never imported by the caller, bounded in time, killed on close."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from latentsync.framing_plan import find_face
from latentsync.media import MediaProbeError
from latentsync.media.probe import probe_media
from latentsync.serving.ops.face_search import ChildFaceFinder
from tests.datafiles import make_faceless_video, media_file

#: Each search starts an interpreter and imports MediaPipe (about 2 s of CPU): out of make test-fast.
pytestmark = pytest.mark.slow

VIDEO = "video/nanmote002.mp4"


def coded(path) -> tuple[int, int]:
    info = probe_media(path)
    return info.width, info.height


def test_the_child_finds_the_face_the_server_would_have_found_and_no_face_where_there_is_none(tmp_path):
    video = media_file(VIDEO)
    finder = ChildFaceFinder()
    face, source = finder(video, coded(video))
    assert (face, source) == find_face(video, coded(video))
    assert face is not None and face.frames > 0
    faceless = make_faceless_video(tmp_path / "faceless.mp4")
    assert finder(faceless, coded(faceless)) == (None, find_face(faceless, coded(faceless))[1])


def test_a_file_that_is_not_a_video_is_a_media_probe_error(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video\n")
    with pytest.raises(MediaProbeError, match="junk.mp4"):
        ChildFaceFinder()(junk, (640, 360))


def test_framing_through_the_child_leaves_mediapipe_out_of_this_process():
    """A fresh interpreter frames a clip with cover through ChildFaceFinder: mediapipe is not in its modules."""
    script = (
        "import sys; from latentsync.framing_plan import load_clip;"
        "from latentsync.serving.ops.face_search import ChildFaceFinder;"
        f"clip = load_clip({str(media_file(VIDEO))!r}, 25, 16000, (512, 512), False, fit='cover',"
        " face_finder=ChildFaceFinder());"
        "print(clip.framing.fit.value, clip.framing.face is not None, 'mediapipe' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["cover", "True", "False"], out.stderr[-2000:]


def test_a_search_past_its_time_is_killed_and_close_kills_the_running_ones():
    video = media_file(VIDEO)
    with pytest.raises(MediaProbeError, match="took longer than 0.05 s"):
        ChildFaceFinder(timeout_s=0.05)(video, coded(video))
    finder = ChildFaceFinder()
    errors: list[BaseException] = []

    def search() -> None:
        try:
            finder(video, coded(video))
        except MediaProbeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=search)
    thread.start()
    time.sleep(0.3)  # the child is starting its interpreter
    t = time.monotonic()
    finder.close()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - t < 5
    assert len(errors) == 1 and "stopping" in str(errors[0]), errors
    with pytest.raises(MediaProbeError, match="stopping"):
        finder(video, coded(video))
