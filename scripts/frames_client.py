#!/usr/bin/env python3
"""Reference client of the frames WebSocket (docs/frames-protocol.md): receive the program, write an MP4.

    .venv/bin/python scripts/frames_client.py --format h264 --seconds 10 --out live.mp4
    .venv/bin/python scripts/frames_client.py --url ws://host:11001/channels/shop2/ws/frames \\
        --token "$TOKEN" --format jpeg --width 256 --out shop2.mp4 --index shop2.jsonl --wav shop2.wav

The MP4 keeps the server's timeline: every frame at its tick's PTS (a tick the client lost is a gap,
the previous frame stays on screen) and the audio with silence in place of lost ticks. JPEG frames
go into the MP4 as they came (MJPEG), H.264 access units too (stream copy); rgb24 frames are
encoded to H.264. ``--index`` writes one JSON line per message header, ``--wav`` the exact PCM.
While it runs, the live count of ticks received and lost is shown on stderr; at the end one JSON
summary goes to stdout.

The protocol is spoken by the Python client (clients/python, ``latentsync_client``); this script only
writes files.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np

# this checkout's client first (requirements.txt also installs it into .venv, editable)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python" / "src"))

from latentsync_client import Frame, FramesStream, LatentSyncError, StreamClosed, VideoFormat  # noqa: E402


class Mp4Writer:
    """Muxes received ticks into an MP4 with PyAV (video at the tick's PTS, AAC audio)."""

    def __init__(self, path: Path, ready: dict):
        self.fps = int(ready["fps"])
        self.rate = int(ready["sample_rate_hz"])
        self.format = VideoFormat[ready["format"]]
        self.width, self.height = int(ready["width"]), int(ready["height"])
        self.container = av.open(str(path), "w")
        tb = fractions.Fraction(1, self.fps)
        if self.format is VideoFormat.rgb24:
            self.video = self.container.add_stream("libx264", rate=self.fps)
            self.video.pix_fmt = "yuv420p"
            self.video.options = {"crf": "18", "preset": "veryfast", "tune": "zerolatency"}
        else:  # stream copy of what the server sent
            self.video = self.container.add_stream(
                "mjpeg" if self.format is VideoFormat.jpeg else "h264", rate=self.fps
            )
            self.video.pix_fmt = "yuvj420p" if self.format is VideoFormat.jpeg else "yuv420p"
        self.video.width, self.video.height = self.width - self.width % 2, self.height - self.height % 2
        self.video.time_base = tb
        self.audio = None
        if ready["audio"] != "none":
            self.audio = self.container.add_stream("aac", rate=self.rate)
            self.audio.layout = "mono"
        self.first_tick: int | None = None
        self.samples_written = 0

    def audio_position(self, tick: int) -> int:
        """Samples before ``tick`` on the stream: ``floor(tick * sample_rate / fps)`` (docs/frames-protocol.md)."""
        return tick * self.rate // self.fps

    def write(self, header, video: memoryview, audio: memoryview) -> None:
        if self.first_tick is None:
            self.first_tick = header.tick
        pts = header.tick - self.first_tick
        if self.format is VideoFormat.rgb24:
            rgb = np.frombuffer(video, np.uint8).reshape(header.height, header.width, 3)
            frame = av.VideoFrame.from_ndarray(rgb[: self.video.height, : self.video.width], format="rgb24")
            frame.pts = pts
            frame.time_base = fractions.Fraction(1, self.fps)
            for packet in self.video.encode(frame):
                self.container.mux(packet)
        else:
            packet = av.Packet(bytes(video))
            packet.stream = self.video
            packet.pts = packet.dts = pts
            packet.time_base = fractions.Fraction(1, self.fps)
            packet.is_keyframe = header.keyframe
            self.container.mux(packet)
        if self.audio is not None:
            start = self.audio_position(header.tick) - self.audio_position(self.first_tick)
            samples = np.frombuffer(audio, "<i2")
            if start > self.samples_written:  # ticks lost: silence keeps the audio on the video's timeline
                samples = np.concatenate([np.zeros(start - self.samples_written, np.int16), samples])
            self._write_audio(samples)

    def _write_audio(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self.samples_written
        frame.time_base = fractions.Fraction(1, self.rate)
        self.samples_written += len(samples)
        for packet in self.audio.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.format is VideoFormat.rgb24:
            for packet in self.video.encode(None):
                self.container.mux(packet)
        if self.audio is not None:
            for packet in self.audio.encode(None):
                self.container.mux(packet)
        self.container.close()


async def receive(args: argparse.Namespace, summary: dict) -> None:
    """Connect, write every tick until ``--seconds`` of them; a close by the server ends it (in ``summary``)."""
    stream = FramesStream.from_url(
        args.url, token=args.token, format=args.format, width=args.width, height=args.height, audio=args.audio
    )
    writer = index = wav = None
    try:
        await stream.connect()
        assert stream.ready is not None
        ready = stream.ready.raw
        summary["ready"] = ready
        want_ticks = int(round(args.seconds * ready["fps"]))
        writer = Mp4Writer(args.out, ready)
        index = args.index.open("w") if args.index else None
        if args.wav:
            wav = wave.open(str(args.wav), "wb")
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(ready["sample_rate_hz"])
        last_shown = time.monotonic()
        first = last = None
        async for frame in stream:
            assert isinstance(frame, Frame)  # no reconnect: nothing else comes
            header = frame.header
            if first is None:
                first = header.tick
            elif header.dropped_ticks and wav is not None:
                silence = writer.audio_position(header.tick) - writer.audio_position(last + 1)
                wav.writeframes(bytes(2 * silence))
            last = header.tick
            summary["ticks"] += 1
            summary["lost_ticks"] += header.dropped_ticks
            summary["keyframes"] += int(header.keyframe)
            writer.write(header, memoryview(frame.video), memoryview(frame.audio))
            if wav is not None:
                wav.writeframes(frame.audio)
            if index is not None:
                row = {
                    "tick": header.tick,
                    "pts_us": header.pts_us,
                    "state": header.state.name,
                    "task_id": header.task_id,
                    "keyframe": header.keyframe,
                    "dropped_ticks": header.dropped_ticks,
                    "width": header.width,
                    "height": header.height,
                    "video_bytes": header.video_bytes,
                    "audio_bytes": header.audio_bytes,
                    "sample_rate_hz": header.sample_rate_hz,
                }
                index.write(json.dumps(row) + "\n")
            if not args.quiet and time.monotonic() - last_shown >= 1.0:
                last_shown = time.monotonic()
                print(f"\r{summary['ticks']} ticks, {summary['lost_ticks']} lost", end="", file=sys.stderr, flush=True)
            if summary["ticks"] >= want_ticks:
                break
        summary.update(first_tick=first, last_tick=last)
    except StreamClosed as exc:
        summary.update(close_code=exc.close_code, close_reason=exc.reason)
    finally:
        await stream.close()
        for thing in (writer, index, wav):
            if thing is not None:
                thing.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:11001/ws/frames", help="the frames WebSocket's URL")
    parser.add_argument("--token", default=None, help="API token (sent as Authorization: Bearer)")
    parser.add_argument("--format", choices=[f.name for f in VideoFormat], default="jpeg")
    parser.add_argument("--width", type=int, default=None, help="frame width (default: the channel's)")
    parser.add_argument("--height", type=int, default=None, help="frame height (default: the channel's)")
    parser.add_argument("--audio", choices=["pcm_s16le", "none"], default="pcm_s16le")
    parser.add_argument("--seconds", type=float, default=10.0, help="stop after this many seconds of ticks")
    parser.add_argument("--out", type=Path, required=True, help="the MP4 to write")
    parser.add_argument("--index", type=Path, default=None, help="also write one JSON line per header here")
    parser.add_argument(
        "--wav", type=Path, default=None, help="also write the received PCM here (silence for lost ticks)"
    )
    parser.add_argument("--quiet", action="store_true", help="no live count on stderr")
    args = parser.parse_args(argv)

    summary: dict = {"ticks": 0, "lost_ticks": 0, "keyframes": 0, "close_code": None, "close_reason": None}
    try:
        asyncio.run(receive(args, summary))
    except LatentSyncError as exc:  # refused at the handshake (401, 404, 429, 503...) or unreachable
        print(f"frames_client: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(file=sys.stderr)
    print(json.dumps(summary))
    return 0 if summary["close_code"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
