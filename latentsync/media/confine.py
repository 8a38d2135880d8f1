"""The FFmpeg command that may read one untrusted file and nothing else, and how it is run.

Every probe and decode of a file the server did not write itself goes through here
(:mod:`latentsync.media.probe`, :mod:`latentsync.media.audio`, :mod:`latentsync.media.video`):
the file is an inherited read-only descriptor, no protocol but ``fd`` may be opened, only
whitelisted demuxers may probe it, and FFmpeg runs with an empty environment (docs/security.md).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg

from latentsync.media.errors import MediaDecodeTimeout


def confined_input(fd: int, formats: tuple[str, ...], loglevel: str = "error") -> list[str]:
    """The start of an FFmpeg command line that reads one untrusted file, and nothing else.

    The file is the inherited descriptor ``fd`` (``-fd N -i fd:``); no protocol but ``fd`` may be
    opened (``-protocol_whitelist fd``: no second file, device, FIFO or network address, however
    the file asks) and only the demuxers in ``formats`` may probe it (``-format_whitelist``).
    Run it with ``pass_fds=(fd,)`` and an empty environment (docs/security.md).

    Args:
        fd: A read-only descriptor of the file (regular files are seekable through it).
        formats: Allowed FFmpeg demuxer names.
        loglevel: FFmpeg's ``-loglevel`` (``info`` prints the input's ``Duration`` line).

    Returns:
        The arguments up to and including the input (``... -i fd:``); output options follow.
    """
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel",
        loglevel,
        "-protocol_whitelist",
        "fd",
        "-format_whitelist",
        ",".join(formats),
        "-fd",
        str(fd),
        "-i",
        "fd:",
    ]


def run_confined(
    cmd: list[str], fds: tuple[int, ...], cwd: Path, timeout_s: float, what: str
) -> subprocess.CompletedProcess:
    """Run a :func:`confined_input` command: only ``fds`` inherited, empty environment, in ``cwd``.

    Args:
        cmd: The command line.
        fds: Descriptors FFmpeg gets (``pass_fds``).
        cwd: Its working directory (the upload's own folder).
        timeout_s: Seconds before it is killed.
        what: Start of the timeout's message, e.g. ``"speech.wav: decoding"``.

    Returns:
        The finished process (stdout and stderr captured; the caller checks the exit code).

    Raises:
        MediaDecodeTimeout: If it ran longer than ``timeout_s``.
    """
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            timeout=timeout_s,
            check=False,
            env={},
            cwd=cwd,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise MediaDecodeTimeout(f"{what} took longer than {timeout_s:g} s") from None
