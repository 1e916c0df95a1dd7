"""Specifications of EM routing (Hinton, Sabour & Frosst 2018, Procedure 1; chapter 07)."""
import math

import numpy as np
import pytest
import torch

from capsutil import em
from capsutil.routing import em_routing, inverse_temperature_schedule, schedule_ending_at

F64 = torch.float64


def random_inputs(b=3, i=12, j=4, d=4, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(b, i, j, d, generator=g, dtype=dtype)
    a_in = torch.rand(b, i, generator=g, dtype=dtype)
    beta_u = torch.randn(j, generator=g, dtype=dtype)
    beta_a = torch.randn(j, generator=g, dtype=dtype)
    return votes, a_in, beta_u, beta_a


def test_em_routing_reduces_to_diagonal_gmm():
    """With votes that do not depend on the parent, equal child activations and lambda = 0,
    EM routing on one example is chapter 02's diagonal Gaussian mixture with equal, fixed weights.

    The children are the points (``V_ij = x_i`` for every parent j) and the parents the
    components. Equal ``a_i`` cancel in the weighted means and variances; ``lambda = 0`` makes
    every ``a_j = logistic(0) = 1/2``, equal mixing weights that cancel in the E-step's softmax.
    A uniform start ``R_ij = 1/J`` would give every parent the same mean for ever (a mixture
    cannot leave that symmetric point either), so both start from a hard assignment ``R0``: the
    routing runs its M-step on ``R0``, the mixture starts from those means and variances.
    Then routing E-step t is the mixture's E-step t, and the last means agree.
    """
    rng = np.random.default_rng(0)
    n_parents, iterations, floor = 3, 6, 1e-6
    centres = np.array([[0.0, 4.0], [-3.0, 0.0], [3.0, 0.0]])
    x = np.concatenate([c + rng.normal(size=(20, 2)) for c in centres])       # (60, 2)
    x_t = torch.from_numpy(x)
    labels, _ = em.kmeans_assign(x_t, torch.tensor([[1.0, 3.0], [-1.0, 0.0], [1.0, 0.0]], dtype=F64))
    r0 = torch.nn.functional.one_hot(labels, n_parents).to(F64)               # (60, 3)

    votes = x_t[None, :, None, :].expand(1, -1, n_parents, -1)                # (1, 60, 3, 2)
    a_in = torch.full((1, len(x)), 0.7, dtype=F64)
    mu, _, assignments = em_routing(
        votes, a_in, 0.0, 0.0, iterations, inverse_temperatures=[0.0] * iterations,
        variance_floor=floor, initial_assignments=r0[None], return_assignments=True)

    _, means0, variances0 = em.m_step_diag(x_t, r0, reg_covar=floor)
    gmm = em.GaussianMixture(n_parents, covariance_type="diag", tol=0.0, reg_covar=floor,
                             max_iter=iterations - 1, weights_init=np.full(n_parents, 1 / n_parents),
                             means_init=means0.numpy(), covariances_init=variances0.numpy(),
                             fix_weights=True).fit(x)
    np.testing.assert_allclose(mu[0].numpy(), gmm.means_, rtol=1e-10, atol=1e-12)
    uniform = torch.full((n_parents,), 1 / n_parents, dtype=F64).log()
    for t in range(1, iterations):
        means, variances = (torch.from_numpy(gmm.history_[name][t - 1]) for name in ("means", "covariances"))
        log_resp, _ = em.log_responsibilities(em.log_gaussian_diag(x_t, means, variances), uniform)
        torch.testing.assert_close(assignments[t][0], log_resp.exp(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(assignments[1][0], r0)                            # EM did move


def test_each_step_is_chapter_02s_diagonal_gaussian_step_with_activations_as_weights():
    """The general procedure written out with chapter 02's pure functions.

    M-step: each parent is a one-component diagonal Gaussian fitted to its own votes with weights
    ``r_ij = R_ij a_i`` (``em.m_step_diag``, batched over parents, the variance floor as
    ``reg_covar``), then the cost and the logistic. E-step: ``em.log_gaussian_diag`` and
    ``em.log_responsibilities`` with ``ln a_j`` as the log mixing weights.
    """
    votes, a_in, beta_u, beta_a = random_inputs()
    b, i, j, d = votes.shape
    lambdas = inverse_temperature_schedule(3)
    mu, a_out, assignments = em_routing(votes, a_in, beta_u, beta_a, 3, return_assignments=True)

    per_parent = votes.permute(0, 2, 1, 3)                                    # (B, J, I, D)
    R = torch.full((b, i, j), 1 / j, dtype=F64)
    for t, lam in enumerate(lambdas):
        torch.testing.assert_close(assignments[t], R)
        r = R * a_in[:, :, None]                                              # (B, I, J)
        _, means, variances = em.m_step_diag(per_parent, r.permute(0, 2, 1)[..., None], reg_covar=1e-4)
        means, variances = means[:, :, 0], variances[:, :, 0]                 # (B, J, D)
        cost = ((beta_u[:, None] + torch.log(variances.sqrt())) * r.sum(1)[..., None] / (i / j)).sum(-1)
        a_j = torch.sigmoid(lam * (beta_a - cost))                            # (B, J)
        if t < len(lambdas) - 1:
            log_p = em.log_gaussian_diag(per_parent, means[:, :, None], variances[:, :, None])  # (B, J, I, 1)
            log_resp, _ = em.log_responsibilities(log_p[..., 0].transpose(1, 2), torch.log(a_j))
            R = log_resp.exp()                                                # (B, I, J)
    torch.testing.assert_close(mu, means)
    torch.testing.assert_close(a_out, a_j)


def test_shapes_and_assignments_sum_to_one_over_parents():
    votes, a_in, beta_u, beta_a = random_inputs(b=5, i=30, j=10, d=16, dtype=torch.float32)
    mu, a_out, assignments = em_routing(votes, a_in, beta_u, beta_a, 3, return_assignments=True)
    assert mu.shape == (5, 10, 16) and a_out.shape == (5, 10)
    assert ((a_out > 0) & (a_out < 1)).all()
    assert len(assignments) == 3
    torch.testing.assert_close(assignments[0], torch.full((5, 30, 10), 0.1))
    for R in assignments:
        assert R.shape == (5, 30, 10)
        torch.testing.assert_close(R.sum(-1), torch.ones(5, 30))


def test_child_with_zero_activation_has_no_influence_on_parents():
    votes, a_in, beta_u, beta_a = random_inputs()
    a_in[:, 3] = 0.0
    moved = votes.clone()
    moved[:, 3] = 1e3 * torch.randn(3, 4, 4, dtype=F64)                      # child 3 votes anything
    for before, after in zip(em_routing(votes, a_in, beta_u, beta_a), em_routing(moved, a_in, beta_u, beta_a)):
        torch.testing.assert_close(before, after)
    a_in[:, 3] = 1.0                                                          # now it counts
    assert not torch.allclose(em_routing(votes, a_in, beta_u, beta_a)[0], em_routing(moved, a_in, beta_u, beta_a)[0])


def test_renormalising_over_parents_makes_child_activations_cancel():
    """The trap: ``r = R a_i`` renormalised over the parents is ``R`` again, whatever ``a_i``."""
    votes, a_in, beta_u, beta_a = random_inputs()
    other_a = torch.rand_like(a_in)

    def trap_first_mean(a):
        R = torch.full(votes.shape[:3], 1 / votes.shape[2], dtype=F64)          # (B, I, J)
        r = R * a[:, :, None]
        r = r / r.sum(-1, keepdim=True)                                       # renormalised over j
        return torch.einsum("bij,bijd->bjd", r, votes) / r.sum(1)[..., None]

    torch.testing.assert_close(trap_first_mean(a_in), trap_first_mean(other_a))   # a_i gone
    mu = em_routing(votes, a_in, beta_u, beta_a, 1)[0]
    weighted = torch.einsum("bi,bijd->bjd", a_in, votes) / a_in.sum(1)[:, None, None]
    torch.testing.assert_close(mu, weighted)                                  # a_i-weighted mean
    assert not torch.allclose(mu, em_routing(votes, other_a, beta_u, beta_a, 1)[0])


EXTREMES = {
    "zero activations": lambda v, a: (v, torch.zeros_like(a)),
    "identical votes": lambda v, a: (v[:, :1, :1].expand_as(v).clone(), a),
    "identical votes, zero activations": lambda v, a: (torch.ones_like(v), torch.zeros_like(a)),
    "huge votes 1e6": lambda v, a: (1e6 * v, a),
    "huge votes 1e9": lambda v, a: (1e9 * v, a),
    "huge offset, tiny spread": lambda v, a: (1e4 + 1e-3 * v, a),
    "tiny votes": lambda v, a: (1e-20 * v, a),
    "one active child": lambda v, a: (v, torch.nn.functional.one_hot(torch.zeros(a.shape[0], dtype=torch.long), a.shape[1]).to(a.dtype)),
}


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("case", list(EXTREMES))
def test_outputs_and_gradients_are_finite_for_extreme_inputs(case, detach):
    for seed in range(3):
        votes, a_in, beta_u, beta_a = random_inputs(b=4, i=18, j=5, d=16, dtype=torch.float32, seed=seed)
        votes, a_in = EXTREMES[case](votes, a_in)
        inputs = [t.clone().requires_grad_(True) for t in (votes, a_in, beta_u, beta_a)]
        mu, a_out = em_routing(*inputs, 3, detach_intermediate=detach)
        assert torch.isfinite(mu).all() and torch.isfinite(a_out).all()
        (mu.square().mean() + a_out.sum()).backward()
        for t in inputs:
            assert torch.isfinite(t.grad).all()


def test_detached_outputs_and_gradients_are_finite_for_votes_up_to_1e15():
    """Through all the iterations (the default) gradients multiply squared deviations by other
    gradients and overflow float32 beyond about 1e9; with the iterations detached they do not."""
    for scale in (1e12, 1e15):
        votes, a_in, beta_u, beta_a = random_inputs(b=4, i=18, j=5, d=16, dtype=torch.float32)
        inputs = [t.clone().requires_grad_(True) for t in (scale * votes, a_in, beta_u, beta_a)]
        mu, a_out = em_routing(*inputs, 3, detach_intermediate=True)
        (mu.square().mean() + a_out.sum()).backward()
        for t in (mu, a_out, *[x.grad for x in inputs]):
            assert torch.isfinite(t).all()


def test_outputs_and_gradients_are_finite_over_many_random_batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        scale = 10.0 ** torch.randint(-3, 4, (1,), generator=g).item()
        votes = (scale * torch.randn(2, 9, 4, 16, generator=g)).requires_grad_(True)
        a_in = (torch.rand(2, 9, generator=g) * (torch.rand(2, 9, generator=g) > 0.3)).requires_grad_(True)
        betas = [(10 * torch.randn(4, generator=g)).requires_grad_(True) for _ in range(2)]
        mu, a_out = em_routing(votes, a_in, *betas, 3, cost_normalization="none",
                               inverse_temperatures=[1.0, 2.0, 3.0])
        (mu.sum() + a_out.sum()).backward()
        for t in (mu, a_out, votes.grad, a_in.grad, *[b.grad for b in betas]):
            assert torch.isfinite(t).all()


def test_gradients_through_all_iterations_match_finite_differences():
    votes, a_in, beta_u, beta_a = random_inputs(b=1, i=6, j=2, d=3)
    inputs = tuple(t.requires_grad_(True) for t in (votes, a_in, beta_u, beta_a))
    for iterations in (1, 3):
        def routing(*args):
            return em_routing(*args, iterations, detach_intermediate=False, variance_floor=0.01,
                              inverse_temperatures=[0.5 + t for t in range(iterations)])
        assert torch.autograd.gradcheck(routing, inputs)


def test_detached_intermediate_iterations_treat_assignments_as_constants():
    votes, a_in, beta_u, beta_a = random_inputs()
    inputs = [t.clone().requires_grad_(True) for t in (votes, a_in, beta_u, beta_a)]
    mu, a_out, assignments = em_routing(*inputs, 3, detach_intermediate=True,
                                        return_assignments=True)
    grads = torch.autograd.grad(mu.sum() + a_out.sum(), inputs)

    frozen = assignments[-1].detach()                                         # (B, I, J)
    copies = [t.clone().requires_grad_(True) for t in (votes, a_in, beta_u, beta_a)]
    v, a, bu, ba = copies
    r = frozen * a[:, :, None]
    r_sum = r.sum(1)                                                          # (B, J)
    mean = torch.einsum("bij,bijd->bjd", r, v) / r_sum[..., None]
    var = torch.einsum("bij,bijd->bjd", r, (v - mean[:, None]) ** 2) / r_sum[..., None] + 1e-4
    cost = ((bu[:, None] + 0.5 * torch.log(var)) * r_sum[..., None] / (12 / 4)).sum(-1)
    a_last = torch.sigmoid(inverse_temperature_schedule(3)[-1] * (ba - cost))
    expected = torch.autograd.grad(mean.sum() + a_last.sum(), copies)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)

    full = torch.autograd.grad(sum(x.sum() for x in em_routing(*inputs, 3, detach_intermediate=False)), inputs)
    assert not torch.allclose(full[0], grads[0])


def test_results_do_not_depend_on_recording_gradients_or_on_the_votes_memory_layout():
    votes, a_in, beta_u, beta_a = random_inputs(dtype=torch.float32)
    reference = em_routing(votes, a_in, beta_u, beta_a)
    with torch.no_grad():
        transposed = em_routing(votes.transpose(1, 2).contiguous().transpose(1, 2), a_in, beta_u, beta_a)
    recorded = em_routing(votes.requires_grad_(True), a_in, beta_u, beta_a)
    for a, b in [(reference, transposed), (reference, recorded)]:
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


def test_routing_is_per_example():
    votes, a_in, beta_u, beta_a = random_inputs(b=6)
    alone = em_routing(votes[2:3], a_in[2:3], beta_u, beta_a)
    in_batch = em_routing(votes, a_in, beta_u, beta_a)
    for x, y in zip(alone, in_batch):
        torch.testing.assert_close(x, y[2:3])


def test_normalised_cost_is_the_paper_cost_divided_by_children_per_parent():
    """lambda (beta_a - cost / s) = (lambda / s)(s beta_a - cost), with s = I / J children per parent."""
    votes, a_in, beta_u, beta_a = random_inputs(i=12, j=4)
    s, lambdas = 12 / 4, [0.3, 0.6, 0.9]
    normalised = em_routing(votes, a_in, beta_u, beta_a, 3, inverse_temperatures=lambdas)
    paper = em_routing(votes, a_in, beta_u, s * beta_a, 3, cost_normalization="none",
                       inverse_temperatures=[lam / s for lam in lambdas])
    for x, y in zip(normalised, paper):
        torch.testing.assert_close(x, y)


def test_default_inverse_temperatures_rise_as_in_the_authors_schedule():
    assert inverse_temperature_schedule(3) == pytest.approx([0.05, 0.0975, 0.142625])
    assert inverse_temperature_schedule(2, limit=0.01) == pytest.approx([0.0005, 0.000975])
    votes, a_in, beta_u, beta_a = random_inputs()
    for normalization, final in [("children_per_parent", 1.0), ("none", 0.01)]:
        default = em_routing(votes, a_in, beta_u, beta_a, 3, cost_normalization=normalization)
        explicit = em_routing(votes, a_in, beta_u, beta_a, 3, cost_normalization=normalization,
                              inverse_temperatures=inverse_temperature_schedule(3, final))
        for x, y in zip(default, explicit):
            torch.testing.assert_close(x, y)


def test_higher_inverse_temperature_sharpens_activations():
    votes, a_in, beta_u, beta_a = random_inputs(j=6)
    spreads = [em_routing(votes, a_in, beta_u, beta_a, 3, inverse_temperatures=[lam] * 3)[1].std().item()
               for lam in (0.01, 0.1, 1.0)]
    assert spreads[0] < spreads[1] < spreads[2]
    assert math.isclose(em_routing(votes, a_in, beta_u, beta_a, 3, inverse_temperatures=[0.0] * 3)[1].unique().item(), 0.5)


GOOD = random_inputs(b=2, i=5, j=3, d=4, dtype=torch.float32)


@pytest.mark.parametrize("change, message", [
    ({"votes": torch.zeros(2, 5, 3)}, r"votes of shape \(batch, children, parents, pose components\), none but the batch empty, got \(2, 5, 3\)"),
    ({"votes": torch.zeros(2, 0, 3, 4)}, r"none but the batch empty, got \(2, 0, 3, 4\)"),
    ({"votes": torch.zeros(2, 5, 3, 4, dtype=torch.long)}, "floating-point votes, got torch.int64"),
    ({"a_in": torch.rand(2, 4)}, r"a_in of shape \(batch, children\) = \(2, 5\), got \(2, 4\)"),
    ({"a_in": torch.ones(2, 5, dtype=torch.long)}, "floating-point child activations a_in on cpu like the votes, got torch.int64 on cpu"),
    ({"a_in": torch.rand(2, 5, device="meta")}, "a_in on cpu like the votes, got torch.float32 on meta"),
    ({"a_in": torch.full((2, 5), 1.5)}, r"a_in in \[0, 1\], got values from 1.5 to 1.5"),
    ({"a_in": torch.full((2, 5), float("nan"))}, r"a_in in \[0, 1\]"),
    ({"beta_u": torch.zeros(4)}, r"beta_u with one value per parent, broadcastable to \(3,\), got shape \(4,\)"),
    ({"beta_a": torch.zeros(1, 3)}, r"beta_a with one value per parent, broadcastable to \(3,\), got shape \(1, 3\)"),
    ({"iterations": 0}, "positive number of routing iterations, got 0"),
    ({"iterations": True}, "positive number of routing iterations, got True"),
    ({"inverse_temperatures": [1.0, 2.0]}, r"3 finite, non-negative inverse temperatures \(one per iteration\), got \[1.0, 2.0\]"),
    ({"inverse_temperatures": [1.0, -1.0, 2.0]}, "non-negative inverse temperatures"),
    ({"cost_normalization": "standardize"}, r"cost_normalization in \('children_per_parent', 'none'\), got 'standardize'"),
    ({"variance_floor": 0.0}, "positive variance_floor, got 0.0"),
    ({"initial_assignments": torch.full((2, 5, 2), 0.5)}, r"initial_assignments of shape \(batch, children, parents\) = \(2, 5, 3\)"),
    ({"initial_assignments": torch.ones(2, 5, 3, dtype=torch.long)}, r"floating-point initial_assignments"),
    ({"initial_assignments": torch.full((2, 5, 3), 0.5)}, "summing to 1 over the parents"),
])
def test_em_routing_rejects_bad_inputs(change, message):
    votes, a_in, beta_u, beta_a = GOOD
    args = dict(votes=votes, a_in=a_in, beta_u=beta_u, beta_a=beta_a, iterations=3) | change
    with pytest.raises(ValueError, match=message):
        em_routing(**args)


def test_a_rescaled_schedule_ends_where_asked_and_keeps_the_authors_shape():
    two, three = schedule_ending_at(2, 0.2), schedule_ending_at(3, 0.2)
    assert two[-1] == pytest.approx(0.2) and three[-1] == pytest.approx(0.2)
    authors = inverse_temperature_schedule(3)
    assert [x / three[-1] for x in three] == pytest.approx([x / authors[-1] for x in authors])
    with pytest.raises(ValueError, match="positive last"):
        schedule_ending_at(2, 0.0)


def test_em_routing_backpropagates_through_every_iteration_by_default():
    torch.manual_seed(0)
    votes = torch.randn(2, 12, 3, 16, requires_grad=True)
    a_in, beta_u, beta_a = torch.rand(2, 12), torch.zeros(3), torch.zeros(3)
    gradients = {}
    for name, kwargs in [("default", {}), ("through", {"detach_intermediate": False}),
                         ("detached", {"detach_intermediate": True})]:
        mu, a_out = em_routing(votes, a_in, beta_u, beta_a, 3, **kwargs)
        (gradients[name],) = torch.autograd.grad(mu.sum() + a_out.sum(), votes)
    torch.testing.assert_close(gradients["default"], gradients["through"])
    assert not torch.allclose(gradients["default"], gradients["detached"])
