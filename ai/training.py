"""Training with fastai: the seed's DataBlock/Learner recipe over the shared preprocessing.

The DataBlock reads each DICOM with `ai.preprocess` (the same code the node runs), so what
the model sees in validation is what it sees in production. The result is a model
artifact (`ai.artifact`) plus reports, and a check that the exported artifact reproduces
the learner's validation predictions.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.channelslast import ChannelsLast  # noqa: F401  (patches Learner)
from fastai.callback.fp16 import MixedPrecision  # noqa: F401  (patches Learner)
from fastai.callback.progress import ProgressCallback  # noqa: F401  (progress bars)
from fastai.callback.schedule import LRFinder  # noqa: F401  (lr_find, fit_flat_cos)
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.transforms import ColReader, IntToFloatTensor, Normalize, RandomSplitter
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from fastai.metrics import accuracy
from fastai.optimizer import Adam, ranger
from fastai.torch_core import set_seed
from fastai.vision.augment import aug_transforms
from fastai.vision.core import PILImageBW
from fastcore.parallel import parallel
from fasttransform import Transform

from ai.architectures import build_model
from ai.artifact import resolve_device, save_artifact
from ai.configs import TrainConfig
from ai.console import interactive
from ai.data import POSITIVE, fingerprint, load_items, subsample
from ai.infer import Analyzer
from ai.preprocess import read_grey8, resize_grey8

log = logging.getLogger(__name__)

LOSSES = {"label_smoothing": LabelSmoothingCrossEntropy, "cross_entropy": CrossEntropyLossFlat}
OPTIMIZERS = {"ranger": ranger, "adam": Adam}
CACHE_LIMIT_BYTES = 2 * 1024**3


def load_resized(path: str, size: int) -> np.ndarray:
    """One file through the shared preprocessing, resized: what training stores per item."""
    return resize_grey8([read_grey8(path)], size)[0].numpy()


class GreyDicom(Transform):
    """The seed's PILDicom block, reading through `ai.preprocess` (optionally from a cache)."""

    def __init__(self, size: int, cache: dict[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.size, self.cache = size, cache or {}

    def encodes(self, path: str) -> PILImageBW:
        pixels = self.cache.get(path)
        if pixels is None:
            pixels = load_resized(path, self.size)
        return PILImageBW.create(pixels)


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict[str, Any]
    learner: Learner


def _preload(paths: list[str], size: int) -> dict[str, np.ndarray]:
    """Decode every image once so epochs do not re-decode JPEGs.

    Threads, not processes: forking after torch has run its OpenMP pool can deadlock the
    children, and the decoders and torch's resize release the GIL anyway.
    """
    n_workers = max(1, min(8, torch.get_num_threads(), len(paths)))
    started = time.perf_counter()
    arrays = parallel(
        partial(load_resized, size=size),
        paths,
        n_workers=n_workers,
        progress=interactive(),
        threadpool=True,
    )
    log.info(
        "decoded %d images at %d px in %.1f s", len(paths), size, time.perf_counter() - started
    )
    return dict(zip(paths, arrays, strict=True))


def build_dataloaders(items: pd.DataFrame, config: TrainConfig, device: torch.device):
    """The seed's DataBlock: grey DICOM block, CategoryBlock, RandomSplitter(seed), augment."""
    cache = {}
    if len(items) * config.size * config.size <= CACHE_LIMIT_BYTES:
        cache = _preload(list(items["path"]), config.size)
    batch_tfms = [IntToFloatTensor()]
    if config.augment:
        batch_tfms += aug_transforms()
    if config.mean != 0.0 or config.std != 1.0:
        batch_tfms.append(Normalize.from_stats([config.mean], [config.std], cuda=False))
    block = DataBlock(
        blocks=(TransformBlock(type_tfms=GreyDicom(config.size, cache)), CategoryBlock),
        get_x=ColReader("path"),
        get_y=ColReader("label"),
        splitter=RandomSplitter(valid_pct=config.valid_pct, seed=config.seed),
        batch_tfms=batch_tfms,
    )
    return block.dataloaders(
        items, bs=config.batch_size, device=device, num_workers=0 if cache else None
    )


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


def build_learner(dls, config: TrainConfig, work_dir: Path) -> Learner:
    model = build_model(config.arch)
    learn = Learner(
        dls,
        model,
        loss_func=LOSSES[config.loss](),
        opt_func=OPTIMIZERS[config.optimizer],
        metrics=accuracy,
        path=work_dir,
    )
    if not interactive():
        if hasattr(learn, "progress"):
            learn.remove_cb(learn.progress)
        learn.logger = EpochLog(learn)
    if dls.device.type == "cuda":
        learn = learn.to_channelslast()
        learn = learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
    return learn


def _fit(learn: Learner, config: TrainConfig) -> None:
    if config.schedule == "flat_cos":
        learn.fit_flat_cos(config.epochs, config.lr)
    elif config.schedule == "one_cycle":
        learn.fit_one_cycle(config.epochs, config.lr)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; use flat_cos or one_cycle")


def train(
    config: TrainConfig, data_root: str | Path | None, out_dir: str | Path, device: str = "auto"
) -> TrainResult:
    """Train `config` on the labelled DICOMs in `data_root`; write artifact + reports."""
    from ai.reports import lr_find_figure, write_training_reports

    for table, key in ((LOSSES, config.loss), (OPTIMIZERS, config.optimizer)):
        if key not in table:
            raise ValueError(f"unknown setting {key!r}; known: {sorted(table)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data_root is None:
        from ai.data import default_data_root

        data_root = default_data_root()
    items = subsample(load_items(data_root), config.max_items, config.seed)
    target_device = resolve_device(device)
    log.info(
        "training %s on %d files from %s on %s", config.name, len(items), data_root, target_device
    )
    set_seed(config.seed, reproducible=True)
    dls = build_dataloaders(items, config, target_device)
    classes = list(dls.vocab)
    if POSITIVE not in classes:
        raise ValueError(f"labels {classes} do not include the positive class {POSITIVE!r}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pneumonode-train-") as work:
        set_seed(config.seed, reproducible=True)
        learn = build_learner(dls, config, Path(work))
        suggestion = None
        if config.lr_find:
            log.info("lr_find: a short run over rising learning rates")
            suggestion = learn.lr_find(show_plot=False)
            log.info(
                "lr_find suggests %s; the recipe trains at %g (reports/lr_find.png)",
                ", ".join(f"{k} {float(v):.2e}" for k, v in suggestion._asdict().items()),
                config.lr,
            )
            lr_find_figure(out, learn)
        log.info("fitting %d epochs (%s schedule)", config.epochs, config.schedule)
        _fit(learn, config)
    seconds = time.perf_counter() - started
    from ai.reports import history_from

    history = history_from(learn.recorder)  # before get_preds, which records nothing useful

    probs, targets = learn.get_preds(ds_idx=1)
    valid_files = list(dls.valid.items["file"])
    training_meta = {
        "config": config.to_json(),
        "data_root": str(data_root),
        "data_fingerprint": fingerprint(items),
        "n_items": len(items),
        "n_per_class": {str(k): int(v) for k, v in items["label"].value_counts().items()},
        "train_files": list(dls.train.items["file"]),
        "validation_files": valid_files,
        "device": str(target_device),
        "seconds": round(seconds, 2),
        "lr_find": {k: float(v) for k, v in suggestion._asdict().items()} if suggestion else None,
    }
    from ai.reports import classification_metrics

    positive_index = classes.index(POSITIVE)
    positive_probs = probs[:, positive_index].float().numpy()
    metrics = classification_metrics(
        positive_probs, targets.numpy() == positive_index, config.threshold, classes, positive_index
    )
    model_name = f"pneumonode pneumothorax {config.name} {config.arch.name}"
    save_artifact(
        out,
        learn.model,
        arch=config.arch,
        input_size=config.size,
        classes=classes,
        positive_class=POSITIVE,
        threshold=config.threshold,
        mean=config.mean,
        std=config.std,
        name=model_name,
        training=training_meta,
        metrics=metrics,
    )
    metrics["export_check_max_abs_diff"] = _export_check(out, dls, positive_probs, target_device)
    write_training_reports(
        out,
        learn,
        metrics,
        positive_probs,
        targets.numpy(),
        valid_files,
        classes,
        positive_index,
        model_name,
        history,
    )
    log.info(
        "trained %s in %.1f s: accuracy %.3f, ROC AUC %s",
        config.name,
        seconds,
        metrics["accuracy"],
        metrics.get("roc_auc"),
    )
    return TrainResult(model_dir=out, metrics=metrics, learner=learn)


def _export_check(model_dir: Path, dls, learner_probs: np.ndarray, device: torch.device) -> float:
    """Reload the artifact and predict the validation files: must match the learner."""
    analyzer = Analyzer(model_dir, device=str(device), precision="fp32")
    images = [read_grey8(path) for path in dls.valid.items["path"]]
    reloaded = np.asarray(analyzer.predict(images))
    diff = float(np.max(np.abs(reloaded - learner_probs))) if len(images) else 0.0
    log.info("exported artifact reproduces validation probabilities within %.2e", diff)
    return diff
