"""Losses: CapsNet's margin and reconstruction losses (Sabour et al. 2017, chapter 05) and the
spread loss of matrix capsules (Hinton et al. 2018, chapter 08).

Every loss object used by :func:`capsutil.train.fit` is called as ``loss(output, images, labels)``
with the model's output, the float images (B, 1, H, W) and the labels (B,), and returns a scalar.
"""
from __future__ import annotations

import torch
from torch import nn


def check_labels(labels: torch.Tensor, n_classes: int, batch: int | None = None) -> torch.Tensor:
    """The class labels as int64 (N,), after checking them.

    Raises ``ValueError`` unless ``labels`` is a tensor (N,) of any integer dtype (int64, int32,
    uint8, ...) with values in [0, n_classes), and ``batch`` of them when given.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"expected labels of shape (N,), got {shape}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"expected integer class labels, got {labels.dtype}")
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(f"expected {batch} labels, one per image, got {labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"expected labels in 0..{n_classes - 1}, got values from "
                         f"{int(labels.min())} to {int(labels.max())}")
    return labels.long()                     # one_hot and gather index with int64 only


def _check_scores(scores: torch.Tensor, name: str) -> None:
    """Raise unless ``scores`` is a float tensor (B, K) with B >= 1: a batch mean needs a batch."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"expected {name} of shape (B, K), got {shape}")
    if not scores.is_floating_point():
        raise ValueError(f"expected floating-point {name}, got {scores.dtype}")
    if scores.shape[0] == 0:
        raise ValueError(f"expected {name} for at least one example: the loss is a mean over "
                         f"the batch, undefined for an empty one")


def _check_output(output, fields: tuple[str, ...], loss: str, model: str) -> None:
    """Raise ``TypeError`` unless the model output ``output`` has every attribute in ``fields``."""
    missing = [name for name in fields if not hasattr(output, name)]
    if missing:
        raise TypeError(f"{loss} expects the output of {model} (with {', '.join(fields)}), "
                        f"got a {type(output).__name__} without {', '.join(missing)}")


def margin_loss(lengths: torch.Tensor, labels: torch.Tensor, m_plus: float = 0.9,
                m_minus: float = 0.1, lambda_absent: float = 0.5) -> torch.Tensor:
    """Margin loss (Sabour et al. 2017, eq. 4), summed over classes and averaged over the batch.

    ``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2`` with ``T_k = 1``
    for the true class. lengths: (B, K) capsule lengths, B >= 1; labels: (B,) class indices of
    any integer dtype. Returns a scalar.
    """
    _check_scores(lengths, "capsule lengths")
    labels = check_labels(labels, lengths.shape[1], lengths.shape[0])
    present = torch.nn.functional.one_hot(labels, lengths.shape[1]).to(lengths.dtype)  # (B, K)
    loss_present = present * torch.relu(m_plus - lengths) ** 2                         # (B, K)
    loss_absent = lambda_absent * (1 - present) * torch.relu(lengths - m_minus) ** 2   # (B, K)
    return (loss_present + loss_absent).sum(dim=1).mean()


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor,
                        scale: float = 0.0005) -> torch.Tensor:
    """Sum of squared pixel errors per image, times ``scale``, averaged over the batch (chapter 05).

    reconstructions: (B, H*W) in [0, 1]; images: (B, 1, H, W) or (B, H*W). Returns a scalar.
    The small scale keeps the decoder from dominating the margin loss.
    """
    if len(images) == 0:
        raise ValueError("expected at least one image: the loss is a mean over the batch, "
                         "undefined for an empty one")
    target = images.reshape(images.shape[0], -1)                                      # (B, H*W)
    if reconstructions.shape != target.shape:
        raise ValueError(f"expected reconstructions of shape {tuple(target.shape)} to match the "
                         f"images, got {tuple(reconstructions.shape)}")
    return scale * ((reconstructions - target) ** 2).sum(dim=1).mean()


class CapsNetLoss(nn.Module):
    """Margin loss plus scaled reconstruction loss: the training objective of CapsNet.

    Called as ``loss(output, images, labels)`` with a :class:`capsutil.models.CapsNetOutput`;
    :meth:`parts` returns both terms separately for plots. ``reconstruction_scale=0`` trains
    without the reconstruction loss (the paper's Table 1 ablation). ``config`` holds the
    constructor arguments (training records store it).
    """

    def __init__(self, m_plus: float = 0.9, m_minus: float = 0.1, lambda_absent: float = 0.5,
                 reconstruction_scale: float = 0.0005):
        super().__init__()
        self.m_plus, self.m_minus, self.lambda_absent = m_plus, m_minus, lambda_absent
        self.reconstruction_scale = reconstruction_scale
        self.config = dict(m_plus=m_plus, m_minus=m_minus, lambda_absent=lambda_absent,
                           reconstruction_scale=reconstruction_scale)

    def parts(self, output, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"margin": ..., "reconstruction": ...}``, each a scalar tensor."""
        _check_output(output, ("lengths", "reconstructions"), "CapsNetLoss", "CapsNet")
        return {
            "margin": margin_loss(output.lengths, labels, self.m_plus, self.m_minus,
                                  self.lambda_absent),
            "reconstruction": reconstruction_loss(output.reconstructions, images,
                                                  self.reconstruction_scale),
        }

    def forward(self, output, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        parts = self.parts(output, images, labels)
        return parts["margin"] + parts["reconstruction"]


def spread_loss(activations: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Spread loss (Hinton, Sabour & Frosst 2018, eq. 3), averaged over the batch (chapter 08).

    ``L = sum_{i != t} max(0, m - (a_t - a_i))^2``: every wrong class i whose activation is not
    at least ``margin`` below the target's ``a_t`` is pushed down (and the target up).
    activations: (B, K), B >= 1; labels: (B,) class indices of any integer dtype. Returns a
    scalar.
    """
    _check_scores(activations, "class activations")
    labels = check_labels(labels, activations.shape[1], activations.shape[0])
    target = activations.gather(1, labels.unsqueeze(1))                              # (B, 1)
    spread = torch.relu(margin - (target - activations)) ** 2                       # (B, K)
    wrong = 1 - torch.nn.functional.one_hot(labels, activations.shape[1]).to(spread.dtype)
    return (spread * wrong).sum(dim=1).mean()


class SpreadLoss(nn.Module):
    """Spread loss with the paper's margin schedule: ``m`` rises linearly from ``margin_start``
    (0.2) to ``margin_end`` (0.9) over the first ``ramp_steps`` training steps, then stays.

    The loss counts the training steps it has seen (calls with autograd on, in training mode)
    in a buffer, so the schedule is part of its state dict and resumes with a checkpoint.
    Called as ``loss(output, images, labels)`` with a :class:`capsutil.models.MatrixCapsNetOutput`.
    """

    def __init__(self, margin_start: float = 0.2, margin_end: float = 0.9, ramp_steps: int = 3000):
        super().__init__()
        if not 0 <= margin_start <= margin_end or not isinstance(ramp_steps, int) or ramp_steps < 1:
            raise ValueError(f"expected 0 <= margin_start <= margin_end and a positive integer "
                             f"ramp_steps, got {margin_start!r}, {margin_end!r}, {ramp_steps!r}")
        self.margin_start, self.margin_end, self.ramp_steps = margin_start, margin_end, ramp_steps
        self.config = dict(margin_start=margin_start, margin_end=margin_end,
                           ramp_steps=ramp_steps)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def margin(self) -> float:
        """The margin of the next training step."""
        progress = min(int(self.steps) / self.ramp_steps, 1.0)
        return self.margin_end * progress + self.margin_start * (1 - progress)

    def forward(self, output, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_output(output, ("activations",), "SpreadLoss", "MatrixCapsNet")
        loss = spread_loss(output.activations, labels, self.margin)
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        return loss
