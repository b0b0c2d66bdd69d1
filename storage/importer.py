"""Bring an existing folder of DICOM files into the archive, by the same rules as C-STORE.

Each file goes through `Archive.store_file_bytes` (header checks, UID checks, duplicate
policy, atomic write, index commit), so an imported instance is indistinguishable from a
received one. Files that cannot be archived are skipped and the reason is counted, so a
large import reports what it left behind instead of stopping at the first odd file. A skip
is a refusal unless the file is no DICOM instance at all (no DICM prefix, a DICOMDIR): the
command exits non-zero when anything was refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from storage.archive import Archive, envelope_mismatch
from storage.errors import StoreError

log = logging.getLogger(__name__)

_PREAMBLE_LENGTH = 128
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NOT_DICOM = "not a DICOM file (no DICM prefix)"
DICOMDIR = "a DICOMDIR, not an instance"
# Skips that are not refusals: files beside the instances that are none (notes, indexes).
NOT_INSTANCES = frozenset({NOT_DICOM, DICOMDIR})


@dataclass
class ImportSummary:
    """Counts per action ("stored", "replaced", "kept-first") and the skipped files."""

    actions: Counter[str] = field(default_factory=Counter)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def refused(self) -> list[tuple[Path, str]]:
        """Skipped files that are DICOM instances the archive would not take (or could not
        read): what makes `pneumonode import` exit non-zero."""
        return [(path, reason) for path, reason in self.skipped if reason not in NOT_INSTANCES]

    @property
    def instances(self) -> int:
        """DICOM instances found and archived (stored, replaced or kept as first)."""
        return sum(self.actions.values())

    @property
    def skip_reasons(self) -> Counter[str]:
        """Skips counted by the kind of reason (the text before its first colon)."""
        return Counter(reason.split(":")[0] for _, reason in self.skipped)

    def lines(self) -> list[str]:
        """A human-readable summary, one line per action and per skip reason."""
        out = [
            f"{action}: {self.actions.get(action, 0)}"
            for action in ("stored", "replaced", "kept-first")
        ]
        skipped = f"skipped: {len(self.skipped)}"
        if self.skipped:
            refused = len(self.refused)
            skipped += f" ({refused} refused, {len(self.skipped) - refused} not DICOM instances)"
        out.append(skipped)
        out.extend(f"  {count} x {reason}" for reason, count in self.skip_reasons.most_common())
        return out


def iter_files(folder: Path) -> Iterator[Path]:
    """Every regular file below `folder`, in a stable order."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def _skip_reason_before_store(data: bytes) -> str | None:
    if len(data) < _PREAMBLE_LENGTH + 4 or data[_PREAMBLE_LENGTH : _PREAMBLE_LENGTH + 4] != b"DICM":
        return NOT_DICOM
    return None


def _mismatch(header) -> str | None:
    """The file meta must describe the dataset it carries, as a C-STORE request must."""
    meta = header.file_meta
    if str(meta.get("MediaStorageSOPClassUID", "") or "") == _MEDIA_STORAGE_DIRECTORY:
        return DICOMDIR
    return envelope_mismatch(
        header,
        sop_class=str(meta.get("MediaStorageSOPClassUID", "") or ""),
        sop_instance=str(meta.get("MediaStorageSOPInstanceUID", "") or ""),
        envelope="file meta",
    )


def import_folder(archive: Archive, folder: Path, *, progress: bool = True) -> ImportSummary:
    """Store every DICOM file below `folder`; returns what was stored and what was skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    files = list(iter_files(folder))
    summary = ImportSummary()
    for path in tqdm(files, desc="import", unit="file", disable=not progress):
        try:
            data = path.read_bytes()
        except OSError as exc:
            summary.skipped.append((path, f"cannot read the file: {exc.strerror}"))
            continue
        reason = _skip_reason_before_store(data)
        try:
            if reason is None:
                header = archive.inspect(data)
                reason = _mismatch(header)
            if reason is None:
                outcome = archive.store_file_bytes(data, calling_ae="", header=header)
                summary.actions[outcome.action] += 1
                continue
        except StoreError as exc:
            reason = str(exc)
        log.debug("skipped %s: %s", path, reason)
        summary.skipped.append((path, reason))
    return summary
