"""Paste-back benchmark: the reference full-frame composite against our face-box composite.

Prints ms/frame (median of N frames) at 832x1248 and 1080x1920 and the speed-up.
Usage: python scripts/bench/composite_bench.py [--frames 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from latentsync.face import (  # noqa: E402
    TEMPLATE_POINTS,
    PasteGeometry,
    paste_face,
    paste_face_reference,
    similarity_transform,
)


def _median_ms(fn, n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    face = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), np.uint8), (0, 0), 2)
    print(
        f"{'frame':>10} {'face px':>8} {'reference ms':>13} {'ours ms':>8} {'ours+geom ms':>13} "
        f"{'ratio':>6} {'ratio+geom':>11}"
    )
    for w, h in [(832, 1248), (1080, 1920)]:
        frames = [rng.integers(0, 256, (h, w, 3), np.uint8) for _ in range(4)]
        face_w = 0.21 * w  # as in the full-body test videos (175 px at 832 wide)
        affines = []
        for i in range(args.frames):
            cx, cy = w * 0.5 + 3 * np.sin(i / 5), h * 0.25 + 2 * np.cos(i / 7)
            src = np.array([[cx - face_w / 2, cy], [cx + face_w / 2, cy + 2], [cx, cy + face_w / 2]])
            affines.append(similarity_transform(src, TEMPLATE_POINTS))
        geoms = [PasteGeometry.from_affine(a, (w, h)) for a in affines]
        ref = _median_ms(lambda i, f=frames, a=affines: paste_face_reference(f[i % 4], face, a[i]), args.frames)
        ours = _median_ms(lambda i, f=frames, a=affines: paste_face(f[i % 4], face, a[i]), args.frames)
        ours_geom = _median_ms(
            lambda i, f=frames, g=geoms: paste_face(f[i % 4], face, geometry=g[i], inplace=True), args.frames
        )
        print(
            f"{w}x{h:<5} {face_w:8.0f} {ref:13.2f} {ours:8.2f} {ours_geom:13.2f} "
            f"{ref / ours:6.1f} {ref / ours_geom:11.1f}"
        )
    print("reference: full-frame inverse warp, erosion, blur and blend (LatentSync 1.0 style)")
    print("ours: same steps on the face box only; +geom: box/soft mask precomputed, pasted in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
