import pytest
import torch

from capsutil.routing import dynamic_routing, squash


def test_squash_keeps_direction_and_maps_length_n_to_n2_over_1_plus_n2():
    s = torch.tensor([[3.0, 4.0], [0.3, -0.4]])
    v = squash(s)
    lengths = torch.tensor([5.0, 0.5])
    torch.testing.assert_close(v.norm(dim=-1), lengths**2 / (1 + lengths**2))
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), s / lengths[:, None])


def test_squash_gradient_finite_at_zero():
    s = torch.zeros(4, 16, requires_grad=True)
    squash(s).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_naive_squash_gradient_is_nan_at_zero():
    s = torch.zeros(1, 8, requires_grad=True)
    norm = s.norm(dim=-1, keepdim=True)
    (norm**2 / (1 + norm**2) * s / norm).sum().backward()
    assert torch.isnan(s.grad).all()


def test_coupling_coefficients_sum_to_one_over_parents():
    u_hat = torch.randn(5, 30, 10, 16)
    _, couplings = dynamic_routing(u_hat, iterations=3, return_couplings=True)
    assert len(couplings) == 3
    for c in couplings:
        assert c.shape == (5, 30, 10)
        torch.testing.assert_close(c.sum(dim=2), torch.ones(5, 30))


def test_first_iteration_couples_uniformly_and_routing_agrees_with_the_loop_written_out():
    torch.manual_seed(0)
    u_hat = torch.randn(2, 6, 3, 4)
    v, couplings = dynamic_routing(u_hat, iterations=3, return_couplings=True)
    torch.testing.assert_close(couplings[0], torch.full((2, 6, 3), 1 / 3))
    b = torch.zeros(2, 6, 3)
    for _ in range(3):
        c = torch.softmax(b, dim=2)
        s = (c[..., None] * u_hat).sum(dim=1)
        out = squash(s)
        b = b + (u_hat * out[:, None]).sum(dim=-1)
    torch.testing.assert_close(v, out)


def test_routing_logits_are_per_example():
    torch.manual_seed(1)
    u_hat = torch.randn(4, 20, 5, 8)
    alone = dynamic_routing(u_hat[:1], iterations=3)
    in_batch = dynamic_routing(u_hat, iterations=3)[:1]
    torch.testing.assert_close(alone, in_batch)


def test_agreeing_children_pull_their_parent_and_gain_coupling():
    torch.manual_seed(2)
    u_hat = 0.05 * torch.randn(1, 12, 2, 3)
    u_hat[0, :8, 0] += torch.tensor([1.0, 1.0, 0.0])   # 8 children agree on parent 0
    _, couplings = dynamic_routing(u_hat, iterations=3, return_couplings=True)
    assert (couplings[-1][0, :8, 0] > 0.5).all()


def test_detached_intermediate_iterations_treat_couplings_as_constants():
    torch.manual_seed(3)
    u_hat = torch.randn(2, 7, 3, 4, requires_grad=True)
    v, couplings = dynamic_routing(u_hat, iterations=3, return_couplings=True)
    (grad,) = torch.autograd.grad(v.sum(), u_hat)
    fixed_c = couplings[-1].detach()
    u_copy = u_hat.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(squash(torch.einsum("bij,bijd->bjd", fixed_c, u_copy)).sum(), u_copy)
    torch.testing.assert_close(grad, expected)
    (full,) = torch.autograd.grad(dynamic_routing(u_hat, 3, detach_intermediate=False).sum(), u_hat)
    assert not torch.allclose(full, grad)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3, 10, 16), "of shape \\(batch, children, parents, dims\\), got \\(3, 10, 16\\)"),
    (torch.zeros(1, 2, 3, 4, dtype=torch.long), "floating-point predictions"),
])
def test_routing_rejects_bad_predictions(bad, message):
    with pytest.raises(ValueError, match=message):
        dynamic_routing(bad)


@pytest.mark.parametrize("iterations", [0, True, 2.0])
def test_routing_rejects_iterations_that_are_not_a_positive_integer(iterations):
    with pytest.raises(ValueError, match=f"positive number of routing iterations, got {iterations}"):
        dynamic_routing(torch.zeros(1, 2, 3, 4), iterations=iterations)
