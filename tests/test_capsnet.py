import re

import pytest
import torch

from capsutil.layers import Decoder, DigitCaps, PrimaryCaps, capsule_lengths, group_capsules
from capsutil.losses import CapsNetLoss
from capsutil.models import MODELS, CapsNet, build_model, count_parameters
from capsutil.routing import squash

TINY = dict(conv_channels=8, primary_maps=4, primary_dims=4, digit_dims=6, decoder_hidden=(16, 32))


def test_paper_configuration_has_8_215_568_parameters_split_as_in_the_paper():
    model = CapsNet()
    assert count_parameters(model) == 8_215_568
    assert count_parameters(model.conv1) == 20_992
    assert count_parameters(model.primary) == 5_308_672
    assert count_parameters(model.digits) == 1_474_560
    assert model.digits.weight.shape == (1152, 10, 16, 8)
    assert count_parameters(model.decoder) == 1_411_344


def _labelled_conv_output(maps=32, dims=8, h=6, w=6):
    """Conv output whose value names its (map, dim, row, col): 1000 map + 100 dim + 10 row + col."""
    m, d, r, c = torch.meshgrid(torch.arange(maps), torch.arange(dims), torch.arange(h),
                                torch.arange(w), indexing="ij")
    return (1000 * m + 100 * d + 10 * r + c).reshape(1, maps * dims, h, w).float()


def test_each_primary_capsule_takes_its_8_values_from_one_map_at_one_position():
    capsules = group_capsules(_labelled_conv_output(), maps=32, dims=8)
    assert capsules.shape == (1, 1152, 8)
    for i in range(1152):
        m, rest = divmod(i, 36)
        r, c = divmod(rest, 6)
        expected = 1000 * m + 100 * torch.arange(8) + 10 * r + c
        torch.testing.assert_close(capsules[0, i], expected.float())


def test_a_bare_view_would_mix_positions_into_one_capsule():
    wrong = _labelled_conv_output().view(1, 1152, 8)
    positions = wrong[0, 0] % 100                    # 10 row + col of each of the 8 values
    assert len(set(positions.tolist())) > 1


def test_primary_caps_layer_groups_channel_map_times_8_plus_dim_and_squashes():
    layer = PrimaryCaps(in_channels=3, maps=32, dims=8, kernel_size=3, stride=2)
    with torch.no_grad():
        layer.conv.weight.zero_()
        layer.conv.bias.copy_(torch.arange(256.0))   # channel c outputs c everywhere
    u = layer(torch.rand(2, 3, 13, 13))              # 6x6 positions
    assert u.shape == (2, 1152, 8)
    raw = (8 * torch.arange(32.0)[:, None] + torch.arange(8.0)).repeat_interleave(36, dim=0)
    torch.testing.assert_close(u, squash(raw).expand(2, -1, -1))


def test_digit_caps_predictions_are_w_ij_times_u_i():
    torch.manual_seed(0)
    layer = DigitCaps(in_caps=5, in_dims=8, out_caps=3, out_dims=16)
    u = torch.randn(2, 5, 8)
    u_hat = layer.predictions(u)
    assert u_hat.shape == (2, 5, 3, 16)
    for b, i, j in [(0, 0, 0), (1, 4, 2), (1, 2, 1)]:
        torch.testing.assert_close(u_hat[b, i, j], layer.weight[i, j] @ u[b, i])


def test_digit_caps_routes_1152_children_to_10_parents_coupling_over_parents():
    torch.manual_seed(0)
    layer = DigitCaps()
    v, couplings = layer(squash(torch.randn(3, 1152, 8)), return_couplings=True)
    assert v.shape == (3, 10, 16)
    assert len(couplings) == 3 and couplings[0].shape == (3, 1152, 10)
    for c in couplings:
        torch.testing.assert_close(c.sum(dim=2), torch.ones(3, 1152))
    assert (v.norm(dim=-1) < 1).all()


def test_digit_caps_rejects_children_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"child capsules of shape \(B, 1152, 8\), got \(2, 1152, 6\)"):
        DigitCaps()(torch.zeros(2, 1152, 6))


def test_decoder_mask_keeps_only_the_chosen_capsule():
    poses = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    masked = Decoder.mask(poses, torch.tensor([2, 0])).reshape(2, 3, 4)
    torch.testing.assert_close(masked[0, 2], poses[0, 2])
    torch.testing.assert_close(masked[1, 0], poses[1, 0])
    assert masked[0, :2].abs().sum() == 0 and masked[1, 1:].abs().sum() == 0


def test_decoder_sees_the_true_label_in_training_and_the_prediction_in_eval():
    torch.manual_seed(0)
    model = CapsNet(**TINY)
    with torch.no_grad():
        model.digits.weight.mul_(100)                     # capsules long enough to tell apart
    images = torch.rand(4, 1, 28, 28)
    out = model(images)                                   # no labels: prediction
    wrong = (out.predictions + 1) % 10                    # labels that differ from the prediction
    trained = model.train()(images, wrong)
    torch.testing.assert_close(trained.reconstructions, model.decoder(trained.poses, wrong))
    evaluated = model.eval()(images, wrong)
    torch.testing.assert_close(evaluated.reconstructions,
                               model.decoder(evaluated.poses, evaluated.predictions))
    assert not torch.allclose(trained.reconstructions, evaluated.reconstructions)


def test_forward_returns_lengths_poses_and_reconstructions():
    model = CapsNet(**TINY)
    out = model(torch.rand(3, 1, 28, 28), torch.tensor([0, 5, 9]), return_couplings=True)
    assert out.lengths.shape == (3, 10) and out.poses.shape == (3, 10, 6)
    assert out.reconstructions.shape == (3, 784)
    assert 0 <= out.reconstructions.min() and out.reconstructions.max() <= 1
    torch.testing.assert_close(out.lengths, out.poses.norm(dim=-1), rtol=0, atol=1e-4)
    assert len(out.couplings) == 3 and out.couplings[0].shape == (3, 144, 10)


def test_predict_returns_int64_classes_of_the_longest_capsule_and_keeps_the_mode():
    torch.manual_seed(0)
    model = CapsNet(**TINY).train()
    images = torch.rand(7, 1, 28, 28)
    predicted = model.predict(images, batch_size=3)
    assert predicted.dtype == torch.int64 and predicted.shape == (7,)
    assert model.training
    torch.testing.assert_close(predicted, model.eval()(images).lengths.argmax(dim=1))


def test_zero_capsules_give_a_finite_loss_and_finite_gradients():
    model = CapsNet(**TINY)
    with torch.no_grad():
        for conv in (model.conv1, model.primary.conv):
            conv.bias.zero_()
    images = torch.zeros(2, 1, 28, 28)
    out = model(images, torch.tensor([3, 7]))
    assert out.poses.abs().sum() == 0                     # every digit capsule is exactly zero
    loss = CapsNetLoss()(out, images, torch.tensor([3, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_capsule_lengths_gradient_is_finite_at_zero():
    v = torch.zeros(2, 10, 16, requires_grad=True)
    capsule_lengths(v).sum().backward()
    assert torch.isfinite(v.grad).all()


def test_build_model_by_name_rebuilds_from_its_config():
    model = build_model("capsnet", **TINY)
    assert build_model("capsnet", **model.config).config == model.config
    known = ", ".join(repr(name) for name in sorted(MODELS))
    with pytest.raises(ValueError, match=re.escape(f"unknown model 'capsnett'; expected one "
                                                   f"of [{known}]")):
        build_model("capsnett")


@pytest.mark.parametrize("images, message", [
    (torch.rand(2, 28, 28), r"expected images of shape \(N, 1, 28, 28\), got \(N, 28, 28\)"),
    (torch.rand(2, 3, 28, 28), r"expected images of shape \(N, 1, 28, 28\), got \(N, 3, 28, 28\)"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "expected float images in \\[0, 1\\], got torch.uint8"),
    (torch.full((2, 1, 28, 28), 255.0), "expected pixel values in \\[0, 1\\], got values from 255 to 255"),
    ([[0.0]], "expected images as a tensor of shape \\(N, 1, 28, 28\\), got list"),
])
def test_predict_rejects_bad_images_naming_the_problem(images, message):
    with pytest.raises(ValueError, match=message):
        CapsNet(**TINY).predict(images)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 10]), "expected labels in 0..9, got values from 0 to 10"),
    (torch.tensor([-1, 3]), "expected labels in 0..9, got values from -1 to 3"),
    (torch.tensor([0.0, 1.0]), "expected integer class labels, got torch.float32"),
    (torch.tensor([1, 2, 3]), "expected 2 labels, one per image, got 3"),
])
def test_training_forward_rejects_bad_labels_naming_the_problem(labels, message):
    with pytest.raises(ValueError, match=message):
        CapsNet(**TINY).train()(torch.rand(2, 1, 28, 28), labels)
