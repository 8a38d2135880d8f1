from __future__ import annotations

import pytest

from latentsync.config import (
    ConfigError,
    EngineName,
    load_config,
    redact_rtmp_url,
    rtmp_host,
    to_yaml,
)
from latentsync.serving.runtime.channel_rules import api_media_path
from tests.streamtools import REPO


def test_defaults_match_the_documented_keys():
    c = load_config()
    assert (c.server.host, c.server.port) == ("127.0.0.1", 11001)
    assert c.stream.rtmp_url == "rtmp://127.0.0.1:1935/live/avatar"
    assert (c.stream.fps, c.stream.audio_sample_rate, c.stream.crossfade_frames) == (25, 48000, 5)
    assert c.stream.width is None and c.stream.height is None
    assert c.avatar.idle_video is None and c.avatar.video is None
    assert c.engine.name is EngineName.parametric and c.engine.workers is None


def test_yaml_file_then_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stream:\n  fps: 30\n  audio_sample_rate: 44100\nengine:\n  name: latentsync\n")
    c = load_config(cfg, ["stream.fps=24", "stream.width=640", "stream.height=360", "engine.workers=2"])
    assert (c.stream.fps, c.stream.audio_sample_rate, c.stream.width, c.stream.height) == (24, 44100, 640, 360)
    assert c.engine.name is EngineName.latentsync and c.engine.workers == 2


def test_shipped_server_yaml_loads_and_has_every_key():
    c = load_config(REPO / "configs" / "server.yaml")
    text = (REPO / "configs" / "server.yaml").read_text()
    for section in ("server", "stream", "media", "avatar", "engine", "api", "tasks", "egress", "log"):
        for key in getattr(c, section).__dataclass_fields__:
            assert f"  {key}:" in text, f"configs/server.yaml lacks {section}.{key}"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["stream.fsp=30"], "stream.fsp"),
        (["bogus.key=1"], "bogus"),
        (["stream.fps=abc"], "stream.fps"),
        (["stream.fps=0"], "stream.fps"),
        (["stream.audio_sample_rate=12345"], "stream.audio_sample_rate"),
        (["stream.width=641", "stream.height=360"], "stream.width"),
        (["stream.width=640"], "stream.width"),
        (["stream.crossfade_frames=-1"], "stream.crossfade_frames"),
        (["stream.clock_nice=5"], "stream.clock_nice"),  # only ever ahead of the rest, never behind
        (["stream.clock_nice=-21"], "stream.clock_nice"),
        (["stream.clock_rt_priority=100"], "stream.clock_rt_priority"),  # SCHED_FIFO priorities are 1..99
        (["stream.clock_rt_priority=-1"], "stream.clock_rt_priority"),
        (["stream.rtmp_url=http://x/y"], "stream.rtmp_url"),
        (["engine.name=wav2lip"], "engine.name"),
        (["engine.workers=0"], "engine.workers"),
        (["avatar.idle_video=/no/such/video.mp4"], "avatar.idle_video"),
        (["avatar.prepare_max_rss_mb=10"], "avatar.prepare_max_rss_mb"),
        (["avatar.face_fraction=0"], "avatar.face_fraction"),
        (["avatar.face_fraction=1.5"], "avatar.face_fraction"),
        (["server.port=70000"], "server.port"),
        (["server.header_timeout_s=0"], "server.header_timeout_s"),
        (["server.body_timeout_s=-1"], "server.body_timeout_s"),
        (["server.max_connections=0"], "server.max_connections"),
        (["server.max_connections=8", "server.max_connections_per_ip=9"], "server.max_connections_per_ip"),
        (["server.trusted_proxies=[nginx.local]"], "server.trusted_proxies"),
        (["engine.latentsync.guidance_scale=0.5"], "engine.latentsync.guidance_scale"),  # the engine needs >= 1
        (["engine.latentsync.guidance_scale=20.5"], "engine.latentsync.guidance_scale"),
        (["engine.latentsync.inference_steps=0"], "engine.latentsync.inference_steps"),
        (["tasks.generate_ahead=-1"], "tasks.generate_ahead"),
        (["fps"], "fps"),
    ],
)
def test_bad_keys_and_values_are_rejected_naming_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_stream_key_is_redacted():
    assert redact_rtmp_url("rtmp://user:pw@live.example:1935/app/s3cr3t") == "rtmp://live.example:1935/app/***"
    c = load_config(overrides=["stream.rtmp_url=rtmp://127.0.0.1/live/s3cr3t"])
    assert "s3cr3t" not in to_yaml(c)


def test_a_public_listen_address_needs_a_token_or_an_explicit_opt_out():
    with pytest.raises(ConfigError, match="server.host"):
        load_config(None, ["server.host=0.0.0.0"])
    assert load_config(None, ["server.host=0.0.0.0", "api.token=0123456789abcdef"]).server.host == "0.0.0.0"
    assert load_config(None, ["server.host=0.0.0.0", "server.allow_public_without_token=true"])
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert load_config(None, [f"server.host={host}"]).server.host == host
    with pytest.raises(ConfigError, match="api.allowed_origins"):
        load_config(None, ["api.allowed_origins=[https://studio.example.com/page]"])


def test_a_bad_value_stops_the_server_at_start_naming_the_key():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "infer_serv.py"), "engine.latentsync.guidance_scale=0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "engine.latentsync.guidance_scale: 0.5 is invalid, expected 1..20" in proc.stderr + proc.stdout


def test_one_guidance_range_for_config_engine_and_api():
    from latentsync.config import GUIDANCE_SCALE_RANGE, LatentSyncConfig, validate_latentsync

    low, high = GUIDANCE_SCALE_RANGE
    validate_latentsync(LatentSyncConfig(guidance_scale=low))
    validate_latentsync(LatentSyncConfig(guidance_scale=high))
    with pytest.raises(ConfigError, match="guidance_scale"):
        validate_latentsync(LatentSyncConfig(guidance_scale=low - 0.5))


def test_rtmp_urls_are_parsed_and_what_the_tee_muxer_reads_is_refused():
    assert rtmp_host("rtmp://127.0.0.1:1935/live/key?secret=abc") == "127.0.0.1"
    assert rtmp_host("rtmps://Live.Example.com/app/STREAM-KEY") == "live.example.com"
    assert rtmp_host("rtmp://user:pw@host.example/app") == "host.example"
    assert rtmp_host("rtmp://[::1]:1935/live/x") == "::1"
    for bad in (
        "rtmp://h/a|[f=mpegts]tcp://other:9000",  # a second tee output
        "rtmp://h/a[f=flv]",
        "rtmp://h/a\\b",
        "rtmp://h/a b",
        "rtmp://h/a\nb",
        "rtmp://h/a\x00",
        "tcp://h:9000",
        "file:/etc/passwd",
        "rtmp:///nohost",
        "",
    ):
        assert rtmp_host(bad) is None, bad


def test_api_channels_name_media_under_media_root_only(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"x")
    (root / "out.mp4").symlink_to("/etc/passwd")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    config = load_config(overrides=[f"media.root={root}"])
    assert api_media_path(config, "idle_video", "a.mp4") == str(root / "a.mp4")
    assert api_media_path(config, "idle_video", str(root / "a.mp4")) == str(root / "a.mp4")
    messages = set()
    for outside in ("/etc/shadow", "/etc/no-such-file", "../secret.mp4", str(tmp_path / "secret.mp4"), "out.mp4"):
        with pytest.raises(ConfigError) as err:
            api_media_path(config, "idle_video", outside)
        messages.add(str(err.value))
    assert messages == {"idle_video: must name a file under media.root"}  # never whether it exists
    with pytest.raises(ConfigError, match="media.root is not set"):
        api_media_path(load_config(), "video", "a.mp4")
    for hostile in ("a" * 5000, "a.mp4\x00.txt", "b" * 300, "\x00"):  # OSError / ValueError: a 500 before
        with pytest.raises(ConfigError, match="idle_video: ") as err:
            api_media_path(config, "idle_video", hostile)
        assert "aaaa" not in str(err.value) and "bbbb" not in str(err.value)  # no echo of the path


def test_api_max_json_kb_defaults_to_64_and_is_validated():
    assert load_config().api.max_json_kb == 64
    assert load_config(overrides=["api.max_json_kb=32"]).api.max_json_kb == 32
    for bad in ("0", "16385", "-1"):
        with pytest.raises(ConfigError, match="api.max_json_kb"):
            load_config(overrides=[f"api.max_json_kb={bad}"])
    # /speak's text_too_long stays reachable: the cap holds the longest text allowed
    with pytest.raises(ConfigError, match="api.max_json_kb.*speech_stream.max_text_chars = 100000"):
        load_config(overrides=["speech_stream.max_text_chars=100000"])
    assert load_config(overrides=["speech_stream.max_text_chars=100000", "api.max_json_kb=392"]).api.max_json_kb == 392


def test_channels_never_record_to_one_file(tmp_path):
    """A channel without its own record_path records to ``<name>-<record_path>``; two on one file are refused."""
    from latentsync.config import channel_configs, channel_outputs

    base = [f"stream.record_dir={tmp_path}", "stream.record_path=show.mkv"]
    config = load_config(None, [*base, 'channels=[{name: hall, rtmp_url: "rtmp://h/live/hall"}]'])
    records = {
        name: [t.url.url for t in channel_outputs(c) if t.kind.value == "record"]
        for name, c in channel_configs(config).items()
    }
    assert records == {"main": ["record:show.mkv"], "hall": ["record:hall-show.mkv"]}
    own = load_config(None, [*base, 'channels=[{name: hall, rtmp_url: "rtmp://h/live/hall", record_path: h.mkv}]'])
    assert channel_configs(own)["hall"].stream.record_path == "h.mkv"
    clashes = [
        '[{name: hall, rtmp_url: "rtmp://h/live/hall", record_path: show.mkv}]',  # main's file
        '[{name: a, rtmp_url: "rtmp://h/live/a", record_path: x.mkv}, {name: b, rtmp_url: "rtmp://h/live/b", '
        "record_path: x.mkv}]",
        '[{name: a, outputs: [{url: "rtmp://h/live/a"}, {url: "record:show-a.mkv"}]}]',  # main prunes show-*.mkv
        '[{name: a, rtmp_url: "rtmp://h/live/a", record_path: b-show.mkv}, {name: b, rtmp_url: "rtmp://h/live/b"}]',
    ]
    for channels in clashes:
        with pytest.raises(ConfigError, match=r"channels\[\d\] \(\w+\): record:.* would write the files of channel"):
            load_config(None, [*base, f"channels={channels}"])
    load_config(None, [*base, 'channels=[{name: a, rtmp_url: "rtmp://h/live/a", record_path: show.mp4}]'])


def test_print_config_hides_every_channels_stream_keys_and_secrets():
    """``--print-config`` (:func:`to_yaml`): no stream key, passphrase or token of ``main`` or of any channel."""
    secrets = ["MAINKEY1", "MAINAUTH1", "HALLKEY1", "HALLPW1", "OUTKEY1", "OUTKEY2", "SRTPASSPHRASE1", "WHIPTOKEN1"]
    c = load_config(
        None,
        [
            "stream.rtmp_url=rtmp://h/live?auth=MAINAUTH1/MAINKEY1",
            "channels=[{name: hall, rtmp_url: 'rtmp://u:HALLPW1@h/live/HALLKEY1/'},"
            " {name: b, outputs: [{url: 'rtmp://h/live/OUTKEY1?a=b/c'}, {url: 'rtmp://h/live/OUTKEY2#x/y'},"
            " {url: 'srt://h:9000?passphrase=SRTPASSPHRASE1'}, {url: 'https://h/whip', bearer_token: WHIPTOKEN1}]}]",
        ],
    )
    text = to_yaml(c)
    assert [s for s in secrets if s in text] == []
    assert "rtmp_url: rtmp://h/live/***" in text and "url: srt://h:9000?***" in text and "'***'" in text
    assert redact_rtmp_url("rtmp://h/live/KEY1/") == "rtmp://h/live/***"
