"""Headless Chromium (Playwright) as the tests and benches drive it: one launcher, one set of flags.

Imported by the browser tests, by the drivers the agent test and bench run in the server venv's Python
(``python -c DRIVER``, with the repository's root on ``sys.path``) and by ``scripts/bench/webrtc_bench.py``.
Needs only Playwright.
"""

from __future__ import annotations

#: WebRTC over loopback (no mDNS host candidates), sound played without a user gesture, no sandbox (root).
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
)


def launch_chromium(pw, executable: str, extra_args: tuple[str, ...] | list[str] = ()):
    """A headless Chromium that connects WebRTC over loopback and autoplays sound.

    Args:
        pw: A started ``playwright.sync_api`` Playwright.
        executable: The Chromium binary (Debian's ``chromium``: ``scripts/chromium.sh install``).
        extra_args: More flags (e.g. a fake microphone).

    Returns:
        Playwright's ``Browser``; the caller closes it.
    """
    return pw.chromium.launch(executable_path=executable, args=[*CHROMIUM_ARGS, *extra_args])
