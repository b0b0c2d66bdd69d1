"""Fitting one model with fastai: the seed's DataBlock/Learner recipe over the shared
preprocessing, for a cross-validation fold or for the final model.

The DataBlock reads each DICOM with `ai.data.preprocess` (the same code the node runs), through
the decoded-image cache, so what the model sees in validation is what it sees in
production. The mask-supervised recipe adds the SIIM mask as a second target. What `train`
does with the fitted models (folds, reports, the artifact) is `ai.train.workflow`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.channelslast import ChannelsLast  # noqa: F401  (patches Learner)
from fastai.callback.fp16 import MixedPrecision  # noqa: F401  (patches Learner)
from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback  # noqa: F401  (progress bars)
from fastai.callback.schedule import LRFinder  # noqa: F401  (lr_find, fit_flat_cos)
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.transforms import ColReader, IndexSplitter, IntToFloatTensor, Normalize
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from fastai.metrics import accuracy
from fastai.optimizer import Adam, ranger
from fastai.torch_core import set_seed
from fastai.vision.augment import aug_transforms
from fastai.vision.core import PILImageBW, PILMask
from fasttransform import Transform
from torch import nn

from ai.cli.console import interactive
from ai.data.imagecache import CachedItem
from ai.data.preprocess import read_grey8, resize_grey8
from ai.model.architectures import build_model
from ai.model.segmodel import BothOutputs
from ai.train.recipes import Recipe

log = logging.getLogger(__name__)

LOSSES = {"label_smoothing": LabelSmoothingCrossEntropy, "cross_entropy": CrossEntropyLossFlat}
OPTIMIZERS = {"ranger": ranger, "adam": Adam}


def load_resized(path: str, size: int) -> np.ndarray:
    """One file through the shared preprocessing, resized: what training stores per item."""
    return resize_grey8([read_grey8(path)], size)[0].numpy()


class GreyDicom(Transform):
    """The seed's PILDicom block, reading through `ai.data.preprocess`, or from the decoded-image
    cache (`ai.data.imagecache`) when there is one: then no epoch decodes a JPEG."""

    def __init__(self, size: int, cache: dict[str, CachedItem] | None = None) -> None:
        super().__init__()
        self.size, self.cache = size, cache or {}

    def encodes(self, path: str) -> PILImageBW:
        entry = self.cache.get(path)
        pixels = np.asarray(entry.image) if entry is not None else load_resized(path, self.size)
        return PILImageBW.create(pixels)


class CachedMask(Transform):
    """The item's pneumothorax mask at the training size (all zeros when it has none)."""

    def __init__(self, size: int, cache: dict[str, CachedItem]) -> None:
        super().__init__()
        self.size, self.cache = size, cache

    def encodes(self, path: str) -> PILMask:
        mask = self.cache[path].mask
        if mask is None:
            mask = np.zeros((self.size, self.size), dtype=np.uint8)
        return PILMask.create(mask)


class MaskSupervisedLoss(nn.Module):
    """Class loss plus `weight` x (binary cross-entropy + soft Dice) on the mask logits."""

    def __init__(self, class_loss: nn.Module, weight: float) -> None:
        super().__init__()
        self.class_loss, self.weight = class_loss, weight

    def forward(self, pred: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        logits, mask_logits = pred
        mask = mask.float().view_as(mask_logits)
        bce = F.binary_cross_entropy_with_logits(mask_logits, mask)
        probs = torch.sigmoid(mask_logits)
        dice = 1 - (2 * (probs * mask).sum() + 1) / (probs.sum() + mask.sum() + 1)
        return self.class_loss(logits, target) + self.weight * (bce + dice)


def class_accuracy(pred, *targets) -> torch.Tensor:
    """Accuracy of the class logits, for models whose prediction also holds a mask."""
    logits = pred[0] if isinstance(pred, tuple) else pred
    return accuracy(logits, targets[-1])


def build_dataloaders(items: pd.DataFrame, config: Recipe, device: torch.device,
                      cache: dict[str, CachedItem] | None, valid_index: list[int]):
    """The seed's DataBlock (grey DICOM block, CategoryBlock, aug_transforms), split at
    `valid_index`; the mask-supervised recipe adds a mask block between them."""
    batch_tfms = [IntToFloatTensor()]
    if config.augment:
        batch_tfms += aug_transforms()
    if config.mean != 0.0 or config.std != 1.0:
        batch_tfms.append(Normalize.from_stats([config.mean], [config.std], cuda=False))
    image = TransformBlock(type_tfms=GreyDicom(config.size, cache))
    blocks: tuple = (image, CategoryBlock)
    getters = [ColReader("path"), ColReader("label")]
    if config.arch.seg_head:
        if not cache:
            raise ValueError("the mask-supervised recipe reads its masks from the image cache")
        blocks = (image, TransformBlock(type_tfms=CachedMask(config.size, cache)), CategoryBlock)
        getters = [ColReader("path"), ColReader("path"), ColReader("label")]
    block = DataBlock(blocks=blocks, getters=getters, n_inp=1,
                      splitter=IndexSplitter(valid_index), batch_tfms=batch_tfms)
    return block.dataloaders(items, bs=config.batch_size, device=device,
                             num_workers=0 if cache else None)


class EpochLog:
    """The learner's logger off a terminal: one readable line per epoch instead of fastai's
    progress bars, whose redraws fill a log file with fragments."""

    def __init__(self, learn: Learner) -> None:
        self.learn = learn

    def __call__(self, values: list) -> None:
        names = list(self.learn.recorder.metric_names)
        fields = dict(zip(names, values, strict=False))
        epoch = int(fields.pop("epoch", 0)) + 1
        elapsed = fields.pop("time", "")
        text = ", ".join(
            f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
            for name, value in fields.items()
        )
        log.info("epoch %d/%d: %s (%s)", epoch, self.learn.n_epoch, text, elapsed)


def new_model(config: Recipe, init_weights: str | Path | None = None
              ) -> tuple[nn.Module, dict | None]:
    """The recipe's network, from `init_weights` when given (see `ai.model.weights`)."""
    model = build_model(config.arch, config.size)
    if init_weights is None:
        return model, None
    from ai.model.weights import load_init_weights

    return model, load_init_weights(model, init_weights).to_json()


def build_learner(dls, config: Recipe, work_dir: Path, model: nn.Module) -> Learner:
    """A Learner for `model`; with a mask head it trains both outputs (`BothOutputs`)."""
    class_loss = LOSSES[config.loss]()
    has_valid = len(dls.valid_ds) > 0
    if config.arch.seg_head:
        trained, loss = BothOutputs(model), MaskSupervisedLoss(class_loss, config.mask_weight)
        metrics = [class_accuracy] if has_valid else []
    else:
        trained, loss, metrics = model, class_loss, [accuracy] if has_valid else []
    cbs = [MixUp(config.mixup)] if config.mixup > 0 else []
    learn = Learner(dls, trained, loss_func=loss, opt_func=OPTIMIZERS[config.optimizer],
                    metrics=metrics, path=work_dir, cbs=cbs)
    if not interactive():
        if hasattr(learn, "progress"):
            learn.remove_cb(learn.progress)
        learn.logger = EpochLog(learn)
    if dls.device.type == "cuda":
        learn = learn.to_channelslast()
        learn = learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
    return learn


def _fit(learn: Learner, config: Recipe, lr: float) -> None:
    if config.schedule == "flat_cos":
        learn.fit_flat_cos(config.epochs, lr)
    elif config.schedule == "one_cycle":
        learn.fit_one_cycle(config.epochs, lr)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; use flat_cos or one_cycle")


@dataclass
class FitResult:
    """One fitted model (a fold's, or the final one on all the data) and how it was made."""

    model: nn.Module
    learner: Learner
    lr: float
    lr_find: dict[str, float] | None
    seconds: float
    init: dict | None


def fit_model(items: pd.DataFrame, config: Recipe, device: torch.device,
              cache: dict[str, CachedItem] | None, valid_index: list[int], work_dir: Path,
              init_weights: str | Path | None = None, reports: Path | None = None) -> FitResult:
    """Train one model on the items outside `valid_index`.

    With `lr_find` on, the learning rate is the one lr_find suggests (its valley point),
    found on this model's own training data; otherwise the recipe's `lr`.
    """
    set_seed(config.seed, reproducible=True)
    dls = build_dataloaders(items, config, device, cache, valid_index)
    set_seed(config.seed, reproducible=True)
    model, init = new_model(config, init_weights)
    learn = build_learner(dls, config, work_dir, model)
    started = time.perf_counter()
    lr, suggestion = config.lr, None
    if config.lr_find:
        from fastai.callback.schedule import valley

        found = learn.lr_find(suggest_funcs=(valley,), show_plot=False)
        suggestion = {"valley": float(found.valley)}
        lr = float(found.valley)
        log.info("lr_find: valley at %.2e; training at that rate (the recipe's is %g)",
                 lr, config.lr)
        if reports is not None:
            from ai.train.evaluation_report import lr_find_figure

            lr_find_figure(reports.parent, learn)
    log.info("fitting %d epochs at lr %.2e (%s schedule) on %d images", config.epochs, lr,
             config.schedule, len(dls.train_ds))
    _fit(learn, config, lr)
    return FitResult(model=model.eval(), learner=learn, lr=lr, lr_find=suggestion,
                     seconds=time.perf_counter() - started, init=init)
