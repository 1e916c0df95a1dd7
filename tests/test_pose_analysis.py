"""Chapter 06's measurements of what the pose dimensions encode (capsutil.pose_analysis)."""
import math

import pytest
import torch

from capsutil import pose_analysis as pa
from capsutil import widgets
from capsutil.explorer import decode_capsules
from capsutil.layers import Decoder


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return Decoder(caps=10, dims=4, hidden=(16, 32)).eval()


def bar(slant_right: bool = True) -> torch.Tensor:
    """A thin diagonal (bottom left to top right) or vertical bar, (1, 1, 28, 28)."""
    image = torch.zeros(1, 1, 28, 28)
    for t in range(6, 22):
        image[0, 0, t, 27 - t if slant_right else 14] = 1.0
    return image


def test_natural_spread_is_the_standard_deviation_within_each_class():
    torch.manual_seed(0)
    poses = torch.randn(60, 4)
    classes = torch.arange(60) % 3
    spread = pa.natural_spread(poses, classes, n_classes=3)
    assert spread.shape == (3, 4)
    torch.testing.assert_close(spread[1], poses[1::3].std(dim=0))


def test_natural_spread_needs_two_capsules_of_every_class():
    with pytest.raises(ValueError, match="at least 2 capsules"):
        pa.natural_spread(torch.randn(3, 4), torch.tensor([0, 0, 1]), n_classes=2)


def test_spread_sweep_with_unit_scales_is_the_papers_sweep(decoder):
    torch.manual_seed(1)
    poses, classes = 0.3 * torch.randn(3, 4), torch.tensor([0, 7, 9])
    steps = [-0.25, 0.0, 0.25]
    ours = pa.spread_sweep(decoder, poses, classes, torch.ones(3, 4), steps, chunk=5)
    torch.testing.assert_close(ours, widgets.pose_sweep(decoder, poses, classes, steps))


def test_spread_sweep_moves_each_dimension_by_its_own_scale(decoder):
    torch.manual_seed(2)
    poses, classes = 0.3 * torch.randn(2, 4), torch.tensor([3, 4])
    scales = torch.rand(2, 4) + 0.1
    sweep = pa.spread_sweep(decoder, poses, classes, scales, [-2.0, 0.0, 2.0])
    assert sweep.shape == (2, 4, 3, 784)
    moved = poses[1].clone()
    moved[2] -= 2 * scales[1, 2]
    expected = decode_capsules(decoder, moved[None], classes[1:])[0]
    torch.testing.assert_close(sweep[1, 2, 0], expected)
    unmoved = decode_capsules(decoder, poses, classes)                # (2, 784)
    torch.testing.assert_close(sweep[:, :, 1], unmoved[:, None].expand(2, 4, 784))


def test_spread_sweep_rejects_bad_scales(decoder):
    poses, classes = torch.zeros(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="scales of shape"):
        pa.spread_sweep(decoder, poses, classes, torch.ones(4), [1.0])
    with pytest.raises(ValueError, match="positive scales"):
        pa.spread_sweep(decoder, poses, classes, torch.zeros(2, 4), [1.0])


def test_shape_measures_of_a_45_degree_bar():
    m = pa.shape_measures(bar()[0, 0])
    assert m["slant"].item() == pytest.approx(45.0, abs=1e-4)
    assert m["ink"].item() == 16
    assert m["width"].item() == pytest.approx(m["height"].item())


def test_keeps_ink_flags_rows_with_a_fading_end():
    ink = torch.tensor([[10.0, 10.0, 9.0],       # both ends keep >= 70%
                        [6.0, 10.0, 12.0],       # left end fades
                        [10.0, 10.0, 6.9]])      # right end fades
    assert pa.keeps_ink(ink, centre=1, threshold=0.7).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="threshold"):
        pa.keeps_ink(ink, centre=1, threshold=0.0)
    with pytest.raises(ValueError, match="centre index"):
        pa.keeps_ink(ink, centre=3)


def test_class_quantiles_skip_entries_not_kept():
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [5.0, 50.0]])
    classes = torch.tensor([0, 0, 0, 1])
    keep = torch.tensor([[True, True], [True, False], [True, True], [False, True]])
    q = pa.class_quantiles(values, classes, n_classes=3, q=(0.5,), keep=keep)
    assert q.shape == (1, 3, 2)
    assert q[0, 0].tolist() == [2.0, 20.0]           # median of 10 and 30
    assert math.isnan(q[0, 1, 0]) and q[0, 1, 1] == 50.0
    assert torch.isnan(q[0, 2]).all()                 # no image of class 2


def test_integer_shift_moves_the_centroid_exactly():
    image = bar()
    moved = pa.affine(image, right=2, down=-1)
    before, after = pa.shape_measures(image[0, 0]), pa.shape_measures(moved[0, 0])
    assert after["column"].item() == pytest.approx(before["column"].item() + 2, abs=1e-4)
    assert after["row"].item() == pytest.approx(before["row"].item() - 1, abs=1e-4)
    assert after["ink"].item() == pytest.approx(16.0, abs=1e-4)


def test_positive_rotation_turns_the_digit_counterclockwise():
    upright = bar(slant_right=False)                              # vertical bar
    turned = pa.affine(upright, degrees=15)
    slant = pa.shape_measures(turned[0, 0])["slant"].item()
    assert slant == pytest.approx(-15.0, abs=2.0)                 # top leans to the left
    torch.testing.assert_close(pa.affine(upright), upright)       # identity


def test_thicken_grows_strokes_and_keeps_blank_images_blank():
    image = bar()
    thick = pa.thicken(image)
    assert thick.sum() > 2.5 * image.sum()
    assert (thick >= image).all()
    assert pa.thicken(torch.zeros(2, 1, 28, 28)).abs().max() == 0
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        pa.thicken(torch.zeros(28, 28))


def test_top_share_is_one_on_an_axis_and_k_over_e_when_even():
    z = torch.tensor([[0.0, -3.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]])
    torch.testing.assert_close(pa.top_share(z), torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(pa.top_share(z, k=2), torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="k <= E"):
        pa.top_share(z, k=5)


def test_random_frames_are_orthonormal_and_vary():
    frames = pa.random_frames(50, 6, torch.Generator().manual_seed(0))
    assert frames.shape == (50, 6, 6)
    gram = frames @ frames.transpose(-2, -1)
    torch.testing.assert_close(gram, torch.eye(6).expand(50, 6, 6), atol=1e-5, rtol=0)
    assert (frames[0] - frames[1]).abs().max() > 0.1


def test_random_frames_see_an_axis_aligned_change_as_spread_out():
    torch.manual_seed(3)
    frames = pa.random_frames(400, 16, torch.Generator().manual_seed(1))
    on_axis = torch.zeros(1, 16)
    on_axis[0, 5] = 2.0
    shares = pa.frame_shares(on_axis, frames)                      # (400, 1)
    assert shares.shape == (400, 1)
    assert pa.top_share(on_axis).item() == 1.0
    assert shares.median().item() < 0.5                           # no frame lines up with it
    # a frame's own first direction is all on one axis of that frame
    torch.testing.assert_close(pa.frame_shares(frames[7, :1], frames[7:8]), torch.ones(1, 1))
