#!/usr/bin/env python3
"""Generate the bad-input corpus for ``POST /generate_video`` (deterministic, seeded).

    .venv/bin/python scripts/make_bad_inputs.py tests/data/bad_inputs [--large-mb 60]

Every file is made from the real recordings in ``tests/data/media/audio`` with FFmpeg, numpy and the
stdlib ``wave`` module. ``OUT_DIR/manifest.json`` lists each file with the answer the server gives
it with its default limits (``api.max_audio_s`` 300 s, ``api.max_upload_mb`` 50 MB): the HTTP
status, the error code (None for 202) and what the file is. The ``--large-mb`` upload must be larger
than the server's ``api.max_upload_mb``; every other file stays far below 50 MB.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "media"
SPEECH = "audio/7s_shan_0801_01.wav"  # 7.1 s, 48 kHz mono s16
SHORT_SPEECH = "audio/4s_Wavfile_1719704064_11.wav"  # 4.2 s, 16 kHz mono s16
SEED = 20250801
LONG_CLIP_S = 20 * 60  # the too-long clip: 20 minutes
LONG_CLIP_RATE_HZ = 8000  # 8 kHz mono s16: 16 kB/s, ~19.2 MB for 20 minutes
DEFAULT_MAX_UPLOAD_MB = 50.0  # the server's default api.max_upload_mb


@dataclass(frozen=True)
class Entry:
    """One corpus file and the answer expected for it.

    Attributes:
        file: File name inside the corpus folder (also the multipart filename sent).
        status: Expected HTTP status of ``POST /generate_video``.
        code: Expected ``error.code`` (None when the upload is accepted with 202).
        audio_s: Expected decoded audio duration in seconds of an accepted upload (None if rejected).
        size_bytes: File size in bytes.
        what: One-line description.
        reads: For a hostile upload: the file it makes a permissive FFmpeg read (relative to the
            corpus folder when not absolute), or None.
    """

    file: str
    status: int
    code: str | None
    audio_s: float | None
    size_bytes: int
    what: str
    reads: str | None = None


def ffmpeg(*args: str) -> None:
    """Run FFmpeg quietly; raises ``CalledProcessError`` on failure."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV.

    Returns:
        ``((N, C) int16 samples, sample rate in Hz)``.
    """
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, f"{path}: expected 16-bit PCM"
        raw = w.readframes(w.getnframes())
        return np.frombuffer(raw, "<i2").reshape(-1, w.getnchannels()), w.getframerate()


def wav_bytes(samples: np.ndarray, rate_hz: int, sample_width: int = 2) -> bytes:
    """A PCM WAV file in memory.

    Args:
        samples: ``(N,)`` or ``(N, C)`` array already in the target sample format
            (uint8 for width 1, int16 for width 2).
        rate_hz: Sample rate in Hz.
        sample_width: Bytes per sample (1 or 2).

    Returns:
        The file's bytes.
    """
    frames = samples.reshape(len(samples), -1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(sample_width)
        w.setframerate(rate_hz)
        w.writeframes(np.ascontiguousarray(frames).tobytes())
    return buf.getvalue()


def float_wav_bytes(samples: np.ndarray, rate_hz: int) -> bytes:
    """A mono 32-bit IEEE float WAV (format tag 3, which ``wave`` cannot write), built by hand.

    Args:
        samples: ``(N,) float32`` in [-1, 1].
        rate_hz: Sample rate in Hz.
    """
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate_hz, rate_hz * 4, 4, 32)
    fact = struct.pack("<I", len(samples))
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4) + fact
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def lying_header_wav(samples: np.ndarray, rate_hz: int, claimed_bytes: int) -> bytes:
    """A mono 16-bit WAV whose RIFF and data sizes claim ``claimed_bytes`` of samples it does not hold."""
    real = wav_bytes(samples, rate_hz)
    data_at = real.index(b"data") + 4
    header = bytearray(real[: data_at + 4])
    header[4:8] = struct.pack("<I", min(claimed_bytes + data_at - 4, 0xFFFFFFFF))
    header[data_at : data_at + 4] = struct.pack("<I", claimed_bytes)
    return bytes(header) + real[data_at + 4 :]


def png_bytes(rng: np.random.Generator) -> bytes:
    """A small valid PNG (64x64 RGB noise)."""
    import cv2

    ok, buf = cv2.imencode(".png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


_MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"dinf"}


def _alias_dref_entry(target: Path) -> bytes:
    """A QuickTime ``alis`` data-reference entry naming ``target`` (Mac alias record, version 2).

    Layout after the entry's size/type/flags (Apple QuickTime File Format, "Data reference atoms";
    the fields FFmpeg's ``mov`` demuxer reads): 10 reserved bytes, volume name (length byte + 27),
    12 bytes, file name (length byte + 63), 16 bytes, nlvl_from/nlvl_to (int16 each; 1/1: the
    target lies in the movie's own folder), 16 bytes, then tagged records (type 2: absolute path)
    ending with type -1.
    """
    path = str(target).encode()
    body = bytes(10) + bytes(1 + 27) + bytes(12) + bytes([len(target.name)]) + target.name.encode().ljust(63, b"\0")
    body += bytes(16) + struct.pack(">hh", 1, 1) + bytes(16)
    body += struct.pack(">HH", 2, len(path)) + path.ljust(len(path) + (len(path) & 1), b"\0")
    body += struct.pack(">hH", -1, 0)
    return struct.pack(">I4sI", 12 + len(body), b"alis", 0) + body


def external_dref_mp4(mp4: bytes, target: Path) -> bytes:
    """An MP4 whose audio samples live in ``target``: its ``dref`` names that file, its own ``mdat`` is zeroed.

    ``target`` must be the MP4 the boxes came from (same sample offsets). FFmpeg reads it only with
    ``-enable_drefs 1`` and a protocol that can open it.
    """

    def walk(buf: bytes) -> bytes:
        out, i = b"", 0
        while i < len(buf):
            size, kind = struct.unpack(">I4s", buf[i : i + 8])
            body = buf[i + 8 : i + size]
            if kind in _MP4_CONTAINERS:
                body = walk(body)
            elif kind == b"dref":
                body = struct.pack(">II", 0, 1) + _alias_dref_entry(target)
            elif kind == b"mdat":
                kind, body = b"free", bytes(len(body))
            out += struct.pack(">I4s", 8 + len(body), kind) + body
            i += size
        return out

    return walk(mp4)


def make_corpus(out_dir: Path, large_mb: float, data_dir: Path = DATA) -> list[Entry]:
    """Write every corpus file and ``manifest.json`` into ``out_dir``.

    Args:
        out_dir: Destination folder (created).
        large_mb: Size of the oversized random upload in MB (1 MB = 2**20 bytes); must exceed the
            server's ``api.max_upload_mb``.
        data_dir: The media folder holding ``audio/*.wav``.

    Returns:
        The manifest entries, in posting order.

    Raises:
        FileNotFoundError: If a recording is missing.
    """
    speech_path, short_path = data_dir / SPEECH, data_dir / SHORT_SPEECH
    for path in (speech_path, short_path):
        if not path.is_file():
            raise FileNotFoundError(f"recording missing: {path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    speech, rate = read_wav(speech_path)  # (N, 1) int16 at 48 kHz
    mono = speech[:, 0]
    entries: list[Entry] = []

    speech_s = round(len(mono) / rate, 3)

    def add(name: str, content: bytes, status: int, code: str | None, what: str, audio_s: float | None = None) -> None:
        (out_dir / name).write_bytes(content)
        entries.append(Entry(name, status, code, audio_s, len(content), what))

    def add_encoded(name: str, what: str, *args: str) -> None:  # always the whole speech clip, accepted
        ffmpeg("-i", str(speech_path), *args, "-fflags", "+bitexact", "-map_metadata", "-1", str(out_dir / name))
        entries.append(Entry(name, 202, None, speech_s, (out_dir / name).stat().st_size, what))

    # Broken or non-audio uploads.
    add("empty.wav", b"", 400, "empty_file", "zero bytes")
    text = "".join(f"line {i}: this is plain text, not a RIFF/WAVE file\n" for i in range(200))
    add("text.wav", text.encode(), 400, "not_audio", "a text file named .wav")
    add("image.png", png_bytes(rng), 400, "not_audio", "a 64x64 PNG image")
    full = wav_bytes(mono, rate)
    add(
        "truncated.wav",
        full[: 44 + int(0.5 * rate) * 2],
        202,
        None,
        "WAV header claiming 7.1 s, cut after 0.5 s of samples (decodes to 0.5 s)",
        0.5,
    )
    two_s = mono[: 2 * rate]
    add(
        "lying_header_4gb.wav",
        lying_header_wav(two_s, rate, 0xFFFFFFFF - 64),
        202,
        None,
        "WAV header claiming ~4 GB of samples; holds 2 s (decodes to 2 s)",
        2.0,
    )
    # Unusual but valid WAV formats.
    u8 = ((mono.astype(np.int32) >> 8) + 128).astype(np.uint8)
    add("pcm_u8.wav", wav_bytes(u8, rate, sample_width=1), 202, None, "8-bit unsigned PCM, 48 kHz mono", speech_s)
    add(
        "float32.wav",
        float_wav_bytes(mono.astype(np.float32) / 32768.0, rate),
        202,
        None,
        "32-bit IEEE float, 48 kHz mono",
        speech_s,
    )
    add_encoded("96k_6ch.wav", "16-bit PCM, 96 kHz, 6 channels (5.1)", "-ac", "6", "-ar", "96000", "-c:a", "pcm_s16le")
    # Lengths at and beyond the limits.
    add(
        "tiny_10ms.wav",
        wav_bytes(mono[rate // 2 : rate // 2 + rate // 100], rate),
        400,
        "too_short",
        "0.01 s (under one 25 fps frame)",
    )
    short, short_rate = read_wav(short_path)
    short8 = np.frombuffer(_resample_s16(short[:, 0], short_rate, LONG_CLIP_RATE_HZ), "<i2")
    reps = -(-LONG_CLIP_S * LONG_CLIP_RATE_HZ // len(short8))
    long_clip = np.tile(short8, reps)[: LONG_CLIP_S * LONG_CLIP_RATE_HZ]
    add(
        "long_20min.wav",
        wav_bytes(long_clip, LONG_CLIP_RATE_HZ),
        400,
        "too_long",
        "20 minutes, 8 kHz mono 16-bit (~19 MB: rejected for its length, not its size)",
    )
    # Good compressed formats.
    add_encoded("good.mp3", "MP3 (libmp3lame, 128 kb/s)", "-c:a", "libmp3lame", "-b:a", "128k")
    add_encoded("good.ogg", "Ogg/Opus (libopus, 64 kb/s)", "-c:a", "libopus", "-b:a", "64k")
    add_encoded("good.flac", "FLAC", "-c:a", "flac")
    add_encoded("good.m4a", "M4A/AAC (128 kb/s)", "-c:a", "aac", "-b:a", "128k")
    add_encoded("good.aac", "raw ADTS AAC (128 kb/s)", "-c:a", "aac", "-b:a", "128k")
    add_encoded("good.webm", "WebM/Opus (what a browser's MediaRecorder makes)", "-c:a", "libopus", "-b:a", "64k")
    # Hostile uploads: files that make FFmpeg read something other than themselves. Each "reads"
    # a real target (a permissive FFmpeg decodes audio through it); the server must read nothing.
    wav_target, m4a_target, aac_target = (
        speech_path.resolve(),
        (out_dir / "good.m4a").resolve(),
        (out_dir / "good.aac").resolve(),
    )

    def hostile(name: str, content: bytes, what: str, reads: Path | str | None) -> None:
        (out_dir / name).write_bytes(content)
        entries.append(Entry(name, 400, "not_audio", None, len(content), what, None if reads is None else str(reads)))

    hostile(
        "ffconcat_fifo.txt",
        b"ffconcat version 1.0\nfile video-0.fifo\n",
        "ffconcat list naming the stream's video FIFO beside the upload (issue 10's payload)",
        None,
    )
    hostile(
        "ffconcat_abs.txt",
        f"ffconcat version 1.0\nfile '{wav_target}'\n".encode(),
        "ffconcat list naming a local WAV by absolute path",
        wav_target,
    )
    hostile(
        "ffconcat_file_url.ffconcat",
        f"ffconcat version 1.0\nfile 'file:{wav_target}'\n".encode(),
        "ffconcat list naming a local WAV as a file: URL",
        wav_target,
    )
    mpd = (
        f'<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
        f'mediaPresentationDuration="PT7S" minBufferTime="PT1S" '
        f'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011">'
        f'<Period><AdaptationSet mimeType="audio/mp4"><Representation id="0" bandwidth="128000" codecs="mp4a.40.2" '
        f'audioSamplingRate="48000"><BaseURL>{m4a_target}</BaseURL></Representation></AdaptationSet></Period></MPD>\n'
    )
    hostile("dash_baseurl.mpd", mpd.encode(), "DASH manifest whose BaseURL is a local M4A's absolute path", m4a_target)
    hls = f"#EXTM3U\n#EXT-X-TARGETDURATION:8\n#EXTINF:7.1,\n{aac_target}\n#EXT-X-ENDLIST\n"
    hostile("hls_local.m3u8", hls.encode(), "HLS playlist naming a local AAC segment by absolute path", aac_target)
    hls_zero = "#EXTM3U\n#EXT-X-TARGETDURATION:8\n#EXTINF:7.1,\nfile:///dev/zero\n#EXT-X-ENDLIST\n"
    hostile("hls_dev_zero.m3u8", hls_zero.encode(), "HLS playlist naming /dev/zero", None)
    hostile(
        "concat_dev_zero.txt",
        b"ffconcat version 1.0\nfile /dev/zero\nfile /dev/zero\n",
        "ffconcat list naming /dev/zero",
        None,
    )
    hostile(
        "dref_external.mp4",
        external_dref_mp4(m4a_target.read_bytes(), m4a_target),
        "MP4 whose only audio samples are in another file (an alis data reference to good.m4a)",
        m4a_target,
    )
    # Too large a request body.
    large = rng.integers(0, 256, int(large_mb * 2**20), dtype=np.uint8).tobytes()
    add("large_random.bin", large, 413, "too_large", f"{large_mb:g} MB of random bytes (over api.max_upload_mb)")

    for entry in entries:
        if entry.file != "large_random.bin" and entry.size_bytes >= DEFAULT_MAX_UPLOAD_MB * 2**20:
            raise AssertionError(f"{entry.file} is {entry.size_bytes} bytes: over the default upload limit")
    manifest = {
        "seed": SEED,
        "large_mb": large_mb,
        "assumes": "api.max_audio_s < 20 min (default 300 s), api.max_upload_mb < large_mb, stream.fps 25",
        "files": [asdict(e) for e in entries],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return entries


def _resample_s16(samples: np.ndarray, rate_hz: int, to_rate_hz: int) -> bytes:
    """Resample mono int16 with FFmpeg; returns raw ``s16le`` bytes."""
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-f",
        "s16le",
        "-ar",
        str(rate_hz),
        "-ac",
        "1",
        "-i",
        "pipe:0",
        "-ar",
        str(to_rate_hz),
        "-f",
        "s16le",
        "pipe:1",
    ]
    proc = subprocess.run(cmd, input=samples.astype("<i2").tobytes(), capture_output=True, check=True, timeout=60)
    return proc.stdout


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--large-mb",
        type=float,
        default=60.0,
        help="size of the oversized random upload in MB (default 60; above api.max_upload_mb)",
    )
    args = parser.parse_args()
    entries = make_corpus(args.out_dir, args.large_mb)
    width = max(len(e.file) for e in entries)
    for e in entries:
        print(f"{e.file:<{width}}  {e.size_bytes:>10}  {e.status} {e.code or '-':<12} {e.what}")
    print(f"manifest: {args.out_dir / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
