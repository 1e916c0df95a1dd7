"""Routing between capsule layers, as pure functions on tensors.

Index letters, used in every einsum here: ``b`` batch, ``i`` child capsule, ``j`` parent
capsule, ``d`` pose component.
"""
from __future__ import annotations

import torch

SQUASH_EPS = 1e-8


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Squash vectors along ``dim``: ``|s|^2 / (1 + |s|^2) * s / |s|`` (Sabour et al. 2017, eq. 1).

    Short vectors shrink to almost zero length, long ones to just below 1; the orientation is
    kept. ``eps`` sits inside the square root, so the gradient at ``s = 0`` is finite (zero)
    instead of NaN (chapter 03). Same shape in and out.
    """
    norm_sq = (s * s).sum(dim=dim, keepdim=True)
    return s * (norm_sq / ((1.0 + norm_sq) * torch.sqrt(norm_sq + eps)))


def _check_votes(u_hat: torch.Tensor, iterations: int) -> None:
    if not isinstance(u_hat, torch.Tensor) or u_hat.dim() != 4:
        shape = tuple(u_hat.shape) if isinstance(u_hat, torch.Tensor) else type(u_hat).__name__
        raise ValueError(f"expected predictions u_hat of shape (batch, children, parents, dims), "
                         f"got {shape}")
    if not u_hat.is_floating_point():
        raise ValueError(f"expected floating-point predictions u_hat, got {u_hat.dtype}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"expected a positive number of routing iterations, got {iterations!r}")


def dynamic_routing(u_hat: torch.Tensor, iterations: int = 3, *, detach_intermediate: bool = True,
                    return_couplings: bool = False):
    """Routing by agreement (Sabour et al. 2017, Procedure 1).

    u_hat: (B, I, J, D) predictions ``u_hat_{j|i} = W_ij u_i`` of every child i for every parent j.
    Logits ``b_ij`` start at zero **for each example**; ``c_ij = softmax_j(b_ij)`` runs over the
    **parents** (each child shares its output among the parents), ``s_j = sum_i c_ij u_hat_{j|i}``,
    ``v_j = squash(s_j)`` and ``b_ij += u_hat_{j|i} . v_j``.

    Gradients: with ``detach_intermediate=True`` (the default) the agreement updates see
    ``u_hat`` detached, so the coupling coefficients act as constants for backpropagation and
    the gradient reaches ``u_hat`` only through the final weighted sum. The iterations then
    choose *where* votes go, while learning shapes *what* they vote; it also keeps backward
    cheap. ``False`` backpropagates through every iteration.

    Returns ``v`` of shape (B, J, D), and with ``return_couplings=True`` also the list of the
    coupling coefficients ``c`` (each (B, I, J)) used in each iteration.
    """
    _check_votes(u_hat, iterations)
    u_route = u_hat.detach() if detach_intermediate else u_hat
    logits = u_hat.new_zeros(u_hat.shape[:3])                        # (B, I, J)
    couplings = []
    for step in range(iterations):
        c = torch.softmax(logits, dim=2)                             # (B, I, J), sums to 1 over j
        couplings.append(c)
        last = step == iterations - 1
        votes = u_hat if last else u_route
        v = squash(torch.einsum("bij,bijd->bjd", c, votes))          # (B, J, D)
        if not last:
            logits = logits + torch.einsum("bijd,bjd->bij", u_route, v)
    return (v, couplings) if return_couplings else v
