"""The file store: received DICOM files written atomically under a UID-based layout.

A file is first written to a temporary name in its final folder, fsynced, linked to its
final name and the folder fsynced: a reader (or a crash) sees either no file or a whole
one, never a half-written file under a real name. The folders' own entries (series in study,
study in files/) are synced the first time a process writes into a folder, whoever made it;
later files cost the one folder sync their name needs. Paths are built only from validated
UIDs (digits and dots), so nothing a sender writes in a dataset can steer where a file goes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydicom.uid import UID

TEMPORARY_PREFIX = ".incoming-"
WRITER_LOCK_NAME = "writers.lock"
MAX_REMEMBERED_FOLDERS = 100_000
# Tries at making a folder and a file in it, when another writer removes it in between.
FOLDER_ATTEMPTS = 5


def _link_if_absent(source: str, target: Path) -> bool:
    """Give `source` the name `target` unless that name exists (atomic, no clobbering)."""
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if target.exists():  # a file system without hard links
            return False
        os.replace(source, target)
        return True
    return True


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
        self._held_lock: contextlib.ExitStack | None = None
        # Folders whose own entry (in their parent) this process has made durable. Another
        # process (or thread) may have created a folder without having synced its parent
        # yet, so a folder that merely exists is not enough.
        self._durable_folders: set[Path] = set()

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        parts = (
            check_uid("StudyInstanceUID", study_uid),
            check_uid("SeriesInstanceUID", series_uid),
            check_uid("SOPInstanceUID", sop_uid) + ".dcm",
        )
        return "/".join(parts)

    def absolute(self, relative: str) -> Path:
        return self.files_root / relative

    def write_new(self, relative: str, data: bytes | memoryview) -> str:
        """Write `data` durably under `relative`, or under a sibling name if that exists.

        An existing file is never replaced: the copy it holds stays whole until the index
        points elsewhere. Returns the relative path actually written.
        """
        self.hold_shared_writer_lock()
        target = self.absolute(relative)
        folder = target.parent
        # A folder new here (perhaps again, after someone removed it) has an entry to sync.
        fd, tmp_name = self._temporary_in(folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            stem = target.name.removesuffix(".dcm")
            while not _link_if_absent(tmp_name, target):
                target = folder / f"{stem}.~{secrets.token_hex(4)}.dcm"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            self._remove_if_empty(folder)  # a refused or failed write (a full disk)
            raise
        if self.fsync:
            self._fsync_dir(folder)
            self._make_entries_durable(folder)
        return target.relative_to(self.files_root).as_posix()

    def _temporary_in(self, folder: Path) -> tuple[int, str]:
        """A new temporary file in `folder`, made (again) if need be: another writer whose
        store failed may remove a folder it found empty just after this one made it."""
        for attempt in range(FOLDER_ATTEMPTS):
            try:
                # A folder new here (perhaps again, after someone removed it) has an entry
                # to sync.
                self._durable_folders.difference_update(self._create_folder(folder))
                return tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=".tmp")
            except FileNotFoundError:
                if attempt == FOLDER_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _remove_if_empty(self, folder: Path) -> None:
        """Remove the series folder and then its study folder if nothing is left in them,
        so that refused and failed stores leave no empty folders behind. rmdir removes only
        an empty folder: a file written there meanwhile keeps it."""
        for candidate in (folder, folder.parent):
            if candidate == self.files_root or self.files_root not in candidate.parents:
                return
            try:
                candidate.rmdir()
            except OSError:
                return  # not empty (or gone already): its parent is not empty either
            self._durable_folders.discard(candidate)

    @staticmethod
    def _create_folder(folder: Path) -> tuple[Path, ...]:
        """Make the series folder (and its study folder if need be); the folders this call
        created (one mkdir per file when both exist)."""
        try:
            folder.mkdir()
        except FileExistsError:
            return ()
        except FileNotFoundError:
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(exist_ok=True)
            return folder, folder.parent
        return (folder,)

    def _make_entries_durable(self, folder: Path) -> None:
        """Sync the parents that hold `folder`'s entry and its parent's (series in study,
        study in files/), once per folder and process: after that, only the folder itself
        changes when a file is added."""
        if folder in self._durable_folders:
            return
        for holder, entry in ((folder.parent, folder), (folder.parent.parent, folder.parent)):
            if entry in self._durable_folders:
                break
            self._fsync_dir(holder)
        if len(self._durable_folders) > MAX_REMEMBERED_FOLDERS:
            self._durable_folders.clear()  # synced again once when next used: harmless
        self._durable_folders.update((folder, folder.parent))

    def remove(self, relative: str) -> None:
        """Remove a file, and its series and study folders if that left them empty."""
        path = self.absolute(relative)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._remove_if_empty(path.parent)

    def walk(self) -> Iterator[tuple[str, bool]]:
        """(relative path, is a temporary) of every file under the files folder."""
        for folder, _dirs, names in os.walk(self.files_root):
            base = Path(folder).relative_to(self.files_root).as_posix()
            for name in names:
                relative = name if base == "." else f"{base}/{name}"
                yield relative, name.startswith(TEMPORARY_PREFIX)

    @contextlib.contextmanager
    def writer_lock(self, exclusive: bool) -> Iterator[bool]:
        """Hold the store's writer lock: shared by every process that writes files,
        exclusive for the recovery pass, which must know that no write is under way.
        Yields False when an exclusive lock is not to be had right now."""
        fd = os.open(self.root / WRITER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def hold_shared_writer_lock(self) -> None:
        """Keep a shared writer lock from this process's first write on (see writer_lock)."""
        if self._held_lock is None:
            self._held_lock = contextlib.ExitStack()
            self._held_lock.enter_context(self.writer_lock(exclusive=False))

    def release_writer_lock(self) -> None:
        """Give up the shared writer lock (this process writes no more)."""
        if self._held_lock is not None:
            self._held_lock.close()
            self._held_lock = None

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
