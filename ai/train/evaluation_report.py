"""Evaluation figures and numbers written next to a trained model.

metrics.json (the cross-validated figures, marked so), cv_predictions.csv (every image's
out-of-fold probability), localisation.csv, and the PNGs: lr_find curve, the final fit's
learning curve, and from the out-of-fold predictions the confusion matrix, ROC curve, top
losses and a grid of results. The figures are drawn from
plain numbers and images (not from fastai's own plots), so they look the same whatever the
recipe, the number of epochs or the batch count, and each is named by the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    confusion_matrix,
    roc_auc_score,
)

log = logging.getLogger(__name__)


def classification_metrics(
    positive_probs: np.ndarray,
    is_positive: np.ndarray,
    threshold: float,
    classes: list[str],
    positive_index: int,
) -> dict[str, Any]:
    """Accuracy, ROC AUC, sensitivity/specificity at `threshold`, confusion counts, n/class."""
    truth = np.asarray(is_positive, dtype=bool)
    predicted = np.asarray(positive_probs) >= threshold
    tn, fp, fn, tp = confusion_matrix(truth, predicted, labels=[False, True]).ravel()
    negative_name = classes[1 - positive_index] if len(classes) == 2 else "other"
    metrics: dict[str, Any] = {
        "n": int(truth.size),
        "n_per_class": {
            classes[positive_index]: int(truth.sum()),
            negative_name: int((~truth).sum()),
        },
        "threshold": float(threshold),
        "accuracy": float((tp + tn) / truth.size) if truth.size else float("nan"),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "confusion_matrix": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
        "majority_class_share": float(max(truth.mean(), 1 - truth.mean())) if truth.size else None,
    }
    metrics["roc_auc"] = (
        float(roc_auc_score(truth, positive_probs)) if 0 < truth.sum() < truth.size else None
    )
    return metrics


@dataclass(frozen=True)
class TrainingHistory:
    """What the learner recorded, as plain numbers: per-epoch train and validation loss (and
    metrics), and the smoothed training loss of every batch."""

    epochs: list[dict[str, float]]
    batch_losses: list[float]


def history_from(recorder) -> TrainingHistory:
    """Read a fastai Recorder: `values` holds one row per epoch, named by `metric_names`
    without the leading 'epoch' and the trailing 'time'."""
    names = [n for n in recorder.metric_names if n not in ("epoch", "time")]
    epochs = [
        {name: float("nan") if value is None else float(value)
         for name, value in zip(names, row, strict=False)}
        for row in recorder.values
    ]
    return TrainingHistory(epochs, [float(loss) for loss in recorder.losses])


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _figure(path: Path, draw: Callable[[], Figure | None]) -> bool:
    """Draw one report figure; a figure that fails is logged and skipped, not fatal."""
    try:
        figure = draw()
        if figure is None:
            return False
        _save(figure, path)
        return True
    except Exception:  # a plotting failure must not lose a trained model
        log.exception("could not draw %s", path.name)
        plt.close("all")
        return False


def lr_find_figure(out: Path, learn) -> bool:
    """Must run right after `lr_find`: the next fit replaces the recorder's values."""
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)

    def draw() -> Figure:
        learn.recorder.plot_lr_find()
        return plt.gcf()

    return _figure(reports / "lr_find.png", draw)


def learning_curve(history: TrainingHistory, model_name: str) -> Figure:
    """Train and validation loss per epoch (points joined by lines, so one epoch still
    shows), over the smoothed loss of every training batch."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    count = len(history.epochs)
    epochs = np.arange(1, count + 1)
    if history.batch_losses and count:
        per_epoch = len(history.batch_losses) / count
        steps = (np.arange(len(history.batch_losses)) + 1) / per_epoch
        axis.plot(
            steps,
            history.batch_losses,
            color="tab:blue",
            alpha=0.3,
            linewidth=1,
            label="train loss per batch (smoothed)",
        )
    for key, label, style in (
        ("train_loss", "train loss", "o-"),
        ("valid_loss", "validation loss", "s-"),
    ):
        values = [epoch.get(key, np.nan) for epoch in history.epochs]
        axis.plot(
            epochs,
            values,
            style,
            linewidth=2,
            markersize=6,
            label=label,
            color="tab:blue" if key == "train_loss" else "tab:orange",
        )
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.set_xlim(0, max(1, count) + 0.2)
    axis.set_xticks(epochs)
    axis.set_title(f"Learning curve: {model_name}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def roc_curve_figure(
    positive_probs: np.ndarray, truth: list[str], positive_class: str, model_name: str,
    scope: str = "validation set",
) -> Figure | None:
    """ROC of the validation predictions, named by the model and the positive class; None
    when the validation set holds only one class (no curve exists)."""
    if len(set(truth)) < 2:
        return None
    figure, axis = plt.subplots(figsize=(6, 6))
    RocCurveDisplay.from_predictions(
        truth,
        positive_probs,
        pos_label=positive_class,
        name=model_name,
        ax=axis,
        plot_chance_level=True,
    )
    axis.set_title(f"ROC: {positive_class}, {scope} (n={len(truth)})")
    figure.tight_layout()
    return figure


def confusion_figure(
    truth: list[str], predicted: list[str], classes: list[str], threshold: float, model_name: str,
    scope: str = "",
) -> Figure:
    """Counts of true against predicted class at the model's threshold (the numbers of
    metrics.json), rather than at the arg-max."""
    figure, axis = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay.from_predictions(
        truth, predicted, labels=classes, cmap="Blues", ax=axis, colorbar=False
    )
    axis.set_title(f"Confusion matrix at threshold {threshold:g}{scope}\n{model_name}")
    figure.tight_layout()
    return figure


def pick_examples(is_positive: np.ndarray, count: int) -> list[int]:
    """Up to `count` validation indices, as many of each class as there are room for."""
    positives = [int(i) for i in np.flatnonzero(is_positive)]
    negatives = [int(i) for i in np.flatnonzero(~np.asarray(is_positive, dtype=bool))]
    half = count // 2
    chosen = positives[:half] + negatives[:half]
    rest = positives[half:] + negatives[half:]
    chosen += rest[: count - len(chosen)]
    return sorted(chosen)


def results_grid(
    images: list[np.ndarray],
    truth: list[str],
    predicted: list[str],
    positive_probs: list[float],
    positive_class: str,
    model_name: str,
    title: str = "Validation results",
) -> Figure:
    """Validation images as the model saw them (grey, white = dense), each with its true
    label, the prediction and the probability; green when right, red when wrong."""
    columns = min(4, max(1, len(images)))
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.3 * columns, 3.7 * rows), squeeze=False, layout="constrained"
    )
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, true, guess, probability in zip(
        axes.ravel(), images, truth, predicted, positive_probs, strict=False
    ):
        axis.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
        axis.set_title(
            f"true: {true}\npredicted: {guess}\nP({positive_class}) = {probability:.3f}",
            fontsize=9,
            color="tab:green" if true == guess else "tab:red",
        )
    figure.suptitle(f"{title}: {model_name}")
    return figure


def top_losses_figure(images: list[np.ndarray], truth: list[str], probabilities: list[float],
                      losses: list[float], positive_class: str, model_name: str) -> Figure:
    """The seed's top-losses grid from plain numbers: actual class, P(positive), loss."""
    columns = min(3, max(1, len(images)))
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False, layout="constrained"
    )
    figure.suptitle(f"Top losses, out-of-fold (cross-validated): {model_name}")
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, true, probability, loss in zip(
        axes.ravel(), images, truth, probabilities, losses, strict=False
    ):
        axis.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
        axis.set_title(f"actual {true}\nP({positive_class}) = {probability:.2f}, "
                       f"loss {loss:.2f}", fontsize=9)
    return figure


def write_cv_reports(out: Path, metrics: dict[str, Any], cv, items: pd.DataFrame, entries,
                     model_name: str, final_learner) -> dict[str, bool]:
    """metrics.json, cv_predictions.csv, localisation.csv and the figures of a cross-validated
    training run; every figure from held-out predictions says it is out-of-fold."""
    from ai.data.labelled import NEGATIVE, POSITIVE

    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    table = cv.predictions()
    column = "probability_tta" if metrics.get("tta") else "probability"
    table.to_csv(reports / "cv_predictions.csv", index=False)
    localisation = cv.localisation()
    if len(localisation):
        by_path = dict(zip(items["path"], items["file"], strict=True))
        localisation.insert(1, "file", localisation["path"].map(by_path))
        localisation.drop(columns="path").to_csv(reports / "localisation.csv", index=False)
    by_file = dict(zip(items["file"], items["path"], strict=True))
    probabilities = table[column].to_numpy(dtype=np.float64)
    truth = list(table["label"])
    threshold = metrics["threshold"]
    predicted = [POSITIVE if p >= threshold else NEGATIVE for p in probabilities]
    scope = "out-of-fold (cross-validated)"
    drawn = {"lr_find": (reports / "lr_find.png").is_file()}
    history = history_from(final_learner.recorder)
    drawn["loss"] = _figure(reports / "loss.png",
                            lambda: learning_curve(history, f"{model_name} (final fit)"))
    drawn["roc"] = _figure(reports / "roc.png", lambda: roc_curve_figure(
        probabilities, truth, POSITIVE, model_name, scope))
    drawn["confusion_matrix"] = _figure(reports / "confusion_matrix.png", lambda: confusion_figure(
        truth, predicted, [NEGATIVE, POSITIVE], threshold, model_name, f", {scope}"))
    is_positive = np.asarray(truth) == POSITIVE
    actual = np.where(is_positive, probabilities, 1 - probabilities)
    losses = -np.log(np.clip(actual, 1e-7, 1.0))
    top = [int(i) for i in np.argsort(-losses)[:9]]

    def image(index: int) -> np.ndarray:
        return np.asarray(entries[by_file[table["file"].iloc[index]]].image)

    drawn["top_losses"] = _figure(reports / "top_losses.png", lambda: top_losses_figure(
        [image(i) for i in top], [truth[i] for i in top], [float(probabilities[i]) for i in top],
        [float(losses[i]) for i in top], POSITIVE, model_name))
    examples = pick_examples(is_positive, 12)
    drawn["results"] = _figure(reports / "results.png", lambda: results_grid(
        [image(i) for i in examples], [truth[i] for i in examples],
        [predicted[i] for i in examples], [float(probabilities[i]) for i in examples],
        POSITIVE, model_name, title="Out-of-fold (cross-validated) results"))
    log.info("reports written to %s: %s", reports, drawn)
    return drawn
