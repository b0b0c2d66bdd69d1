"""The CV-chosen decision threshold and the nested cross-validation's splits and statistics,
on synthetic arrays (milliseconds; the end-to-end runs are in test_ai_cv.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from ai.data.labelled import NEGATIVE, POSITIVE
from ai.train.crossval import choose_threshold, fixed_threshold, rates_at
from ai.train.folds import assign_folds, rank_auc
from ai.train.nested import inner_folds, paired_auc_difference, wilson


def test_perfect_separation_puts_the_threshold_between_the_classes():
    truth = np.array([False, False, False, True, True])
    choice = choose_threshold(truth, np.array([0.1, 0.2, 0.3, 0.6, 0.7]))
    assert choice.rule == "youden" and choice.threshold == pytest.approx(0.45)
    assert choice.sensitivity == choice.specificity == choice.youden_j == 1.0
    assert choice.n == 5
    # everything above 0.5 or below: the rule follows the scores, not the 0.5 convention
    low = choose_threshold(truth, np.array([0.01, 0.02, 0.03, 0.06, 0.07]))
    assert low.threshold == pytest.approx(0.045)
    assert rates_at(truth, np.array([0.01, 0.02, 0.03, 0.06, 0.07]), low.threshold) == (1, 1)


@pytest.mark.parametrize("truth", [np.zeros(6, bool), np.ones(6, bool), np.zeros(0, bool)])
def test_one_class_keeps_the_fixed_threshold(truth):
    choice = choose_threshold(truth, np.linspace(0.1, 0.9, truth.size), fallback=0.4)
    assert choice.rule == "fallback" and choice.threshold == 0.4
    assert "undefined" in choice.reason and choice.youden_j is None


def test_identical_scores_or_no_signal_keep_the_fixed_threshold():
    truth = np.array([True, False, True, False])
    choice = choose_threshold(truth, np.full(4, 0.3))
    assert choice.rule == "fallback" and choice.threshold == 0.5 and choice.youden_j == 0.0
    inverted = choose_threshold(truth, np.array([0.1, 0.9, 0.2, 0.8]))  # J <= 0 everywhere
    assert inverted.rule == "fallback"


def test_ties_in_j_go_to_the_highest_threshold_and_tied_scores_are_never_split():
    truth = np.array([False, True, False, True])
    # J = 0.5 at p >= 0.2 (2 TP, 1 FP) and at p >= 0.4 (1 TP, 0 FP): the higher one wins
    choice = choose_threshold(truth, np.array([0.1, 0.2, 0.3, 0.4]))
    assert choice.threshold == pytest.approx(0.35)
    assert (choice.sensitivity, choice.specificity) == (0.5, 1.0)
    tied = np.array([0.5, 0.5, 0.2, 0.8, 0.5])
    truth = np.array([True, False, False, True, True])
    choice = choose_threshold(truth, tied)
    assert not np.any(np.isclose(tied, choice.threshold))  # all 0.5s on one side
    assert choice.threshold in (pytest.approx(0.35), pytest.approx(0.65))


def test_youden_matches_the_roc_curve_maximum_and_ignores_nan():
    rng = np.random.default_rng(11)
    for _ in range(20):
        truth = rng.random(70) < 0.3
        scores = np.round(rng.random(70) * 0.6 + truth * 0.25, 2)  # ties included
        choice = choose_threshold(truth, scores)
        fpr, tpr, _ = roc_curve(truth, scores)
        assert choice.youden_j == pytest.approx(np.max(tpr - fpr))
        sensitivity, specificity = rates_at(truth, scores, choice.threshold)
        assert sensitivity == pytest.approx(choice.sensitivity)
        assert specificity == pytest.approx(choice.specificity)
    with_nan = choose_threshold(np.array([False, True, True]), np.array([0.2, np.nan, 0.7]))
    assert with_nan.n == 2 and with_nan.threshold == pytest.approx(0.45)


def test_a_fixed_threshold_is_kept_and_scored():
    truth = np.array([False, True, True, False])
    choice = fixed_threshold(0.3, truth, np.array([0.1, 0.4, 0.2, 0.35]))
    assert choice.rule == "fixed" and choice.threshold == 0.3
    assert (choice.sensitivity, choice.specificity) == (0.5, 0.5)


def _cohort(n: int = 150, seed: int = 0):
    rng = np.random.default_rng(seed)
    patients = np.array([f"p{i // 3}" for i in range(n)])  # three images per patient
    labels = np.array([POSITIVE if rng.random() < 0.3 else NEGATIVE for _ in patients])
    return labels, patients, assign_folds(labels, patients, 5, seed=1)


@pytest.mark.parametrize("n_inner", [4, 3])
def test_inner_folds_are_disjoint_grouped_and_never_hold_the_outer_test_fold(n_inner):
    labels, patients, outer = _cohort()
    for k in range(5):
        inner = inner_folds(outer, labels, patients, k, n_inner, seed=7)
        assert np.all(inner[outer == k] == -1)  # the outer test fold is in no inner fold
        assert set(inner[outer != k]) == set(range(n_inner))  # every training image: one
        table = pd.DataFrame({"patient": patients, "inner": inner})[outer != k]
        assert table.groupby("patient")["inner"].nunique().max() == 1
        assert not set(patients[outer == k]) & set(patients[outer != k])
        for j in range(n_inner):  # an inner model sees neither its inner fold nor fold k
            trained = (outer != k) & (inner != j)
            assert not set(patients[trained]) & set(patients[inner == j])
            assert not set(patients[trained]) & set(patients[outer == k])
        if n_inner == 4:  # the other outer folds, renumbered
            others = [f for f in range(5) if f != k]
            for j, fold in enumerate(others):
                np.testing.assert_array_equal(inner == j, outer == fold)


def test_with_the_other_outer_folds_each_inner_model_serves_two_outer_folds():
    labels, patients, outer = _cohort()
    trained = set()
    for k in range(5):
        inner = inner_folds(outer, labels, patients, k, 4, seed=7)
        for j in range(4):
            trained.add(tuple(np.flatnonzero((outer == k) | (inner == j))))
    assert len(trained) == 10  # C(5, 2) training sets, not 5 x 4


def test_inner_folds_refuse_fewer_than_two():
    labels, patients, outer = _cohort()
    with pytest.raises(ValueError, match="at least 2 inner folds"):
        inner_folds(outer, labels, patients, 0, 1, seed=0)


def test_wilson_interval_and_paired_difference():
    assert wilson(0, 0)["value"] is None
    interval = wilson(12, 60)
    assert interval["low"] < 0.2 < interval["high"] and interval["k"] == 12
    assert wilson(60, 60)["high"] == 1.0 and wilson(0, 60)["low"] == 0.0
    rng = np.random.default_rng(4)
    truth = rng.random(120) < 0.3
    first = rng.random(120) + truth * 0.3
    second = rng.random(120) + truth * 0.8
    same = paired_auc_difference(truth, first, first, rounds=200)
    assert same["difference"] == 0 and same["low"] == same["high"] == 0
    better = paired_auc_difference(truth, first, second, rounds=400)
    assert better["difference"] == pytest.approx(rank_auc(truth, second) -
                                                 rank_auc(truth, first))
    assert better["low"] <= better["difference"] <= better["high"]
    assert better["share_above_zero"] > 0.9
