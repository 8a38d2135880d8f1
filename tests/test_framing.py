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
from latentsync.media.framing import FACE_FRACTION, FaceBox, Fit, Framing, check_background, cover_window
from tests.datafiles import media_file
from tests.streamtools import FFMPEG

PORTRAIT = "video/2s_GirlMuseum_0730.mp4"  # 832x1248, a presenter standing, head near the top


def test_cover_window_keeps_the_aspect_centres_the_face_and_puts_it_on_the_upper_third():
    face = FaceBox(cx=1400, cy=500, width=200, height=240, frames=10, sampled=10)
    x, y, w, h = cover_window((1920, 1080), (720, 1280), face)  # landscape source, portrait channel
    assert (w, h) == (608, 1080) and abs(w / h - 720 / 1280) < 0.01  # no smaller window without upscaling
    assert x == 1400 - 304 and y == 0  # horizontally centred on the face; the full height
    # the rule before avatar.face_fraction (face_fraction=None): the largest window
    x, y, w, h = cover_window(
        (1080, 1920), (512, 512), FaceBox(cx=540, cy=900, width=200, height=240, frames=1, sampled=1), None
    )
    assert (w, h) == (1080, 1080) and x == 0
    assert y == 900 - 360  # the face's centre on the upper third line of the window
    assert y + h <= 1920
    # a close-up: a third of the window above the centre would cut the head; keep 0.9 face heights
    x, y, w, h = cover_window(
        (1080, 1920), (1280, 720), FaceBox(cx=540, cy=700, width=600, height=700, frames=1, sampled=1)
    )
    assert y == 700 - 630 and (w, h) == (1080, 608)
    # no face: the centre; a face at an edge: the window stays inside the source, the face off-centre
    assert cover_window((1080, 1920), (512, 512), None) == (0, 420, 1080, 1080)
    assert cover_window(
        (1920, 1080), (512, 512), FaceBox(cx=1900, cy=50, width=80, height=90, frames=1, sampled=1)
    ) == (1408, 0, 512, 512)
    assert cover_window(
        (1920, 1080), (512, 512), FaceBox(cx=1900, cy=50, width=80, height=90, frames=1, sampled=1), None
    ) == (840, 0, 1080, 1080)
    assert all(
        v % 2 == 0
        for v in cover_window(
            (1081, 1921), (511, 513), FaceBox(cx=300, cy=300, width=50, height=60, frames=1, sampled=1)
        )
    )


def test_cover_sizes_the_window_so_the_face_is_face_fraction_of_the_picture_without_upscaling():
    from latentsync.media.framing import cover_width, largest_face_px, largest_window

    # the phone video: 1080x1920, face 190 px, on 512x512: a 632 px window, the face 154 px on air
    phone = FaceBox(cx=540, cy=600, width=190, height=220, frames=20, sampled=20)
    x, y, w, h = cover_window((1080, 1920), (512, 512), phone, 0.3)
    assert (w, h) == (632, 632) and 190 * 512 / w == pytest.approx(0.3 * 512, rel=0.01)
    assert x == 540 - 316 and abs(y - (600 - 632 / 3)) <= 2  # centred; the face centre on the upper third line
    assert cover_width((1080, 1920), (512, 512), 190, 0.3) == 632
    # the largest window (the rule before) made it 90 px
    assert 190 * 512 / cover_width((1080, 1920), (512, 512), 190, None) == pytest.approx(90.1, abs=0.1)
    # a small face: never upscaled (the window is at least the channel's 512 source pixels)
    assert cover_width((1080, 1920), (512, 512), 80, 0.3) == 512
    assert largest_face_px((1080, 1920), (512, 512), 80) == 80
    # a source smaller than the channel must be enlarged anyway: its largest window
    assert cover_width((256, 456), (512, 512), 57.6, 0.3) == 256
    assert largest_face_px((256, 456), (512, 512), 57.6) == pytest.approx(115.2)
    # a landscape source on a portrait channel: face_fraction of the width, or min_face_px where the
    # source allows it (narrower, never below the channel's width)
    assert cover_width((1920, 1080), (288, 512), 120, 0.3) == 400
    assert cover_width((1920, 1080), (288, 512), 120, 0.3, min_face_px=96) == 360
    assert cover_width((1920, 1080), (288, 512), 60, 0.3, min_face_px=96) == 288  # 60 px: the most it gives
    # a landscape channel: the window is at least WINDOW_HEIGHT_FACES face widths high (head and shoulders)
    w = cover_width((3840, 2160), (1280, 720), 300, 0.3)
    assert w == 1600 and w * 720 / 1280 == 3 * 300
    # sizes and aspect ratio
    for source, target, width in (((1920, 1080), (720, 1280), 150), ((1081, 1921), (511, 513), 70)):
        x, y, w, h = cover_window(source, target, FaceBox(cx=500, cy=400, width=width, height=width * 1.2,
                                                          frames=1, sampled=1))  # fmt: skip
        assert w / h == pytest.approx(target[0] / target[1], rel=0.01) and w >= min(
            target[0], largest_window(source, target)[0]
        )
        assert 0 <= x <= source[0] - w and 0 <= y <= source[1] - h and w % 2 == h % 2 == x % 2 == y % 2 == 0


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


@pytest.mark.slow  # face tracking over the portrait video: ~4 s
def test_a_portrait_presenter_on_a_square_channel_keeps_the_face_proportions():
    """The issue's measure: face width/height on air vs in the source, within 3 % (cover, contain).

    And cover's window is sized on the face: its width on air within 15 % of ``face_fraction`` x 512,
    with no upscaling (the window at least 512 source pixels).
    """
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
            assert framing.fit is Fit.cover and framing.face is not None
            w, h = framing.crop[2:]
            assert w == h and 512 <= w < 832, framing.crop  # smaller than the largest window, never upscaled
            on_air = x1 - x0
            print(f"portrait presenter on 512x512: window {w}x{h}, face {on_air:.1f} px on air "
                  f"(target {FACE_FRACTION * 512:.1f})")  # fmt: skip
            assert on_air == pytest.approx(FACE_FRACTION * 512, rel=0.15), (on_air, framing.crop)
    assert got["cover"] == pytest.approx(1.0, abs=0.03) and got["contain"] == pytest.approx(1.0, abs=0.03), got
    # what every channel showed before (the pixels are 1.5x too wide; the face mesh, a 3D model, less so)
    assert got["stretch"] > 1.25, got


def test_plan_framing_skips_the_face_search_when_nothing_is_cropped():
    video = media_file(PORTRAIT)
    # the same aspect at the video's own size: no smaller window without upscaling, nothing searched
    assert plan_framing(video, (832, 1248), (832, 1248), "cover") == Framing(fit=Fit.stretch, size=(832, 1248))
    assert plan_framing(video, (832, 1248), (416, 624), "cover", face_fraction=None).face is None  # the old rule
    assert plan_framing(video, (832, 1248), (512, 512), "contain").face is None
    assert plan_framing(video, (832, 1248), (512, 512), "stretch").crop is None
    # the same aspect, smaller: cover frames the presenter (head and shoulders) in a smaller window
    framing = plan_framing(video, (832, 1248), (416, 624), "cover")
    assert framing.fit is Fit.cover and 416 <= framing.crop[2] < 832 and framing.face is not None


def test_tiny_and_faceless_videos_are_framed_or_refused_clearly(tmp_path):
    from latentsync.media.probe import MediaProbeError

    tiny = tmp_path / "tiny.mp4"
    bars = tmp_path / "bars.mp4"
    for path, source in ((tiny, "color=c=gray:s=14x10:r=25:d=1"), (bars, "testsrc2=s=640x360:r=25:d=1")):
        subprocess.run(
            [FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", source, "-pix_fmt", "yuv444p",
             "-c:v", "libx264", "-preset", "ultrafast", "-y", str(path)],
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


@pytest.mark.slow  # a clip made and prepared: ~5 s
def test_a_face_that_leaves_the_frame_is_framed_where_it_mostly_is_and_never_pasted_where_it_is_gone(tmp_path):
    """The presenter slides out of the picture after 1.2 s (0.8 s of the 2 s clip without her)."""
    from latentsync.avatar import EDGE_GAP_FRAMES, Avatar

    video = tmp_path / "leaves.mp4"
    subprocess.run(
        [
            FFMPEG, "-v", "error", "-i", str(media_file(PORTRAIT)),
            "-filter_complex",
            "color=c=0x204060:s=832x1248:r=25[bg];[bg][0:v]overlay=x='max(0,(t-1.2)*2600)':shortest=1",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-an", str(video),
        ],
        check=True,
    )  # fmt: skip
    avatar = Avatar.prepare(video, AvatarSettings(fps=25, size=(512, 512)), tmp_path / "cache")
    assert avatar.frame_size == (512, 512)
    n = avatar.num_frames
    found = np.asarray(avatar.found)
    assert found[:28].all() and not found[40:].any(), found.astype(int).tolist()
    # The cover window sits on the face where it mostly was (near the top of the portrait), from the
    # frames that show it: one window for the clip (the picture never pans), sized on the face
    # (face_fraction of 512), never upscaled, not the centre of the picture.
    framing = avatar.meta["framing"]
    x, y, w, h = framing["crop"]
    face = framing["face"]
    assert framing["fit"] == "cover" and w == h and 512 <= w < 832 and y < (1248 - w) // 2, framing
    assert 150 < face["width"] < 220 and x <= face["cx"] - face["width"] / 2 and face["cx"] + face["width"] / 2 <= x + w
    # Once she has left, no face is pasted in (a generated face there would be drawn on the empty
    # background): only the EDGE_GAP_FRAMES after the last frame with her take her last position.
    last = int(np.flatnonzero(found)[-1])
    pasteable = np.asarray(avatar.pasteable)
    assert pasteable[: last + EDGE_GAP_FRAMES + 1].all() and not pasteable[last + EDGE_GAP_FRAMES + 1 :].any()
    gone = [i for i in range(n) if not pasteable[i]]
    frame = np.array(avatar.frames[gone[-1]])
    assert np.array_equal(avatar.paste(gone[-1], np.full((256, 256, 3), 255, np.uint8), frame.copy()), frame)


@pytest.fixture(scope="module")
def landscape_presenters(tmp_path_factory) -> dict:
    """The portrait presenter on a 1920x1248 landscape canvas: walking right 200 px in 2 s; cut at the left edge."""
    folder = tmp_path_factory.mktemp("landscape")
    clips = {"moving": folder / "moving.mp4", "edge": folder / "edge.mp4"}
    graphs = {
        "moving": "color=c=0x204060:s=1920x1248:r=25[bg];[bg][0:v]overlay=x='200+t*100':shortest=1",
        "edge": "[0:v]crop=532:1248:300:0,pad=1920:1248:0:0:color=0x204060",  # the face's centre 118 px from the edge
    }
    for name, path in clips.items():
        subprocess.run(
            [FFMPEG, "-v", "error", "-i", str(media_file(PORTRAIT)), "-filter_complex", graphs[name],
             "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-an", "-y", str(path)],
            check=True,
            timeout=120,
        )  # fmt: skip
    return clips


@pytest.mark.parametrize(("size", "min_face_px"), [((512, 512), 0), ((288, 512), 96)])
def test_a_landscape_presenter_is_framed_head_and_shoulders_in_one_still_window(
    landscape_presenters, size, min_face_px
):
    """Square and portrait channels: the face at face_fraction (or min_face_px) of the width, the window still."""
    clip = load_clip(
        landscape_presenters["moving"], 25, 16000, size, with_audio=False, fit="cover", min_face_px=min_face_px
    )
    framing = clip.framing
    assert framing.fit is Fit.cover and framing.face is not None
    x, y, w, h = framing.crop
    assert w >= size[0] and w / h == pytest.approx(size[0] / size[1], rel=0.01) and x + w <= 1920 and y + h <= 1248
    target = max(FACE_FRACTION * size[0], min_face_px) if min_face_px else FACE_FRACTION * size[0]
    with FaceTracker() as tracker:
        boxes = [det.box if (det := tracker.detect(f)) is not None else None for f in clip.frames]
    assert all(b is not None for b in boxes), "the face stays in the one window while it moves"
    widths = [b[2] - b[0] for b in boxes]
    centres = [(b[0] + b[2]) / 2 for b in boxes]
    print(f"landscape presenter on {size[0]}x{size[1]}: window {w}x{h}, face {np.median(widths):.1f} px "
          f"(target {target:.1f}), moves {centres[-1] - centres[0]:.0f} px on air")  # fmt: skip
    assert np.median(widths) == pytest.approx(target, rel=0.15)
    # she walks 200 source pixels to the right; the window holds still, so she moves on air
    assert centres[-1] - centres[0] == pytest.approx(200 * size[0] / w, rel=0.25)


def test_a_face_near_the_pictures_edge_keeps_the_window_inside_the_picture(landscape_presenters):
    clip = load_clip(landscape_presenters["edge"], 25, 16000, (512, 512), with_audio=False, fit="cover")
    x, y, w, h = clip.framing.crop
    assert x == 0 and 512 <= w < 1248 and y + h <= 1248  # clamped at the edge: the face off-centre
    x0, _, x1, _ = face_box(clip.frames[::10])
    assert (x0 + x1) / 2 < 0.35 * 512 and (x1 - x0) == pytest.approx(FACE_FRACTION * 512, rel=0.15)
