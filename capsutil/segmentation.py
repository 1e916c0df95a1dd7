"""Segmentation by reconstruction: what a trained MultiMNIST CapsNet draws for each digit.

Sabour et al. (2017, section 6, figure 5) decode each digit of a MultiMNIST pair from its own
digit capsule, all other capsules masked, and overlay the two drawings in two colours: every
pixel of the input is explained by one digit, by the other, or by both. This module (chapter
10) asks a trained :class:`capsutil.multimnist_capsnet.MultiCapsNet` for those drawings and
scores them:

- :func:`reconstruct_each`: the two drawings of each image, for any two classes;
- :func:`segment`: per pixel, the digit whose drawing is brighter (a segmentation map);
- :func:`segmentation_scores`: how well drawing ``k`` matches digit ``k`` alone (its *layer*)
  rather than the other digit or the whole image, and the overlap of their ink;
- :func:`two_colour_image`: the two drawings as one RGB picture, one colour per digit.

Index letters as elsewhere: ``N`` images, ``k`` in {0, 1} the digit of a pair, ``H``, ``W``
the 36x36 canvas.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capsutil.classifier import check_batch_size, eval_mode
from capsutil.data import to_float
from capsutil.multimnist_capsnet import DIGITS, check_pair_labels, describe_shape

INK = 0.5                                # a pixel is ink above this (after dividing by 255)
COLOURS = ((0.85, 0.15, 0.1), (0.1, 0.45, 0.9))   # RGB of digit 0 (red) and digit 1 (blue)


def _check_drawings(reconstructions: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` unless ``reconstructions`` is float (N, 2, H, W)."""
    if not isinstance(reconstructions, torch.Tensor) or reconstructions.dim() != 4 \
            or reconstructions.shape[1] != DIGITS or not reconstructions.is_floating_point():
        raise ValueError(f"expected float reconstructions of shape (N, 2, H, W), one drawing "
                         f"per digit, got {describe_shape(reconstructions)}"
                         + (f" of {reconstructions.dtype}"
                            if isinstance(reconstructions, torch.Tensor) else ""))
    return reconstructions


@torch.no_grad()
def reconstruct_each(model: nn.Module, images: torch.Tensor, classes: torch.Tensor,
                     batch_size: int = 500) -> torch.Tensor:
    """Each of the two digits of every image decoded from its own capsule, all others masked.

    ``model``: a :class:`MultiCapsNet`; ``images``: uint8 pairs (N, 1, H, W) as
    :class:`capsutil.multimnist_capsnet.PairDigits` holds them; ``classes``: int (N, 2), two
    different classes per image, in any order (the labels, the predictions, or any other two).
    The digit capsules come from the model's forward pass in eval mode and drawing ``k`` from
    its own ``reconstruct`` (the masked decoder of training) with class ``classes[:, k]``.
    Returns float32 (N, 2, H, W) in [0, 1] on the CPU, in the order of ``classes``. The
    model's mode is restored.
    """
    if not callable(getattr(model, "reconstruct", None)) \
            or not hasattr(model, "image_size") or "classes" not in getattr(model, "config", {}):
        raise ValueError(f"expected a MultiCapsNet (a model with reconstruct), got "
                         f"{type(model).__name__}")
    size = model.image_size
    if not isinstance(images, torch.Tensor) or images.dim() != 4 \
            or tuple(images.shape[1:]) != (1, size, size) or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images of shape (N, 1, {size}, {size}), got "
                         f"{describe_shape(images)}"
                         + (f" of {images.dtype}" if isinstance(images, torch.Tensor) else ""))
    classes = check_pair_labels(classes, model.config["classes"], len(images))   # (N, 2)
    check_batch_size(batch_size)
    device = next(model.parameters()).device
    drawings = []
    with eval_mode(model):
        for chunk, pair in zip(images.split(batch_size), classes.split(batch_size)):
            poses = model(to_float(chunk).to(device)).poses                  # (B, K, E)
            drawings.append(model.reconstruct(poses, pair.to(device)).cpu())  # (B, 2, H*W)
    if not drawings:
        return torch.empty(0, DIGITS, size, size)
    return torch.cat(drawings).float().view(-1, DIGITS, size, size)          # (N, 2, H, W)


def segment(reconstructions: torch.Tensor, background: float | None = None) -> torch.Tensor:
    """Which digit each pixel belongs to: the one whose drawing is brighter there.

    ``reconstructions`` float (N, 2, H, W) -> int64 (N, H, W) with 0 or 1 (a tie goes to 0).
    With ``background``, pixels where both drawings are at most that bright get -1.
    """
    drawings = _check_drawings(reconstructions)
    owner = drawings.argmax(dim=1)                                          # (N, H, W)
    if background is not None:
        owner[drawings.amax(dim=1) <= background] = -1
    return owner


def _layers_as_float(layers: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    """``layers`` (N, 2, 1, H, W), uint8 or float, -> float (N, 2, H, W) in [0, 1]."""
    n, _, h, w = expected
    if not isinstance(layers, torch.Tensor) or tuple(layers.shape) != (n, DIGITS, 1, h, w):
        raise ValueError(f"expected layers of shape ({n}, 2, 1, {h}, {w}), each digit alone "
                         f"in the order of the reconstructions, got {describe_shape(layers)}")
    layers = to_float(layers) if layers.dtype == torch.uint8 else layers.float()
    return layers[:, :, 0]                                                  # (N, 2, H, W)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of boolean masks (..., H, W) -> (...); NaN where both are empty."""
    both = (a & b).flatten(-2).sum(dim=-1).float()
    either = (a | b).flatten(-2).sum(dim=-1).float()
    return both / either


@dataclass(frozen=True)
class SegmentationScores:
    """How the two drawings of N pairs match the two digits, drawing ``k`` with digit ``k``.

    ``own_error``, ``other_error``, ``image_error``: float (N, 2), the mean squared error per
    pixel of drawing ``k`` to its own digit's layer, to the other digit's layer, and to the
    whole image (the two layers' clipped sum). ``iou`` (N, 2): intersection over union of the
    ink (pixels above ``threshold``) of drawing ``k`` and of layer ``k``; NaN when both have
    none. ``pixels_right`` (N,): of the pixels that are ink of exactly one digit, the share
    that :func:`segment` of the drawings gives to that digit; NaN for a pair without such
    pixels.
    """

    own_error: torch.Tensor
    other_error: torch.Tensor
    image_error: torch.Tensor
    iou: torch.Tensor
    pixels_right: torch.Tensor

    @property
    def own_closer(self) -> torch.Tensor:
        """Bool (N, 2): drawing ``k`` is closer to its own digit than to the other one."""
        return self.own_error < self.other_error

    @property
    def swapped(self) -> torch.Tensor:
        """Bool (N,): both drawings are closer to the other digit than to their own."""
        return (self.own_error > self.other_error).all(dim=1)

    @property
    def merged(self) -> torch.Tensor:
        """Bool (N,): a drawing is closer to the whole image than to its own digit alone,
        that is, it draws (parts of) both digits."""
        return (self.image_error < self.own_error).any(dim=1)

    def summary(self) -> dict[str, float]:
        """Means over the pairs: errors, the share of drawings closer to their own digit,
        the shares of swapped and merged pairs, ink IoU and pixels right (NaN ignored)."""
        return {"own_error": self.own_error.mean().item(),
                "other_error": self.other_error.mean().item(),
                "own_closer": self.own_closer.float().mean().item(),
                "swapped": self.swapped.float().mean().item(),
                "merged": self.merged.float().mean().item(),
                "iou": self.iou.nanmean().item(),
                "pixels_right": self.pixels_right.nanmean().item()}


def segmentation_scores(reconstructions: torch.Tensor, layers: torch.Tensor,
                        threshold: float = INK) -> SegmentationScores:
    """Score drawings (N, 2, H, W) against the digits alone, ``layers`` (N, 2, 1, H, W) (uint8
    as in :class:`PairDigits`, or float in [0, 1]), drawing ``k`` against layer ``k``: decode
    with the pairs' labels (:func:`reconstruct_each`) so that the orders agree. ``threshold``
    in [0, 1) separates ink from background. See :class:`SegmentationScores`."""
    drawings = _check_drawings(reconstructions).float()                     # (N, 2, H, W)
    truth = _layers_as_float(layers, tuple(drawings.shape))                 # (N, 2, H, W)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0 <= threshold < 1:
        raise ValueError(f"expected an ink threshold in [0, 1), got {threshold!r}")
    image = truth.sum(dim=1, keepdim=True).clamp(max=1)                     # (N, 1, H, W)

    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b) ** 2).flatten(2).mean(dim=2)                        # (N, 2)

    counted = (truth > threshold).sum(dim=1) == 1                           # (N, H, W)
    agree = (segment(drawings) == segment(truth)) & counted     # the inked digit is brighter
    pixels_right = agree.flatten(1).sum(1).float() / counted.flatten(1).sum(1).float()
    return SegmentationScores(own_error=mse(drawings, truth),
                              other_error=mse(drawings, truth.flip(1)),
                              image_error=mse(drawings, image.expand_as(drawings)),
                              iou=_iou(drawings > threshold, truth > threshold),
                              pixels_right=pixels_right)


def two_colour_image(reconstructions: torch.Tensor,
                     colours: tuple[tuple[float, float, float], ...] = COLOURS) -> torch.Tensor:
    """The two drawings of each image as one RGB picture on white, digit ``k`` in
    ``colours[k]``: ink of both digits mixes like two inks on paper (darker where both draw).

    float (N, 2, H, W) in [0, 1] -> float (N, H, W, 3) in [0, 1], for ``plt.imshow``.
    """
    drawings = _check_drawings(reconstructions).float().clamp(0, 1)        # (N, 2, H, W)
    if len(colours) != DIGITS or any(len(c) != 3 for c in colours):
        raise ValueError(f"expected two RGB colours, got {colours!r}")
    absorbed = 1 - torch.tensor(colours, dtype=drawings.dtype)              # (2, 3)
    rgb = 1 - torch.einsum("nkhw,kc->nhwc", drawings, absorbed)             # (N, H, W, 3)
    return rgb.clamp(0, 1)
