"""capsutil.multimnist_baseline: the CNN that faces CapsNet on MultiMNIST."""
import json
from types import SimpleNamespace

import pytest
import torch

from capsutil import checkpoints, train
from capsutil.data import load_sample
from capsutil.models import build_loss, build_model, count_parameters
from capsutil.multimnist_baseline import (MultiDigitBaseline, PairBaselineOutput,
                                          PairCrossEntropy)
from capsutil.multimnist_capsnet import evaluate_pairs, make_pair_digits

TINY = dict(conv_channels=8, hidden=16)


@pytest.fixture(scope="module")
def pairs():
    return make_pair_digits(load_sample("train"), 16, 0)


def _tiny(seed: int = 0) -> MultiDigitBaseline:
    torch.manual_seed(seed)
    return MultiDigitBaseline(**TINY)


def test_the_baseline_matches_the_parameter_count_of_capsnet_multi_and_is_registered():
    baseline, capsnet = build_model("cnn_multi"), build_model("capsnet_multi")
    assert isinstance(baseline, MultiDigitBaseline)
    assert isinstance(build_loss("cnn_multi"), PairCrossEntropy)
    assert count_parameters(baseline) == 11_373_870
    assert abs(count_parameters(baseline) / count_parameters(capsnet) - 1) < 0.002
    assert baseline.config["image_size"] == 36 and baseline.trained_on_pairs


def test_predictions_are_the_two_highest_scores_in_ascending_order():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [9.0, -1.0, 8.5, 0.0]])
    assert PairBaselineOutput(logits).predictions.tolist() == [[1, 3], [0, 2]]


def test_the_loss_is_binary_cross_entropy_with_both_classes_present():
    logits = torch.randn(3, 10)
    labels = torch.tensor([[0, 4], [2, 9], [5, 6]])
    target = torch.zeros(3, 10)
    target[[0, 0, 1, 1, 2, 2], [0, 4, 2, 9, 5, 6]] = 1.0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss = PairCrossEntropy()(PairBaselineOutput(logits), None, labels,
                              layers=torch.rand(3, 2, 1, 36, 36))      # layers are not used
    torch.testing.assert_close(loss, expected)


def test_a_tiny_baseline_learns_16_pairs_through_fit(pairs):
    model, loss_fn = _tiny(), build_loss("cnn_multi")
    before = evaluate_pairs(model, pairs).both.correct
    history = train.fit(model, loss_fn, pairs, epochs=60, batch_size=16, lr=3e-3,
                        lr_decay=1.0, max_shift=0, progress=False)
    assert history.loss[-1] < history.loss[0] / 4
    assert evaluate_pairs(model, pairs).both.correct == len(pairs) > before


def test_bad_input_raises_errors_that_name_the_problem(pairs):
    model = _tiny()
    with pytest.raises(ValueError, match=r"\(N, 1, 36, 36\)"):
        model(torch.rand(2, 1, 28, 28))
    output = PairBaselineOutput(torch.randn(2, 10))
    with pytest.raises(ValueError, match="got the class 3 twice for image 1"):
        PairCrossEntropy()(output, None, torch.tensor([[0, 1], [3, 3]]))
    with pytest.raises(ValueError, match=r"expected labels of shape \(B, 2\)"):
        PairCrossEntropy()(output, None, torch.tensor([0, 1]))
    capsule_output = SimpleNamespace(lengths=torch.rand(2, 10))
    with pytest.raises(TypeError, match="logits"):
        PairCrossEntropy()(capsule_output, None, torch.tensor([[0, 1], [2, 3]]))


def test_the_command_line_trains_it_on_pairs_and_exports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPSUTIL_DATA", str(tmp_path / "empty"))
    train.main(["cnn_multi", "--epochs", "1", "--batch-size", "8", "--run-dir",
                str(tmp_path / "run"), "--eager", "--pairs", "32", "--max-steps", "2",
                "--config", json.dumps(TINY), "--select", "last", "--export",
                str(tmp_path / "weights")])
    out = capsys.readouterr().out
    assert "train 32 | val 417 | test 1,000 |" in out and "test set, scored once:" in out
    record = json.loads((tmp_path / "weights" / "cnn_multi.json").read_text())
    assert record["model"] == "cnn_multi" and record["metrics"]["test_size"] == 1000
    loaded = checkpoints.load_exported(tmp_path / "weights" / "cnn_multi.safetensors")
    assert isinstance(loaded, MultiDigitBaseline) and loaded.config == {
        **TINY, "image_size": 36, "in_channels": 1, "classes": 10}
