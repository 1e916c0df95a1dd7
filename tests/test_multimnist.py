"""capsutil.multimnist: overlapping pairs of digits of different classes, and their overlap."""
import itertools

import pytest
import torch

from capsutil import multimnist as mm
from capsutil.data import Digits, load_sample


@pytest.fixture(scope="module")
def digits():
    return load_sample("test")                       # 1,000 digits, 100 of each class


@pytest.fixture(scope="module")
def pairs(digits):
    return mm.make_pairs(digits, 2000, 0)


def test_pairs_have_the_documented_shapes_and_dtypes(pairs):
    assert len(pairs) == 2000
    assert pairs.images.shape == (2000, 1, 36, 36) and pairs.images.dtype == torch.uint8
    assert pairs.labels.shape == (2000, 2) and pairs.labels.dtype == torch.int64
    assert pairs.layers.shape == (2000, 2, 1, 36, 36) and pairs.layers.dtype == torch.uint8
    assert pairs.indices.shape == (2000, 2) and pairs.shifts.shape == (2000, 2, 2)


def test_both_labels_are_the_source_digits_labels_and_of_different_classes(digits, pairs):
    assert torch.equal(pairs.labels, digits.labels[pairs.indices])
    assert (pairs.labels[:, 0] != pairs.labels[:, 1]).all()
    # every class meets every other class as the second digit
    seen = {(int(a), int(b)) for a, b in pairs.labels}
    assert len(seen) == 90


def test_first_digits_run_through_the_set_before_repeating(digits, pairs):
    first = pairs.indices[:, 0]
    assert sorted(first[:1000].tolist()) == list(range(1000))
    assert sorted(first[1000:].tolist()) == list(range(1000))


def test_each_layer_is_its_digit_padded_by_4_and_shifted(digits, pairs):
    for i in range(0, 2000, 97):
        for k in range(2):
            dx, dy = pairs.shifts[i, k].tolist()
            layer = pairs.layers[i, k, 0]
            digit = digits.images[pairs.indices[i, k], 0]
            top, left = 4 + dy, 4 + dx
            assert torch.equal(layer[top:top + 28, left:left + 28], digit)
            assert int(layer.sum()) == int(digit.sum())                     # nothing else drawn


def test_shifts_reach_but_never_pass_4_pixels(pairs):
    assert pairs.shifts.min() == -4 and pairs.shifts.max() == 4
    assert len(torch.unique(pairs.shifts[:, 0, 0])) == 9                  # every shift is used
    assert not torch.equal(pairs.shifts[:, 0], pairs.shifts[:, 1])          # independent


def test_the_image_is_the_clipped_sum_of_the_layers_as_in_the_official_code(pairs):
    total = pairs.layers[:, 0].int() + pairs.layers[:, 1].int()
    assert torch.equal(pairs.images.int(), total.clamp(max=255))
    # where both digits are faint the sum is not the maximum
    faint = (pairs.layers[:, 0] > 0) & (pairs.layers[:, 1] > 0) & (total < 255)
    assert faint.any()
    assert (pairs.images[faint].int() > torch.maximum(pairs.layers[:, 0], pairs.layers[:, 1])
            [faint].int()).all()


def test_pairs_are_determined_by_their_seed(digits):
    a, b = mm.make_pairs(digits, 50, 11), mm.make_pairs(digits, 50, 11)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = mm.make_pairs(digits, 50, 12)
    assert not torch.equal(a.images, c.images)
    g = mm.make_pairs(digits, 50, torch.Generator().manual_seed(11))
    assert torch.equal(a.layers, g.layers)


def test_the_stream_starts_with_make_pairs_and_keeps_drawing_fresh_pairs(digits):
    stream = mm.pair_stream(digits, 32, 5)
    batches = list(itertools.islice(stream, 3))
    first = mm.make_pairs(digits, 32, 5)
    assert torch.equal(batches[0].images, first.images)
    assert torch.equal(batches[0].labels, first.labels)
    assert all(len(b) == 32 for b in batches)
    assert not torch.equal(batches[1].images, batches[2].images)
    again = list(itertools.islice(mm.pair_stream(digits, 32, 5), 3))
    assert all(torch.equal(x.images, y.images) for x, y in zip(batches, again))


def test_a_larger_max_shift_such_as_the_readmes_6_is_honoured(digits):
    wide = mm.make_pairs(digits, 500, 1, max_shift=6)
    assert wide.shifts.min() == -6 and wide.shifts.max() == 6


def test_select_keeps_pairs_and_their_records_together(pairs):
    picked = pairs.select(torch.tensor([5, 2]))
    assert torch.equal(picked.images, pairs.images[[5, 2]])
    assert torch.equal(picked.shifts, pairs.shifts[[5, 2]]) and len(picked) == 2


# ----------------------------------------------------------------------------------------------
# Overlap statistics on hand-made pairs
# ----------------------------------------------------------------------------------------------

def hand_made(*pairs_of_layers) -> mm.MultiDigits:
    """MultiDigits from (first, second) 36x36 uint8 layers."""
    layers = torch.stack([torch.stack([a, b])[:, None] for a, b in pairs_of_layers])
    images = (layers[:, 0].int() + layers[:, 1].int()).clamp(max=255).to(torch.uint8)
    labels = torch.tensor([[0, 1]] * len(pairs_of_layers))
    return mm.MultiDigits(images, labels, layers, "hand-made")


def block(top, left, height, width, value=255):
    layer = torch.zeros(36, 36, dtype=torch.uint8)
    layer[top:top + height, left:left + width] = value
    return layer


def test_overlap_is_0_for_disjoint_1_for_identical_and_a_share_in_between():
    a = block(0, 0, 10, 10)
    cases = hand_made((a, block(20, 20, 5, 5)), (a, a.clone()), (a, block(0, 5, 10, 10)),
                      (block(0, 0, 1, 1, 0), block(0, 0, 1, 1, 0)))
    result = mm.overlap(cases)
    assert result.dtype == torch.float32
    assert result[:3].tolist() == [0.0, 1.0, pytest.approx(50 / 150)]
    assert torch.isnan(result[3])                                           # no ink at all


def test_overlap_counts_as_ink_only_pixels_above_the_threshold():
    faint, strong = block(0, 0, 10, 10, value=100), block(0, 0, 10, 10)
    case = hand_made((faint, strong))
    assert torch.isclose(mm.overlap(case), torch.tensor(0.0))               # 100/255 < 0.5
    assert torch.isclose(mm.overlap(case, threshold=0.2), torch.tensor(1.0))


def test_bounding_box_overlap_on_hand_made_boxes():
    a = block(0, 0, 10, 10)
    ring = a.clone()
    ring[2:8, 2:8] = 0                                    # a hollow square has the same box
    half = block(5, 0, 10, 10)                            # rows 5-14: half of a's rows
    inside = block(2, 2, 4, 5)                            # 20 pixels, inside a
    cases = hand_made((a, block(20, 20, 5, 5)), (a, ring), (a, half), (a, inside))
    first = mm.bounding_box_overlap(cases)
    assert first.tolist() == [0.0, 1.0, 0.5, pytest.approx(20 / 100)]
    assert mm.bounding_box_overlap(cases, "smaller").tolist() == [0.0, 1.0, 0.5, 1.0]
    union = mm.bounding_box_overlap(cases, "union").tolist()
    assert union == [0.0, 1.0, pytest.approx(50 / 150), pytest.approx(20 / 100)]
    assert mm.ink_boxes(cases)[2].tolist() == [[0, 0, 9, 9], [5, 0, 14, 9]]


def test_bounding_box_overlap_is_nan_without_ink_and_real_pairs_overlap_a_lot(pairs):
    empty = hand_made((block(0, 0, 10, 10), block(0, 0, 1, 1, 0)))
    assert torch.isnan(mm.bounding_box_overlap(empty)).all()
    assert mm.ink_boxes(empty)[0, 1].tolist() == [-1, -1, -1, -1]
    real = mm.bounding_box_overlap(pairs)
    assert 0.4 < real.mean() < 0.95 and real.min() >= 0 and real.max() <= 1
    assert 0 < mm.overlap(pairs).mean() < real.mean()


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3, 2.0, True, "10"])
def test_a_number_of_pairs_that_is_not_a_positive_integer_is_refused(digits, n):
    with pytest.raises(ValueError, match=f"expected the number of pairs n as a positive "
                                         f"integer, got {n!r}"):
        mm.make_pairs(digits, n, 0)


@pytest.mark.parametrize("batch_size", [0, 1.5, False])
def test_a_bad_batch_size_is_refused_when_the_stream_is_made(digits, batch_size):
    with pytest.raises(ValueError, match="expected batch_size as a positive integer"):
        mm.pair_stream(digits, batch_size, 0)


@pytest.mark.parametrize("max_shift", [-1, 36, 4.0, True])
def test_a_bad_max_shift_is_refused(digits, max_shift):
    with pytest.raises(ValueError, match="expected max_shift as a whole number of pixels in "
                                         "\\[0, 35\\]"):
        mm.make_pairs(digits, 5, 0, max_shift=max_shift)


def test_digits_of_a_single_class_cannot_make_pairs(digits):
    sevens = digits.select(torch.nonzero(digits.labels == 7).flatten())
    with pytest.raises(ValueError, match="pairs need digits of two different classes; the 100 "
                                         "digits given have the class\\(es\\) \\[7\\]"):
        mm.make_pairs(sevens, 5, 0)


@pytest.mark.parametrize("bad, message", [
    (Digits(torch.zeros(4, 1, 40, 40, dtype=torch.uint8), torch.arange(4), "40x40"),
     "expected 28x28 MNIST digits, got \\(40, 40\\) images"),
    (Digits(torch.zeros(4, 1, 28, 28), torch.arange(4), "float"),
     "expected uint8 images in \\[0, 255\\], got dtype torch.float32"),
    ("digits", "expected a capsutil.data.Digits, got str"),
])
def test_bad_digits_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        mm.make_pairs(bad, 5, 0)


def test_bad_seed_is_refused(digits):
    with pytest.raises(ValueError, match="expected a seed as an integer"):
        mm.make_pairs(digits, 5, -1)


def test_overlap_statistics_refuse_bad_input(pairs):
    with pytest.raises(ValueError, match="expected a MultiDigits, got Tensor"):
        mm.overlap(pairs.images)
    with pytest.raises(ValueError, match="expected an ink threshold in \\[0, 1\\) \\(pixel / "
                                         "255\\), got 1.0"):
        mm.overlap(pairs, threshold=1.0)
    with pytest.raises(ValueError, match="unknown reference box 'second'; expected one of "
                                         "\\['first', 'smaller', 'union'\\]"):
        mm.bounding_box_overlap(pairs, "second")
    flat = mm.MultiDigits(pairs.images, pairs.labels, pairs.layers[:, :, 0], "no channel")
    with pytest.raises(ValueError, match="expected uint8 layers of shape \\(N, 2, 1, H, W\\)"):
        mm.bounding_box_overlap(flat)
