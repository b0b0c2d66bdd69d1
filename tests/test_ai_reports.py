"""The training reports, drawn from plain numbers so they look the same for every recipe: a
learning curve with its lines, a grid of validation results in the right greyscale, and an
ROC named by the model and the positive class. No training here: a few milliseconds each."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from ai.train.evaluation_report import (
    TrainingHistory,
    confusion_figure,
    learning_curve,
    pick_examples,
    results_grid,
    roc_curve_figure,
)
from ai.train.recipes import RECIPES

POSITIVE = "Pneumothorax"
NEGATIVE = "No Pneumothorax"


def model_name(recipe: str) -> str:
    config = RECIPES[recipe]
    return f"pneumonode pneumothorax {config.name} {config.arch.name}"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_learning_curve_draws_train_and_validation_loss_per_epoch(recipe: str) -> None:
    epochs = RECIPES[recipe].epochs
    history = TrainingHistory(
        epochs=[
            {"train_loss": 0.7 - 0.05 * e, "valid_loss": 0.72 - 0.03 * e, "accuracy": 0.6}
            for e in range(epochs)
        ],
        batch_losses=list(np.linspace(0.75, 0.4, 20 * epochs)),
    )
    figure = learning_curve(history, model_name(recipe))
    (axis,) = figure.axes
    lines = {line.get_label(): line for line in axis.get_lines()}
    for label, key in (("train loss", "train_loss"), ("validation loss", "valid_loss")):
        line = lines[label]
        assert list(line.get_xdata()) == list(range(1, epochs + 1))
        assert list(line.get_ydata()) == [e[key] for e in history.epochs]
        assert line.get_marker() in ("o", "s")  # one epoch still shows as a point
    assert len(lines["train loss per batch (smoothed)"].get_xdata()) == 20 * epochs
    assert model_name(recipe) in axis.get_title()
    plt.close(figure)


def test_results_grid_shows_several_images_in_grey_with_truth_prediction_probability() -> None:
    image = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))  # dark left, white right
    truth = [POSITIVE, POSITIVE, NEGATIVE, NEGATIVE, NEGATIVE]
    predicted = [POSITIVE, NEGATIVE, NEGATIVE, POSITIVE, NEGATIVE]
    figure = results_grid(
        [image] * 5, truth, predicted, [0.91, 0.2, 0.1, 0.7, 0.05], POSITIVE, model_name("seed")
    )
    shown = [axis for axis in figure.axes if axis.get_images()]
    assert len(shown) == 5
    for axis, true, guess in zip(shown, truth, predicted, strict=True):
        (picture,) = axis.get_images()
        assert picture.get_cmap().name == "gray" and picture.get_clim() == (0, 255)
        title = axis.get_title()
        assert f"true: {true}" in title and f"predicted: {guess}" in title
        assert f"P({POSITIVE}) = " in title
        assert (axis.title.get_color() == "tab:green") == (true == guess)
    plt.close(figure)


def test_pick_examples_takes_both_classes() -> None:
    is_positive = np.array([True] * 10 + [False] * 30)
    chosen = pick_examples(is_positive, 12)
    assert len(chosen) == 12 and sum(is_positive[chosen]) == 6
    assert pick_examples(np.array([True, False]), 12) == [0, 1]


def test_roc_is_named_by_the_model_and_the_positive_class(tmp_path: Path) -> None:
    truth = [POSITIVE, NEGATIVE, POSITIVE, NEGATIVE, NEGATIVE]
    figure = roc_curve_figure(
        np.array([0.9, 0.2, 0.6, 0.4, 0.1]), truth, POSITIVE, model_name("small")
    )
    (axis,) = figure.axes
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    assert any(model_name("small") in text and "AUC = 1.00" in text for text in legend)
    assert f"Positive label: {POSITIVE}" in axis.get_xlabel()
    assert "Classifier" not in " ".join(legend) and "label: 1" not in axis.get_xlabel()
    figure.savefig(tmp_path / "roc.png")
    plt.close(figure)
    assert roc_curve_figure(np.array([0.9, 0.8]), [POSITIVE, POSITIVE], POSITIVE, "m") is None


def test_confusion_matrix_counts_at_the_threshold() -> None:
    truth = [POSITIVE, NEGATIVE, POSITIVE, NEGATIVE]
    predicted = [POSITIVE, POSITIVE, NEGATIVE, NEGATIVE]
    figure = confusion_figure(truth, predicted, [NEGATIVE, POSITIVE], 0.3, model_name("seed"))
    (axis,) = figure.axes
    counts = sorted(text.get_text() for text in axis.texts)
    assert counts == ["1", "1", "1", "1"]
    assert "threshold 0.3" in axis.get_title()
    plt.close(figure)
