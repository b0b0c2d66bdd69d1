"""Nested cross-validation: refit against fold ensemble, and the CV-chosen threshold, measured
on images that neither the models nor the threshold ever saw (`pneumonode train --nested`).

For every outer fold k of the ordinary cross-validation (the same stratified, patient-grouped
folds):

- "refit" is what `train` exports, one level down: a model trained on the other outer folds.
  That is exactly the ordinary cross-validation's fold-k model, so its test predictions are
  taken from it and nothing is retrained.
- "ensemble" is the mean probability of the inner models: one per inner fold j, each trained
  on the outer-training images outside j.
- the decision threshold for fold k is chosen by `ai.train.crossval.choose_threshold` (the rule the
  exported model's threshold follows) from the inner models' out-of-fold predictions only,
  then applied to fold k's refit and ensemble probabilities.

By default the inner folds are the other k-1 outer folds. Then the inner model for (outer a,
inner b) is trained on the folds outside {a, b} -- the same images as the one for (outer b,
inner a) -- so each such model is trained once and serves both: 5 outer folds need 10 inner
fits, not 20. `inner_folds` other than k-1 splits each outer-training set afresh
(stratified, grouped by patient) and trains every inner model.

Pooled figures are over all outer test predictions (each image judged by the models and
threshold of its own fold): AUCs with a percentile bootstrap over images, the ensemble-minus-
refit AUC difference with a paired bootstrap (the same resampled images for both), sensitivity
and specificity with Wilson intervals. Per-fold figures are the mean over outer folds with the
Student-t interval of `ai.train.folds.mean_interval`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ai.analysis.infer import Analyzer
from ai.data.imagecache import CachedItem
from ai.data.labelled import POSITIVE
from ai.model.artifact import in_memory
from ai.train.crossval import (
    THRESHOLD_RULE,
    ThresholdChoice,
    choose_threshold,
    fixed_threshold,
    model_description,
    primary_column,
    rates_at,
)
from ai.train.folds import assign_folds, bootstrap_auc, bootstrap_values, mean_interval, rank_auc
from ai.train.recipes import Recipe

log = logging.getLogger(__name__)

NESTED_FILE = "nested.json"
PREDICTIONS_FILE = "nested_predictions.csv"
PER_FOLD = ("roc_auc_refit", "roc_auc_ensemble", "roc_auc_difference", "threshold",
            "sensitivity_refit", "specificity_refit", "sensitivity_ensemble",
            "specificity_ensemble")


def inner_folds(outer: np.ndarray, labels: np.ndarray, groups: np.ndarray, test_fold: int,
                n_inner: int, seed: int) -> np.ndarray:
    """Inner fold (0..n_inner-1) of every item outside outer fold `test_fold`; -1 inside it.

    With n_inner = (outer folds - 1) the inner folds are the other outer folds, renumbered
    in order (they are stratified and patient-grouped already). Otherwise the outer-training
    items are split by `assign_folds` (stratified, grouped by patient, seed + test_fold).
    """
    outer = np.asarray(outer)
    n_outer = int(outer.max()) + 1
    if n_inner < 2:
        raise ValueError("nested cross-validation needs at least 2 inner folds")
    result = np.full(outer.size, -1, dtype=int)
    training = outer != test_fold
    if n_inner == n_outer - 1:
        for inner, fold in enumerate(f for f in range(n_outer) if f != test_fold):
            result[outer == fold] = inner
    else:
        result[training] = assign_folds(np.asarray(labels)[training],
                                        np.asarray(groups)[training], n_inner,
                                        seed + test_fold)
    return result


def wilson(successes: int, total: int, level: float = 0.95) -> dict[str, float | int | None]:
    """A proportion with its Wilson score interval."""
    if total == 0:
        return {"value": None, "low": None, "high": None, "k": 0, "n": 0}
    z = float(stats.norm.ppf(0.5 + level / 2))
    share = successes / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / \
        (1 + z * z / total)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return {"value": share, "low": low, "high": high,
            "k": int(successes), "n": int(total)}


def paired_auc_difference(truth: np.ndarray, first: np.ndarray, second: np.ndarray,
                          seed: int = 0, rounds: int = 2000, level: float = 0.95
                          ) -> dict[str, float | int | None]:
    """AUC(second) - AUC(first) on the same images, with a paired percentile bootstrap (both
    scored on the same resampled images) and the share of rounds where second wins."""
    truth = np.asarray(truth, dtype=bool)
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if truth.all() or not truth.any():
        return {"difference": None, "low": None, "high": None, "share_above_zero": None,
                "rounds": 0}
    values = bootstrap_values(
        truth,
        lambda pick: rank_auc(truth[pick], second[pick]) - rank_auc(truth[pick], first[pick]),
        seed, rounds,
    )
    tail = (1 - level) / 2 * 100
    values_array = np.asarray(values)
    return {"difference": rank_auc(truth, second) - rank_auc(truth, first),
            "low": float(np.percentile(values_array, tail)),
            "high": float(np.percentile(values_array, 100 - tail)),
            "share_above_zero": float((values_array > 0).mean()), "rounds": len(values)}


@dataclass
class OuterFold:
    """One outer fold's test images and what the nested procedure made of them."""

    fold: int
    index: np.ndarray  # item positions of the outer test fold
    truth: np.ndarray
    refit: np.ndarray
    ensemble: np.ndarray
    choice: ThresholdChoice
    inner_models: int

    def figures(self) -> dict[str, Any]:
        refit_auc = _auc(self.truth, self.refit)
        ensemble_auc = _auc(self.truth, self.ensemble)
        sens_refit, spec_refit = rates_at(self.truth, self.refit, self.choice.threshold)
        sens_ens, spec_ens = rates_at(self.truth, self.ensemble, self.choice.threshold)
        return {"fold": self.fold, "n": int(self.truth.size),
                "n_positive": int(self.truth.sum()),
                "roc_auc_refit": refit_auc, "roc_auc_ensemble": ensemble_auc,
                "roc_auc_difference": (None if refit_auc is None or ensemble_auc is None
                                       else ensemble_auc - refit_auc),
                "threshold": self.choice.threshold, "threshold_rule": self.choice.rule,
                "inner_out_of_fold_n": self.choice.n,
                "inner_sensitivity": self.choice.sensitivity,
                "inner_specificity": self.choice.specificity,
                "sensitivity_refit": sens_refit, "specificity_refit": spec_refit,
                "sensitivity_ensemble": sens_ens, "specificity_ensemble": spec_ens,
                "inner_models": self.inner_models}


def _auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    return rank_auc(truth, scores) if 0 < truth.sum() < truth.size else None


def _rates(folds: list[OuterFold], column: str, threshold: float | None = None
           ) -> dict[str, Any]:
    """Pooled sensitivity and specificity of `column` ("refit" or "ensemble") with Wilson
    intervals, each fold's probabilities called at its own nested threshold, or at
    `threshold` for all (then also reported)."""
    truth = np.concatenate([f.truth for f in folds])
    called = np.concatenate([
        getattr(f, column) >= (f.choice.threshold if threshold is None else threshold)
        for f in folds])
    rates = {"sensitivity": wilson(int((called & truth).sum()), int(truth.sum())),
             "specificity": wilson(int((~called & ~truth).sum()), int((~truth).sum()))}
    return rates if threshold is None else {"threshold": threshold, **rates}


def summarise(folds: list[OuterFold], config: Recipe, n_outer: int, n_inner: int,
              inner_split: str, models_trained: int, seconds: float,
              same_data: ThresholdChoice | None) -> dict[str, Any]:
    """nested.json: pooled and per-fold figures of refit vs ensemble and of the threshold."""
    truth = np.concatenate([f.truth for f in folds]) if folds else np.zeros(0, bool)
    refit = np.concatenate([f.refit for f in folds]) if folds else np.zeros(0)
    ensemble = np.concatenate([f.ensemble for f in folds]) if folds else np.zeros(0)
    per_fold = [f.figures() for f in folds]
    bounds = {"roc_auc_difference": (-1.0, 1.0)}
    summary_per_fold = {name: mean_interval([row[name] for row in per_fold],
                                            bounds=bounds.get(name, (0.0, 1.0)))
                        for name in PER_FOLD}
    chosen = config.threshold_rule != "fixed"
    return {
        "evaluation": f"nested cross-validation: {n_outer} outer folds (stratified, grouped by "
                      f"PatientID: the train folds) x {n_inner} inner folds ({inner_split})",
        "complete": len(folds) == n_outer,
        "outer_folds_done": len(folds),
        "recipe": config.name,
        "config": config.to_json(),
        "n_outer_folds": n_outer,
        "n_inner_folds": n_inner,
        "inner_split": inner_split,
        "inner_models_trained": models_trained,
        "models": {
            "refit": "one model trained on all the outer-training folds (the ordinary "
                     "cross-validation fold model): what `train` exports, one level down",
            "ensemble": f"mean probability of the {n_inner} inner models, each trained on "
                        "the outer-training images outside one inner fold",
        },
        "threshold_rule": THRESHOLD_RULE if chosen else
        f"fixed at {config.threshold:g} (--threshold)",
        "threshold_note": "each outer fold's threshold is chosen from the inner models' "
                          "out-of-fold predictions only (never from the outer test fold) and "
                          "applied to that fold's refit and ensemble probabilities; so the "
                          "rates below are held out, unlike those at a threshold chosen on "
                          "the same predictions",
        "probability": primary_column(config),
        "pooled": {
            "n": int(truth.size),
            "n_positive": int(truth.sum()),
            "roc_auc_refit": bootstrap_auc(truth, refit, seed=config.seed)
            if folds else None,
            "roc_auc_ensemble": bootstrap_auc(truth, ensemble, seed=config.seed)
            if folds else None,
            "roc_auc_difference": paired_auc_difference(truth, refit, ensemble,
                                                        seed=config.seed)
            if folds else None,
            "difference": "ensemble minus refit; paired 95 % percentile bootstrap over images",
            "refit_at_nested_threshold": _rates(folds, "refit") if folds else None,
            "ensemble_at_nested_threshold": _rates(folds, "ensemble") if folds else None,
            "refit_at_fixed_threshold": _rates(folds, "refit", config.threshold)
            if folds else None,
            "ensemble_at_fixed_threshold": _rates(folds, "ensemble", config.threshold)
            if folds else None,
            "interval": "AUC: 95 % percentile bootstrap over images; rates: 95 % Wilson "
                        "interval",
        },
        "same_data_threshold": None if same_data is None else {
            **same_data.to_json(),
            "note": "the exported model's threshold, chosen on the pooled outer out-of-fold "
                    "predictions and scored on them: optimistic, for comparison with the "
                    "nested rates above",
        },
        "per_fold_summary": summary_per_fold,
        "per_fold_interval": "95 % Student-t interval over outer folds",
        "per_fold": per_fold,
        "seconds": round(seconds, 1),
    }


def _predict(model: torch.nn.Module, config: Recipe, classes: list[str],
             images: list[np.ndarray], device: torch.device) -> np.ndarray:
    analyzer = Analyzer(in_memory(model, model_description(model, config, classes,
                                                           config.tta), device),
                        batch_size=32, precision="fp32")
    return np.asarray(analyzer.predict(images), dtype=float)


def nested_cross_validate(items: pd.DataFrame, folds: np.ndarray, config: Recipe,
                          entries: dict[str, CachedItem], device: torch.device,
                          refit: pd.DataFrame, n_inner: int | None = None,
                          init_weights: str | Path | None = None,
                          on_fold: Callable[[dict[str, Any], pd.DataFrame], None] | None = None,
                          same_data: ThresholdChoice | None = None
                          ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run the nested procedure over the outer `folds`; `refit` is the ordinary
    cross-validation's out-of-fold table (`CrossValidation.predictions()`).

    Returns nested.json's content and the per-image table. `on_fold` gets both after each
    outer fold (complete: false until the last), so a long run leaves its partial result.
    """
    from ai.train.fit import fit_model

    started = time.perf_counter()
    folds = np.asarray(folds)
    n_outer = int(folds.max()) + 1
    n_inner = n_outer - 1 if n_inner is None else int(n_inner)
    inner_split = ("the other outer folds; each inner model serves two outer folds"
                   if n_inner == n_outer - 1 else
                   "outer-training images re-split, stratified and grouped by PatientID")
    classes = sorted(items["label"].unique())
    labels = items["label"].to_numpy()
    truth_all = items["label"].eq(POSITIVE).to_numpy()
    groups = items["patient_id"].to_numpy()
    column = primary_column(config)
    by_file = dict(zip(refit["file"], refit[column], strict=True))
    refit_all = np.asarray([by_file[name] for name in items["file"]], dtype=float)
    fits: dict[tuple[int, ...], dict[int, float]] = {}  # excluded items -> their predictions
    outer_results: list[OuterFold] = []
    rows = []
    for k in range(n_outer):
        inner = inner_folds(folds, labels, groups, k, n_inner, config.seed)
        test = np.flatnonzero(folds == k)
        oof_index, oof_scores, test_scores, trained = [], [], [], 0
        for j in range(n_inner):
            excluded = tuple(int(i) for i in np.flatnonzero((folds == k) | (inner == j)))
            if excluded not in fits:
                log.info("nested: outer fold %d/%d, inner fold %d/%d: training on %d images",
                         k + 1, n_outer, j + 1, n_inner, len(items) - len(excluded))
                seed = config.seed + 100 + len(fits)
                with tempfile.TemporaryDirectory(prefix="pneumonode-nested-") as work:
                    fitted = fit_model(items, replace(config, seed=seed), device, entries,
                                       list(excluded), Path(work), init_weights)
                images = [np.array(entries[items["path"].iloc[i]].image) for i in excluded]
                scores = _predict(fitted.model, config, classes, images, device)
                fits[excluded] = dict(zip(excluded, scores.tolist(), strict=True))
                trained += 1
                log.info("nested: inner model %d fitted in %.0f s", len(fits), fitted.seconds)
            predictions = fits[excluded]
            held = np.flatnonzero(inner == j)
            oof_index.extend(int(i) for i in held)
            oof_scores.extend(predictions[int(i)] for i in held)
            test_scores.append([predictions[int(i)] for i in test])
        oof_truth = truth_all[oof_index]
        if config.threshold_rule == "fixed":
            choice = fixed_threshold(config.threshold, oof_truth, np.asarray(oof_scores))
        else:
            choice = choose_threshold(oof_truth, np.asarray(oof_scores),
                                      fallback=config.threshold)
        ensemble = np.mean(np.asarray(test_scores), axis=0)
        result = OuterFold(k, test, truth_all[test], refit_all[test], ensemble, choice,
                           n_inner)
        outer_results.append(result)
        for position, i in enumerate(test):
            rows.append({"file": items["file"].iloc[i], "label": labels[i],
                         "patient_id": groups[i], "outer_fold": k,
                         "probability_refit": refit_all[i],
                         "probability_ensemble": float(ensemble[position]),
                         **{f"probability_inner{j}": float(test_scores[j][position])
                            for j in range(n_inner)},
                         "threshold": choice.threshold})
        figures = result.figures()
        log.info("nested: outer fold %d: AUC refit %s, ensemble %s; threshold %.3f (%s) -> "
                 "refit sensitivity %s, specificity %s (%d new inner fits)", k + 1,
                 _fmt(figures["roc_auc_refit"]), _fmt(figures["roc_auc_ensemble"]),
                 choice.threshold, choice.rule, _fmt(figures["sensitivity_refit"]),
                 _fmt(figures["specificity_refit"]), trained)
        if on_fold is not None:
            on_fold(summarise(outer_results, config, n_outer, n_inner, inner_split, len(fits),
                              time.perf_counter() - started, same_data), pd.DataFrame(rows))
    summary = summarise(outer_results, config, n_outer, n_inner, inner_split, len(fits),
                        time.perf_counter() - started, same_data)
    return summary, pd.DataFrame(rows)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interval(value: dict[str, Any] | None, key: str) -> str:
    if not value or value.get(key) is None:
        return "n/a"
    return f"{value[key]:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


def table_lines(nested: dict[str, Any]) -> list[str]:
    """The short console table of nested.json."""
    pooled, folds = nested["pooled"], nested["per_fold_summary"]
    lines = [f"nested: {nested['evaluation']}",
             f"{'figure':<40} {'pooled (95 % CI)':<26} per-fold mean (95 % CI)"]

    def row(name: str, pooled_text: str, fold_key: str | None) -> None:
        per = _interval(folds.get(fold_key), "mean") if fold_key else ""
        lines.append(f"{name:<40} {pooled_text:<26} {per}")

    row("ROC AUC refit", _interval(pooled["roc_auc_refit"], "auc"), "roc_auc_refit")
    row("ROC AUC ensemble", _interval(pooled["roc_auc_ensemble"], "auc"), "roc_auc_ensemble")
    row("AUC ensemble - refit (paired)", _interval(pooled["roc_auc_difference"], "difference"),
        "roc_auc_difference")
    row("nested threshold", "", "threshold")
    for model in ("refit", "ensemble"):
        rates = pooled[f"{model}_at_nested_threshold"] or {}
        for name in ("sensitivity", "specificity"):
            row(f"{name} {model} @ nested threshold", _interval(rates.get(name), "value"),
                f"{name}_{model}")
    return lines
