"""The sample chest X-rays a new user needs: fastai's SIIM_SMALL, fetched or copied into a
folder in the layout every command reads (`labels.csv`, `train/<label>/*.dcm`).

The source is fastai's published archive by default; an http(s) or file URL, a local
`.tgz`/`.tar.gz`/`.zip`, or a folder already in that layout (a copy of the data, with its
`train-rle.csv(.gz)` masks if it has them) can stand in for it, which is how a machine
without internet, and the tests, get the same result. The folder appears whole or not at
all: everything is unpacked and checked under a temporary name next to it, then renamed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from ai.data.labelled import RLE_NAMES, find_rle_table, load_items, read_rle_table

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_SECONDS = 60
CHUNK_BYTES = 1 << 20
# The SIIM-ACR masks of the whole challenge set (ai/siim_masks/NOTICE.md says whence).
SHIPPED_MASKS = (
    Path(__file__).resolve().parents[1] / "siim_masks" / "siim-pneumothorax-train-rle.csv.gz"
)
SOURCE_ENV = "PNEUMONODE_SAMPLE_DATA"


class SampleDataError(RuntimeError):
    """The source could not be read, or it holds no `labels.csv` data set."""


@dataclass(frozen=True)
class SampleData:
    folder: Path
    n_images: int
    per_label: dict[str, int]
    has_masks: bool
    fetched: bool  # False when the folder already held the data

    def summary(self) -> str:
        labels = ", ".join(f"{count} {label}" for label, count in sorted(self.per_label.items()))
        masks = "with" if self.has_masks else "without"
        verb = "fetched into" if self.fetched else "already in"
        return f"{self.n_images} images ({labels}) {masks} SIIM masks, {verb} {self.folder}"


def default_source() -> str:
    """$PNEUMONODE_SAMPLE_DATA (a mirror, archive or folder for sites without internet),
    else fastai's SIIM_SMALL archive (its URL constant, so both name the same file)."""
    if os.environ.get(SOURCE_ENV):
        return os.environ[SOURCE_ENV]
    from fastai.data.external import URLs

    return URLs.SIIM_SMALL


def fetch_sample_data(folder: str | Path, source: str | Path | None = None) -> SampleData:
    """Put the sample data set into `folder` (left as it is when it already holds one)."""
    target = Path(folder).resolve()
    if (target / "labels.csv").is_file():
        return _describe(target, fetched=False)
    if target.exists() and any(target.iterdir()):
        raise SampleDataError(f"{target} exists and holds something other than the sample data")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as work:
        work_dir = Path(work)
        unpacked = _unpack(str(source or default_source()), work_dir)
        _describe(unpacked, fetched=True)  # refuse a source that is not a labelled data set
        if find_rle_table(unpacked) is None:
            _add_masks(unpacked)
        if target.exists():
            target.rmdir()
        unpacked.rename(target)
    return _describe(target, fetched=True)


def _unpack(source: str, work: Path) -> Path:
    """The folder holding `labels.csv` once `source` is downloaded, unpacked or copied."""
    local = Path(source[len("file://"):] if source.startswith("file://") else source)
    if source.startswith(("http://", "https://")):
        archive = work / "download" / Path(urllib.request.urlparse(source).path).name
        _download(source, archive)
    elif local.is_dir():
        copy = work / "data"
        shutil.copytree(local, copy, ignore=shutil.ignore_patterns(".*"))
        return _data_root(copy, source)
    elif local.is_file():
        archive = local
    else:
        raise SampleDataError(f"{source}: no such file or folder")
    unpacked = work / "data"
    _extract(archive, unpacked)
    return _data_root(unpacked, source)


def _download(url: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response, \
                destination.open("wb") as out:
            total = 0
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                total += len(chunk)
    except urllib.error.HTTPError as exc:
        raise SampleDataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise SampleDataError(f"cannot download {url}: {reason}") from exc
    log.info("downloaded %.1f MB", total / 1e6)


def _extract(archive: Path, into: Path) -> None:
    into.mkdir(parents=True)
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                for member in bundle.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise SampleDataError(f"{archive}: unsafe member {member!r}")
                bundle.extractall(into)
        else:
            with tarfile.open(archive) as bundle:
                # The "data" filter refuses absolute paths, links out of the folder, devices.
                bundle.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise SampleDataError(f"{archive}: not a readable archive ({exc})") from exc


def _data_root(unpacked: Path, source: str) -> Path:
    """The one folder under `unpacked` that holds labels.csv (archives wrap it in a folder)."""
    found = sorted(unpacked.rglob("labels.csv"), key=lambda p: len(p.parts))
    if not found:
        raise SampleDataError(f"{source}: no labels.csv in it, so not a labelled data set")
    return found[0].parent


def _add_masks(root: Path) -> None:
    """train-rle.csv.gz with the shipped SIIM masks of the images in `root` (fastai's archive
    has none; the default recipe trains on them). Images SIIM has no row for get none."""
    uids = set()
    for path in load_items(root)["path"]:
        try:
            uids.add(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        except (InvalidDicomError, AttributeError, OSError):
            continue
    table = read_rle_table(SHIPPED_MASKS)
    rows = table[table["ImageId"].isin(uids)]
    if rows.empty:
        return
    rows.to_csv(root / "train-rle.csv.gz", index=False, compression="gzip")
    log.info("SIIM masks of %d images written to %s", rows["ImageId"].nunique(), root)


def _describe(folder: Path, fetched: bool) -> SampleData:
    try:
        items = load_items(folder)
    except (FileNotFoundError, ValueError, pd.errors.ParserError) as exc:
        raise SampleDataError(f"{folder}: {exc}") from exc
    counts = {str(label): int(n) for label, n in items["label"].value_counts().items()}
    return SampleData(
        folder=folder,
        n_images=len(items),
        per_label=counts,
        has_masks=any((folder / name).is_file() for name in RLE_NAMES),
        fetched=fetched,
    )
