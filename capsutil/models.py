"""CapsNet (Sabour et al. 2017, chapter 05), matrix capsules (Hinton et al. 2018, chapter 08)
and the registry of named models (these two and the CNN baselines of :mod:`capsutil.baselines`).

The registry maps a name (``"capsnet"``) to the model class and its training loss, so training,
checkpoints and pretrained weights work for any registered model: each model stores its
constructor arguments in ``model.config`` and can be rebuilt with ``build_model(name, **config)``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from capsutil.baselines import CapsNetBaseline, CrossEntropy, SmallBaseline
from capsutil.classifier import ImageClassifier
from capsutil.layers import Decoder, DigitCaps, PrimaryCaps, capsule_lengths
from capsutil.losses import CapsNetLoss, SpreadLoss, check_labels
from capsutil.matrix_layers import (ClassCaps, ConvCaps, PrimaryMatrixCaps, coordinate_offsets,
                                    receptive_field_centres)
from capsutil.routing import schedule_ending_at


@dataclass
class CapsNetOutput:
    """What :class:`CapsNet` returns for a batch of B images.

    lengths: (B, K) digit-capsule lengths (class probabilities); poses: (B, K, E) digit
    capsules; reconstructions: (B, H*W) decoder output in [0, 1]; couplings: the coupling
    coefficients of each routing iteration, each (B, I, K), when asked for.
    """

    lengths: torch.Tensor
    poses: torch.Tensor
    reconstructions: torch.Tensor
    couplings: list[torch.Tensor] | None = None

    @property
    def predictions(self) -> torch.Tensor:
        """The predicted class of each image: the longest digit capsule, int64 (B,)."""
        return self.lengths.argmax(dim=1)


class CapsNet(ImageClassifier):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing by agreement) -> Decoder (chapter 05).

    Paper configuration (the defaults): Conv1 256 kernels 9x9 stride 1 with ReLU (20x20x256);
    PrimaryCaps 32 maps of 8-D capsules, 9x9 stride 2 (1152 capsules); DigitCaps 10 capsules of
    16-D, 3 routing iterations; decoder 160 -> 512 -> 1024 -> 784. 8,215,568 parameters.

    ``forward(images, labels)`` takes float images (B, C, H, W) in [0, 1] and returns a
    :class:`CapsNetOutput`. The decoder sees the capsule of the true label in training mode
    (when labels are given) and the capsule of the predicted class otherwise.
    """

    model_name = "capsnet"
    compiled_parts = ("digits",)      # what capsutil.runtime.compile_model compiles

    def __init__(self, image_size: int = 28, in_channels: int = 1, conv_channels: int = 256,
                 conv_kernel: int = 9, primary_maps: int = 32, primary_dims: int = 8,
                 primary_kernel: int = 9, primary_stride: int = 2, classes: int = 10,
                 digit_dims: int = 16, routing_iterations: int = 3,
                 decoder_hidden: tuple[int, ...] = (512, 1024)):
        super().__init__()
        self.config = dict(image_size=image_size, in_channels=in_channels,
                           conv_channels=conv_channels, conv_kernel=conv_kernel,
                           primary_maps=primary_maps, primary_dims=primary_dims,
                           primary_kernel=primary_kernel, primary_stride=primary_stride,
                           classes=classes, digit_dims=digit_dims,
                           routing_iterations=routing_iterations,
                           decoder_hidden=list(decoder_hidden))
        conv_size = image_size - conv_kernel + 1
        primary_size = (conv_size - primary_kernel) // primary_stride + 1
        if primary_size < 1:
            raise ValueError(f"images of {image_size}x{image_size} are too small for kernels "
                             f"{conv_kernel} and {primary_kernel}")
        self.image_size, self.in_channels = image_size, in_channels
        self.conv1 = nn.Conv2d(in_channels, conv_channels, conv_kernel)
        self.primary = PrimaryCaps(conv_channels, primary_maps, primary_dims, primary_kernel,
                                   primary_stride)
        self.digits = DigitCaps(primary_maps * primary_size**2, primary_dims, classes, digit_dims,
                                routing_iterations)
        self.decoder = Decoder(classes, digit_dims, tuple(decoder_hidden),
                               in_channels * image_size**2)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                return_couplings: bool = False) -> CapsNetOutput:
        images = self.model_input(images)
        u = self.primary(torch.relu(self.conv1(images)))              # (B, I, D)
        routed = self.digits(u, return_couplings=return_couplings)
        poses, couplings = routed if return_couplings else (routed, None)   # (B, J, E)
        lengths = capsule_lengths(poses)                              # (B, J)
        if self.training and labels is not None:
            index = check_labels(labels, lengths.shape[1], lengths.shape[0])    # int64 (B,)
        else:
            index = lengths.argmax(dim=1)
        return CapsNetOutput(lengths, poses, self.decoder(poses, index), couplings)


@dataclass
class MatrixCapsNetOutput:
    """What :class:`MatrixCapsNet` returns for a batch of B images.

    activations: (B, K) class-capsule activations in (0, 1); poses: (B, K, 4, 4) class poses;
    assignments: when asked for, the EM-routing assignments of every iteration of each routed
    layer, ``{"conv_caps1": [...], "conv_caps2": [...], "class_caps": [...]}``, each
    (rows, children, parents) as in the layers' docstrings.
    """

    activations: torch.Tensor
    poses: torch.Tensor
    assignments: dict[str, list[torch.Tensor]] | None = None

    @property
    def predictions(self) -> torch.Tensor:
        """The predicted class of each image: the most active class capsule, int64 (B,)."""
        return self.activations.argmax(dim=1)


class MatrixCapsNet(ImageClassifier):
    """Conv1 -> PrimaryCaps -> ConvCaps1 -> ConvCaps2 -> class capsules, EM routing (chapter 08).

    Hinton, Sabour & Frosst (2018), figure 1: Conv1 ``A`` kernels 5x5 stride 2 with ReLU;
    PrimaryCaps ``B`` types of 4x4 pose + activation (1x1); ConvCaps1 ``C`` types, K=3 stride 2;
    ConvCaps2 ``D`` types, K=3 stride 1; class capsules with transformation matrices shared
    across positions and coordinate addition. ``last_inverse_temperature`` rescales the
    routing's schedule to end there (:func:`capsutil.routing.schedule_ending_at`);
    ``beta_u_init`` replaces ``BETA_U_INIT`` as the start of every routed layer's beta_u.
    ``conv1_padding`` pads Conv1's input: with 1, the
    grids on 28x28 images are 13x13, 13x13, 6x6 and 4x4 and every pixel reaches the class
    capsules; with 0 (the first networks of chapter 08) they are 12x12, 12x12, 5x5 and 3x3, and
    ConvCaps1's windows (K=3, stride 2) never cover the last row and column of the primary
    grid, so image rows and columns 25-27 reach no class capsule. The paper's configuration is
    A=B=C=D=32 (318,964 parameters); the small one A=64, B=8, C=D=16 (68,444). ``detach_intermediate=False`` (default) backpropagates through every
    routing iteration: with the earlier iterations detached, as CapsNet's routing does,
    the network learns far more slowly (chapter 08 measures it). ``forward(images)`` takes float
    images (B, C, H, W) in [0, 1] and returns a :class:`MatrixCapsNetOutput` (labels are
    accepted, and unused, for the training loop).
    """

    model_name = "matrix"
    # Eager: with torch 2.13 on the CPU, the compiled capsule layers crashed in training
    # (glibc "free(): invalid size" at batch 64), and eager meets the speed targets.
    compiled_parts = ()
    def __init__(self, A: int = 32, B: int = 32, C: int = 32, D: int = 32, iterations: int = 3,
                 image_size: int = 28, in_channels: int = 1, classes: int = 10,
                 coordinate_addition: bool = True, detach_intermediate: bool = False,
                 conv1_padding: int = 0, last_inverse_temperature: float | None = None,
                 beta_u_init: float | None = None):
        super().__init__()
        self.config = dict(A=A, B=B, C=C, D=D, iterations=iterations, image_size=image_size,
                           in_channels=in_channels, classes=classes,
                           coordinate_addition=coordinate_addition,
                           detach_intermediate=detach_intermediate)
        # Recorded only when used, so that the records of older networks still match.
        if conv1_padding:
            self.config["conv1_padding"] = conv1_padding
        if last_inverse_temperature is not None:
            self.config["last_inverse_temperature"] = last_inverse_temperature
        if beta_u_init is not None:
            self.config["beta_u_init"] = beta_u_init
        # (kernel, stride, padding) of Conv1, PrimaryCaps, ConvCaps1, ConvCaps2, image upwards.
        self.geometry = ((5, 2, conv1_padding), (1, 1, 0), (3, 2, 0), (3, 1, 0))
        size = image_size
        for kernel, stride, padding in self.geometry:
            size = (size + 2 * padding - kernel) // stride + 1
        if size < 1:
            raise ValueError(f"images of {image_size}x{image_size} are too small for "
                             f"MatrixCapsNet's layers with conv1_padding={conv1_padding}")
        self.image_size, self.in_channels = image_size, in_channels
        (conv_kernel, conv_stride, _), _, (kernel1, stride1, _), (kernel2, stride2, _) = \
            self.geometry
        self.conv1 = nn.Conv2d(in_channels, A, kernel_size=conv_kernel, stride=conv_stride,
                               padding=conv1_padding)
        self.primary = PrimaryMatrixCaps(A, B)
        routing = dict(iterations=iterations, detach_intermediate=detach_intermediate)
        self.conv_caps1 = ConvCaps(B, C, kernel=kernel1, stride=stride1, **routing)
        self.conv_caps2 = ConvCaps(C, D, kernel=kernel2, stride=stride2, **routing)
        self.class_caps = ClassCaps(D, classes, positions=size * size, **routing)
        for layer in (self.conv_caps1, self.conv_caps2, self.class_caps):
            if last_inverse_temperature is not None:
                layer.inverse_temperatures = schedule_ending_at(iterations,
                                                                last_inverse_temperature)
            if beta_u_init is not None:
                nn.init.constant_(layer.beta_u, beta_u_init)
        centres = receptive_field_centres(size, self.geometry, image_size)   # (size,)
        offsets = coordinate_offsets(centres, centres, D) if coordinate_addition else None
        self.register_buffer("coordinate_offsets", offsets, persistent=False)   # (I, 16)

    def capsule_layers(self, images: torch.Tensor,
                       return_assignments: bool = False) -> dict[str, tuple]:
        """The outputs of every capsule layer for float images (B, C, H, W), from the bottom up.

        ``{"primary": ..., "conv_caps1": ..., "conv_caps2": ...}``, each (poses, activations)
        on its grid, e.g. (B, 13, 13, B, 4, 4) and (B, 13, 13, B) for the primary capsules on
        28x28 images with ``conv1_padding=1``, and ``"class_caps"``: (poses (B, K, 4, 4),
        activations (B, K)). With
        ``return_assignments`` each routed layer's tuple also ends with its assignments, one
        tensor per routing iteration.
        """
        images = self.model_input(images)
        x = torch.relu(self.conv1(images))                  # (B, A, 13, 13); unpadded 12x12
        layers = {"primary": self.primary(x)}                         # on Conv1's grid, B types
        layers["conv_caps1"] = self.conv_caps1(*layers["primary"],    # 6x6 (5x5) grid, C types
                                               return_assignments=return_assignments)
        layers["conv_caps2"] = self.conv_caps2(*layers["conv_caps1"][:2],   # 4x4 (3x3), D types
                                               return_assignments=return_assignments)
        layers["class_caps"] = self.class_caps(*layers["conv_caps2"][:2], self.coordinate_offsets,
                                               return_assignments)
        return layers

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                return_assignments: bool = False) -> MatrixCapsNetOutput:
        layers = self.capsule_layers(images, return_assignments)
        poses, activations = layers["class_caps"][:2]                 # (B, K, 4, 4), (B, K)
        assignments = None
        if return_assignments:
            assignments = {name: routed[2] for name, routed in layers.items() if name != "primary"}
        return MatrixCapsNetOutput(activations, poses, assignments)


# The two sizes of MatrixCapsNet the book trains and measures (chapter 08, the benchmark).
MATRIX_SIZES = {"paper": dict(A=32, B=32, C=32, D=32), "small": dict(A=64, B=8, C=16, D=16)}


@dataclass(frozen=True)
class Entry:
    """A registered model: its class and the loss it is trained with."""

    model: Callable[..., nn.Module]
    loss: Callable[..., nn.Module]


from capsutil.multimnist_capsnet import MultiCapsNet, MultiDigitLoss  # noqa: E402 (needs CapsNet)
from capsutil.multimnist_baseline import MultiDigitBaseline, PairCrossEntropy  # noqa: E402

MODELS: dict[str, Entry] = {"capsnet": Entry(CapsNet, CapsNetLoss),
                           "capsnet_multi": Entry(MultiCapsNet, MultiDigitLoss),
                           "matrix": Entry(MatrixCapsNet, SpreadLoss),
                           "cnn_capsnet": Entry(CapsNetBaseline, CrossEntropy),
                           "cnn_small": Entry(SmallBaseline, CrossEntropy),
                           "cnn_multi": Entry(MultiDigitBaseline, PairCrossEntropy)}


def _entry(name: str) -> Entry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def _construct(factory: Callable[..., nn.Module], arguments: dict, what: str) -> nn.Module:
    """``factory(**arguments)``, after checking that it takes every argument given."""
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ValueError(f"{what} takes no argument {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(accepted) or 'none'}")
    return factory(**arguments)


def build_model(name: str, **config) -> nn.Module:
    """A fresh model registered as ``name``, with constructor arguments ``config``.

    An argument the model does not take raises ``ValueError`` naming the ones it does.
    """
    return _construct(_entry(name).model, config, f"model {name!r}")


def build_loss(name: str, **options) -> nn.Module:
    """The training loss of the model registered as ``name``, with constructor ``options``
    (e.g. ``reconstruction_scale=0`` for CapsNet). An option the loss does not take raises
    ``ValueError`` naming the ones it does."""
    return _construct(_entry(name).loss, options, f"the loss of {name!r}")


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
