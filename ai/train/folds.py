"""Cross-validation folds and the intervals reported over them.

Folds are stratified by label (each fold keeps the class balance) and grouped by Patient ID
(no patient has images on both sides of a split, so a model is never validated on a person
it has seen). The figures a recipe reports are the mean over folds with a 95 % Student-t
interval: with five folds of 40 images, one split's AUC moves by about 0.08 from chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.model_selection import StratifiedGroupKFold


def assign_folds(labels: Sequence[str], groups: Sequence[str], n_folds: int,
                 seed: int) -> np.ndarray:
    """Fold number (0..n_folds-1) of every item: stratified by label, grouped by `groups`.

    An empty group (no Patient ID) is its own group, so such images are never pooled.
    """
    labels = np.asarray(labels)
    groups = np.asarray([g if g else f"\0item{i}" for i, g in enumerate(groups)])
    if n_folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    counts = pd.Series(labels).value_counts()
    if counts.min() < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} images of every label; "
                         f"have {counts.to_dict()}")
    if len(set(groups)) < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} patients")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(labels), -1, dtype=int)
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[valid] = fold
    return folds


def mean_interval(values: Sequence[float | None], level: float = 0.95,
                  bounds: tuple[float, float] | None = (0.0, 1.0)
                  ) -> dict[str, float | int | None]:
    """Mean over folds with a Student-t interval (`level`), the folds' SD and how many counted.

    Folds where a figure is undefined (None or NaN: e.g. no positive image in a fold) are
    left out and `n` says how many remained; with one value the interval is that value.
    The interval is clipped to `bounds` (rates and AUCs lie in 0..1; None for seconds).
    """
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return {"mean": None, "low": None, "high": None, "sd": None, "n": 0}
    mean = float(finite.mean())
    if finite.size == 1:
        return {"mean": mean, "low": mean, "high": mean, "sd": 0.0, "n": 1}
    sd = float(finite.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, finite.size - 1) * sd / math.sqrt(finite.size))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "low": low, "high": high, "sd": sd, "n": int(finite.size)}


def bootstrap_auc(truth: np.ndarray, scores: np.ndarray, seed: int = 0, rounds: int = 2000,
                  level: float = 0.95) -> dict[str, float | None]:
    """ROC AUC of pooled out-of-fold predictions with a percentile bootstrap interval."""
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    if truth.all() or not truth.any():
        return {"auc": None, "low": None, "high": None}
    values = bootstrap_values(truth, lambda pick: rank_auc(truth[pick], scores[pick]),
                              seed, rounds)
    tail = (1 - level) / 2 * 100
    return {"auc": rank_auc(truth, scores),
            "low": float(np.percentile(values, tail)),
            "high": float(np.percentile(values, 100 - tail))}


def bootstrap_values(truth: np.ndarray, statistic: Callable[[np.ndarray], float], seed: int,
                     rounds: int) -> list[float]:
    """`statistic(pick)` on `rounds` resamples (with replacement) of the images, skipping a
    resample that lacks one of the classes: an AUC needs both."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, truth.size, truth.size)
        if truth[pick].all() or not truth[pick].any():
            continue
        values.append(statistic(pick))
    return values


def rank_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half), fast enough to bootstrap."""
    ranks = stats.rankdata(scores)
    positives = int(truth.sum())
    negatives = truth.size - positives
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) /
                 (positives * negatives))
