"""Bring your own weights: start training from a local state dict (`train --init-weights`).

Accepted: a pneumonode `model.safetensors` (or a model directory), a state dict of one of
our xresnets, or torchvision/timm ResNet/DenseNet weights (`.pth`, `.pt`, `.bin`,
`.safetensors`) for the architecture of the same name. Tensors are matched by name (after
removing wrapper prefixes such as `module.`), an RGB first convolution is summed over its
colour channels into the one grey channel, and what does not fit (an ImageNet classifier
with 1000 outputs) keeps its fresh initialisation. Loading uses `weights_only`, so a file
cannot run code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ai.model.choice import WEIGHTS_FILE

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.", "encoder.")


@dataclass
class InitReport:
    """What `load_init_weights` did, recorded in the artifact's training metadata."""

    source: str
    loaded: int = 0
    adapted: list[str] = field(default_factory=list)  # first convolutions turned grey
    skipped: list[str] = field(default_factory=list)  # ours without a matching tensor

    def to_json(self) -> dict:
        return {"source": self.source, "loaded": self.loaded, "adapted": self.adapted,
                "skipped": self.skipped[:50], "n_skipped": len(self.skipped)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (or of a model directory's model.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def _candidates(model: nn.Module, name: str) -> list[str]:
    """Names a tensor of ours may have in the source: its own, and for our mask-head model
    the name in the plain xresnet it is built from."""
    names = [name]
    rename = getattr(model, "classifier_name", None)
    if rename is not None and rename(name) is not None:
        names.append(rename(name))
    return names


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    result = {}
    for key, value in state.items():
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix) and not key.startswith("model.unet"):
                key = key[len(prefix):]
        result[key] = value
    return result


def _grey(tensor: torch.Tensor, channels: int) -> torch.Tensor | None:
    """An RGB first convolution (out, 3, k, k) as `channels` input channels, else None."""
    if tensor.ndim == 4 and tensor.shape[1] == 3 and channels == 1:
        return tensor.sum(dim=1, keepdim=True)
    return None


def load_init_weights(model: nn.Module, path: str | Path) -> InitReport:
    """Copy every matching tensor of `path` into `model`; return what was loaded."""
    source = read_state_dict(path)
    plain = _normalise_keys(source)
    own = model.state_dict()
    report = InitReport(source=str(path))
    update = {}
    for name, target in own.items():
        found = next((plain.get(c, source.get(c)) for c in _candidates(model, name)
                      if c in plain or c in source), None)
        if found is None:
            report.skipped.append(name)
            continue
        if found.shape != target.shape:
            grey = _grey(found, target.shape[1]) if target.ndim == 4 else None
            if grey is None or grey.shape != target.shape:
                report.skipped.append(name)
                continue
            found = grey
            report.adapted.append(name)
        update[name] = found.to(target.dtype)
    if not update:
        raise ValueError(f"{path}: no tensor matches the model (is it the same architecture?)")
    model.load_state_dict(update, strict=False)
    report.loaded = len(update)
    log.info("initial weights from %s: %d tensors loaded, %d adapted to grey, %d kept fresh",
             path, report.loaded, len(report.adapted), len(report.skipped))
    return report
