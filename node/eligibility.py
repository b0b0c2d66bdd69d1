"""Which stored instances the node queues for the classifier, decided from the index header.

Runs inside the storing transaction (see storage.archive.JobDecision), so it must be cheap
and must not read pixels: everything it needs is in the header record.
"""

from __future__ import annotations

from collections.abc import Iterable

from storage.indexer import HeaderRecord
from storage.models import JobState

GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


class Eligibility:
    """Analyse single-frame greyscale images of the configured modalities and body parts."""

    def __init__(self, modalities: Iterable[str], body_parts: Iterable[str]) -> None:
        self.modalities = {m.strip().upper() for m in modalities}
        self.body_parts = {b.strip().upper() for b in body_parts}

    def skip_reason(self, record: HeaderRecord) -> str | None:
        """Why `record` is not analysed, or None when it is eligible."""
        if record.rows is None or record.columns is None:
            return "not an image (no Rows/Columns)"
        if (record.number_of_frames or 1) != 1:
            return f"multi-frame image ({record.number_of_frames} frames)"
        photometric = record.photometric_interpretation.upper()
        if (record.samples_per_pixel or 1) != 1 or photometric not in GREYSCALE:
            return f"not greyscale (PhotometricInterpretation {photometric or 'absent'})"
        modality = record.modality.upper()
        if modality not in self.modalities:
            return f"modality {modality or 'absent'} not in {sorted(self.modalities)}"
        body_part = record.body_part_examined.upper()
        if body_part not in self.body_parts:
            return f"body part {body_part} not in {sorted(self.body_parts)}"
        return None

    def __call__(self, record: HeaderRecord, is_result: bool) -> tuple[JobState, str] | None:
        if is_result:
            return None  # the node's own results are never analysed again
        reason = self.skip_reason(record)
        if reason is None:
            return JobState.QUEUED, ""
        return JobState.SKIPPED, reason
