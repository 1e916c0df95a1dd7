"""capsutil.segmentation: each digit of a MultiMNIST pair drawn from its own capsule, and scored."""
import pytest
import torch

from capsutil.data import load_sample
from capsutil.multimnist_capsnet import MultiCapsNet, make_pair_digits
from capsutil.segmentation import (SegmentationScores, reconstruct_each, segment,
                                   segmentation_scores, two_colour_image)

TINY = dict(conv_channels=16, primary_maps=8, primary_dims=4, digit_dims=8,
            decoder_hidden=(32, 64))


@pytest.fixture(scope="module")
def pairs():
    return make_pair_digits(load_sample("test"), 6, 0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiCapsNet(**TINY).eval()


def test_each_reconstruction_uses_only_its_own_capsule(model, pairs):
    seen = []
    hook = model.decoder.net.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone()))
    classes = torch.tensor([[3, 8], [8, 3], [0, 9], [1, 2], [5, 4], [7, 6]])
    try:
        drawings = reconstruct_each(model, pairs.images, classes)
    finally:
        hook.remove()
    masked = seen[-2:]                                   # after the forward's own two drawings
    for k, decoder_input in enumerate(masked):
        decoder_input = decoder_input.view(6, 10, 8)                     # (N, K, E)
        keep = torch.nn.functional.one_hot(classes[:, k], 10).bool()     # (N, K)
        assert not decoder_input[~keep].any()
        assert decoder_input[keep].abs().sum() > 0
    poses = model(pairs.images.float() / 255).poses
    for k in range(2):
        expected = model.decoder(poses, classes[:, k]).view(6, 36, 36)
        torch.testing.assert_close(drawings[:, k], expected)


def test_reconstructions_are_float_in_unit_range_in_the_order_of_the_classes(model, pairs):
    classes = pairs.labels
    drawings = reconstruct_each(model, pairs.images, classes, batch_size=4)
    assert drawings.shape == (6, 2, 36, 36) and drawings.dtype == torch.float32
    assert 0 <= drawings.min() and drawings.max() <= 1
    swapped = reconstruct_each(model, pairs.images, classes.flip(1))
    torch.testing.assert_close(swapped, drawings.flip(1))
    assert reconstruct_each(model, pairs.images[:0], classes[:0]).shape == (0, 2, 36, 36)


def test_the_model_keeps_its_training_mode(pairs):
    torch.manual_seed(0)
    net = MultiCapsNet(**TINY).train()
    reconstruct_each(net, pairs.images[:2], pairs.labels[:2])
    assert net.training


def test_segment_assigns_each_pixel_to_the_brighter_reconstruction():
    drawings = torch.tensor([[[[0.9, 0.2], [0.5, 0.0]],
                              [[0.1, 0.7], [0.5, 0.05]]]])               # (1, 2, 2, 2)
    assert segment(drawings).tolist() == [[[0, 1], [0, 1]]]              # tie -> digit 0
    assert segment(drawings, background=0.1).tolist() == [[[0, 1], [0, -1]]]
    random = torch.rand(3, 2, 5, 5)
    owner = segment(random)
    brighter = random.gather(1, owner[:, None]).squeeze(1)
    assert torch.equal(brighter, random.amax(dim=1))


def _layers() -> torch.Tensor:
    """Two digits alone on a 4x4 canvas: digit 0 the left column, digit 1 the top row."""
    layers = torch.zeros(1, 2, 1, 4, 4)
    layers[0, 0, 0, :, 0] = 1.0
    layers[0, 1, 0, 0, :] = 1.0
    return layers


def test_perfect_drawings_score_zero_error_full_overlap_and_every_pixel_right():
    layers = _layers()
    scores = segmentation_scores(layers[:, :, 0].clone(), layers)
    assert isinstance(scores, SegmentationScores)
    assert torch.equal(scores.own_error, torch.zeros(1, 2))
    assert (scores.other_error > 0).all() and scores.own_closer.all()
    assert torch.equal(scores.iou, torch.ones(1, 2))
    assert scores.pixels_right.tolist() == [1.0]
    assert not scores.swapped.any() and not scores.merged.any()
    uint8 = segmentation_scores(layers[:, :, 0].clone(), (255 * layers).to(torch.uint8))
    assert torch.equal(uint8.own_error, scores.own_error)


def test_swapped_and_merged_drawings_are_recognised():
    layers = _layers()
    swapped = segmentation_scores(layers[:, :, 0].flip(1), layers)
    assert swapped.swapped.tolist() == [True] and not swapped.own_closer.any()
    assert swapped.pixels_right.tolist() == [0.0]
    assert torch.equal(swapped.iou[0, 0], torch.tensor(1 / 7))          # 1 shared of 7 inked
    whole = layers[:, :, 0].sum(dim=1).clamp(max=1)                      # (1, 4, 4)
    merged = segmentation_scores(torch.stack([whole, layers[0, 1]], dim=1), layers)
    assert merged.merged.tolist() == [True] and not merged.swapped.any()
    summary = merged.summary()
    assert set(summary) == {"own_error", "other_error", "own_closer", "swapped", "merged",
                            "iou", "pixels_right"}
    assert summary["merged"] == 1.0 and summary["swapped"] == 0.0


def test_two_colour_image_paints_each_digit_in_its_colour_on_white():
    layers = _layers()[:, :, 0]                                          # (1, 2, 4, 4)
    rgb = two_colour_image(layers, colours=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)))
    assert rgb.shape == (1, 4, 4, 3)
    assert rgb[0, 3, 3].tolist() == [1.0, 1.0, 1.0]                      # background: white
    assert rgb[0, 2, 0].tolist() == [1.0, 0.0, 0.0]                      # digit 0 alone: red
    assert rgb[0, 0, 2].tolist() == [0.0, 0.0, 1.0]                      # digit 1 alone: blue
    assert rgb[0, 0, 0].tolist() == [0.0, 0.0, 0.0]                      # both: dark


def test_bad_shapes_are_named(model, pairs):
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 1, 36, 36\), "
                                         r"got \(6, 1, 28, 28\)"):
        reconstruct_each(model, torch.zeros(6, 1, 28, 28, dtype=torch.uint8), pairs.labels)
    with pytest.raises(ValueError, match=r"expected uint8 images .* of torch.float32"):
        reconstruct_each(model, pairs.images.float(), pairs.labels)
    with pytest.raises(ValueError, match=r"expected labels of shape \(B, 2\).*got \(6,\)"):
        reconstruct_each(model, pairs.images, pairs.labels[:, 0])
    with pytest.raises(ValueError, match="expected 6 pairs of labels"):
        reconstruct_each(model, pairs.images, pairs.labels[:5])
    with pytest.raises(ValueError, match="two different classes"):
        reconstruct_each(model, pairs.images, torch.tensor([[1, 1]] * 6))
    with pytest.raises(ValueError, match="expected a MultiCapsNet"):
        reconstruct_each(torch.nn.Linear(2, 2), pairs.images, pairs.labels)
    with pytest.raises(ValueError, match=r"expected a positive integer batch_size, got 0"):
        reconstruct_each(model, pairs.images, pairs.labels, batch_size=0)
    with pytest.raises(ValueError, match=r"expected float reconstructions of shape "
                                         r"\(N, 2, H, W\).*got \(2, 36, 36\)"):
        segment(torch.rand(2, 36, 36))
    with pytest.raises(ValueError, match=r"got \(2, 2, 36, 36\) of torch.uint8"):
        segment(torch.zeros(2, 2, 36, 36, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected layers of shape \(2, 2, 1, 36, 36\).*"
                                         r"got \(2, 2, 36, 36\)"):
        segmentation_scores(torch.rand(2, 2, 36, 36), torch.rand(2, 2, 36, 36))
    with pytest.raises(ValueError, match=r"expected an ink threshold in \[0, 1\), got 1.5"):
        segmentation_scores(torch.rand(1, 2, 4, 4), _layers(), threshold=1.5)
    with pytest.raises(ValueError, match="expected two RGB colours"):
        two_colour_image(torch.rand(1, 2, 4, 4), colours=((1, 0, 0),))
