"""The file store's folders: a refused or failed store (a full disk, a file removed after
its index commit failed) leaves no empty study or series folder behind, and a writer whose
folder another writer has just removed makes it again."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from storage import filestore
from storage.filestore import FileStore

STUDY, SERIES, OTHER_SERIES = "1.2.3", "1.2.3.4", "1.2.3.5"


def _relative(store: FileStore, series: str, sop: str) -> str:
    return store.relative_path(STUDY, series, sop)


class _FullDisk:
    """A file handle whose writes fail as on a full disk."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)

    def write(self, _data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_no_empty_folder(tmp_path: Path, monkeypatch) -> None:
    store = FileStore(tmp_path, fsync=False)
    monkeypatch.setattr(filestore.os, "fdopen", lambda fd, _mode: _FullDisk(fd))
    with pytest.raises(OSError, match="No space"):
        store.write_new(_relative(store, SERIES, "1.2.3.4.1"), b"data")
    assert list(store.files_root.iterdir()) == []


def test_a_failed_write_keeps_the_folders_that_hold_other_files(
    tmp_path: Path, monkeypatch
) -> None:
    store = FileStore(tmp_path, fsync=False)
    kept = store.write_new(_relative(store, SERIES, "1.2.3.4.1"), b"data")
    monkeypatch.setattr(filestore.os, "fdopen", lambda fd, _mode: _FullDisk(fd))
    with pytest.raises(OSError):
        store.write_new(_relative(store, OTHER_SERIES, "1.2.3.5.1"), b"data")
    assert [p.name for p in (store.files_root / STUDY).iterdir()] == [SERIES]
    assert store.absolute(kept).read_bytes() == b"data"


def test_removing_the_last_file_removes_its_folders(tmp_path: Path) -> None:
    store = FileStore(tmp_path, fsync=False)
    first = store.write_new(_relative(store, SERIES, "1.2.3.4.1"), b"one")
    second = store.write_new(_relative(store, OTHER_SERIES, "1.2.3.5.1"), b"two")
    store.remove(first)
    assert not (store.files_root / STUDY / SERIES).exists()
    assert (store.files_root / STUDY / OTHER_SERIES).is_dir()
    store.remove(second)
    assert list(store.files_root.iterdir()) == []


def test_a_folder_removed_under_a_writer_is_made_again(tmp_path: Path, monkeypatch) -> None:
    store = FileStore(tmp_path, fsync=False)
    real_mkstemp = filestore.tempfile.mkstemp
    calls = []

    def mkstemp_after_a_removal(**kwargs):
        if not calls:  # another writer's failed store removes the empty folders now
            folder = Path(kwargs["dir"])
            folder.rmdir()
            folder.parent.rmdir()
        calls.append(kwargs)
        return real_mkstemp(**kwargs)

    monkeypatch.setattr(filestore.tempfile, "mkstemp", mkstemp_after_a_removal)
    written = store.write_new(_relative(store, SERIES, "1.2.3.4.1"), b"data")
    assert store.absolute(written).read_bytes() == b"data"
    assert len(calls) == 2
