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
