"""Contact sheet: idle and speaking frames of the parametric engine, cropped around the face.

Writes out/contact_<video stem>.png: top row base frames (idle), bottom row the same base frames
lip-synced to the speech at its most open moments, each a crop around the face of the full
(pasted) output frame. Usage: python scripts/contact_sheet.py VIDEO [VIDEO ...] [--audio WAV]

With ``--framing WxH [WxH ...]`` it writes out/framing_<video stem>.png instead: one row per channel
size, one column per framing (stretch = what channels showed before any framing; "cover before" =
cover's largest window, the rule before ``avatar.face_fraction``; "cover" = the window sized on the
face, ``--face-fraction`` and ``--min-face-px`` as ``avatar.face_fraction`` and ``avatar.min_face_px``;
contain), the frame 1 s in as a channel of that size shows it, labelled with the window and the face's
width on air (docs/avatars.md "Framing").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentsync.avatar import Avatar, AvatarSettings  # noqa: E402
from latentsync.engines import CHUNK_FRAMES, ChunkRequest, create_engine  # noqa: E402
from latentsync.media import decode_audio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_AUDIO = ROOT / "tests" / "data" / "media" / "audio" / "demo1_audio.wav"


def _crop(frame: np.ndarray, box: np.ndarray, side_px: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2 + 0.1 * (y1 - y0), 0.75 * max(x1 - x0, y1 - y0)
    m = np.array(
        [
            [side_px / (2 * half), 0, -(cx - half) * side_px / (2 * half)],
            [0, side_px / (2 * half), -(cy - half) * side_px / (2 * half)],
        ]
    )
    size = (side_px, side_px)
    return cv2.warpAffine(frame, m, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def contact_sheet(video: Path, audio_path: Path, out_dir: Path, cache_dir: Path, columns: int = 6) -> Path:
    avatar = Avatar.prepare(video, AvatarSettings(fps=25), cache_dir, progress=True)
    audio = decode_audio(audio_path, 16000).astype(np.float32) / 32768.0
    engine = create_engine("parametric", None, avatar)
    engine.load()
    feats = engine.features(audio)
    # The most open moments, spread over the clip (at least 8 frames apart).
    chosen: list[int] = []
    for k in np.argsort(-feats[:, 0]):
        if all(abs(int(k) - c) >= 8 for c in chosen):
            chosen.append(int(k))
        if len(chosen) == columns:
            break
    chosen.sort()
    idle_row, speak_row = [], []
    for k in chosen:
        base = avatar.frame_index(k)
        idx = np.full(CHUNK_FRAMES, base)
        chunk = np.repeat(feats[k : k + 1], CHUNK_FRAMES, axis=0)
        result = engine.generate(ChunkRequest(task_id="sheet", chunk_index=k, frame_indices=idx, features=chunk))
        frame = avatar.paste(base, result.faces[0])
        idle_row.append(_crop(np.asarray(avatar.frames[base]), avatar.boxes[base], 256))
        speak_row.append(_crop(frame, avatar.boxes[base], 256))
    engine.close()
    sheet = np.vstack([np.hstack(idle_row), np.hstack(speak_row)])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"contact_{video.stem}.png"
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


#: The sheet's columns: label, ``avatar.fit``, whether ``face_fraction`` sizes the cover window.
COLUMNS = (
    ("stretch", "stretch", False),
    ("cover before", "cover", False),
    ("cover", "cover", True),
    ("contain", "contain", True),
)
CELL_PX = 320


def framing_sheet(
    video: Path, sizes: list[tuple[int, int]], out_dir: Path, face_fraction: float = 0.3, min_face_px: int = 96
) -> Path:
    """One row per channel size, one column per framing (:data:`COLUMNS`); each cell fits in CELL_PX, labelled.

    Args:
        video: The presenter video.
        sizes: Channel ``(width, height)`` sizes in pixels.
        out_dir: Where ``framing_<stem>.png`` is written.
        face_fraction: ``avatar.face_fraction`` for the "cover" column.
        min_face_px: ``avatar.min_face_px`` for the "cover" column.

    Returns:
        The PNG's path.
    """
    from latentsync.framing_plan import load_clip

    rows = []
    for size in sizes:
        cells = []
        for label, fit, sized in COLUMNS:
            clip = load_clip(
                video,
                1,
                16000,
                size,
                with_audio=False,
                fit=fit,
                face_fraction=face_fraction if sized else None,
                min_face_px=min_face_px if sized else 0,
            )
            frame = clip.frames[min(1, clip.num_frames - 1)]
            scale = CELL_PX / max(size)
            small = cv2.resize(frame, (round(size[0] * scale), round(size[1] * scale)), interpolation=cv2.INTER_AREA)
            cell = np.full((CELL_PX + 40, CELL_PX + 8, 3), 32, np.uint8)
            y, x = 40 + (CELL_PX - small.shape[0]) // 2, 4 + (CELL_PX - small.shape[1]) // 2
            cell[y : y + small.shape[0], x : x + small.shape[1]] = small
            framing, note = clip.framing, ""
            if framing is not None and framing.face is not None and framing.crop is not None:
                face_px = framing.face.width * size[0] / framing.crop[2]
                note = f"window {framing.crop[2]}x{framing.crop[3]}, face {face_px:.0f} px"
            for line, text in enumerate((f"{label} {size[0]}x{size[1]}", note)):
                cv2.putText(
                    cell, text, (6, 15 + 17 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA
                )
            cells.append(cell)
        rows.append(np.hstack(cells))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"framing_{video.stem}.png"
    cv2.imwrite(str(out), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", type=Path, nargs="+")
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "out")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "avatars")
    parser.add_argument("--framing", nargs="+", metavar="WxH", help="framing sheet for these channel sizes")
    parser.add_argument("--face-fraction", type=float, default=0.3, help="avatar.face_fraction (--framing)")
    parser.add_argument("--min-face-px", type=int, default=96, help="avatar.min_face_px (--framing)")
    args = parser.parse_args(argv)
    if args.framing:
        sizes = [(int(w), int(h)) for w, h in (s.split("x") for s in args.framing)]
        for video in args.videos:
            print(framing_sheet(video, sizes, args.out_dir, args.face_fraction, args.min_face_px))
        return 0
    for path in (args.audio, *args.videos):
        if not path.is_file():
            print(f"file missing: {path}", file=sys.stderr)
            return 2
    for video in args.videos:
        print(contact_sheet(video, args.audio, args.out_dir, args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
