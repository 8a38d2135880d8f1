"""What each channel runs with, derived from the whole configuration: its own config and its outputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from latentsync.config.app import AppConfig
from latentsync.config.avatar import uploaded_avatar_video
from latentsync.config.channels import DEFAULT_CHANNEL
from latentsync.config.egress import OutputConfig
from latentsync.config.errors import ConfigError, check_value
from latentsync.output_urls import (
    OUTPUT_NAME_RE,
    OutputKind,
    OutputUrl,
    OutputUrlError,
    parse_output_url,
    redact_output_url,
)


def channel_configs(config: AppConfig) -> dict[str, AppConfig]:
    """The configuration each channel runs with: ``main`` first, then ``channels`` in order.

    A channel's config is the whole config with its ``stream`` and ``avatar`` sections replaced by
    the channel's values (null values keep the top-level ones) and ``channels`` emptied. A channel
    without its own ``record_path`` records to ``<name>-<stream.record_path>``, never to ``main``'s
    file (:func:`check_local_outputs` refuses two channels on one file).

    Args:
        config: The server configuration.

    Returns:
        Channel name -> its configuration (``main`` is ``config`` itself with ``channels`` emptied).
    """
    out = {DEFAULT_CHANNEL: dataclasses.replace(config, channels=[])}
    for ch in config.channels:
        stream_values = {
            k: getattr(ch, k)
            for k in (
                "rtmp_url",
                "fps",
                "idle_audio",
                "idle_pingpong",
                "crossfade_frames",
                "video_bitrate_kbps",
                "record_path",
            )
            if getattr(ch, k) is not None
        }
        if ch.width is not None or ch.height is not None:
            stream_values.update(width=ch.width, height=ch.height)
        stream_values["outputs"] = list(ch.outputs or [])  # a destination belongs to one channel
        if ch.record_path is None and config.stream.record_path:  # so is a recording file
            stream_values["record_path"] = f"{ch.name}-{config.stream.record_path}"
        avatar = dataclasses.replace(
            config.avatar, **{k: getattr(ch, k) for k in ("idle_video", "video") if getattr(ch, k) is not None}
        )
        if ch.idle_video is not None and ch.video is None:  # its own idle video is its base video too
            avatar = dataclasses.replace(avatar, video=None)
        if ch.video is not None and ch.idle_video is None:  # and its own base video its idle loop
            avatar = dataclasses.replace(avatar, idle_video=ch.video)
        if ch.avatar is not None:  # an uploaded avatar is its idle and base video
            upload = str(uploaded_avatar_video(config.avatar.cache_dir, ch.avatar))
            avatar = dataclasses.replace(avatar, idle_video=upload, video=None)
        stream = dataclasses.replace(config.stream, **stream_values)
        out[ch.name] = dataclasses.replace(config, stream=stream, avatar=avatar, channels=[])
    return out


@dataclass(frozen=True, kw_only=True)
class OutputTarget:
    """One output of a channel as it runs: its URL parsed, its defaults filled in (:func:`channel_outputs`).

    Attributes:
        name: Unique within the channel (:data:`latentsync.output_urls.OUTPUT_NAME_RE`).
        url: The parsed URL (``url.url`` may hold a stream key: never log it).
        required: The channel counts as streaming only while this output is live.
        video_bitrate_kbps: The H.264 bitrate of its encoding, in kbit/s.
        bearer_token: The WHIP endpoint's bearer token, or None.
    """

    name: str
    url: OutputUrl
    required: bool
    video_bitrate_kbps: int
    bearer_token: str | None = None

    @property
    def kind(self) -> OutputKind:
        """What the output is (``rtmp``, ``srt``, ``whip``, ``hls``, ``record``)."""
        return self.url.kind

    def public(self) -> dict:
        """The output as the API shows it: no stream key, token or option values."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "url": redact_output_url(self.url.url),
            "required": self.required,
            "video_bitrate_kbps": self.video_bitrate_kbps,
        }


def _record_files_clash(a: str, b: str) -> bool:
    """Whether recordings ``record:a`` and ``record:b`` would write or prune each other's files.

    ``record:FILE.mkv`` writes ``FILE-<run>-<n>.mkv`` and prunes ``FILE-*.mkv``
    (:func:`latentsync.serving.egress.outputs.prune_recordings`): one name is the other, or one's
    stem followed by ``-`` starts the other's with the same extension.
    """
    (stem_a, _, ext_a), (stem_b, _, ext_b) = a.rpartition("."), b.rpartition(".")
    return ext_a == ext_b and (stem_a == stem_b or stem_a.startswith(f"{stem_b}-") or stem_b.startswith(f"{stem_a}-"))


def local_output_clash(mine: list[OutputTarget], others: dict[str, list[OutputTarget]]) -> str | None:
    """What one channel's recordings or HLS folders share with another channel's, if anything.

    Args:
        mine: The channel's outputs (:func:`channel_outputs`).
        others: The other channels' outputs, by channel name.

    Returns:
        A message naming both outputs and the other channel (no stream key: local names only), or
        None when none clash.
    """
    for t in mine:
        if t.kind not in (OutputKind.record, OutputKind.hls) or t.url.name is None:
            continue
        for other_name, targets in others.items():
            for o in targets:
                if o.kind is not t.kind or o.url.name is None:
                    continue
                same = (
                    o.url.name == t.url.name
                    if t.kind is OutputKind.hls
                    else _record_files_clash(o.url.name, t.url.name)
                )
                if same:
                    return (
                        f"{t.url.url} (output {t.name}) would write the files of channel {other_name}'s "
                        f"{o.url.url}: give each channel its own record_path / file or folder name"
                    )
    return None


def check_local_outputs(config: AppConfig) -> None:
    """Refuse two channels writing one recording file or HLS folder (:func:`local_output_clash`).

    Args:
        config: The server configuration, its ``channels`` included.

    Raises:
        ConfigError: Naming the channel (``channels[i] (name)``, or ``stream.outputs`` for ``main``)
            and both outputs.
    """
    seen: dict[str, list[OutputTarget]] = {}
    for i, (name, derived) in enumerate(channel_configs(config).items()):
        targets = channel_outputs(derived)
        clash = local_output_clash(targets, seen)
        if clash is not None:
            raise ConfigError(f"channels[{i - 1}] ({name}): {clash}")
        seen[name] = targets


def channel_outputs(config: AppConfig, key: str = "stream.outputs") -> list[OutputTarget]:
    """The outputs a channel runs: ``stream.outputs`` (or the ``rtmp_url`` shorthand) and the recording.

    Args:
        config: A channel's configuration (:func:`channel_configs`), or the top-level one for ``main``.
        key: How messages name the list.

    Returns:
        The outputs in order, each with its name, ``required`` and bitrate filled in: names default
        to the kind (``rtmp``, ``srt``, ``whip``, ``hls``, ``record``; ``-2``, ``-3`` ... for more of
        one kind); ``required`` defaults to true, false for recordings; ``stream.record_path`` adds
        ``record:<record_path>`` (not required) unless an output names it already.

    Raises:
        ConfigError: Naming the output: a refused URL (:func:`latentsync.output_urls.parse_output_url`),
            a name given twice, more than ``egress.max_outputs``, an HLS output without
            ``egress.hls_root``, a recording without ``stream.record_dir``, a bitrate out of range, a
            bearer token on an output that is not WHIP or one with a line break.
    """
    s = config.stream
    given = list(s.outputs) or [OutputConfig(url=s.rtmp_url)]
    if s.record_path and not any(o.url == f"record:{s.record_path}" for o in given):
        given.append(OutputConfig(url=f"record:{s.record_path}", required=False))
    check_value(
        len(given) <= config.egress.max_outputs,
        key,
        f"{len(given)} outputs",
        f"at most egress.max_outputs = {config.egress.max_outputs}",
    )
    names: set[str] = set()
    counts: dict[str, int] = {}
    out = []
    for i, o in enumerate(given):
        where = f"{key}[{i}]"
        try:
            url = parse_output_url(o.url)
        except OutputUrlError as exc:
            raise ConfigError(f"{where}.{exc}") from None
        counts[url.kind.value] = counts.get(url.kind.value, 0) + 1
        n = counts[url.kind.value]
        name = o.name if o.name is not None else url.kind.value + (f"-{n}" if n > 1 else "")
        check_value(
            OUTPUT_NAME_RE.fullmatch(name) is not None, f"{where}.name", name, "lower-case letters, digits, - and _"
        )
        check_value(name not in names, f"{where}.name", name, "a name no other output of the channel has")
        names.add(name)
        check_value(
            url.kind is not OutputKind.hls or config.egress.hls_root is not None,
            f"{where}.url",
            o.url,
            "hls: outputs only with egress.hls_root set",
        )
        check_value(
            url.kind is not OutputKind.record or s.record_dir is not None,
            f"{where}.url",
            o.url,
            "record: outputs only with stream.record_dir set",
        )
        bitrate = o.video_bitrate_kbps if o.video_bitrate_kbps is not None else s.video_bitrate_kbps
        check_value(100 <= bitrate <= 50000, f"{where}.video_bitrate_kbps", bitrate, "100..50000")
        token = o.bearer_token
        check_value(
            token is None or (url.kind is OutputKind.whip and 1 <= len(token) <= 4096 and token.isprintable()),
            f"{where}.bearer_token",
            "<hidden>",
            "a WHIP output's token (printable, no line breaks, at most 4096 characters)",
        )
        required = o.required if o.required is not None else url.kind is not OutputKind.record
        out.append(OutputTarget(name=name, url=url, required=required, video_bitrate_kbps=bitrate, bearer_token=token))
    return out
