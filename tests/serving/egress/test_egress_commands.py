"""The argv of the encoder and of each output's relay: settings in, checked out in order (no process started)."""

from __future__ import annotations

import os
from pathlib import Path

from latentsync.config import EgressConfig, StreamConfig, channel_outputs, load_config
from latentsync.serving.egress.encoder import EncoderSettings, Encoding, build_encoder_command
from latentsync.serving.egress.outputs import OutputSettings, build_relay_command, output_path, prune_recordings
from latentsync.serving.egress.sink import encoding_for

URL = "rtmp://127.0.0.1:1935/live/s3cr3t"


def settings(encoding: Encoding | None = None, **overrides) -> EncoderSettings:
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
    return EncoderSettings(StreamConfig(**values), width=640, height=360, encoding=encoding)


def test_settings_read_the_stream_section_and_the_encoding():
    s = EncoderSettings(StreamConfig(fps=30, sink_queue_s=0.5, restart_backoff_min_s=0.25), width=2, height=2)
    assert (s.fps, s.queue_frames, s.backoff_min_s, s.sample_rate_hz) == (30, 15, 0.25, 48000)
    assert EncoderSettings(StreamConfig(fps=1, sink_queue_s=0.1), 2, 2).queue_frames == 2  # never under 2
    assert s.video_bitrate_kbps == 2500 and not s.baseline
    own = EncoderSettings(StreamConfig(), 2, 2, Encoding(800, baseline=True))
    assert own.video_bitrate_kbps == 800 and own.baseline and Encoding(800, True).label == "800k-baseline"


def option(cmd: list[str], flag: str, occurrence: int = 0) -> str:
    positions = [i for i, arg in enumerate(cmd) if arg == flag]
    return cmd[positions[occurrence] + 1]


def test_raw_inputs_encoders_and_flv_on_stdout():
    cmd = build_encoder_command(settings(), Path("/t/v.fifo"), Path("/t/a.fifo"))
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
    assert cmd[-3:] == ["-f", "flv", "pipe:1"]  # no destination: the outputs' relays send it
    assert not any(URL in arg for arg in cmd) and "-profile:v" not in cmd
    own = build_encoder_command(settings(Encoding(700, baseline=True)), Path("v"), Path("a"))
    assert option(own, "-b:v") == "700k" and option(own, "-profile:v") == "baseline"


def test_auto_preset_follows_bits_per_pixel_and_an_explicit_preset_is_kept():
    def preset(width: int, height: int, **overrides) -> str:
        s = EncoderSettings(StreamConfig(rtmp_url=URL, **overrides), width=width, height=height)
        return option(build_encoder_command(s, Path("v"), Path("a")), "-preset")

    assert StreamConfig().x264_preset == "auto"
    assert preset(512, 512) == "ultrafast"  # 2500 kbit/s / (512 x 512 x 25) = 0.38 bits per pixel
    assert preset(832, 1248) == "superfast"  # 0.096
    assert preset(512, 512, video_bitrate_kbps=1500) == "superfast"  # 0.23
    assert preset(512, 512, video_bitrate_kbps=2200) == "ultrafast"  # 0.336
    assert preset(512, 512, fps=30, video_bitrate_kbps=2200) == "superfast"  # 0.280: the frame rate counts
    assert preset(512, 512, x264_preset="veryfast") == "veryfast"
    assert preset(832, 1248, x264_preset="ultrafast") == "ultrafast"
    auto = build_encoder_command(settings(x264_preset="auto"), Path("v"), Path("a"))
    assert option(auto, "-threads") == "1"  # one x264 thread for the fast presets
    assert "-threads" not in build_encoder_command(settings(), Path("v"), Path("a"))  # an explicit preset: x264's own


def test_gop_rounds_and_never_falls_below_one_frame():
    assert option(build_encoder_command(settings(fps=30, keyframe_interval_s=0.5), Path("v"), Path("a")), "-g") == "15"
    assert option(build_encoder_command(settings(fps=1, keyframe_interval_s=0.1), Path("v"), Path("a")), "-g") == "1"


def test_outputs_share_an_encoding_unless_their_bitrate_or_profile_differs():
    cfg = load_config(
        None,
        [
            "stream.outputs=[{url: 'rtmp://a/live/k'}, {url: 'srt://a:9000'}, {url: 'https://a/whip'},"
            " {url: 'rtmp://b/live/k', video_bitrate_kbps: 800}]"
        ],
    )
    rtmp, srt, whip, low = channel_outputs(cfg)
    # 512x512 at 2500 kbit/s: ultrafast, which is Baseline already, so WHIP shares the one encoder
    assert {encoding_for(t, cfg.stream, 512, 512) for t in (rtmp, srt, whip)} == {Encoding(2500, True)}
    # 832x1248: superfast (CABAC): WHIP needs an encoding of its own
    assert (
        encoding_for(rtmp, cfg.stream, 832, 1248) == encoding_for(srt, cfg.stream, 832, 1248) == Encoding(2500, False)
    )
    assert encoding_for(whip, cfg.stream, 832, 1248) == Encoding(2500, True)
    assert encoding_for(low, cfg.stream, 512, 512) == Encoding(800, False)  # 0.12 bits per pixel: superfast


def relay(url: str, run_index: int = 0, **config) -> list[str]:
    stream = StreamConfig(record_dir="/rec", video_bitrate_kbps=1800, audio_bitrate_kbps=96, record_max_mb=10)
    cfg = load_config(None, ["egress.hls_root=/hls"])
    target = channel_outputs(
        load_config(None, ["egress.hls_root=/hls", "stream.record_dir=/rec", f"stream.outputs=[{{url: '{url}'}}]"])
    )[0]
    s = OutputSettings(EgressConfig(**{**vars(cfg.egress), **config}), stream)
    return build_relay_command(target, s, run_index)


def test_every_relay_copies_the_encoders_flv_from_stdin_and_reports_progress():
    for url in ("rtmp://h/live/k", "srt://h:9000", "https://h/whip", "hls:main", "record:live.mkv"):
        cmd = relay(url)
        assert option(cmd, "-i") == "pipe:0" and option(cmd, "-f", 0) == "flv" and option(cmd, "-c") == "copy"
        assert option(cmd, "-progress") == "pipe:1" and option(cmd, "-analyzeduration") == "100000"
        assert "-nostdin" in cmd


def test_relay_per_kind():
    rtmp = relay("rtmp://h/live/k", send_buffer_kb=32)
    assert rtmp[-7:] == [
        "-flvflags",
        "no_duration_filesize",
        "-send_buffer_size",
        "32768",
        "-f",
        "flv",
        "rtmp://h/live/k",
    ]
    assert relay("srt://h:9000?latency=200000")[-3:] == ["-f", "mpegts", "srt://h:9000?latency=200000"]
    whip = relay("https://h/whip")
    assert (
        option(whip, "-c:a") == "libopus"
        and option(whip, "-ar") == "48000"
        and whip[-3:] == ["-f", "whip", "https://h/whip"]
    )
    hls = relay("hls:main", hls_segment_s=4.0, hls_list_size=3)
    assert hls[-1] == "/hls/main/index.m3u8" and option(hls, "-hls_segment_filename") == "/hls/main/segment-%06d.ts"
    assert option(hls, "-hls_time") == "4.0" and option(hls, "-hls_list_size") == "3" and option(hls, "-f", 1) == "hls"
    assert "append_list" in option(hls, "-hls_flags") and "delete_segments" in option(hls, "-hls_flags")
    # a recording: segments of record_max_mb (10 MiB at the output's 2500 + 96 kbit/s: 32 s), named by relay run
    record = relay("record:live.mkv", 2)
    assert option(record, "-f", 1) == "segment" and option(record, "-segment_time") == "32"
    assert record[-1] == "/rec/live-002-%04d.mkv"


def test_whip_token_goes_to_the_muxer_option():
    cfg = load_config(None, ["stream.outputs=[{url: 'https://h/whip', bearer_token: tok-123456}]"])
    cmd = build_relay_command(channel_outputs(cfg)[0], OutputSettings(cfg.egress, cfg.stream), 0)
    assert option(cmd, "-authorization") == "tok-123456"


def test_output_paths_stay_under_their_roots():
    cfg = load_config(None, ["egress.hls_root=/hls", "stream.record_dir=/rec"])
    s = OutputSettings(cfg.egress, cfg.stream)
    hls, rec, net = channel_outputs(
        load_config(
            None,
            [
                "egress.hls_root=/hls",
                "stream.record_dir=/rec",
                "stream.outputs=[{url: 'hls:a.b'}, {url: 'record:x.mp4'}, {url: 'srt://h:1'}]",
            ],
        )
    )
    assert output_path(hls, s) == Path("/hls/a.b/index.m3u8") and output_path(rec, s) == Path("/rec/x.mp4")
    assert output_path(net, s) is None


def test_old_recording_files_are_deleted(tmp_path):
    for i in range(5):
        (tmp_path / f"live-000-{i:04d}.mkv").write_bytes(b"x")
        os.utime(tmp_path / f"live-000-{i:04d}.mkv", (1000 + i, 1000 + i))
    (tmp_path / "other.mkv").write_bytes(b"x")
    gone = prune_recordings(tmp_path / "live.mkv", keep=2)
    assert sorted(p.name for p in gone) == [f"live-000-{i:04d}.mkv" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live-000-0003.mkv", "live-000-0004.mkv", "other.mkv"]


def test_a_local_publish_refused_for_lack_of_the_secret_gets_a_hint():
    from latentsync.serving.egress.outputs import local_publish_hint

    refused = ["[out#0/flv @ 0x55] Error opening output rtmp://127.0.0.1:1935/live/***: Input/output error"]
    for url in ("rtmp://127.0.0.1:1935/live/hall", "rtmp://localhost/live/x", "rtmp://[::1]:1936/live/x"):
        hint = local_publish_hint(url, refused)
        assert hint is not None and "?secret=" in hint and "publish-url" in hint, url
    assert local_publish_hint("rtmp://127.0.0.1:1935/live/hall?secret=abc", refused) is None
    assert local_publish_hint("rtmp://live.example.com/app/key", refused) is None  # not ours to guess
    assert local_publish_hint("rtmps://127.0.0.1/live/x", refused) is None
    assert local_publish_hint("rtmp://127.0.0.1:1935/live/hall", ["Conversion failed!"]) is None
