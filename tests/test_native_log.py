"""MediaPipe/TFLite native log lines become DEBUG records; other stderr text passes through."""

from __future__ import annotations

import logging
import os

from latentsync.face.native_log import NativeLogCapture

ABSL = (
    b"W0000 00:00:1795290425.192037    9284 inference_feedback_manager.cc:114] Feedback manager "
    b"requires a model with a single signature inference. Disabling support for feedback tensors.\n"
)
TFLITE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
PRE_INIT = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"


def test_native_lines_are_debug_records_and_other_text_passes_through(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="mediapipe")
    with NativeLogCapture():
        for line in (TFLITE, PRE_INIT, ABSL):
            os.write(2, line)  # as the C++ code does: below Python, straight to descriptor 2
        os.write(2, b"progress 50%\r")
        os.write(2, b"Traceback (most recent call last):\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert err == "progress 50%\rTraceback (most recent call last):\nafter\n"
    records = [r for r in caplog.records if r.name == "mediapipe"]
    assert [r.levelno for r in records] == [logging.DEBUG] * 3
    assert [r.getMessage() for r in records] == [line.decode().rstrip() for line in (TFLITE, PRE_INIT, ABSL)]


def test_exit_restores_descriptor_2_and_is_safe_twice(capfd):
    capture = NativeLogCapture()
    with capture:
        pass
    capture.__exit__(None, None, None)
    os.write(2, TFLITE)
    assert capfd.readouterr().err == TFLITE.decode()
