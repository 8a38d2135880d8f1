"""Prepare a base video as an avatar (face tracking, alignment, cache) and print a summary.

Usage: python scripts/prepare_avatar.py VIDEO [--cache-dir DIR] [--fps 25] [--size WxH] [--face-size 256|512]

``--face-size 512`` prepares the 512x512 faces LatentSync 1.6 runs on (the server chooses it itself from
``engine.latentsync.version``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentsync.avatar import Avatar, AvatarSettings  # noqa: E402
from latentsync.face import FaceNotFoundError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/avatars"))
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--sample-rate-hz", type=int, default=16000)
    parser.add_argument("--size", default=None, help="output WIDTHxHEIGHT (default: the video's)")
    parser.add_argument(
        "--face-size", type=int, choices=(256, 512), default=256, help="aligned face side (512: LatentSync 1.6)"
    )
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    settings = AvatarSettings(fps=args.fps, sample_rate_hz=args.sample_rate_hz, size=size, face_size=args.face_size)
    t0 = time.monotonic()
    try:
        avatar = Avatar.prepare(args.video, settings, args.cache_dir, progress=True)
    except FaceNotFoundError as err:
        print(f"error: {args.video.name}: {err}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - t0
    meta = avatar.meta
    widths = meta["face_width_px"]
    w, h = avatar.frame_size
    print(f"avatar      {avatar.path}")
    seconds = avatar.num_frames / avatar.fps
    print(f"frames      {avatar.num_frames} at {avatar.fps} fps ({seconds:.2f} s), {w}x{h}")
    print(f"faces       {avatar.face_size}x{avatar.face_size} aligned crops")
    print(f"faces found {meta['faces_found']}/{avatar.num_frames} frames")
    print(f"face width  {widths['median']:.0f} px (min {widths['min']:.0f}, max {widths['max']:.0f})")
    print(f"time        {elapsed:.2f} s this call (preparation took {meta['prepare_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
