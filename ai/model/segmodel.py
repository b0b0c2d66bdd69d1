"""One encoder, two heads: the image's class and a pneumothorax mask (mask-supervised recipe).

The encoder is the classifier's body (an xresnet up to its last stage); the class head is
the usual pool + linear on its output, and the mask head is fastai's `DynamicUnet` decoder
over the same encoder. The masks teach the encoder where a pneumothorax is, which 200
image labels alone do not, and the mask is a heatmap that needs no gradients.

`forward` returns the class logits only, so every caller of a classifier (inference, CAM,
GradCAM) uses this model unchanged; `forward_both` returns (logits, mask logits).
"""

from __future__ import annotations

import torch
from torch import nn

ENCODER_PREFIX = "unet.layers.0."  # where the xresnet body's weights sit in this model


class ClassifySegment(nn.Module):
    """An xresnet body shared by a class head and a DynamicUnet mask head."""

    def __init__(self, classifier: nn.Sequential, img_size: int) -> None:
        super().__init__()
        from fastai.vision.models.unet import DynamicUnet

        children = list(classifier.children())
        pool_at = next(i for i, c in enumerate(children)
                       if isinstance(c, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)))
        encoder = nn.Sequential(*children[:pool_at])
        # No last cross (a full-resolution ResBlock over the input joined to the decoder's
        # output): it costs a third of a CPU step and the mask needs no pixel-exact edges.
        self.unet = DynamicUnet(encoder, n_out=1, img_size=(img_size, img_size),
                                blur=False, self_attention=False, last_cross=False)
        self.head = nn.Sequential(*children[pool_at:])  # pool, flatten, dropout, linear
        self.cam_layer_name = f"unet.layers.0.{pool_at - 1}"
        self.head_offset = pool_at

    def classifier_name(self, name: str) -> str | None:
        """The name a tensor of ours has in the plain classifier (an xresnet state dict)."""
        if name.startswith(ENCODER_PREFIX):
            return name[len(ENCODER_PREFIX):]
        if name.startswith("head."):
            index, _, rest = name[len("head."):].partition(".")
            return f"{int(index) + self.head_offset}.{rest}"
        return None

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (N, C), mask logits (N, 1, H, W)) from one pass of the encoder.

        This is DynamicUnet's own SequentialEx loop (each layer sees the input as `orig`),
        with the class head taken off the encoder's output.
        """
        features = None
        result = x
        for index, layer in enumerate(self.unet.layers):
            result.orig = x
            output = layer(result)
            result.orig = None
            result = output
            if index == 0:
                features = result
        return self.head(features), result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet.layers[0](x))


class BothOutputs(nn.Module):
    """What the learner trains: the model's two outputs as one prediction tuple."""

    def __init__(self, model: ClassifySegment) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_both(x)
