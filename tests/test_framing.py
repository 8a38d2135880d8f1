"""Framing a video into a frame of another aspect ratio: cover, contain, stretch.

Code: latentsync/media/framing.py (arithmetic, filters), latentsync/framing_plan.py (face search, load_clip).
"""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest

from latentsync.avatar import AvatarSettings
from latentsync.face import FaceTracker
from latentsync.framing_plan import load_clip, plan_framing
from latentsync.media.framing import FaceBox, Fit, Framing, check_background, cover_window
from tests.datafiles import media_file
from tests.streamtools import FFMPEG

PORTRAIT = "video/2s_GirlMuseum_0730.mp4"  # 832x1248, a presenter standing, head near the top


def test_cover_window_keeps_the_aspect_centres_the_face_and_puts_it_on_the_upper_third():
    face = FaceBox(cx=1400, cy=500, width=200, height=240, frames=10, sampled=10)
    x, y, w, h = cover_window((1920, 1080), (720, 1280), face)  # landscape source, portrait channel
    assert (w, h) == (608, 1080) and abs(w / h - 720 / 1280) < 0.01
    assert x == 1400 - 304 and y == 0  # horizontally centred on the face; the full height
    x, y, w, h = cover_window(
        (1080, 1920), (512, 512), FaceBox(cx=540, cy=900, width=200, height=240, frames=1, sampled=1)
    )
    assert (w, h) == (1080, 1080) and x == 0
    assert y == 900 - 360  # the face's centre on the upper third line of the window
    assert y + h <= 1920
    # a close-up: a third of the window above the centre would cut the head; keep 0.9 face heights
    x, y, w, h = cover_window(
        (1080, 1920), (1280, 720), FaceBox(cx=540, cy=700, width=600, height=700, frames=1, sampled=1)
    )
    assert y == 700 - 630 and (w, h) == (1080, 608)
    # no face: the centre; a face at an edge: the window stays inside the source
    assert cover_window((1080, 1920), (512, 512), None) == (0, 420, 1080, 1080)
    assert cover_window(
        (1920, 1080), (512, 512), FaceBox(cx=1900, cy=50, width=80, height=90, frames=1, sampled=1)
    ) == (840, 0, 1080, 1080)
    assert all(
        v % 2 == 0
        for v in cover_window(
            (1081, 1921), (511, 513), FaceBox(cx=300, cy=300, width=50, height=60, frames=1, sampled=1)
        )
    )


def test_bad_modes_and_backgrounds_are_refused():
    for bad in ("zoom", "", "COVER"):
        with pytest.raises(ValueError):
            AvatarSettings(size=(512, 512), fit=bad)
    for bad in ("red", "#12345", "#gg0000", "blurred"):
        with pytest.raises(ValueError):
            check_background(bad)
    assert check_background("#A0B0C0") == "#a0b0c0"


def blob_aspect(frame: np.ndarray) -> float:
    """Width / height of the bright blob (the white disc) in an RGB frame."""
    ys, xs = np.nonzero(frame.mean(axis=2) > 180)
    return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)


@pytest.fixture(scope="module")
def disc_video(tmp_path_factory):
    """832x1248 portrait video: a white disc (radius 150) on dark grey; 1 s at 25 fps."""
    path = tmp_path_factory.mktemp("framing") / "disc.mp4"
    lum = "if(lt(hypot(X-416\\,Y-560)\\,150)\\,235\\,60)"
    subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=black:s=832x1248:r=25:d=1",
         "-vf", f"geq=lum='{lum}':cb=128:cr=128,format=yuv420p", "-c:v", "libx264", "-qp", "0", "-y", str(path)],
        check=True,
        timeout=60,
    )  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("fit", "size", "aspect"),
    [("stretch", (512, 512), 1.5), ("cover", (512, 512), 1.0), ("contain", (512, 512), 1.0),
     ("cover", (640, 360), 1.0), ("contain", (640, 360), 1.0), ("cover", (832, 1248), 1.0)],
)  # fmt: skip
def test_a_round_disc_stays_round_unless_stretch_is_asked_for(disc_video, fit, size, aspect):
    clip = load_clip(disc_video, 25, 16000, size, with_audio=False, fit=fit)
    assert clip.size == size and clip.framing is not None
    assert blob_aspect(clip.frames[5]) == pytest.approx(aspect, rel=0.03), (fit, size)


def test_contain_fills_the_bars_with_the_blurred_video_or_a_colour(disc_video):
    blurred = load_clip(disc_video, 25, 16000, (512, 512), with_audio=False, fit="contain").frames[5]
    solid = load_clip(disc_video, 25, 16000, (512, 512), False, fit="contain", background="#ff0000").frames[5]
    # the picture is 342 px wide in the middle; the bars are the sides
    assert np.all(np.abs(solid[:, :80].astype(int) - [255, 0, 0]).max(axis=2) <= 3)
    assert np.abs(blurred[:, :80].astype(int) - [255, 0, 0]).max() > 100  # not the colour: the video, blurred
    middle = np.abs(solid[:, 100:412].astype(float) - blurred[:, 100:412]).mean()
    assert middle < 3, middle  # the same picture in the middle


def face_box(frames: np.ndarray) -> np.ndarray:
    """Median mesh box (x0, y0, x1, y1) over the frames."""
    with FaceTracker() as tracker:
        boxes = [det.box for f in frames if (det := tracker.detect(f)) is not None]
    assert len(boxes) >= len(frames) // 2
    return np.median(np.asarray(boxes), axis=0)


def test_a_portrait_presenter_on_a_square_channel_keeps_the_face_proportions():
    """The issue's measure: face width/height on air vs in the source, within 3 % (cover, contain)."""
    video = media_file(PORTRAIT)
    source = load_clip(video, 25, 16000, None, with_audio=False).frames[::10]
    x0, y0, x1, y1 = face_box(source)
    source_aspect = (x1 - x0) / (y1 - y0)
    got = {}
    for fit in ("cover", "contain", "stretch"):
        clip = load_clip(video, 25, 16000, (512, 512), with_audio=False, fit=fit)
        x0, y0, x1, y1 = face_box(clip.frames[::10])
        got[fit] = (x1 - x0) / (y1 - y0) / source_aspect
        if fit == "cover":
            framing: Framing = clip.framing
            assert framing.fit is Fit.cover and framing.face is not None and framing.crop[2:] == (832, 832)
    assert got["cover"] == pytest.approx(1.0, abs=0.03) and got["contain"] == pytest.approx(1.0, abs=0.03), got
    # what every channel showed before (the pixels are 1.5x too wide; the face mesh, a 3D model, less so)
    assert got["stretch"] > 1.25, got


def test_plan_framing_skips_the_face_search_when_nothing_is_cropped():
    video = media_file(PORTRAIT)
    assert plan_framing(video, (832, 1248), (416, 624), "cover").fit is Fit.stretch  # same aspect
    assert plan_framing(video, (832, 1248), (512, 512), "contain").face is None
    assert plan_framing(video, (832, 1248), (512, 512), "stretch").crop is None


def test_tiny_and_faceless_videos_are_framed_or_refused_clearly(tmp_path):
    from latentsync.media.probe import MediaProbeError

    tiny = tmp_path / "tiny.mp4"
    bars = tmp_path / "bars.mp4"
    for path, source in ((tiny, "color=c=gray:s=14x10:r=25:d=1"), (bars, "testsrc2=s=640x360:r=25:d=1")):
        subprocess.run(
            [FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", source, "-pix_fmt", "yuv444p",
             "-c:v", "libx264", "-y", str(path)],
            check=True,
            timeout=60,
        )  # fmt: skip
    with pytest.raises(MediaProbeError, match="too small to frame"):
        load_clip(tiny, 25, 16000, (512, 512), with_audio=False, fit="cover")
    assert load_clip(tiny, 25, 16000, (64, 64), with_audio=False, fit="contain").size == (64, 64)
    # no face in a landscape picture on a portrait channel: the centre, undistorted
    clip = load_clip(bars, 25, 16000, (360, 640), with_audio=False, fit="cover")
    assert clip.size == (360, 640) and clip.framing.face is None and clip.framing.crop == (218, 0, 202, 360)


def test_a_channel_without_a_size_takes_the_videos_aspect_ratio_at_most_max_side():
    from latentsync.media.framing import capped_size
    from latentsync.media.video import ClipLimits, MediaLimitError, display_size
    from latentsync.serving.runtime.channel import own_size

    assert capped_size((1080, 1920), 1280) == (720, 1280)
    assert capped_size((3840, 2160), 1280) == (1280, 720)
    assert capped_size((832, 1248), 1280) is None  # small enough: its own size
    video = media_file(PORTRAIT)
    assert display_size(video, (832, 1248)) == (832, 1248)
    limits = ClipLimits(max_s=60, max_file_bytes=10**9, max_decoded_bytes=10**10, max_pixels_per_s=62208000)
    assert own_size(video, 1280, 25, limits) is None and own_size(video, 624, 25, limits) == (416, 624)
    with pytest.raises(MediaLimitError, match="pixels"):  # too large to decode at all: refused, not scaled
        own_size(video, 624, 25, dataclasses.replace(limits, max_pixels_per_s=832 * 1248 * 25 - 1))


def test_a_video_with_rotation_metadata_is_framed_as_displayed(tmp_path):
    from latentsync.media.video import display_size

    rotated = tmp_path / "rotated.mp4"  # the 256x456 portrait clip, marked to display a quarter turned: 456x256
    subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-display_rotation", "90", "-i",
         str(media_file("video/nanmote002.mp4")), "-c", "copy", "-y", str(rotated)],
        check=True,
        timeout=60,
    )  # fmt: skip
    assert display_size(rotated, (256, 456)) == (456, 256)
    clip = load_clip(rotated, 25, 16000, (256, 256), with_audio=False, fit="cover")
    x, y, w, h = clip.framing.crop
    assert (w, h) == (256, 256) and x + w <= 456 and y + h <= 256 and clip.size == (256, 256)


def test_a_face_that_leaves_the_frame_is_framed_where_it_mostly_is_and_never_pasted_where_it_is_gone(tmp_path):
    """The presenter slides out of the picture after 1.2 s (0.8 s of the 2 s clip without her)."""
    from latentsync.avatar import EDGE_GAP_FRAMES, Avatar

    video = tmp_path / "leaves.mp4"
    subprocess.run(
        [
            FFMPEG, "-v", "error", "-i", str(media_file(PORTRAIT)),
            "-filter_complex",
            "color=c=0x204060:s=832x1248:r=25[bg];[bg][0:v]overlay=x='max(0,(t-1.2)*2600)':shortest=1",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-an", str(video),
        ],
        check=True,
    )  # fmt: skip
    avatar = Avatar.prepare(video, AvatarSettings(fps=25, size=(512, 512)), tmp_path / "cache")
    assert avatar.frame_size == (512, 512)
    n = avatar.num_frames
    found = np.asarray(avatar.found)
    assert found[:28].all() and not found[40:].any(), found.astype(int).tolist()
    # The cover window sits on the face where it mostly was (near the top of the portrait), from the
    # frames that show it: a square the source's width, not the centre of the picture.
    framing = avatar.meta["framing"]
    x, y, w, h = framing["crop"]
    assert framing["fit"] == "cover" and (x, w, h) == (0, 832, 832) and y < (1248 - 832) // 2
    assert 150 < framing["face"]["width"] < 220
    # Once she has left, no face is pasted in (a generated face there would be drawn on the empty
    # background): only the EDGE_GAP_FRAMES after the last frame with her take her last position.
    last = int(np.flatnonzero(found)[-1])
    pasteable = np.asarray(avatar.pasteable)
    assert pasteable[: last + EDGE_GAP_FRAMES + 1].all() and not pasteable[last + EDGE_GAP_FRAMES + 1 :].any()
    gone = [i for i in range(n) if not pasteable[i]]
    frame = np.array(avatar.frames[gone[-1]])
    assert np.array_equal(avatar.paste(gone[-1], np.full((256, 256, 3), 255, np.uint8), frame.copy()), frame)
