import math

import pytest
import torch

from capsutil.data import load_sample
from capsutil.models import CapsNet, MatrixCapsNet
from capsutil.routing_analysis import (accuracy_by_iterations, coupling_entropy,
                                       routing_iterations, uniform_entropy)

TINY = dict(conv_channels=16, primary_maps=8, primary_dims=4, digit_dims=8, decoder_hidden=(32, 64))


def _tiny() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(**TINY).eval()


def test_one_iteration_means_uniform_couplings_with_entropy_ln_j():
    model = _tiny()
    images = torch.rand(3, 1, 28, 28)
    with routing_iterations(model, 1):
        couplings = model(images, return_couplings=True).couplings
    assert len(couplings) == 1
    entropy = coupling_entropy(couplings[0])                           # (3, I)
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(10)))
    assert uniform_entropy(10) == pytest.approx(math.log(10))


def test_entropy_is_zero_when_a_child_sends_everything_to_one_parent():
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 3]]), 5).float()   # (1, 2, 5)
    assert coupling_entropy(one_hot).abs().max() == 0


def test_routing_iterations_changes_the_routing_inside_the_block_only():
    model = _tiny()
    images = torch.rand(2, 1, 28, 28)
    with routing_iterations(model, 5):
        assert len(model(images, return_couplings=True).couplings) == 5
    assert model.digits.iterations == 3
    with pytest.raises(RuntimeError), routing_iterations(model, 2):
        raise RuntimeError("interrupted")
    assert model.digits.iterations == 3                                # restored after an error


def test_accuracy_by_iterations_scores_each_setting_on_every_image():
    digits = load_sample("test").subset(40)
    scores = accuracy_by_iterations(_tiny(), digits, [1, 3])
    assert list(scores) == [1, 3] and all(score.n == 40 for score in scores.values())


@pytest.mark.parametrize("iterations", [0, -1, 2.0, True])
def test_routing_iterations_rejects_non_positive_counts(iterations):
    with pytest.raises(ValueError, match="positive number of routing iterations"):
        with routing_iterations(_tiny(), iterations):
            pass


def test_models_without_routed_capsules_are_refused():
    with pytest.raises(ValueError, match="expected a CapsNet or a MatrixCapsNet"):
        with routing_iterations(torch.nn.Linear(2, 2), 2):
            pass
    with pytest.raises(ValueError, match=r"expected couplings of shape \(B, I, J\)"):
        coupling_entropy(torch.ones(4, 10))


def test_matrix_capsules_route_longer_at_the_same_last_temperature_inside_the_block_only():
    model = MatrixCapsNet(A=8, B=4, C=4, D=4, iterations=2, last_inverse_temperature=0.1)
    layers = (model.conv_caps1, model.conv_caps2, model.class_caps)
    trained = [layer.inverse_temperatures for layer in layers]
    with routing_iterations(model, 3):
        for layer in layers:
            assert layer.iterations == 3 and len(layer.inverse_temperatures) == 3
            assert layer.inverse_temperatures[-1] == pytest.approx(0.1)
    assert [layer.iterations for layer in layers] == [2, 2, 2]
    assert [layer.inverse_temperatures for layer in layers] == trained
    default = MatrixCapsNet(A=8, B=4, C=4, D=4)           # em_routing's own schedule
    with routing_iterations(default, 1):
        assert default.class_caps.inverse_temperatures is None
