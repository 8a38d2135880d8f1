"""Checks of the values that the types alone do not express: ranges, even sizes, AAC rates, names.

:func:`validate` checks a whole configuration, one part after another in a fixed order, and
raises the first value out of range; every message names the key (``stream.fps: 0 is invalid,
expected 1..120``). The order matters where one value is checked through another: the outputs
(built from ``stream.rtmp_url``, ``stream.record_path`` and ``stream.video_bitrate_kbps``) are
checked after the first and before the second.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from latentsync.config.app import AppConfig
from latentsync.config.avatar import AVATAR_ID_RE, uploaded_avatar_video
from latentsync.config.channels import CHANNEL_NAME_RE, DEFAULT_CHANNEL
from latentsync.config.derived import channel_configs, channel_outputs, check_local_outputs
from latentsync.config.engine import (
    CHUNK_FRAMES_RANGE,
    DEFAULT_CHUNK_FRAMES_RANGE,
    GUIDANCE_SCALE_RANGE,
    INFERENCE_STEPS_RANGE,
    LATENTSYNC_VERSIONS,
    DType,
    LatentSyncConfig,
)
from latentsync.config.errors import ConfigError, check_value
from latentsync.config.speech import TTS_RATE_RANGE_WPM
from latentsync.config.stream import AAC_SAMPLE_RATES_HZ
from latentsync.config.urls import HOST_RE, ORIGIN_RE, is_loopback_host
from latentsync.config.webrtc import candidate_network
from latentsync.output_urls import RECORD_NAME_RE, RTMP_URL_WANT, rtmp_host


def validate(config: AppConfig) -> None:
    """Check value ranges that the types alone do not express.

    Args:
        config: The configuration to check.

    Raises:
        ConfigError: Naming the first key whose value is out of range.
    """
    _validate_server(config)
    _validate_stream(config)
    _validate_egress(config)
    _validate_media(config)
    _validate_stream_encoding(config)
    _validate_avatar(config)
    _validate_engine(config)
    _validate_pool(config)
    _validate_api(config)
    _validate_tasks(config)
    _validate_speech_stream(config)
    _validate_webrtc(config)
    _validate_frames(config)
    _validate_ui(config)
    _validate_log(config)
    _validate_channels(config)


def _validate_server(config: AppConfig) -> None:
    """``server``: the listener and who may reach it (hosts, the token a public one needs, web origins)."""
    check_value(1 <= config.server.port <= 65535, "server.port", config.server.port, "1..65535")
    check_value(
        0 <= config.server.native_threads <= 64,
        "server.native_threads",
        config.server.native_threads,
        "0..64 (0: the libraries' defaults)",
    )
    for key in ("header_timeout_s", "body_timeout_s"):
        value = getattr(config.server, key)
        check_value(0 < value <= 3600, f"server.{key}", value, "0 < seconds <= 3600")
    check_value(
        1 <= config.server.max_connections <= 65536,
        "server.max_connections",
        config.server.max_connections,
        "1..65536",
    )
    check_value(
        1 <= config.server.max_connections_per_ip <= config.server.max_connections,
        "server.max_connections_per_ip",
        config.server.max_connections_per_ip,
        f"1..server.max_connections ({config.server.max_connections})",
    )
    for proxy in config.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy.strip(), strict=False)
            known = True
        except ValueError:
            known = False
        check_value(known, "server.trusted_proxies", proxy, "IP addresses or CIDR networks (10.0.0.0/8)")
    for host in [
        *(config.server.allowed_hosts or []),
        *([config.server.public_name] if config.server.public_name else []),
    ]:
        check_value(HOST_RE.fullmatch(host) is not None, "server.allowed_hosts", host, "host names or IP addresses")
    check_value(
        is_loopback_host(config.server.host)
        or config.api.token is not None
        or config.server.allow_public_without_token,
        "server.host",
        config.server.host,
        "a loopback address unless api.token is set (or server.allow_public_without_token: true)",
    )
    for origin in config.api.allowed_origins:
        check_value(
            ORIGIN_RE.fullmatch(origin) is not None,
            "api.allowed_origins",
            origin,
            "origins like https://studio.example.com (scheme://host[:port], no path)",
        )


def _validate_stream(config: AppConfig) -> None:
    """``stream``: its destination, rate, pixel budget and recordings, what the outputs are built from."""
    s = config.stream
    check_value(rtmp_host(s.rtmp_url) is not None, "stream.rtmp_url", "<hidden>", RTMP_URL_WANT)
    check_value(1 <= s.fps <= 120, "stream.fps", s.fps, "1..120")
    check_value(64 <= s.max_side <= 7680, "stream.max_side", s.max_side, "64..7680 pixels")
    check_value(
        10**5 <= s.max_pixels_per_s <= 10**10, "stream.max_pixels_per_s", s.max_pixels_per_s, "100000..10000000000"
    )
    if s.width is not None and s.height is not None:
        check_value(
            s.width * s.height * s.fps <= s.max_pixels_per_s,
            "stream.width",
            f"{s.width}x{s.height} at {s.fps} fps",
            f"at most stream.max_pixels_per_s = {s.max_pixels_per_s} pixels per second",
        )
    check_value(
        s.record_path is None or (s.record_dir is not None and RECORD_NAME_RE.fullmatch(s.record_path) is not None),
        "stream.record_path",
        s.record_path,
        "a file name like live.mkv (letters, digits, . _ -; no folder; mkv, mp4, mov, ts or flv) in stream.record_dir",
    )
    check_value(1 <= s.record_max_mb <= 10**6, "stream.record_max_mb", s.record_max_mb, "1..1000000")
    check_value(1 <= s.record_keep <= 10000, "stream.record_keep", s.record_keep, "1..10000")
    for host in s.allowed_rtmp_hosts or []:
        check_value(
            HOST_RE.fullmatch(host) is not None, "stream.allowed_rtmp_hosts", host, "host names or IP addresses"
        )


def _validate_egress(config: AppConfig) -> None:
    """``egress``, then the outputs of the top-level stream (:func:`latentsync.config.derived.channel_outputs`)."""
    eg = config.egress
    check_value(0.5 <= eg.stall_timeout_s <= 600, "egress.stall_timeout_s", eg.stall_timeout_s, "0.5..600")
    check_value(1 <= eg.max_outputs <= 64, "egress.max_outputs", eg.max_outputs, "1..64")
    check_value(1 <= eg.hls_list_size <= 1000, "egress.hls_list_size", eg.hls_list_size, "1..1000")
    check_value(0.5 <= eg.hls_segment_s <= 60, "egress.hls_segment_s", eg.hls_segment_s, "0.5..60")
    check_value(8 <= eg.send_buffer_kb <= 65536, "egress.send_buffer_kb", eg.send_buffer_kb, "8..65536")
    check_value(0.5 <= eg.output_queue_s <= 60, "egress.output_queue_s", eg.output_queue_s, "0.5..60")
    channel_outputs(config)


def _validate_media(config: AppConfig) -> None:
    """``media``: clip budgets and the root of the videos the API may name."""
    m = config.media
    check_value(0.5 <= m.max_clip_s <= 86400, "media.max_clip_s", m.max_clip_s, "0.5..86400")
    check_value(0.1 <= m.max_clip_mb <= 10**6, "media.max_clip_mb", m.max_clip_mb, "0.1..1000000")
    check_value(1 <= m.max_decoded_mb <= 10**7, "media.max_decoded_mb", m.max_decoded_mb, "1..10000000")
    check_value(m.root is None or Path(m.root).is_dir(), "media.root", m.root, "an existing directory or null")


def _validate_stream_encoding(config: AppConfig) -> None:
    """The rest of ``stream``: audio, frame size, encoders, queues, the clock and restarts.

    Checked after the outputs: an output that inherits ``stream.video_bitrate_kbps`` names it first
    (``stream.outputs[0].video_bitrate_kbps``).
    """
    s = config.stream
    check_value(
        s.audio_sample_rate in AAC_SAMPLE_RATES_HZ,
        "stream.audio_sample_rate",
        s.audio_sample_rate,
        f"one of {AAC_SAMPLE_RATES_HZ}",
    )
    check_value(s.audio_channels in (1, 2), "stream.audio_channels", s.audio_channels, "1 or 2")
    for key in ("width", "height"):
        value = getattr(s, key)
        check_value(
            value is None or (16 <= value <= 7680 and value % 2 == 0),
            f"stream.{key}",
            value,
            "an even number of pixels in 16..7680 (yuv420p) or null",
        )
    check_value((s.width is None) == (s.height is None), "stream.width", s.width, "set together with stream.height")
    check_value(
        0 <= s.crossfade_frames <= 10 * s.fps, "stream.crossfade_frames", s.crossfade_frames, f"0..{10 * s.fps}"
    )
    check_value(100 <= s.video_bitrate_kbps <= 50000, "stream.video_bitrate_kbps", s.video_bitrate_kbps, "100..50000")
    check_value(16 <= s.audio_bitrate_kbps <= 512, "stream.audio_bitrate_kbps", s.audio_bitrate_kbps, "16..512")
    presets = ("auto", "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow")
    check_value(s.x264_preset in presets, "stream.x264_preset", s.x264_preset, f"one of {presets}")
    check_value(0.1 <= s.keyframe_interval_s <= 10, "stream.keyframe_interval_s", s.keyframe_interval_s, "0.1..10")
    check_value(0.1 <= s.sink_queue_s <= 10, "stream.sink_queue_s", s.sink_queue_s, "0.1..10")
    check_value(0.1 <= s.max_catchup_s <= 60, "stream.max_catchup_s", s.max_catchup_s, "0.1..60")
    check_value(-20 <= s.clock_nice <= 0, "stream.clock_nice", s.clock_nice, "-20..0")
    check_value(0 <= s.clock_rt_priority <= 99, "stream.clock_rt_priority", s.clock_rt_priority, "0..99 (0: off)")
    check_value(
        0 < s.restart_backoff_min_s <= s.restart_backoff_max_s <= 300,
        "stream.restart_backoff_min_s",
        s.restart_backoff_min_s,
        "0 < min <= stream.restart_backoff_max_s <= 300",
    )


def _validate_avatar(config: AppConfig) -> None:
    """``avatar``: its videos, the upload and cache budgets, the framing."""
    av = config.avatar
    for key in ("idle_video", "video"):
        value = getattr(av, key)
        check_value(value is None or Path(value).is_file(), f"avatar.{key}", value, "an existing video file or null")
    check_value(0.1 <= av.upload_max_mb <= 100000, "avatar.upload_max_mb", av.upload_max_mb, "0.1..100000")
    check_value(0.5 <= av.upload_max_s <= 3600, "avatar.upload_max_s", av.upload_max_s, "0.5..3600")
    check_value(1 <= av.cache_quota_mb <= 10**8, "avatar.cache_quota_mb", av.cache_quota_mb, "1..1e8")
    check_value(1 <= av.max_preparing <= 64, "avatar.max_preparing", av.max_preparing, "1..64")
    check_value(1 <= av.prepare_timeout_s <= 86400, "avatar.prepare_timeout_s", av.prepare_timeout_s, "1..86400")
    check_value(64 <= av.prepare_max_rss_mb <= 10**6, "avatar.prepare_max_rss_mb", av.prepare_max_rss_mb, "64..1e6")
    check_value(0 < av.min_face_fraction <= 1, "avatar.min_face_fraction", av.min_face_fraction, "0 < f <= 1")
    check_value(av.fit in ("cover", "contain", "stretch"), "avatar.fit", av.fit, "cover, contain or stretch")
    check_value(0 <= av.min_face_px <= 4096, "avatar.min_face_px", av.min_face_px, "0..4096 (0: no check)")
    check_value(
        0.05 <= av.face_fraction <= 1, "avatar.face_fraction", av.face_fraction, "0.05..1 (face width / picture width)"
    )
    check_value(
        av.background == "blur" or re.fullmatch(r"#[0-9a-fA-F]{6}", str(av.background)) is not None,
        "avatar.background",
        av.background,
        "blur or a #rrggbb colour",
    )


def _validate_engine(config: AppConfig) -> None:
    """``engine``: its workers, the chunk lengths of the engine named, ``engine.latentsync``."""
    e = config.engine
    check_value(0 <= e.worker_nice <= 19, "engine.worker_nice", e.worker_nice, "0..19")
    check_value(e.workers is None or 1 <= e.workers <= 64, "engine.workers", e.workers, "1..64 or null")
    check_value(
        e.device is None or e.device == "cpu" or e.device.startswith("cuda"),
        "engine.device",
        e.device,
        "cpu, cuda, cuda:N or null",
    )
    check_value(0.5 <= e.chunk_deadline_s <= 3600, "engine.chunk_deadline_s", e.chunk_deadline_s, "0.5..3600")
    check_value(1 <= e.max_batch_chunks <= 64, "engine.max_batch_chunks", e.max_batch_chunks, "1..64")
    check_value(16 <= e.max_queued_jobs <= 10**6, "engine.max_queued_jobs", e.max_queued_jobs, "16..1000000")
    low, high = CHUNK_FRAMES_RANGE.get(e.name.value, DEFAULT_CHUNK_FRAMES_RANGE)
    check_value(
        e.first_chunk_frames is None or low <= e.first_chunk_frames <= high,
        "engine.first_chunk_frames",
        e.first_chunk_frames,
        f"{low}..{high} frames or null for the {e.name.value} engine"
        + (
            " (LatentSync 1.0's U-Net normalises over all 16 frames of a chunk: a shorter chunk changes every"
            " frame, docs/latentsync.md)"
            if low == high
            else ""
        ),
    )
    validate_latentsync(e.latentsync)
    check_value(1 <= e.max_avatars_per_worker <= 64, "engine.max_avatars_per_worker", e.max_avatars_per_worker, "1..64")


def _validate_pool(config: AppConfig) -> None:
    """``pool``: the Ray settings."""
    pool = config.pool
    check_value(
        pool.ray_workers is None or 1 <= pool.ray_workers <= 4096, "pool.ray_workers", pool.ray_workers, "1..4096"
    )
    check_value(
        10 <= pool.ray_gcs_timeout_s <= 30 * 86400, "pool.ray_gcs_timeout_s", pool.ray_gcs_timeout_s, "10..2592000"
    )
    check_value(0 <= pool.ray_cpus_per_worker <= 256, "pool.ray_cpus_per_worker", pool.ray_cpus_per_worker, "0..256")
    check_value(0 < pool.ray_gpus_per_worker <= 16, "pool.ray_gpus_per_worker", pool.ray_gpus_per_worker, "(0, 16]")
    check_value(
        pool.ray_object_store_mb is None or pool.ray_object_store_mb >= 78,
        "pool.ray_object_store_mb",
        pool.ray_object_store_mb,
        "78 MB (Ray's least) or more, or null",
    )
    check_value(
        bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", pool.ray_namespace)),
        "pool.ray_namespace",
        pool.ray_namespace,
        "1-64 letters, digits, '_', '.', '-'",
    )
    check_value(
        not pool.ray_address
        or pool.ray_address == "auto"
        or bool(re.fullmatch(r"(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}", pool.ray_address)),
        "pool.ray_address",
        pool.ray_address,
        "auto, host:port, ray://host:port, or null (a private Ray)",
    )


def _validate_api(config: AppConfig) -> None:
    """``api``: limits and the token."""
    a = config.api
    check_value(0.1 <= a.max_audio_s <= 3600, "api.max_audio_s", a.max_audio_s, "0.1..3600")
    check_value(0.01 <= a.max_upload_mb <= 2048, "api.max_upload_mb", a.max_upload_mb, "0.01..2048")
    check_value(1 <= a.max_queued <= 1000, "api.max_queued", a.max_queued, "1..1000")
    check_value(a.token is None or len(a.token) >= 16, "api.token", "<hidden>", "at least 16 characters, or null")
    check_value(0.5 <= a.decode_timeout_s <= 600, "api.decode_timeout_s", a.decode_timeout_s, "0.5..600")
    check_value(0 <= a.rate_limit_per_min <= 100000, "api.rate_limit_per_min", a.rate_limit_per_min, "0..100000")
    check_value(1 <= a.max_long_lived <= 1024, "api.max_long_lived", a.max_long_lived, "1..1024")
    check_value(0.5 <= a.send_timeout_s <= 600, "api.send_timeout_s", a.send_timeout_s, "0.5..600")
    check_value(0 <= a.mutations_per_min <= 10**6, "api.mutations_per_min", a.mutations_per_min, "0..1000000")
    check_value(
        0 <= a.auth_failures_per_min <= 10**6, "api.auth_failures_per_min", a.auth_failures_per_min, "0..1000000"
    )
    check_value(1 <= a.max_json_kb <= 16384, "api.max_json_kb", a.max_json_kb, "1..16384")
    check_value(0 <= a.stills_per_min <= 10**6, "api.stills_per_min", a.stills_per_min, "0..1000000")


def _validate_tasks(config: AppConfig) -> None:
    """``tasks``: how far ahead tasks generate, and how many finished ones are kept."""
    t = config.tasks
    check_value(0 <= t.generate_ahead <= 64, "tasks.generate_ahead", t.generate_ahead, "0..64")
    check_value(32 <= t.max_frames_ahead <= 100000, "tasks.max_frames_ahead", t.max_frames_ahead, "32..100000")
    check_value(0 <= t.max_finished <= 100000, "tasks.max_finished", t.max_finished, "0..100000")


def _validate_speech_stream(config: AppConfig) -> None:
    """``speech_stream``: open utterances, their buffers and timeouts, text to speech."""
    ss = config.speech_stream
    check_value(1 <= ss.max_open <= 64, "speech_stream.max_open", ss.max_open, "1..64")
    check_value(1.0 <= ss.max_buffered_s <= 600, "speech_stream.max_buffered_s", ss.max_buffered_s, "1..600")
    check_value(0.5 <= ss.idle_timeout_s <= 600, "speech_stream.idle_timeout_s", ss.idle_timeout_s, "0.5..600")
    check_value(1 <= ss.max_text_chars <= 100000, "speech_stream.max_text_chars", ss.max_text_chars, "1..100000")
    need_kb = -(-(4 * ss.max_text_chars + 1024) // 1024)  # a /speak body of that many 4-byte characters
    check_value(
        config.api.max_json_kb >= need_kb,
        "api.max_json_kb",
        config.api.max_json_kb,
        f">= {need_kb} to hold a /speak body of speech_stream.max_text_chars = {ss.max_text_chars} characters",
    )
    check_value(
        re.fullmatch(r"[A-Za-z0-9_+\-/]{1,40}", ss.tts_voice) is not None,
        "speech_stream.tts_voice",
        ss.tts_voice,
        "an espeak-ng voice name like en, en-us, de",
    )
    wpm_low, wpm_high = TTS_RATE_RANGE_WPM
    check_value(
        wpm_low <= ss.tts_rate_wpm <= wpm_high, "speech_stream.tts_rate_wpm", ss.tts_rate_wpm, f"{wpm_low}..{wpm_high}"
    )
    check_value(0.5 <= ss.tts_timeout_s <= 120, "speech_stream.tts_timeout_s", ss.tts_timeout_s, "0.5..120")
    check_value(0 <= ss.start_margin_s <= 5, "speech_stream.start_margin_s", ss.start_margin_s, "0..5")
    check_value(0.5 <= ss.max_utterance_s <= 86400, "speech_stream.max_utterance_s", ss.max_utterance_s, "0.5..86400")
    check_value(0.1 <= ss.starve_timeout_s <= 600, "speech_stream.starve_timeout_s", ss.starve_timeout_s, "0.1..600")
    check_value(0 <= ss.min_arrival_ratio <= 1, "speech_stream.min_arrival_ratio", ss.min_arrival_ratio, "0..1")
    check_value(1 <= ss.max_feeder_items <= 100000, "speech_stream.max_feeder_items", ss.max_feeder_items, "1..100000")
    check_value(
        1024 <= ss.max_message_bytes <= 64 * 2**20,
        "speech_stream.max_message_bytes",
        ss.max_message_bytes,
        "1024..67108864 bytes",
    )
    check_value(
        ss.max_message_bytes <= ss.max_queued_bytes <= 1 << 30,
        "speech_stream.max_queued_bytes",
        ss.max_queued_bytes,
        "speech_stream.max_message_bytes..1073741824 bytes",
    )
    check_value(
        1 << 16 <= ss.max_feeder_bytes <= 1 << 32,
        "speech_stream.max_feeder_bytes",
        ss.max_feeder_bytes,
        "65536..4294967296 bytes",
    )


def _validate_webrtc(config: AppConfig) -> None:
    """``webrtc``: the WHEP viewers and their encoder."""
    w = config.webrtc
    check_value(1 <= w.max_viewers <= 64, "webrtc.max_viewers", w.max_viewers, "1..64")
    check_value(
        64 <= w.max_height <= 4320 and w.max_height % 2 == 0,
        "webrtc.max_height",
        w.max_height,
        "an even number of rows in 64..4320",
    )
    check_value(100 <= w.video_bitrate_kbps <= 50000, "webrtc.video_bitrate_kbps", w.video_bitrate_kbps, "100..50000")
    check_value(0.1 <= w.keyframe_interval_s <= 10, "webrtc.keyframe_interval_s", w.keyframe_interval_s, "0.1..10")
    check_value(0.1 <= w.viewer_queue_s <= 10, "webrtc.viewer_queue_s", w.viewer_queue_s, "0.1..10")
    check_value(1 <= w.connect_timeout_s <= 120, "webrtc.connect_timeout_s", w.connect_timeout_s, "1..120")
    check_value(1 <= w.signalling_timeout_s <= 60, "webrtc.signalling_timeout_s", w.signalling_timeout_s, "1..60")
    nets = w.allowed_candidate_networks
    want = '"local" and/or CIDR networks like "10.8.0.0/16" (docs/webrtc.md)'
    check_value(len(nets) > 0, "webrtc.allowed_candidate_networks", nets, f"a non-empty list of {want}")
    for entry in nets:
        try:
            candidate_network(entry)
        except ValueError:
            check_value(False, "webrtc.allowed_candidate_networks", entry, want)


def _validate_frames(config: AppConfig) -> None:
    """``frames``: the ``/ws/frames`` clients and their encoders."""
    fr = config.frames
    check_value(1 <= fr.max_clients <= 64, "frames.max_clients", fr.max_clients, "1..64")
    check_value(0.1 <= fr.client_queue_s <= 10, "frames.client_queue_s", fr.client_queue_s, "0.1..10")
    check_value(1 <= fr.jpeg_quality <= 100, "frames.jpeg_quality", fr.jpeg_quality, "1..100")
    check_value(100 <= fr.h264_bitrate_kbps <= 50000, "frames.h264_bitrate_kbps", fr.h264_bitrate_kbps, "100..50000")
    check_value(0.1 <= fr.keyframe_interval_s <= 10, "frames.keyframe_interval_s", fr.keyframe_interval_s, "0.1..10")
    check_value(0.5 <= fr.hello_timeout_s <= 60, "frames.hello_timeout_s", fr.hello_timeout_s, "0.5..60")


def _validate_ui(config: AppConfig) -> None:
    """``ui``: the event feed."""
    u = config.ui
    check_value(1 <= u.max_event_clients <= 256, "ui.max_event_clients", u.max_event_clients, "1..256")
    check_value(0.05 <= u.event_poll_s <= 10, "ui.event_poll_s", u.event_poll_s, "0.05..10")
    check_value(16 <= u.event_queue_events <= 100000, "ui.event_queue_events", u.event_queue_events, "16..100000")


def _validate_log(config: AppConfig) -> None:
    """``log``: the level."""
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    check_value(config.log.level.upper() in levels, "log.level", config.log.level, f"one of {levels}")


def _validate_channels(config: AppConfig) -> None:
    """Names, limits and each channel's own stream/avatar values (the message names the channel)."""
    check_value(1 <= config.max_channels <= 256, "max_channels", config.max_channels, "1..256")
    check_value(
        len(config.channels) + 1 <= config.max_channels,
        "channels",
        f"{len(config.channels) + 1} channels",
        f"at most max_channels = {config.max_channels} (main included)",
    )
    names = {DEFAULT_CHANNEL}
    derived_configs = channel_configs(config)
    urls = {t.url.url for t in channel_outputs(derived_configs[DEFAULT_CHANNEL]) if t.kind.networked}
    for i, ch in enumerate(config.channels):
        key = f"channels[{i}]"
        check_value(
            CHANNEL_NAME_RE.fullmatch(ch.name) is not None,
            f"{key}.name",
            ch.name,
            "lower-case letters, digits, - and _ (1..32, starting with a letter or digit)",
        )
        check_value(
            ch.name not in names,
            f"{key}.name",
            ch.name,
            f"a name not used by another channel ({DEFAULT_CHANNEL!r} is the top-level stream)",
        )
        names.add(ch.name)
        check_value(
            ch.rtmp_url is not None or bool(ch.outputs),
            f"{key}.rtmp_url",
            None,
            "the channel's own rtmp:// URL, or its outputs",
        )
        if ch.avatar is not None:
            check_value(
                AVATAR_ID_RE.fullmatch(ch.avatar) is not None,
                f"{key}.avatar",
                ch.avatar,
                "the id of an avatar uploaded with POST /avatars (av- and 12 hex digits)",
            )
            check_value(
                ch.idle_video is None and ch.video is None,
                f"{key}.avatar",
                ch.avatar,
                "no idle_video or video beside it (the uploaded avatar is both)",
            )
            check_value(
                uploaded_avatar_video(config.avatar.cache_dir, ch.avatar).is_file(),
                f"{key}.avatar",
                ch.avatar,
                "an avatar uploaded with POST /avatars that still exists (GET /avatars lists them)",
            )
        try:
            targets = channel_outputs(derived_configs[ch.name], f"{key}.outputs")
        except ConfigError as exc:
            raise ConfigError(f"{key} ({ch.name}): {exc}") from None
        field_name = f"{key}.outputs" if ch.outputs else f"{key}.rtmp_url"
        for t in targets:
            if t.kind.networked:
                check_value(t.url.url not in urls, field_name, "<hidden>", "a URL no other channel sends to")
                urls.add(t.url.url)
    for name, derived in derived_configs.items():
        if name == DEFAULT_CHANNEL:
            continue
        try:
            validate(derived)
        except ConfigError as exc:
            index = next(i for i, ch in enumerate(config.channels) if ch.name == name)
            raise ConfigError(f"channels[{index}] ({name}): {exc}") from None
    check_local_outputs(config)  # no two channels on one recording file or HLS folder


def validate_latentsync(ls: LatentSyncConfig, section: str = "engine.latentsync") -> None:
    """Check the ``engine.latentsync`` values (the engine checks its settings with this too).

    Args:
        ls: The section.
        section: Its key, for messages.

    Raises:
        ConfigError: Naming the first key whose value is out of range.
    """
    check_value(isinstance(ls.dtype, DType), f"{section}.dtype", ls.dtype, f"one of {[d.value for d in DType]}")
    check_value(
        ls.version in LATENTSYNC_VERSIONS, f"{section}.version", ls.version, f"one of {list(LATENTSYNC_VERSIONS)}"
    )
    steps, scale = ls.inference_steps, ls.guidance_scale
    low, high = INFERENCE_STEPS_RANGE
    check_value(
        isinstance(steps, int) and not isinstance(steps, bool) and low <= steps <= high,
        f"{section}.inference_steps",
        steps,
        f"an integer in {low}..{high}",
    )
    low, high = GUIDANCE_SCALE_RANGE
    check_value(
        isinstance(scale, int | float) and not isinstance(scale, bool) and low <= scale <= high,
        f"{section}.guidance_scale",
        scale,
        f"{low:g}..{high:g}",
    )
    check_value(isinstance(ls.seed, int) and not isinstance(ls.seed, bool), f"{section}.seed", ls.seed, "an integer")
    interval = ls.deepcache_interval
    check_value(
        isinstance(interval, int) and not isinstance(interval, bool) and interval >= 0,
        f"{section}.deepcache_interval",
        interval,
        "an integer >= 0 (0: off)",
    )
