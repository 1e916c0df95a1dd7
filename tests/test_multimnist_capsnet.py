"""capsutil.multimnist_capsnet: CapsNet on MultiMNIST, its loss, its training data and its score."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from capsutil import checkpoints, train
from capsutil.data import load_sample
from capsutil.models import CapsNet, build_loss, build_model, count_parameters
from capsutil.multimnist import make_pairs
from capsutil.multimnist_capsnet import (MultiCapsNet, MultiCapsNetOutput, MultiDigitLoss,
                                         PairDigits, evaluate_pairs, make_pair_digits,
                                         pair_margin_loss, pair_splits)

TINY = dict(conv_channels=16, primary_maps=8, primary_dims=4, digit_dims=8,
            decoder_hidden=(32, 64))


@pytest.fixture(scope="module")
def digits():
    return load_sample("train")


@pytest.fixture(scope="module")
def pairs(digits) -> PairDigits:
    return make_pair_digits(digits, 16, 0)


def _tiny(seed: int = 0) -> MultiCapsNet:
    torch.manual_seed(seed)
    return MultiCapsNet(**TINY)


def _float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def test_the_full_model_sees_3200_primary_capsules_on_36x36_images_and_is_registered():
    model = build_model("capsnet_multi")
    assert isinstance(model, MultiCapsNet) and isinstance(model, CapsNet)
    assert model.config["image_size"] == 36 and model.digits.weight.shape[:2] == (3200, 10)
    assert count_parameters(model) == 11_361_808
    assert isinstance(build_loss("capsnet_multi"), MultiDigitLoss)


def test_forward_gives_lengths_poses_both_reconstructions_and_two_predictions(pairs):
    model = _tiny().train()
    images, labels = _float(pairs.images[:4]), pairs.labels[:4]
    output = model(images, labels)
    assert output.lengths.shape == (4, 10) and output.poses.shape == (4, 10, 8)
    assert output.reconstructions.shape == (4, 2, 36 * 36)
    assert output.predictions.shape == (4, 2) and output.predictions.dtype == torch.int64
    assert torch.equal(output.decoded, labels)                       # training: the labels
    model.eval()
    output = model(images, labels)
    assert torch.equal(output.decoded, output.predictions)           # otherwise: predicted
    assert model(images).reconstructions.shape == (4, 2, 36 * 36)
    empty = model(torch.empty(0, 1, 36, 36))
    assert empty.predictions.shape == (0, 2) and empty.reconstructions.shape == (0, 2, 1296)


def test_predictions_are_the_two_longest_capsules_in_ascending_order(pairs):
    lengths = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0], [0.3, 0.1, 0.7, 0.2, 0.95]])
    output = MultiCapsNetOutput(lengths, torch.zeros(2, 5, 4), torch.zeros(2, 2, 4),
                                torch.zeros(2, 2, dtype=torch.long))
    assert output.predictions.tolist() == [[1, 3], [2, 4]]
    model_output = _tiny().eval()(_float(pairs.images))
    top = model_output.lengths.topk(2, dim=1).indices.sort(dim=1).values
    assert torch.equal(model_output.predictions, top)
    assert (model_output.predictions[:, 0] < model_output.predictions[:, 1]).all()


def test_the_margin_loss_has_both_present_classes_as_targets():
    lengths = torch.tensor([[0.95, 0.5, 0.3], [0.2, 0.95, 0.85]])
    labels = torch.tensor([[0, 1], [2, 1]])                           # any order
    # image 0: class 0 present, long enough (0); class 1 present (0.9 - 0.5)^2 = 0.16;
    #          class 2 absent 0.5 (0.3 - 0.1)^2 = 0.02                            -> 0.18
    # image 1: class 1 present (0); class 2 present (0.9 - 0.85)^2 = 0.0025;
    #          class 0 absent 0.5 (0.2 - 0.1)^2 = 0.005                           -> 0.0075
    expected = (0.18 + 0.0075) / 2
    assert pair_margin_loss(lengths, labels).item() == pytest.approx(expected)
    reconstructions = torch.zeros(2, 2, 4)
    layers = torch.zeros(2, 2, 1, 2, 2)
    layers[0, 0] = 1.0                                                # 4 pixels off by 1: 4
    layers[0, 1, 0, 0] = 0.5                                          # a row, 2 pixels: 0.5
    layers[1, 1, 0, 1, 0] = 1.0                                       # 1 pixel off by 1: 1
    output = SimpleNamespace(lengths=lengths, reconstructions=reconstructions)
    parts = MultiDigitLoss(reconstruction_scale=1.0).parts(output, None, labels, layers)
    assert parts["margin"].item() == pytest.approx(expected)
    assert parts["reconstruction"].item() == pytest.approx((4 + 0) / 2 + (0.5 + 1) / 2)
    loss = MultiDigitLoss()(output, None, labels, layers=layers)
    assert loss.item() == pytest.approx(expected + 0.0005 * 2.75)


def test_each_reconstruction_is_compared_with_its_own_digits_layer():
    lengths = torch.full((1, 3), 0.5)
    reconstructions = torch.zeros(1, 2, 4)
    reconstructions[0, 0] = 1.0                                       # draws digit 0 only
    layers = torch.zeros(1, 2, 1, 2, 2)
    layers[0, 0] = 1.0
    output = SimpleNamespace(lengths=lengths, reconstructions=reconstructions)
    loss = MultiDigitLoss(reconstruction_scale=1.0)
    labels = torch.tensor([[0, 2]])
    assert loss.parts(output, None, labels, layers)["reconstruction"].item() == 0.0
    swapped = layers.flip(1)
    assert loss.parts(output, None, labels, swapped)["reconstruction"].item() == 8.0


def test_each_digit_is_reconstructed_from_its_own_capsule_alone(pairs):
    model = _tiny()
    seen = []
    model.decoder.net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images, labels = _float(pairs.images[:3]), torch.tensor([[2, 7], [7, 2], [0, 9]])
    output = model.train()(images, labels)
    masks = list(seen)                                                # the decoder's two inputs
    assert len(masks) == 2
    for k, masked in enumerate(masks):
        masked = masked.view(3, 10, 8)                                # (B, K, E)
        keep = torch.nn.functional.one_hot(labels[:, k], 10).bool()  # (B, K)
        assert torch.equal(masked[keep], output.poses[keep])
        assert not masked[~keep].any()
        assert torch.equal(output.reconstructions[:, k],
                           model.decoder(output.poses, labels[:, k]))
    seen.clear()
    output = model.eval()(images)
    assert len(seen) == 2
    for k, masked in enumerate(seen):
        keep = torch.nn.functional.one_hot(output.predictions[:, k], 10).bool()
        assert not masked.view(3, 10, 8)[~keep].any()


def test_pair_digits_sort_each_pairs_labels_and_keep_each_layer_with_its_label(digits):
    multi = make_pairs(digits, 200, 3)
    pairs = PairDigits.from_multi(multi)
    swapped = multi.labels[:, 0] > multi.labels[:, 1]
    assert swapped.any() and (~swapped).any()
    assert (pairs.labels[:, 0] < pairs.labels[:, 1]).all()
    assert torch.equal(pairs.images, multi.images)
    assert torch.equal(pairs.layers[swapped], multi.layers[swapped].flip(1))
    assert torch.equal(pairs.layers[~swapped], multi.layers[~swapped])
    index = torch.tensor([5, 1])
    targets = pairs.targets(index)
    assert list(targets) == ["layers"] and targets["layers"].shape == (2, 2, 1, 36, 36)
    assert torch.equal(targets["layers"], pairs.layers[index].float() / 255)
    assert len(pairs.select(index)) == 2 and len(pairs.subset(7)) == 7


def test_validation_pairs_are_the_same_for_every_training_seed(digits):
    train_a, val_a = pair_splits(digits.subset(300), digits.select(torch.arange(300, 400)), 50, 0)
    train_b, val_b = pair_splits(digits.subset(300), digits.select(torch.arange(300, 400)), 50, 1)
    assert len(train_a) == 50 and len(val_a) == 100
    assert torch.equal(val_a.images, val_b.images)
    assert not torch.equal(train_a.images, train_b.images)


def test_a_tiny_multicapsnet_overfits_16_pairs_through_fit(pairs):
    model = _tiny()
    history = train.fit(model, MultiDigitLoss(), pairs, epochs=40, batch_size=16, lr=3e-3,
                        lr_decay=1.0, max_shift=0, progress=False)
    assert history.loss[-1] < history.loss[0] / 10
    assert history.train_accuracy[-1] == 1.0                         # both digits, every pair
    score = evaluate_pairs(model, pairs)
    assert score.both.correct == 16 and score.per_digit.correct == 32
    assert train.evaluate(model, pairs).accuracy == 1.0


class _Fixed(nn.Module):
    """A model that predicts the given classes, to check the counting."""

    def __init__(self, predictions: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.fixed = predictions

    def forward(self, images, labels=None):
        return SimpleNamespace(predictions=self.fixed[:len(images)])


def test_a_pair_counts_as_right_only_when_both_classes_are():
    labels = torch.tensor([[1, 3], [2, 5], [0, 9], [4, 6]])
    predicted = torch.tensor([[1, 3], [2, 4], [7, 8], [4, 6]])
    assert train.count_correct(predicted, labels) == 2
    assert train.count_correct(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == 2
    pairs = SimpleNamespace(images=torch.zeros(4, 1, 36, 36, dtype=torch.uint8),
                            labels=labels.flip(1))                  # any order of the labels
    score = evaluate_pairs(_Fixed(predicted), pairs)
    assert (score.both.correct, score.both.n) == (2, 4)
    assert (score.per_digit.correct, score.per_digit.n) == (5, 8)
    assert str(score).startswith("both digits right: 50.00%")


def test_export_and_reload_give_the_same_model(pairs, tmp_path):
    model = _tiny().eval()
    json_path = checkpoints.export(model, tmp_path, recipe={}, half=False)
    loaded = checkpoints.load_exported(tmp_path / "capsnet_multi.safetensors")
    assert isinstance(loaded, MultiCapsNet) and loaded.config == model.config
    assert json.loads(json_path.read_text())["model"] == "capsnet_multi"
    images = _float(pairs.images)
    a, b = model(images), loaded(images)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.reconstructions, b.reconstructions)
    checkpoints.export(model, tmp_path / "half", recipe={})
    half = checkpoints.load_exported(tmp_path / "half" / "capsnet_multi.safetensors")
    torch.testing.assert_close(half(images).lengths, a.lengths, atol=1e-2, rtol=0)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([[1, 2], [3, 3], [4, 5]]), "two different classes in each pair of labels, "
                                             "got the class 3 twice for image 1"),
    (torch.tensor([1, 2, 3]), r"expected labels of shape \(B, 2\).*got \(3,\)"),
    (torch.tensor([[1, 2, 3]] * 3), r"expected labels of shape \(B, 2\).*got \(3, 3\)"),
    (torch.tensor([[1, 2], [3, 4]]), "expected 3 pairs of labels, one per image, got 2"),
    (torch.tensor([[1.0, 2.0]] * 3), "expected integer class labels, got torch.float32"),
    (torch.tensor([[1, 12]] * 3), r"expected labels in 0..9, got values from 1 to 12"),
])
def test_bad_labels_raise_value_error_naming_the_problem(pairs, labels, message):
    model = _tiny()
    with pytest.raises(ValueError, match=message):
        model.train()(_float(pairs.images[:3]), labels)
    output = SimpleNamespace(lengths=torch.rand(3, 10), reconstructions=torch.rand(3, 2, 1296))
    with pytest.raises(ValueError, match=message):
        MultiDigitLoss()(output, None, labels, layers=torch.rand(3, 2, 1, 36, 36))


def test_bad_images_layers_and_data_raise_value_error_naming_the_problem(pairs, digits):
    model = _tiny()
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 36, 36\), got "
                                         r"\(N, 1, 28, 28\)"):
        model(torch.rand(2, 1, 28, 28))
    output = SimpleNamespace(lengths=torch.rand(2, 10), reconstructions=torch.rand(2, 2, 1296))
    labels = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="needs the two digits of each image alone"):
        MultiDigitLoss()(output, None, labels)
    with pytest.raises(ValueError, match=r"expected layers of shape \(2, 2, 1, H, W\) with "
                                         r"H\*W = 1296.*got \(2, 1, 36, 36\)"):
        MultiDigitLoss()(output, None, labels, layers=torch.rand(2, 1, 36, 36))
    with pytest.raises(ValueError, match="expected float layers in"):
        MultiDigitLoss()(output, None, labels, layers=pairs.layers[:2])
    with pytest.raises(ValueError, match=r"ascending order .* got \(5, 2\) for pair 0"):
        PairDigits(pairs.images[:1], torch.tensor([[5, 2]]), pairs.layers[:1], "x")
    with pytest.raises(ValueError, match=r"expected uint8 layers of shape \(1, 2, 1, 36, 36\)"):
        PairDigits(pairs.images[:1], pairs.labels[:1], pairs.layers[:1, :1], "x")
    with pytest.raises(ValueError, match="at least 2 classes"):
        MultiCapsNet(classes=1)
    with pytest.raises(ValueError, match="predicts two classes per image"):
        evaluate_pairs(CapsNet(image_size=36, **TINY), pairs)
    with pytest.raises(ValueError, match="train it with max_shift=0, got 2"):
        train.fit(_tiny(), MultiDigitLoss(), pairs, epochs=1, progress=False)


def test_the_command_line_trains_on_pairs_of_the_shipped_sample_and_exports(tmp_path,
                                                                            monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("CAPSUTIL_DATA", str(tmp_path / "empty"))
    args = ["capsnet_multi", "--epochs", "1", "--batch-size", "4", "--run-dir",
            str(tmp_path / "run"), "--eager", "--pairs", "64", "--config", json.dumps(TINY)]
    train.main(args + ["--max-steps", "1"])
    train.main(args + ["--max-steps", "2", "--resume", "--select", "last", "--export",
                       str(tmp_path / "weights")])
    out = capsys.readouterr().out
    assert out.count("provenance: mode") == 2
    assert "data MultiMNIST pairs of MNIST sample shipped with capsutil (shifts up to 4 px)" in out
    assert "train 64 | val 417 | test 0 |" in out and "train 64 | val 417 | test 1,000 |" in out
    assert "test set, scored once:" in out
    checkpoint = checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["step"] == 2 and checkpoint["model"] == "capsnet_multi"
    assert checkpoint["recipe"]["max_shift"] == 0 and checkpoint["recipe"]["train_size"] == 64
    record = json.loads((tmp_path / "weights" / "capsnet_multi.json").read_text())
    assert record["metrics"]["test_size"] == 1000
    with pytest.raises(SystemExit) as exit:                     # other pairs: another recipe
        train.main(args[:-4] + ["--pairs", "32", "--config", json.dumps(TINY), "--resume"])
    assert exit.value.code == 2 and "train_size: checkpoint 64, now 32" in capsys.readouterr().err


def test_only_the_pair_model_takes_pairs_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["capsnet_multi", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--pairs N" in out and "(default: 60000)" in out and "image_size = 36" in out
    with pytest.raises(SystemExit) as exit:
        train.main(["capsnet", "--epochs", "1", "--run-dir", str(tmp_path), "--pairs", "5"])
    assert exit.value.code == 2 and "unrecognized arguments: --pairs" in capsys.readouterr().err
