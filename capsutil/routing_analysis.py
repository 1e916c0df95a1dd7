"""What routing does in a trained network: its coupling coefficients and how accuracy depends on
the number of routing iterations at test time (chapter 05; Part IV reuses it, for CapsNet and for
matrix capsules).

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
from capsutil.routing import schedule_ending_at
from capsutil.stats import Accuracy
from capsutil.train import evaluate


def _routed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose ``iterations`` attribute sets its routing: CapsNet's digit
    capsules, or the three EM-routed layers of a matrix capsule network."""
    names = ("conv_caps1", "conv_caps2", "class_caps") if hasattr(model, "class_caps") \
        else ("digits",)
    layers = [getattr(model, name, None) for name in names]
    if any(layer is None or not hasattr(layer, "iterations") for layer in layers):
        raise ValueError(f"expected a CapsNet or a MatrixCapsNet (a model with routed capsule "
                         f"layers), got {type(model).__name__}")
    return layers


def _schedule(model: nn.Module, iterations: int) -> list[float] | None:
    """The inverse temperatures of EM routing with ``iterations`` iterations: the schedule
    ending where the model's does when its config fixes the last one, else em_routing's."""
    last = getattr(model, "config", {}).get("last_inverse_temperature")
    return schedule_ending_at(iterations, last) if last is not None else None


@contextlib.contextmanager
def routing_iterations(model: nn.Module, iterations: int) -> Iterator[nn.Module]:
    """Run ``model`` with ``iterations`` routing iterations inside the ``with`` block, then
    restore the number it had. The weights are untouched. For EM routing the inverse
    temperatures follow (:func:`_schedule`), ending at the same last value when the model fixes
    one, so that only the number of iterations changes."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"expected a positive number of routing iterations, got {iterations!r}")
    layers = _routed_layers(model)
    saved = [(layer.iterations, getattr(layer, "inverse_temperatures", None)) for layer in layers]
    for layer in layers:
        layer.iterations = iterations
        if hasattr(layer, "inverse_temperatures"):
            layer.inverse_temperatures = _schedule(model, iterations)
    try:
        yield model
    finally:
        for layer, (count, schedule) in zip(layers, saved):
            layer.iterations = count
            if hasattr(layer, "inverse_temperatures"):
                layer.inverse_temperatures = schedule


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
