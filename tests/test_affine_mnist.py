"""capsutil.affine_mnist: expanded MNIST, affNIST-style warps and the affNIST reader."""
import math

import numpy as np
import pytest
import scipy.io
import torch

from capsutil import affine_mnist as am
from capsutil.data import Digits, load_sample

ONLY = dict(rotation_degrees=0.0, shear=0.0, scale=(1.0, 1.0), translate=False)


@pytest.fixture(scope="module")
def sample():
    return load_sample("test").subset(300)


def synthetic(pattern: torch.Tensor, n: int) -> Digits:
    """``n`` copies of one 28x28 uint8 pattern, labelled 0."""
    images = pattern.to(torch.uint8).expand(n, 1, 28, 28).contiguous()
    return Digits(images, torch.zeros(n, dtype=torch.long), "synthetic")


def bar(horizontal: bool = True) -> torch.Tensor:
    """A 3-pixel-thick, 20-pixel-long bar through the middle of the 28x28 frame."""
    pattern = torch.zeros(28, 28)
    if horizontal:
        pattern[13:16, 4:24] = 255
    else:
        pattern[4:24, 13:16] = 255
    return pattern


def moments(images: torch.Tensor):
    """Ink-weighted means and central second moments (x right, y down) per image (N,)."""
    w = images[:, 0].double()                                               # (N, H, W)
    ys, xs = torch.meshgrid(torch.arange(w.shape[1]).double(), torch.arange(w.shape[2]).double(),
                            indexing="ij")
    mass = w.sum(dim=(1, 2))
    mx, my = (w * xs).sum(dim=(1, 2)) / mass, (w * ys).sum(dim=(1, 2)) / mass
    dx, dy = xs - mx[:, None, None], ys - my[:, None, None]
    cxx = (w * dx * dx).sum(dim=(1, 2)) / mass
    cyy = (w * dy * dy).sum(dim=(1, 2)) / mass
    cxy = (w * dx * dy).sum(dim=(1, 2)) / mass
    return cxx, cyy, cxy


# ----------------------------------------------------------------------------------------------
# Expanded MNIST and the centred placement
# ----------------------------------------------------------------------------------------------

def test_centre_pads_the_28x28_frame_by_6_pixels_on_every_side(sample):
    placed = am.centre(sample)
    assert placed.images.shape == (300, 1, 40, 40) and placed.images.dtype == torch.uint8
    assert torch.equal(placed.images[:, :, 6:34, 6:34], sample.images)
    assert int(placed.images.sum()) == int(sample.images.sum())              # border is black
    assert torch.equal(placed.labels, sample.labels)


def test_expand_pastes_each_digit_whole_at_an_offset_from_0_to_12():
    dot = torch.zeros(28, 28)
    dot[0, 0] = 255                                       # the frame's corner marks the offset
    out = am.expand(synthetic(dot, 2000), 0).images
    assert out.shape == (2000, 1, 40, 40) and out.dtype == torch.uint8
    flat = out[:, 0].flatten(1).argmax(dim=1)
    rows, cols = flat // 40, flat % 40
    assert (out[:, 0].flatten(1) > 0).sum(dim=1).eq(1).all()
    assert rows.min() == 0 and rows.max() == 12 and cols.min() == 0 and cols.max() == 12
    assert len(torch.unique(rows * 13 + cols)) > 150                          # of 169 offsets


def test_expand_keeps_every_pixel_of_real_digits(sample):
    out = am.expand(sample, 5).images
    assert torch.equal(out.flatten(1).sum(1), sample.images.flatten(1).sum(1))
    for i in range(0, 300, 37):
        hits = [(r, c) for r in range(13) for c in range(13)
                if torch.equal(out[i, :, r:r + 28, c:c + 28], sample.images[i])]
        assert hits, f"digit {i} is not a pasted copy of its source"


def test_expand_is_determined_by_its_seed(sample):
    a, b = am.expand(sample, 3), am.expand(sample, 3)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, am.expand(sample, 4).images)
    assert torch.equal(a.images, am.expand(sample, torch.Generator().manual_seed(3)).images)


# ----------------------------------------------------------------------------------------------
# random_affine
# ----------------------------------------------------------------------------------------------

def test_random_affine_draws_each_parameter_across_its_range(sample):
    out, params = am.random_affine(sample, 0)
    assert out.images.shape == (300, 1, 40, 40) and out.images.dtype == torch.uint8
    assert set(params) == {"rotation", "shear", "scale_x", "scale_y", "dx", "dy"}
    for name, low, high in [("rotation", -20, 20), ("shear", -0.2, 0.2),
                            ("scale_x", 0.8, 1.2), ("scale_y", 0.8, 1.2)]:
        value = params[name]
        assert value.shape == (300,) and value.min() >= low and value.max() <= high, name
        assert value.min() < low + 0.1 * (high - low) and value.max() > high - 0.1 * (high - low)
    assert not torch.equal(params["scale_x"], params["scale_y"])            # independent axes


def test_rotation_of_a_bar_is_measured_back_anticlockwise():
    digits = synthetic(bar(), 40)
    out, params = am.random_affine(digits, 1, am.AffineRanges(**{**ONLY,
                                                                 "rotation_degrees": 20.0}))
    cxx, cyy, cxy = moments(out.images)
    # the bar's long axis, in degrees anticlockwise on screen (y points down, hence the minus)
    measured = -0.5 * torch.rad2deg(torch.atan2(2 * cxy, cxx - cyy))
    assert (measured - params["rotation"].double()).abs().max() < 1.0
    assert params["rotation"].abs().max() > 10


def test_scale_of_a_bar_is_measured_back_on_each_axis():
    ranges = am.AffineRanges(**{**ONLY, "scale": (0.8, 1.2)})
    out, params = am.random_affine(synthetic(bar(), 40), 2, ranges)
    cxx, _, _ = moments(out.images)
    cxx0, _, _ = moments(am.centre(synthetic(bar(), 1)).images)
    assert torch.allclose(torch.sqrt(cxx / cxx0), params["scale_x"].double(), atol=0.02)
    out, params = am.random_affine(synthetic(bar(horizontal=False), 40), 2, ranges)
    _, cyy, _ = moments(out.images)
    _, cyy0, _ = moments(am.centre(synthetic(bar(horizontal=False), 1)).images)
    assert torch.allclose(torch.sqrt(cyy / cyy0), params["scale_y"].double(), atol=0.02)


def test_scale_comes_before_rotation_so_a_bar_keeps_its_drawn_angle_and_length():
    ranges = am.AffineRanges(**{**ONLY, "rotation_degrees": 20.0, "scale": (0.8, 1.2)})
    out, params = am.random_affine(synthetic(bar(), 60), 6, ranges)
    cxx, cyy, cxy = moments(out.images)
    measured = -0.5 * torch.rad2deg(torch.atan2(2 * cxy, cxx - cyy))
    assert (measured - params["rotation"].double()).abs().max() < 1.0
    long_axis = (cxx + cyy) / 2 + torch.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
    cxx0, _, _ = moments(am.centre(synthetic(bar(), 1)).images)
    assert torch.allclose(torch.sqrt(long_axis / cxx0), params["scale_x"].double(), atol=0.02)


def test_affine_matrices_compose_scale_then_shear_then_rotation():
    one = torch.ones(1)
    turn = am.affine_matrices(90 * one, 0 * one, 0.5 * one, one)[0]
    assert torch.allclose(turn @ torch.tensor([1.0, 0.0]).double(),
                          torch.tensor([0.0, -0.5]).double(), atol=1e-12)       # x unit: up
    skew = am.affine_matrices(0 * one, 0.3 * one, one, one)[0]
    assert torch.allclose(skew @ torch.tensor([0.0, 1.0]).double(),
                          torch.tensor([0.3, 1.0]).double())                   # down: right


def test_shear_tilts_a_vertical_bar_by_the_drawn_factor_whatever_the_scales():
    ranges = am.AffineRanges(**{**ONLY, "shear": 0.2, "scale": (0.8, 1.2)})
    out, params = am.random_affine(synthetic(bar(horizontal=False), 40), 3, ranges)
    cxx, cyy, cxy = moments(out.images)
    slope = cxy / cyy                                  # x change per pixel down the bar
    assert (slope - params["shear"].double()).abs().max() < 0.02


def test_the_warp_keeps_all_ink_of_a_digit_that_fills_its_frame():
    square = synthetic(torch.full((28, 28), 255), 30)
    out, params = am.random_affine(square, 8, am.AffineRanges(translate=False), canvas=80)
    area = params["scale_x"].double() * params["scale_y"].double()   # shear and turns keep area
    ink = out.images.double().flatten(1).sum(1) / (255 * 28 * 28)
    assert torch.allclose(ink, area, rtol=0.02)


def test_translation_alone_shifts_whole_pixels_and_loses_no_ink(sample):
    ranges = am.AffineRanges(**{**ONLY, "translate": True})
    out, params = am.random_affine(sample, 4, ranges)
    shifted = am.translate(am.centre(sample).images, params["dx"], params["dy"])
    assert torch.equal(out.images, shifted)
    assert torch.equal(out.images.flatten(1).sum(1), sample.images.flatten(1).sum(1))
    assert params["dx"].min() < -5 and params["dx"].max() > 5                 # uses the room
    assert params["dy"].min() < -5 and params["dy"].max() > 5


def test_the_translated_digit_keeps_all_its_ink_inside_the_canvas(sample):
    out, params = am.random_affine(sample, 5)
    fixed = am.AffineRanges(translate=False)
    big, same = am.random_affine(sample, 5, fixed, canvas=80)  # the same warps, nothing cut
    for name in ("rotation", "shear", "scale_x", "scale_y"):
        assert torch.equal(params[name], same[name])
    assert same["dx"].eq(0).all() and same["dy"].eq(0).all()
    assert torch.equal(out.images.flatten(1).sum(1), big.images.flatten(1).sum(1))
    # the 40x40 image is the 80x80 one's window at the centre, moved by (dx, dy)
    corner = torch.full((300,), 20)
    window = am.window(big.images, corner - params["dy"], corner - params["dx"], 40)
    assert torch.equal(out.images, window)
    ink = out.images[:, 0] > 0
    edge = ink[:, 0].any(1) | ink[:, -1].any(1) | ink[:, :, 0].any(1) | ink[:, :, -1].any(1)
    assert edge.sum() > 10                              # placements reach the edges


def test_random_affine_is_determined_by_its_seed(sample):
    a, pa = am.random_affine(sample, 7)
    b, pb = am.random_affine(sample, torch.Generator().manual_seed(7))
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c, pc = am.random_affine(sample, 8)
    assert not torch.equal(a.images, c.images) and not torch.equal(pa["rotation"], pc["rotation"])


# ----------------------------------------------------------------------------------------------
# transform_family
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, neutral", [("rotation", 0), ("shear", 0.0), ("scale", 1.0),
                                             ("translation", 0)])
def test_each_family_at_its_neutral_magnitude_is_the_centred_digit(sample, family, neutral):
    assert torch.equal(am.transform_family(sample, family, neutral).images,
                       am.centre(sample).images)


def test_rotation_by_90_degrees_turns_the_image_a_quarter_anticlockwise():
    pattern = torch.zeros(28, 28)
    pattern[5:9, 5:20] = 255                             # an L: no symmetry to hide an error
    pattern[5:22, 5:8] = 200
    digits = synthetic(pattern, 2)
    turned = am.transform_family(digits, "rotation", 90).images
    expected = torch.rot90(am.centre(digits).images, 1, dims=(2, 3))       # anticlockwise
    assert torch.equal(turned, expected)


def test_translation_family_moves_right_and_down(sample):
    placed = am.centre(sample).images
    right = am.transform_family(sample, "translation", 3).images
    assert torch.equal(right[..., 3:], placed[..., :-3]) and right[..., :3].eq(0).all()
    both = am.transform_family(sample, "translation", (-2, 4)).images
    assert torch.equal(both[:, :, 4:, :-2], placed[:, :, :-4, 2:])


def test_scale_family_grows_the_ink_by_the_square_of_the_factor(sample):
    small = am.transform_family(sample, "scale", 0.8).images.double().sum()
    large = am.transform_family(sample, "scale", 1.2).images.double().sum()
    base = sample.images.double().sum()
    assert math.isclose(small / base, 0.64, rel_tol=0.03)
    assert math.isclose(large / base, 1.44, rel_tol=0.03)


# ----------------------------------------------------------------------------------------------
# load_affnist
# ----------------------------------------------------------------------------------------------

def write_affnist(path, images: np.ndarray, labels, **extra):
    """A .mat file in affNIST's layout: one 40x40 digit per column, column-major."""
    columns = np.stack([im.reshape(-1, order="F") for im in images], axis=1)   # (1600, N)
    fields = {"image": columns, "label_int": np.asarray(labels), **extra}
    scipy.io.savemat(str(path), {"affNISTdata": fields})


def test_load_affnist_reads_the_documented_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 40, 40), dtype=np.uint8)
    images[0] = 0
    images[0, 2, 30] = 255                              # row 2, column 30: not on the diagonal
    write_affnist(tmp_path / "test.mat", images, np.array([[7, 0, 9]], dtype=np.uint8),
                  label_one_of_n=np.eye(10)[:, [7, 0, 9]])
    digits = am.load_affnist(tmp_path / "test.mat")
    assert digits.images.shape == (3, 1, 40, 40) and digits.images.dtype == torch.uint8
    assert torch.equal(digits.images[:, 0], torch.from_numpy(images))
    assert digits.images[0, 0, 2, 30] == 255 and digits.images[0, 0, 30, 2] == 0
    assert digits.labels.tolist() == [7, 0, 9] and digits.labels.dtype == torch.int64
    assert "test.mat" in digits.source


def test_load_affnist_says_where_to_get_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no affNIST file at .*toronto.edu"):
        am.load_affnist(tmp_path / "absent.mat")


@pytest.mark.parametrize("case, message", [
    ("not_mat", "cannot read bad.mat as a MAT file"),
    ("no_struct", "not an affNIST file: expected a struct 'affNISTdata', found variables "
                  "\\['something'\\]"),
    ("no_labels", "lacks the field\\(s\\) \\['label_int'\\]"),
    ("shape", "expected 'image' of shape \\(1600, N\\).*got shape \\(1599, 2\\)"),
    ("count", "expected 2 labels in 'label_int'.*got 3"),
    ("label", "expected labels 0 to 9, found values from 0 to 10"),
    ("pixels", "expected whole pixel values in \\[0, 255\\]"),
])
def test_load_affnist_names_what_is_wrong_with_a_file(tmp_path, case, message):
    path = tmp_path / "bad.mat"
    good = np.zeros((1600, 2), dtype=np.uint8)
    if case == "not_mat":
        path.write_bytes(b"this is not a MAT file at all" * 10)
    elif case == "no_struct":
        scipy.io.savemat(str(path), {"something": np.zeros(3)})
    elif case == "no_labels":
        scipy.io.savemat(str(path), {"affNISTdata": {"image": good}})
    elif case == "shape":
        scipy.io.savemat(str(path), {"affNISTdata": {"image": good[1:], "label_int": [1, 2]}})
    elif case == "count":
        scipy.io.savemat(str(path), {"affNISTdata": {"image": good, "label_int": [1, 2, 3]}})
    elif case == "label":
        scipy.io.savemat(str(path), {"affNISTdata": {"image": good, "label_int": [0, 10]}})
    else:
        scipy.io.savemat(str(path), {"affNISTdata": {"image": good.astype(float) + 0.5,
                                                     "label_int": [0, 1]}})
    with pytest.raises(ValueError, match=message):
        am.load_affnist(path)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def good_digits(n=4):
    return Digits(torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                  "zeros")


@pytest.mark.parametrize("digits, message", [
    (Digits(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), "float"),
     "expected uint8 images in \\[0, 255\\], got dtype torch.float32"),
    (Digits(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "3d"),
     "expected square one-channel images of shape \\(N, 1, S, S\\), got shape \\(4, 28, 28\\)"),
    (Digits(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.int32),
            "int32"), "expected int64 labels of shape \\(4,\\), got dtype torch.int32"),
    (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), "expected a capsutil.data.Digits, got Tensor"),
])
@pytest.mark.parametrize("call", ["centre", "expand", "random_affine", "transform_family"])
def test_bad_digits_are_refused_with_the_problem_named(digits, message, call):
    with pytest.raises(ValueError, match=message):
        {"centre": lambda: am.centre(digits), "expand": lambda: am.expand(digits, 0),
         "random_affine": lambda: am.random_affine(digits, 0),
         "transform_family": lambda: am.transform_family(digits, "rotation", 5)}[call]()


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "0", True, None])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="expected a seed as an integer in \\[0, 2\\*\\*63 - 1\\]"):
        am.random_affine(good_digits(), seed)
    with pytest.raises(ValueError, match="expected a seed"):
        am.expand(good_digits(), seed)


@pytest.mark.parametrize("canvas", [27, 0, 40.0, True])
def test_bad_canvas_sizes_are_refused(canvas):
    with pytest.raises(ValueError, match="expected the canvas size as an integer of at least 28"):
        am.expand(good_digits(), 0, canvas=canvas)
    with pytest.raises(ValueError, match="expected the canvas size"):
        am.random_affine(good_digits(), 0, canvas=canvas)


@pytest.mark.parametrize("fields, message", [
    (dict(rotation_degrees=-5), "expected rotation_degrees in \\[0, 180\\], got -5"),
    (dict(rotation_degrees=float("nan")), "expected rotation_degrees as a finite number"),
    (dict(shear=-0.1), "expected a shear range of at least 0, got -0.1"),
    (dict(scale=(1.2, 0.8)), "expected scale factors with 0 < low <= high, got \\(1.2, 0.8\\)"),
    (dict(scale=(0.0, 1.0)), "expected scale factors with 0 < low <= high"),
    (dict(scale=1.0), "expected scale as a pair \\(low, high\\), got 1.0"),
    (dict(translate="yes"), "expected translate as True or False, got 'yes'"),
])
def test_bad_ranges_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        am.AffineRanges(**fields)


@pytest.mark.parametrize("family, magnitude, message", [
    ("zoom", 1.0, "unknown transformation family 'zoom'; expected one of \\['rotation', "
                  "'shear', 'scale', 'translation'\\]"),
    ("scale", 0.0, "expected a scale factor above 0, got 0.0"),
    ("rotation", float("inf"), "expected the rotation magnitude as a finite number, got inf"),
    ("shear", "0.1", "expected the shear magnitude as a finite number, got '0.1'"),
    ("translation", 1.5, "expected the translation as a whole number of pixels or a pair"),
    ("translation", (1, 2, 3), "expected the translation as a whole number of pixels or a pair"),
])
def test_bad_family_or_magnitude_is_refused(family, magnitude, message):
    with pytest.raises(ValueError, match=message):
        am.transform_family(good_digits(), family, magnitude)


def test_the_ranges_must_be_an_affine_ranges():
    with pytest.raises(ValueError, match="expected ranges as an AffineRanges, got dict"):
        am.random_affine(good_digits(), 0, {"rotation_degrees": 20})


def test_blank_digits_stay_blank_and_centred():
    out, params = am.random_affine(good_digits(), 0)
    assert out.images.eq(0).all() and params["dx"].eq(0).all() and params["dy"].eq(0).all()


def test_warps_are_batched_so_that_the_chunking_does_not_change_the_result(sample, monkeypatch):
    whole, _ = am.random_affine(sample, 9)
    monkeypatch.setattr(am, "CHUNK_PIXELS", 1)                           # one image per chunk
    assert torch.equal(am.random_affine(sample, 9)[0].images, whole.images)
