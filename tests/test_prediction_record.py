"""capsutil.prediction_record: test predictions of weights that are not shipped."""
import json

import pytest
import torch

from capsutil import prediction_record
from capsutil.baselines import SmallBaseline
from capsutil.checkpoints import export, load_exported
from capsutil.data import load_sample
from capsutil.multimnist_baseline import MultiDigitBaseline
from capsutil.multimnist_capsnet import evaluate_pairs, pairs_of_test_digits
from capsutil.train import evaluate


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSUTIL_DATA", str(tmp_path / "empty"))   # the shipped sample


def _exported(model, folder):
    metrics = {"test_data": "placeholder"}
    return export(model.eval(), folder, recipe={}, metrics=metrics)


def test_a_digit_models_record_holds_its_predictions_on_every_test_digit(tmp_path, no_mnist):
    torch.manual_seed(0)
    json_path = _exported(SmallBaseline(), tmp_path / "weights")
    out = prediction_record.write_record(json_path, tmp_path / "record.json")
    record = json.loads(out.read_text())
    assert record["sha256"] == json.loads(json_path.read_text())["sha256"]
    assert "not shipped" in record["note"] and not (tmp_path / "record.safetensors").exists()
    predictions = prediction_record.decode(record)
    model = load_exported(json_path.with_suffix(".safetensors"))
    expected = evaluate(model, load_sample("test")).predictions
    assert predictions.shape == (1000,) and torch.equal(predictions, expected)


def test_a_pair_models_record_holds_two_classes_per_test_pair(tmp_path, no_mnist):
    torch.manual_seed(0)
    json_path = _exported(MultiDigitBaseline(conv_channels=8, hidden=16), tmp_path)
    record = json.loads(prediction_record.write_record(json_path, tmp_path / "r.json")
                        .read_text())
    predictions = prediction_record.decode(record)
    model = load_exported(json_path.with_suffix(".safetensors"))
    expected = evaluate_pairs(model, pairs_of_test_digits(load_sample("test"))).predictions
    assert predictions.shape == (1000, 2) and torch.equal(predictions, expected)
    assert len(record["test_predictions"]) == 2000


def test_changed_weights_and_bad_records_give_clear_errors(tmp_path, no_mnist, capsys):
    json_path = _exported(SmallBaseline(), tmp_path)
    weights = json_path.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="corrupt or was changed"):
        prediction_record.write_record(json_path, tmp_path / "r.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit) as exit:
        prediction_record.main([str(tmp_path / "other.json"), "--out", str(tmp_path / "r")])
    assert exit.value.code == 2 and "is not an export record" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no test_predictions"):
        prediction_record.decode({"model": "cnn_small"})
    with pytest.raises(ValueError, match="classes 0-9"):
        prediction_record.encode(torch.tensor([3, 12]))
