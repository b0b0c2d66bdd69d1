"""The model artifact: safetensors weights plus one JSON file that says how to use them.

No pickles: loading runs no code from the artifact, and needs only torch, safetensors and
the architecture builders in `ai.model.architectures`, not the fastai training pipeline.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from ai.model.architectures import ArchSpec, build_model, default_cam_layer
from ai.model.choice import META_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

FORMAT = "pneumonode-classifier"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """The model directory is missing, corrupt, or does not match its description."""


@dataclass
class LoadedModel:
    """A model ready for inference together with everything its JSON says about it."""

    model: nn.Module
    meta: dict[str, Any]
    device: torch.device
    path: Path

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def positive_class(self) -> str:
        return self.meta["positive_class"]

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    @property
    def negative_class(self) -> str:
        """What a probability under the threshold is called: the other class, or "other"."""
        return self.classes[1 - self.positive_index] if len(self.classes) == 2 else "other"

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def input_size(self) -> int:
        return int(self.meta["input"]["size"])

    @property
    def mean(self) -> float:
        return float(self.meta["input"]["mean"])

    @property
    def std(self) -> float:
        return float(self.meta["input"]["std"])

    @property
    def cam_layer(self) -> str:
        return self.meta["cam_layer"]

    @property
    def has_mask_head(self) -> bool:
        return bool(self.meta["architecture"].get("seg_head", False))

    @property
    def heatmap_method(self) -> str:
        """The heatmap the model was validated with: its mask when it has a mask head."""
        return str(self.meta.get("heatmap", "segmentation" if self.has_mask_head else "gradcam"))

    @property
    def tta(self) -> bool:
        """Whether predictions average the image and its mirror image (test-time flips)."""
        return bool(self.meta.get("tta", False))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means the GPU when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def library_versions() -> dict[str, str]:
    """Versions recorded in the artifact so a result can be traced to its software."""
    versions = {"python": platform.python_version()}
    for package in ("pneumonode", "torch", "fastai", "pydicom", "safetensors", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


FILE_MODE = 0o644  # readable by the node's service account, like any installed file


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file (mode 0600 from mkstemp) that is given the model's
    file mode before it replaces `path`."""
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe(
    model: nn.Module,
    *,
    arch: ArchSpec,
    input_size: int,
    classes: list[str],
    positive_class: str,
    threshold: float = 0.5,
    mean: float = 0.0,
    std: float = 1.0,
    name: str | None = None,
    heatmap: str | None = None,
    tta: bool = False,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The artifact's JSON without the weights' checksum: also what an in-memory model
    (a cross-validation fold) is evaluated under, so folds run the node's code path."""
    if positive_class not in classes:
        raise ArtifactError(f"positive class {positive_class!r} is not one of {classes}")
    if len(classes) != arch.n_out:
        raise ArtifactError(f"{len(classes)} classes but the architecture has {arch.n_out} outputs")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or f"pneumonode pneumothorax {arch.name}",
        "version": "in-memory",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "architecture": arch.to_json(),
        "cam_layer": default_cam_layer(model),
        "heatmap": heatmap or ("segmentation" if arch.seg_head else "gradcam"),
        "tta": bool(tta),
        "input": {
            "size": int(input_size),
            "channels": arch.n_in,
            "mean": float(mean),
            "std": float(std),
            "preprocessing": "ai.data.preprocess read_grey8 + resize_grey8",
        },
        "classes": list(classes),
        "positive_class": positive_class,
        "threshold": float(threshold),
        "training": training or {},
        "metrics": metrics or {},
    }


def in_memory(model: nn.Module, meta: dict[str, Any], device: str | torch.device = "cpu"
              ) -> LoadedModel:
    """A trained module and its `describe` JSON as a LoadedModel, without writing files."""
    target = resolve_device(device)
    return LoadedModel(model=model.to(target).eval(), meta=meta, device=target, path=Path("."))


def save_artifact(out_dir: str | Path, model: nn.Module, **description: Any) -> Path:
    """Write `model.safetensors` and `model.json` into `out_dir`; return the directory.

    `description` is what `describe` takes (arch, input_size, classes, positive_class, ...).
    """
    meta = describe(model, **description)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()
    }
    weights = out / WEIGHTS_FILE
    _atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    sha = _sha256(weights)
    versions = library_versions()
    meta["version"] = f"{versions['pneumonode']}+{sha[:12]}"
    meta["versions"] = versions
    meta["weights"] = {"file": WEIGHTS_FILE, "sha256": sha}
    _atomic_write(
        out / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    )
    log.info("saved model artifact %s version %s", out, meta["version"])
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """Read and check the artifact's JSON (without loading weights)."""
    meta_path = Path(model_dir) / META_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{model_dir}: no {META_FILE}; is this a model directory?")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{meta_path}: corrupt JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path}: not a {FORMAT} description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{meta_path}: format version {meta.get('format_version')} "
            f"is not supported (expected {FORMAT_VERSION})"
        )
    required = (
        "name",
        "version",
        "architecture",
        "input",
        "classes",
        "positive_class",
        "threshold",
        "weights",
        "cam_layer",
    )
    missing = [key for key in required if key not in meta]
    if missing:
        raise ArtifactError(f"{meta_path}: missing fields {missing}")
    if meta["positive_class"] not in meta["classes"]:
        raise ArtifactError(f"{meta_path}: positive class not among the classes")
    return meta


def load_artifact(model_dir: str | Path, device: str | torch.device = "auto") -> LoadedModel:
    """Rebuild the model a directory describes, check its weights, and put it in eval mode."""
    path = Path(model_dir)
    meta = read_meta(path)
    weights = path / meta["weights"].get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise ArtifactError(f"{path}: weights file {weights.name} is missing")
    data = weights.read_bytes()  # read once: checked, then loaded from memory
    if hashlib.sha256(data).hexdigest() != meta["weights"].get("sha256"):
        raise ArtifactError(f"{weights}: checksum does not match {META_FILE} (corrupt or replaced)")
    try:
        spec = ArchSpec.from_json(meta["architecture"])
        model = build_model(spec, int(meta["input"]["size"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{path}: cannot build architecture: {exc}") from exc
    if spec.n_out != len(meta["classes"]):
        raise ArtifactError(f"{path}: {len(meta['classes'])} classes but {spec.n_out} outputs")
    try:
        state = load_safetensors(data)
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights}: unreadable safetensors file ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not match the architecture: {exc}") from exc
    target = resolve_device(device)
    model = model.to(target).eval()
    if target.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    log.info("loaded model %s version %s on %s", meta["name"], meta["version"], target)
    return LoadedModel(model=model, meta=meta, device=target, path=path)
