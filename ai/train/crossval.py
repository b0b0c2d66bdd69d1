"""Cross-validation of a recipe: one model per fold, each judged on the images it never saw.

Every fold's model is evaluated through the node's own inference code (`ai.analysis.infer.Analyzer`
over an in-memory artifact description), with and without test-time flips, and its
heatmaps (GradCAM, and the mask head's map when the model has one) are scored against the
SIIM masks of the fold's positive images. The summary is the mean over folds with a 95 %
interval for each figure, plus the ROC AUC of all out-of-fold predictions pooled.

The decision threshold the exported model uses is chosen here too (`choose_threshold`, rule
`THRESHOLD_RULE`) from the pooled out-of-fold predictions, unless a fixed one is given. Its
sensitivity and specificity on those same predictions are optimistic (the threshold was fitted
to them); `ai.train.nested` measures the rule honestly.
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

from ai.analysis.infer import Analyzer
from ai.data.imagecache import CachedItem
from ai.data.labelled import POSITIVE, mask_union
from ai.model.artifact import describe, in_memory
from ai.train.evaluation_report import classification_metrics
from ai.train.fit import fit_model
from ai.train.folds import bootstrap_auc, mean_interval
from ai.train.localise import score_heatmap
from ai.train.recipes import Recipe

log = logging.getLogger(__name__)

EVALUATION = "stratified k-fold cross-validation grouped by PatientID"
THRESHOLD_RULE = (
    "Youden's J: the threshold maximising sensitivity + specificity - 1 over the pooled "
    "out-of-fold probabilities (an image is positive when p >= threshold), placed halfway "
    "between the two adjacent probabilities where J peaks; ties go to the highest such "
    "threshold (fewest positive calls); with one class only, or when no threshold beats "
    "chance (J <= 0), the fixed threshold is kept")
OPTIMISTIC = (
    "optimistic: the threshold was chosen on these same out-of-fold predictions, so "
    "sensitivity and specificity at it are fitted, not held out; `train --nested` measures "
    "the rule on data the choice never saw (nested.json)")
FIGURES = ("roc_auc", "sensitivity", "specificity", "accuracy", "roc_auc_tta",
           "sensitivity_tta", "specificity_tta", "roc_auc_mask",
           "gradcam_peak_in_mask", "gradcam_energy_in_mask",
           "segmentation_peak_in_mask", "segmentation_energy_in_mask", "mask_area_share")


@dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold and how it was reached, with the rates it gives on the
    predictions it was chosen from (`n` of them; None where a class is missing)."""

    threshold: float
    rule: str  # "youden", "fixed", or "fallback" (Youden undefined: the fixed one kept)
    reason: str
    n: int
    youden_j: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "rule": self.rule, "reason": self.reason,
                "n": self.n, "youden_j": self.youden_j, "sensitivity": self.sensitivity,
                "specificity": self.specificity}


def rates_at(truth: np.ndarray, scores: np.ndarray, threshold: float
             ) -> tuple[float | None, float | None]:
    """Sensitivity and specificity when p >= `threshold` is called positive."""
    truth = np.asarray(truth, dtype=bool)
    called = np.asarray(scores, dtype=float) >= threshold
    positives, negatives = int(truth.sum()), int((~truth).sum())
    sensitivity = float((called & truth).sum() / positives) if positives else None
    specificity = float((~called & ~truth).sum() / negatives) if negatives else None
    return sensitivity, specificity


def choose_threshold(truth: np.ndarray, scores: np.ndarray, fallback: float = 0.5
                     ) -> ThresholdChoice:
    """The Youden-J threshold of `scores` against `truth` (see `THRESHOLD_RULE`).

    Candidates are the distinct scores u_0 < ... < u_m-1: calling p >= u_i positive gives
    the same labels as any threshold in (u_i-1, u_i], whose midpoint is returned. J is
    compared in integers (tp * N - fp * P), so ties are exact. `fallback` is returned, marked
    so, when there is only one class, no finite score, or no threshold with J > 0.
    """
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    finite = np.isfinite(scores)
    truth, scores = truth[finite], scores[finite]
    n = int(truth.size)
    positives, negatives = int(truth.sum()), int(n - truth.sum())
    if positives == 0 or negatives == 0:
        return ThresholdChoice(float(fallback), "fallback", "Youden's J is undefined: the "
                               f"predictions hold {positives} positive and {negatives} "
                               "negative images", n)
    distinct = np.unique(scores)
    tp = positives - np.searchsorted(np.sort(scores[truth]), distinct, side="left")
    fp = negatives - np.searchsorted(np.sort(scores[~truth]), distinct, side="left")
    scaled = tp.astype(np.int64) * negatives - fp.astype(np.int64) * positives  # J * P * N
    best = int(scaled.max())
    if best <= 0:
        sensitivity, specificity = rates_at(truth, scores, fallback)
        return ThresholdChoice(float(fallback), "fallback", "no threshold beats chance "
                               "(Youden's J <= 0)", n, 0.0, sensitivity, specificity)
    index = int(np.flatnonzero(scaled == best)[-1])  # >= 1: at u_0 everything is positive
    threshold = float((distinct[index - 1] + distinct[index]) / 2)
    if not distinct[index - 1] < threshold <= distinct[index]:  # adjacent floats
        threshold = float(distinct[index])
    return ThresholdChoice(threshold, "youden", THRESHOLD_RULE, n,
                           best / (positives * negatives), float(tp[index] / positives),
                           float((negatives - fp[index]) / negatives))


def fixed_threshold(threshold: float, truth: np.ndarray, scores: np.ndarray
                    ) -> ThresholdChoice:
    sensitivity, specificity = rates_at(truth, scores, threshold)
    j = None if sensitivity is None or specificity is None else sensitivity + specificity - 1
    return ThresholdChoice(float(threshold), "fixed", "given with --threshold (or the "
                           "recipe's threshold_rule = fixed)", int(np.asarray(truth).size), j,
                           sensitivity, specificity)


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

    def threshold(self, config: Recipe) -> ThresholdChoice:
        """The model's decision threshold: chosen on the pooled out-of-fold predictions
        (`choose_threshold`), or the config's when its rule is "fixed"."""
        pooled = self.predictions()
        truth = pooled["label"].eq(POSITIVE).to_numpy()
        scores = pooled[primary_column(config)].to_numpy(dtype=float)
        if config.threshold_rule == "fixed":
            return fixed_threshold(config.threshold, truth, scores)
        return choose_threshold(truth, scores, fallback=config.threshold)

    def summary(self, config: Recipe) -> dict[str, Any]:
        """Every figure as mean and 95 % interval over the folds, the pooled AUC, and the
        decision threshold with the (optimistic) rates it gives on the pooled predictions."""
        choice = self.threshold(config)
        chosen = choice.rule != "fixed"
        per_fold = {f.fold: dict(f.figures) for f in self.folds}
        if chosen:
            for f in self.folds:
                truth = f.predictions["label"].eq(POSITIVE).to_numpy()
                scores = f.predictions[primary_column(config)].to_numpy(dtype=float)
                sensitivity, specificity = rates_at(truth, scores, choice.threshold)
                per_fold[f.fold]["sensitivity_chosen_threshold"] = sensitivity
                per_fold[f.fold]["specificity_chosen_threshold"] = specificity
        names = FIGURES + (("sensitivity_chosen_threshold", "specificity_chosen_threshold")
                           if chosen else ())
        figures = {name: mean_interval([per_fold[f.fold].get(name) for f in self.folds])
                   for name in names}
        figures = {name: value for name, value in figures.items() if value["n"]}
        pooled = self.predictions()
        truth = pooled["label"].eq(POSITIVE).to_numpy()
        return {
            "evaluation": f"{len(self.folds)}-fold {EVALUATION}",
            "cross_validated": True,
            "recipe": config.name,
            "n_folds": len(self.folds),
            "threshold": choice.threshold,
            "threshold_choice": {
                **choice.to_json(),
                "source": f"pooled out-of-fold {primary_column(config)} "
                          f"({len(pooled)} images)",
                "rates_note": OPTIMISTIC if chosen else "the threshold was fixed before "
                              "cross-validation; these are held-out rates",
            },
            "figures_threshold": config.threshold,
            "figures_threshold_note": (
                "sensitivity, specificity and accuracy (and their _tta variants) in figures "
                f"are at the fixed threshold {config.threshold:g}"
                + ("; *_chosen_threshold at the model's threshold above, chosen on the "
                   "same predictions (optimistic)" if chosen else "")),
            "tta": config.tta,
            "interval": "95 % Student-t interval over folds (mean +- t * sd / sqrt(k))",
            "figures": figures,
            "pooled_out_of_fold": {
                "n": int(len(pooled)),
                "roc_auc": bootstrap_auc(truth, pooled[primary_column(config)].to_numpy(),
                                         seed=config.seed),
                "interval": "95 % percentile bootstrap over images",
            },
            "seconds_per_fold": mean_interval([f.seconds for f in self.folds], bounds=None),
            "per_fold": [{"fold": f.fold, "seconds": round(f.seconds, 1), "lr": f.lr,
                          **{k: v for k, v in per_fold[f.fold].items() if v is not None}}
                         for f in self.folds],
        }


def primary_column(config: Recipe) -> str:
    """The out-of-fold column the model's own predictions correspond to."""
    return "probability_tta" if config.tta else "probability"


def model_description(model: nn.Module, config: Recipe, classes: list[str],
                      tta: bool) -> dict[str, Any]:
    return describe(model, arch=config.arch, input_size=config.size, classes=classes,
                    positive_class=POSITIVE, threshold=config.threshold, mean=config.mean,
                    std=config.std, name=f"{config.name} fold model", tta=tta)


def _rates(probabilities: np.ndarray, truth: np.ndarray, threshold: float,
           classes: list[str]) -> dict[str, Any]:
    return classification_metrics(probabilities, truth, threshold, classes,
                                  classes.index(POSITIVE))


def evaluate_fold(model: nn.Module, config: Recipe, classes: list[str],
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
                full_masks[uid] = mask_union(masks[uid], entries[path].shape)
            peak, energy, area = score_heatmap(prediction.heatmap, full_masks[uid])
            rows.append({"path": path, "sop_instance_uid": uid, "method": method,
                         "probability": prediction.probability, "peak_in_mask": peak,
                         "energy_in_mask": energy, "mask_area_share": area})
    return pd.DataFrame(rows)


def cross_validate(items: pd.DataFrame, folds: np.ndarray, config: Recipe,
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
