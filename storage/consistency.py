"""Index and files agree: the start-up recovery pass and `pneumonode verify`.

A file is written (and fsynced) before the index row that names it is committed, and a
replaced copy is deleted only after the commit, so a crash can leave three things behind:
temporary files of an interrupted write, whole files that no row points to (written, never
indexed; or a replaced copy not yet deleted), and, if the disk lost something, rows whose
file is missing. `recover` removes the first, moves the second to a quarantine folder and
reports the third; `verify` checks every row against its file (exists, size, SHA-256 taken
at ingest) and lists what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, select

from storage.filestore import FileStore
from storage.models import Instance

log = logging.getLogger(__name__)

QUARANTINE_FOLDER = "quarantine"
_READ_CHUNK = 1 << 20


@dataclass
class RecoveryReport:
    """What the start-up pass found and did; `skipped` when another process was writing."""

    temporaries_removed: int = 0
    orphans: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (SOP UID, path)
    skipped: bool = False


@dataclass
class VerifyReport:
    """Every disagreement between the index and the files."""

    rows: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    wrong_size: list[tuple[str, str, int, int]] = field(default_factory=list)
    wrong_checksum: list[tuple[str, str]] = field(default_factory=list)
    without_checksum: int = 0
    orphans: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    # Temporary files while other processes write (a live node): writes under way, not
    # problems; the start-up recovery pass removes what a crash leaves.
    in_progress: int = 0

    @property
    def problems(self) -> int:
        return (
            len(self.missing)
            + len(self.wrong_size)
            + len(self.wrong_checksum)
            + len(self.orphans)
            + len(self.temporaries)
        )

    def lines(self) -> list[str]:
        out = [f"missing file: {sop} ({path})" for sop, path in self.missing]
        out += [
            f"size differs: {sop} ({path}): index {expected}, file {actual}"
            for sop, path, expected, actual in self.wrong_size
        ]
        out += [f"checksum differs: {sop} ({path})" for sop, path in self.wrong_checksum]
        out += [f"file not in the index: {path}" for path in self.orphans]
        out += [f"temporary file of an interrupted write: {path}" for path in self.temporaries]
        summary = (
            f"{self.rows} indexed instances checked: {self.problems} problems"
            f" ({len(self.missing)} missing, {len(self.wrong_size)} wrong size,"
            f" {len(self.wrong_checksum)} wrong checksum, {len(self.orphans)} files not in"
            f" the index, {len(self.temporaries)} temporary files)"
        )
        if self.without_checksum:
            summary += f"; {self.without_checksum} rows predate checksums (size checked only)"
        if self.in_progress:
            summary += f"; {self.in_progress} writes under way by a running node"
        return [*out, summary]


def _indexed(engine: Engine) -> dict[str, tuple[str, int, str | None]]:
    """file path -> (SOP Instance UID, size, checksum) of every index row."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                Instance.file_path,
                Instance.sop_instance_uid,
                Instance.file_size,
                Instance.file_sha256,
            )
        )
        return {path: (sop, size, checksum) for path, sop, size, checksum in rows}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def recover(files: FileStore, engine: Engine, *, quarantine: bool = True) -> RecoveryReport:
    """Clean up after a crash, before this process writes anything.

    Runs only while no other process holds the writer lock: a file another process has
    just written but not yet indexed is not an orphan.
    """
    report = RecoveryReport()
    with files.writer_lock(exclusive=True) as acquired:
        if not acquired:
            report.skipped = True
            return report
        on_disk = list(files.walk())
        indexed = _indexed(engine)
        for relative, temporary in on_disk:
            if temporary:
                _remove(files.absolute(relative))
                report.temporaries_removed += 1
            elif relative not in indexed:
                _set_aside(files, relative, quarantine)
                report.orphans.append(relative)
        present = {relative for relative, temporary in on_disk if not temporary}
        report.missing = [
            (sop, path) for path, (sop, _size, _sum) in indexed.items() if path not in present
        ]
    return report


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _set_aside(files: FileStore, relative: str, quarantine: bool) -> None:
    source = files.absolute(relative)
    if not quarantine:
        _remove(source)
        return
    target = files.root / QUARANTINE_FOLDER / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{target.name}.{time.time_ns()}")
    os.replace(source, target)


def log_recovery(report: RecoveryReport) -> None:
    """One line per kind of finding, UIDs and paths only."""
    if report.skipped:
        log.warning(
            "another process is writing to the storage folder: the recovery pass is skipped"
        )
        return
    if report.temporaries_removed:
        log.info(
            "removed %d temporary files left by an interrupted write", report.temporaries_removed
        )
    if report.orphans:
        log.warning(
            "moved %d files that no index row points to (left by an interrupted store) "
            "aside, e.g. %s",
            len(report.orphans),
            report.orphans[0],
        )
    if report.missing:
        log.error(
            "%d indexed instances have no file (run `pneumonode verify`), e.g. SOP %s",
            len(report.missing),
            report.missing[0][0],
        )


def verify(files: FileStore, engine: Engine, *, checksums: bool = True) -> VerifyReport:
    """Check every index row against its file, and every file against the index.

    Also right while a node runs: its writes under way leave temporary files, a file is
    linked a moment before its row commits, and a replaced copy's old file goes a moment
    after its row moves. So while other processes hold the writer lock, temporary files are
    counted as writes under way, and a file without a row, or a row without its file, is a
    problem only if a second look at the index, taken after the files were seen, agrees.
    """
    report = VerifyReport()
    live = _writers_active(files)
    on_disk = list(files.walk())
    indexed = _indexed(engine)
    report.rows = len(indexed)
    missing = []
    for relative, (sop, size, checksum) in sorted(indexed.items()):
        path = files.absolute(relative)
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            missing.append((sop, relative))
            continue
        if actual != size:
            report.wrong_size.append((sop, relative, size, actual))
        elif checksum is None:
            report.without_checksum += 1
        elif checksums and _sha256(path) != checksum:
            report.wrong_checksum.append((sop, relative))
    again = _indexed(engine) if live and (missing or on_disk) else indexed
    report.missing = [(sop, relative) for sop, relative in missing if relative in again]
    for relative, temporary in sorted(on_disk):
        if temporary:
            if live:
                report.in_progress += 1
            else:
                report.temporaries.append(relative)
        elif relative not in indexed and relative not in again:
            report.orphans.append(relative)
    return report


def _writers_active(files: FileStore) -> bool:
    """Whether another process holds the store's writer lock right now (a running node)."""
    with files.writer_lock(exclusive=True) as acquired:
        return not acquired
