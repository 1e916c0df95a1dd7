"""MultiMNIST: pairs of overlapping digits of different classes, generated on the fly.

Sabour et al. (2017, section 6) test whether CapsNet can segment highly overlapping digits:
"overlaying a digit on top of another digit from the same set (training or test) but different
class. Each digit is shifted up to 4 pixels in each direction resulting in a 36x36 image",
and, since an MNIST digit is bounded by a 20x20 box, "two digits bounding boxes on average
have 80% overlap". They generate 1,000 pairs per MNIST digit (60M training, 10M test pairs).

Their code (tensorflow/models, ``research/capsules/input_data/mnist/mnist_shift.py``,
``shift_write_multi_mnist``) pads each 28x28 digit by ``pad`` pixels, shifts it by a random
integer in [-shift, shift] along each axis with zero fill, pairs each digit with others of a
different label drawn from the same split, and combines the two by a *clipped sum*,
``min(first + second, 255)``, not a maximum; it keeps both shifted digits beside the merged
image. This module does the same: pad 4 (36x36), shifts up to 4 pixels, clipped sum. (The
code's README generates its MultiMNIST test split with ``--shift=6 --pad=4``; the paper says 4,
and so do we by default; ``max_shift`` can be set to 6.)

Our choices where the paper leaves it open: the first digits of ``n`` pairs run through a random
permutation of the given digits (repeated when ``n`` is larger), the second digit is drawn
uniformly among the digits of any other class, and the two shifts are independent.

Nothing is stored: :func:`make_pairs` draws a fixed set from a seed and :func:`pair_stream`
an endless series of batches. :func:`overlap` and :func:`bounding_box_overlap` measure how
much the two digits of each pair overlap, to compare with the paper's 80%. (Our arithmetic:
two 20x20 boxes, both shifted independently by -4 to 4 pixels per axis, share on average
(1 - E|d| / 20)^2 = (1 - 2.96 / 20)^2 = 73% of a box, where d is the difference of the two
shifts; with only one digit shifted it is (1 - 2.22 / 20)^2 = 79%.)
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capsutil.affine_mnist import check_digits, make_generator, translate
from capsutil.data import Digits

PAD = 4                      # 28 + 2 * 4 = 36
CANVAS = 28 + 2 * PAD
MAX_SHIFT = 4                # pixels in each direction (Sabour et al. 2017, section 6)
BOX_REFERENCES = ("first", "smaller", "union")


@dataclass(frozen=True)
class MultiDigits:
    """Pairs of overlapping digits.

    ``images`` uint8 (N, 1, 36, 36), the clipped sum of the two layers; ``labels`` int64 (N, 2),
    the first and the second digit's class; ``layers`` uint8 (N, 2, 1, 36, 36), each digit
    alone, shifted (the reconstruction targets); ``source``. Also kept, to trace each pair:
    ``indices`` int64 (N, 2), the two digits' positions in the Digits they came from, and
    ``shifts`` int64 (N, 2, 2), each digit's (dx, dy) in pixels, right and down.
    """

    images: torch.Tensor
    labels: torch.Tensor
    layers: torch.Tensor
    source: str
    indices: torch.Tensor | None = None
    shifts: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: torch.Tensor) -> "MultiDigits":
        """The pairs at the positions ``index`` (int64 (M,)), in that order."""
        pick = (lambda t: None if t is None else t[index])
        return MultiDigits(self.images[index], self.labels[index], self.layers[index],
                           self.source, pick(self.indices), pick(self.shifts))


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {name} as a positive integer, got {value!r}")
    return value


def _check_source(digits: Digits, max_shift: int) -> torch.Tensor:
    """Check the digits and shift range; return the sorted-by-class order of the digits."""
    check_digits(digits)
    if digits.images.shape[-1] != 28:
        raise ValueError(f"expected 28x28 MNIST digits, got "
                         f"{tuple(digits.images.shape[-2:])} images")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) \
            or not 0 <= max_shift < CANVAS:
        raise ValueError(f"expected max_shift as a whole number of pixels in [0, {CANVAS - 1}], "
                         f"got {max_shift!r}")
    classes = torch.unique(digits.labels).tolist()
    if len(classes) < 2:
        raise ValueError(f"pairs need digits of two different classes; the {len(digits)} "
                         f"digits given have the class(es) {classes}")
    return torch.argsort(digits.labels, stable=True)


def _other_class(labels: torch.Tensor, order: torch.Tensor, first: torch.Tensor,
                 g: torch.Generator) -> torch.Tensor:
    """For each first digit, the position of a digit drawn uniformly among those of another
    class: a draw among the N - n_c others, skipping the block of class c in sorted order."""
    n = len(labels)
    sorted_labels = labels[order]                                           # (N,)
    classes = labels[first]                                                 # (B,)
    start = torch.searchsorted(sorted_labels, classes, side="left")         # (B,) block start
    count = torch.searchsorted(sorted_labels, classes, side="right") - start
    u = torch.rand(len(first), generator=g, dtype=torch.float64)
    rank = torch.minimum((u * (n - count)).long(), n - count - 1)          # (B,) in [0, N - n_c)
    return order[torch.where(rank < start, rank, rank + count)]


def _pairs(digits: Digits, n: int, g: torch.Generator, order: torch.Tensor,
           max_shift: int, source: str) -> MultiDigits:
    """``n`` pairs drawn with the generator ``g`` (the work of make_pairs and pair_stream)."""
    size = len(digits)
    rounds = math.ceil(n / size)
    first = torch.cat([torch.randperm(size, generator=g) for _ in range(rounds)])[:n]  # (n,)
    second = _other_class(digits.labels, order, first, g)                  # (n,)
    indices = torch.stack([first, second], dim=1)                           # (n, 2)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2, 2), generator=g)  # (n, 2, (dx, dy))
    padded = F.pad(digits.images[indices.flatten()], (PAD,) * 4)          # (2n, 1, 36, 36)
    flat_shifts = shifts.view(-1, 2)                                        # (2n, 2)
    layers = translate(padded, flat_shifts[:, 0], flat_shifts[:, 1])        # (2n, 1, 36, 36)
    layers = layers.view(n, 2, 1, CANVAS, CANVAS)                           # (n, 2, 1, 36, 36)
    merged = (layers[:, 0].int() + layers[:, 1].int()).clamp_(max=255)     # (n, 1, 36, 36)
    return MultiDigits(merged.to(torch.uint8), digits.labels[indices], layers, source,
                       indices, shifts)


def make_pairs(digits: Digits, n: int, seed: int | torch.Generator,
               max_shift: int = MAX_SHIFT) -> MultiDigits:
    """``n`` MultiMNIST pairs from ``digits`` (one split of MNIST): a first digit and a second
    of a different class, each padded to 36x36 and shifted by its own integer (dx, dy) in
    [-max_shift, max_shift], combined by ``min(first + second, 255)``. The same seed gives the
    same pairs."""
    order = _check_source(digits, max_shift)
    _check_count("the number of pairs n", n)
    g = make_generator(seed)
    return _pairs(digits, n, g, order, max_shift,
                  f"MultiMNIST pairs of {digits.source} (shifts up to {max_shift} px)")


def pair_stream(digits: Digits, batch_size: int, seed: int | torch.Generator,
                max_shift: int = MAX_SHIFT) -> Iterator[MultiDigits]:
    """An endless iterator of batches of ``batch_size`` fresh pairs, drawn as by
    :func:`make_pairs` from one generator: the first batch equals
    ``make_pairs(digits, batch_size, seed)`` and the stream is the same for the same seed."""
    order = _check_source(digits, max_shift)
    _check_count("batch_size", batch_size)
    g = make_generator(seed)
    source = f"MultiMNIST pairs of {digits.source} (shifts up to {max_shift} px)"

    def batches() -> Iterator[MultiDigits]:
        while True:
            yield _pairs(digits, batch_size, g, order, max_shift, source)

    return batches()


# ----------------------------------------------------------------------------------------------
# How much the two digits overlap
# ----------------------------------------------------------------------------------------------

def _ink(multi: MultiDigits, threshold: float) -> torch.Tensor:
    """Bool (N, 2, H, W): where each digit's pixel, divided by 255, is above ``threshold``."""
    if not isinstance(multi, MultiDigits):
        raise ValueError(f"expected a MultiDigits, got {type(multi).__name__}")
    layers = multi.layers
    if layers.dim() != 5 or layers.shape[1:3] != (2, 1) or layers.dtype != torch.uint8:
        raise ValueError(f"expected uint8 layers of shape (N, 2, 1, H, W), got dtype "
                         f"{layers.dtype} and shape {tuple(layers.shape)}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or not 0 <= threshold < 1:
        raise ValueError(f"expected an ink threshold in [0, 1) (pixel / 255), got {threshold!r}")
    return layers[:, :, 0].float() / 255 > threshold                       # (N, 2, H, W)


def overlap(multi: MultiDigits, threshold: float = 0.5) -> torch.Tensor:
    """The share of the pair's ink that both digits cover: |A and B| / |A or B| (intersection
    over union), where a digit's ink is its pixels above ``threshold`` after dividing by 255.

    -> float32 (N,) in [0, 1]: 0 for digits that do not touch, 1 for identical ink; NaN for a
    pair with no ink at all.
    """
    ink = _ink(multi, threshold)
    both = (ink[:, 0] & ink[:, 1]).flatten(1).sum(dim=1)                    # (N,)
    either = (ink[:, 0] | ink[:, 1]).flatten(1).sum(dim=1)                  # (N,)
    return both.float() / either.float()                                    # 0 / 0 -> NaN


def ink_boxes(multi: MultiDigits, threshold: float = 0.0) -> torch.Tensor:
    """Each digit's ink bounding box, int64 (N, 2, 4) as (top, left, bottom, right), inclusive;
    all -1 for a digit without ink."""
    ink = _ink(multi, threshold)                                            # (N, 2, H, W)
    rows, cols = ink.any(dim=3), ink.any(dim=2)                             # (N, 2, H), (N, 2, W)

    def span(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = mask.int().argmax(dim=-1)
        last = mask.shape[-1] - 1 - mask.flip(-1).int().argmax(dim=-1)
        return first, last

    (top, bottom), (left, right) = span(rows), span(cols)
    boxes = torch.stack([top, left, bottom, right], dim=-1)                 # (N, 2, 4)
    return torch.where(rows.any(dim=-1)[..., None], boxes, torch.full_like(boxes, -1))


def bounding_box_overlap(multi: MultiDigits, reference: str = "first",
                         threshold: float = 0.0) -> torch.Tensor:
    """How much the two digits' ink bounding boxes overlap: the area (in pixels) of their
    intersection over the area of the ``reference`` box: ``"first"`` (the first digit's box,
    the default), ``"smaller"`` (the smaller of the two) or ``"union"`` (the area the two
    boxes cover together, so intersection over union).

    Ink here is any pixel above ``threshold`` * 255, by default every pixel above 0, so that an
    MNIST digit's box is about the 20x20 box the paper speaks of. -> float32 (N,) in [0, 1];
    NaN where a digit has no ink.
    """
    if reference not in BOX_REFERENCES:
        raise ValueError(f"unknown reference box {reference!r}; expected one of "
                         f"{list(BOX_REFERENCES)}")
    boxes = ink_boxes(multi, threshold)                                     # (N, 2, 4)
    a, b = boxes[:, 0], boxes[:, 1]                                         # (N, 4) each
    high = torch.minimum(a[:, 2:], b[:, 2:])                                # (N, 2) bottom, right
    low = torch.maximum(a[:, :2], b[:, :2])                                 # (N, 2) top, left
    inter = (high - low + 1).clamp(min=0).prod(dim=1).float()               # (N,)
    area_a = (a[:, 2:] - a[:, :2] + 1).prod(dim=1).float()
    area_b = (b[:, 2:] - b[:, :2] + 1).prod(dim=1).float()
    denominator = {"first": area_a, "smaller": torch.minimum(area_a, area_b),
                   "union": area_a + area_b - inter}[reference]
    result = inter / denominator
    empty = (a[:, 0] < 0) | (b[:, 0] < 0)
    return torch.where(empty, torch.full_like(result, float("nan")), result)
