"""Starting a matrix capsule network with about half of each layer's capsules active.

The authors of EM routing answered on OpenReview that they set the initial scale so that about
half of the capsules in each layer are active at the start. A routed parent's activation is
``logistic(lambda (beta_a - sum_h (beta_u + ln sigma_h) n))`` (chapter 07): for a given
``beta_u`` and ``beta_a``, the spread ``sigma`` of the votes decides it, and that spread is set by
the scale of the transformation matrices W. :func:`calibrate_half_active` therefore rescales
each routed layer's W, from the bottom up, until half of that layer's capsules are active on a
batch of training images; :func:`active_fractions` measures the result (chapter 08 prints it).
"""
from __future__ import annotations

import math

import torch

from capsutil.data import Digits, to_float
from capsutil.models import MatrixCapsNet

ROUTED_LAYERS = ("conv_caps1", "conv_caps2", "class_caps")
ACTIVE = 0.5                         # a capsule counts as active above this activation
LOG_FACTOR_RANGE = (-8.0, 8.0)       # the factors searched: e^-8 to e^8 times the initial W
START_IMAGES = 256                   # training images the half-active start is calibrated on


def _check_model(model) -> None:
    if not isinstance(model, MatrixCapsNet):
        raise ValueError(f"expected a MatrixCapsNet, got {type(model).__name__}")


@torch.no_grad()
def active_fractions(model: MatrixCapsNet, images: torch.Tensor) -> dict[str, float]:
    """The share of active capsules (activation > 0.5) in each capsule layer, over every image,
    position and type: ``{"primary": ..., "conv_caps1": ..., "conv_caps2": ...,
    "class_caps": ...}``. ``images``: float (B, C, H, W) in [0, 1]."""
    _check_model(model)
    layers = model.capsule_layers(images)
    return {name: float((activations > ACTIVE).float().mean())
            for name, (_, activations, *_) in layers.items()}


@torch.no_grad()
def calibrate_half_active(model: MatrixCapsNet, images: torch.Tensor, target: float = 0.5,
                          steps: int = 24) -> dict[str, float]:
    """Rescale the transformation matrices of each routed layer, bottom-up, so that a share
    ``target`` of its capsules are active on ``images`` (float (B, C, H, W) in [0, 1]).

    For each layer a bisection over ``ln(factor)`` in ``LOG_FACTOR_RANGE`` (``steps`` halvings)
    finds the factor: larger votes spread more, which raises every parent's cost and lowers its
    activation, so the share of active capsules falls as the factor grows. The weights are
    changed in place (a plain rescaling of ``weight``: checkpoints and exports are unchanged in
    format). Returns the factor applied to each layer.
    """
    _check_model(model)
    if not 0 < target < 1:
        raise ValueError(f"expected a target share of active capsules in (0, 1), got {target!r}")
    factors = {}
    for name in ROUTED_LAYERS:
        weight = getattr(model, name).weight
        start = weight.detach().clone()
        low, high = LOG_FACTOR_RANGE
        for _ in range(steps):
            middle = (low + high) / 2
            weight.copy_(start * math.exp(middle))
            if active_fractions(model, images)[name] > target:
                low = middle                     # too many active: spread the votes more
            else:
                high = middle
        factors[name] = math.exp((low + high) / 2)
        weight.copy_(start * factors[name])
    return factors


def start_half_active(model: MatrixCapsNet, train: Digits) -> dict[str, float]:
    """Calibrate ``model`` (:func:`calibrate_half_active`) on the first ``START_IMAGES`` images
    of ``train``, on the model's device, and return the shares of active capsules after it
    (:func:`active_fractions`)."""
    _check_model(model)
    device = next(model.parameters()).device
    images = to_float(train.images[:START_IMAGES]).to(device)     # (N, C, H, W) in [0, 1]
    calibrate_half_active(model, images)
    return active_fractions(model, images)
