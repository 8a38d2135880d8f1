"""build_ffmpeg_command: the argv FFmpeg gets, fed settings in, checked out in order (no process started)."""

from __future__ import annotations

import os
from pathlib import Path

from latentsync.config import StreamConfig
from latentsync.serving.egress.rtmp import SinkSettings, build_ffmpeg_command, prune_recordings

URL = "rtmp://127.0.0.1:1935/live/s3cr3t"


def settings(**overrides) -> SinkSettings:
    values = dict(
        rtmp_url=URL,
        fps=25,
        audio_sample_rate=48000,
        audio_channels=2,
        video_bitrate_kbps=1800,
        audio_bitrate_kbps=96,
        x264_preset="veryfast",
        keyframe_interval_s=2.0,
    )
    values.update(overrides)
    return SinkSettings(StreamConfig(**values), width=640, height=360)


def test_settings_read_the_stream_section():
    s = SinkSettings(StreamConfig(fps=30, sink_queue_s=0.5, restart_backoff_min_s=0.25), width=2, height=2)
    assert (s.fps, s.queue_frames, s.backoff_min_s, s.sample_rate_hz) == (30, 15, 0.25, 48000)
    assert SinkSettings(StreamConfig(fps=1, sink_queue_s=0.1), 2, 2).queue_frames == 2  # never under 2


def option(cmd: list[str], flag: str, occurrence: int = 0) -> str:
    positions = [i for i, arg in enumerate(cmd) if arg == flag]
    return cmd[positions[occurrence] + 1]


def test_raw_inputs_encoders_and_rtmp_output():
    cmd = build_ffmpeg_command(settings(), Path("/t/v.fifo"), Path("/t/a.fifo"), 0)
    assert option(cmd, "-i", 0) == "/t/v.fifo" and option(cmd, "-i", 1) == "/t/a.fifo"
    assert cmd.index("/t/v.fifo") < cmd.index("/t/a.fifo")  # video is input 0, audio input 1
    assert option(cmd, "-f", 0) == "rawvideo" and option(cmd, "-pix_fmt", 0) == "yuv420p"
    assert option(cmd, "-video_size") == "640x360" and option(cmd, "-framerate") == "25"
    assert option(cmd, "-f", 1) == "s16le" and option(cmd, "-sample_rate") == "48000"
    assert [option(cmd, "-map", 0), option(cmd, "-map", 1)] == ["0:v:0", "1:a:0"]
    assert option(cmd, "-c:v") == "libx264" and option(cmd, "-tune") == "zerolatency"
    assert option(cmd, "-g") == option(cmd, "-keyint_min") == "50"  # 2 s at 25 fps
    assert option(cmd, "-b:v") == option(cmd, "-maxrate") == "1800k" and option(cmd, "-bufsize") == "3600k"
    assert option(cmd, "-c:a") == "aac" and option(cmd, "-b:a") == "96k" and option(cmd, "-ac") == "2"
    assert option(cmd, "-aac_coder") == "fast"
    assert cmd[-3:] == ["-f", "flv", URL]


def test_auto_preset_follows_bits_per_pixel_and_an_explicit_preset_is_kept():
    def preset(width: int, height: int, **overrides) -> str:
        s = SinkSettings(StreamConfig(rtmp_url=URL, **overrides), width=width, height=height)
        return option(build_ffmpeg_command(s, Path("v"), Path("a"), 0), "-preset")

    assert StreamConfig().x264_preset == "auto"
    assert preset(512, 512) == "ultrafast"  # 2500 kbit/s / (512 x 512 x 25) = 0.38 bits per pixel
    assert preset(832, 1248) == "superfast"  # 0.096
    assert preset(512, 512, video_bitrate_kbps=1500) == "superfast"  # 0.23
    assert preset(512, 512, video_bitrate_kbps=2200) == "ultrafast"  # 0.336
    assert preset(512, 512, fps=30, video_bitrate_kbps=2200) == "superfast"  # 0.280: the frame rate counts
    assert preset(512, 512, x264_preset="veryfast") == "veryfast"
    assert preset(832, 1248, x264_preset="ultrafast") == "ultrafast"
    auto = build_ffmpeg_command(settings(x264_preset="auto"), Path("v"), Path("a"), 0)
    assert option(auto, "-threads") == "1"  # one x264 thread for the fast presets
    assert "-threads" not in build_ffmpeg_command(settings(), Path("v"), Path("a"), 0)  # an explicit preset: x264's own


def test_gop_rounds_and_never_falls_below_one_frame():
    assert (
        option(build_ffmpeg_command(settings(fps=30, keyframe_interval_s=0.5), Path("v"), Path("a"), 0), "-g") == "15"
    )
    assert option(build_ffmpeg_command(settings(fps=1, keyframe_interval_s=0.1), Path("v"), Path("a"), 0), "-g") == "1"


def test_recording_goes_through_tee_in_segments_of_record_max_mb_and_old_ones_are_deleted(tmp_path):
    first = build_ffmpeg_command(
        settings(record_dir="out", record_path="live.mkv", record_max_mb=10), Path("v"), Path("a"), 0
    )
    again = build_ffmpeg_command(settings(record_dir="out", record_path="live.mkv"), Path("v"), Path("a"), 2)
    assert first[-4:-1] == ["+global_header", "-f", "tee"]
    # 10 MiB at 1800 + 96 kbit/s: 44 s per file
    segment = "f=segment:segment_time=44:reset_timestamps=1:onfail=ignore"
    assert first[-1] == f"[f=flv:flvflags=no_duration_filesize:onfail=abort]{URL}|[{segment}]out/live-000-%04d.mkv"
    assert again[-1].endswith("]out/live-002-%04d.mkv")
    for i in range(5):
        (tmp_path / f"live-000-{i:04d}.mkv").write_bytes(b"x")
        os.utime(tmp_path / f"live-000-{i:04d}.mkv", (1000 + i, 1000 + i))
    (tmp_path / "other.mkv").write_bytes(b"x")
    gone = prune_recordings(tmp_path / "live.mkv", keep=2)
    assert sorted(p.name for p in gone) == [f"live-000-{i:04d}.mkv" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live-000-0003.mkv", "live-000-0004.mkv", "other.mkv"]
