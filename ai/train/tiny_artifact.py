"""A deterministic tiny model artifact, so tests elsewhere (the node's end-to-end tests)
can run analysis without training anything."""

from __future__ import annotations

from pathlib import Path

import torch

from ai.data.labelled import NEGATIVE, POSITIVE
from ai.model.architectures import build_model
from ai.model.artifact import save_artifact
from ai.train.recipes import get_recipe


def build_tiny_artifact(out_dir: Path, seed: int = 0) -> Path:
    """Save an untrained model of the `tiny` configuration, initialised from `seed`.

    Same seed, same weights, same probabilities: the artifact is a valid model (64 px
    xresnet18 at a quarter width) whose outputs are meaningless but reproducible.
    """
    config = get_recipe("tiny")
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(config.arch).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    return save_artifact(
        out_dir, model, arch=config.arch, input_size=config.size,
        classes=[NEGATIVE, POSITIVE], positive_class=POSITIVE, threshold=config.threshold,
        mean=config.mean, std=config.std, name="pneumonode pneumothorax tiny untrained",
        training={"config": config.to_json(), "note": f"untrained, torch.manual_seed({seed})"},
    )


def build_always_positive_artifact(out_dir: Path, mask_logit: float = 4.0) -> Path:
    """A tiny model with a mask head whose outputs are fixed: every image positive
    (probability about 0.98) and its mask head's map above the pixel threshold everywhere
    (sigmoid(`mask_logit`)), so that end-to-end tests get the results of a present finding
    with a region (SR outline, SEG) from a real node, which untrained weights never give."""
    config = get_recipe("tiny-mask")
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = build_model(config.arch, input_size=config.size).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    classes = [NEGATIVE, POSITIVE]
    with torch.no_grad():
        linear = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([0.0, 4.0]))  # logits of NEGATIVE, POSITIVE
        mask_conv = [m for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        mask_conv.weight.zero_()
        mask_conv.bias.fill_(mask_logit)
    return save_artifact(
        out_dir, model, arch=config.arch, input_size=config.size,
        classes=classes, positive_class=POSITIVE, threshold=config.threshold,
        mean=config.mean, std=config.std, name="pneumonode test model, always positive",
        training={"config": config.to_json(), "note": "fixed outputs, for tests"},
    )
