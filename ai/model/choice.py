"""Which model the node analyses with: the user's at `analysis.model`, or else the small
demo model shipped in the package, so that a fresh install analyses images and sends
results back with no training step. The demo is said to be in use wherever it shows (the
log at start, `pneumonode status`, and its name in every result's caption and SR), and a
model put at `analysis.model` replaces it without a restart.

Kept free of torch so that `status` can say which model is in use without loading one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The two files of a model artifact, named once: here rather than in ai.model.artifact
# (which writes and reads them) because this module does not import torch.
META_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = (META_FILE, WEIGHTS_FILE)
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo_model"
DEMO_NOTICE = "the shipped DEMO model (trained on 200 images; not for diagnosis)"


@dataclass(frozen=True)
class ModelChoice:
    folder: Path
    is_demo: bool

    def describe(self) -> str:
        return DEMO_NOTICE if self.is_demo else f"the model at {self.folder}"

    def stamp(self) -> tuple[str, tuple[float, ...]]:
        """Changes when the files change or another model is chosen (the worker reloads)."""
        times = []
        for name in MODEL_FILES:
            try:
                times.append((self.folder / name).stat().st_mtime)
            except OSError:  # replaced while we looked: the next look sees the new files
                times.append(-1.0)
        return str(self.folder), tuple(times)


def has_model(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_FILES)


def choose_model(configured: Path, demo_allowed: bool) -> ModelChoice | None:
    """The user's model when its files are there, else the demo (when allowed), else None."""
    if has_model(configured):
        return ModelChoice(configured, is_demo=False)
    if demo_allowed and has_model(DEMO_MODEL_DIR):
        return ModelChoice(DEMO_MODEL_DIR, is_demo=True)
    return None
