"""Does the heatmap point at the pneumothorax? A check against the SIIM masks.

For positive images with a mask in `train-rle.csv(.gz)`: how often the heatmap's peak
(GradCAM, CAM or a mask head's map) falls inside the mask ("pointing game"), and the share
of the map's energy inside it. `train` scores every fold's model this way on the images it
did not see (`<model>/reports/localisation.csv`); this command scores a finished model
into files of its own, `localisation-<scope>.json` and `.csv`, so it never replaces the
cross-validated figures `train` wrote. The mask's share of the image is reported
alongside: it is what a uniform map would score.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ai.analysis.infer import Analyzer
from ai.cli.console import progress
from ai.data.labelled import POSITIVE, find_rle_table, load_items, mask_for, read_rle_table
from ai.data.preprocess import read_dataset, read_grey8
from ai.results.sc.picture import upsample_bilinear

log = logging.getLogger(__name__)

# Written by `train` (ai.train.evaluation_report) from its folds' held-out images; never
# written here.
TRAIN_LOCALISATION = Path("reports") / "localisation.csv"


@dataclass
class LocalisationResult:
    file: str
    sop_instance_uid: str
    probability: float
    peak_in_mask: bool
    energy_in_mask: float
    mask_area_share: float


def score_heatmap(heatmap: np.ndarray, mask: np.ndarray) -> tuple[bool, float, float]:
    """(peak inside mask, share of map energy inside mask, mask's share of the image)."""
    full = upsample_bilinear(heatmap, *mask.shape)
    peak = np.unravel_index(int(np.argmax(full)), full.shape)
    total = float(full.sum())
    energy = float(full[mask].sum() / total) if total > 0 else 0.0
    return bool(mask[peak]), energy, float(mask.mean())


def output_files(out: str | Path, scope: str) -> tuple[Path, Path]:
    """(JSON, CSV) that `localise` writes for `scope`: named apart from train's
    localisation.csv, so scoring a model never replaces its cross-validated figures."""
    folder = Path(out)
    return folder / f"localisation-{scope}.json", folder / f"localisation-{scope}.csv"


def select_files(
    model_meta: dict, items: pd.DataFrame, scope: str, model_dir: str | Path = "."
) -> pd.DataFrame:
    """Positive images of the recorded validation split ('validation') or all ('all');
    `model_dir` only names train's own localisation file in the refusal."""
    positives = items[items["label"] == POSITIVE]
    if scope == "all":
        return positives
    training = model_meta.get("training", {})
    validation = set(training.get("validation_files", []))
    if not validation and "folds" in training:
        raise ValueError("the model was refitted on all images after cross-validation, so "
                         "none is held out: its folds' localisation is in "
                         f"{Path(model_dir) / TRAIN_LOCALISATION}; use scope 'all' to score "
                         "it anyway")
    if not validation:
        raise ValueError("the model records no validation split; use scope 'all'")
    return positives[positives["file"].isin(validation)]


def localise(
    model_dir: str | Path,
    data_root: str | Path,
    out: str | Path | None = None,
    scope: str = "validation",
    method: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
) -> dict:
    """Score the model's heatmaps against the masks; write `output_files(out, scope)` if
    `out` is given."""
    root = Path(data_root)
    rle_path = find_rle_table(root)
    if rle_path is None:
        raise FileNotFoundError(f"{root}: no train-rle.csv(.gz) with the masks")
    masks = read_rle_table(rle_path)
    analyzer = Analyzer(model_dir, device=device, batch_size=batch_size)
    method = method or analyzer.default_method()
    chosen = select_files(analyzer.loaded.meta, load_items(root), scope, model_dir)
    results: list[LocalisationResult] = []
    for start in progress(range(0, len(chosen), batch_size), desc="localise", unit="batch"):
        rows = chosen.iloc[start : start + batch_size]
        datasets = [read_dataset(path) for path in rows["path"]]
        images = [read_grey8(ds) for ds in datasets]
        predictions = analyzer.explain(images, method=method)
        for name, ds, image, prediction in zip(
            rows["file"], datasets, images, predictions, strict=True
        ):
            uid = str(ds.SOPInstanceUID)
            mask = mask_for(masks, uid, image.shape)
            if not mask.any():
                log.warning("no mask for positive image %s; skipped", uid)
                continue
            peak, energy, area = score_heatmap(prediction.heatmap, mask)
            results.append(
                LocalisationResult(name, uid, prediction.probability, peak, energy, area)
            )
    summary = {
        "model": analyzer.loaded.name,
        "model_version": analyzer.loaded.version,
        "method": method,
        "scope": scope,
        "n_images": len(results),
        "peak_in_mask_rate": float(np.mean([r.peak_in_mask for r in results])) if results else None,
        "mean_energy_in_mask": float(np.mean([r.energy_in_mask for r in results]))
        if results
        else None,
        "mean_mask_area_share": float(np.mean([r.mask_area_share for r in results]))
        if results
        else None,
    }
    if out is not None:
        json_path, csv_path = output_files(out, scope)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        pd.DataFrame([asdict(r) for r in results]).to_csv(csv_path, index=False)
    log.info(
        "localisation over %d images: peak in mask %.3f, energy in mask %.3f",
        len(results),
        summary["peak_in_mask_rate"] or 0,
        summary["mean_energy_in_mask"] or 0,
    )
    return summary
