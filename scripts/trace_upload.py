"""One upload's path on the HTTP thread: the latentsync modules it enters, in order (issue 34's proof).

Starts a Runtime in this process (the default config: parametric engine) pushing to the local
nginx-rtmp (``make rtmp-start`` first), waits until it is ready, posts a 2 s WAV to
``/generate_video`` through Flask's test client on this thread with a profile hook, and prints each
change of module among latentsync's (calls within one module count once), then the modules entered
more than once. Run from the repository root: ``.venv/bin/python scripts/trace_upload.py``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentsync.config import load_config  # noqa: E402
from latentsync.serving.api.app import create_app  # noqa: E402
from latentsync.serving.runtime.runtime import Runtime  # noqa: E402
from scripts.make_bad_inputs import wav_bytes  # noqa: E402


def main() -> int:
    url = subprocess.run(
        ["bash", "scripts/rtmp_server.sh", "publish-url", "trace"], capture_output=True, text=True, check=True
    ).stdout.strip()
    runtime = Runtime(load_config(None, [f"stream.rtmp_url={url}"]))
    runtime.start()
    try:
        client = create_app(runtime).test_client()
        deadline = time.monotonic() + 120
        while client.get("/health?ready=1").status_code != 200:
            if time.monotonic() > deadline:
                print("the server did not get ready in 120 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        t = np.arange(48000 * 2) / 48000
        wav = wav_bytes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16), 48000)
        path: list[str] = []
        me = threading.get_ident()

        def hook(frame, event, arg):
            if event == "call" and threading.get_ident() == me:
                module = frame.f_globals.get("__name__", "")
                if module.startswith("latentsync") and (not path or path[-1] != module):
                    path.append(module)

        sys.setprofile(hook)
        try:
            answer = client.post("/generate_video", data={"audio_file": (io.BytesIO(wav), "speech.wav")})
        finally:
            sys.setprofile(None)
        print(answer.status_code, answer.json)
        names = [m.removeprefix("latentsync.serving.") for m in path]
        print(f"{len(names)} module changes:")
        print(" -> ".join(names))
        seen: set[str] = set()
        again: list[str] = []
        for name in names:
            if name in seen and name not in again:
                again.append(name)
            seen.add(name)
        print("entered more than once:", ", ".join(again) or "none")
        return 0
    finally:
        runtime.close()


if __name__ == "__main__":
    sys.exit(main())
