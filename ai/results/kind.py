"""What every kind of result object shares: the inputs it is made from, the model that made
them, its UIDs, and the one interface the node's result writer calls.

A kind is one module, `ai/results/<name>/kind.py`, holding `KIND`: its name (the word in
`analysis.results` and in the job table), its series number and description, and how it is
built from the inputs. The writer builds every configured kind of an image, each on its own
(a kind that fails fails alone), stores what was made and queues its delivery; it knows no
kind by name. A kind that has nothing to say for an image (a segmentation of an absent
finding) raises `ResultNotMade`, which is not a failure.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

MANUFACTURER = "pneumonode"
_RESULTS_PACKAGE = Path(__file__).resolve().parent


class ResultNotMade(Exception):  # noqa: N818 - an outcome, not an error
    """This kind has nothing to report for this image; the reason is recorded, not failed."""


@dataclass(frozen=True)
class ResultModel:
    """What the results say about the model that made them and the node that built them."""

    name: str
    version: str
    positive_class: str
    threshold: float
    observer_name: str  # the node's AE title: the SR's device observer
    observer_uid: str
    sc_transfer_syntax: str


@dataclass(frozen=True)
class KindUids:
    """A result's series and instance UIDs: derived from the source and the model version,
    so building the same result again (a retry, a restart) gives the same UIDs and replaces
    the stored object instead of adding a second one."""

    series: str
    sop: str

    @classmethod
    def of(cls, kind: str, source: Dataset, model_version: str) -> KindUids:
        study = str(source.StudyInstanceUID)
        sop = str(source.SOPInstanceUID)
        return cls(
            series=generate_uid(entropy_srcs=[f"pneumonode-{kind}-series", study, model_version]),
            sop=generate_uid(entropy_srcs=[f"pneumonode-{kind}", sop, model_version]),
        )


def tracking_uid(source: Dataset, model_version: str) -> str:
    """The finding's Tracking UID, the same in the SR's measurement group and the SEG's
    segment: what tells a viewer that the two objects describe one finding."""
    return generate_uid(
        entropy_srcs=["pneumonode-tracking", str(source.SOPInstanceUID), model_version]
    )


@dataclass(frozen=True)
class MadeResult:
    """A result already stored for this image, for the kinds built after it to refer to."""

    kind: str
    series_number: int
    series_title: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass
class ResultInputs:
    """One analysed image: everything its results are built from, nothing to decode again.

    `header` is the checked source header (`ai.results.attributes.source_header`);
    `segmentation` the mask head's per-pixel probability map when the heatmap is one
    (`method_title` says), else None; `regions` the finding's regions on the source grid,
    found once for every kind (None when there is no map or the finding is absent);
    `made` the results of this image stored so far, by kind (see `ResultKind.after`).
    """

    header: Dataset
    grey8: Any  # numpy uint8 HxW, the X-ray as displayed
    probability: float
    present: bool
    label: str
    heatmap: Any  # numpy float32 in [0, 1], any size
    method_title: str
    tracking_uid: str
    instance_number: int
    segmentation: Any = None
    regions: Any = None  # ai.results.regions.Regions
    made: dict[str, MadeResult] = field(default_factory=dict)


class ResultKind(Protocol):
    """One kind of result object."""

    name: str
    series_number: int
    series_description: str
    series_title: str  # how other results name this one's series (the SC's caption)
    modality: str
    after: tuple[str, ...]  # kinds this one refers to, built before it when configured

    def build(self, inputs: ResultInputs, model: ResultModel, uids: KindUids) -> Dataset:
        """The object for one image; ResultNotMade when this kind has nothing to say, any
        other error when it cannot be built."""
        ...


def new_instance(kind: ResultKind, inputs: ResultInputs, uids: KindUids) -> dict[str, Any]:
    """The identity every kind's builder takes for its object: its own series and instance
    UIDs, its series number, the source's instance number."""
    return {
        "series_instance_uid": uids.series,
        "sop_instance_uid": uids.sop,
        "series_number": kind.series_number,
        "instance_number": inputs.instance_number,
    }


def available_kinds() -> tuple[str, ...]:
    """The kinds this installation has: the subpackages of ai.results with a `kind.py`
    (found without importing them, so the config check stays light)."""
    return tuple(sorted(p.parent.name for p in _RESULTS_PACKAGE.glob("*/kind.py")))


@functools.cache
def kind_named(name: str) -> ResultKind:
    if name not in available_kinds():
        raise ValueError(f"unknown result kind {name!r}; known: {', '.join(available_kinds())}")
    return importlib.import_module(f"ai.results.{name}.kind").KIND


def kinds_named(names: tuple[str, ...] | list[str]) -> list[ResultKind]:
    """The kinds `analysis.results` lists, in the order they are built: each after the kinds
    it refers to (`after`), otherwise in the listed order."""
    pending = [kind_named(name) for name in names]
    ordered: list[ResultKind] = []
    while pending:
        names_left = {kind.name for kind in pending}
        ready = next(k for k in pending if not set(k.after) & names_left)  # no cycles: see tests
        ordered.append(ready)
        pending.remove(ready)
    return ordered


def instance_number(source: Dataset) -> int:
    """The source's Instance Number for its results, 1 when it has none usable."""
    try:
        number = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if 0 < number < 2**31 else 1
