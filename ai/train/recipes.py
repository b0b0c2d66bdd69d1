"""The named training recipes (`pneumonode train --recipe NAME`), not to be confused with the
node's configuration (node/config.py). `seed` is the source's recipe; the default is the
recipe that measured best by cross-validation on the shared data (docs/classifier.md has
the table and the command of every row).

Every field can be overridden from the command line (`pneumonode train --arch ... --size
...`), so a named recipe is only a starting point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ai.model.architectures import ArchSpec


@dataclass(frozen=True)
class Recipe:
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
    lr_find: bool = False  # True: run lr_find and train at the rate it suggests (valley)
    mixup: float = 0.0  # MixUp's alpha; 0 = off
    mask_weight: float = 1.0  # weight of the mask loss (recipes with a mask head)
    tta: bool = False  # predict on the image and its mirror image, average
    folds: int = 5  # cross-validation folds (stratified, grouped by Patient ID)
    seed: int = 42
    mean: float = 0.0
    std: float = 1.0
    threshold: float = 0.5  # the fixed threshold: the model's with threshold_rule "fixed"
    # "youden": the model's threshold is chosen on the pooled out-of-fold predictions
    # (ai.train.crossval.choose_threshold); "fixed": `threshold` (what `--threshold X` sets).
    threshold_rule: str = "youden"
    max_items: int | None = None

    def with_overrides(self, **overrides: Any) -> Recipe:
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


RECIPES: dict[str, Recipe] = {
    # The source's recipe: xresnet50 + Mish + self-attention, 1 channel, 400 px, bs 8,
    # aug_transforms, LabelSmoothingCrossEntropy, ranger, fit_flat_cos(5, 5e-4). The source
    # also ran lr_find but trained at 5e-4 whatever it said; `--lr-find` uses its suggestion.
    "seed": Recipe(),
    # The seed's pipeline with a smaller net and images (CPU-friendly).
    "small": Recipe(
        name="small",
        arch=ArchSpec(name="xresnet18", act="mish", sa=True, widen=0.5),
        size=224, batch_size=16, epochs=8, lr=2e-3,
    ),
    # A small net at low resolution with mixup, more epochs.
    "lowres-mixup": Recipe(
        name="lowres-mixup",
        arch=ArchSpec(name="xresnet18", act="mish", sa=True, widen=0.5),
        size=128, batch_size=16, epochs=10, lr=2e-3, mixup=0.4,
    ),
    # Mask-supervised: the same small encoder with a class head and a DynamicUnet mask head
    # trained on the SIIM masks; its mask is the heatmap. 96 px and 8 epochs: the decoder
    # triples the cost of a step, and the 5-fold table had to run on a shared 2-core CPU.
    "mask": Recipe(
        name="mask",
        arch=ArchSpec(name="xresnet18", act="mish", sa=True, widen=0.5, seg_head=True),
        size=96, batch_size=16, epochs=8, lr=2e-3,
    ),
    # Seconds on a CPU: for tests and CI only, not for use.
    "tiny": Recipe(
        name="tiny",
        arch=ArchSpec(name="xresnet18", act="relu", sa=False, widen=0.25, stem=(8, 16, 64)),
        size=64, batch_size=8, epochs=1, lr=1e-3, augment=False, max_items=16, seed=3,
        folds=3,
    ),
    # The tiny network with a mask head: for tests only.
    "tiny-mask": Recipe(
        name="tiny-mask",
        arch=ArchSpec(name="xresnet18", act="relu", sa=False, widen=0.25, stem=(8, 16, 64),
                      seg_head=True),
        size=64, batch_size=8, epochs=1, lr=1e-3, augment=False, max_items=16, seed=3,
        folds=3,
    ),
}
DEFAULT_RECIPE = "mask"  # the best cross-validated recipe measured (docs/classifier.md)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]
