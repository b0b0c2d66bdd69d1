"""Cross-validation of a recipe: one model per fold, each judged on the images it never saw.

Every fold's model is evaluated through the node's own inference code (`ai.infer.Analyzer`
over an in-memory artifact description), with and without test-time flips, and its
heatmaps (GradCAM, and the mask head's map when the model has one) are scored against the
SIIM masks of the fold's positive images. The summary is the mean over folds with a 95 %
interval for each figure, plus the ROC AUC of all out-of-fold predictions pooled.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ai.artifact import describe, in_memory
from ai.configs import TrainConfig
from ai.data import POSITIVE, mask_for
from ai.folds import bootstrap_auc, mean_interval
from ai.imagecache import CachedItem
from ai.infer import Analyzer
from ai.localise import score_heatmap
from ai.reports import classification_metrics
from ai.training import fit_model

log = logging.getLogger(__name__)

EVALUATION = "stratified k-fold cross-validation grouped by PatientID"
FIGURES = ("roc_auc", "sensitivity", "specificity", "accuracy", "roc_auc_tta",
           "sensitivity_tta", "specificity_tta", "roc_auc_mask",
           "gradcam_peak_in_mask", "gradcam_energy_in_mask",
           "segmentation_peak_in_mask", "segmentation_energy_in_mask", "mask_area_share")


@dataclass
class FoldResult:
    """One fold: its figures, its out-of-fold predictions and localisation rows."""

    fold: int
    figures: dict[str, Any]
    predictions: pd.DataFrame
    localisation: pd.DataFrame
    seconds: float
    lr: float


@dataclass
class CrossValidation:
    folds: list[FoldResult] = field(default_factory=list)

    def predictions(self) -> pd.DataFrame:
        return pd.concat([f.predictions for f in self.folds], ignore_index=True)

    def localisation(self) -> pd.DataFrame:
        frames = [f.localisation for f in self.folds if len(f.localisation)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def summary(self, config: TrainConfig) -> dict[str, Any]:
        """Every figure as mean and 95 % interval over the folds, and the pooled AUC."""
        figures = {name: mean_interval([f.figures.get(name) for f in self.folds])
                   for name in FIGURES}
        figures = {name: value for name, value in figures.items() if value["n"]}
        pooled = self.predictions()
        truth = pooled["label"].eq(POSITIVE).to_numpy()
        primary = "probability_tta" if config.tta else "probability"
        return {
            "evaluation": f"{len(self.folds)}-fold {EVALUATION}",
            "cross_validated": True,
            "recipe": config.name,
            "n_folds": len(self.folds),
            "threshold": config.threshold,
            "tta": config.tta,
            "interval": "95 % Student-t interval over folds (mean +- t * sd / sqrt(k))",
            "figures": figures,
            "pooled_out_of_fold": {
                "n": int(len(pooled)),
                "roc_auc": bootstrap_auc(truth, pooled[primary].to_numpy(), seed=config.seed),
                "interval": "95 % percentile bootstrap over images",
            },
            "seconds_per_fold": mean_interval([f.seconds for f in self.folds], bounds=None),
            "per_fold": [{"fold": f.fold, "seconds": round(f.seconds, 1), "lr": f.lr,
                          **{k: v for k, v in f.figures.items() if v is not None}}
                         for f in self.folds],
        }


def model_description(model: nn.Module, config: TrainConfig, classes: list[str],
                      tta: bool) -> dict[str, Any]:
    return describe(model, arch=config.arch, input_size=config.size, classes=classes,
                    positive_class=POSITIVE, threshold=config.threshold, mean=config.mean,
                    std=config.std, name=f"{config.name} fold model", tta=tta)


def _rates(probabilities: np.ndarray, truth: np.ndarray, threshold: float,
           classes: list[str]) -> dict[str, Any]:
    return classification_metrics(probabilities, truth, threshold, classes,
                                  classes.index(POSITIVE))


def evaluate_fold(model: nn.Module, config: TrainConfig, classes: list[str],
                  valid: pd.DataFrame, entries: dict[str, CachedItem],
                  masks: dict[str, list[str]], device: torch.device
                  ) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Figures, per-image predictions and localisation rows of one model on `valid`."""
    images = [np.array(entries[path].image) for path in valid["path"]]  # not the mmap
    truth = valid["label"].eq(POSITIVE).to_numpy()
    plain = Analyzer(in_memory(model, model_description(model, config, classes, False), device),
                     batch_size=32, precision="fp32")
    flipped = Analyzer(in_memory(model, model_description(model, config, classes, True), device),
                       batch_size=32, precision="fp32")
    table = pd.DataFrame({"file": valid["file"].to_numpy(), "label": valid["label"].to_numpy(),
                          "patient_id": valid["patient_id"].to_numpy(),
                          "probability": plain.predict(images),
                          "probability_tta": flipped.predict(images)})
    figures: dict[str, Any] = {}
    for suffix, column in (("", "probability"), ("_tta", "probability_tta")):
        rates = _rates(table[column].to_numpy(), truth, config.threshold, classes)
        for name in ("roc_auc", "sensitivity", "specificity", "accuracy"):
            if suffix and name == "accuracy":
                continue
            figures[name + suffix] = rates[name]
    if config.arch.seg_head:
        table["probability_mask"] = _mask_probabilities(plain, images)
        figures["roc_auc_mask"] = _rates(table["probability_mask"].to_numpy(), truth,
                                         config.threshold, classes)["roc_auc"]
    analyzer = flipped if config.tta else plain
    localisation = localise_fold(analyzer, valid, entries, masks, config.arch.seg_head)
    for method in ("gradcam", "segmentation"):
        rows = localisation[localisation["method"] == method] if len(localisation) else []
        if len(rows):
            figures[f"{method}_peak_in_mask"] = float(rows["peak_in_mask"].mean())
            figures[f"{method}_energy_in_mask"] = float(rows["energy_in_mask"].mean())
            figures["mask_area_share"] = float(rows["mask_area_share"].mean())
    return figures, table, localisation


def _mask_probabilities(analyzer: Analyzer, images: list[np.ndarray]) -> list[float]:
    """The image's probability read off its mask: the highest pixel probability."""
    maps = analyzer.explain(images, method="segmentation")
    return [float(p.heatmap.max()) for p in maps]


def localise_fold(analyzer: Analyzer, valid: pd.DataFrame, entries: dict[str, CachedItem],
                  masks: dict[str, list[str]], has_mask_head: bool) -> pd.DataFrame:
    """Peak-in-mask and energy-in-mask of each positive validation image that has a mask,
    for GradCAM and (with a mask head) the segmentation map, at the mask's resolution."""
    chosen = [path for path in valid["path"]
              if entries[path].mask is not None and entries[path].sop_instance_uid in masks]
    if not chosen:
        return pd.DataFrame()
    images = [np.array(entries[path].image) for path in chosen]
    rows = []
    methods = ["gradcam"] + (["segmentation"] if has_mask_head else [])
    full_masks = {}
    for method in methods:
        for path, prediction in zip(chosen, analyzer.explain(images, method=method),
                                    strict=True):
            uid = entries[path].sop_instance_uid
            if uid not in full_masks:
                table = pd.DataFrame({"ImageId": uid, "EncodedPixels": masks[uid]})
                full_masks[uid] = mask_for(table, uid, entries[path].shape)
            peak, energy, area = score_heatmap(prediction.heatmap, full_masks[uid])
            rows.append({"path": path, "sop_instance_uid": uid, "method": method,
                         "probability": prediction.probability, "peak_in_mask": peak,
                         "energy_in_mask": energy, "mask_area_share": area})
    return pd.DataFrame(rows)


def cross_validate(items: pd.DataFrame, folds: np.ndarray, config: TrainConfig,
                   entries: dict[str, CachedItem], masks: dict[str, list[str]],
                   device: torch.device, init_weights: str | Path | None = None
                   ) -> CrossValidation:
    """Fit and evaluate one model per fold (`folds[i]` is item i's validation fold)."""
    result = CrossValidation()
    classes = sorted(items["label"].unique())
    for fold in range(int(folds.max()) + 1):
        valid_index = [int(i) for i in np.flatnonzero(folds == fold)]
        log.info("fold %d/%d: %d training, %d validation images", fold + 1,
                 int(folds.max()) + 1, len(items) - len(valid_index), len(valid_index))
        with tempfile.TemporaryDirectory(prefix="pneumonode-fold-") as work:
            fitted = fit_model(items, replace(config, seed=config.seed + fold), device,
                               entries, valid_index, Path(work), init_weights)
        valid = items.iloc[valid_index]
        figures, table, localisation = evaluate_fold(fitted.model, config, classes, valid,
                                                     entries, masks, device)
        table.insert(0, "fold", fold)
        if len(localisation):
            localisation.insert(0, "fold", fold)
        log.info("fold %d: ROC AUC %s, sensitivity %s, specificity %s, GradCAM peak in mask %s",
                 fold + 1, _fmt(figures.get("roc_auc")), _fmt(figures.get("sensitivity")),
                 _fmt(figures.get("specificity")), _fmt(figures.get("gradcam_peak_in_mask")))
        result.folds.append(FoldResult(fold, figures, table, localisation, fitted.seconds,
                                       fitted.lr))
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
