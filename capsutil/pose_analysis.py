"""What the 16 pose dimensions of a digit capsule encode, measured on many digits (chapter 06).

Decoder side: move one dimension of a capsule by a multiple of its natural spread and decode
(:func:`spread_sweep`), measure the decoded images by their moments (:func:`shape_measures`),
drop the rows whose ink fades (:func:`keeps_ink`) and summarise per class and dimension
(:func:`class_quantiles`). Encoder side: transform real digits (:func:`affine`, :func:`thicken`),
encode them again, and compare how concentrated the capsule's change is on the 16 axes
(:func:`top_share`) with the same measure on random orthonormal frames (:func:`random_frames`,
:func:`frame_shares`).

Index letters: n image, e and f pose dimensions, s step along a row, k class, r random frame.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from capsutil.explorer import decode_capsules


def _check_poses(poses: torch.Tensor) -> None:
    if not isinstance(poses, torch.Tensor) or poses.dim() != 2 or len(poses) == 0:
        got = tuple(poses.shape) if isinstance(poses, torch.Tensor) else type(poses).__name__
        raise ValueError(f"expected poses of shape (N, E) with N >= 1, got {got}")


def _check_classes(classes: torch.Tensor, n: int) -> None:
    if (not isinstance(classes, torch.Tensor) or classes.shape != (n,)
            or classes.dtype != torch.int64):
        got = (f"{tuple(classes.shape)} {classes.dtype}" if isinstance(classes, torch.Tensor)
               else type(classes).__name__)
        raise ValueError(f"expected int64 classes of shape ({n},), got {got}")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (N, C, H, W), got {got}")


# ----------------------------------------------------------------------------------------------
# The decoder side
# ----------------------------------------------------------------------------------------------

def natural_spread(poses: torch.Tensor, classes: torch.Tensor,
                   n_classes: int = 10) -> torch.Tensor:
    """The natural spread of each pose dimension within each class.

    poses: (N, E) capsules; classes: int64 (N,), the class of each. Returns (K, E) with
    ``K = n_classes``: entry [k, e] is the standard deviation (unbiased) of dimension e over
    the capsules of class k. Every class needs at least two capsules.
    """
    _check_poses(poses)
    _check_classes(classes, len(poses))
    counts = torch.bincount(classes, minlength=n_classes)                # (K,)
    if len(counts) > n_classes or int(counts.min()) < 2:
        raise ValueError(f"expected at least 2 capsules of each of the {n_classes} classes, "
                         f"got counts {counts.tolist()}")
    return torch.stack([poses[classes == k].std(dim=0) for k in range(n_classes)])


@torch.no_grad()
def spread_sweep(decoder: nn.Module, poses: torch.Tensor, classes: torch.Tensor,
                 scales: torch.Tensor, steps, chunk: int = 4096) -> torch.Tensor:
    """Decode each capsule with one dimension at a time moved by a multiple of its own scale.

    poses: (N, E); classes: int64 (N,); scales: (N, E) positive, the unit of each dimension
    (e.g. its natural spread in the capsule's class); steps: (S,) multiples of that unit.
    Returns (N, E, S, P) images on the poses' device: entry [n, e, s] decodes
    ``poses[n] + steps[s] * scales[n, e] * u_e``, where u_e is the e-th unit vector, as the
    capsule of class ``classes[n]`` (the other capsules masked, as at test time).
    With all scales 1 this is :func:`capsutil.widgets.pose_sweep` with offsets ``steps``.
    """
    _check_poses(poses)
    _check_classes(classes, len(poses))
    if not isinstance(scales, torch.Tensor) or scales.shape != poses.shape:
        got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"expected scales of shape {tuple(poses.shape)}, got {got}")
    if not bool((scales > 0).all()):
        raise ValueError("expected positive scales")
    steps = torch.as_tensor(np.asarray(steps, dtype=np.float32), device=poses.device)
    if steps.dim() != 1 or len(steps) == 0:
        raise ValueError(f"expected a non-empty 1-D list of steps, "
                         f"got shape {tuple(steps.shape)}")
    n, dims = poses.shape
    size = len(steps)
    eye = torch.eye(dims, device=poses.device)                           # (E, E)
    offsets = scales[:, :, None] * steps[None, None, :]                  # (N, E, S)
    tweaked = poses[:, None, None, :] + offsets[..., None] * eye[None, :, None, :]  # (N, E, S, E)
    flat = tweaked.reshape(-1, dims)                                     # (N*E*S, E)
    repeated = classes.repeat_interleave(dims * size)                    # (N*E*S,)
    images = [decode_capsules(decoder, part, labels).to(poses.device)
              for part, labels in zip(flat.split(chunk), repeated.split(chunk))]
    return torch.cat(images).reshape(n, dims, size, -1)                 # (N, E, S, P)


def shape_measures(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Moments of images: (..., H, W) in [0, 1] -> dict of (...) tensors.

    ``ink`` the sum of the pixels; ``column`` and ``row`` the ink's centroid (rows counted
    downwards); ``width`` and ``height`` its standard deviations along columns and rows;
    ``slant`` in degrees, the angle of the least-squares line of column on row through the
    ink, positive when the top leans to the right (chapter 06, section 3).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (..., H, W), got {got}")
    height, width = x.shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(float(height), device=x.device),
                                torch.arange(float(width), device=x.device),
                                indexing="ij")                           # (H, W) each
    ink = x.sum((-2, -1))
    col = (x * cols).sum((-2, -1)) / ink
    row = (x * rows).sum((-2, -1)) / ink
    dc, dr = cols - col[..., None, None], rows - row[..., None, None]    # (..., H, W)
    var_c = (x * dc**2).sum((-2, -1)) / ink
    var_r = (x * dr**2).sum((-2, -1)) / ink
    slope = -(x * dc * dr).sum((-2, -1)) / ink / var_r
    return {"ink": ink, "column": col, "row": row, "width": var_c.sqrt(),
            "height": var_r.sqrt(), "slant": torch.rad2deg(torch.atan(slope))}


def keeps_ink(ink: torch.Tensor, centre: int, threshold: float = 0.7) -> torch.Tensor:
    """Whether both ends of each row keep at least ``threshold`` of the unperturbed ink.

    ink: (..., S), the ink of the decoded images along each row of a sweep; ``centre`` is the
    index of the unperturbed step. Returns a bool (...) tensor: False marks a row with a fading
    end, whose moments measure the fading rather than a change of shape.
    """
    size = ink.shape[-1] if isinstance(ink, torch.Tensor) and ink.dim() >= 1 else 0
    if (size == 0 or isinstance(centre, bool) or not isinstance(centre, int)
            or not -size <= centre < size):
        got = tuple(ink.shape) if isinstance(ink, torch.Tensor) else type(ink).__name__
        raise ValueError(f"expected ink of shape (..., S) and a centre index in it, "
                         f"got {got} and {centre!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"expected a threshold in (0, 1], got {threshold!r}")
    floor = threshold * ink[..., centre]
    return (ink[..., 0] >= floor) & (ink[..., -1] >= floor)


def class_quantiles(values: torch.Tensor, classes: torch.Tensor, n_classes: int = 10,
                    q=(0.25, 0.5, 0.75), keep: torch.Tensor | None = None) -> torch.Tensor:
    """Quantiles of a measure per class, over the images kept.

    values: (N, E), one number per image and dimension; classes: int64 (N,); keep: bool (N, E)
    or None (keep all). Returns (Q, K, E): the quantiles ``q`` of values[classes == k, e] over
    the kept entries, NaN where a (class, dimension) pair keeps nothing.
    """
    _check_poses(values)
    _check_classes(classes, len(values))
    if keep is None:
        keep = torch.ones_like(values, dtype=torch.bool)
    if keep.shape != values.shape or keep.dtype != torch.bool:
        raise ValueError(f"expected a bool keep mask of shape {tuple(values.shape)}, "
                         f"got {tuple(keep.shape)} {keep.dtype}")
    q = torch.as_tensor(q, dtype=values.dtype, device=values.device)     # (Q,)
    masked = torch.where(keep, values, torch.full_like(values, math.nan))  # (N, E)
    out = torch.full((len(q), n_classes, values.shape[1]), math.nan,
                     dtype=values.dtype, device=values.device)            # (Q, K, E)
    for k in range(n_classes):
        rows = masked[classes == k]                                       # (N_k, E)
        if len(rows):
            out[:, k] = torch.nanquantile(rows, q, dim=0)
    return out


# ----------------------------------------------------------------------------------------------
# The encoder side
# ----------------------------------------------------------------------------------------------

def affine(images: torch.Tensor, degrees: float = 0.0, right: float = 0.0,
           down: float = 0.0) -> torch.Tensor:
    """Rotate images about their centre, then shift them, by bilinear resampling.

    images: (N, C, H, W). ``degrees`` turns the image counterclockwise as displayed (row 0 at
    the top); ``right`` and ``down`` move it by that many pixels. Pixels from outside the image
    are 0. Returns (N, C, H, W). Integer shifts without rotation move pixels exactly.
    """
    _check_images(images)
    n, _, height, width = images.shape
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # affine_grid maps each output point to the input point it samples, in coordinates
    # x (right) and y (down) scaled to [-1, 1]: input = R^-1 (output - shift)
    tx, ty = 2 * right / width, 2 * down / height
    theta = torch.tensor([[cos, -sin, -(cos * tx - sin * ty)],
                          [sin, cos, -(sin * tx + cos * ty)]],
                         dtype=images.dtype, device=images.device)       # (2, 3)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(images.shape),
                         align_corners=False)                             # (N, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def thicken(images: torch.Tensor) -> torch.Tensor:
    """Thicker strokes by a 3 x 3 dilation (each pixel becomes the largest of its
    neighbourhood): (N, C, H, W) -> (N, C, H, W)."""
    _check_images(images)
    return F.max_pool2d(images, kernel_size=3, stride=1, padding=1)


def top_share(z: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Share of a vector's squared length held by its k largest components (in size).

    z: (..., E) -> (...), in [k/E, 1]: 1 when the change lies on k axes, k/E when it is spread
    evenly over all E.
    """
    if not isinstance(z, torch.Tensor) or z.dim() < 1 or not 1 <= k <= z.shape[-1]:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"expected vectors (..., E) and 1 <= k <= E, got {got} and k={k!r}")
    squares = z**2                                                        # (..., E)
    return squares.topk(k, dim=-1).values.sum(-1) / squares.sum(-1)


def random_frames(draws: int, dims: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random orthonormal frames of R^dims, uniform over rotations and reflections.

    Returns (R, E, E) with ``R = draws``: the rows of frames[r] are E orthonormal unit
    directions, from the QR decomposition of a Gaussian matrix with the signs fixed.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1 or dims < 1:
        raise ValueError(f"expected draws >= 1 and dims >= 1, got {draws!r} and {dims!r}")
    gauss = torch.randn(draws, dims, dims, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)                                         # (R, E, E) each
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))               # (R, E)
    return (q * signs[:, None, :]).transpose(-2, -1).float()              # rows orthonormal


def frame_shares(z: torch.Tensor, frames: torch.Tensor, k: int = 1) -> torch.Tensor:
    """:func:`top_share` of each vector in each random frame instead of the axes.

    z: (N, E); frames: (R, E, E) with orthonormal rows. Returns (R, N): the share of
    ``|z_n|^2`` held by the k largest of the projections of z_n on the rows of frames[r].
    """
    _check_poses(z)
    if frames.dim() != 3 or frames.shape[1:] != (z.shape[1], z.shape[1]):
        raise ValueError(f"expected frames of shape (R, {z.shape[1]}, {z.shape[1]}), "
                         f"got {tuple(frames.shape)}")
    projections = torch.einsum("ref,nf->rne", frames.to(z.dtype), z)     # (R, N, E)
    return top_share(projections, k)
