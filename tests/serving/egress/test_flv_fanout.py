"""FLV cutting, the GOP cache, timestamp rebasing and the fan-out, on a real FFmpeg FLV stream."""

from __future__ import annotations

import random
import subprocess

import imageio_ffmpeg
import pytest

from latentsync.serving.egress.fanout import Fanout
from latentsync.serving.egress.flv import AUDIO, SCRIPT, VIDEO, FlvError, FlvReader, FlvTag, GopCache, rebased

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


@pytest.fixture(scope="module")
def flv_bytes() -> bytes:
    """3 s of 64x64 H.264 (a keyframe every second) + AAC, as the encoder writes it: FLV on a pipe."""
    cmd = [
        FFMPEG,
        "-hide_banner",
        "-loglevel",
        "error",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=s=64x64:r=25:d=3",
        "-f",
        "lavfi",
        "-i",
        "sine=r=48000:d=3",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-g",
        "25",
        "-c:a",
        "aac",
        "-flvflags",
        "no_duration_filesize",
        "-f",
        "flv",
        "pipe:1",
    ]
    return subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout


def read_all(data: bytes, pieces: int = 0) -> tuple[FlvReader, list[FlvTag]]:
    reader, tags = FlvReader(), []
    cuts = sorted(random.Random(1).sample(range(1, len(data)), pieces)) if pieces else []
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        tags.extend(reader.feed(data[a:b]))
    return reader, tags


def test_tags_are_cut_the_same_whatever_the_pieces(flv_bytes):
    reader, whole = read_all(flv_bytes)
    _, pieces = read_all(flv_bytes, pieces=500)
    assert reader.header is not None and reader.header[:3] == b"FLV"
    assert [t.data for t in whole] == [t.data for t in pieces]
    assert sum(len(t.data) for t in whole) + 13 == len(flv_bytes)  # nothing lost, nothing added
    assert whole[0].kind == SCRIPT  # onMetaData first
    configs = [t for t in whole if t.sequence_header]
    assert {t.kind for t in configs} == {VIDEO, AUDIO} and len(configs) == 2
    frames = [t for t in whole if t.kind == VIDEO and t.data[12] == 1]  # pictures (AVC packet type 1)
    assert len(frames) == 75 and [i for i, t in enumerate(frames) if t.keyframe] == [0, 25, 50]
    video_ts = [t.timestamp_ms for t in frames]
    assert video_ts == sorted(video_ts) and video_ts[1] - video_ts[0] == 40


def test_a_broken_stream_is_refused():
    with pytest.raises(FlvError):
        list(FlvReader().feed(b"NOTFLV" + bytes(20)))
    reader = FlvReader()
    list(reader.feed(b"FLV\x01\x05\x00\x00\x00\x09" + bytes(4)))
    with pytest.raises(FlvError):  # a tag claiming 8 MiB + 1
        list(reader.feed(bytes([9]) + (8 * 2**20 + 1).to_bytes(3, "big") + bytes(7)))


def test_rebase_takes_the_base_off_and_never_wraps_backwards():
    tag = FlvTag(
        VIDEO,
        70_000,
        bytes([9, 0, 0, 1]) + (70_000 & 0xFFFFFF).to_bytes(3, "big") + bytes([0, 0, 0, 0]) + b"\x17" + bytes(4),
    )
    out = rebased(tag, 69_960)
    assert int.from_bytes(out[4:7], "big") | out[7] << 24 == 40 and out[8:] == tag.data[8:]
    assert int.from_bytes(rebased(tag, 70_020)[4:7], "big") == 0  # earlier than the base: 0, not 49 days
    wrapped = FlvTag(VIDEO, 5, tag.data)  # after the 32-bit wrap: still 45 ms after the base
    assert int.from_bytes(rebased(wrapped, 2**32 - 40)[4:7], "big") == 45


def test_gop_cache_starts_an_output_at_the_last_keyframe_with_both_configs(flv_bytes, tmp_path):
    reader, tags = read_all(flv_bytes)
    cache = GopCache(max_bytes=1 << 20)
    cache.header = reader.header
    assert not cache.ready
    cut = [i for i, t in enumerate(tags) if t.keyframe and not t.sequence_header][1] + 5  # inside the second GOP
    for tag in tags[:cut]:
        cache.add(tag)
    assert cache.ready
    start, base = cache.start_bytes()
    frames_before = [t for t in tags[:cut] if t.kind == VIDEO and not t.sequence_header]
    assert base == frames_before[25].timestamp_ms == frames_before[0].timestamp_ms + 1000  # the second keyframe
    # what an output gets: the start bytes, then the live tags rebased by the same base
    stream = start + b"".join(rebased(t, base) for t in tags[cut:])
    path = tmp_path / "joined.flv"
    path.write_bytes(stream)
    probe = subprocess.run(
        [FFMPEG, "-hide_banner", "-v", "error", "-i", str(path), "-f", "framemd5", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0 and not probe.stderr, probe.stderr  # decodes from its first byte
    video_lines = [line for line in probe.stdout.splitlines() if line.startswith("0,")]
    assert len(video_lines) == 50  # the second and third GOP, whole
    assert int(video_lines[0].split(",")[1]) == 0  # and it starts at 0


def test_a_gop_too_large_is_dropped_until_the_next_keyframe(flv_bytes):
    reader, tags = read_all(flv_bytes)
    cache = GopCache(max_bytes=100)
    cache.header = reader.header
    for tag in tags:
        cache.add(tag)
    assert not cache.ready  # no output would start with a GOP it cannot hold


class Recorder:
    def __init__(self):
        self.tags: list[FlvTag] = []
        self.restarts = 0

    def push(self, tag):
        self.tags.append(tag)

    def encoder_restarted(self):
        self.restarts += 1


def test_fanout_subscribers_miss_nothing_and_start_over_with_a_new_encoder_run(flv_bytes):
    reader, tags = read_all(flv_bytes)
    fanout = Fanout(1 << 20)
    early, late = Recorder(), Recorder()
    assert fanout.subscribe(early) is None  # no keyframe yet: nothing to start with
    fanout.set_header(reader.header)
    for tag in tags[:10]:
        fanout.publish(tag)
    assert fanout.subscribe(early) is not None
    for tag in tags[10:40]:
        fanout.publish(tag)
    start, base = fanout.subscribe(late)
    for tag in tags[40:]:
        fanout.publish(tag)
    assert [t.data for t in early.tags] == [t.data for t in tags[10:]]
    assert [t.data for t in late.tags] == [t.data for t in tags[40:]]
    fanout.unsubscribe(late)
    fanout.reset()
    assert (early.restarts, late.restarts, fanout.subscribers) == (1, 0, 0)
    assert fanout.subscribe(Recorder()) is None  # the new run has no header or keyframe yet
