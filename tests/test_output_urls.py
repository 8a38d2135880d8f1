"""Output URLs and a channel's outputs in the config: what is accepted, what is refused, what is shown."""

from __future__ import annotations

import pytest

from latentsync.config import (
    ChannelConfig,
    ConfigError,
    OutputConfig,
    channel_outputs,
    load_config,
    parse_outputs,
    to_yaml,
)
from latentsync.output_urls import OutputKind, OutputUrlError, parse_output_url, redact_output_url, url_secrets
from latentsync.serving.runtime.channel_rules import allowed_rtmp_hosts, api_channel, check_api_outputs


@pytest.mark.parametrize(
    ("url", "kind", "host", "port"),
    [
        ("rtmp://127.0.0.1/live/k", OutputKind.rtmp, "127.0.0.1", 1935),
        ("rtmps://live.example.com:443/app/key?x=1", OutputKind.rtmp, "live.example.com", 443),
        ("rtmp://[::1]:1936/live/k", OutputKind.rtmp, "::1", 1936),
        ("srt://127.0.0.1:9000?streamid=live/k&latency=200000&mode=caller", OutputKind.srt, "127.0.0.1", 9000),
        ("https://whip.example.com/v1/whip/endpoint", OutputKind.whip, "whip.example.com", 443),
        ("http://127.0.0.1:8889/whip", OutputKind.whip, "127.0.0.1", 8889),
        ("hls:main", OutputKind.hls, None, None),
        ("record:live.mp4", OutputKind.record, None, None),
    ],
)
def test_accepted(url, kind, host, port):
    parsed = parse_output_url(url)
    assert (parsed.kind, parsed.host, parsed.port) == (kind, host, port)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "file:///etc/passwd",  # an unknown scheme
        "udp://127.0.0.1:1234",
        "tee:[f=flv]rtmp://a/b",
        "rtmp://a/live/k|[f=null]/tmp/x",  # tee syntax
        "rtmp://a/live/k -f null",  # a second argument
        "rtmp://a/live/k\n",
        "https://a/whip\r\nX-Injected: 1",  # a header line
        "rtmp://a/live/%s",  # a pattern
        "srt://a:9000?mode=listener",  # a port on this host
        "srt://a:9000?passphrase=short",
        "srt://a:9000?streamid=k&streamid=k",
        "srt://a:9000?transtype=file",  # an option not allowed
        "srt://a",  # no port
        "http://user:pw@a/whip",  # credentials belong in the token
        "hls:../etc",
        "hls:.hidden",
        "hls:a/b",
        "record:../../x.mkv",
        "record:/tmp/x.mkv",
        "record:x.sh",  # not a container
        "rtmp://a:99999/live/k",
    ],
)
def test_refused(url):
    with pytest.raises(OutputUrlError):
        parse_output_url(url)


def test_shown_without_secrets():
    assert redact_output_url("rtmp://u:p@a:1935/live/KEY?secret=S") == "rtmp://a:1935/live/***"
    assert redact_output_url("srt://a:9000?streamid=KEY&passphrase=0123456789") == "srt://a:9000?***"
    assert redact_output_url("https://a/whip/KEY") == "https://a/***"
    assert redact_output_url("hls:main") == "hls:main" and redact_output_url("bogus") == "***"
    secrets = url_secrets("rtmp://a/live/KEY1?secret=SECRET")
    assert "KEY1" in secrets and "SECRET" in secrets and "live" not in secrets  # the app name is no secret
    assert "0123456789" in url_secrets("srt://a:9000?passphrase=0123456789") and url_secrets("hls:x") == ()


def test_defaults_names_required_and_the_shorthand():
    cfg = load_config(None, ["stream.rtmp_url=rtmp://h/live/k", "stream.record_dir=/tmp", "stream.record_path=a.mkv"])
    rtmp, record = channel_outputs(cfg)
    assert (rtmp.name, rtmp.required, rtmp.url.url) == ("rtmp", True, "rtmp://h/live/k")
    assert (record.name, record.required, record.kind) == ("record", False, OutputKind.record)
    many = load_config(
        None,
        [
            "stream.outputs=[{url: 'rtmp://a/live/1'}, {url: 'rtmp://b/live/2', required: false},"
            " {url: 'srt://c:9000', name: backup, video_bitrate_kbps: 900}]"
        ],
    )
    a, b, c = channel_outputs(many)
    assert [a.name, b.name, c.name] == ["rtmp", "rtmp-2", "backup"] and not b.required
    assert (a.video_bitrate_kbps, c.video_bitrate_kbps) == (2500, 900)
    assert a.public() == {
        "name": "rtmp",
        "kind": "rtmp",
        "url": "rtmp://a/live/***",
        "required": True,
        "video_bitrate_kbps": 2500,
    }


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        ("[{url: 'rtmp://a/live/1', name: x}, {url: 'rtmp://b/live/2', name: x}]", "name"),
        ("[{url: 'hls:main'}]", "egress.hls_root"),
        ("[{url: 'record:a.mkv'}]", "stream.record_dir"),
        ("[{url: 'rtmp://a/live/1', bearer_token: tok12345}]", "bearer_token"),
        ("[{url: 'rtmp://a/live/1', video_bitrate_kbps: 5}]", "video_bitrate_kbps"),
        ("[{url: 'rtmp://a/live/1', name: 'Bad Name'}]", "name"),
        ("[{url: 'ftp://a/x'}]", "scheme"),
    ],
)
def test_bad_outputs_name_the_field(outputs, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, [f"stream.outputs={outputs}"])


def test_max_outputs():
    urls = ", ".join(f"{{url: 'rtmp://a/live/{i}'}}" for i in range(17))
    with pytest.raises(ConfigError, match="egress.max_outputs"):
        load_config(None, [f"stream.outputs=[{urls}]"])
    assert len(channel_outputs(load_config(None, ["egress.max_outputs=17", f"stream.outputs=[{urls}]"]))) == 17


def test_channels_never_inherit_mains_outputs_nor_share_a_destination():
    cfg = load_config(
        None,
        [
            "stream.outputs=[{url: 'rtmp://a/live/main'}]",
            "channels=[{name: b, rtmp_url: 'rtmp://a/live/b'}, {name: c, outputs: [{url: 'srt://a:9000'}]}]",
        ],
    )
    from latentsync.config import channel_configs

    derived = channel_configs(cfg)
    assert [t.url.url for t in channel_outputs(derived["b"])] == ["rtmp://a/live/b"]
    assert [t.url.url for t in channel_outputs(derived["c"])] == ["srt://a:9000"]
    with pytest.raises(ConfigError, match="no other channel sends to"):
        load_config(
            None, ["stream.rtmp_url=rtmp://a/live/x", "channels=[{name: b, outputs: [{url: 'rtmp://a/live/x'}]}]"]
        )
    with pytest.raises(ConfigError, match="outputs"):
        load_config(None, ["channels=[{name: b}]"])


def test_the_api_may_send_only_to_allowed_hosts():
    cfg = load_config(None, ["stream.outputs=[{url: 'rtmp://127.0.0.1/live/a'}, {url: 'srt://10.0.0.5:9000'}]"])
    hosts = allowed_rtmp_hosts(cfg)
    assert hosts == {"127.0.0.1", "10.0.0.5"}
    check_api_outputs([OutputConfig(url="srt://10.0.0.5:9001"), OutputConfig(url="hls:x")], hosts)
    with pytest.raises(ConfigError, match="allowed_rtmp_hosts"):
        check_api_outputs([OutputConfig(url="https://evil.example/whip")], hosts)
    with pytest.raises(ConfigError, match="outputs\\[0\\].url"):
        api_channel(cfg, ChannelConfig(name="x", outputs=[OutputConfig(url="rtmp://a/b c")]), hosts)


def test_json_outputs_are_type_checked():
    assert parse_outputs([{"url": "hls:x", "required": False}])[0].required is False
    for bad in ("rtmp://a/b", [1], [{"url": "x", "colour": "red"}], [{"url": "x", "required": "maybe"}]):
        with pytest.raises(ConfigError, match="outputs"):
            parse_outputs(bad)


def test_printed_config_hides_keys_and_tokens():
    cfg = load_config(
        None,
        [
            "stream.outputs=[{url: 'rtmp://a/live/SECRETKEY'},"
            " {url: 'https://a/whip/PATHKEY', bearer_token: TOKEN123}]",
            "channels=[{name: b, outputs: [{url: 'srt://a:9000?passphrase=PASSPHRASE1'}]}]",
        ],
    )
    text = to_yaml(cfg)
    for secret in ("SECRETKEY", "PATHKEY", "TOKEN123", "PASSPHRASE1"):
        assert secret not in text
