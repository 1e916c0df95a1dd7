import pytest
import torch

from capsutil.data import load_sample, to_float
from capsutil.matrix_init import active_fractions, calibrate_half_active
from capsutil.models import CapsNet, MatrixCapsNet

SMALL_PADDED = dict(A=64, B=8, C=16, D=16, iterations=2, conv1_padding=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    digits = load_sample("train")
    return to_float(digits.images[:64])                        # (64, 1, 28, 28)


def test_calibration_makes_about_half_of_each_routed_layer_active(images):
    torch.manual_seed(0)
    model = MatrixCapsNet(**SMALL_PADDED)
    before = active_fractions(model, images)
    factors = calibrate_half_active(model, images)
    after = active_fractions(model, images)
    assert set(factors) == {"conv_caps1", "conv_caps2", "class_caps"}
    for name in factors:
        assert abs(after[name] - 0.5) < 0.1, (name, before[name], after[name])
    assert any(abs(before[name] - 0.5) > 0.2 for name in factors)   # it had work to do


def test_calibration_generalises_to_other_images_of_the_same_data(images):
    torch.manual_seed(1)
    model = MatrixCapsNet(**SMALL_PADDED)
    calibrate_half_active(model, images[:32])
    held_out = active_fractions(model, images[32:])
    assert all(0.3 < held_out[name] < 0.7 for name in ("conv_caps1", "conv_caps2"))


def test_a_larger_scale_of_the_votes_makes_fewer_capsules_active(images):
    torch.manual_seed(0)
    model = MatrixCapsNet(**SMALL_PADDED)
    shares = []
    for factor in (1.0, 30.0, 1000.0):
        with torch.no_grad():
            model.conv_caps1.weight.mul_(factor)
        shares.append(active_fractions(model, images)["conv_caps1"])
        with torch.no_grad():
            model.conv_caps1.weight.div_(factor)
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1]


def test_calibration_rejects_other_models_and_impossible_targets(images):
    with pytest.raises(ValueError, match="MatrixCapsNet"):
        calibrate_half_active(CapsNet(), images)
    with pytest.raises(ValueError, match="target"):
        calibrate_half_active(MatrixCapsNet(**SMALL_PADDED), images, target=1.0)
