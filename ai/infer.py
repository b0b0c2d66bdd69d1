"""Batched inference for the node's worker and the `predict`/`cam` commands.

An `Analyzer` holds one loaded model. Each call resizes the 8-bit images on the model's
device, runs one forward pass per chunk of `batch_size` images (bf16 autocast and
channels-last on a GPU, fp32 on the CPU) and, for `explain`, one GradCAM backward pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ai.artifact import LoadedModel, load_artifact
from ai.cam import METHODS
from ai.preprocess import to_model_input

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One image's result. `heatmap` is float32 in [0, 1] at the model's input resolution
    (input_size x input_size, the whole image squeezed to a square): resize it to the
    image's rows x columns to overlay it (see `ai.results.overlay.upsample_bilinear`)."""

    probability: float
    label: str
    heatmap: np.ndarray
    target_class: str


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """'auto' -> bf16 autocast on a GPU, none (fp32) on the CPU; 'fp32' / 'bf16' force it."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise ValueError(f"unknown precision {precision!r}; use auto, fp32 or bf16")


class Analyzer:
    """Probabilities and heatmaps for batches of 8-bit grey images (see `ai.preprocess`)."""

    def __init__(self, model: LoadedModel | str | Path, *, device: str = "auto",
                 batch_size: int = 32, precision: str = "auto") -> None:
        self.loaded = model if isinstance(model, LoadedModel) else load_artifact(model, device)
        self.model = self.loaded.model.eval().requires_grad_(False)
        self.device = self.loaded.device
        self.batch_size = max(1, int(batch_size))
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.classes = self.loaded.classes
        self.positive_index = self.loaded.positive_index
        self.threshold = self.loaded.threshold

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _chunks(self, images: Sequence[np.ndarray]) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, len(images), self.batch_size):
            loaded = self.loaded
            x = to_model_input(images[start:start + self.batch_size], loaded.input_size,
                               loaded.mean, loaded.std, self.device)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield start, x

    def _class_index(self, target: str | int | None) -> int:
        if target is None:
            return self.positive_index
        if isinstance(target, str):
            if target not in self.classes:
                raise ValueError(f"unknown class {target!r}; classes are {self.classes}")
            return self.classes.index(target)
        if not 0 <= target < len(self.classes):
            raise ValueError(f"class index {target} out of range")
        return int(target)

    def label_for(self, probability: float) -> str:
        """The class name a probability of the positive class stands for, at the threshold."""
        loaded = self.loaded
        return loaded.positive_class if probability >= self.threshold else loaded.negative_class

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, C) softmax probabilities, float32."""
        out = np.empty((len(images), len(self.classes)), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            for start, x in self._chunks(images):
                logits = self.model(x).float()
                out[start:start + len(x)] = torch.softmax(logits, 1).cpu().numpy()
        return out

    def predict(self, images: Sequence[np.ndarray]) -> list[float]:
        """Probability of the positive class for each image."""
        return [float(p) for p in self.probabilities(images)[:, self.positive_index]]

    def explain(self, images: Sequence[np.ndarray], target: str | int | None = None,
                layer: str | None = None, method: str = "gradcam") -> list[Prediction]:
        """Probability, thresholded label and a heatmap for `target` (default: positive class).

        `layer` is a dotted module name (default: the body's last stage); `method` is
        'gradcam' or 'cam'. The heatmap is at the model's input resolution.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use {sorted(METHODS)}")
        index = self._class_index(target)
        layer = layer if layer is not None else self.loaded.cam_layer
        results: list[Prediction] = []
        for _start, x in self._chunks(images):
            with self._autocast():
                logits, maps = METHODS[method](self.model, x, index, layer)
            probs = torch.softmax(logits, 1)[:, self.positive_index].cpu().numpy()
            heatmaps = maps.cpu().numpy()
            for probability, heatmap in zip(probs, heatmaps, strict=True):
                results.append(Prediction(probability=float(probability),
                                          label=self.label_for(float(probability)),
                                          heatmap=heatmap, target_class=self.classes[index]))
        return results
