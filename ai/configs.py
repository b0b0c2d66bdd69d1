"""Named training configurations. `seed` is the source's recipe and the default.

Every field can be overridden from the command line (`pneumonode train --arch ... --size
...`), so a named configuration is only a starting point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ai.architectures import ArchSpec


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what `train` does, recorded in the artifact's JSON."""

    name: str = "seed"
    arch: ArchSpec = field(default_factory=ArchSpec)
    size: int = 400
    batch_size: int = 8
    epochs: int = 5
    lr: float = 5e-4
    optimizer: str = "ranger"
    loss: str = "label_smoothing"
    schedule: str = "flat_cos"
    augment: bool = True
    lr_find: bool = True
    valid_pct: float = 0.2
    seed: int = 42
    mean: float = 0.0
    std: float = 1.0
    threshold: float = 0.5
    max_items: int | None = None

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """A copy with the non-None overrides applied; `arch_*` keys go to the ArchSpec."""
        arch_changes = {key[5:]: value for key, value in overrides.items()
                        if key.startswith("arch_") and value is not None}
        own = {key: value for key, value in overrides.items()
               if not key.startswith("arch_") and value is not None}
        arch = replace(self.arch, **arch_changes) if arch_changes else self.arch
        return replace(self, arch=arch, **own)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["arch"] = self.arch.to_json()
        return data


CONFIGS: dict[str, TrainConfig] = {
    # The source's recipe: xresnet50 + Mish + self-attention, 1 channel, 400 px, bs 8,
    # aug_transforms, LabelSmoothingCrossEntropy, ranger, lr_find, fit_flat_cos(5, 5e-4).
    "seed": TrainConfig(),
    # CPU-friendly reduction of the seed recipe: same pipeline, smaller net and images.
    "small": TrainConfig(
        name="small",
        arch=ArchSpec(name="xresnet18", act="mish", sa=True, widen=0.5),
        size=224, batch_size=16, epochs=8, lr=2e-3,
    ),
    # Seconds on a CPU: for tests and CI only, not for use.
    "tiny": TrainConfig(
        name="tiny",
        arch=ArchSpec(name="xresnet18", act="relu", sa=False, widen=0.25, stem=(8, 16, 64)),
        size=64, batch_size=8, epochs=1, lr=1e-3, lr_find=False, augment=False,
        valid_pct=0.25, max_items=16, seed=3,
    ),
}


def get_config(name: str) -> TrainConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name]
