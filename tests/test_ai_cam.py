"""CAM and GradCAM: shapes, ranges, batching, and agreement with pytorch-grad-cam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from support import PROBABILITY_TOLERANCE

from ai.analysis.cam import cam, gradcam, scale_maps
from ai.analysis.infer import Analyzer
from ai.model.architectures import build_model, default_cam_layer, final_linear
from ai.train.recipes import get_recipe
from ai.train.tiny_artifact import build_tiny_artifact

SIZE = 128


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model(get_recipe("tiny").arch).eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, 1, SIZE, SIZE, generator=generator)


@pytest.mark.parametrize("method", [cam, gradcam])
@pytest.mark.parametrize("target", [0, 1])
def test_maps_have_input_shape_and_unit_range(model, batch, method, target):
    logits, maps = method(model, batch, target)
    assert logits.shape == (3, 2) and logits.dtype == torch.float32
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == torch.float32
    for single in maps:  # each map is scaled to span [0, 1] unless it is flat zero
        low, high = float(single.min()), float(single.max())
        assert low == pytest.approx(0.0, abs=1e-6)
        assert high == pytest.approx(1.0, abs=1e-5) or high == 0.0
    torch.testing.assert_close(logits, model(batch).detach())


@pytest.mark.parametrize("layer", ["6", "7"])
@pytest.mark.parametrize("target", [0, 1])
def test_gradcam_agrees_with_pytorch_grad_cam(model, batch, layer, target):
    _, ours = gradcam(model, batch, target, layer=layer)
    with GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as reference:
        theirs = reference(input_tensor=batch, targets=[ClassifierOutputTarget(target)] * 3)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)
    if layer == "6":  # an inner stage gives non-trivial maps, so the comparison means something
        assert np.any(theirs.reshape(3, -1).max(axis=1) > 0.99)


def test_cam_is_linear_weights_times_last_stage(model, batch):
    layer = model.get_submodule(default_cam_layer(model))
    captured = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.setdefault("act", out))
    with torch.no_grad():
        model(batch)
    handle.remove()
    weights = final_linear(model).weight
    for target in (0, 1):
        raw = torch.einsum("k,nkij->nij", weights[target], captured["act"])
        _, maps = cam(model, batch, target)
        torch.testing.assert_close(maps, scale_maps(raw, (SIZE, SIZE)), atol=1e-5, rtol=0)
        assert model.get_submodule(default_cam_layer(model)) is model[-5]


def test_gradcam_of_last_stage_is_relu_of_cam(model, batch):
    """With global average pooling, GradCAM's weights are the Linear weights / (h*w)."""
    _, grad_maps = gradcam(model, batch, 0)
    _, cam_maps = cam(model, batch, 0)
    layer_out = {}
    handle = model[-5].register_forward_hook(lambda _m, _i, out: layer_out.setdefault("a", out))
    with torch.no_grad():
        model(batch)
    handle.remove()
    raw = torch.relu(torch.einsum("k,nkij->nij", final_linear(model).weight[0], layer_out["a"]))
    torch.testing.assert_close(grad_maps, scale_maps(raw, (SIZE, SIZE)), atol=1e-5, rtol=0)
    # CAM keeps the negative evidence that GradCAM's ReLU removes: the maps differ.
    assert not torch.allclose(cam_maps, grad_maps, atol=1e-3)


def test_batched_gradcam_equals_one_by_one(model, batch):
    _, together = gradcam(model, batch, [0, 1, 0], layer="6")
    for index, target in enumerate([0, 1, 0]):
        _, alone = gradcam(model, batch[index : index + 1], target, layer="6")
        torch.testing.assert_close(together[index], alone[0], atol=1e-5, rtol=0)


def test_analyzer_explain_matches_predict(tmp_path):
    analyzer = Analyzer(build_tiny_artifact(tmp_path / "model"), device="cpu", batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (100, 90), dtype=np.uint8) for _ in range(5)]
    probabilities = analyzer.predict(images)
    explained = analyzer.explain(images)
    assert len(explained) == 5
    for probability, prediction in zip(probabilities, explained, strict=True):
        assert prediction.probability == pytest.approx(probability, abs=PROBABILITY_TOLERANCE)
        assert prediction.heatmap.shape == (64, 64) and prediction.heatmap.dtype == np.float32
        assert prediction.heatmap.min() >= 0.0 and prediction.heatmap.max() <= 1.0
        expected = "Pneumothorax" if probability >= analyzer.threshold else "No Pneumothorax"
        assert prediction.label == expected
        assert prediction.target_class == "Pneumothorax"
    negative = analyzer.explain(images[:1], target="No Pneumothorax", method="cam")
    positive = analyzer.explain(images[:1], method="cam")
    assert negative[0].target_class == "No Pneumothorax"
    assert negative[0].probability == pytest.approx(positive[0].probability)
    assert not np.allclose(negative[0].heatmap, positive[0].heatmap, atol=1e-3)
    with pytest.raises(ValueError, match="unknown class"):
        analyzer.explain(images[:1], target="Fracture")
