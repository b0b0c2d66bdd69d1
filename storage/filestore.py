"""The file store: received DICOM files written atomically under a UID-based layout.

A file is first written to a temporary name in its final folder, fsynced, renamed over its
final name and the folder fsynced: a reader (or a crash) sees either no file or a whole
one, never a half-written file under a real name. Paths are built only from validated
UIDs (digits and dots), so nothing a sender writes in a dataset can steer where a file goes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from pydicom.uid import UID


class InvalidUIDError(ValueError):
    """A UID that is not a valid DICOM UID and so must never reach a file name."""


def check_uid(name: str, value: object) -> str:
    """Return `value` as a string if it is a valid DICOM UID, else raise naming `name`."""
    text = str(value or "").strip()
    if not text:
        raise InvalidUIDError(f"{name} is missing")
    if not UID(text).is_valid:
        raise InvalidUIDError(f"{name} {text[:80]!r} is not a valid DICOM UID")
    return text


class FileStore:
    """Files under `<root>/files/<study>/<series>/<sop>.dcm`."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.files_root = self.root / "files"
        self.fsync = fsync
        self.files_root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        parts = (
            check_uid("StudyInstanceUID", study_uid),
            check_uid("SeriesInstanceUID", series_uid),
            check_uid("SOPInstanceUID", sop_uid) + ".dcm",
        )
        return "/".join(parts)

    def absolute(self, relative: str) -> Path:
        return self.files_root / relative

    def write_atomic(self, relative: str, data: bytes | memoryview) -> Path:
        """Write `data` to `relative` so that it is durable and whole once this returns."""
        target = self.absolute(relative)
        folder = target.parent
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        if self.fsync:
            self._fsync_dir(folder)
            if created:
                # A new folder's own entry lives in its parents: make those durable too.
                self._fsync_dir(folder.parent)
                self._fsync_dir(folder.parent.parent)
        return target

    def remove(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.absolute(relative))

    def cleanup_temporaries(self) -> int:
        """Delete temporary files left by a crash mid-write; returns how many."""
        count = 0
        for leftover in self.files_root.rglob(".incoming-*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                count += 1
        return count

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
