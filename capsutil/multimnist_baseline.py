"""A convolutional baseline for MultiMNIST, trained with the capsule network's recipe (chapter 10).

:class:`MultiDigitBaseline` keeps the two convolutions of :class:`MultiCapsNet` (256 kernels 9x9,
then 256 kernels 9x9 with stride 2, giving 10x10x256 on a 36x36 pair) and replaces DigitCaps and
the decoder by a fully connected head of about the same parameter count: 11,373,870 against the
capsule network's 11,361,808. It scores the ten classes independently; its answer is the two
highest scores, read like the two longest capsules. :class:`PairCrossEntropy` trains it: a
binary cross-entropy per class with both classes of the pair present. It draws nothing, so it
has no reconstruction loss, and the digits' layers that the training loop hands to every loss
are not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from capsutil.baselines import CapsNetBaseline
from capsutil.multimnist import CANVAS
from capsutil.multimnist_capsnet import CLASSES, check_pair_labels, two_longest

MATCHED_HIDDEN = 236            # head width that matches MultiCapsNet's parameter count


@dataclass
class PairBaselineOutput:
    """logits: (B, K) independent class scores before the sigmoid."""

    logits: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        """The two highest-scoring classes of each image, ascending, int64 (B, 2)."""
        return two_longest(self.logits)


class MultiDigitBaseline(CapsNetBaseline):
    """CapsNet's two convolutions on 36x36 pairs (``conv_channels`` kernels each), ``hidden``
    fully connected units and one score per class. ``forward(images, labels=None)`` takes float images (B, 1, 36, 36) in [0, 1]
    (labels are accepted, and unused, for the training loop) and returns a
    :class:`PairBaselineOutput`."""

    model_name = "cnn_multi"
    trained_on_pairs = True           # the command line trains it on MultiMNIST pairs

    def __init__(self, image_size: int = CANVAS, in_channels: int = 1, classes: int = CLASSES,
                 hidden: int = MATCHED_HIDDEN, conv_channels: int = 256):
        super().__init__(image_size=image_size, in_channels=in_channels, classes=classes,
                         hidden=hidden, conv_channels=conv_channels)

    def forward(self, images: torch.Tensor,
                labels: torch.Tensor | None = None) -> PairBaselineOutput:
        return PairBaselineOutput(super().forward(images, labels).logits)      # (B, K)


class PairCrossEntropy(nn.Module):
    """Binary cross-entropy of each class score against "present in the pair", averaged over
    classes and images. Called like :class:`MultiDigitLoss`: ``loss(output, images, labels,
    layers=None)`` with labels (B, 2); ``layers`` is accepted and ignored."""

    config: dict = {}

    def forward(self, output: PairBaselineOutput, images: torch.Tensor, labels: torch.Tensor,
                layers: torch.Tensor | None = None) -> torch.Tensor:
        if not hasattr(output, "logits"):
            raise TypeError(f"PairCrossEntropy expects the output of a baseline (with logits), "
                            f"got a {type(output).__name__}")
        logits = output.logits                                                 # (B, K)
        labels = check_pair_labels(labels, logits.shape[1], logits.shape[0])   # (B, 2)
        present = torch.zeros_like(logits).scatter_(1, labels, 1.0)            # (B, K)
        return F.binary_cross_entropy_with_logits(logits, present)
