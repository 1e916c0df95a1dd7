"""CapsNet on MultiMNIST: both of two overlapping digits recognised and reconstructed (Part IV).

Sabour et al. (2017, section 6) train CapsNet on 36x36 images of two overlaid digits of different
classes (:mod:`capsutil.multimnist`) and read its answer from the digit capsules:

- **prediction**: the two longest digit capsules; a pair counts as right only when both classes
  are (the paper: 5.2% of pairs wrong);
- **margin loss** (eq. 4) with ``T_k = 1`` for both present classes;
- **reconstruction**: the decoder draws each digit from its own capsule, all other capsules
  masked, and each drawing is compared with that digit alone (its *layer*, the single shifted
  digit): the two sums of squared errors are added. In training the capsules of the true
  classes are decoded, otherwise those of the two longest.

The loss needs the two layers of every image. :class:`PairDigits` is a training set like
:class:`capsutil.data.Digits` (images, labels, source) that also hands them out through
``targets(index)``; :func:`capsutil.train.fit` passes such targets on to the loss by name, so
the loss is called as ``loss(output, images, labels, layers=...)``.

Training data: :func:`pair_splits` draws one fixed set of pairs up front (60,000 by default,
from the 55,000 training digits, each pair with its own shifts of up to 4 pixels) and
validation pairs from the validation digits; :func:`pairs_of_test_digits` draws the test pairs
from the test digits. The pairs are not redrawn each epoch and ``fit`` shifts them no further
(``max_shift=0``): a budget version of the paper's 60M training pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capsutil.classifier import predict_in_batches
from capsutil.data import Digits, to_float
from capsutil.layers import capsule_lengths
from capsutil.losses import CapsNetLoss, reconstruction_loss
from capsutil.models import CapsNet
from capsutil.multimnist import CANVAS, MAX_SHIFT, MultiDigits, make_pairs
from capsutil.stats import Accuracy

DIGITS = 2                      # digits per image
CLASSES = 10                    # the classes of MNIST's digits
DEFAULT_PAIRS = 60_000          # training pairs drawn for a run
PAIR_SEEDS = {"val": 1, "test": 2}   # fixed: every training run is scored on the same pairs


def describe_shape(value) -> str:
    """The shape of a tensor as printed in error messages, else the type of what came."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_pair_labels(labels: torch.Tensor, n_classes: int,
                      batch: int | None = None) -> torch.Tensor:
    """The two classes of each image as int64 (B, 2), after checking them.

    Raises ``ValueError`` unless ``labels`` is an integer tensor (B, 2) with values in
    [0, n_classes), two different classes in each row, and ``batch`` rows when given.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[1] != DIGITS:
        raise ValueError(f"expected labels of shape (B, 2), the classes of the two digits of "
                         f"each image, got {describe_shape(labels)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"expected integer class labels, got {labels.dtype}")
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(f"expected {batch} pairs of labels, one per image, got "
                         f"{labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"expected labels in 0..{n_classes - 1}, got values from "
                         f"{int(labels.min())} to {int(labels.max())}")
    same = labels[:, 0] == labels[:, 1]                                    # (B,)
    if bool(same.any()):
        first = int(same.nonzero()[0])
        raise ValueError(f"expected two different classes in each pair of labels, got the "
                         f"class {int(labels[first, 0])} twice for image {first} "
                         f"({int(same.sum())} such image(s) in all)")
    return labels.long()


def two_longest(lengths: torch.Tensor) -> torch.Tensor:
    """The classes of the two longest capsules of each example, in ascending order:
    (B, K) -> int64 (B, 2). Sorted, they compare with sorted labels element by element."""
    return lengths.topk(DIGITS, dim=1).indices.sort(dim=1).values


def pair_margin_loss(lengths: torch.Tensor, labels: torch.Tensor, m_plus: float = 0.9,
                     m_minus: float = 0.1, lambda_absent: float = 0.5) -> torch.Tensor:
    """Margin loss (Sabour et al. 2017, eq. 4) with two present classes per image.

    ``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2`` with ``T_k = 1``
    for both classes of ``labels`` (B, 2), summed over the K classes and averaged over the
    batch. lengths: float (B, K), B >= 1. Returns a scalar.
    """
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 2 \
            or not lengths.is_floating_point() or lengths.shape[0] == 0:
        raise ValueError(f"expected float capsule lengths of shape (B, K) with B >= 1, got "
                         f"{describe_shape(lengths)}")
    labels = check_pair_labels(labels, lengths.shape[1], lengths.shape[0])   # (B, 2)
    present = torch.zeros_like(lengths).scatter_(1, labels, 1.0)            # (B, K) T_k
    loss_present = present * torch.relu(m_plus - lengths) ** 2               # (B, K)
    loss_absent = lambda_absent * (1 - present) * torch.relu(lengths - m_minus) ** 2
    return (loss_present + loss_absent).sum(dim=1).mean()


@dataclass
class MultiCapsNetOutput:
    """What :class:`MultiCapsNet` returns for a batch of B images.

    lengths: (B, K) digit-capsule lengths; poses: (B, K, E) digit capsules; reconstructions:
    (B, 2, H*W) in [0, 1], drawing k decoded from the capsule of class ``decoded[:, k]`` alone;
    decoded: int64 (B, 2), the labels in training, else the predictions; couplings: the
    coupling coefficients of each routing iteration, each (B, I, K), when asked for.
    """

    lengths: torch.Tensor
    poses: torch.Tensor
    reconstructions: torch.Tensor
    decoded: torch.Tensor
    couplings: list[torch.Tensor] | None = None

    @property
    def predictions(self) -> torch.Tensor:
        """The two longest digit capsules' classes, ascending, int64 (B, 2)."""
        return two_longest(self.lengths)


class MultiCapsNet(CapsNet):
    """CapsNet for MultiMNIST (Sabour et al. 2017, section 6): the layers of :class:`CapsNet`
    on 36x36 images, predicting two classes and reconstructing both digits.

    On 36x36 images Conv1 gives 28x28x256 and PrimaryCaps 10x10x32 = 3,200 capsules of 8-D;
    DigitCaps and the decoder (160 -> 512 -> 1024 -> 1296) are as in CapsNet. 11,361,808
    parameters. ``forward(images, labels=None)`` takes float images (B, 1, 36, 36) in [0, 1]
    and optional labels (B, 2) of two different classes, and returns a
    :class:`MultiCapsNetOutput`.
    """

    model_name = "capsnet_multi"
    trained_on_pairs = True           # the command line trains it on MultiMNIST pairs

    def __init__(self, image_size: int = CANVAS, in_channels: int = 1, conv_channels: int = 256,
                 conv_kernel: int = 9, primary_maps: int = 32, primary_dims: int = 8,
                 primary_kernel: int = 9, primary_stride: int = 2, classes: int = 10,
                 digit_dims: int = 16, routing_iterations: int = 3,
                 decoder_hidden: tuple[int, ...] = (512, 1024)):
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < DIGITS:
            raise ValueError(f"expected at least {DIGITS} classes for pairs of digits of "
                             f"different classes, got {classes!r}")
        super().__init__(image_size=image_size, in_channels=in_channels,
                         conv_channels=conv_channels, conv_kernel=conv_kernel,
                         primary_maps=primary_maps, primary_dims=primary_dims,
                         primary_kernel=primary_kernel, primary_stride=primary_stride,
                         classes=classes, digit_dims=digit_dims,
                         routing_iterations=routing_iterations, decoder_hidden=decoder_hidden)

    def reconstruct(self, poses: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Each digit decoded from its own capsule, the others masked to zero:
        poses (B, K, E), classes (B, 2) -> (B, 2, H*W)."""
        return torch.stack([self.decoder(poses, classes[:, k]) for k in range(DIGITS)], dim=1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                return_couplings: bool = False) -> MultiCapsNetOutput:
        images = self.model_input(images)
        u = self.primary(torch.relu(self.conv1(images)))                    # (B, I, D)
        routed = self.digits(u, return_couplings=return_couplings)
        poses, couplings = routed if return_couplings else (routed, None)   # (B, K, E)
        lengths = capsule_lengths(poses)                                    # (B, K)
        if labels is not None:
            labels = check_pair_labels(labels, lengths.shape[1], lengths.shape[0])   # (B, 2)
        decoded = labels if self.training and labels is not None else two_longest(lengths)
        return MultiCapsNetOutput(lengths, poses, self.reconstruct(poses, decoded), decoded,
                                  couplings)


class MultiDigitLoss(CapsNetLoss):
    """Margin loss with both classes present plus each digit's scaled reconstruction loss:
    the training objective of :class:`MultiCapsNet`.

    Called as ``loss(output, images, labels, layers=layers)`` with labels (B, 2) and the two
    digits alone, float ``layers`` (B, 2, 1, H, W) in [0, 1] aligned with the labels (the
    merged ``images`` are not a target). Reconstruction k is compared with layer k and the
    two losses are summed. :meth:`parts` returns the terms separately. The options are
    CapsNetLoss's.
    """

    def parts(self, output, images: torch.Tensor, labels: torch.Tensor,
              layers: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"margin": ..., "reconstruction": ...}``, each a scalar tensor."""
        missing = [name for name in ("lengths", "reconstructions") if not hasattr(output, name)]
        if missing:
            raise TypeError(f"MultiDigitLoss expects the output of MultiCapsNet, got a "
                            f"{type(output).__name__} without {', '.join(missing)}")
        reconstructions = output.reconstructions                           # (B, 2, H*W)
        batch = output.lengths.shape[0]
        if reconstructions.dim() != 3 or reconstructions.shape[:2] != (batch, DIGITS):
            raise TypeError(f"MultiDigitLoss expects two reconstructions per image, "
                            f"({batch}, 2, H*W), got {tuple(reconstructions.shape)}")
        if layers is None:
            raise ValueError("MultiDigitLoss needs the two digits of each image alone as "
                             "layers=(B, 2, 1, H, W); train on PairDigits, whose targets "
                             "carry them")
        expected = (batch, DIGITS, reconstructions.shape[2])
        if not isinstance(layers, torch.Tensor) or layers.dim() < 3 \
                or (*layers.shape[:2], layers[0, 0].numel()) != expected:
            raise ValueError(f"expected layers of shape ({batch}, 2, 1, H, W) with H*W = "
                             f"{expected[2]}, one image per digit, got {describe_shape(layers)}")
        if not layers.is_floating_point():
            raise ValueError(f"expected float layers in [0, 1], got {layers.dtype}; convert "
                             f"with capsutil.data.to_float")
        margin = pair_margin_loss(output.lengths, labels, self.m_plus, self.m_minus,
                                  self.lambda_absent)
        reconstruction = sum(reconstruction_loss(reconstructions[:, k], layers[:, k],
                                                 self.reconstruction_scale)
                             for k in range(DIGITS))
        return {"margin": margin, "reconstruction": reconstruction}

    def forward(self, output, images: torch.Tensor, labels: torch.Tensor,
                layers: torch.Tensor | None = None) -> torch.Tensor:
        parts = self.parts(output, images, labels, layers)
        return parts["margin"] + parts["reconstruction"]


# ----------------------------------------------------------------------------------------------
# Training data: pairs that carry their layers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairDigits:
    """MultiMNIST pairs as a training set: used like :class:`capsutil.data.Digits`.

    ``images`` uint8 (N, 1, H, W), the two digits overlaid; ``labels`` int64 (N, 2), the two
    classes in ascending order (so that they compare with :attr:`MultiCapsNetOutput.predictions`
    element by element); ``layers`` uint8 (N, 2, 1, H, W), digit k alone, shifted, in the order
    of the labels; ``source``. :meth:`targets` gives ``fit`` the layers of a batch.
    """

    images: torch.Tensor
    labels: torch.Tensor
    layers: torch.Tensor
    source: str

    def __post_init__(self) -> None:
        images, labels, layers = self.images, self.labels, self.layers
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1 \
                or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images of shape (N, 1, H, W), got "
                             f"{describe_shape(images)}")
        n, size = images.shape[0], tuple(images.shape[2:])
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise ValueError(f"expected int64 labels of shape ({n}, 2), got {describe_shape(labels)}")
        check_pair_labels(labels, CLASSES, n)
        if not isinstance(layers, torch.Tensor) or layers.dtype != torch.uint8 \
                or tuple(layers.shape) != (n, DIGITS, 1, *size):
            raise ValueError(f"expected uint8 layers of shape ({n}, 2, 1, {size[0]}, "
                             f"{size[1]}), got {describe_shape(layers)}")
        unsorted = labels[:, 0] > labels[:, 1]
        if bool(unsorted.any()):
            first = int(unsorted.nonzero()[0])
            raise ValueError(f"expected the two labels of each pair in ascending order "
                             f"(PairDigits.from_multi sorts them), got "
                             f"{tuple(labels[first].tolist())} for pair {first}")

    @classmethod
    def from_multi(cls, multi: MultiDigits) -> "PairDigits":
        """The pairs of ``multi`` with each pair's labels sorted and its layers in their order
        (the overlaid image, a clipped sum, does not depend on the order)."""
        if not isinstance(multi, MultiDigits):
            raise ValueError(f"expected a MultiDigits, got {type(multi).__name__}")
        labels, order = multi.labels.sort(dim=1)                                  # (N, 2)
        layers = multi.layers.gather(1, order[:, :, None, None, None].expand_as(multi.layers))
        return cls(multi.images, labels, layers, multi.source)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "PairDigits":
        """The first ``n`` pairs (all of them if ``n`` is larger)."""
        return PairDigits(self.images[:n], self.labels[:n], self.layers[:n], self.source)

    def select(self, index: torch.Tensor) -> "PairDigits":
        """The pairs at the positions ``index`` (int64 (M,)), in that order."""
        return PairDigits(self.images[index], self.labels[index], self.layers[index],
                          self.source)

    def targets(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the loss needs besides images and labels for the pairs ``index`` (M,):
        ``{"layers": float (M, 2, 1, H, W) in [0, 1]}``."""
        return {"layers": to_float(self.layers[index])}


def make_pair_digits(digits: Digits, n: int, seed: int | torch.Generator,
                     max_shift: int = MAX_SHIFT) -> PairDigits:
    """``n`` pairs of ``digits`` drawn by :func:`capsutil.multimnist.make_pairs`, as
    :class:`PairDigits`."""
    return PairDigits.from_multi(make_pairs(digits, n, seed, max_shift))


def pair_splits(train: Digits, val: Digits | None, n_train: int = DEFAULT_PAIRS,
                seed: int = 0) -> tuple[PairDigits, PairDigits | None]:
    """The MultiMNIST data of a training run: ``n_train`` pairs of the ``train`` digits drawn
    once with ``seed``, and one pair per ``val`` digit (each digit first once) drawn with the
    fixed seed ``PAIR_SEEDS["val"]``, so that every training seed is validated on the same
    pairs. Training and validation pairs never share a digit."""
    train_pairs = make_pair_digits(train, n_train, seed)
    val_pairs = make_pair_digits(val, len(val), PAIR_SEEDS["val"]) if val is not None else None
    return train_pairs, val_pairs


def pairs_of_test_digits(test: Digits) -> PairDigits:
    """One pair per ``test`` digit (each digit first once), drawn with the fixed seed
    ``PAIR_SEEDS["test"]``: 10,000 pairs of the MNIST test set."""
    return make_pair_digits(test, len(test), PAIR_SEEDS["test"])


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairEvaluation:
    """How a model does on pairs: ``both``, the pairs whose two classes are both right (the
    paper's measure); ``per_digit``, the digits (two per pair) whose class is among the two
    predicted; ``predictions`` and ``labels``, int64 (N, 2), each row ascending."""

    both: Accuracy
    per_digit: Accuracy
    predictions: torch.Tensor
    labels: torch.Tensor

    def __str__(self) -> str:
        return f"both digits right: {self.both}; per digit: {self.per_digit}"


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: PairDigits | MultiDigits,
                   batch_size: int = 500) -> PairEvaluation:
    """Score ``model`` (e.g. :class:`MultiCapsNet`, in eval mode: no labels, no shifts) on
    ``pairs``: uint8 images (N, 1, H, W), N >= 1, and labels (N, 2) in any order.

    A pair is right when the set of the two predicted classes is the set of its labels; a
    digit when its class is one of the two predicted. The model's mode is restored.
    """
    images, labels = getattr(pairs, "images", None), getattr(pairs, "labels", None)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 \
            or images.dtype != torch.uint8 or len(images) == 0:
        raise ValueError(f"expected pairs with uint8 images of shape (N, 1, H, W), N >= 1, "
                         f"got {describe_shape(images)}")
    labels = check_pair_labels(labels, CLASSES, len(images)).sort(dim=1).values    # (N, 2)
    predictions = predict_in_batches(model, images, batch_size, prepare=to_float)  # (N, 2)
    if tuple(predictions.shape) != tuple(labels.shape):
        raise ValueError(f"expected a model that predicts two classes per image, (N, 2), got "
                         f"predictions of shape {tuple(predictions.shape)}")
    predictions = predictions.sort(dim=1).values
    both = (predictions == labels).all(dim=1)                                    # (N,)
    found = (labels[:, :, None] == predictions[:, None, :]).any(dim=2)           # (N, 2)
    return PairEvaluation(Accuracy(int(both.sum()), len(labels)),
                          Accuracy(int(found.sum()), found.numel()), predictions, labels)
