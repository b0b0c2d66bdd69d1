"""Where labelled images come from: a `labels.csv` folder, the Kaggle SIIM layout, or
fastai's SIIM_SMALL download, plus the SIIM masks (run-length encoded) for localisation.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

POSITIVE = "Pneumothorax"
NEGATIVE = "No Pneumothorax"
RLE_NAMES = ("train-rle.csv", "train-rle.csv.gz")
MASK_SHAPE = (1024, 1024)


def default_data_root() -> Path:
    """fastai's SIIM_SMALL (250 DICOMs + labels.csv), downloaded once into ~/.fastai."""
    from fastai.data.external import URLs, untar_data

    return Path(untar_data(URLs.SIIM_SMALL))


def find_rle_table(root: Path) -> Path | None:
    for name in RLE_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def read_rle_table(path: Path) -> pd.DataFrame:
    """The Kaggle `train-rle.csv(.gz)`: one row per mask, columns ImageId and EncodedPixels."""
    table = pd.read_csv(path, dtype=str)
    table.columns = [column.strip() for column in table.columns]
    if not {"ImageId", "EncodedPixels"} <= set(table.columns):
        raise ValueError(f"{path}: expected columns ImageId, EncodedPixels")
    table["EncodedPixels"] = table["EncodedPixels"].fillna("-1").str.strip()
    return table


def load_items(root: str | Path) -> pd.DataFrame:
    """Labelled DICOM files under `root` as a DataFrame (file: relative path, path, label).

    `labels.csv` (fastai's `file,label` format) wins; otherwise the Kaggle layout, where each
    DICOM is named by its SOP Instance UID, and the label is whether any mask is present.
    """
    root = Path(root)
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        table = pd.read_csv(labels_csv, dtype=str)
        table.columns = [column.strip() for column in table.columns]
        if not {"file", "label"} <= set(table.columns):
            raise ValueError(f"{labels_csv}: expected columns file,label")
        items = pd.DataFrame({"file": table["file"], "label": table["label"]})
    else:
        rle_path = find_rle_table(root)
        if rle_path is None:
            raise FileNotFoundError(f"{root}: neither labels.csv nor train-rle.csv(.gz) found")
        masks = read_rle_table(rle_path)
        positive = masks.groupby("ImageId")["EncodedPixels"].agg(lambda s: (s != "-1").any())
        files = {path.stem: path for path in root.rglob("*.dcm")}
        rows = [(str(files[uid].relative_to(root)), POSITIVE if has_mask else NEGATIVE)
                for uid, has_mask in positive.items() if uid in files]
        if not rows:
            raise FileNotFoundError(f"{root}: no DICOM file matches an ImageId of {rle_path}")
        items = pd.DataFrame(rows, columns=["file", "label"])
    items["path"] = [str(root / name) for name in items["file"]]
    missing = [name for name, path in zip(items["file"], items["path"], strict=True)
               if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: {len(missing)} listed files are missing, e.g. {missing[0]}")
    return items.sort_values("file").reset_index(drop=True)


def subsample(items: pd.DataFrame, max_items: int | None, seed: int) -> pd.DataFrame:
    """At most `max_items` rows, as balanced between labels as possible (for quick runs)."""
    if max_items is None or len(items) <= max_items:
        return items
    labels = sorted(items["label"].unique())
    per_label = max(1, max_items // len(labels))
    parts = [group.sample(min(len(group), per_label), random_state=seed)
             for _, group in items.groupby("label")]
    chosen = pd.concat(parts)
    if len(chosen) < max_items:
        rest = items.drop(chosen.index)
        chosen = pd.concat([chosen, rest.sample(max_items - len(chosen), random_state=seed)])
    return chosen.sort_values("file").reset_index(drop=True)


def fingerprint(items: pd.DataFrame) -> str:
    """sha256 over (file name, label, file bytes): changes when any training input changes."""
    digest = hashlib.sha256()
    for name, label, path in zip(items["file"], items["label"], items["path"], strict=True):
        digest.update(f"{name}\0{label}\0".encode())
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def rle_decode(rle: str, shape: tuple[int, int] = MASK_SHAPE) -> np.ndarray:
    """Kaggle SIIM run-length code -> bool mask (rows, columns).

    Pairs are (gap since the end of the previous run, run length), counted over the image
    flattened column by column; '-1' means no mask.
    """
    rows, columns = shape
    flat = np.zeros(rows * columns, dtype=bool)
    values = rle.split()
    if values in ([], ["-1"]):
        return flat.reshape(columns, rows).T
    numbers = np.asarray(values, dtype=np.int64)
    if numbers.size % 2:
        raise ValueError("run-length code must have an even number of values")
    position = 0
    for gap, length in zip(numbers[0::2], numbers[1::2], strict=True):
        position += int(gap)
        flat[position:position + int(length)] = True
        position += int(length)
    return flat.reshape(columns, rows).T


def mask_union(codes: Iterable[str], shape: tuple[int, int] = MASK_SHAPE) -> np.ndarray:
    """Union of the run-length masks `codes` of one image (an image can have several)."""
    mask = np.zeros(shape, dtype=bool)
    for rle in codes:
        mask |= rle_decode(rle, shape)
    return mask


def mask_for(table: pd.DataFrame, image_id: str, shape: tuple[int, int] = MASK_SHAPE) -> np.ndarray:
    """Union of all masks of one image (an image can have several rows)."""
    return mask_union(table.loc[table["ImageId"] == image_id, "EncodedPixels"], shape)
