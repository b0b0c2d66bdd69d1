"""Batched inference for the node's worker and the `predict`/`cam` commands.

An `Analyzer` holds one loaded model. Each call resizes the 8-bit images on the model's
device, runs one forward pass per chunk of `batch_size` images (bf16 autocast and
channels-last on a GPU, fp32 on the CPU) and, for `explain`, one GradCAM backward pass (or
reads the mask head's map). A model recorded with test-time augmentation (`tta`) also sees
each image mirrored left-right; probabilities and maps are the mean of the two.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ai.analysis.cam import METHODS
from ai.analysis.methods import METHOD_TITLES
from ai.data.preprocess import to_model_input
from ai.model.artifact import LoadedModel, load_artifact

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One image's result. `heatmap` is float32 in [0, 1] at the model's input resolution
    (input_size x input_size, the whole image squeezed to a square): resize it to the
    image's rows x columns to overlay it (see `ai.results.sc.picture.upsample_bilinear`)."""

    probability: float
    label: str
    heatmap: np.ndarray
    target_class: str
    method: str = "gradcam"  # the key of ai.analysis.cam.METHODS that made `heatmap`

    @property
    def method_title(self) -> str:
        """How the result objects name the map: 'GradCAM', 'CAM' or 'segmentation mask'."""
        return METHOD_TITLES[self.method]


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
    """Probabilities and heatmaps for batches of 8-bit grey images (see `ai.data.preprocess`)."""

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

    def _views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The batch as the model sees it: itself, and mirrored when the model uses TTA."""
        return [x, x.flip(-1)] if self.loaded.tta else [x]

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, C) softmax probabilities, float32 (averaged over the TTA views)."""
        out = np.empty((len(images), len(self.classes)), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            for start, x in self._chunks(images):
                views = [torch.softmax(self.model(v).float(), 1) for v in self._views(x)]
                out[start:start + len(x)] = torch.stack(views).mean(0).cpu().numpy()
        return out

    def predict(self, images: Sequence[np.ndarray]) -> list[float]:
        """Probability of the positive class for each image."""
        return [float(p) for p in self.probabilities(images)[:, self.positive_index]]

    def default_method(self) -> str:
        return self.loaded.heatmap_method

    def resolve_method(self, setting: str) -> str:
        """The method a heatmap setting ('auto' or a METHODS key) means for this model.

        'auto' is the model's own; 'segmentation' for a model without a mask head falls back
        to GradCAM, with a warning, so analysis goes on.
        """
        if setting == "auto":
            return self.default_method()
        if setting not in METHODS:
            raise ValueError(f"unknown heatmap method {setting!r}; use auto or {sorted(METHODS)}")
        if setting == "segmentation" and not self.loaded.has_mask_head:
            log.warning("model %s has no mask head: heatmaps by GradCAM, not segmentation",
                        self.loaded.name)
            return "gradcam"
        return setting

    def explain(self, images: Sequence[np.ndarray], target: str | int | None = None,
                layer: str | None = None, method: str | None = None) -> list[Prediction]:
        """Probability, thresholded label and a heatmap for `target` (default: positive class).

        `method` is 'gradcam', 'cam' or 'segmentation' (a mask head's map; default: the
        model's own, see `LoadedModel.heatmap_method`); `layer` is a dotted module name for
        CAM/GradCAM (default: the body's last stage). The heatmap is at the model's input
        resolution.
        """
        method = method or self.default_method()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use {sorted(METHODS)}")
        index = self._class_index(target)
        if method == "segmentation" and index != self.positive_index:
            raise ValueError("the segmentation map shows the positive class only")
        layer = layer if layer is not None else self.loaded.cam_layer
        results: list[Prediction] = []
        for _start, x in self._chunks(images):
            probs, maps = [], []
            for flipped, view in enumerate(self._views(x)):
                with self._autocast():
                    logits, heat = METHODS[method](self.model, view, index, layer)
                probs.append(torch.softmax(logits.float(), 1)[:, self.positive_index])
                maps.append(heat.flip(-1) if flipped else heat)
            positive = torch.stack(probs).mean(0).cpu().numpy()
            heatmaps = torch.stack(maps).mean(0).cpu().numpy()
            for probability, heatmap in zip(positive, heatmaps, strict=True):
                results.append(Prediction(probability=float(probability),
                                          label=self.label_for(float(probability)),
                                          heatmap=heatmap, target_class=self.classes[index],
                                          method=method))
        return results
