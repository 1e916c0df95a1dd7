from types import SimpleNamespace

import pytest
import torch

from capsutil.layers import capsule_lengths
from capsutil.losses import CapsNetLoss, margin_loss, reconstruction_loss


def test_margin_loss_matches_the_hand_computation():
    lengths = torch.tensor([[0.95, 0.30, 0.05],
                            [0.50, 0.80, 0.20]])
    labels = torch.tensor([0, 1])
    # example 0: present 0.95 > 0.9 -> 0; absent 0.5 (0.3 - 0.1)^2 = 0.02; absent 0.05 < 0.1 -> 0
    # example 1: present (0.9 - 0.8)^2 = 0.01; absent 0.5 (0.4)^2 = 0.08 and 0.5 (0.1)^2 = 0.005
    expected = torch.tensor((0.02 + 0.095) / 2)
    torch.testing.assert_close(margin_loss(lengths, labels), expected)


def test_margin_loss_is_zero_for_confident_correct_capsules():
    lengths = torch.tensor([[0.95, 0.05, 0.0], [0.1, 0.9, 0.02]])
    assert margin_loss(lengths, torch.tensor([0, 1])) == 0


def test_reconstruction_loss_is_0_0005_times_summed_squared_error_averaged_over_the_batch():
    images = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]], [[[0.0, 0.0], [0.0, 1.0]]]])  # (2, 1, 2, 2)
    reconstructions = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])     # (2, 4)
    # squared errors summed per image: 1.0 and 2.0; mean 1.5; times 0.0005
    torch.testing.assert_close(reconstruction_loss(reconstructions, images), torch.tensor(0.00075))


def test_capsnet_loss_is_margin_plus_reconstruction():
    torch.manual_seed(0)
    output = SimpleNamespace(lengths=torch.rand(4, 10), reconstructions=torch.rand(4, 784))
    images, labels = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    loss = CapsNetLoss()
    parts = loss.parts(output, images, labels)
    torch.testing.assert_close(parts["margin"], margin_loss(output.lengths, labels))
    torch.testing.assert_close(parts["reconstruction"],
                               reconstruction_loss(output.reconstructions, images))
    torch.testing.assert_close(loss(output, images, labels), parts["margin"] + parts["reconstruction"])


def test_no_nan_reaches_the_margin_loss_from_zero_capsules():
    poses = torch.zeros(3, 10, 16, requires_grad=True)
    loss = margin_loss(capsule_lengths(poses), torch.tensor([0, 4, 9]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(poses.grad).all()


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 10]), "expected labels in 0..9, got values from 0 to 10"),
    (torch.tensor([0.0, 1.0]), "expected integer class labels, got torch.float32"),
    (torch.tensor([[0, 1]]), r"expected labels of shape \(N,\), got \(1, 2\)"),
    (torch.tensor([0, 1, 2]), "expected 2 labels, one per image, got 3"),
])
def test_margin_loss_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        margin_loss(torch.rand(2, 10), labels)


def test_reconstruction_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"reconstructions of shape \(2, 784\) to match the images, "
                                         r"got \(2, 100\)"):
        reconstruction_loss(torch.rand(2, 100), torch.rand(2, 1, 28, 28))
