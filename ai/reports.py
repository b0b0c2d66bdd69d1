"""Evaluation figures and numbers written next to a trained model.

metrics.json, validation_predictions.csv, and the PNGs: lr_find curve, loss curves,
confusion matrix, ROC curve, top losses and a grid of results.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import RocCurveDisplay, confusion_matrix, roc_auc_score  # noqa: E402

log = logging.getLogger(__name__)


def classification_metrics(positive_probs: np.ndarray, is_positive: np.ndarray, threshold: float,
                           classes: list[str], positive_index: int) -> dict[str, Any]:
    """Accuracy, ROC AUC, sensitivity/specificity at `threshold`, confusion counts, n/class."""
    truth = np.asarray(is_positive, dtype=bool)
    predicted = np.asarray(positive_probs) >= threshold
    tn, fp, fn, tp = confusion_matrix(truth, predicted, labels=[False, True]).ravel()
    negative_name = classes[1 - positive_index] if len(classes) == 2 else "other"
    metrics: dict[str, Any] = {
        "n": int(truth.size),
        "n_per_class": {classes[positive_index]: int(truth.sum()),
                        negative_name: int((~truth).sum())},
        "threshold": float(threshold),
        "accuracy": float((tp + tn) / truth.size) if truth.size else float("nan"),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "confusion_matrix": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
        "majority_class_share": float(max(truth.mean(), 1 - truth.mean())) if truth.size else None,
    }
    metrics["roc_auc"] = (float(roc_auc_score(truth, positive_probs))
                          if 0 < truth.sum() < truth.size else None)
    return metrics


def _save_current(path: Path) -> None:
    figure = plt.gcf()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close("all")


def _figure(path: Path, draw: Callable[[], Any]) -> bool:
    """Draw one report figure; a figure that fails is logged and skipped, not fatal."""
    try:
        draw()
        _save_current(path)
        return True
    except Exception:  # a plotting failure must not lose a trained model
        log.exception("could not draw %s", path.name)
        plt.close("all")
        return False


def lr_find_figure(out: Path, learn) -> bool:
    """Must run right after `lr_find`: the next fit replaces the recorder's values."""
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    return _figure(reports / "lr_find.png", learn.recorder.plot_lr_find)


def roc_figure(path: Path, positive_probs: np.ndarray, is_positive: np.ndarray) -> bool:
    if not 0 < np.sum(is_positive) < len(is_positive):
        return False
    return _figure(path, lambda: RocCurveDisplay.from_predictions(is_positive, positive_probs))


def plot_top_losses(interp, learn, classes: list[str], k: int, positive_probs: np.ndarray,
                    positive_index: int, threshold: float) -> None:
    """The seed's top-losses grid: image, predicted / actual class, loss, probability.

    Drawn here because fastai's own `plot_top_losses` has no method for grey images.
    """
    losses, indices = interp.top_losses(k)
    columns = min(3, max(1, len(indices)))
    rows = max(1, -(-len(indices) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    figure.suptitle("prediction / actual / loss / probability of the actual class")
    for axis in axes.ravel():
        axis.axis("off")
    for axis, loss, index in zip(axes.ravel(), losses, indices, strict=False):
        image, target = learn.dls.valid_ds[int(index)]
        positive = float(positive_probs[int(index)])
        predicted = positive_index if positive >= threshold else 1 - positive_index
        actual_prob = positive if int(target) == positive_index else 1.0 - positive
        axis.imshow(np.asarray(image), cmap="gray")
        axis.set_title(f"{classes[predicted]} / {classes[int(target)]}\n"
                       f"{float(loss):.2f} / {actual_prob:.2f}", fontsize=9)


def write_training_reports(out: Path, learn, metrics: dict[str, Any], positive_probs: np.ndarray,
                           targets: np.ndarray, valid_files: list[str], classes: list[str],
                           positive_index: int) -> dict[str, bool]:
    """Write metrics.json, validation_predictions.csv and the PNGs; return which were drawn."""
    from fastai.interpret import ClassificationInterpretation

    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    pd.DataFrame({
        "file": valid_files,
        "label": [classes[int(t)] for t in targets],
        "probability": positive_probs,
    }).to_csv(reports / "validation_predictions.csv", index=False)

    drawn = {"lr_find": (reports / "lr_find.png").is_file()}
    drawn["loss"] = _figure(reports / "loss.png", learn.recorder.plot_loss)
    drawn["roc"] = roc_figure(reports / "roc.png", positive_probs, targets == positive_index)
    interp = ClassificationInterpretation.from_learner(learn)
    drawn["confusion_matrix"] = _figure(reports / "confusion_matrix.png",
                                        interp.plot_confusion_matrix)
    k = min(9, len(valid_files))
    drawn["top_losses"] = _figure(reports / "top_losses.png",
                                  lambda: plot_top_losses(interp, learn, classes, k, positive_probs,
                                                          positive_index, metrics["threshold"]))
    drawn["results"] = _figure(reports / "results.png", lambda: learn.show_results(max_n=k))
    log.info("reports written to %s: %s", reports, drawn)
    return drawn
