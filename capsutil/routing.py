"""Routing between capsule layers, as pure functions on tensors.

- ``squash`` and ``dynamic_routing``: routing by agreement (Sabour et al. 2017; chapters 03, 04).
- ``em_routing``: EM routing between matrix capsules (Hinton et al. 2018; chapter 07), with its
  inverse-temperature schedule ``inverse_temperature_schedule``.

Index letters, used in every einsum and shape comment here: ``b`` batch, ``i`` child capsule,
``j`` parent capsule, ``d`` pose component.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

SQUASH_EPS = 1e-8
# Above this squared length the direct formula's denominator (1 + |s|^2) sqrt(|s|^2) nears the
# largest float32 (it overflows at |s|^2 of about 5e25, |s| about 7e12); squash then divides by
# its two factors one after the other instead.
SQUASH_LARGE_NORM_SQ = 1e20


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype routing computes in: the widest of ``dtypes``, and at least float32.

    float16 and bfloat16 are widened because float16 rounds ``SQUASH_EPS`` to 0 and overflows
    ``|s|^2`` from ``|s|`` of about 256, and bfloat16 keeps only 8 bits of mantissa, too few
    for EM routing's variances and their logarithms.
    """
    widest = torch.float32
    for dtype in dtypes:
        widest = torch.promote_types(widest, dtype)
    return widest


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Squash vectors along ``dim``: ``|s|^2 / (1 + |s|^2) * s / |s|`` (Sabour et al. 2017, eq. 1).

    Short vectors shrink to almost zero length, long ones to just below 1; the orientation is
    kept. ``eps`` sits inside the square root, so the gradient at ``s = 0`` is finite (zero)
    instead of NaN (chapter 03). Same shape and dtype in and out.

    Safe magnitudes: float16 and bfloat16 vectors are squashed in float32. The output and its
    gradient are finite for every finite ``s`` whose squared length ``|s|^2`` is finite in the
    dtype computed in: every float16 vector, float32 and bfloat16 vectors up to a length of
    about 1.8e19 (1e19 is safe), float64 up to about 1e154. Beyond ``|s|^2 = 1e20`` the two
    factors of the denominator divide one after the other so that their product never
    overflows; below it the formula is the direct one, evaluated exactly as written above.
    """
    work = s.to(compute_dtype(s.dtype))                               # float16, bfloat16 -> float32
    norm_sq = (work * work).sum(dim=dim, keepdim=True)
    direct = norm_sq / ((1.0 + norm_sq) * torch.sqrt(norm_sq + eps))
    stepwise = (norm_sq / (1.0 + norm_sq)) / torch.sqrt(norm_sq + eps)
    factor = torch.where(norm_sq > SQUASH_LARGE_NORM_SQ, stepwise, direct)
    return (work * factor).to(s.dtype)


def _check_iterations(iterations: int) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"expected a positive number of routing iterations, got {iterations!r}")


def _check_votes(u_hat: torch.Tensor, iterations: int) -> None:
    if not isinstance(u_hat, torch.Tensor) or u_hat.dim() != 4:
        shape = tuple(u_hat.shape) if isinstance(u_hat, torch.Tensor) else type(u_hat).__name__
        raise ValueError(f"expected predictions u_hat of shape (batch, children, parents, dims), "
                         f"got {shape}")
    if not u_hat.is_floating_point():
        raise ValueError(f"expected floating-point predictions u_hat, got {u_hat.dtype}")
    _check_iterations(iterations)


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

    Returns ``v`` of shape (B, J, D) in the dtype of ``u_hat``, and with
    ``return_couplings=True`` also the list of the coupling coefficients ``c`` (each (B, I, J))
    used in each iteration.

    Precision and safe magnitudes: float16 and bfloat16 predictions are routed in float32 (the
    logits and couplings stay float32; under ``torch.autocast`` the two einsums run in the
    autocast dtype). ``s_j`` is at most ``I`` times the largest entry of ``u_hat`` in each
    component, so the outputs are finite and the couplings sum to one for every finite ``u_hat``
    with ``I * sqrt(D) * max|u_hat|`` below about 1e19 (see :func:`squash`): entries up to 1e15
    for CapsNet's 1152 children of 16 dimensions, and every float16 ``u_hat``.
    """
    _check_votes(u_hat, iterations)
    u_work = u_hat.to(compute_dtype(u_hat.dtype))                   # float16, bfloat16 -> float32
    u_route = u_work.detach() if detach_intermediate else u_work
    logits = u_work.new_zeros(u_hat.shape[:3])                       # (B, I, J)
    couplings = []
    for step in range(iterations):
        c = torch.softmax(logits, dim=2)                             # (B, I, J), sums to 1 over j
        couplings.append(c)
        last = step == iterations - 1
        votes = u_work if last else u_route
        v = squash(torch.einsum("bij,bijd->bjd", c, votes))          # (B, J, D)
        if not last:
            logits = logits + torch.einsum("bijd,bjd->bij", u_route, v)
    v = v.to(u_hat.dtype)
    return (v, couplings) if return_couplings else v


# ----------------------------------------------------------------------------------------------
# EM routing (Hinton, Sabour & Frosst 2018, Procedure 1; chapter 07)
# ----------------------------------------------------------------------------------------------

LOG_2PI = math.log(2.0 * math.pi)
# Added to every parent's variance: sigma >= 0.01, small next to pose entries of order 0.1 to 1,
# and it keeps ln(sigma) and 1 / sigma^2 finite when all the votes for a parent coincide.
VARIANCE_FLOOR = 1e-4
COST_NORMALIZATIONS = ("children_per_parent", "none")
# The limit of the default schedule's inverse temperatures, for each cost normalisation.
INVERSE_TEMPERATURE_LIMIT = {"children_per_parent": 1.0, "none": 0.01}
# A parent's weights r_ij / sum_i r_ij divide by at least this mass (10 float32 epsilons), so a
# parent that receives (almost) nothing gets weights near 0, not 0 / 0, and bounded gradients.
# Any parent with more mass is normalised exactly: its mean is not pulled towards 0. (An
# additive guard of 10 epsilons of the votes' own dtype shrank the means by 17% in float16 and
# 62% in bfloat16; the routing computes in float32 at least, see compute_dtype.)
EMPTY_PARENT_MASS = 10 * torch.finfo(torch.float32).eps


def inverse_temperature_schedule(iterations: int, limit: float = 1.0,
                                 decay: float = 0.95) -> list[float]:
    """Inverse temperatures ``lambda_t = limit * (1 - decay^(t + 1))``, t = 0, ..., iterations - 1.

    The schedule the authors of EM routing gave in their answers on OpenReview (``limit`` 0.01
    for the paper's cost, ``decay`` 0.95), as used by Gritzman's implementation: it rises with
    every iteration, e.g. 0.05, 0.0975, 0.1426 times ``limit`` for three iterations. ``limit``
    is the value it approaches and never reaches: after 2 iterations the last inverse
    temperature is 0.0975 ``limit``, after 3 it is 0.1426 ``limit``, so changing the number of
    iterations also changes the last temperature (see :func:`schedule_ending_at`).
    """
    _check_iterations(iterations)
    if not (limit > 0 and 0 < decay < 1):
        raise ValueError(f"expected limit > 0 and 0 < decay < 1, got limit={limit!r}, "
                         f"decay={decay!r}")
    return [limit * (1.0 - decay ** (t + 1)) for t in range(iterations)]


def schedule_ending_at(iterations: int, last: float, decay: float = 0.95) -> list[float]:
    """The authors' schedule rescaled so that its last inverse temperature is ``last``.

    Comparing 2 with 3 iterations at the same ``last`` separates the effect of the extra
    iteration from that of the colder last step.
    """
    if not last > 0:
        raise ValueError(f"expected a positive last inverse temperature, got {last!r}")
    shape = inverse_temperature_schedule(iterations, 1.0, decay)
    return [last * value / shape[-1] for value in shape]


def em_routing(votes: torch.Tensor, a_in: torch.Tensor, beta_u, beta_a, iterations: int = 3, *,
               inverse_temperatures: Sequence[float] | None = None,
               cost_normalization: str = "children_per_parent",
               variance_floor: float = VARIANCE_FLOOR, detach_intermediate: bool = False,
               initial_assignments: torch.Tensor | None = None,
               return_assignments: bool = False):
    """EM routing between matrix capsules (Hinton, Sabour & Frosst 2018, Procedure 1; chapter 07).

    Each parent j is an axis-aligned Gaussian over pose space (chapter 02's diagonal GMM) and
    each child i casts one vote ``V_ij`` for each parent. The assignments start at
    ``R_ij = 1 / J``; every iteration t runs

    - **M-step**: ``r_ij = R_ij a_i``, so a child's activation weighs its vote (``r`` is *not*
      renormalised over the parents afterwards: that would make ``a_i`` cancel, a known trap);
      ``mu_j = sum_i r_ij V_ij / sum_i r_ij``;
      ``sigma_j^2 = sum_i r_ij (V_ij - mu_j)^2 / sum_i r_ij + variance_floor`` (per component h);
      ``cost_j^h = (beta_u + ln sigma_j^h) n_j`` with ``n_j = sum_i r_ij / s`` (see
      ``cost_normalization``); ``a_j = logistic(lambda_t (beta_a - sum_h cost_j^h))``;
    - **E-step** (all but the last iteration), in the log domain:
      ``ln p_ij = ln N(V_ij | mu_j, diag(sigma_j^2))`` and
      ``R_ij = softmax_j(ln a_j + ln p_ij)``, with ``ln a_j`` computed as a log-sigmoid, so a
      parent whose activation underflows to 0 gives no ``-inf``.

    The last iteration ends with its M-step.

    Args:
        votes: (B, I, J, D) the vote of every child for every parent, ``V_ij = M_i W_ij``
            flattened (D = 16 for 4x4 poses); floating point.
        a_in: (B, I) child activations in [0, 1], floating point, on the votes' device.
        beta_u, beta_a: learned per parent: tensors (e.g. ``nn.Parameter``) or floats,
            broadcastable to (J,).
        iterations: number of M-steps (the paper uses 3).
        inverse_temperatures: ``lambda_t`` for each iteration (non-negative). Default:
            ``inverse_temperature_schedule(iterations, INVERSE_TEMPERATURE_LIMIT[cost_normalization])``,
            the authors' schedule; its limit 0.01 belongs to the paper's cost, and 1.0 to
            the cost normalised by the children per parent, which is the paper's cost times
            ``J / I`` (Gritzman's implementation uses 0.01 with the cost times ``100 J / I``:
            the same products ``lambda_t * cost``).
        cost_normalization: the scale ``s`` of the amount of data ``n_j = sum_i r_ij / s`` in
            the cost. ``"children_per_parent"`` (default): ``s = I / J``, the mean number of
            children per parent, so ``n_j`` is about the mean child activation whatever the
            layer's fan-in. Without it (``"none"``, the paper's ``s = 1``) the cost grows with
            ``I / J``: a layer with 512 children and 10 parents gets costs about 5.7 times those
            of one with 288 children and 32 parents, and one inverse temperature cannot keep the
            logistic out of saturation (activations stuck at 0 or 1, gradients zero) in both.
            The two settings differ by a constant factor, so they route identically once
            ``lambda_t`` and ``beta_a`` are rescaled.
            Public implementations differ here; some also standardise the cost over the parents.
        variance_floor: added to every variance (like scikit-learn's ``reg_covar``, chapter 02);
            must be positive.
        detach_intermediate: False (default) backpropagates through every iteration, as the
            paper trains ("backpropagating through the unrolled iterations of EM"). True runs
            the iterations before the last without autograd, so the assignments ``R`` of the
            last M-step are constants for backpropagation and gradients reach the votes,
            ``a_in``, ``beta_u`` and ``beta_a`` through that M-step only, as in
            ``dynamic_routing`` (chapter 04), and the loop keeps nothing for the backward pass;
            networks trained so in chapter 08 stayed at chance.
        initial_assignments: (B, I, J) starting ``R``, non-negative and summing to 1 over the
            parents; default ``1 / J`` as in the paper. (Chapter 07 starts elsewhere to compare
            with a Gaussian mixture: with votes equal for every parent, a uniform start gives all
            parents the same mean and variance, and EM never leaves that symmetric point.)
        return_assignments: also return the assignments.

    Returns:
        ``(mu, a_out)``: parent poses (B, J, D) (the means) and activations (B, J); with
        ``return_assignments=True`` also the list of the ``iterations`` assignments R, each
        (B, I, J) and summing to 1 over the parents, that the M-steps used. All in the dtype
        computed in (below). An empty batch (B = 0) gives empty results.

    Precision: the routing computes in the wider of the votes' and activations' dtypes, and at
    least float32 (:func:`compute_dtype`), with autocast switched off inside, and returns that
    dtype: float16 and bfloat16 votes, or votes from a network under ``torch.autocast``, are
    routed in float32. A parent's weights ``r_ij / sum_i r_ij`` divide by the exact mass it
    receives, floored at ``EMPTY_PARENT_MASS`` (about 1.2e-6) for a parent that receives
    (almost) nothing, so the means of parents with data are not biased.

    Speed and memory: the sums over children are batched matrix products on the votes laid out
    as (B, J, I, D). ``votes.transpose(1, 2)`` is made contiguous once, which copies the votes
    unless they already lie in memory as (B, J, I, D) (compute them so and pass the transposed
    view). Besides that, one (B, J, I, D) buffer holds ``(V - mu)^2``: the M-step's variances
    and the E-step's densities share it, and it is reused in place by every iteration run
    without autograd. Variances come from these centred squares, not from ``E[V^2] - mu^2``,
    which loses all precision in float32 when votes are large next to their spread.

    Safe magnitudes: outputs and gradients stay finite for zero activations, coinciding votes
    and finite votes up to about 1e15 in absolute value when computed in float32 (so every
    float16 vote, and bfloat16 votes up to 1e15; beyond that the squared deviations overflow);
    with ``detach_intermediate=False`` the gradients through the E-steps multiply squared
    deviations by other gradients and stay finite for votes up to about 1e9. The assignments
    sum to one over the parents throughout.
    """
    b, n_children, n_parents, _ = _check_em_inputs(votes, a_in, iterations)
    dtype = compute_dtype(votes.dtype, a_in.dtype)                      # float16, bfloat16 -> float32
    votes, a_in = votes.to(dtype), a_in.to(dtype)
    beta_u = _per_parent(beta_u, "beta_u", votes, n_parents)
    beta_a = _per_parent(beta_a, "beta_a", votes, n_parents)
    if cost_normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"expected cost_normalization in {COST_NORMALIZATIONS}, "
                         f"got {cost_normalization!r}")
    if inverse_temperatures is None:
        inverse_temperatures = inverse_temperature_schedule(
            iterations, INVERSE_TEMPERATURE_LIMIT[cost_normalization])
    lambdas = _check_inverse_temperatures(inverse_temperatures, iterations)
    if isinstance(variance_floor, bool) or not isinstance(variance_floor, (int, float)) \
            or not variance_floor > 0:
        raise ValueError(f"expected a positive variance_floor, got {variance_floor!r}")
    data_scale = n_children / n_parents if cost_normalization == "children_per_parent" else 1.0
    if initial_assignments is None:
        R = votes.new_full((b, n_parents, n_children), 1.0 / n_parents)   # (B, J, I)
    else:
        R = _check_initial_assignments(initial_assignments, votes).transpose(1, 2)   # (B, J, I)
    with torch.autocast(votes.device.type, enabled=False):               # computes in `dtype`
        mu, a_out, assignments = _em_iterations(
            votes, a_in, beta_u, beta_a, R, lambdas, data_scale=data_scale,
            variance_floor=variance_floor, detach_intermediate=detach_intermediate)
    if return_assignments:
        return mu, a_out, [r.transpose(1, 2) for r in assignments]       # each (B, I, J)
    return mu, a_out


def _em_iterations(votes: torch.Tensor, a_in: torch.Tensor, beta_u: torch.Tensor,
                   beta_a: torch.Tensor, R: torch.Tensor, lambdas: list[float], *,
                   data_scale: float, variance_floor: float, detach_intermediate: bool):
    """The iterations of :func:`em_routing` on checked inputs of one dtype, from assignments
    R (B, J, I). Returns ``(mu, a_out, assignments)``: (B, J, D), (B, J) and the list of the
    assignments each M-step used, each (B, J, I)."""
    v = votes.transpose(1, 2).contiguous()                               # (B, J, I, D)
    step = dict(v=v, a_in=a_in, beta_u=beta_u, beta_a=beta_a, data_scale=data_scale,
                variance_floor=variance_floor)
    records_graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (votes, a_in, beta_u, beta_a))
    loop_records_graph = records_graph and not detach_intermediate
    # Steps that record no autograd graph share one buffer for (V - mu)^2.
    buffer = None if loop_records_graph else torch.empty_like(v)         # (B, J, I, D)
    assignments = []
    with contextlib.nullcontext() if loop_records_graph else torch.no_grad():
        for t in range(len(lambdas) - 1):
            assignments.append(R)
            mu, var, logit, squares = _em_m_step(R=R, inverse_temperature=lambdas[t],
                                                 buffer=buffer, **step)
            if squares is None:                                          # recorded iterations
                squares = (v - mu.unsqueeze(-2)).square()                # (B, J, I, D)
            R = _em_e_step(squares, var, logit)
    if records_graph:
        buffer = squares = None             # free it before the recorded last M-step
    assignments.append(R)
    mu, _, logit, _ = _em_m_step(R=R, inverse_temperature=lambdas[-1], buffer=buffer, **step)
    return mu, torch.sigmoid(logit), assignments                         # (B, J, D), (B, J)


def _em_m_step(*, v: torch.Tensor, a_in: torch.Tensor, R: torch.Tensor, beta_u: torch.Tensor,
               beta_a: torch.Tensor, inverse_temperature: float, data_scale: float,
               variance_floor: float, buffer: torch.Tensor | None):
    """One M-step on votes v (B, J, I, D) with assignments R (B, J, I).

    Returns ``(mu, var, logit, squares)``: (B, J, D), (B, J, D), (B, J) the argument
    ``lambda (beta_a - cost_j)`` of the logistic, and ``(V - mu)^2`` (B, J, I, D) written into
    ``buffer``. Without a buffer (a step that autograd records), the moments come from
    ``_WeightedMoments`` and ``squares`` is None.
    """
    r = R * a_in.unsqueeze(1)                                            # (B, J, I): R_ij a_i
    r_sum = r.sum(-1, keepdim=True)                                      # (B, J, 1)
    weights = (r / r_sum.clamp_min(EMPTY_PARENT_MASS)).unsqueeze(-2)     # (B, J, 1, I)
    if buffer is None:
        (mu, var), squares = _WeightedMoments.apply(weights, v), None
    else:
        mu, var, squares = _weighted_moments(weights, v, buffer)
    var = var + variance_floor                                           # (B, J, D)
    cost_h = (beta_u.unsqueeze(-1) + 0.5 * torch.log(var)) * (r_sum / data_scale)   # (B, J, D)
    logit = inverse_temperature * (beta_a - cost_h.sum(-1))              # (B, J)
    return mu, var, logit, squares


def _weighted_moments(weights: torch.Tensor, v: torch.Tensor, out: torch.Tensor):
    """``mu = sum_i w_i V_i`` and ``sum_i w_i (V_i - mu)^2``, with ``(V - mu)^2`` written into out.

    weights: (B, J, 1, I); v and out: (B, J, I, D). Returns (B, J, D), (B, J, D), out.
    """
    mu = (weights @ v).squeeze(-2)                                       # (B, J, D)
    squares = torch.sub(v, mu.unsqueeze(-2), out=out).square_()          # (B, J, I, D)
    return mu, (weights @ squares).squeeze(-2), squares


class _WeightedMoments(torch.autograd.Function):
    """``_weighted_moments`` for autograd, keeping only its inputs for the backward pass.

    Plain autograd would keep ``V - mu`` and its square, two more tensors the size of the votes,
    and spend several more passes over them; here the backward pass recomputes ``V - mu`` once.
    With ``s = sum_k w_k (V_k - mu)`` and upstream gradients ``g_mu``, ``g_var``:
    ``dL/dV_i = w_i (2 (V_i - mu) g_var + g_mu - 2 s g_var)`` and
    ``dL/dw_i = sum_d [V_i (g_mu - 2 s g_var) + (V_i - mu)^2 g_var]_d``.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, v: torch.Tensor):
        mu, var, _ = _weighted_moments(weights, v, torch.empty_like(v))
        ctx.save_for_backward(weights, v, mu)
        return mu, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mu: torch.Tensor, grad_var: torch.Tensor):
        weights, v, mu = ctx.saved_tensors
        diff = v - mu.unsqueeze(-2)                                      # (B, J, I, D)
        s = (weights @ diff).squeeze(-2)                                 # (B, J, D)
        shared = grad_mu - 2 * s * grad_var                              # (B, J, D)
        grad_weights = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_weights = (shared.unsqueeze(-2) @ v.transpose(-1, -2)
                            + grad_var.unsqueeze(-2) @ diff.square().transpose(-1, -2))  # (B, J, 1, I)
        if ctx.needs_input_grad[1]:
            grad_v = (diff.mul_(2 * grad_var.unsqueeze(-2)).add_(shared.unsqueeze(-2))
                      .mul_(weights.transpose(-1, -2)))                  # (B, J, I, D), in diff
        return grad_weights, grad_v


def _em_e_step(squares: torch.Tensor, var: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """E-step: ``R_ij = softmax_j(ln a_j + ln N(V_ij | mu_j, diag(var_j)))``, returned as (B, J, I).

    squares: (B, J, I, D) ``(V - mu)^2``; var: (B, J, D); logit: (B, J) with ``a_j = logistic``.
    """
    # sum_d (V - mu)^2 / var as (1, D) @ (D, I) per (b, j): several times faster than (I, D) @ (D, 1)
    mahalanobis = (var.reciprocal().unsqueeze(-2) @ squares.transpose(-1, -2)).squeeze(-2)  # (B, J, I)
    log_p = -0.5 * (mahalanobis + torch.log(var).sum(-1, keepdim=True)
                    + squares.shape[-1] * LOG_2PI)                       # (B, J, I)
    return torch.softmax(F.logsigmoid(logit).unsqueeze(-1) + log_p, dim=1)   # sums to 1 over j


def _check_em_inputs(votes: torch.Tensor, a_in: torch.Tensor, iterations: int) -> tuple[int, ...]:
    if not isinstance(votes, torch.Tensor) or votes.dim() != 4 or 0 in votes.shape[1:]:
        shape = tuple(votes.shape) if isinstance(votes, torch.Tensor) else type(votes).__name__
        raise ValueError(f"expected votes of shape (batch, children, parents, pose components), "
                         f"none but the batch empty, got {shape}")
    if not votes.is_floating_point():
        raise ValueError(f"expected floating-point votes, got {votes.dtype}")
    b, i = votes.shape[:2]
    if not isinstance(a_in, torch.Tensor) or a_in.shape != (b, i):
        shape = tuple(a_in.shape) if isinstance(a_in, torch.Tensor) else type(a_in).__name__
        raise ValueError(f"expected child activations a_in of shape (batch, children) = {(b, i)}, "
                         f"got {shape}")
    if not a_in.is_floating_point() or a_in.device != votes.device:
        raise ValueError(f"expected floating-point child activations a_in on {votes.device} like "
                         f"the votes, got {a_in.dtype} on {a_in.device}")
    # A data-dependent check: skipped inside torch.compile, where it would split the graph.
    if not torch.compiler.is_compiling() and not bool(((a_in >= 0) & (a_in <= 1)).all()):
        raise ValueError(f"expected child activations a_in in [0, 1], got values from "
                         f"{a_in.min().item():.4g} to {a_in.max().item():.4g}")
    _check_iterations(iterations)
    return tuple(votes.shape)


def _per_parent(beta, name: str, votes: torch.Tensor, n_parents: int) -> torch.Tensor:
    """``beta`` (a float or a tensor of shape (), (1,) or (J,)) as a (J,) tensor like the votes."""
    beta = torch.as_tensor(beta, dtype=votes.dtype, device=votes.device)
    if beta.dim() > 1 or beta.numel() not in (1, n_parents):
        raise ValueError(f"expected {name} with one value per parent, broadcastable to "
                         f"({n_parents},), got shape {tuple(beta.shape)}")
    return beta.expand(n_parents)


def _check_inverse_temperatures(values: Sequence[float], iterations: int) -> list[float]:
    lambdas = [float(x) for x in values]
    if len(lambdas) != iterations or not all(math.isfinite(x) and x >= 0 for x in lambdas):
        raise ValueError(f"expected {iterations} finite, non-negative inverse temperatures "
                         f"(one per iteration), got {lambdas}")
    return lambdas


def _check_initial_assignments(R: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    shape = tuple(votes.shape[:3])
    if not isinstance(R, torch.Tensor) or tuple(R.shape) != shape or not R.is_floating_point():
        got = (tuple(R.shape), R.dtype) if isinstance(R, torch.Tensor) else type(R).__name__
        raise ValueError(f"expected floating-point initial_assignments of shape (batch, children, "
                         f"parents) = {shape}, got {got}")
    R = R.to(votes.device, votes.dtype)
    if not torch.compiler.is_compiling() and not (
            bool((R >= 0).all()) and torch.allclose(R.sum(-1), torch.ones_like(R[..., 0]))):
        raise ValueError("expected initial_assignments >= 0 and summing to 1 over the parents")
    return R
