"""What routing does in a trained network: its coupling coefficients and how accuracy depends on
the number of routing iterations at test time (chapter 05; Part IV reuses it).

In Procedure 1 of Sabour et al. (2017) the first iteration uses uniform couplings
``c_ij = 1/J``, so ``T = 1`` iteration means **no routing at all**: every child sends the same
share of its vote to every parent. Each further iteration is one agreement update.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from capsutil.data import Digits
from capsutil.stats import Accuracy
from capsutil.train import evaluate


def _routing_layer(model: nn.Module) -> nn.Module:
    """The layer of ``model`` whose ``iterations`` attribute sets its routing (CapsNet's digits)."""
    layer = getattr(model, "digits", None)
    if layer is None or not hasattr(layer, "iterations"):
        raise ValueError(f"expected a CapsNet (a model with routed digit capsules), "
                         f"got {type(model).__name__}")
    return layer


@contextlib.contextmanager
def routing_iterations(model: nn.Module, iterations: int) -> Iterator[nn.Module]:
    """Run ``model`` with ``iterations`` routing iterations inside the ``with`` block, then
    restore the number it had. The weights are untouched."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"expected a positive number of routing iterations, got {iterations!r}")
    layer = _routing_layer(model)
    trained = layer.iterations
    layer.iterations = iterations
    try:
        yield model
    finally:
        layer.iterations = trained


def coupling_entropy(couplings: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each child's couplings over the parents: (B, I, J) -> (B, I).

    ``ln J`` for uniform couplings (no preference), 0 when a child sends everything to one
    parent.
    """
    if couplings.dim() != 3:
        raise ValueError(f"expected couplings of shape (B, I, J), got {tuple(couplings.shape)}")
    return -(couplings * torch.log(couplings.clamp_min(1e-30))).sum(dim=2)


def uniform_entropy(parents: int) -> float:
    """The entropy of uniform couplings over ``parents`` parents, ``ln J``."""
    return math.log(parents)


@torch.no_grad()
def accuracy_by_iterations(model: nn.Module, digits: Digits, iterations: Iterable[int],
                           batch_size: int = 500) -> dict[int, Accuracy]:
    """Accuracy of ``model`` on ``digits`` for each number of routing iterations at test time."""
    scores = {}
    for count in iterations:
        with routing_iterations(model, count):
            scores[count] = evaluate(model, digits, batch_size).score
    return scores
