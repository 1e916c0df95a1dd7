import hashlib
import json

import pytest
import torch

from capsutil import checkpoints
from capsutil.data import load_sample, to_float
from capsutil.models import CapsNet, MatrixCapsNet
from capsutil.zoo import WEIGHTS_DIR, info, pretrained

TINY = dict(conv_channels=8, primary_maps=4, primary_dims=4, digit_dims=6, decoder_hidden=(16, 32))
RECIPE = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "lr_decay": 0.9}


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = CapsNet(**TINY)
    checkpoints.export(model, tmp_path, recipe=RECIPE, metrics={"test_accuracy": 0.5})
    return model, tmp_path


def test_pretrained_returns_the_exported_model_in_eval_mode_with_float16_rounded_weights(exported):
    model, folder = exported
    loaded = pretrained("capsnet", weights_dir=folder)
    assert isinstance(loaded, CapsNet) and not loaded.training
    assert loaded.config == model.config
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float(), rtol=0, atol=0)
    images = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(loaded(images).lengths, model.eval()(images).lengths,
                               rtol=1e-2, atol=1e-3)


def test_export_records_sha256_config_recipe_and_metrics_in_json_beside_the_weights(exported):
    model, folder = exported
    record = json.loads((folder / "capsnet.json").read_text())
    assert record["file"] == "capsnet.safetensors" and record["dtype"] == "float16"
    assert record["sha256"] == hashlib.sha256((folder / "capsnet.safetensors").read_bytes()).hexdigest()
    assert record["bytes"] == (folder / "capsnet.safetensors").stat().st_size
    assert record["config"] == model.config and record["recipe"] == RECIPE
    assert record["metrics"] == {"test_accuracy": 0.5}
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    assert info("capsnet", weights_dir=folder) == record


def test_changed_weights_fail_the_sha256_check(exported):
    _, folder = exported
    data = bytearray((folder / "capsnet.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (folder / "capsnet.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="capsnet.safetensors is corrupt or was changed: its sha256 is"):
        pretrained("capsnet", weights_dir=folder)


def test_truncated_weights_with_a_matching_record_still_raise_clearly(exported):
    _, folder = exported
    path = folder / "capsnet.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    record = json.loads((folder / "capsnet.json").read_text())
    record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "capsnet.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="capsnet.safetensors is truncated or corrupt"):
        pretrained("capsnet", weights_dir=folder)


def test_missing_weights_raise_file_not_found_saying_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained weights for 'capsnet'.*capsutil.train capsnet"):
        pretrained("capsnet", weights_dir=tmp_path)


def test_a_record_without_its_weights_file_raises_file_not_found(exported):
    _, folder = exported
    (folder / "capsnet.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights file .*capsnet.safetensors not found"):
        pretrained("capsnet", weights_dir=folder)


def test_a_corrupt_record_raises_value_error(exported):
    _, folder = exported
    (folder / "capsnet.json").write_text("{not json")
    with pytest.raises(ValueError, match="weights record .*capsnet.json is corrupt"):
        pretrained("capsnet", weights_dir=folder)


def test_unknown_model_names_are_rejected():
    with pytest.raises(ValueError, match="unknown model 'resnet'; expected one of"):
        pretrained("resnet")


@pytest.mark.skipif(not (WEIGHTS_DIR / "capsnet.json").is_file(), reason="no shipped weights yet")
def test_shipped_capsnet_weights_pass_their_integrity_check_and_have_the_paper_size():
    model = pretrained("capsnet")
    assert sum(p.numel() for p in model.parameters()) == 8_215_568
    assert model.config == CapsNet().config
    assert 0 < info("capsnet")["metrics"]["test_accuracy"] <= 1


def test_an_exported_matrix_capsnet_comes_back_with_the_same_predictions(tmp_path):
    torch.manual_seed(0)
    model = MatrixCapsNet(A=8, B=4, C=4, D=4, iterations=2).eval()
    checkpoints.export(model, tmp_path, recipe=RECIPE, metrics={"test_accuracy": 0.5})
    loaded = pretrained("matrix", weights_dir=tmp_path)
    assert isinstance(loaded, MatrixCapsNet) and not loaded.training
    assert loaded.config == model.config
    images = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(loaded(images).activations, model(images).activations,
                               rtol=1e-2, atol=2e-3)


@pytest.fixture(scope="module")
def sample_test():
    test = load_sample("test")
    return to_float(test.images), test.labels


def _accuracy(model, images, labels) -> float:
    return (model.predict(images) == labels).float().mean().item()


@pytest.fixture(scope="module")
def float32_accuracy(sample_test):
    """The accuracy of a shipped model on the sample's test split, measured once per model."""
    measured = {}

    def accuracy(name: str) -> float:
        if name not in measured:
            measured[name] = _accuracy(pretrained(name), *sample_test)
        return measured[name]
    return accuracy


@pytest.mark.skipif(not (WEIGHTS_DIR / "matrix.json").is_file(), reason="no shipped weights yet")
def test_shipped_matrix_capsnet_passes_its_integrity_check_and_classifies_the_sample(
        float32_accuracy):
    model = pretrained("matrix")
    assert model.config["A"] == 64 and model.config["B"] == 8
    assert sum(p.numel() for p in model.parameters()) == 68_444
    accuracy = float32_accuracy("matrix")
    assert accuracy >= 0.97, f"shipped matrix capsules classify the sample at {accuracy:.2%}"


@pytest.mark.parametrize("name", ["capsnet", "matrix"])
def test_shipped_models_under_cpu_bfloat16_autocast_lose_at_most_half_a_point(
        sample_test, float32_accuracy, name):
    full = float32_accuracy(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _accuracy(pretrained(name), *sample_test)
    assert abs(mixed - full) <= 0.005, f"{name}: float32 {full:.2%}, bfloat16 autocast {mixed:.2%}"
