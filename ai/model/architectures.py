"""Model architectures, built from a JSON-able description.

The artifact stores only `ArchSpec.to_json()`; `build_model` turns it back into the module,
so loading a model needs this file and fastai's layer code, never the training pipeline.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

# fastai's builders, imported when a model is built: importing fastai takes seconds, and
# the CLI and the node read architecture names long before (or without) building one.
XRESNETS = ("xresnet18", "xresnet34", "xresnet50", "xresnet101", "xresnet152")
# torchvision's networks, for weights a user already has (`train --init-weights`).
TORCHVISION = ("resnet18", "resnet34", "resnet50", "densenet121")
ARCHITECTURES = XRESNETS + TORCHVISION
ACTIVATIONS = {"mish": nn.Mish, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class ArchSpec:
    """What identifies an architecture: its builder's name and the arguments it takes.

    `n_in=1` gives the seed's grey first convolution, Conv2d(1, 32, 3, stride=2, padding=1,
    bias=False), directly instead of replacing the 3-channel one after construction.
    """

    name: str = "xresnet50"
    n_in: int = 1
    n_out: int = 2
    act: str = "mish"
    sa: bool = True
    widen: float = 1.0
    stem: tuple[int, ...] = (32, 32, 64)
    dropout: float = 0.0
    seg_head: bool = False  # a DynamicUnet mask head on the same encoder (ai.model.segmodel)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["stem"] = list(self.stem)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArchSpec:
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture arguments: {sorted(unknown)}")
        values = dict(data)
        if "stem" in values:
            values["stem"] = tuple(int(v) for v in values["stem"])
        return cls(**values)


def build_model(spec: ArchSpec, input_size: int | None = None) -> nn.Module:
    """Instantiate the (untrained) network that `spec` describes.

    A model with a mask head needs the input size its decoder is laid out for.
    """
    if spec.name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {spec.name!r}; known: {sorted(ARCHITECTURES)}")
    if spec.act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {spec.act!r}; known: {sorted(ACTIVATIONS)}")
    classifier = _torchvision(spec) if spec.name in TORCHVISION else _xresnet(spec)
    if not spec.seg_head:
        return classifier
    if spec.name not in XRESNETS:
        raise ValueError("a mask head is built over an xresnet encoder")
    if not input_size:
        raise ValueError("a model with a mask head needs its input size")
    from ai.model.segmodel import ClassifySegment

    return ClassifySegment(classifier, input_size)


def _xresnet(spec: ArchSpec) -> nn.Sequential:
    if len(spec.stem) != 3 or spec.stem[-1] != 64:
        raise ValueError("stem must have three widths and end with 64 (xresnet's first stage)")
    from fastai.vision.models import xresnet

    return getattr(xresnet, spec.name)(
        pretrained=False, c_in=spec.n_in, n_out=spec.n_out, act_cls=ACTIVATIONS[spec.act],
        sa=spec.sa, widen=spec.widen, stem_szs=spec.stem, p=spec.dropout, **spec.extra,
    )


def _torchvision(spec: ArchSpec) -> nn.Sequential:
    """A torchvision ResNet/DenseNet as a Sequential whose parameter names are torchvision's
    (conv1, layer1..4, fc / features, classifier), so its state dicts load by name, with a
    `n_in`-channel first convolution and a pooling child before the head (for CAM)."""
    import torchvision

    net = getattr(torchvision.models, spec.name)(weights=None, num_classes=spec.n_out)
    if spec.name.startswith("resnet"):
        old = net.conv1
        net.conv1 = nn.Conv2d(spec.n_in, old.out_channels, old.kernel_size, old.stride,
                              old.padding, bias=False)
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        parts = [(name, getattr(net, name)) for name in names]
        head = [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                ("dropout", nn.Dropout(spec.dropout)), ("fc", net.fc)]
    else:
        old = net.features.conv0
        net.features.conv0 = nn.Conv2d(spec.n_in, old.out_channels, old.kernel_size,
                                       old.stride, old.padding, bias=False)
        parts = [("features", net.features), ("relu", nn.ReLU())]
        head = [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                ("dropout", nn.Dropout(spec.dropout)), ("classifier", net.classifier)]
    return nn.Sequential(OrderedDict(parts + head))


def default_cam_layer(model: nn.Module) -> str:
    """Name of the body's last stage: the child just before the global pooling.

    For fastai's xresnet that is `model[-5]`, the layer the seed hooks for CAM; a model
    that knows better (the mask-supervised one) names it in `cam_layer_name`.
    """
    if isinstance(getattr(model, "cam_layer_name", None), str):
        return model.cam_layer_name
    names = [name for name, _ in model.named_children()]
    for index, (_, child) in enumerate(model.named_children()):
        if isinstance(child, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or \
                type(child).__name__ in {"AdaptiveAvgPool", "AdaptiveConcatPool2d"}:
            if index == 0:
                break
            return names[index - 1]
    raise ValueError("cannot find the global pooling layer; name the CAM layer explicitly")


def final_linear(model: nn.Module) -> nn.Linear:
    """The classifier's last Linear layer, whose weights CAM multiplies with the activations."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no Linear layer; CAM needs one")
    return linears[-1]
