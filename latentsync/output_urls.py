r"""What an output's URL may be: its kind, its parts, and how it is shown without its secrets.

A channel sends its programme to one or more outputs (docs/outputs.md). Each is named by one URL:

| URL | kind | what FFmpeg does |
| --- | --- | --- |
| ``rtmp://host[:port]/app/key``, ``rtmps://…`` | ``rtmp`` | FLV over RTMP (TLS for ``rtmps``) |
| ``srt://host:port[?streamid=…&passphrase=…&latency=…]`` | ``srt`` | MPEG-TS over SRT, as caller |
| ``http(s)://host[:port]/path`` | ``whip`` | WebRTC ingest (WHIP, RFC 9725): H.264 + Opus |
| ``hls:NAME`` | ``hls`` | HLS segments in ``egress.hls_root/NAME/`` |
| ``record:FILE.mkv`` | ``record`` | recording files in ``stream.record_dir`` |

Everything that FFmpeg would read as syntax is refused here, before any process sees the URL:
whitespace and control characters anywhere (a second argument, a header line), the characters
the tee and segment muxers give a meaning (``| [ ] \\ %``), quotes, SRT options other than the few
a caller needs (``mode=listener`` would open a port on this host), and file names that leave
their root (a folder, ``..``, a leading dot).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

#: Characters refused in every URL: FFmpeg syntax (tee: ``| [ ]``, escapes ``\\``, segment/HLS
#: patterns ``%``), quotes and whitespace. Control characters are refused as well.
FORBIDDEN_CHARS = frozenset("|[]\\%'\"` \t\r\n")
#: Names of outputs (``name``): they appear in URLs of the API, log lines and Prometheus labels.
OUTPUT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
#: HLS folder names (``hls:NAME``): one path component under ``egress.hls_root``.
HLS_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
#: Recording file names (``record:FILE``): one file in ``stream.record_dir``, with a container FFmpeg's
#: segment muxer picks by its extension.
RECORD_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,123}\.(mkv|mp4|mov|ts|flv)")
#: SRT query options a caller may set (FFmpeg's ``srt`` protocol; values checked below). ``mode`` may
#: only be ``caller``: a listener or rendezvous would accept connections on this host.
SRT_OPTIONS = frozenset({"streamid", "passphrase", "pbkeylen", "latency", "connect_timeout", "mode"})
_IPV6_LITERAL_RE = re.compile(r"(?<=://)((?:[^@/]*@)?)\[[0-9A-Fa-f:.]+\]")
_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)"
_RTMP_RE = re.compile(rf"(rtmps?)://(?:[^@/]*@)?{_HOST}(?::(\d{{1,5}}))?(/.*)?")
_SRT_RE = re.compile(rf"srt://{_HOST}:(\d{{1,5}})/?(?:\?(.*))?")
_WHIP_RE = re.compile(rf"(https?)://{_HOST}(?::(\d{{1,5}}))?(/.*)?")
#: What a channel's ``rtmp_url`` must be (:func:`latentsync.output_urls.parse_output_url`'s rules):
#: what FFmpeg reads as syntax, whitespace and control characters refused.
RTMP_URL_WANT = "an rtmp:// or rtmps:// URL with a host, without whitespace, quotes or any of | [ ] \\ %"
#: Default ports, for the reachability probes (RTMP: 1935; RTMPS: 443 as the platforms use it).
DEFAULT_PORTS = {"rtmp": 1935, "rtmps": 443, "http": 80, "https": 443}


class OutputKind(str, enum.Enum):
    r"""What an output sends and how (see the module's table)."""

    rtmp = "rtmp"
    srt = "srt"
    whip = "whip"
    hls = "hls"
    record = "record"

    @property
    def networked(self) -> bool:
        """True for the kinds that send to a host (and so count against the allowed hosts)."""
        return self in (OutputKind.rtmp, OutputKind.srt, OutputKind.whip)


@dataclass(frozen=True, kw_only=True)
class OutputUrl:
    """A parsed output URL.

    Attributes:
        kind: What the output is.
        url: The URL as given (it may hold a stream key: never log it).
        scheme: ``rtmp``, ``rtmps``, ``srt``, ``http``, ``https``, ``hls`` or ``record``.
        host: The host, lower case, IPv6 without brackets (networked kinds), else None.
        port: The port (the scheme's default where none is given), else None.
        name: The HLS folder or the recording's file name (``hls``/``record``), else None.
    """

    kind: OutputKind
    url: str
    scheme: str
    host: str | None = None
    port: int | None = None
    name: str | None = None


class OutputUrlError(ValueError):
    """An output URL that is refused; the message says what is expected (never the URL itself)."""


def parse_output_url(url: str) -> OutputUrl:
    """Parse and check one output URL.

    Args:
        url: The URL as configured or sent to the API.

    Returns:
        Its :class:`OutputUrl`.

    Raises:
        OutputUrlError: For an unknown scheme, a malformed URL, a forbidden character, an SRT option
            that is not allowed, or a file name that would leave its root. The message does not
            repeat the URL (it may hold a stream key).
    """
    if not isinstance(url, str) or not url:
        raise OutputUrlError("url: a non-empty string is required")
    # An IPv6 literal is the one place where brackets belong (rtmp://[::1]:1935/...).
    unbracketed = _IPV6_LITERAL_RE.sub(r"\1", url, count=1)
    if any(ord(c) < 32 or ord(c) == 127 for c in url) or FORBIDDEN_CHARS.intersection(unbracketed):
        raise OutputUrlError("url: whitespace, control characters, quotes and any of | [ ] \\ % are not allowed")
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("rtmp", "rtmps"):
        m = _RTMP_RE.fullmatch(url)
        if m is None:
            raise OutputUrlError("url: expected rtmp[s]://host[:port]/app/key")
        return OutputUrl(
            kind=OutputKind.rtmp, url=url, scheme=scheme, host=_host(m.group(2)), port=_port(m.group(3), scheme)
        )
    if scheme == "srt":
        m = _SRT_RE.fullmatch(url)
        if m is None:
            raise OutputUrlError("url: expected srt://host:port[?streamid=...&passphrase=...&latency=...]")
        _check_srt_query(m.group(3) or "")
        return OutputUrl(
            kind=OutputKind.srt, url=url, scheme=scheme, host=_host(m.group(1)), port=_port(m.group(2), scheme)
        )
    if scheme in ("http", "https"):
        m = _WHIP_RE.fullmatch(url)
        if m is None or "@" in url.split("//", 1)[1].split("/", 1)[0]:
            raise OutputUrlError("url: expected a WHIP endpoint http[s]://host[:port]/path (no credentials)")
        return OutputUrl(
            kind=OutputKind.whip, url=url, scheme=scheme, host=_host(m.group(2)), port=_port(m.group(3), scheme)
        )
    if scheme == "hls":
        name = url[len("hls:") :]
        if HLS_NAME_RE.fullmatch(name) is None:
            raise OutputUrlError("url: expected hls:NAME (a folder name in egress.hls_root: letters, digits, . _ -)")
        return OutputUrl(kind=OutputKind.hls, url=url, scheme=scheme, name=name)
    if scheme == "record":
        name = url[len("record:") :]
        if RECORD_NAME_RE.fullmatch(name) is None:
            raise OutputUrlError(
                "url: expected record:FILE.mkv (a file name in stream.record_dir: letters, digits, . _ -; "
                "extension mkv, mp4, mov, ts or flv)"
            )
        return OutputUrl(kind=OutputKind.record, url=url, scheme=scheme, name=name)
    raise OutputUrlError("url: the scheme must be rtmp, rtmps, srt, http, https (WHIP), hls: or record:")


def _host(host: str) -> str:
    return host.strip("[]").lower()


def _port(port: str | None, scheme: str) -> int:
    if port is None:
        return DEFAULT_PORTS[scheme]
    value = int(port)
    if not 1 <= value <= 65535:
        raise OutputUrlError("url: the port must be 1..65535")
    return value


def _check_srt_query(query: str) -> None:
    if not query:
        return
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    seen = set()
    for key, value in pairs:
        if key not in SRT_OPTIONS:
            raise OutputUrlError(f"url: SRT option {key!r} is not allowed (allowed: {', '.join(sorted(SRT_OPTIONS))})")
        if key in seen:
            raise OutputUrlError(f"url: SRT option {key!r} given twice")
        seen.add(key)
        if key == "mode" and value != "caller":
            raise OutputUrlError("url: SRT mode must be caller (the destination listens)")
        if key in ("latency", "connect_timeout") and not (value.isdigit() and int(value) <= 10**8):
            raise OutputUrlError(f"url: SRT {key} must be a number of microseconds/milliseconds")
        if key == "pbkeylen" and value not in ("16", "24", "32"):
            raise OutputUrlError("url: SRT pbkeylen must be 16, 24 or 32")
        if key == "passphrase" and not 10 <= len(value) <= 79:
            raise OutputUrlError("url: SRT passphrase must have 10..79 characters")
        if key == "streamid" and not 1 <= len(value) <= 512:
            raise OutputUrlError("url: SRT streamid must have 1..512 characters")


def redact_output_url(url: str) -> str:
    """The URL as it may be shown (``/health``, logs, the page): no stream key, credentials or options.

    ``rtmp://user:pw@host/live/KEY`` → ``rtmp://host/live/***``; ``srt://host:9000?streamid=K`` →
    ``srt://host:9000?***``; ``https://host/whip/KEY`` → ``https://host/***``; ``hls:``/``record:``
    names are shown as they are. Anything unparsable → ``***``.
    """
    try:
        parsed = parse_output_url(url)
    except OutputUrlError:
        return "***"
    if parsed.kind is OutputKind.rtmp:
        return redact_rtmp_url(url)
    if parsed.kind is OutputKind.srt:
        base, query = url.split("?", 1) if "?" in url else (url, "")
        return f"{base}?***" if query else base
    if parsed.kind is OutputKind.whip:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}/***" if parts.path.strip("/") or parts.query else url
    return url


def rtmp_host(url: str) -> str | None:
    r"""The host of an ``rtmp://``/``rtmps://`` URL (lower case, IPv6 without brackets); None if the URL is refused.

    The rules are the outputs' (:func:`latentsync.output_urls.parse_output_url`): another scheme, no
    host, whitespace, control characters, quotes, ``| [ ] \ %`` (outside an IPv6 literal) are refused.
    """
    try:
        parsed = parse_output_url(url)
    except OutputUrlError:
        return None
    return parsed.host if parsed.kind is OutputKind.rtmp else None


def redact_rtmp_url(url: str) -> str:
    """Hide the stream key (the last path element), the query, the fragment and any credentials of an RTMP URL.

    ``rtmp://user:pw@host:1935/live/secretkey?secret=S`` becomes ``rtmp://host:1935/live/***``. The
    key is the last non-empty path element before any ``?`` or ``#`` (``rtmp://h/live/KEY/``,
    ``rtmp://h/live/KEY?a=b/c`` and ``rtmp://h/live?auth=S/KEY`` hide ``KEY`` and ``S`` too);
    anything after the host is ``***`` when there is no path element.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    hostpart, tail = rest[:cut].rsplit("@", 1)[-1], rest[cut:]
    if not tail:
        return f"{scheme}://{hostpart}"
    path = tail.split("?", 1)[0].split("#", 1)[0]
    app = "/".join([p for p in path.split("/") if p][:-1])
    return f"{scheme}://{hostpart}/{app + '/' if app else ''}***"


def url_secrets(url: str) -> tuple[str, ...]:
    """Strings of ``url`` to scrub from FFmpeg's messages, longest first (the URL, keys, option values).

    What counts, at four characters or more: an RTMP stream key (the last path element), every path
    element of a WHIP endpoint, option values (an SRT passphrase or streamid, a ``?secret=``) and
    a password.
    """
    if "://" not in url:
        return ()  # hls: and record: name local folders and files: nothing secret
    parts = urlsplit(url)
    found = {url}
    elements = [p for p in parts.path.split("/") if p]
    if parts.scheme in ("rtmp", "rtmps"):
        elements = elements[-1:]
    found.update(elements)
    found.update(v for _, v in parse_qsl(parts.query, keep_blank_values=True))
    found.add(parts.query)
    found.add(parts.password or "")
    return tuple(sorted((s for s in found if len(s) >= 4), key=len, reverse=True))
