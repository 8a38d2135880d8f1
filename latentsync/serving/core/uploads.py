"""An uploaded body stored under our own name, alone in a private folder, and deleted after use.

Speech uploads (``latentsync.serving.ingest.upload_source``) and avatar uploads (``POST /avatars``)
are stored the same way: the client's file name is never used as a path; each upload gets a fresh
folder (mode 0700) that holds nothing else, so a file that names a sibling (a concat list, a
playlist, an MP4 data reference) finds nothing; the folder is deleted when the caller is done,
whatever happened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from latentsync.serving.core.errors import ServingError

__all__ = ["UploadBody", "stored_upload"]


class UploadBody(Protocol):
    """A received upload that can write itself to a path (werkzeug's ``FileStorage``)."""

    def save(self, dst: str | os.PathLike[str]) -> None:
        """Write the whole body to ``dst``."""
        ...


def storage_error(exc: OSError) -> ServingError:
    """The refusal for an upload that could not be written: ``insufficient_storage`` when the disk is full."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ServingError("insufficient_storage", "no space left to store the upload; try again later")
    return ServingError("upload_failed", f"could not store the upload: {exc.strerror or exc}")


@contextlib.contextmanager
def stored_upload(body: UploadBody, root: Path) -> Iterator[Path]:
    """``body`` saved as ``<root>/u-<random>/upload``; the folder is deleted on leaving, whatever happens.

    Args:
        body: The received upload.
        root: Where the per-upload folders go (made 0700 if missing).

    Yields:
        The stored file's path.

    Raises:
        ServingError: ``empty_file`` (nothing was sent); ``insufficient_storage`` (no space left) or
            ``upload_failed`` (any other write error).
    """
    folder: Path | None = None
    try:
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            folder = Path(tempfile.mkdtemp(prefix="u-", dir=root))
            path = folder / "upload"
            body.save(path)
        except OSError as exc:
            raise storage_error(exc) from None
        if path.stat().st_size == 0:
            raise ServingError("empty_file", "the uploaded file is empty")
        yield path
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
