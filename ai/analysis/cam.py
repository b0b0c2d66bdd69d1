"""Heatmaps, batched: CAM and GradCAM for any class, and a mask head's own map.

Both return maps at the input's resolution, scaled per image to [0, 1] (min-max before
and after upsampling, as pytorch-grad-cam does), so that a heatmap means the same thing
whichever method made it. One forward pass serves the whole batch; GradCAM adds one
backward pass that stops at the hooked layer (`torch.autograd.grad` with respect to its
activations), so parameter gradients are never computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ai.analysis.methods import METHOD_NAMES
from ai.model.architectures import default_cam_layer, final_linear

Target = int | Sequence[int] | torch.Tensor


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """A layer given by module, by dotted name ('7', '7.2.convpath'), or None for the default."""
    if isinstance(layer, nn.Module):
        return layer
    name = default_cam_layer(model) if layer is None else layer
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"model has no layer named {name!r}") from exc


def _targets(target: Target, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    result = torch.as_tensor(target, dtype=torch.long, device=device).reshape(-1)
    if result.numel() != batch:
        raise ValueError(f"{result.numel()} targets for a batch of {batch}")
    return result


class _Capture:
    """Forward hook that keeps a layer's output, made differentiable when GradCAM needs it."""

    def __init__(self, layer: nn.Module, differentiable: bool) -> None:
        self.differentiable = differentiable
        self.output: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.differentiable and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        self.output = output
        return output

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._handle.remove()


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (flat.max(dim=1, keepdim=True).values + 1e-7)
    return flat.view_as(maps)


def scale_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) raw maps -> (N, H, W) float32 in [0, 1].

    Per-map min-max, bilinear upsampling, and min-max again so that every non-constant map
    spans exactly 0..1 (pytorch-grad-cam's convention). A constant map becomes all zeros.
    """
    maps = _min_max(maps.float())
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        maps = _min_max(maps)
    return maps.clamp_(0.0, 1.0)


def cam(model: nn.Module, x: torch.Tensor, target: Target,
        layer: str | nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM: the final Linear's weights for `target` times the last stage's activations.

    Returns (logits float32 (N, C), maps float32 (N, H, W) in [0, 1] at x's resolution).
    """
    linear = final_linear(model)
    with torch.no_grad(), _Capture(resolve_layer(model, layer), differentiable=False) as capture:
        logits = model(x)
        act = capture.output
        if act is None or act.ndim != 4 or act.shape[1] != linear.in_features:
            raise ValueError("CAM needs the last stage (channels = final Linear's inputs)")
        weights = linear.weight.float()[_targets(target, x.shape[0], x.device)]  # (N, K)
        raw = torch.einsum("nk,nkij->nij", weights, act.float())
    return logits.float(), scale_maps(raw, tuple(x.shape[-2:]))


def gradcam(model: nn.Module, x: torch.Tensor, target: Target,
            layer: str | nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GradCAM: relu(sum_k mean_ij(d logit_target / d act_k) * act_k) for a chosen layer.

    Returns (logits float32 (N, C), maps float32 (N, H, W) in [0, 1] at x's resolution).
    """
    with torch.enable_grad(), \
            _Capture(resolve_layer(model, layer), differentiable=True) as capture:
        logits = model(x)
        act = capture.output
        if act is None or act.ndim != 4:
            raise ValueError("GradCAM needs a layer with (N, C, H, W) activations")
        chosen = logits.gather(1, _targets(target, x.shape[0], x.device)[:, None])
        (grads,) = torch.autograd.grad(chosen.sum(), act)
    weights = grads.float().mean(dim=(2, 3))
    raw = torch.relu(torch.einsum("nk,nkij->nij", weights, act.detach().float()))
    return logits.detach().float(), scale_maps(raw, tuple(x.shape[-2:]))


def segmentation(model: nn.Module, x: torch.Tensor, target: Target,
                 layer: str | nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask head's pixel probabilities of pneumothorax (a model with `forward_both`).

    Not rescaled: 0.9 means the head gives that pixel 90 %, so a map of a clear image stays
    dark. It shows the positive class whatever `target` is; `layer` is not used.
    """
    if not hasattr(model, "forward_both"):
        raise ValueError("this model has no mask head; use gradcam or cam")
    with torch.no_grad():
        logits, masks = model.forward_both(x)
        maps = torch.sigmoid(masks.float())[:, 0]
        if tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
            maps = F.interpolate(maps[:, None], size=tuple(x.shape[-2:]), mode="bilinear",
                                 align_corners=False)[:, 0]
    return logits.float(), maps.clamp_(0.0, 1.0)


# The function of each method name (each function is named as its method); a name in
# ai.analysis.methods without its function fails here, at import.
_FUNCTIONS = {function.__name__: function for function in (cam, gradcam, segmentation)}
METHODS = {name: _FUNCTIONS[name] for name in METHOD_NAMES}
