"""Specifications of routing in low precision and at large magnitudes: squash, dynamic routing
and EM routing in float16, bfloat16 and under CPU bfloat16 autocast, the float32 results that
must not change, and property tests up to the magnitudes the docstrings promise."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capsutil.models import CapsNet, MatrixCapsNet
from capsutil.routing import dynamic_routing, em_routing, squash

PROPERTIES = settings(max_examples=40, deadline=None, database=None)
LOW_PRECISION = [torch.float16, torch.bfloat16]


def squash_before(s, dim=-1, eps=1e-8):
    """squash exactly as the training runs so far computed it (the float32 reference)."""
    norm_sq = (s * s).sum(dim=dim, keepdim=True)
    return s * (norm_sq / ((1.0 + norm_sq) * torch.sqrt(norm_sq + eps)))


def dynamic_routing_before(u_hat, iterations=3, detach_intermediate=True):
    """dynamic_routing exactly as the training runs so far computed it."""
    u_route = u_hat.detach() if detach_intermediate else u_hat
    logits = u_hat.new_zeros(u_hat.shape[:3])
    for step in range(iterations):
        c = torch.softmax(logits, dim=2)
        last = step == iterations - 1
        votes = u_hat if last else u_route
        v = squash_before(torch.einsum("bij,bijd->bjd", c, votes))
        if not last:
            logits = logits + torch.einsum("bijd,bjd->bij", u_route, v)
    return v


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 0.05, 1.0, 30.0, 1e3, 1e6])
def test_float32_squash_and_routing_are_bit_identical_to_the_formulas_trained_with(scale):
    generator = torch.Generator().manual_seed(0)
    u_hat = scale * torch.randn(2, 1152, 10, 16, generator=generator)   # CapsNet's sizes
    u_hat[0, :, 3] = 0.0                                                 # a parent with no votes
    for detach in (True, False):
        new, old = (u_hat.clone().requires_grad_(True) for _ in range(2))
        v_new = dynamic_routing(new, 3, detach_intermediate=detach)
        v_old = dynamic_routing_before(old, 3, detach_intermediate=detach)
        assert torch.equal(v_new, v_old)
        weights = torch.randn(v_new.shape, generator=generator)
        (v_new * weights).sum().backward()
        (v_old * weights).sum().backward()
        assert torch.equal(new.grad, old.grad)
    s = scale * torch.randn(64, 1152, 8, generator=generator)          # primary capsules
    assert torch.equal(squash(s), squash_before(s))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_squash_in_low_precision_keeps_long_vectors_long_and_zero_at_zero(dtype):
    lengths = torch.tensor([0.0, 0.5, 41.0, 100.0, 1000.0, 60000.0])
    s = torch.stack([lengths, torch.zeros_like(lengths)], dim=1).to(dtype).requires_grad_(True)
    v = squash(s)
    assert v.dtype == dtype and torch.isfinite(v).all()
    expected = lengths**2 / (1 + lengths**2)
    torch.testing.assert_close(v.float().norm(dim=1), expected, rtol=1e-2, atol=1e-3)
    v.float().sum().backward()
    assert torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("length", [7e12, 1e15, 1e19])
def test_float32_squash_of_very_long_vectors_has_length_one(length):
    s = torch.tensor([[0.6 * length, 0.8 * length]], requires_grad=True)
    v = squash(s)
    torch.testing.assert_close(v, torch.tensor([[0.6, 0.8]]))
    v.sum().backward()
    assert torch.isfinite(s.grad).all()


def _tensor(shape, log10_scale, seed, dtype):
    """Standard normal entries times 10 ** log10_scale, clamped to the finite range of
    ``dtype`` and in that dtype."""
    generator = torch.Generator().manual_seed(seed)
    largest = torch.finfo(dtype).max
    return (torch.randn(shape, generator=generator, dtype=torch.float64)
            * 10.0 ** log10_scale).clamp(-largest, largest).to(dtype)


# The largest length (log10) squash's docstring promises for each dtype.
SQUASH_SAFE_LOG10_LENGTH = {torch.float16: math.log10(60000.0), torch.bfloat16: 19.0,
                            torch.float32: 19.0, torch.float64: 150.0}


@PROPERTIES
@given(dtype=st.sampled_from(list(SQUASH_SAFE_LOG10_LENGTH)), log10_fraction=st.floats(0, 1),
       seed=st.integers(0, 2**31), n=st.integers(1, 6), d=st.integers(1, 16))
def test_squash_of_finite_vectors_up_to_the_documented_length_is_finite_and_shorter_than_one(
        dtype, log10_fraction, seed, n, d):
    top = SQUASH_SAFE_LOG10_LENGTH[dtype]
    directions = _tensor((n, d), 0, seed, torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300)
    s = (directions * 10.0 ** (-30 + (top + 30) * log10_fraction)).to(dtype)
    s[0] = 0                                                            # and a zero vector
    s.requires_grad_(True)
    v = squash(s)
    assert v.dtype == dtype and torch.isfinite(v).all()
    assert (v.double().norm(dim=1) <= 1 + 1e-2).all()
    v.double().sum().backward()
    assert torch.isfinite(s.grad).all()


# The largest entries (log10) of u_hat dynamic_routing's docstring promises, with I * sqrt(D)
# below 1e19 / 1e15 here (at most 8 children of 16 dimensions).
ROUTING_SAFE_LOG10 = {torch.float16: math.log10(60000.0), torch.bfloat16: 15.0,
                      torch.float32: 15.0, torch.float64: 15.0}


@PROPERTIES
@given(dtype=st.sampled_from(list(ROUTING_SAFE_LOG10)), log10_fraction=st.floats(0, 1),
       seed=st.integers(0, 2**31), shape=st.tuples(st.integers(1, 2), st.integers(1, 8),
                                                   st.integers(1, 5), st.integers(1, 16)))
def test_dynamic_routing_of_finite_votes_up_to_the_documented_size_is_finite_and_couples_to_one(
        dtype, log10_fraction, seed, shape):
    scale = -6 + (ROUTING_SAFE_LOG10[dtype] - 6) * log10_fraction
    u_hat = _tensor(shape, scale, seed, dtype)
    v, couplings = dynamic_routing(u_hat, 3, return_couplings=True)
    assert v.dtype == dtype and torch.isfinite(v).all()
    assert (v.double().norm(dim=-1) <= 1 + 1e-2).all()
    for c in couplings:
        assert torch.isfinite(c).all()
        torch.testing.assert_close(c.sum(dim=2), torch.ones(shape[:2], dtype=c.dtype))


@PROPERTIES
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       log10_fraction=st.floats(0, 1), seed=st.integers(0, 2**31),
       shape=st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 4), st.integers(1, 16)))
def test_em_routing_of_finite_votes_up_to_1e15_is_finite_and_assigns_each_child_fully(
        dtype, log10_fraction, seed, shape):
    top = math.log10(60000.0) if dtype == torch.float16 else 15.0
    votes = _tensor(shape, -6 + (top + 6) * log10_fraction, seed, dtype)
    a_in = torch.rand(shape[:2], generator=torch.Generator().manual_seed(seed)).to(dtype)
    a_in[:, ::3] = 0                                                    # some children are off
    mu, a_out, assignments = em_routing(votes, a_in, -1.0, 0.5, 3, return_assignments=True)
    assert torch.isfinite(mu).all() and torch.isfinite(a_out).all()
    for R in assignments:
        torch.testing.assert_close(R.sum(-1), torch.ones(shape[:2], dtype=R.dtype))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_em_routing_means_are_not_pulled_towards_zero_in_low_precision(dtype):
    """With one iteration the parents' means are the activation-weighted means of the votes.
    With small activations a guard of 10 epsilons of float16 or bfloat16 added to the assigned
    mass shrank them (by 40% and 84% here); computed in float32, with the mass floored
    instead, they are exact to the precision of the inputs."""
    generator = torch.Generator().manual_seed(0)
    votes = (3.0 + torch.randn(2, 12, 4, 16, generator=generator)).to(dtype)
    a_in = torch.full((2, 12), 0.005).to(dtype)
    mu, _ = em_routing(votes, a_in, 0.0, 0.0, 1)
    assert mu.dtype == torch.float32
    votes, a_in = votes.float(), a_in.float()
    weighted = torch.einsum("bi,bijd->bjd", a_in, votes) / a_in.sum(1)[:, None, None]
    torch.testing.assert_close(mu, weighted, rtol=1e-5, atol=1e-5)


def test_em_routing_under_bfloat16_autocast_takes_mixed_dtypes_and_routes_in_float32():
    generator = torch.Generator().manual_seed(0)
    votes = torch.randn(3, 18, 5, 16, generator=generator)
    a_in = torch.rand(3, 18, generator=generator)
    expected = em_routing(votes.bfloat16().float(), a_in, -1.0, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = em_routing(votes.bfloat16(), a_in, -1.0, 0.0)
    for got, want in zip(routed, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("model", [
    lambda: CapsNet(conv_channels=8, primary_maps=4, primary_dims=4, digit_dims=6,
                    decoder_hidden=(16, 32)),
    lambda: MatrixCapsNet(A=8, B=4, C=4, D=4, iterations=2)])
def test_both_models_train_and_predict_under_cpu_bfloat16_autocast(model):
    torch.manual_seed(0)
    net, images, labels = model(), torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(images, labels)
        scores = out.lengths if isinstance(net, CapsNet) else out.activations
        scores.float().sum().backward()
    assert torch.isfinite(scores.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
