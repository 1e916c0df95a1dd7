"""Expanded MNIST and an affNIST-style test set, generated on the fly from MNIST digits.

Sabour et al. (2017, section 5.2) test how well CapsNet generalises to affine transformations it
never saw: they train on *expanded MNIST*, each 28x28 digit placed at random on a 40x40 black
background, and test on *affNIST*, MNIST test digits under small random affine transformations,
also 40x40. Their code builds expanded MNIST with ``mnist_shift.py --shift=6 --pad=6``
(tensorflow/models, ``research/capsules/README.md`` and ``input_data/mnist/mnist_shift.py``):
the digit is padded by 6 pixels to 40x40 and shifted by -6 to 6 pixels in each axis, that is,
pasted at an integer offset 0 to 12 in each axis. That script writes all 13 x 13 shifts of every
digit; :func:`expand` draws one of them uniformly per digit, so nothing has to be stored.

affNIST (Tieleman 2013, https://www.cs.toronto.edu/~tijmen/affNIST/) is neither shipped nor
downloaded by capsutil. Its page says each 40x40 image is an MNIST digit under a random affine
transformation, that the "just centered" version adds an edge of 6 background pixels around the
28x28 original (:func:`centre`), and documents these ranges, which :class:`AffineRanges` takes
as defaults:

- rotation up to 20 degrees either way;
- shearing up to 0.2 either way;
- horizontal and vertical scaling, independently, from 0.8 to 1.2;
- translation that keeps the digit inside the 40x40 image.

What these ranges do not fix is our choice: each parameter is drawn uniformly in its range;
the linear part is scale, then shear (horizontal: ``x' = x + shear * y``), then
rotation, about the centre of the 28x28 frame (anticlockwise on screen for a positive angle);
pixels are resampled bilinearly with zeros outside; the translation is a whole number of
pixels, drawn uniformly among the shifts that keep the transformed digit's ink bounding box
(every pixel above 0) inside the canvas. This is an affNIST-*style* set: the real one, where
a reader has it, is read by :func:`load_affnist`.

Images stay uint8 (N, 1, H, W); generators take an int seed or a ``torch.Generator`` and give
the same images for the same seed. Warps are batched (chunks of images, never one at a time).
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capsutil.data import Digits

CANVAS = 40                  # affNIST's and expanded MNIST's image size
AFFNIST_PIXELS = 1600        # 40 x 40, one column of affNIST's ``image`` field per digit
FAMILIES = ("rotation", "shear", "scale", "translation")
CHUNK_PIXELS = 2**21         # pixels warped at once (a few MiB of floats per chunk)
MAX_SEED = 2**63 - 1


# ----------------------------------------------------------------------------------------------
# Checks shared by the generators (and by capsutil.multimnist)
# ----------------------------------------------------------------------------------------------

def check_digits(digits: Digits) -> None:
    """Raise ``ValueError`` unless ``digits`` holds uint8 square images (N, 1, S, S) and int64
    labels (N,)."""
    if not isinstance(digits, Digits):
        raise ValueError(f"expected a capsutil.data.Digits, got {type(digits).__name__}")
    images, labels = digits.images, digits.labels
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square one-channel images of shape (N, 1, S, S), "
                         f"got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images in [0, 255], got dtype {images.dtype}")
    if labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"expected int64 labels of shape ({images.shape[0]},), got dtype "
                         f"{labels.dtype} and shape {tuple(labels.shape)}")


def make_generator(seed: int | torch.Generator) -> torch.Generator:
    """A CPU ``torch.Generator``: ``seed`` itself when it is one, else a new one seeded with it."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"expected a CPU torch.Generator, got one on {seed.device}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"expected a seed as an integer in [0, 2**63 - 1] or a "
                         f"torch.Generator, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def _check_canvas(canvas: int, size: int) -> None:
    if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas < size:
        raise ValueError(f"expected the canvas size as an integer of at least {size} (the "
                         f"digits' size), got {canvas!r}")


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise ValueError(f"expected {name} as a finite number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# Placing digits on a canvas
# ----------------------------------------------------------------------------------------------

def window(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
           size: int) -> torch.Tensor:
    """Cut a ``size`` x ``size`` window out of each image, zeros where it leaves the image.

    images: (N, C, H, W); top, left: int64 (N,), the window's corner in image coordinates
    (may be negative or past the edge) -> (N, C, size, size), same dtype.
    """
    n, _, h, w = images.shape
    steps = torch.arange(size, device=images.device)
    rows = top.to(images.device)[:, None] + steps                           # (N, size)
    cols = left.to(images.device)[:, None] + steps                          # (N, size)
    inside = (((rows >= 0) & (rows < h))[:, :, None]
              & ((cols >= 0) & (cols < w))[:, None, :])                     # (N, size, size)
    batch = torch.arange(n, device=images.device)[:, None, None]            # (N, 1, 1)
    picked = images[batch, :, rows.clamp(0, h - 1)[:, :, None],
                    cols.clamp(0, w - 1)[:, None, :]]                       # (N, size, size, C)
    picked = picked * inside[..., None].to(picked.dtype)                    # zeros outside
    return picked.permute(0, 3, 1, 2).contiguous()                          # (N, C, size, size)


def translate(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels, ``dx`` right and ``dy`` down, zero fill; ink pushed
    past the edge is lost.

    images: (N, C, S, S); dx, dy: int64 (N,) -> (N, C, S, S).
    """
    return window(images, -dy.long(), -dx.long(), images.shape[-1])


def centre(digits: Digits, canvas: int = CANVAS) -> Digits:
    """Each digit in the middle of a black ``canvas`` x ``canvas`` image: the 28x28 frame
    padded by 6 pixels on every side for 40x40, as affNIST's "just centered" set and the
    test set of expanded MNIST."""
    check_digits(digits)
    size = digits.images.shape[-1]
    _check_canvas(canvas, size)
    before = (canvas - size) // 2
    after = canvas - size - before
    images = F.pad(digits.images, (before, after, before, after))      # (N, 1, canvas, canvas)
    return Digits(images, digits.labels, f"{digits.source}, centred in {canvas}x{canvas}")


def expand(digits: Digits, generator: int | torch.Generator,
           canvas: int = CANVAS) -> Digits:
    """Expanded MNIST: each digit pasted at its own uniformly random integer offset in
    [0, canvas - 28] (0 to 12 for 40x40) in each axis of a black canvas. Exact pixels, no
    resampling; the same ``generator`` seed gives the same placements."""
    check_digits(digits)
    size = digits.images.shape[-1]
    _check_canvas(canvas, size)
    g = make_generator(generator)
    offsets = torch.randint(0, canvas - size + 1, (2, len(digits)), generator=g)  # (2, N)
    images = window(digits.images, -offsets[0], -offsets[1], canvas)   # (N, 1, canvas, canvas)
    return Digits(images, digits.labels,
                  f"{digits.source}, expanded to {canvas}x{canvas} (random placement)")


# ----------------------------------------------------------------------------------------------
# Affine warps
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AffineRanges:
    """The ranges :func:`random_affine` draws from (uniformly): rotation in degrees either
    way, horizontal shear factor either way, each axis' scale factor, and whether to translate.
    The defaults are affNIST's documented ranges."""

    rotation_degrees: float = 20.0
    shear: float = 0.2
    scale: tuple[float, float] = (0.8, 1.2)
    translate: bool = True

    def __post_init__(self):
        rotation = _check_finite("rotation_degrees", self.rotation_degrees)
        if not 0 <= rotation <= 180:
            raise ValueError(f"expected rotation_degrees in [0, 180], got {rotation}")
        if not 0 <= _check_finite("shear", self.shear):
            raise ValueError(f"expected a shear range of at least 0, got {self.shear}")
        if not isinstance(self.scale, (tuple, list)) or len(self.scale) != 2:
            raise ValueError(f"expected scale as a pair (low, high), got {self.scale!r}")
        low, high = (_check_finite("scale", s) for s in self.scale)
        if not 0 < low <= high:
            raise ValueError(f"expected scale factors with 0 < low <= high, got {self.scale}")
        if not isinstance(self.translate, bool):
            raise ValueError(f"expected translate as True or False, got {self.translate!r}")


def affine_matrices(rotation: torch.Tensor, shear: torch.Tensor, scale_x: torch.Tensor,
                    scale_y: torch.Tensor) -> torch.Tensor:
    """The linear maps (pixel x right, y down) of the given parameters, each (N,):
    rotation(degrees, anticlockwise on screen) @ shear(x' = x + shear * y) @ scale.

    -> float64 (N, 2, 2), acting on column vectors (x, y).
    """
    angle = torch.deg2rad(rotation.double())
    cos, sin = torch.cos(angle), torch.sin(angle)
    zeros, ones = torch.zeros_like(cos), torch.ones_like(cos)
    rotate = torch.stack([cos, sin, -sin, cos], dim=1).view(-1, 2, 2)      # (N, 2, 2)
    skew = torch.stack([ones, shear.double(), zeros, ones], dim=1).view(-1, 2, 2)
    stretch = torch.diag_embed(torch.stack([scale_x.double(), scale_y.double()], dim=1))
    return rotate @ skew @ stretch                                          # (N, 2, 2)


def _work_size(size: int, gain: float) -> int:
    """A square canvas that holds a ``size`` x ``size`` frame under any linear map of spectral
    norm at most ``gain`` (about its centre), with a pixel to spare; same parity as ``size``
    so the frame's centre stays on the canvas's centre."""
    reach = gain * size / math.sqrt(2) + 1                  # half-diagonal after the map
    return size + 2 * max(0, math.ceil(reach - size / 2))


def _shear_norm(shear: float) -> float:
    """Spectral norm of [[1, s], [0, 1]]."""
    return (abs(shear) + math.sqrt(shear * shear + 4)) / 2


def _warp(images: torch.Tensor, matrices: torch.Tensor, work: int) -> torch.Tensor:
    """Apply one linear map per image about the frame's centre, on a ``work`` x ``work``
    canvas; bilinear, zeros outside, rounded back to uint8.

    images: uint8 (N, 1, S, S); matrices: (N, 2, 2) -> uint8 (N, 1, work, work).
    """
    n, size = images.shape[0], images.shape[-1]
    pad = (work - size) // 2
    out = torch.empty(n, 1, work, work, dtype=torch.uint8)
    # affine_grid maps output to input coordinates, so it takes the inverse map; on a square
    # canvas the normalised coordinates are the pixel coordinates scaled alike on both axes
    inverse = torch.linalg.inv(matrices).float()                            # (N, 2, 2)
    theta = torch.cat([inverse, torch.zeros(n, 2, 1)], dim=2)               # (N, 2, 3)
    step = max(1, CHUNK_PIXELS // (work * work))
    for start in range(0, n, step):
        part = slice(start, start + step)
        placed = F.pad(images[part].float(), (pad, pad, pad, pad))          # (B, 1, work, work)
        grid = F.affine_grid(theta[part], list(placed.shape), align_corners=False)
        warped = F.grid_sample(placed, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)                         # (B, 1, work, work)
        out[part] = warped.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _ink_span(ink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First and last index where ``ink`` (bool (N, L)) is True, and whether there is any."""
    length = ink.shape[1]
    first = ink.int().argmax(dim=1)                                         # (N,)
    last = length - 1 - ink.flip(1).int().argmax(dim=1)                    # (N,)
    return first, last, ink.any(dim=1)


def _draw_shift(low: torch.Tensor, high: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An integer in [low, high] from ``u`` uniform in [0, 1); the middle where low > high."""
    span = (high - low + 1).clamp(min=1)
    drawn = low + torch.minimum((u * span).long(), span - 1)
    return torch.where(low <= high, drawn, torch.div(low + high, 2, rounding_mode="floor"))


def _place(warped: torch.Tensor, size: int, canvas: int, translate: bool,
           u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the canvas out of the warped work images, centred or shifted at random so that the
    ink's bounding box stays inside; returns (images, dx, dy)."""
    n, work = warped.shape[0], warped.shape[-1]
    corner = (work - size) // 2 - (canvas - size) // 2     # centred window in work coordinates
    dx = torch.zeros(n, dtype=torch.long)
    dy = torch.zeros(n, dtype=torch.long)
    if translate:
        ink = warped[:, 0] > 0                                              # (N, work, work)
        top, bottom, any_ink = _ink_span(ink.any(dim=2))                    # rows, (N,) each
        left, right, _ = _ink_span(ink.any(dim=1))                          # columns
        # in the canvas, row r of the work image lands on r - corner + dy, which must stay in
        # [0, canvas - 1]; the same for columns
        dy = _draw_shift(corner - top, canvas - 1 - bottom + corner, u[0])
        dx = _draw_shift(corner - left, canvas - 1 - right + corner, u[1])
        dy, dx = dy * any_ink, dx * any_ink                                 # no ink: centred
    images = window(warped, corner - dy, corner - dx, canvas)      # (N, 1, canvas, canvas)
    return images, dx, dy


def random_affine(digits: Digits, seed: int | torch.Generator,
                  ranges: AffineRanges = AffineRanges(),
                  canvas: int = CANVAS) -> tuple[Digits, dict[str, torch.Tensor]]:
    """An affNIST-style set: each digit centred in ``canvas`` x ``canvas``, then rotated,
    sheared and scaled by its own random draw from ``ranges``, then (when
    ``ranges.translate``) shifted by whole pixels, at random among the shifts that keep all
    its ink inside the canvas.

    Returns the images (uint8 (N, 1, canvas, canvas)) and ``params``, per-image tensors (N,):
    ``rotation`` (degrees, anticlockwise), ``shear``, ``scale_x``, ``scale_y`` (float32), and
    ``dx``, ``dy`` (int64, pixels right and down from the centred placement). The draws do not
    depend on ``canvas`` or ``ranges.translate``: the same seed gives the same rotation, shear
    and scales with or without translation.
    """
    check_digits(digits)
    if not isinstance(ranges, AffineRanges):
        raise ValueError(f"expected ranges as an AffineRanges, got {type(ranges).__name__}")
    size = digits.images.shape[-1]
    _check_canvas(canvas, size)
    g = make_generator(seed)
    n = len(digits)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)

    rotation = uniform(-ranges.rotation_degrees, ranges.rotation_degrees)
    shear = uniform(-ranges.shear, ranges.shear)
    scale_x, scale_y = uniform(*ranges.scale), uniform(*ranges.scale)
    u = torch.rand(2, n, generator=g, dtype=torch.float64)                 # (2, N) shifts
    gain = ranges.scale[1] * _shear_norm(ranges.shear)        # bound on every map's norm
    warped = _warp(digits.images, affine_matrices(rotation, shear, scale_x, scale_y),
                   _work_size(size, gain))
    images, dx, dy = _place(warped, size, canvas, ranges.translate, u)
    params = {"rotation": rotation.float(), "shear": shear.float(),
              "scale_x": scale_x.float(), "scale_y": scale_y.float(), "dx": dx, "dy": dy}
    return Digits(images, digits.labels,
                  f"{digits.source}, random affine in {canvas}x{canvas}"), params


def transform_family(digits: Digits, family: str, magnitude, canvas: int = CANVAS) -> Digits:
    """All digits, centred in ``canvas`` x ``canvas``, under ONE transformation at a fixed
    magnitude, for accuracy-against-magnitude curves:

    - ``"rotation"``: ``magnitude`` degrees, anticlockwise on screen;
    - ``"shear"``: horizontal shear factor, ``x' = x + magnitude * y`` (y down);
    - ``"scale"``: both axes scaled by ``magnitude`` (> 0);
    - ``"translation"``: a whole number of pixels to the right, or a pair ``(dx, dy)``
      (right, down).

    Ink carried past the canvas's edge is lost, as it would be in a camera's frame.
    """
    check_digits(digits)
    size = digits.images.shape[-1]
    _check_canvas(canvas, size)
    if family not in FAMILIES:
        raise ValueError(f"unknown transformation family {family!r}; expected one of "
                         f"{list(FAMILIES)}")
    n = len(digits)
    if family == "translation":
        dx, dy = _integer_shift(magnitude)
        placed = centre(digits, canvas).images                        # (N, 1, canvas, canvas)
        images = translate(placed, torch.full((n,), dx), torch.full((n,), dy))
        label = f"translation ({dx}, {dy}) px"
    else:
        value = _check_finite(f"the {family} magnitude", magnitude)
        if family == "scale" and value <= 0:
            raise ValueError(f"expected a scale factor above 0, got {value}")
        ones = torch.ones(n, dtype=torch.float64)
        rotation = ones * (value if family == "rotation" else 0.0)
        shear = ones * (value if family == "shear" else 0.0)
        scale = ones * (value if family == "scale" else 1.0)
        matrices = affine_matrices(rotation, shear, scale, scale)           # (N, 2, 2)
        gain = float(torch.linalg.matrix_norm(matrices[:1], ord=2)) if n else 1.0
        warped = _warp(digits.images, matrices, _work_size(size, gain))
        images, _, _ = _place(warped, size, canvas, False, torch.zeros(2, n))
        label = f"{family} {value:g}"
    return Digits(images, digits.labels, f"{digits.source}, {label} in {canvas}x{canvas}")


def _integer_shift(magnitude) -> tuple[int, int]:
    """(dx, dy) from a whole number of pixels (to the right) or a pair of them."""
    pair = magnitude if isinstance(magnitude, (tuple, list)) else (magnitude, 0)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                             for v in pair):
        raise ValueError(f"expected the translation as a whole number of pixels or a pair "
                         f"(dx, dy) of them, got {magnitude!r}")
    return int(pair[0]), int(pair[1])


# ----------------------------------------------------------------------------------------------
# The real affNIST
# ----------------------------------------------------------------------------------------------

def load_affnist(path: str | os.PathLike) -> Digits:
    """Read one of affNIST's .mat files (for example ``transformed/test_batches/1.mat`` or
    ``just_centered/test.mat``, unzipped) as uint8 images (N, 1, 40, 40) and int64 labels.

    The file holds a struct ``affNISTdata`` whose field ``image`` is (1600, N), one digit per
    column, each column a 40x40 image in column-major order, and ``label_int`` (N labels).
    To check the orientation on a real file: the ``just_centered`` test digits should look
    like ``centre(load_mnist("test"))``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"expected the path of an affNIST .mat file, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no affNIST file at {path}; affNIST's .mat files are at "
                                f"https://www.cs.toronto.edu/~tijmen/affNIST/ (unzip them first)")
    from scipy.io import loadmat
    try:
        contents = loadmat(str(path))
    except Exception as err:  # scipy raises several types for a file that is not a MAT file
        raise ValueError(f"cannot read {path.name} as a MAT file: {err}") from err
    struct = contents.get("affNISTdata")
    if struct is None or struct.dtype.names is None or struct.size != 1:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise ValueError(f"{path.name} is not an affNIST file: expected a struct "
                         f"'affNISTdata', found variables {found}")
    missing = [f for f in ("image", "label_int") if f not in struct.dtype.names]
    if missing:
        raise ValueError(f"{path.name}: affNISTdata lacks the field(s) {missing}; it has "
                         f"{list(struct.dtype.names)}")
    pixels = np.asarray(struct["image"].flat[0])
    labels = np.asarray(struct["label_int"].flat[0]).reshape(-1)
    return Digits(*_affnist_arrays(path.name, pixels, labels), f"affNIST ({path.name})")


def _affnist_arrays(name: str, pixels: np.ndarray,
                    labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Check affNIST's (1600, N) pixels and N labels and turn them into Digits' tensors."""
    if pixels.ndim != 2 or pixels.shape[0] != AFFNIST_PIXELS:
        raise ValueError(f"{name}: expected 'image' of shape (1600, N), one 40x40 digit per "
                         f"column, got shape {pixels.shape}")
    n = pixels.shape[1]
    if labels.shape != (n,):
        raise ValueError(f"{name}: expected {n} labels in 'label_int' (one per image), got "
                         f"{labels.size}")
    if n and (pixels.min() < 0 or pixels.max() > 255 or not np.all(pixels == np.round(pixels))):
        raise ValueError(f"{name}: expected whole pixel values in [0, 255], found values from "
                         f"{pixels.min()} to {pixels.max()}")
    if n and (labels.min() < 0 or labels.max() > 9 or not np.all(labels == np.round(labels))):
        raise ValueError(f"{name}: expected labels 0 to 9, found values from {labels.min()} "
                         f"to {labels.max()}")
    # column-major: pixel (row r, column c) of digit i is pixels[r + 40 * c, i]
    images = pixels.T.reshape(n, 40, 40).transpose(0, 2, 1)                 # (N, 40, 40)
    images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    return images.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))  # (N, 1, 40, 40)
