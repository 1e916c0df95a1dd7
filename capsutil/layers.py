"""The layers of CapsNet (Sabour et al. 2017, chapter 05): primary capsules, digit capsules, decoder.

Index letters, used in every einsum here: ``b`` batch, ``i`` child capsule, ``j`` parent
capsule, ``d`` child pose component, ``e`` parent pose component. The routing itself lives in
:func:`capsutil.routing.dynamic_routing`; these modules only hold parameters and call it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsutil.routing import dynamic_routing, squash

LENGTH_EPS = 1e-8


def capsule_lengths(v: torch.Tensor, eps: float = LENGTH_EPS) -> torch.Tensor:
    """Lengths ``sqrt(|v|^2 + eps)`` of capsule vectors along the last axis: (..., D) -> (...).

    ``eps`` inside the square root keeps the gradient finite (zero) at ``v = 0`` (chapter 03),
    so no NaN reaches the margin loss from a capsule that is exactly zero.
    """
    return torch.sqrt((v * v).sum(dim=-1) + eps)


def group_capsules(conv_out: torch.Tensor, maps: int, dims: int) -> torch.Tensor:
    """Regroup a convolution's channels into capsules: (B, maps*dims, H, W) -> (B, maps*H*W, dims).

    Channel ``map * dims + d`` holds component ``d`` of the capsules of map ``map``, so each
    capsule's ``dims`` values come from **one map at one position**. Capsule ``i`` is
    ``map * H * W + row * W + col``. A bare ``view(B, -1, dims)`` would instead take ``dims``
    neighbouring *positions* of one channel as a capsule (the bug chapter 05 warns about).
    """
    b, channels, h, w = conv_out.shape
    if channels != maps * dims:
        raise ValueError(f"expected {maps} maps x {dims} dims = {maps * dims} channels, got {channels}")
    grouped = conv_out.reshape(b, maps, dims, h, w)                    # (B, maps, dims, H, W)
    grouped = grouped.permute(0, 1, 3, 4, 2)                           # (B, maps, H, W, dims)
    return grouped.reshape(b, maps * h * w, dims)                      # (B, I, D)


class PrimaryCaps(nn.Module):
    """Primary capsules: one convolution with ``maps * dims`` channels, regrouped and squashed.

    Paper configuration: 256 -> 32 maps x 8 dims, 9x9 kernels, stride 2, so a 20x20 input gives
    6x6x32 = 1152 capsules of 8 dimensions. (B, C, H, W) -> (B, 1152, 8).
    """

    def __init__(self, in_channels: int = 256, maps: int = 32, dims: int = 8,
                 kernel_size: int = 9, stride: int = 2):
        super().__init__()
        self.maps, self.dims = maps, dims
        self.conv = nn.Conv2d(in_channels, maps * dims, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squash(group_capsules(self.conv(x), self.maps, self.dims))   # (B, I, D)


class DigitCaps(nn.Module):
    """Digit capsules: predictions ``u_hat_{j|i} = W_ij u_i``, then routing by agreement.

    ``W`` has one 16x8 matrix per (child i, parent j): shape (I, J, E, D) = (1152, 10, 16, 8).
    (B, I, D) -> (B, J, E); ``forward(u, return_couplings=True)`` also returns the coupling
    coefficients of every iteration, each (B, I, J).

    ``W`` starts normal with std ``init_std``. Squash maps a short vector of length n to about
    n^2, so the digit capsules' initial length grows with the square of this std: with 0.01 they
    start near 1e-4 long and learning starts slowly; 0.05 starts near 1e-2.
    """

    def __init__(self, in_caps: int = 1152, in_dims: int = 8, out_caps: int = 10,
                 out_dims: int = 16, iterations: int = 3, init_std: float = 0.05):
        super().__init__()
        self.iterations = iterations
        self.weight = nn.Parameter(init_std * torch.randn(in_caps, out_caps, out_dims, in_dims))

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        """Every child's prediction for every parent: (B, I, D) -> u_hat (B, I, J, E)."""
        in_caps, out_caps, out_dims, in_dims = self.weight.shape
        if u.dim() != 3 or u.shape[1:] != (in_caps, in_dims):
            raise ValueError(f"expected child capsules of shape (B, {in_caps}, {in_dims}), "
                             f"got {tuple(u.shape)}")
        return torch.einsum("ijed,bid->bije", self.weight, u)             # (B, I, J, E)

    def forward(self, u: torch.Tensor, return_couplings: bool = False):
        return dynamic_routing(self.predictions(u), self.iterations,
                               return_couplings=return_couplings)       # (B, J, E)


class Decoder(nn.Module):
    """Reconstruct the image from the digit capsules, all but one masked to zero.

    (B, J, E) poses and (B,) class indices -> (B, pixels) in [0, 1]. Paper configuration:
    160 -> 512 ReLU -> 1024 ReLU -> 784 sigmoid.
    """

    def __init__(self, caps: int = 10, dims: int = 16, hidden: tuple[int, ...] = (512, 1024),
                 pixels: int = 784):
        super().__init__()
        sizes = (caps * dims, *hidden)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        layers += [nn.Linear(sizes[-1], pixels), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    @staticmethod
    def mask(poses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Keep capsule ``index[b]`` of each example, zero the others: (B, J, E), (B,) -> (B, J*E)."""
        keep = F.one_hot(index, poses.shape[1]).to(poses.dtype)        # (B, J)
        return (poses * keep[:, :, None]).flatten(1)                  # (B, J*E)

    def forward(self, poses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.net(self.mask(poses, index))                      # (B, pixels)
