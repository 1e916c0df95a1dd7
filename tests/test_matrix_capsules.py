"""Specifications of matrix capsules (chapter 08): layers, model, spread loss, training."""
import pytest
import torch

from capsutil import checkpoints, matrix_layers, train
from capsutil.data import Digits, load_sample, to_float
from capsutil.losses import SpreadLoss, spread_loss
from capsutil.matrix_layers import (BETA_U_INIT, ClassCaps, ConvCaps, coordinate_offsets,
                                    receptive_field_centres, transform_votes, windows)
from capsutil.models import MATRIX_SIZES, MatrixCapsNet, count_parameters
from capsutil.routing import em_routing

SMALL = MATRIX_SIZES["small"]
TINY = dict(A=8, B=4, C=4, D=4, iterations=2)


def _seeded(config: dict, seed: int = 0) -> MatrixCapsNet:
    torch.manual_seed(seed)
    return MatrixCapsNet(**config)


def _tiny(seed: int = 0) -> MatrixCapsNet:
    return _seeded(TINY, seed)


def _conv_caps_parameters(k, t_in, t_out):
    return k * k * t_in * t_out * 16 + 2 * t_out


@pytest.mark.parametrize("config, total", [({}, 318_964), (SMALL, 68_444)])
def test_parameter_counts_of_the_paper_and_small_configurations(config, total):
    model = MatrixCapsNet(**config)
    a, b, c, d = (model.config[k] for k in "ABCD")
    expected = {"conv1": 25 * a + a, "primary": a * b * 16 + b * 16 + a * b + b,
                "conv_caps1": _conv_caps_parameters(3, b, c),
                "conv_caps2": _conv_caps_parameters(3, c, d),
                "class_caps": d * 10 * 16 + 2 * 10}
    assert {name: count_parameters(part) for name, part in model.named_children()} == expected
    assert count_parameters(model) == total


def test_output_and_assignment_shapes():
    model = MatrixCapsNet(**SMALL)
    out = model(torch.rand(3, 1, 28, 28), return_assignments=True)
    assert out.activations.shape == (3, 10) and out.poses.shape == (3, 10, 4, 4)
    assert out.predictions.shape == (3,) and out.predictions.dtype == torch.int64
    # ConvCaps1: 5x5 positions, 3x3x8 children, 16 parents; ConvCaps2: 3x3, 3x3x16, 16;
    # class capsules: 3x3x16 children, 10 classes. Three iterations each.
    expected = {"conv_caps1": (3 * 25, 72, 16), "conv_caps2": (3 * 9, 144, 16),
                "class_caps": (3, 144, 10)}
    for name, shape in expected.items():
        assert [tuple(r.shape) for r in out.assignments[name]] == [shape] * 3
        torch.testing.assert_close(out.assignments[name][-1].sum(-1),
                                   torch.ones(shape[:2]))
    assert ((out.activations > 0) & (out.activations < 1)).all()


def test_a_window_child_is_one_type_at_one_position_in_weight_order():
    grid = torch.randn(2, 5, 5, 3, 16)                       # (B, H, W, T, E)
    cut = windows(grid, kernel=3, stride=2)                   # (B, 2, 2, 27, 16)
    assert cut.shape == (2, 2, 2, 27, 16)
    row, col, dr, dc, t = 1, 0, 2, 1, 2                       # output (1, 0), offset (2, 1), type 2
    torch.testing.assert_close(cut[:, row, col, (dr * 3 + dc) * 3 + t],
                               grid[:, 2 * row + dr, 2 * col + dc, t])


def test_votes_are_child_pose_times_transformation_matrix():
    poses, weight = torch.randn(2, 5, 4, 4), torch.randn(5, 3, 4, 4)
    votes = transform_votes(poses, weight)                    # (R, J, I, 16)
    assert votes.shape == (2, 3, 5, 16) and votes.is_contiguous()
    torch.testing.assert_close(votes[1, 2, 4].view(4, 4), poses[1, 4] @ weight[4, 2])


def test_receptive_field_centres_on_28_pixel_images():
    # Conv 5x5/2 -> centre 2p + 2; 1x1; ConvCaps 3/2 -> 2q + 1; ConvCaps 3/1 -> r + 1: 4r + 8.
    centres = receptive_field_centres(3, [(5, 2), (1, 1), (3, 2), (3, 1)], 28)
    torch.testing.assert_close(centres, (torch.tensor([8.0, 12.0, 16.0]) + 0.5) / 28)


def test_coordinate_addition_adds_row_and_column_to_the_right_hand_column():
    rows, cols = torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4, 0.5])
    offsets = coordinate_offsets(rows, cols, types=2).view(2, 3, 2, 4, 4)   # (H, W, T, 4, 4)
    expected = torch.zeros(2, 3, 2, 4, 4)
    expected[..., 0, 3] = rows.view(2, 1, 1)
    expected[..., 1, 3] = cols.view(1, 3, 1)
    torch.testing.assert_close(offsets, expected)


def test_class_capsules_route_the_votes_plus_the_coordinate_offsets():
    torch.manual_seed(0)
    caps = ClassCaps(in_types=2, classes=3, iterations=3, positions=4)
    poses, acts = torch.randn(5, 2, 2, 2, 4, 4), torch.rand(5, 2, 2, 2)     # (B, H, W, T, ...)
    offsets = coordinate_offsets(torch.tensor([0.25, 0.75]), torch.tensor([0.25, 0.75]), 2)
    pose_out, a_out = caps(poses, acts, offsets)
    votes = transform_votes(poses.reshape(5, 8, 4, 4), caps.transforms.repeat(4, 1, 1, 1)) + offsets
    mu, a = em_routing(votes.transpose(1, 2), acts.reshape(5, 8), caps.beta_u, caps.beta_a, 3)
    torch.testing.assert_close(pose_out, mu.view(5, 3, 4, 4))
    torch.testing.assert_close(a_out, a)
    without, _ = caps(poses, acts)
    assert not torch.allclose(without, pose_out)


def test_conv_caps_shapes_with_strides_two_and_one():
    poses, acts = torch.randn(2, 7, 7, 3, 4, 4), torch.rand(2, 7, 7, 3)
    p, a = ConvCaps(3, 5, kernel=3, stride=2)(poses, acts)
    assert p.shape == (2, 3, 3, 5, 4, 4) and a.shape == (2, 3, 3, 5)
    p, a = ConvCaps(3, 5, kernel=3, stride=1)(poses, acts)
    assert p.shape == (2, 5, 5, 5, 4, 4) and a.shape == (2, 5, 5, 5)


def test_spread_loss_against_a_hand_computation():
    activations = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.4, 0.6]])
    labels = torch.tensor([0, 1])
    # Row 1 (a_t = 0.9): (0.5 - 0.4)^2 = 0.01 and max(0, 0.5 - 0.7) = 0.
    # Row 2 (a_t = 0.4): (0.5 - 0.1)^2 = 0.16 and (0.5 - (-0.2))^2 = 0.49.
    torch.testing.assert_close(spread_loss(activations, labels, margin=0.5),
                               torch.tensor((0.01 + 0.16 + 0.49) / 2))


def test_spread_loss_is_zero_once_every_wrong_class_is_a_margin_below():
    activations = torch.tensor([[0.95, 0.05, 0.0]])
    assert spread_loss(activations, torch.tensor([0]), margin=0.9).item() == 0.0


def test_margin_rises_linearly_from_0_2_to_0_9_then_stays_and_resumes_from_state():
    loss, out = SpreadLoss(ramp_steps=4), _FakeOutput(torch.rand(2, 10, requires_grad=True))
    margins = []
    for _ in range(6):
        margins.append(loss.margin)
        loss(out, None, torch.tensor([1, 2]))
    assert margins == pytest.approx([0.2, 0.375, 0.55, 0.725, 0.9, 0.9])
    with torch.no_grad():
        loss(out, None, torch.tensor([1, 2]))                 # evaluation does not count
    restored = SpreadLoss(ramp_steps=4)
    restored.load_state_dict(loss.state_dict())
    assert restored.margin == 0.9 and int(restored.steps) == 6


class _FakeOutput:
    def __init__(self, activations):
        self.activations = activations


def test_no_nan_or_inf_in_outputs_or_gradients_over_random_and_extreme_batches():
    model = MatrixCapsNet(**SMALL)
    loss = SpreadLoss()
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 1, 28, 28, generator=g) for _ in range(4)]
    batches += [torch.zeros(8, 1, 28, 28), torch.ones(8, 1, 28, 28)]
    for images in batches:
        model.zero_grad()
        out = model(images)
        value = loss(out, images, torch.arange(8) % 10)
        value.backward()
        assert torch.isfinite(out.activations).all() and torch.isfinite(out.poses).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_predict_returns_class_indices_and_rejects_bad_images():
    model = _tiny()
    predictions = model.predict(torch.rand(7, 1, 28, 28), batch_size=3)
    assert predictions.shape == (7,) and predictions.dtype == torch.int64
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 28, 28\)"):
        model.predict(torch.rand(7, 28, 28))
    with pytest.raises(ValueError, match="expected float images"):
        model.predict(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pixel values in \[0, 1\]"):
        model.predict(torch.full((2, 1, 28, 28), 255.0))


def test_bad_configuration_and_labels_raise():
    with pytest.raises(ValueError, match="too small"):
        MatrixCapsNet(image_size=12)
    activations = torch.rand(2, 10)
    with pytest.raises(ValueError, match="labels in 0..9"):
        spread_loss(activations, torch.tensor([0, 10]), 0.2)
    with pytest.raises(ValueError, match="integer class labels"):
        spread_loss(activations, torch.tensor([0.0, 1.0]), 0.2)
    with pytest.raises(ValueError, match=r"shape \(B, K\)"):
        spread_loss(torch.rand(10), torch.tensor([0]), 0.2)
    with pytest.raises(ValueError, match="ramp_steps"):
        SpreadLoss(ramp_steps=0)


@pytest.fixture(scope="module")
def sample() -> Digits:
    digits = load_sample("train")
    index = torch.arange(32) * (len(digits) // 32)           # every class is there
    return Digits(digits.images[index], digits.labels[index], digits.source)


def test_at_initialisation_the_class_receiving_most_vote_mass_is_the_most_active(sample):
    # beta_u starts at BETA_U_INIT so that mass lowers a parent's cost: the more vote mass a
    # class receives, the more active it is. (With beta_u = 0 the opposite holds at
    # initialisation, and training learns to classify by exclusion; chapter 08.)
    model = _seeded(dict(SMALL, iterations=2))
    with torch.no_grad():
        layers = model.capsule_layers(to_float(sample.images), return_assignments=True)
    _, activations, assignments = layers["class_caps"]
    a_children = layers["conv_caps2"][1].flatten(1)                     # (32, 3*3*16)
    mass = torch.einsum("ni,nij->nj", a_children, assignments[-1])      # (32, 10): sum_i a_i R_ij
    assert (mass.argmax(1) == activations.argmax(1)).all()
    correlation = torch.nn.functional.cosine_similarity(          # Pearson, per image: (32,)
        mass - mass.mean(1, keepdim=True), activations - activations.mean(1, keepdim=True), dim=1)
    assert (correlation > 0.5).all()


def test_small_matrix_capsnet_overfits_32_sample_images(sample):
    # The small configuration, not TINY: with beta_u starting at BETA_U_INIT, networks as narrow
    # as TINY can saturate one class's activation at 1 and stop learning.
    model = _seeded(dict(SMALL, iterations=2))
    train.fit(model, SpreadLoss(ramp_steps=20), sample, epochs=40, batch_size=32, lr=1e-2,
              lr_decay=1.0, max_shift=0, progress=False)
    assert train.evaluate(model, sample).accuracy == 1.0


def test_resuming_gives_the_weights_and_margin_of_an_uninterrupted_run(sample, tmp_path):
    def run(run_dir, **kwargs):
        model, loss = _tiny(), SpreadLoss(ramp_steps=10)
        train.fit(model, loss, sample, epochs=2, batch_size=8, run_dir=run_dir, progress=False,
                  **kwargs)
        return model, loss

    straight, straight_loss = run(tmp_path / "straight")
    run(tmp_path / "split", max_steps=3)                      # stops mid-epoch
    assert checkpoints.load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 3
    resumed, resumed_loss = run(tmp_path / "split", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                 resumed.state_dict().values()))
    assert int(resumed_loss.steps) == int(straight_loss.steps) == 8


def test_routing_in_checkpointed_chunks_gives_the_outputs_and_gradients_of_one_call(monkeypatch):
    torch.manual_seed(0)
    caps = ConvCaps(3, 4, kernel=3, stride=1, iterations=3).double()   # float64: exact sums
    poses = torch.randn(2, 5, 5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(2, 5, 5, 3, dtype=torch.float64)

    def outputs_and_gradients():
        pose_out, a_out = caps(poses, acts)
        (pose_out.square().sum() + a_out.sum()).backward()
        grads = [poses.grad.clone(), caps.weight.grad.clone(), caps.beta_a.grad.clone()]
        poses.grad = caps.weight.grad = caps.beta_u.grad = caps.beta_a.grad = None
        return [pose_out.detach(), a_out.detach(), *grads]

    whole = outputs_and_gradients()
    row_bytes = 27 * 4 * 16 * 8                               # one row of votes: I x J x 16 doubles
    monkeypatch.setattr(matrix_layers, "ROUTING_CHUNK_BYTES", 5 * row_bytes)   # 18 rows: 4 chunks
    for expected, got in zip(whole, outputs_and_gradients()):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _pixels_reaching_the_class_capsules(model: MatrixCapsNet) -> torch.Tensor:
    """(28, 28) bool: the pixels whose value changes the class activations (gradient != 0)."""
    images = torch.rand(2, 1, 28, 28, requires_grad=True)
    model(images).activations.sum().backward()
    return (images.grad.abs().sum((0, 1)) > 0)


def test_with_conv1_padding_every_pixel_reaches_the_class_capsules():
    model = _seeded(dict(TINY, conv1_padding=1))
    assert _pixels_reaching_the_class_capsules(model).all()
    layers = model.capsule_layers(torch.rand(1, 1, 28, 28))
    assert [layers[name][1].shape[1] for name in ("primary", "conv_caps1", "conv_caps2")] \
        == [13, 6, 4]


def test_without_padding_image_rows_and_columns_25_to_27_are_blind():
    reached = _pixels_reaching_the_class_capsules(_seeded(TINY))
    assert not reached[25:].any() and not reached[:, 25:].any()
    assert reached[:25, :25].all()


def test_receptive_field_centres_account_for_padding():
    # Conv 5x5/2 padded by 1 -> centre 2p + 1; ConvCaps 3/2 -> 2q + 1; 3/1 -> r + 1: 4r + 7.
    centres = receptive_field_centres(4, [(5, 2, 1), (1, 1, 0), (3, 2, 0), (3, 1, 0)], 28)
    torch.testing.assert_close(centres, (torch.tensor([7.0, 11.0, 15.0, 19.0]) + 0.5) / 28)


def test_last_inverse_temperature_sets_every_routed_layers_schedule():
    model = _seeded(dict(TINY, iterations=3, last_inverse_temperature=0.5))
    for layer in (model.conv_caps1, model.conv_caps2, model.class_caps):
        assert layer.inverse_temperatures[-1] == pytest.approx(0.5)
    assert model.config["last_inverse_temperature"] == 0.5
    assert "last_inverse_temperature" not in _seeded(TINY).config


def test_beta_u_init_sets_every_routed_layers_start_and_is_recorded():
    model = _seeded(dict(TINY, beta_u_init=0.0))
    for layer in (model.conv_caps1, model.conv_caps2, model.class_caps):
        assert torch.equal(layer.beta_u.detach(), torch.zeros_like(layer.beta_u))
    assert model.config["beta_u_init"] == 0.0
    assert (_seeded(TINY).class_caps.beta_u == BETA_U_INIT).all()
