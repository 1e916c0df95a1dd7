"""Specifications of the public boundaries: prediction, pretrained weights and losses answer bad
input with a ValueError or TypeError that names the problem, or handle the case."""
import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch

from capsutil import checkpoints, train
from capsutil.data import Digits
from capsutil.losses import (CapsNetLoss, SpreadLoss, margin_loss, reconstruction_loss,
                             spread_loss)
from capsutil.models import CapsNet, MatrixCapsNet
from capsutil.zoo import WEIGHTS_DIR, pretrained

TINY_CAPSNET = dict(conv_channels=8, primary_maps=4, primary_dims=4, digit_dims=6,
                    decoder_hidden=(16, 32))
TINY_MATRIX = dict(A=8, B=4, C=4, D=4, iterations=2)


@pytest.fixture(scope="module")
def models():
    """A tiny CapsNet and a tiny MatrixCapsNet, in eval mode."""
    torch.manual_seed(0)
    return [CapsNet(**TINY_CAPSNET).eval(), MatrixCapsNet(**TINY_MATRIX).eval()]


@pytest.mark.parametrize("index", [0, 1])
def test_nan_or_infinite_images_are_refused_instead_of_predicting_class_0(models, index):
    images = torch.rand(3, 1, 28, 28)
    images[1, 0, 5, 5] = float("nan")
    images[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="expected finite pixel values in \\[0, 1\\], got 2 NaN "
                                         "or infinite values"):
        models[index].predict(images)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", [0, 1])
def test_images_of_any_float_dtype_are_cast_to_the_model_dtype(models, index, dtype):
    images = torch.rand(4, 1, 28, 28).to(dtype)
    predicted = models[index].predict(images)
    assert torch.equal(predicted, models[index].predict(images.float()))
    assert models[index](images).predictions.shape == (4,)


@pytest.mark.parametrize("index", [0, 1])
def test_an_empty_batch_gives_an_empty_result(models, index):
    empty = torch.empty(0, 1, 28, 28)
    predicted = models[index].predict(empty)
    assert predicted.shape == (0,) and predicted.dtype == torch.int64
    assert models[index](empty).predictions.shape == (0,)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8"])
def test_prediction_and_evaluation_refuse_a_batch_size_that_is_not_a_positive_integer(
        models, batch_size):
    with pytest.raises(ValueError, match=f"expected a positive integer batch_size, "
                                         f"got {batch_size!r}"):
        models[0].predict(torch.rand(2, 1, 28, 28), batch_size=batch_size)
    digits = Digits(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                    "zeros")
    with pytest.raises(ValueError, match="expected a positive integer batch_size"):
        train.evaluate(models[1], digits, batch_size=batch_size)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_pretrained_on_a_missing_gpu_says_so_instead_of_torchs_error():
    with pytest.raises(ValueError, match="device 'cuda' is not available: this PyTorch sees 0 "
                                         "CUDA GPU"):
        pretrained("matrix", device="cuda")


def test_pretrained_refuses_a_device_name_torch_does_not_know():
    with pytest.raises(ValueError, match="expected a device such as 'cpu' or 'cuda', got 'gpu0'"):
        pretrained("matrix", device="gpu0")


@pytest.fixture
def shipped_copy(tmp_path):
    """A copy of the shipped matrix weights and their record, to tamper with."""
    for name in ("matrix.json", "matrix.safetensors"):
        (tmp_path / name).write_bytes((WEIGHTS_DIR / name).read_bytes())
    return tmp_path


def _edit_record(folder, **changes):
    record = json.loads((folder / "matrix.json").read_text())
    record.update(changes)
    (folder / "matrix.json").write_text(json.dumps(record))


@pytest.mark.parametrize("sha256", [None, "", "0" * 63, "G" * 64, 12])
def test_the_record_cannot_switch_off_the_sha256_check(shipped_copy, sha256):
    _edit_record(shipped_copy, sha256=sha256)
    with pytest.raises(ValueError, match="expected the sha256 of its weights as 64 lowercase hex "
                                         "digits.*cannot be switched off"):
        pretrained("matrix", weights_dir=shipped_copy)


def test_the_record_cannot_point_outside_the_weights_folder(shipped_copy):
    outside = shipped_copy.parent / "elsewhere.safetensors"
    outside.write_bytes((shipped_copy / "matrix.safetensors").read_bytes())
    os.symlink(outside, shipped_copy / "link.safetensors")
    for file in ("../elsewhere.safetensors", str(outside), "sub/matrix.safetensors",
                 "link.safetensors", "", None):
        _edit_record(shipped_copy, file=file)
        with pytest.raises(ValueError, match="expected its file to be a file name inside"):
            pretrained("matrix", weights_dir=shipped_copy)


def test_shipped_weights_are_safetensors_and_hold_no_pickle():
    for name in ("capsnet", "matrix"):
        record = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        data = (WEIGHTS_DIR / record["file"]).read_bytes()
        assert record["file"] == f"{name}.safetensors" and record["bytes"] == len(data)
        tensors, metadata = checkpoints.read_weights(data, WEIGHTS_DIR / record["file"])
        assert metadata["model"] == name and json.loads(metadata["config"]) == record["config"]
        assert all(t.dtype == torch.float16 for t in tensors.values())
    assert not list(WEIGHTS_DIR.glob("*.pt"))


def test_a_pickle_in_place_of_the_weights_is_refused(shipped_copy):
    path = shipped_copy / "matrix.safetensors"
    torch.save({"state_dict": {}}, path)
    _edit_record(shipped_copy, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match="matrix.safetensors is truncated or corrupt"):
        pretrained("matrix", weights_dir=shipped_copy)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

INTEGER_DTYPES = [torch.int32, torch.int16, torch.int8, torch.uint8]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_losses_accept_labels_of_any_integer_dtype(dtype):
    torch.manual_seed(0)
    scores, labels = torch.rand(4, 10), torch.tensor([0, 3, 9, 3])
    torch.testing.assert_close(margin_loss(scores, labels.to(dtype)), margin_loss(scores, labels))
    torch.testing.assert_close(spread_loss(scores, labels.to(dtype), 0.5),
                               spread_loss(scores, labels, 0.5))


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_training_forward_and_loss_accept_labels_of_any_integer_dtype(dtype):
    torch.manual_seed(0)
    model, images = CapsNet(**TINY_CAPSNET).train(), torch.rand(2, 1, 28, 28)
    labels = torch.tensor([1, 7])
    out = model(images, labels.to(dtype))
    torch.testing.assert_close(CapsNetLoss()(out, images, labels.to(dtype)),
                               CapsNetLoss()(out, images, labels))


def test_losses_of_an_empty_batch_raise_instead_of_returning_nan():
    empty_labels = torch.empty(0, dtype=torch.long)
    with pytest.raises(ValueError, match="capsule lengths for at least one example"):
        margin_loss(torch.empty(0, 10), empty_labels)
    with pytest.raises(ValueError, match="class activations for at least one example"):
        spread_loss(torch.empty(0, 10), empty_labels, 0.2)
    with pytest.raises(ValueError, match="at least one image"):
        reconstruction_loss(torch.empty(0, 784), torch.empty(0, 1, 28, 28))


def test_a_loss_given_the_other_models_output_raises_a_type_error_naming_both():
    capsnet_output = SimpleNamespace(lengths=torch.rand(2, 10), reconstructions=torch.rand(2, 784))
    matrix_output = SimpleNamespace(activations=torch.rand(2, 10), poses=torch.rand(2, 10, 4, 4))
    images, labels = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="CapsNetLoss expects the output of CapsNet \\(with lengths,"
                                        " reconstructions\\), got a SimpleNamespace without "
                                        "lengths, reconstructions"):
        CapsNetLoss()(matrix_output, images, labels)
    with pytest.raises(TypeError, match="SpreadLoss expects the output of MatrixCapsNet"):
        SpreadLoss()(capsnet_output, images, labels)
