"""What `pneumonode train` does: cache, cross-validate, fit the final model, write it all.

1. Every file is decoded once into the decoded-image cache (`ai.data.imagecache`), which also
   gives each image's Patient ID, SOP Instance UID and SIIM mask.
2. The recipe is cross-validated (`ai.train.crossval`): k folds, stratified by label and grouped
   by patient. These are the numbers a user can expect on new images.
3. The decision threshold is chosen from the pooled out-of-fold predictions (Youden's J,
   `ai.train.crossval.choose_threshold`) unless `--threshold` fixes it.
4. With `--nested` (`ai.train.nested`), refit against fold ensemble and the threshold rule are
   measured by nested cross-validation (reports/nested.json).
5. The final model is fitted on all the images, saved as the artifact with that threshold,
   reloaded and checked to reproduce the in-memory model's probabilities (and maps). It has
   no held-out figures of its own: model.json and metrics.json carry the cross-validated
   ones, marked so.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ai.analysis.infer import Analyzer
from ai.data.imagecache import CachedItem, ImageCache
from ai.data.labelled import (
    POSITIVE,
    find_rle_table,
    fingerprint,
    load_items,
    read_rle_table,
    subsample,
)
from ai.model.artifact import in_memory, resolve_device, save_artifact
from ai.train.crossval import OPTIMISTIC, CrossValidation, cross_validate, model_description
from ai.train.folds import assign_folds
from ai.train.nested import NESTED_FILE
from ai.train.recipes import Recipe

log = logging.getLogger(__name__)

INTENDED_USE = (
    "Research and engineering use: flags chest X-rays that may show a pneumothorax and "
    "shows where the model looked. Not for diagnosis; not a medical device. Validated only by "
    "cross-validation on the training data described here, which is small."
)


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict[str, Any]
    cross_validation: CrossValidation
    nested: dict[str, Any] | None = None


def mask_codes(root: Path) -> dict[str, list[str]]:
    """SOP Instance UID -> its run-length masks, from train-rle.csv(.gz) when present."""
    path = find_rle_table(root)
    if path is None:
        return {}
    table = read_rle_table(path)
    table = table[table["EncodedPixels"] != "-1"]
    return {uid: list(group) for uid, group in table.groupby("ImageId")["EncodedPixels"]}


def prepare(config: Recipe, data_root: str | Path | None, cache_dir: str | Path | None,
            workers: int | None = None
            ) -> tuple[pd.DataFrame, dict[str, CachedItem], dict[str, list[str]], Path]:
    """The items (with patient_id, sop_instance_uid, has_mask), cache entries and masks."""
    if data_root is None:
        from ai.data.labelled import default_data_root

        data_root = default_data_root()
    root = Path(data_root)
    items = subsample(load_items(root), config.max_items, config.seed)
    masks = mask_codes(root)
    if config.arch.seg_head and not masks:
        raise ValueError(f"{root}: the {config.name} recipe needs train-rle.csv(.gz) masks")
    cache = ImageCache(cache_dir, config.size, workers)
    paths = list(items["path"])
    cache.fill(paths, masks)
    entries = cache.load(paths)
    items = items.assign(
        patient_id=[entries[p].patient_id for p in paths],
        sop_instance_uid=[entries[p].sop_instance_uid for p in paths],
        has_mask=[entries[p].mask is not None for p in paths],
    )
    return items, entries, masks, root


def model_card(config: Recipe, items: pd.DataFrame, summary: dict[str, Any]
               ) -> dict[str, Any]:
    """The short card in model.json: data, balance, cross-validated figures, intended use."""
    figures = summary["figures"]
    headline = {name: figures[name] for name in ("roc_auc", "sensitivity", "specificity",
                                                  "gradcam_peak_in_mask",
                                                  "segmentation_peak_in_mask")
                if name in figures}
    return {
        "intended_use": INTENDED_USE,
        "data": {"n_images": len(items), "n_patients": int(items["patient_id"].nunique()),
                 "n_per_class": {str(k): int(v)
                                 for k, v in items["label"].value_counts().items()},
                 "positives_with_masks": int(items["has_mask"].sum())},
        "evaluation": summary["evaluation"],
        "cross_validated_figures": headline,
        "decision_threshold": {
            "value": summary["threshold"],
            "rule": summary["threshold_choice"]["rule"],
            "sensitivity": summary["threshold_choice"]["sensitivity"],
            "specificity": summary["threshold_choice"]["specificity"],
            "note": (OPTIMISTIC if summary["threshold_choice"]["rule"] != "fixed" else
                     "fixed with --threshold; rates on the pooled out-of-fold predictions")
            + f"; cross_validated_figures sensitivity/specificity are at "
              f"{summary['figures_threshold']:g}",
        },
        "note": "Figures are cross-validated (mean and 95 % interval over folds); the "
                "artifact's model is refitted on all images and has no held-out figures of "
                "its own.",
    }


def train(config: Recipe, data_root: str | Path | None, out_dir: str | Path,
          device: str = "auto", cache_dir: str | Path | None = None,
          init_weights: str | Path | None = None, workers: int | None = None,
          nested: bool = False, inner_folds: int | None = None,
          model_name: str | None = None) -> TrainResult:
    """Cross-validate `config`, fit it on all the data and write the artifact + reports.

    `model_name` names the model in model.json (default: recipe and architecture).
    `nested`: also run the nested cross-validation of `ai.train.nested` (`inner_folds`, default
    folds - 1) and write reports/nested.json and reports/nested_predictions.csv.
    """
    from ai.train.evaluation_report import write_cv_reports
    from ai.train.fit import LOSSES, OPTIMIZERS, fit_model

    for table, key in ((LOSSES, config.loss), (OPTIMIZERS, config.optimizer)):
        if key not in table:
            raise ValueError(f"unknown setting {key!r}; known: {sorted(table)}")
    if config.arch.seg_head and config.mixup:
        raise ValueError("mixup does not mix masks; use it without a mask head")
    if config.threshold_rule not in ("youden", "fixed"):
        raise ValueError(f"unknown threshold rule {config.threshold_rule!r}; "
                         "use youden or fixed")
    if nested and inner_folds is not None and inner_folds < 2:
        raise ValueError("nested cross-validation needs at least 2 inner folds")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    items, entries, masks, root = prepare(config, data_root, cache_dir, workers)
    if POSITIVE not in set(items["label"]):
        raise ValueError(f"labels {sorted(set(items['label']))} do not include {POSITIVE!r}")
    target_device = resolve_device(device)
    log.info("training %s on %d files (%d patients) from %s on %s", config.name, len(items),
             items["patient_id"].nunique(), root, target_device)
    folds = assign_folds(items["label"], items["patient_id"], config.folds, config.seed)
    items = items.assign(fold=folds)
    cv = cross_validate(items, folds, config, entries, masks, target_device, init_weights)
    summary = cv.summary(config)
    cv_seconds = time.perf_counter() - started
    log.info("decision threshold %.4f (%s) from %s", summary["threshold"],
             summary["threshold_choice"]["rule"], summary["threshold_choice"]["source"])
    nested_summary, nested_seconds = None, None
    if nested:
        nested_summary = run_nested(out, items, folds, config, entries, target_device, cv,
                                    inner_folds, init_weights)
        nested_seconds = nested_summary["seconds"]
    log.info("final model: %d epochs on all %d images", config.epochs, len(items))
    with tempfile.TemporaryDirectory(prefix="pneumonode-train-") as work:
        final = fit_model(items, config, target_device, entries, [], Path(work), init_weights,
                          reports=out / "reports")
    classes = sorted(items["label"].unique())
    model_name = model_name or f"pneumonode pneumothorax {config.name} {config.arch.name}"
    card = model_card(config, items, summary)
    training_meta = {
        "config": config.to_json(),
        "data_root": str(root),
        "data_fingerprint": fingerprint(items),
        "n_items": len(items),
        "n_per_class": {str(k): int(v) for k, v in items["label"].value_counts().items()},
        "train_files": list(items["file"]),
        "folds": {str(f): list(items.loc[items["fold"] == f, "file"])
                  for f in range(config.folds)},
        "device": str(target_device),
        "seconds": {"cross_validation": round(cv_seconds, 1),
                    "nested_cross_validation": nested_seconds,
                    "final_fit": round(final.seconds, 1)},
        "lr": final.lr,
        "lr_find": final.lr_find,
        "init_weights": final.init,
        "card": card,
    }
    metrics = {**summary, "final_model": "fitted on all images (refit); figures above are "
               "cross-validated"}
    if nested_summary is not None:
        metrics["nested"] = {"file": f"reports/{NESTED_FILE}",
                             "evaluation": nested_summary["evaluation"],
                             "pooled": nested_summary["pooled"]}
    save_artifact(out, final.model, arch=config.arch, input_size=config.size, classes=classes,
                  positive_class=POSITIVE, threshold=summary["threshold"], mean=config.mean,
                  std=config.std, name=model_name, tta=config.tta, training=training_meta,
                  metrics=metrics)
    metrics["export_check"] = export_check(out, final.model, config, classes, items, entries,
                                           target_device)
    write_cv_reports(out, metrics, cv, items, entries, model_name, final.learner)
    log.info("trained %s in %.1f s; cross-validated ROC AUC %s", config.name,
             time.perf_counter() - started, summary["figures"].get("roc_auc"))
    return TrainResult(model_dir=out, metrics=metrics, cross_validation=cv,
                       nested=nested_summary)


def run_nested(out: Path, items: pd.DataFrame, folds: np.ndarray, config: Recipe,
               entries: dict[str, CachedItem], device: torch.device, cv: CrossValidation,
               inner_folds: int | None, init_weights: str | Path | None) -> dict[str, Any]:
    """`ai.train.nested` over the cross-validation's folds; nested.json is rewritten after every
    outer fold (complete: false until the last), so a long run leaves its partial result."""
    from ai.train.nested import PREDICTIONS_FILE, nested_cross_validate

    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)

    def write(summary: dict[str, Any], table: pd.DataFrame) -> None:
        (reports / NESTED_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        table.to_csv(reports / PREDICTIONS_FILE, index=False)

    summary, table = nested_cross_validate(items, folds, config, entries, device,
                                           cv.predictions(), inner_folds, init_weights,
                                           on_fold=write, same_data=cv.threshold(config))
    write(summary, table)
    return summary


def export_check(model_dir: Path, model: torch.nn.Module, config: Recipe,
                 classes: list[str], items: pd.DataFrame, entries: dict[str, CachedItem],
                 device: torch.device, count: int = 16) -> dict[str, float]:
    """Reload the artifact: it must reproduce the in-memory model's probabilities and maps
    on (up to) `count` images, read from the DICOM files as the node reads them."""
    from ai.data.preprocess import read_grey8

    chosen = items.head(count)
    reloaded = Analyzer(model_dir, device=str(device), precision="fp32")
    description = model_description(model, config, classes, config.tta)
    original = Analyzer(in_memory(model, description, device), precision="fp32")
    images = [read_grey8(path) for path in chosen["path"]]
    first, second = original.explain(images), reloaded.explain(images)
    probability = max(abs(a.probability - b.probability) for a, b in zip(first, second,
                                                                          strict=True))
    maps = max(float(np.max(np.abs(a.heatmap - b.heatmap)))
               for a, b in zip(first, second, strict=True))
    log.info("reloaded artifact reproduces probabilities within %.1e and %s maps within %.1e",
             probability, reloaded.default_method(), maps)
    return {"n": len(images), "method": reloaded.default_method(),
            "max_abs_probability_diff": probability, "max_abs_map_diff": maps}
