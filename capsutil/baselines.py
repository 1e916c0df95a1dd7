"""Convolutional baselines trained with the capsule networks' recipe (Part IV, chapter 09).

A fair comparison changes one thing: these networks replace the capsules and the routing with
plain convolutions and fully connected layers, and are trained on the same data, shifts,
optimiser, schedule and validation selection as the capsule network they face.

- :class:`CapsNetBaseline` keeps CapsNet's two convolutions (256 kernels 9x9, then 256 kernels
  9x9 with stride 2) and replaces DigitCaps and the decoder by a fully connected head with about
  as many parameters: 8,217,725 against CapsNet's 8,215,568 on 28x28 images. (The paper's
  baseline is larger: three convolutions and two fully connected layers, 35.4M parameters.)
- :class:`SmallBaseline` mirrors the small matrix capsule network (68,444 parameters): three
  convolutions on the same grids (28 -> 13 -> 6 -> 4) and a linear classifier, 68,082
  parameters.

Both return a :class:`BaselineOutput` (logits and predictions) and train with
:class:`CrossEntropy`. The MultiMNIST baseline, which names two classes per image, lives in
:mod:`capsutil.multimnist_baseline`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from capsutil.classifier import ImageClassifier


@dataclass
class BaselineOutput:
    """logits: (B, K) class scores before the softmax."""

    logits: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        """The predicted class of each image, int64 (B,)."""
        return self.logits.argmax(dim=1)


class CrossEntropy(nn.Module):
    """The baselines' loss, called like the capsule losses: ``loss(output, images, labels)``."""

    config: dict = {}

    def forward(self, output: BaselineOutput, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        if not hasattr(output, "logits"):
            raise TypeError(f"CrossEntropy expects the output of a baseline (with logits), got "
                            f"a {type(output).__name__}")
        return F.cross_entropy(output.logits, labels.long())


def _grid_size(size: int, layers: list[tuple[int, int, int]]) -> int:
    """The side of the feature map after convolutions (kernel, stride, padding) on ``size``."""
    for kernel, stride, padding in layers:
        size = (size + 2 * padding - kernel) // stride + 1
    if size < 1:
        raise ValueError("the images are too small for the baseline's convolutions")
    return size


class _ConvBaseline(ImageClassifier):
    """Convolutions with ReLU, flattened, then fully connected layers (ReLU between them)."""

    def __init__(self, image_size: int, in_channels: int, classes: int,
                 convs: list[tuple[int, int, int, int]], hidden: list[int]):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        size = _grid_size(image_size, [(k, s, p) for _, k, s, p in convs])
        channels = [in_channels] + [c for c, *_ in convs]
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, k, stride=s, padding=p)
                                   for c_in, (c_out, k, s, p) in zip(channels, convs))
        widths = [channels[-1] * size * size, *hidden, classes]
        self.head = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> BaselineOutput:
        x = self.model_input(images)                                  # (B, C, H, W)
        for conv in self.convs:
            x = torch.relu(conv(x))                                   # (B, C', H', W')
        x = x.flatten(1)                                              # (B, C' H' W')
        for linear in self.head[:-1]:
            x = torch.relu(linear(x))                                 # (B, hidden)
        return BaselineOutput(self.head[-1](x))                       # (B, K)


class CapsNetBaseline(_ConvBaseline):
    """CapsNet's Conv1 and primary convolution (``conv_channels`` kernels each), then ``hidden``
    fully connected units and the classes (labels are accepted, and unused, for the training
    loop)."""

    model_name = "cnn_capsnet"
    compiled_parts = ()

    def __init__(self, image_size: int = 28, in_channels: int = 1, classes: int = 10,
                 hidden: int = 313, conv_channels: int = 256):
        self.config = dict(image_size=image_size, in_channels=in_channels, classes=classes,
                           hidden=hidden, conv_channels=conv_channels)
        super().__init__(image_size, in_channels, classes, hidden=[hidden],
                         convs=[(conv_channels, 9, 1, 0), (conv_channels, 9, 2, 0)])


class SmallBaseline(_ConvBaseline):
    """Three convolutions on the small matrix network's grids (5x5/2 padded by 1, 3x3/2, 3x3/1)
    and a linear classifier (labels are accepted, and unused, for the training loop)."""

    model_name = "cnn_small"
    compiled_parts = ()

    def __init__(self, image_size: int = 28, in_channels: int = 1, classes: int = 10,
                 channels: tuple[int, int, int] = (64, 64, 40)):
        self.config = dict(image_size=image_size, in_channels=in_channels, classes=classes,
                           channels=list(channels))
        a, b, c = channels
        super().__init__(image_size, in_channels, classes,
                         convs=[(a, 5, 2, 1), (b, 3, 2, 0), (c, 3, 1, 0)], hidden=[])
