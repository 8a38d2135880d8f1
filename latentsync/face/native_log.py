"""Keep MediaPipe's and TensorFlow Lite's native log lines out of the console at the default level.

MediaPipe's C++ graph (absl logging: ``W0000 00:00:... inference_feedback_manager.cc:114] ...``) and
TensorFlow Lite (``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``) write straight to file
descriptor 2, below Python's logging. While face tracking runs, :class:`NativeLogCapture` points
descriptor 2 at a pipe: lines in those native formats become DEBUG records of the ``mediapipe``
logger (shown with ``log.level=DEBUG``); everything else (a progress bar, a Python traceback) is
passed through unchanged to the real stderr.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

logger = logging.getLogger("mediapipe")

#: Line starts of native log output: absl/glog (``W0000 00:00:1795290425.192037 ...``), TensorFlow
#: Lite's minimal logger (``INFO: ...``), and absl's pre-initialisation notice.
NATIVE_LINE = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d\d[.\d]*\s+\d+ \S+:\d+\]"
    rb"|(?:INFO|WARNING|ERROR): (?:Created TensorFlow Lite|All log messages before absl|Logging before)"
    rb"|WARNING: All log messages)"
)
#: Seconds to wait for the pipe reader after descriptor 2 is restored.
READER_JOIN_TIMEOUT_S = 5.0


class NativeLogCapture:
    """Context manager that routes native writes to descriptor 2 into logging while it is entered.

    Descriptor 2 is process-wide: enter it around work that runs one at a time per process (avatar
    preparation), not concurrently from several threads.
    """

    def __init__(self) -> None:
        self._saved_fd: int | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> NativeLogCapture:
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = threading.Thread(target=self._pump, args=(read_fd,), name="native-log", daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved_fd is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)  # drops the pipe's last write end (unless a child inherited it)
        assert self._reader is not None
        self._reader.join(READER_JOIN_TIMEOUT_S)
        if self._reader.is_alive():  # a child process holds the pipe: let the reader finish with it
            logger.debug("native log pipe still held by a child process; its reader keeps running")
        else:
            os.close(self._saved_fd)
        self._saved_fd = None

    def _pump(self, read_fd: int) -> None:
        saved_fd = self._saved_fd
        pending = b""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *segments, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
                for segment in segments:
                    self._emit(segment, saved_fd)
        if pending:
            self._emit(pending, saved_fd)

    @staticmethod
    def _emit(segment: bytes, saved_fd: int) -> None:
        if NATIVE_LINE.match(segment):
            logger.debug("%s", segment.decode("utf-8", errors="replace").rstrip())
            return
        try:
            os.write(saved_fd, segment)
        except OSError:  # stderr closed under us: nothing sensible left to do with the text
            pass
