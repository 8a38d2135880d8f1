"""Decoded frames on disk: a ``.npy`` file written batch by batch and read frame by frame.

An avatar's base video can be a minute of 1080p: 9.3 GB of RGB frames at 25 fps. Its preparation
never holds them all (docs/avatars.md, "Memory"): :class:`FrameFileWriter` appends each decoded
batch to ``frames.npy`` as it arrives (the header, with the frame count, is written last), and
:class:`FrameFile` reads one frame at a time with ``pread`` into a fresh array (no memory map: the
pages of a mapped file count in the process's resident set while it stays mapped).

The file is an ordinary ``(F, H, W, 3) uint8`` ``.npy`` (format 1.0), so ``np.load(mmap_mode="r")``
reads it like one written by ``np.save``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

#: Bytes of the ``.npy`` preamble and header reserved at the start of the file (a multiple of 64,
#: as numpy aligns the data); a shape of four numbers of up to 15 digits each fits.
HEADER_BYTES = 128
_MAGIC = b"\x93NUMPY\x01\x00"


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` 1.0 preamble and header of a C-ordered uint8 array of ``shape``, padded to :data:`HEADER_BYTES`."""
    dims = ", ".join(str(int(s)) for s in shape)
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({dims}), }}"
    room = HEADER_BYTES - len(_MAGIC) - 2 - 1  # the length field, and the closing newline
    if len(text) > room:
        raise ValueError(f"shape {shape} does not fit a {HEADER_BYTES}-byte .npy header")
    body = text.ljust(room).encode("latin1") + b"\n"
    return _MAGIC + struct.pack("<H", len(body)) + body


class FrameFileWriter:
    """Writes ``(H, W, 3) uint8`` frames to a ``.npy`` file as they come, in order.

    Use as a context manager: on a clean exit the header is written with the number of frames
    (a file with no frames is an error); on an exception the partial file is left for the caller
    to delete (it has no valid header).

    Args:
        path: The file (created or truncated).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.num_frames = 0
        self.frame_shape: tuple[int, int, int] | None = None  # (H, W, 3) of the first batch
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(b"\0" * HEADER_BYTES)

    def write(self, batch: np.ndarray) -> None:
        """Append frames.

        Args:
            batch: ``(k, H, W, 3) uint8`` frames, all the size of the first batch.

        Raises:
            ValueError: For another dtype, rank or frame size than the first batch.
        """
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
            raise ValueError(f"frames must be (k, H, W, 3) uint8, got {batch.shape} {batch.dtype}")
        shape = (int(batch.shape[1]), int(batch.shape[2]), 3)
        if self.frame_shape is None:
            self.frame_shape = shape
        elif shape != self.frame_shape:
            raise ValueError(f"frame size changed from {self.frame_shape} to {shape}")
        self._file.write(memoryview(np.ascontiguousarray(batch)).cast("B"))
        self.num_frames += int(batch.shape[0])

    def close(self) -> None:
        """Write the header (the frame count) and close. Safe to call twice.

        Raises:
            ValueError: If no frame was written.
        """
        if self._file.closed:
            return
        try:
            if self.frame_shape is None:
                raise ValueError(f"{self.path.name}: no frames written")
            self._file.seek(0)
            self._file.write(_npy_header((self.num_frames, *self.frame_shape)))
        finally:
            self._file.close()

    def __enter__(self) -> FrameFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


class FrameFile:
    """Reads the frames of a ``(F, H, W, 3) uint8`` ``.npy`` file one at a time, without mapping it.

    Behaves as a read-only sequence of frames (``len``, ``frames[i]``, ``shape``), so code written
    for an array of frames (face tracking) reads it unchanged; each ``frames[i]`` is a new
    ``(H, W, 3) uint8`` array read with ``pread``, so memory stays at one frame however long the clip.
    Use as a context manager or call :meth:`close`.

    Args:
        path: A ``.npy`` file of ``(F, H, W, 3) uint8`` C-ordered frames (:class:`FrameFileWriter`, ``np.save``).

    Raises:
        ValueError: If the file holds another kind of array.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                raise ValueError(f"{self.path.name}: .npy version {version}, expected 1.0")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{self.path.name}: not (F, H, W, 3) uint8 frames: {shape} {dtype}")
        self.shape: tuple[int, int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self._offset = offset
        self._frame_bytes = self.shape[1] * self.shape[2] * 3
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        """Frame ``index`` (negative counts from the end) as a new ``(H, W, 3) uint8`` array.

        Raises:
            IndexError: Outside ``[-F, F)``.
            OSError: If the file is shorter than its header says.
        """
        n = self.shape[0]
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"frame {index} of {n}")
        frame = np.empty(self.shape[1:], np.uint8)
        view = memoryview(frame).cast("B")
        got = 0
        while got < self._frame_bytes:
            count = os.preadv(self._fd, [view[got:]], self._offset + i * self._frame_bytes + got)
            if count == 0:
                raise OSError(f"{self.path.name}: frame {i} is cut short")
            got += count
        return frame

    def close(self) -> None:
        """Close the file. Safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FrameFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
