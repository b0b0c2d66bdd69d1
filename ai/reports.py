"""Evaluation figures and numbers written next to a trained model.

metrics.json, validation_predictions.csv, and the PNGs: lr_find curve, learning curve,
confusion matrix, ROC curve, top losses and a grid of results. The figures are drawn from
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
        {name: float(value) for name, value in zip(names, row, strict=False)}
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
    positive_probs: np.ndarray, truth: list[str], positive_class: str, model_name: str
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
    axis.set_title(f"ROC: {positive_class}, validation set (n={len(truth)})")
    figure.tight_layout()
    return figure


def confusion_figure(
    truth: list[str], predicted: list[str], classes: list[str], threshold: float, model_name: str
) -> Figure:
    """Counts of true against predicted class at the model's threshold (the numbers of
    metrics.json), rather than at the arg-max."""
    figure, axis = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay.from_predictions(
        truth, predicted, labels=classes, cmap="Blues", ax=axis, colorbar=False
    )
    axis.set_title(f"Confusion matrix at threshold {threshold:g}\n{model_name}")
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
    figure.suptitle(f"Validation results: {model_name}")
    return figure


def plot_top_losses(
    interp,
    learn,
    classes: list[str],
    k: int,
    positive_probs: np.ndarray,
    positive_index: int,
    threshold: float,
) -> Figure:
    """The seed's top-losses grid: image, predicted / actual class, loss, probability.

    Drawn here because fastai's own `plot_top_losses` has no method for grey images.
    """
    losses, indices = interp.top_losses(k)
    columns = min(3, max(1, len(indices)))
    rows = max(1, -(-len(indices) // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False, layout="constrained"
    )
    figure.suptitle("prediction / actual / loss / probability of the actual class")
    for axis in axes.ravel():
        axis.axis("off")
    for axis, loss, index in zip(axes.ravel(), losses, indices, strict=False):
        image, target = learn.dls.valid_ds[int(index)]
        positive = float(positive_probs[int(index)])
        predicted = positive_index if positive >= threshold else 1 - positive_index
        actual_prob = positive if int(target) == positive_index else 1.0 - positive
        axis.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
        axis.set_title(
            f"{classes[predicted]} / {classes[int(target)]}\n{float(loss):.2f} / {actual_prob:.2f}",
            fontsize=9,
        )
    return figure


def write_training_reports(
    out: Path,
    learn,
    metrics: dict[str, Any],
    positive_probs: np.ndarray,
    targets: np.ndarray,
    valid_files: list[str],
    classes: list[str],
    positive_index: int,
    model_name: str,
    history: TrainingHistory,
) -> dict[str, bool]:
    """Write metrics.json, validation_predictions.csv and the PNGs; return which were drawn."""
    from fastai.interpret import ClassificationInterpretation

    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    probabilities = np.asarray(positive_probs, dtype=np.float64)  # every digit the model gave
    truth = [classes[int(t)] for t in targets]
    positive_class = classes[positive_index]
    pd.DataFrame({"file": valid_files, "label": truth, "probability": probabilities}).to_csv(
        reports / "validation_predictions.csv", index=False
    )

    threshold = metrics["threshold"]
    predicted = [
        positive_class if p >= threshold else classes[1 - positive_index] for p in probabilities
    ]
    examples = pick_examples(np.asarray(targets) == positive_index, 12)
    drawn = {"lr_find": (reports / "lr_find.png").is_file()}
    drawn["loss"] = _figure(reports / "loss.png", lambda: learning_curve(history, model_name))
    drawn["roc"] = _figure(
        reports / "roc.png",
        lambda: roc_curve_figure(probabilities, truth, positive_class, model_name),
    )
    interp = ClassificationInterpretation.from_learner(learn)

    drawn["confusion_matrix"] = _figure(
        reports / "confusion_matrix.png",
        lambda: confusion_figure(truth, predicted, classes, threshold, model_name),
    )
    k = min(9, len(valid_files))
    drawn["top_losses"] = _figure(
        reports / "top_losses.png",
        lambda: plot_top_losses(
            interp, learn, classes, k, probabilities, positive_index, threshold
        ),
    )
    drawn["results"] = _figure(
        reports / "results.png",
        lambda: results_grid(
            [np.asarray(learn.dls.valid_ds[i][0]) for i in examples],
            [truth[i] for i in examples],
            [predicted[i] for i in examples],
            [float(probabilities[i]) for i in examples],
            positive_class,
            model_name,
        ),
    )
    log.info("reports written to %s: %s", reports, drawn)
    return drawn
