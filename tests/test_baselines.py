import pytest
import torch

from capsutil import train
from capsutil.baselines import BaselineOutput, CapsNetBaseline, CrossEntropy, SmallBaseline
from capsutil.checkpoints import export, load_exported
from capsutil.data import Digits, load_sample
from capsutil.models import MATRIX_SIZES, MatrixCapsNet, build_loss, build_model, count_parameters


def test_the_baselines_match_the_parameter_counts_of_the_capsule_networks_they_face():
    capsnet = count_parameters(build_model("capsnet"))
    small_matrix = count_parameters(MatrixCapsNet(**MATRIX_SIZES["small"]))
    assert count_parameters(CapsNetBaseline()) == 8_217_725
    assert count_parameters(SmallBaseline()) == 68_082
    assert abs(count_parameters(CapsNetBaseline()) / capsnet - 1) < 0.01
    assert abs(count_parameters(SmallBaseline()) / small_matrix - 1) < 0.01


def test_the_baselines_are_registered_with_the_cross_entropy_loss():
    for name, cls in (("cnn_capsnet", CapsNetBaseline), ("cnn_small", SmallBaseline)):
        assert isinstance(build_model(name), cls)
        assert isinstance(build_loss(name), CrossEntropy)


def test_outputs_are_logits_per_class_and_predictions_their_argmax():
    torch.manual_seed(0)
    for model in (SmallBaseline(), CapsNetBaseline(hidden=8), SmallBaseline(image_size=40)):
        size = model.image_size
        output = model(torch.rand(3, 1, size, size))
        assert isinstance(output, BaselineOutput) and output.logits.shape == (3, 10)
        assert torch.equal(output.predictions, output.logits.argmax(1))


def test_cross_entropy_is_torchs_and_refuses_capsule_outputs():
    logits = torch.randn(4, 10)
    labels = torch.tensor([0, 3, 9, 1])
    loss = CrossEntropy()(BaselineOutput(logits), None, labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    capsule_output = build_model("capsnet")(torch.rand(1, 1, 28, 28))
    with pytest.raises(TypeError, match="logits"):
        CrossEntropy()(capsule_output, None, labels[:1])


def test_bad_images_raise_errors_that_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        SmallBaseline()(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="float"):
        SmallBaseline()(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small"):
        CapsNetBaseline(image_size=16)


def test_small_baseline_overfits_32_sample_images_with_the_training_loop():
    digits = load_sample("train")
    index = torch.arange(32) * (len(digits) // 32)
    sample = Digits(digits.images[index], digits.labels[index], digits.source)
    torch.manual_seed(0)
    model = SmallBaseline()
    train.fit(model, CrossEntropy(), sample, epochs=30, batch_size=32, lr=3e-3, lr_decay=1.0,
              max_shift=0, progress=False)
    assert train.evaluate(model, sample).accuracy == 1.0


def test_export_and_reload_give_the_same_predictions(tmp_path):
    torch.manual_seed(0)
    model = SmallBaseline().eval()
    json_path = export(model, tmp_path, recipe={"epochs": 0})
    reloaded = load_exported(json_path.with_suffix(".safetensors"))
    images = torch.rand(5, 1, 28, 28)
    assert isinstance(reloaded, SmallBaseline) and reloaded.config == model.config
    torch.testing.assert_close(reloaded(images).logits, model(images).logits, atol=2e-2, rtol=0)
